"""Local response normalisation then max pooling in one pass: the paper's "N" and "P" of conv1/2.

The op's schema is C++ (csrc/ops.cpp); the CPU kernel is csrc/cpu/lrn_max_pool.cpp, the CUDA
kernel csrc/cuda/lrn_max_pool_kernel.cu (channels_last_3d, one block per run of output positions,
channels across threads). Fake kernels and autograd are here: the gradient is an op too, which
recomputes the normalisation from x and writes out the chain rule, the pooling's part being
ATen's own max_pool3d backward (ties in a window go where ATen sends them).

:func:`prefer_fused` decides, per shape and measured on the first call, whether a model should
run the fused op or its own two-op composition (see its docstring and ``VIDCONV_LRN_POOL``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vidconv.ops import conv_planner
from vidconv.ops._validate import (
    INT32_MAX,
    expect_bool,
    expect_dtype,
    expect_int,
    expect_ndim,
    expect_real,
    expect_tensor,
)
from vidconv.ops.st_conv import _output_format  # lrn_max_pool's output follows st_conv3d's rule

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _pool_pair(pool: int | Sequence[int]) -> list[int]:
    expected = "pool must be an int or two ints (kh, kw)"
    if isinstance(pool, str | bytes) or isinstance(pool, bool):
        raise TypeError(f"{expected}, got {pool!r} ({type(pool).__name__})")
    if isinstance(pool, Sequence):
        items = list(pool)
        if len(items) != 2:
            raise ValueError(f"{expected}, got {pool!r}")
    else:
        items = [pool, pool]
    return [expect_int(f"pool[{i}]", v, minimum=1, maximum=INT32_MAX)
            for i, v in enumerate(items)]


def pooled_size(n: int, k: int, ceil_mode: bool) -> int:
    """Output side of a non-overlapping window k (stride k, no padding) over n inputs."""
    return -(-n // k) if ceil_mode else n // k


def lrn_max_pool(
    x: torch.Tensor,
    size: int = 5,
    alpha: float = 1e-4,
    beta: float = 0.5,
    k: float = 2.0,
    pool: int | Sequence[int] = (2, 2),
    ceil_mode: bool = True,
) -> torch.Tensor:
    """``max_pool3d(local_response_norm(x, size, alpha, beta, k), (1, kh, kw), ceil_mode)`` fused.

    The normalised activations are never written: each input element is read once, normalised
    in registers (float32, float64 for float64 inputs) and folded into its window's maximum.

    Args:
        x: ``(N, C, T, H, W)`` floating point (the ReLU'd output of a convolution). Contiguous
            or ``torch.channels_last_3d`` memory; other strides are copied to contiguous once.
        size: channels in the LRN window (centred as torch's: ``size // 2`` before,
            ``(size - 1) // 2`` after; missing channels count as zero).
        alpha, beta, k: ``b = a / (k + alpha / size * sum a^2) ** beta`` (torch's definition,
            alpha divided by size).
        pool: ``(kh, kw)`` window of the max pooling, applied frame by frame with stride equal to
            the window and no padding (the paper's non-overlapping 2x2).
        ceil_mode: keep a partial window at the bottom/right border (27 -> 14), as
            ``nn.MaxPool3d(..., ceil_mode=True)``.

    Returns:
        ``(N, C, T, H', W')`` in x's dtype with ``H' = ceil(H / kh)`` (``floor`` without
        ceil_mode), likewise W'. On the CPU in channels_last_3d memory when x is (and not also
        plain contiguous), else contiguous; on CUDA in channels_last_3d memory. NaN propagates
        as in max pooling. Differentiable in x.
    """
    expect_tensor("x", x)
    expect_ndim("x", x, (5,), "(N, C, T, H, W)")
    expect_dtype("x", x, _FLOATS)
    size = expect_int("size", size, minimum=1, maximum=INT32_MAX)
    alpha, beta, k = (expect_real(n, v) for n, v in (("alpha", alpha), ("beta", beta), ("k", k)))
    for name, v in (("alpha", alpha), ("beta", beta), ("k", k)):
        if not math.isfinite(v):
            raise ValueError(f"{name} must be finite, got {v}")
    pool_ = _pool_pair(pool)
    ceil_mode = expect_bool("ceil_mode", ceil_mode)
    for axis, n, kk in zip("HW", x.shape[3:], pool_, strict=True):
        if pooled_size(n, kk, ceil_mode) < 1:
            raise ValueError(f"pool {tuple(pool_)} does not fit x's {axis}={n} without "
                             f"ceil_mode (x shape {tuple(x.shape)})")
    return torch.ops.vidconv.lrn_max_pool(x, size, alpha, beta, k, pool_, ceil_mode)


@torch.library.register_fake("vidconv::lrn_max_pool")
def _lrn_max_pool_fake(x, size, alpha, beta, k, pool, ceil_mode):
    n, c, t, h, w = x.shape
    shape = (n, c, t, pooled_size(h, pool[0], ceil_mode), pooled_size(w, pool[1], ceil_mode))
    return x.new_empty(shape).contiguous(memory_format=_output_format(x))


@torch.library.register_fake("vidconv::lrn_max_pool_backward")
def _lrn_max_pool_backward_fake(grad_out, x, size, alpha, beta, k, pool, ceil_mode):
    return torch.empty_like(x)


def _channel_window_sum(t: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """out[:, c] = sum of t[:, c - before .. c + after] (channels outside count as zero)."""
    out = t.clone()
    for o in range(1, before + 1):
        out[:, o:] += t[:, :-o]
    for o in range(1, after + 1):
        out[:, :-o] += t[:, o:]
    return out


def _lrn_max_pool_backward_kernel(grad_out, x, size, alpha, beta, k, pool, ceil_mode):
    """The gradient of max_pool3d(local_response_norm(x)), recomputed from x in plain ATen ops
    (this runs below autograd, so the chain rule is written out):

    with S_c = sum over c's window of x^2, D = k + alpha/size * S and y = x * D^-beta, the pool
    sends grad_out to each window's argmax of y (ATen's own max_pool3d backward), and
    dx_j = gy_j D_j^-beta - 2 beta alpha/size x_j * sum over the c whose window holds j of
    gy_c x_c D_c^(-beta-1). float32 for half types (their rounding would otherwise be the
    gradient's), float64 for float64.
    """
    compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    window = [1, *pool]
    lo, hi = size // 2, (size - 1) // 2
    autocast = (torch.autocast(x.device.type, enabled=False)
                if x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type)
                else contextlib.nullcontext())
    with autocast:
        xc = x.to(compute).contiguous()
        d = _channel_window_sum(xc * xc, lo, hi).mul_(alpha / size).add_(k)
        scale = d.pow(-beta)
        y = xc * scale
        _, indices = F.max_pool3d(y, window, window, ceil_mode=ceil_mode, return_indices=True)
        gy = torch.ops.aten.max_pool3d_with_indices_backward(
            grad_out.to(compute).contiguous(), y, window, window, [0, 0, 0], [1, 1, 1],
            ceil_mode, indices)
        u = gy * xc * scale / d
        gx = gy * scale - (2 * beta * alpha / size) * xc * _channel_window_sum(u, hi, lo)
    out = torch.empty_like(x)
    out.copy_(gx)
    return out


for _device in ("cpu", "cuda"):
    torch.library.register_kernel("vidconv::lrn_max_pool_backward", _device,
                                  _lrn_max_pool_backward_kernel)


def _setup_context(ctx, inputs, output):
    x, size, alpha, beta, k, pool, ceil_mode = inputs
    ctx.save_for_backward(x)
    ctx.args = (size, alpha, beta, k, pool, ceil_mode)


def _backward(ctx, grad_out):
    (x,) = ctx.saved_tensors
    gx = torch.ops.vidconv.lrn_max_pool_backward(grad_out, x, *ctx.args)
    return gx, None, None, None, None, None, None


torch.library.register_autograd("vidconv::lrn_max_pool", _backward, setup_context=_setup_context)


# ---- fused or not: measured per shape ----------------------------------------------------------


@dataclass(frozen=True)
class LrnPoolKey:
    """What a choice is made for: one activation shape and LRN/pool setting on one device."""

    device: str
    dtype: str
    memory_format: str
    shape: tuple[int, ...]
    params: tuple[float, ...]  # size, alpha, beta, k, kh, kw, ceil_mode
    grad: bool  # timed with the backward (training) or without (inference)


_decisions = conv_planner.ChoiceTable()


def lrn_pool_plan() -> list[dict]:
    """Every choice :func:`prefer_fused` made in this process: key, fused or not, how, times."""
    return _decisions.plan()


def clear_lrn_pool_plan() -> None:
    """Forget the choices (the next call of each shape measures again)."""
    _decisions.clear()


def _tolerance(dtype: torch.dtype) -> float:
    # Both paths compute the normalisation in at least float32 and round once or twice to the
    # output type: a few units of the output type's rounding.
    eps = {torch.float64: 2.0**-52, torch.float32: 2.0**-23, torch.float16: 2.0**-10,
           torch.bfloat16: 2.0**-7}[dtype]
    return 4 * eps + 16 * 2.0**-23


def prefer_fused(x: torch.Tensor, size: int, alpha: float, beta: float, k: float,
                 pool: Sequence[int], ceil_mode: bool,
                 unfused: Callable[[torch.Tensor], torch.Tensor]) -> bool:
    """Whether :func:`lrn_max_pool` should replace ``unfused(x)`` (a model's own LRN + pool).

    On the first call for a shape (device, dtype, layout, sizes, parameters, and whether
    gradients are wanted), both run on the real activation: their outputs must agree (else the
    composition is kept, with a warning) and both are timed by the convolution planner's
    :func:`~vidconv.ops.conv_planner.race` (perf_counter on the CPU, CUDA events on a GPU, run
    by run in turn, 3 or 5 runs; forward and backward when gradients are wanted). The fused op
    is chosen only when faster by more than the timing noise (10% CPU, 3% CUDA); timings too
    uneven to decide keep the composition, with a warning. The choice is kept for the
    process.

    ``VIDCONV_LRN_POOL=fused`` / ``aten`` force one path; ``auto`` (default) measures, except
    under ``VIDCONV_CONV_ALGO=aten`` (plain PyTorch throughout), which keeps the composition. While
    ``torch.compile`` traces, the answer is False (the compiler fuses the composition itself);
    under CUDA-graph capture nothing can be timed, so a shape without a choice yet runs the
    composition there.
    """
    if torch.compiler.is_compiling():
        return False
    mode = conv_planner.fused_mode("VIDCONV_LRN_POOL")
    if mode != "auto":
        return mode == "fused"
    if conv_planner._mode() == "aten":  # plain PyTorch asked for: the model's own LRN + pool
        return False
    grad = torch.is_grad_enabled() and x.requires_grad
    key = LrnPoolKey(conv_planner._device_name(x.device), str(x.dtype).removeprefix("torch."),
                     _format_name(x), tuple(x.shape),
                     (size, alpha, beta, k, *pool, ceil_mode), grad)
    decision = _decisions.get(key)
    if decision is not None:
        return decision.fused
    if x.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    return _decisions.decide(key, lambda: _measure(x, size, alpha, beta, k, list(pool),
                                                  ceil_mode, unfused, grad)).fused


def _format_name(x: torch.Tensor) -> str:
    if x.is_contiguous():
        return "contiguous"
    if x.is_contiguous(memory_format=torch.channels_last_3d):
        return "channels_last_3d"
    return "strided"


def _measure(x, size, alpha, beta, k, pool, ceil_mode, unfused, grad) -> conv_planner.FusedDecision:
    sample = x.detach()

    def fused_fn(t):
        return lrn_max_pool(t, size, alpha, beta, k, pool, ceil_mode)

    def run(fn) -> Callable[[], torch.Tensor]:
        if not grad:
            def forward():
                with torch.no_grad():
                    return fn(sample)
            return forward

        def forward_backward():
            with conv_planner.own_saved_tensors():
                t = sample.clone().requires_grad_(True)
                out = fn(t)
                out.backward(torch.ones_like(out))
            return out
        return forward_backward

    runs = {"fused": run(fused_fn), "aten": run(unfused)}
    import warnings

    try:
        with torch.no_grad():
            err = conv_planner._rel_err(fused_fn(sample), unfused(sample))
    except Exception as exc:  # noqa: BLE001 - no kernel for this device, a size it refuses
        warnings.warn(f"vidconv lrn_max_pool cannot run x {tuple(x.shape)} {x.dtype} on "
                      f"{x.device} ({type(exc).__name__}: {str(exc).splitlines()[0]}); the "
                      "model's LRN + max pool run there", RuntimeWarning, stacklevel=3)
        return conv_planner.FusedDecision(False, "raised", {}, float("nan"))
    if not err <= _tolerance(x.dtype):
        warnings.warn(f"vidconv lrn_max_pool differs from the model's LRN + max pool by "
                      f"{err:.3g} (relative) on x {tuple(x.shape)} {x.dtype}; not used there",
                      RuntimeWarning, stacklevel=3)
        return conv_planner.FusedDecision(False, "disagrees", {}, err)
    # A warm-up run first (allocator, first touch, lazy init): both are small next to a layer.
    result = conv_planner.measure_choice(runs, "aten", x.device, warm_up=True)
    if result.noisy is not None:
        warnings.warn(f"vidconv lrn_max_pool: timings varied {result.noisy:.1f}x between runs "
                      f"on x {tuple(x.shape)} {x.dtype} (other work on the same device?); the "
                      "model's LRN + max pool run there in this process", RuntimeWarning,
                      stacklevel=3)
        return conv_planner.FusedDecision(False, "noisy", result.times_ms, err)
    return conv_planner.FusedDecision(result.chosen == "fused", "tuned", result.times_ms, err)
