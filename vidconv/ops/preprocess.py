"""Fused clip preprocessing: uint8 decoder frames in, normalised model inputs out, in one pass.

`fovea_context` makes the two streams of the paper's multiresolution models; `crop_normalize`
makes the single input of the full-resolution models. Both read each input byte once and write
each output element once, on the CPU (C++, at::parallel_for) and on CUDA.

On an x86 CPU with AVX2 the float32 crop (the fovea, and all of `crop_normalize`) is computed
16 pixels at a time with the same two float32 steps as the per-element path, so the bits are
the same; ``VIDCONV_CPU_SIMD=0`` in the environment selects the per-element path (read per
call).

On CUDA the hand-written kernel is a measured choice, like every vidconv kernel: on the first
call of a shape (op, device, dtype, layout, clip and output sizes) it runs beside the same
computation in plain PyTorch (:mod:`vidconv.reference` in float32 on the GPU); it is used only
when its output agrees (within one rounding of the output type, float32 steps included) and it
is faster by more than the timing noise. A kernel that disagrees or raises is not used for that
shape, with one warning, and the plain-PyTorch path runs instead (slower: it reads offsets and
flips on the host). ``VIDCONV_PREPROCESS=fused`` or ``aten`` forces one path (``auto``, the
default, measures); ``VIDCONV_CONV_ALGO=aten`` keeps plain PyTorch; ``VIDCONV_TUNE=0`` runs the
kernel without measuring. Under ``torch.compile`` and CUDA-graph capture the kernel runs
(nothing can be timed or read back there). :func:`preprocess_plan` lists the choices.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch

from vidconv import reference
from vidconv.ops import conv_planner
from vidconv.ops._validate import (
    INT32_MAX,
    expect_dtype,
    expect_int,
    expect_ndim,
    expect_same_device,
    expect_tensor,
    per_channel,
)

# The paper subtracts a constant 117 from every pixel (Karpathy et al. 2014, Sec. 4). It does
# not scale; we also divide by 64 so inputs sit in about [-2, 2], which our default
# initialisation and learning rates assume. Pass std=1.0 for the paper's exact preprocessing.
DEFAULT_MEAN: tuple[float, float, float] = (117.0, 117.0, 117.0)
DEFAULT_STD: tuple[float, float, float] = (64.0, 64.0, 64.0)

_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MEMORY_FORMATS = (torch.contiguous_format, torch.channels_last_3d)


def _offset_pair(offsets: object) -> tuple[int, int]:
    """A (y, x) pair of ints given as a sequence or array; integral types as for sizes."""
    expected = "offsets must be (y, x) ints or an (N, 2) int tensor"
    if isinstance(offsets, str | bytes) or not isinstance(offsets, Iterable):
        raise TypeError(f"{expected}, got {offsets!r} ({type(offsets).__name__})")
    items = list(offsets)
    if len(items) != 2:
        raise ValueError(f"{expected}, got {offsets!r}")
    y, x = (expect_int(f"offsets[{i}]", v) for i, v in enumerate(items))
    return y, x


def _prepare(
    clips: torch.Tensor,
    size: int,
    offsets: torch.Tensor | Sequence[int] | None,
    flip: torch.Tensor | bool | None,
    mean: float | Sequence[float],
    std: float | Sequence[float],
    dtype: torch.dtype,
    memory_format: torch.memory_format,
) -> tuple[torch.Tensor, bool, torch.Tensor, torch.Tensor, list[float], list[float]]:
    """Validate the common arguments; return the 5-D clips, whether a batch dim was added,
    int64 offsets (N, 2), bool flips (N,), mean and std lists."""
    expect_tensor("clips", clips)
    expect_ndim("clips", clips, (4, 5), "(N, T, H, W, C) or (T, H, W, C)")
    expect_dtype("clips", clips, (torch.uint8,))
    unbatched = clips.dim() == 4
    if unbatched:
        clips = clips.unsqueeze(0)
    n, t, h, w, c = clips.shape
    if c != 3:
        raise ValueError(f"clips must have 3 channels last (RGB), got {c} in shape "
                         f"{tuple(clips.shape)}")
    if not clips.is_contiguous():
        raise ValueError(
            f"clips must be contiguous (N, T, H, W, C) (got strides {clips.stride()}); "
            "call clips.contiguous() first"
        )
    # Integral types as nn.Conv3d takes them (numpy ints...), bools refused; the kernels index
    # in 32 bits.
    size = expect_int("size", size, minimum=1, maximum=INT32_MAX)
    if h < size or w < size:
        raise ValueError(f"frames must be at least size x size = {size}x{size}, got {h}x{w} "
                         f"(clips shape {tuple(clips.shape)})")
    if dtype not in _OUT_DTYPES:
        raise TypeError(f"dtype must be one of {_OUT_DTYPES}, got {dtype}")
    if memory_format not in _MEMORY_FORMATS:
        raise ValueError(f"memory_format must be torch.contiguous_format or "
                         f"torch.channels_last_3d, got {memory_format}")

    max_y, max_x = h - size, w - size
    if offsets is None or not isinstance(offsets, torch.Tensor):
        if offsets is None:
            y, x = max_y // 2, max_x // 2
        else:
            y, x = _offset_pair(offsets)
            if not (0 <= y <= max_y and 0 <= x <= max_x):
                raise ValueError(f"offsets out of range: (y, x) must satisfy 0 <= y <= {max_y} "
                                 f"and 0 <= x <= {max_x} for {h}x{w} frames and size {size}, "
                                 f"got ({y}, {x})")
        off = torch.tensor([y, x], dtype=torch.int64, device=clips.device).expand(n, 2)
        off = off.contiguous()
    else:
        expect_same_device("clips", clips, offsets=offsets)
        if offsets.is_floating_point() or offsets.is_complex() or offsets.dtype == torch.bool:
            raise TypeError(f"offsets must be an integer tensor, got {offsets.dtype}")
        off = offsets.to(torch.int64)
        if off.dim() == 1 and off.shape[0] == 2:
            off = off.expand(n, 2)
        if tuple(off.shape) != (n, 2):
            raise ValueError(f"offsets must have shape ({n}, 2) (top-left y, x per clip) or "
                             f"(2,), got {tuple(offsets.shape)}")
        off = off.contiguous()
        # Reading tensor values needs a device sync and is data-dependent control flow, which
        # torch.compile cannot trace: compiled graphs rely on the kernels (the CPU kernel
        # re-checks, the CUDA kernel clamps offsets into the frame).
        if n and not torch.compiler.is_compiling():
            lo = off.min().item()
            hi_y, hi_x = (v.item() for v in off.max(dim=0).values)
            if lo < 0 or hi_y > max_y or hi_x > max_x:
                raise ValueError(
                    f"offsets out of range: each (y, x) must satisfy 0 <= y <= {max_y} and "
                    f"0 <= x <= {max_x} for {h}x{w} frames and size {size}; got min {lo}, "
                    f"max y {hi_y}, max x {hi_x}"
                )

    if flip is None or isinstance(flip, bool | np.bool_):
        flips = torch.full((n,), bool(flip), dtype=torch.bool, device=clips.device)
    else:
        if not isinstance(flip, torch.Tensor):
            raise TypeError(f"flip must be None, a bool or a bool tensor ({n},), got {flip!r} "
                            f"({type(flip).__name__})")
        expect_same_device("clips", clips, flip=flip)
        if flip.dtype != torch.bool:
            raise TypeError(f"flip must be a bool tensor, got {flip.dtype}")
        if tuple(flip.shape) != (n,):
            raise ValueError(f"flip must have shape ({n},) (one per clip), got "
                             f"{tuple(flip.shape)}")
        flips = flip.contiguous()

    mean_ = per_channel("mean", mean, c)
    std_ = per_channel("std", std, c, nonzero=True)
    return clips, unbatched, off, flips, mean_, std_


def _check_out(name: str, out: object, clips: torch.Tensor, unbatched: bool, size: int,
               dtype: torch.dtype, memory_format: torch.memory_format) -> torch.Tensor:
    """``out`` validated against what the op would return; the 5-D tensor the kernel writes."""
    n, t = clips.shape[0], clips.shape[1]
    shape = (3, t, size, size) if unbatched else (n, 3, t, size, size)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of shape {shape}, got {type(out).__name__}")
    if tuple(out.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(out.shape)}")
    if out.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype} (the dtype argument), got {out.dtype}")
    if out.device != clips.device:
        raise ValueError(f"{name} must be on clips' device {clips.device}, got {out.device}")
    out5 = out.unsqueeze(0) if unbatched else out
    layout_ok = (out5.is_contiguous() if memory_format == torch.contiguous_format
                 else out5.is_contiguous(memory_format=torch.channels_last_3d))
    if not layout_ok:
        raise ValueError(f"{name} must be dense in memory_format {memory_format} (the "
                         f"memory_format argument), got strides {out.stride()}")
    if out.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(f"{name} requires grad: the preprocessing ops have no gradient "
                           "(uint8 input), so they cannot write into a tensor autograd tracks")
    return out5


# ---- the CUDA kernel as a measured choice -----------------------------------------------------

# Where the kernel is measured against plain PyTorch before use: the CPU kernel is the one the
# tests hold to the float64 reference bit for bit on every build.
_MEASURED_DEVICES = {"cuda"}
_decisions = conv_planner.ChoiceTable()


def preprocess_plan() -> list[dict]:
    """Every kernel-or-PyTorch choice the preprocessing ops made in this process (CUDA): key
    (op, device, output dtype, layout, clips shape, size), fused or not, how, times (ms), the
    kernel's relative difference from plain PyTorch, seconds spent deciding."""
    return _decisions.plan()


