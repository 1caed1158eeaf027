"""Spatio-temporal convolution: conv3d + bias + optional ReLU, with the fastest correct algorithm.

The op's schema is C++ (csrc/ops.cpp); its CPU and CUDA kernels are registered here: each asks
:mod:`vidconv.ops.conv_planner` which algorithm to run for the call's layer (timed and checked on
the first call, then remembered) and runs it. Fake kernels and autograd are here too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from vidconv.ops import conv_planner
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
        ``x``'s dtype; on CUDA in ``channels_last_3d`` memory; on the CPU in ``channels_last_3d``
        memory when x is (and not also plain contiguous), else contiguous. Differentiable in x,
        weight, bias; gradients have the layout of the tensor they belong to.

    Each direction (forward, input gradient, weight gradient) of each layer shape runs the
    fastest of several exact algorithms that agrees with ATen's conv3d, measured on the first
    call (see :mod:`vidconv.ops.conv_planner`, ``VIDCONV_CONV_ALGO`` and ``VIDCONV_TUNE``): cuDNN /
    oneDNN 3D convolution in either layout, 2D reformulations of layers whose temporal extent
    is 1, equal to the temporal stride or the whole clip, and on CUDA the hand-written
    implicit-GEMM kernel (csrc/cuda/st_conv3d_kernel.cu) in each of its tile configurations.
    """
    stride_, padding_ = validate(x, weight, bias, stride, padding, activation)
    return torch.ops.vidconv.st_conv3d(x, weight, bias, stride_, padding_, activation == "relu")


def validate(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             stride: int | Sequence[int], padding: int | Sequence[int],
             activation: str | None) -> tuple[list[int], list[int]]:
    """st_conv3d's arguments checked (errors name the argument, expected and actual value);
    returns the stride and padding as three ints each."""
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
    return stride_, padding_


def _output_format(x: torch.Tensor) -> torch.memory_format:
    """The layout of st_conv3d's output (the same rule for the real and the fake kernels)."""
    if x.device.type == "cuda":
        return torch.channels_last_3d
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _output_shape(x, weight, stride, padding) -> tuple[int, ...]:
    return (x.shape[0], weight.shape[0],
            *[_out_size(x.shape[2 + i], weight.shape[2 + i], stride[i], padding[i])
              for i in range(3)])


@torch.library.register_fake("vidconv::st_conv3d")
def _st_conv3d_fake(x, weight, bias, stride, padding, relu):
    fmt = _output_format(x)
    return x.new_empty(_output_shape(x, weight, stride, padding)).contiguous(memory_format=fmt)


@torch.library.register_fake("vidconv::st_conv3d_fused")
def _st_conv3d_fused_fake(x, weight, bias, stride, padding, relu, tile_config):
    shape = _output_shape(x, weight, stride, padding)
    return x.new_empty(shape).contiguous(memory_format=torch.channels_last_3d)


@torch.library.register_fake("vidconv::st_conv3d_fused_sm90")
def _st_conv3d_fused_sm90_fake(x, weight, bias, stride, padding, relu, split_k=1):
    shape = _output_shape(x, weight, stride, padding)
    return x.new_empty(shape).contiguous(memory_format=torch.channels_last_3d)


@torch.library.register_fake("vidconv::st_conv3d_fused_sm90_grouped")
def _st_conv3d_fused_sm90_grouped_fake(x0, weight0, bias0, x1, weight1, bias1, stride, padding,
                                       relu, split_k=1):
    return (_st_conv3d_fused_sm90_fake(x0, weight0, bias0, stride, padding, relu),
            _st_conv3d_fused_sm90_fake(x1, weight1, bias1, stride, padding, relu))


@torch.library.register_fake("vidconv::st_conv3d_backward")
def _st_conv3d_backward_fake(grad_out, x, weight, out, stride, padding, relu, output_mask):
    gx = torch.empty_like(x) if output_mask[0] else x.new_empty((0,))
    gw = torch.empty_like(weight) if output_mask[1] else weight.new_empty((0,))
    gb = weight.new_empty((weight.shape[0],)) if output_mask[2] else weight.new_empty((0,))
    return gx, gw, gb


def _check_dims(op: str, **tensors: torch.Tensor) -> None:
    # Python callers are validated in st_conv3d(); this keeps a direct torch.ops call with the
    # wrong rank from reaching a candidate with a confusing message.
    for name, t in tensors.items():
        if t.dim() != 5:
            raise RuntimeError(f"{op}: {name} must be 5-D, got shape {tuple(t.shape)}")


