"""`SpatioTemporalConv`: an `nn.Conv3d` whose forward is vidconv's fused conv3d + bias + ReLU."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vidconv._extension import build_info
from vidconv.ops import st_conv3d, st_conv3d_pair
from vidconv.ops._validate import INT32_MAX, INT64_MAX, expand_triple, expect_int

_SizeArg = int | tuple[int, int, int]

# Read once: a CPU-only build has no CUDA kernel to dispatch to, so CUDA tensors use F.conv3d.
_HAS_CUDA_KERNELS = build_info().has_cuda_kernels
_FUSED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def conv3d_arguments(
    in_channels: object,
    out_channels: object,
    kernel_size: object,
    stride: object,
    padding: object,
    dilation: object,
    groups: object,
) -> tuple[int, int, tuple[int, int, int], tuple[int, int, int], tuple[int, int, int] | str,
           tuple[int, int, int], int]:
    """``nn.Conv3d``'s shape arguments as Python ints, or a TypeError/ValueError naming the bad one.

    Integral types of any kind are taken (numpy integers, 0-d integer tensors: what has
    ``__index__``), as ``nn.Conv3d`` takes them; so are one-element sequences for stride, padding
    and dilation, which ``torch.nn.functional.conv3d`` repeats. Refused: floats, strings other
    than padding's 'same'/'valid', bools (``nn.Conv3d`` refuses them in stride, padding,
    dilation, groups and out_channels; we refuse them everywhere, since a flag given as a size
    is a mistake), wrong lengths, and values ``nn.Conv3d`` would only reject in forward
    (stride, dilation, kernel or channels below 1, negative padding).
    """
    def triple(name: str, value: object, minimum: int) -> tuple[int, int, int]:
        items = expand_triple(name, value, maximum=INT64_MAX)
        if min(items) < minimum:
            raise ValueError(f"{name} must be >= {minimum} along each axis, got {items}")
        return tuple(items)  # type: ignore[return-value]

    in_ch = expect_int("in_channels", in_channels, minimum=1)
    out_ch = expect_int("out_channels", out_channels, minimum=1)
    kernel = triple("kernel_size", kernel_size, 1)
    if _length(kernel_size) == 1:
        # nn.Conv3d would build a weight of the wrong rank from a one-element kernel_size.
        raise ValueError(
            f"kernel_size must be an int or three ints (t, h, w), got {kernel_size!r}")
    strides = triple("stride", stride, 1)
    pads: tuple[int, int, int] | str
    if isinstance(padding, str):
        pads = padding  # nn.Conv3d checks the string itself ('same' or 'valid')
    else:
        pads = triple("padding", padding, 0)
    dilations = triple("dilation", dilation, 1)
    groups_ = expect_int("groups", groups, minimum=1)
    return in_ch, out_ch, kernel, strides, pads, dilations, groups_


def _length(value: object) -> int | None:
    """How many items a sequence-like argument has; None for a scalar."""
    if isinstance(value, torch.Tensor | np.ndarray):
        return None if value.ndim == 0 else len(value)
    return len(list(value)) if isinstance(value, Iterable) else None


class SpatioTemporalConv(nn.Conv3d):
    """3D convolution over clips ``(N, C, T, H, W)`` with an optional fused ReLU.

    A drop-in replacement for :class:`torch.nn.Conv3d`: the same constructor arguments (numpy
    integers included; see :func:`conv3d_arguments` for what is refused, at construction rather
    than in forward), the same parameters and state_dict keys (``weight``, ``bias``), and the
    same outputs; ``relu=True`` also applies ReLU to the output in the same pass.

    The forward calls :func:`vidconv.ops.st_conv3d` (the fused CUDA kernel on GPU, ATen on the
    CPU) whenever the call is one that op computes: ``groups=1``, ``dilation=1``, symmetric zero
    padding, a batched 5-D floating-point input matching the weight's dtype, device and
    channels, strides and padding within 32 bits. Anything else (grouped or dilated
    convolutions, 'same' padding with an even kernel, reflect/replicate/circular padding,
    unbatched or mismatched input, a CUDA tensor with a CPU-only vidconv build) goes through
    ``torch.nn.functional.conv3d``, so the layer computes, and fails, wherever ``nn.Conv3d`` does.

    Memory format follows ``nn.Conv3d``: when the input and weight are contiguous the output is
    too (the CUDA kernel writes ``channels_last_3d``, so this costs one copy of the output; put
    model and input in ``torch.channels_last_3d`` to avoid it).

    Under autocast the input, weight and bias are cast as autocast casts them for
    ``nn.Conv3d`` (floating-point tensors other than float64 go to the autocast dtype).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _SizeArg,
        stride: _SizeArg = 1,
        padding: _SizeArg | str = 0,
        dilation: _SizeArg = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        relu: bool = False,
    ) -> None:
        args = conv3d_arguments(in_channels, out_channels, kernel_size, stride, padding,
                                dilation, groups)
        super().__init__(*args, bias, padding_mode, device, dtype)
        self.relu = bool(relu)

    @classmethod
    def from_conv3d(cls, conv: nn.Conv3d, relu: bool = False) -> SpatioTemporalConv:
        """Turn `conv` itself into a SpatioTemporalConv, keeping everything it holds.

        The object stays the same one (its Parameters, buffers, hooks, extra attributes and
        every reference to it are kept); only its class changes and its shape arguments become
        Python ints. Raises TypeError/ValueError, leaving `conv` untouched, when those
        arguments are ones :func:`conv3d_arguments` refuses.
        """
        if type(conv) is not nn.Conv3d:
            raise TypeError(f"conv must be exactly a torch.nn.Conv3d, got {type(conv).__name__}")
        args = conv3d_arguments(conv.in_channels, conv.out_channels, conv.kernel_size,
                                conv.stride, conv.padding, conv.dilation, conv.groups)
        (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
         conv.dilation, conv.groups) = args
        conv.__class__ = cls
        conv.relu = bool(relu)
        return conv  # type: ignore[return-value]

    def extra_repr(self) -> str:
        return super().extra_repr() + (", relu=True" if self.relu else "")

    def _fused_padding(self) -> tuple[int, int, int] | None:
        """Explicit symmetric zero padding for the fused op, or None when it cannot express it."""
        if self.padding_mode != "zeros" or any(s > INT32_MAX for s in self.stride):
            return None
        if self.padding == "valid":
            return (0, 0, 0)
        if self.padding == "same":
            # 'same' pads asymmetrically for even kernels; st_conv3d pads symmetrically only.
            if any(k % 2 == 0 for k in self.kernel_size):
                return None
            return tuple(k // 2 for k in self.kernel_size)  # type: ignore[return-value]
        if any(p > INT32_MAX for p in self.padding):
            return None
        return tuple(self.padding)  # type: ignore[return-value]

    def _uses_fused(self, x: torch.Tensor, padding: tuple[int, int, int]) -> bool:
        """Whether st_conv3d computes exactly what F.conv3d would for this call."""
        if self.groups != 1 or any(d != 1 for d in self.dilation):
            return False
        if not isinstance(x, torch.Tensor) or x.dim() != 5 or x.shape[1] != self.in_channels:
            return False
        weight, bias = self.weight, self.bias
        if x.device.type == "cuda":
            if not _HAS_CUDA_KERNELS:
                return False
        elif x.device.type not in ("cpu", "meta"):
            return False
        if weight.device != x.device or (bias is not None and bias.device != x.device):
            return False
        if x.dtype not in _FUSED_DTYPES:
            return False
        if x.device.type == "meta" or not torch.is_autocast_enabled(x.device.type):
            if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
                return False
        for size, k, s, p in zip(x.shape[2:], self.kernel_size, self.stride, padding,
                                 strict=True):
            if (size + 2 * p - k) // s + 1 < 1:
                return False  # F.conv3d's own error says the kernel does not fit
        return True

    def _fused_arguments(self, x: torch.Tensor) -> tuple | None:
        """(x, weight, bias, padding) as st_conv3d takes them for this call (autocast's casts
        applied), or None when the call goes through F.conv3d."""
        padding = self._fused_padding()
        if padding is None or not self._uses_fused(x, padding):
            return None
        weight, bias = self.weight, self.bias
        device_type = x.device.type
        if device_type != "meta" and torch.is_autocast_enabled(device_type):
            # A custom op is not on autocast's cast lists; cast what autocast casts for conv3d.
            dtype = torch.get_autocast_dtype(device_type)
            cast_x, weight = _autocast(x, dtype), _autocast(weight, dtype)
            bias = _autocast(bias, dtype) if bias is not None else None
            if weight.dtype != cast_x.dtype or (bias is not None and bias.dtype != cast_x.dtype):
                return None  # mixed dtypes autocast does not reconcile: F's error
            x = cast_x
        return x, weight, bias, padding

    def _unfused(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return F.relu(y) if self.relu else y

    @staticmethod
    def _as_conv3d_returns(x: torch.Tensor, weight: torch.Tensor,
                           y: torch.Tensor) -> torch.Tensor:
        if x.is_contiguous() and weight.is_contiguous() and not y.is_contiguous():
            # nn.Conv3d gives contiguous output for contiguous input and weight, and code after
            # it may rely on that (x.view(n, -1)); the CUDA kernel writes channels_last_3d.
            y = y.contiguous()
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self._fused_arguments(x)
        if fused is None:
            return self._unfused(x)
        x, weight, bias, padding = fused
        y = st_conv3d(x, weight, bias, self.stride, padding, "relu" if self.relu else None)
        return self._as_conv3d_returns(x, weight, y)


def conv_pair(conv0: nn.Module, conv1: nn.Module, x0: torch.Tensor,
              x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(conv0(x0), conv1(x1))`` for two layers of one shape (the multires streams' twin
    stages): one :func:`vidconv.ops.st_conv_pair.st_conv3d_pair` call, which runs them as one
    grouped launch where that is measured faster. Layers that differ, calls that are not
    st_conv3d's, and modules with hooks (which must see their own calls) run one by one."""
    # Exactly SpatioTemporalConv: a subclass may have its own forward.
    if not (type(conv0) is SpatioTemporalConv and type(conv1) is SpatioTemporalConv
            and _config(conv0) == _config(conv1) and not has_hooks(conv0)
            and not has_hooks(conv1)):
        return conv0(x0), conv1(x1)
    a, b = conv0._fused_arguments(x0), conv1._fused_arguments(x1)
    if a is None or b is None or a[0].shape != b[0].shape or a[0].dtype != b[0].dtype \
            or a[0].device != b[0].device or a[1].shape != b[1].shape \
            or a[1].dtype != b[1].dtype or a[3] != b[3]:
        return conv0(x0), conv1(x1)
    y0, y1 = st_conv3d_pair(a[0], a[1], a[2], b[0], b[1], b[2], conv0.stride, a[3],
                            "relu" if conv0.relu else None)
    return (SpatioTemporalConv._as_conv3d_returns(a[0], a[1], y0),
            SpatioTemporalConv._as_conv3d_returns(b[0], b[1], y1))


def _config(conv: SpatioTemporalConv) -> tuple:
    return (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
            conv.dilation, conv.groups, conv.padding_mode, conv.relu, conv.bias is None)


def has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` runs hooks (its own or global ones, forward or backward) that
    a caller computing its output some other way would skip."""
    from torch.nn.modules import module as module_mod

    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or module_mod._global_forward_hooks
                or module_mod._global_forward_pre_hooks or module_mod._global_backward_hooks
                or module_mod._global_backward_pre_hooks)


def _autocast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Autocast leaves float64 (and non-float) tensors as they are.
    if t.is_floating_point() and t.dtype != torch.float64:
        return t.to(dtype)
    return t