def clear_preprocess_plan() -> None:
    """Forget the choices (the next call of each shape measures again)."""
    _decisions.clear()


def _plain(op: str, clips: torch.Tensor, size: int, off: torch.Tensor, flips: torch.Tensor,
           mean: list[float], std: list[float], dtype: torch.dtype,
           memory_format: torch.memory_format) -> tuple[torch.Tensor, ...]:
    """The op in plain PyTorch on clips' device (float32, then rounded to ``dtype``)."""
    if op == "fovea_context":
        outs = reference.fovea_context(clips, size, offsets=off, flip=flips, mean=mean, std=std,
                                       compute_dtype=torch.float32)
    else:
        outs = (reference.crop_normalize(clips, size, offsets=off, flip=flips, mean=mean,
                                         std=std, compute_dtype=torch.float32),)
    return tuple(o.to(dtype).contiguous(memory_format=memory_format) for o in outs)


def _kernel(op: str, clips: torch.Tensor, size: int, off: torch.Tensor, flips: torch.Tensor,
            mean: list[float], std: list[float], dtype: torch.dtype,
            memory_format: torch.memory_format) -> tuple[torch.Tensor, ...]:
    out = getattr(torch.ops.vidconv, op)(clips, size, off, flips, mean, std, dtype,
                                         memory_format == torch.channels_last_3d)
    return tuple(out) if isinstance(out, tuple | list) else (out,)


