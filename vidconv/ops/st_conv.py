"""Fused spatio-temporal convolution: conv3d + bias + optional ReLU, written once."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vidconv.ops._validate import (
    expand_triple,
    expect_dtype,
    expect_ndim,
    expect_same_device,
    expect_tensor,
)

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_ACTIVATIONS = ("relu", None)


def _out_size(size: int, k: int, s: int, p: int) -> int:
    return (size + 2 * p - k) // s + 1


def st_conv3d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    activation: str | None = "relu",
) -> torch.Tensor:
    """3D convolution with the bias add and ReLU fused into one output write.

    Args:
        x: input clips ``(N, C, T, H, W)``, floating point. On CUDA ``torch.channels_last_3d``
            memory is what the kernel reads; a contiguous input is converted once.
        weight: filters ``(K, C, kt, kh, kw)``, same dtype and device as ``x``.
        bias: ``(K,)`` or None.
        stride: ``(st, sh, sw)`` or one int for all three.
        padding: zero padding ``(pt, ph, pw)`` or one int.
        activation: ``"relu"`` or None.

    Returns:
        ``(N, K, T', H', W')`` with ``T' = (T + 2 pt - kt) // st + 1`` (likewise H', W'), in
        ``x``'s dtype; on CUDA in ``channels_last_3d`` memory, on the CPU contiguous.
        Differentiable in x, weight, bias.

    On CUDA the forward is the hand-written implicit-GEMM kernel (csrc/cuda/st_conv3d_kernel.cu:
    tensor cores for float16/bfloat16, FFMA for float32; float64 falls back to ATen). The
    backward is not hand-written yet: it applies the ReLU mask and calls ATen's
    ``convolution_backward`` (cuDNN on CUDA). On the CPU both directions are ATen.
    """
    expect_tensor("x", x)
    expect_tensor("weight", weight)
    expect_ndim("x", x, (5,), "(N, C, T, H, W)")
    expect_ndim("weight", weight, (5,), "(K, C, kt, kh, kw)")
    expect_dtype("x", x, _FLOATS)
    if weight.dtype != x.dtype:
        raise TypeError(f"weight must have x's dtype {x.dtype}, got {weight.dtype}")
    expect_same_device("x", x, weight=weight, bias=bias)
    if weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"weight must have x's {x.shape[1]} input channels in dim 1 (x shape "
            f"{tuple(x.shape)}), got weight shape {tuple(weight.shape)}"
        )
    if bias is not None:
        expect_tensor("bias", bias)
        if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            raise ValueError(
                f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}"
            )
        if bias.dtype != x.dtype:
            raise TypeError(f"bias must have x's dtype {x.dtype}, got {bias.dtype}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be 'relu' or None, got {activation!r}")
    stride_ = expand_triple("stride", stride)
    padding_ = expand_triple("padding", padding)
    if min(stride_) < 1:
        raise ValueError(f"stride must be >= 1, got {stride_}")
    if min(padding_) < 0:
        raise ValueError(f"padding must be >= 0, got {padding_}")
    for axis, size, k, s, p in zip("THW", x.shape[2:], weight.shape[2:], stride_, padding_,
                                   strict=True):
        if _out_size(size, k, s, p) < 1:
            raise ValueError(
                f"kernel extent {k} along {axis} does not fit x's {axis}={size} with padding "
                f"{p}: x shape {tuple(x.shape)}, weight shape {tuple(weight.shape)}"
            )
    return torch.ops.vidconv.st_conv3d(x, weight, bias, stride_, padding_, activation == "relu")


@torch.library.register_fake("vidconv::st_conv3d")
def _st_conv3d_fake(x, weight, bias, stride, padding, relu):
    n = x.shape[0]
    k = weight.shape[0]
    sizes = [_out_size(x.shape[2 + i], weight.shape[2 + i], stride[i], padding[i])
             for i in range(3)]
    fmt = torch.channels_last_3d if x.device.type == "cuda" else torch.contiguous_format
    return x.new_empty((n, k, *sizes)).contiguous(memory_format=fmt)


@torch.library.register_fake("vidconv::st_conv3d_backward")
def _st_conv3d_backward_fake(grad_out, x, weight, out, stride, padding, relu, output_mask):
    gx = torch.empty_like(x) if output_mask[0] else x.new_empty((0,))
    gw = torch.empty_like(weight) if output_mask[1] else weight.new_empty((0,))
    gb = weight.new_empty((weight.shape[0],)) if output_mask[2] else weight.new_empty((0,))
    return gx, gw, gb


def _setup_context(ctx, inputs, output):
    x, weight, bias, stride, padding, relu = inputs
    ctx.save_for_backward(x, weight, output)
    ctx.stride, ctx.padding, ctx.relu = stride, padding, relu
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out):
    x, weight, out = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1],
            ctx.has_bias and ctx.needs_input_grad[2]]
    gx, gw, gb = torch.ops.vidconv.st_conv3d_backward(
        grad_out, x, weight, out, ctx.stride, ctx.padding, ctx.relu, mask)
    return (gx if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None,
            None, None, None)


torch.library.register_autograd("vidconv::st_conv3d", _backward, setup_context=_setup_context)
