"""Fused clip preprocessing: uint8 decoder frames in, normalised model inputs out, in one pass.

`fovea_context` makes the two streams of the paper's multiresolution models; `crop_normalize`
makes the single input of the full-resolution models. Both read each input byte once and write
each output element once, on the CPU (C++, at::parallel_for) and on CUDA.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vidconv.ops._validate import expect_dtype, expect_ndim, expect_same_device, expect_tensor

# The paper subtracts a constant 117 from every pixel (Karpathy et al. 2014, Sec. 4). It does
# not scale; we also divide by 64 so inputs sit in about [-2, 2], which our default
# initialisation and learning rates assume. Pass std=1.0 for the paper's exact preprocessing.
DEFAULT_MEAN: tuple[float, float, float] = (117.0, 117.0, 117.0)
DEFAULT_STD: tuple[float, float, float] = (64.0, 64.0, 64.0)

_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MEMORY_FORMATS = (torch.contiguous_format, torch.channels_last_3d)


def _per_channel(name: str, value: float | Sequence[float], channels: int) -> list[float]:
    if isinstance(value, int | float):
        return [float(value)] * channels
    items = [float(v) for v in value]
    if len(items) != channels:
        raise ValueError(f"{name} must be one float or {channels} floats, got {len(items)}")
    return items


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
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    if h < size or w < size:
        raise ValueError(f"frames must be at least size x size = {size}x{size}, got {h}x{w} "
                         f"(clips shape {tuple(clips.shape)})")
    if dtype not in _OUT_DTYPES:
        raise TypeError(f"dtype must be one of {_OUT_DTYPES}, got {dtype}")
    if memory_format not in _MEMORY_FORMATS:
        raise ValueError(f"memory_format must be torch.contiguous_format or "
                         f"torch.channels_last_3d, got {memory_format}")

    if offsets is None:
        off = torch.tensor([(h - size) // 2, (w - size) // 2], dtype=torch.int64)
        off = off.expand(n, 2).contiguous()
    elif isinstance(offsets, torch.Tensor):
        expect_same_device("clips", clips, offsets=offsets)
        if offsets.is_floating_point() or offsets.dtype == torch.bool:
            raise TypeError(f"offsets must be an integer tensor, got {offsets.dtype}")
        off = offsets.to(torch.int64)
        if off.dim() == 1 and off.shape[0] == 2:
            off = off.expand(n, 2)
        if tuple(off.shape) != (n, 2):
            raise ValueError(f"offsets must have shape ({n}, 2) (top-left y, x per clip) or "
                             f"(2,), got {tuple(offsets.shape)}")
        off = off.contiguous()
    else:
        items = list(offsets)
        if len(items) != 2:
            raise ValueError(f"offsets must be (y, x) or an (N, 2) tensor, got {offsets!r}")
        off = torch.tensor(items, dtype=torch.int64).expand(n, 2).contiguous()
    off_cpu = off.cpu()
    if n and (off_cpu.min() < 0 or (off_cpu[:, 0] > h - size).any()
              or (off_cpu[:, 1] > w - size).any()):
        raise ValueError(
            f"offsets out of range: each (y, x) must satisfy 0 <= y <= {h - size} and "
            f"0 <= x <= {w - size} for {h}x{w} frames and size {size}; got min "
            f"{off_cpu.min().item()}, max y {off_cpu[:, 0].max().item()}, "
            f"max x {off_cpu[:, 1].max().item()}"
        )
    off = off.to(clips.device)

    if flip is None or isinstance(flip, bool):
        flips = torch.full((n,), bool(flip), dtype=torch.bool, device=clips.device)
    else:
        expect_tensor("flip", flip)
        expect_same_device("clips", clips, flip=flip)
        if flip.dtype != torch.bool:
            raise TypeError(f"flip must be a bool tensor, got {flip.dtype}")
        if tuple(flip.shape) != (n,):
            raise ValueError(f"flip must have shape ({n},) (one per clip), got "
                             f"{tuple(flip.shape)}")
        flips = flip.contiguous()

    mean_ = _per_channel("mean", mean, c)
    std_ = _per_channel("std", std, c)
    if any(s == 0.0 for s in std_):
        raise ValueError(f"std must be non-zero, got {std_}")
    return clips, unbatched, off, flips, mean_, std_


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
        size: side S of both output streams.
        offsets: top-left ``(y, x)`` of the fovea in the frame: None for the centre, one pair
            for every clip, or an int tensor ``(N, 2)`` for random crops.
        flip: mirror clips left-right: None/False, True for all, or a bool tensor ``(N,)``.
            A flipped clip's fovea is the mirror image of the same crop.
        mean, std: per-channel (R, G, B) normalisation, ``(x - mean) / std``.
        dtype: float32, float16 or bfloat16 output.
        memory_format: ``torch.contiguous_format`` or ``torch.channels_last_3d``.

    Returns:
        ``(fovea, context)``, each ``(N, 3, T, S, S)`` (``(3, T, S, S)`` for one clip).
    """
    clips, unbatched, off, flips, mean_, std_ = _prepare(
        clips, size, offsets, flip, mean, std, dtype, memory_format)
    fovea, context = torch.ops.vidconv.fovea_context(
        clips, size, off, flips, mean_, std_, dtype, memory_format == torch.channels_last_3d)
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
) -> torch.Tensor:
    """An S x S crop of every frame, normalised, as the full-resolution models take it.

    The paper trains on 200x200 frames with a random 170x170 crop and tests on the centre crop.
    Arguments are as for :func:`fovea_context`; frames may be of any size at least S x S.

    Returns:
        ``(N, 3, T, S, S)`` (``(3, T, S, S)`` for one clip).
    """
    clips, unbatched, off, flips, mean_, std_ = _prepare(
        clips, size, offsets, flip, mean, std, dtype, memory_format)
    out = torch.ops.vidconv.crop_normalize(
        clips, size, off, flips, mean_, std_, dtype, memory_format == torch.channels_last_3d)
    return out[0] if unbatched else out


def _fake_output(clips: torch.Tensor, size: int, dtype: torch.dtype,
                 channels_last: bool) -> torch.Tensor:
    n, t = clips.shape[0], clips.shape[1]
    out = clips.new_empty((n, 3, t, size, size), dtype=dtype)
    return out.contiguous(memory_format=torch.channels_last_3d) if channels_last else out


@torch.library.register_fake("vidconv::fovea_context")
def _fovea_context_fake(clips, size, offsets, flip, mean, std, dtype, channels_last):
    return (_fake_output(clips, size, dtype, channels_last),
            _fake_output(clips, size, dtype, channels_last))


@torch.library.register_fake("vidconv::crop_normalize")
def _crop_normalize_fake(clips, size, offsets, flip, mean, std, dtype, channels_last):
    return _fake_output(clips, size, dtype, channels_last)