def _compute(op: str, clips: torch.Tensor, size: int, off: torch.Tensor, flips: torch.Tensor,
             mean: list[float], std: list[float], dtype: torch.dtype,
             memory_format: torch.memory_format,
             outs: tuple[torch.Tensor, ...] | None) -> tuple[torch.Tensor, ...]:
    """The op's outputs, by the kernel or plain PyTorch as :func:`_use_kernel` decides; written
    into ``outs`` (5-D, validated) when given, their version counters bumped."""
    args = (op, clips, size, off, flips, mean, std, dtype, memory_format)
    fused = _use_kernel(*args)
    if outs is None:
        return _kernel(*args) if fused else _plain(*args)
    if fused:
        names = ("fovea", "context") if op == "fovea_context" else ("out",)
        getattr(torch.ops.vidconv, op).out(clips, size, off, flips, mean, std,
                                           **dict(zip(names, outs, strict=True)))
    else:
        for o, value in zip(outs, _plain(*args), strict=True):
            o.copy_(value)
    _written(*outs)  # views share their base's version counter
    return outs


def _tolerance(dtype: torch.dtype) -> float:
    # Relative to the largest output any pixel could give (see _difference): the two paths round
    # float32 steps in different orders (area mean as sum * (1/count) against a division), then
    # once to the output type.
    eps = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dtype]
    return 2 * eps + 16 * 2.0**-23