def _expect_layout(shape: tuple[int, ...], dtype: torch.dtype, like: torch.Tensor | None,
                   fmt: torch.memory_format | None):
    """expect(out) for conv_planner: None when `out` is what the op must return, else why not."""
    def expect(out: torch.Tensor) -> str | None:
        # Only called while tuning: the per-call cost of building it stays a closure.
        strides = None if like is None else torch.empty_like(like).stride()
        if not isinstance(out, torch.Tensor):
            return f"returned {type(out).__name__}, not a tensor"
        if tuple(out.shape) != tuple(shape) or out.dtype != dtype:
            return f"returned {tuple(out.shape)} {out.dtype}, expected {tuple(shape)} {dtype}"
        if strides is not None and out.stride() != strides:
            return f"returned strides {out.stride()}, expected {strides}"
        if fmt is not None and not out.is_contiguous(memory_format=fmt):
            return f"returned strides {out.stride()}, not {fmt}"
        return None

    return expect


def _no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast off inside the kernels: the op computes in x's dtype (what its fake kernel says;
    vidconv.nn casts before calling it, as autocast does for conv3d), and the planner's float64
    check must stay float64."""
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _st_conv3d_kernel(x, weight, bias, stride, padding, relu):
    with _no_autocast(x.device.type):
        return _st_conv3d_impl(x, weight, bias, stride, padding, relu)


def _st_conv3d_backward_kernel(grad_out, x, weight, out, stride, padding, relu, output_mask):
    with _no_autocast(x.device.type):
        return _st_conv3d_backward_impl(grad_out, x, weight, out, stride, padding, relu,
                                        output_mask)


def _st_conv3d_impl(x, weight, bias, stride, padding, relu):
    _check_dims("st_conv3d", x=x, weight=weight)
    fmt = _output_format(x)
    shape = _output_shape(x, weight, stride, padding)
    if 0 in shape or x.numel() == 0 or weight.numel() == 0:
        # No work, or an empty reduction: the output is the (activated) bias.
        out = x.new_zeros(shape).contiguous(memory_format=fmt)
        if bias is not None and out.numel():
            out.add_(bias.view(1, -1, 1, 1, 1))
        return out.relu_() if relu else out
    algo = conv_planner.choose("forward", (x, weight, bias, stride, padding, relu), x, weight,
                            bias is not None, stride, padding, relu, fmt,
                            _expect_layout(shape, x.dtype, None, fmt))
    return algo.forward(x, weight, bias, stride, padding, relu, fmt)


def _st_conv3d_backward_impl(grad_out, x, weight, out, stride, padding, relu, output_mask):
    _check_dims("st_conv3d_backward", grad_out=grad_out, x=x, weight=weight, out=out)
    # d relu(y)/dy is 1 where the output is positive: the saved output carries the mask.
    grad = torch.where(out > 0, grad_out, 0) if relu else grad_out
    empty_x, empty_w = x.new_empty((0,)), weight.new_empty((0,))
    gx, gw, gb = empty_x, empty_w, empty_w
    if x.numel() == 0 or weight.numel() == 0 or grad.numel() == 0:
        zeros = [torch.zeros_like(x), torch.zeros_like(weight), weight.new_zeros(weight.shape[0])]
        return tuple(z if m else e for z, m, e in zip(zeros, output_mask,
                                                       (empty_x, empty_w, empty_w), strict=True))
    args = (grad, x, weight, stride, padding)
    if output_mask[0]:
        algo = conv_planner.choose("input_grad", args, x, weight, output_mask[2], stride, padding,
                                relu, None, _expect_layout(tuple(x.shape), x.dtype, x, None))
        gx = algo.input_grad(*args)
    if output_mask[1]:
        algo = conv_planner.choose("weight_grad", args, x, weight, output_mask[2], stride, padding,
                                relu, None,
                                _expect_layout(tuple(weight.shape), weight.dtype, weight, None))
        gw = algo.weight_grad(*args)
    if output_mask[2]:
        gb = grad.sum(dim=(0, 2, 3, 4)).to(weight.dtype)
    return gx, gw, gb


for _device in ("cpu", "cuda"):
    torch.library.register_kernel("vidconv::st_conv3d", _device, _st_conv3d_kernel)
    torch.library.register_kernel("vidconv::st_conv3d_backward", _device,
                                  _st_conv3d_backward_kernel)


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