def _difference(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor],
                mean: list[float], std: list[float]) -> float:
    """Largest absolute difference over the largest |output| a pixel value 0..255 can give, so
    that a first batch of low contrast (outputs near 0) is held to the same rounding as any."""
    scale = max(max(abs(0.0 - m), abs(255.0 - m)) / abs(s) for m, s in zip(mean, std,
                                                                          strict=True))
    diff = 0.0
    for g, w in zip(got, want, strict=True):
        if g.shape != w.shape:
            return float("inf")
        if g.numel():
            d = (g.double() - w.double()).abs().max().item()
            diff = max(diff, d if d == d else float("inf"))  # NaN: unwritten elements
    return diff / scale


def _use_kernel(op: str, clips: torch.Tensor, size: int, off: torch.Tensor,
                flips: torch.Tensor, mean: list[float], std: list[float], dtype: torch.dtype,
                memory_format: torch.memory_format) -> bool:
    """Whether the kernel (True) or plain PyTorch computes this call; see the module
    docstring."""
    if clips.device.type not in _MEASURED_DEVICES or torch.compiler.is_compiling():
        return True
    # The plain path reads offsets and flips on the host, which a CUDA graph cannot capture.
    if clips.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return True
    mode = conv_planner.fused_mode("VIDCONV_PREPROCESS")
    if mode != "auto":
        return mode == "fused"
    if conv_planner._mode() == "aten":  # plain PyTorch asked for, throughout
        return False
    if not conv_planner._tuning_enabled():  # the fixed rule: the kernel, as without measuring
        return True
    key = (op, conv_planner._device_name(clips.device), str(dtype).removeprefix("torch."),
           "channels_last_3d" if memory_format == torch.channels_last_3d else "contiguous",
           tuple(clips.shape), size)
    decision = _decisions.get(key)
    if decision is not None:
        return decision.fused
    args = (op, clips, size, off, flips, mean, std, dtype, memory_format)
    return _decisions.decide(key, lambda: _measure(*args)).fused


def _measure(op: str, clips: torch.Tensor, size: int, off: torch.Tensor, flips: torch.Tensor,
             mean: list[float], std: list[float], dtype: torch.dtype,
             memory_format: torch.memory_format) -> conv_planner.FusedDecision:
    args = (op, clips, size, off, flips, mean, std, dtype, memory_format)
    what = f"{op} of clips {tuple(clips.shape)} to {dtype} on {clips.device}"
    runs: dict[str, Callable[[], tuple[torch.Tensor, ...]]] = {
        "fused": lambda: _kernel(*args), "aten": lambda: _plain(*args)}
    # The user's call: fovea_context / crop_normalize -> _compute -> _use_kernel -> decide ->
    # lambda -> here.
    level = 7
    try:
        got = runs["fused"]()
    except Exception as exc:  # noqa: BLE001 - no kernel for the device, a size it refuses
        warnings.warn(f"vidconv: the {op} kernel cannot run {what} ({type(exc).__name__}: "
                      f"{str(exc).splitlines()[0] if str(exc) else ''}); plain PyTorch runs "
                      "there", RuntimeWarning, stacklevel=level)
        return conv_planner.FusedDecision(False, "raised", {}, float("nan"))
    try:
        want = runs["aten"]()
    except Exception as exc:  # noqa: BLE001 - e.g. out of memory: its float32 copy is larger
        warnings.warn(f"vidconv: plain PyTorch could not run {what} to check the {op} kernel "
                      f"({type(exc).__name__}); the kernel runs there unchecked",
                      RuntimeWarning, stacklevel=level)
        return conv_planner.FusedDecision(True, "unchecked", {}, None)
    err = _difference(got, want, mean, std)
    if not err <= _tolerance(dtype):
        warnings.warn(f"vidconv: the {op} kernel differs from plain PyTorch by {err:.3g} "
                      f"(relative) on {what}; not used there", RuntimeWarning, stacklevel=level)
        return conv_planner.FusedDecision(False, "disagrees", {}, err)
    result = conv_planner.measure_choice(runs, "aten", clips.device, warm_up=True)
    if result.noisy is not None:
        warnings.warn(f"vidconv: {op} timings varied {result.noisy:.1f}x between runs on "
                      f"{what} (other work on the same device?); plain PyTorch runs there in "
                      "this process", RuntimeWarning, stacklevel=level)
        return conv_planner.FusedDecision(False, "noisy", result.times_ms, err)
    return conv_planner.FusedDecision(result.chosen == "fused", "tuned", result.times_ms, err)


def _written(*tensors: torch.Tensor) -> None:
    """Bump the version counters of tensors an op wrote in place, as PyTorch's in-place ops do:
    a backward that saved an earlier value of one then raises instead of using the new one.
    (Under torch.compile the graph's functionalisation tracks the write instead.)"""
    if not torch.compiler.is_compiling():
        for t in tensors:
            torch.autograd.graph.increment_version(t)


def fovea_context(
    clips: torch.Tensor,
    size: int = 89,
    *,
    offsets: torch.Tensor | Sequence[int] | None = None,
    flip: torch.Tensor | bool | None = None,
    mean: float | Sequence[float] = DEFAULT_MEAN,
    std: float | Sequence[float] = DEFAULT_STD,
    dtype: torch.dtype = torch.float32,
    memory_format: torch.memory_format = torch.contiguous_format,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fovea and context streams of the paper's multiresolution models, in one pass.

    For the paper's 178x178 frames and ``size=89``: the fovea is the centre 89x89 region at full
    resolution, the context is the whole frame downsampled to 89x89 (the exact mean of each 2x2
    block). Other frame sizes use area resampling: output pixel ``i`` averages input rows
    ``floor(i*H/S)`` to ``ceil((i+1)*H/S) - 1`` (likewise columns), which is what
    ``torch.nn.functional.adaptive_avg_pool2d`` computes.

    Args:
        clips: uint8 frames ``(N, T, H, W, 3)`` (or ``(T, H, W, 3)`` for one clip), contiguous,
            as decoders give them. ``H, W >= size``.
        size: side S of both output streams: an int (numpy integers too), not a bool.
        offsets: top-left ``(y, x)`` of the fovea in the frame: None for the centre
            (``((H - S) // 2, (W - S) // 2)``), one pair for every clip, or an int tensor
            ``(N, 2)`` (or ``(2,)``) on ``clips``' device for random crops. A tensor's values
            are range-checked (a device sync on CUDA), except under ``torch.compile``, where
            the CPU kernel still refuses them and the CUDA kernel clamps them into the frame.
        flip: mirror clips left-right: None/False, True for all, or a bool tensor ``(N,)``.
            A flipped clip's fovea is the mirror image of the same crop.
        mean, std: per-channel (R, G, B) normalisation, ``(x - mean) / std``: one real number
            or three (a sequence, array or tensor), finite in float32; std non-zero with
            ``1 / std`` finite in float32.
        dtype: float32, float16 or bfloat16 output. Values are computed in float32 as
            ``(x - mean) * (1 / std)`` (context: ``x = sum * (1 / count)``), each step rounded
            once, then rounded to ``dtype``; CPU and CUDA give the same bits.
        memory_format: ``torch.contiguous_format`` or ``torch.channels_last_3d``.
        out: optional ``(fovea, context)`` tensors to write instead of new ones: the shape,
            ``dtype`` and ``memory_format`` the result would have, on ``clips``' device, not
            overlapping each other or ``clips``. Memory written before is written again
            without a first touch of every page, which is what a fresh CPU batch pays for.

    Returns:
        ``(fovea, context)``, each ``(N, 3, T, S, S)`` (``(3, T, S, S)`` for one clip): the
        ``out`` tensors when given.
    """
    clips, unbatched, off, flips, mean_, std_ = _prepare(
        clips, size, offsets, flip, mean, std, dtype, memory_format)
    outs = None
    if out is not None:
        if not isinstance(out, tuple | list) or len(out) != 2:
            raise TypeError(f"out must be a (fovea, context) pair of tensors, got {out!r:.80}")
        outs = (_check_out("out[0] (fovea)", out[0], clips, unbatched, size, dtype,
                           memory_format),
                _check_out("out[1] (context)", out[1], clips, unbatched, size, dtype,
                           memory_format))
    fovea, context = _compute("fovea_context", clips, size, off, flips, mean_, std_, dtype,
                              memory_format, outs)
    if out is not None:
        return out[0], out[1]
    if unbatched:
        return fovea[0], context[0]
    return fovea, context


def crop_normalize(
    clips: torch.Tensor,
    size: int = 170,
    *,
    offsets: torch.Tensor | Sequence[int] | None = None,
    flip: torch.Tensor | bool | None = None,
    mean: float | Sequence[float] = DEFAULT_MEAN,
    std: float | Sequence[float] = DEFAULT_STD,
    dtype: torch.dtype = torch.float32,
    memory_format: torch.memory_format = torch.contiguous_format,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """An S x S crop of every frame, normalised, as the full-resolution models take it.

    The paper trains on 200x200 frames with a random 170x170 crop and tests on the centre crop.
    Arguments are as for :func:`fovea_context` (``out``: one tensor); frames may be of any
    size at least S x S.

    Returns:
        ``(N, 3, T, S, S)`` (``(3, T, S, S)`` for one clip): ``out`` when given.
    """
    clips, unbatched, off, flips, mean_, std_ = _prepare(
        clips, size, offsets, flip, mean, std, dtype, memory_format)
    outs = None if out is None else (
        _check_out("out", out, clips, unbatched, size, dtype, memory_format),)
    (result,) = _compute("crop_normalize", clips, size, off, flips, mean_, std_, dtype,
                         memory_format, outs)
    if out is not None:
        return out
    return result[0] if unbatched else result


def _fake_output(clips: torch.Tensor, size: int, dtype: torch.dtype,
                 channels_last: bool) -> torch.Tensor:
    # torch.empty with a memory format gives exactly the strides the kernels' at::empty does
    # (.contiguous(memory_format) would keep plain strides where they also count as channels
    # last, e.g. with size 1).
    n, t = clips.shape[0], clips.shape[1]
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    return torch.empty((n, 3, t, size, size), dtype=dtype, device=clips.device,
                       memory_format=fmt)


@torch.library.register_fake("vidconv::fovea_context")
def _fovea_context_fake(clips, size, offsets, flip, mean, std, dtype, channels_last):
    return (_fake_output(clips, size, dtype, channels_last),
            _fake_output(clips, size, dtype, channels_last))


@torch.library.register_fake("vidconv::crop_normalize")
def _crop_normalize_fake(clips, size, offsets, flip, mean, std, dtype, channels_last):
    return _fake_output(clips, size, dtype, channels_last)


@torch.library.register_fake("vidconv::fovea_context.out")
def _fovea_context_out_fake(clips, size, offsets, flip, mean, std, *, fovea, context):
    return None


@torch.library.register_fake("vidconv::crop_normalize.out")
def _crop_normalize_out_fake(clips, size, offsets, flip, mean, std, *, out):
    return None
