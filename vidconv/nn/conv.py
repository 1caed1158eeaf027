"""`SpatioTemporalConv`: an `nn.Conv3d` whose forward is vidconv's fused conv3d + bias + ReLU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vidconv._extension import build_info
from vidconv.ops import st_conv3d

_SizeArg = int | tuple[int, int, int]

# Read once: a CPU-only build has no CUDA kernel to dispatch to, so CUDA tensors use F.conv3d.
_HAS_CUDA_KERNELS = build_info().has_cuda_kernels


class SpatioTemporalConv(nn.Conv3d):
    """3D convolution over clips ``(N, C, T, H, W)`` with an optional fused ReLU.

    A drop-in replacement for :class:`torch.nn.Conv3d`: the same constructor arguments, the same
    parameters and state_dict keys (``weight``, ``bias``), and the same outputs; ``relu=True``
    also applies ReLU to the output in the same pass. The forward calls
    :func:`vidconv.ops.st_conv3d` (the fused CUDA kernel on GPU, ATen on the CPU) whenever the
    layer is one that op computes: ``groups=1``, ``dilation=1``, zero padding, a batched 5-D
    input. Anything else (grouped or dilated convolutions, reflect/replicate/circular padding,
    unbatched input, a CUDA tensor with a CPU-only vidconv build) goes through
    ``torch.nn.functional.conv3d``, so the layer is correct wherever ``nn.Conv3d`` is.

    Under autocast the input, weight and bias are cast to the autocast dtype first, as autocast
    does for ``nn.Conv3d``.
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
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, padding_mode, device, dtype)
        self.relu = bool(relu)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", relu=True" if self.relu else "")

    def _fused_padding(self) -> tuple[int, int, int] | None:
        """Explicit symmetric zero padding for the fused op, or None when it cannot express it."""
        if self.padding_mode != "zeros":
            return None
        if self.padding == "valid":
            return (0, 0, 0)
        if self.padding == "same":
            # 'same' pads asymmetrically for even kernels; st_conv3d pads symmetrically only.
            if any(k % 2 == 0 for k in self.kernel_size):
                return None
            return tuple(k // 2 for k in self.kernel_size)  # type: ignore[return-value]
        return tuple(self.padding)  # type: ignore[return-value]

    def _uses_fused(self, x: torch.Tensor) -> bool:
        if self.groups != 1 or any(d != 1 for d in self.dilation) or x.dim() != 5:
            return False
        if x.device.type == "cuda":
            return _HAS_CUDA_KERNELS
        return x.device.type in ("cpu", "meta")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding = self._fused_padding()
        if padding is None or not self._uses_fused(x):
            y = super().forward(x)
            return F.relu(y) if self.relu else y
        weight, bias = self.weight, self.bias
        device_type = x.device.type
        if device_type != "meta" and torch.is_autocast_enabled(device_type):
            # A custom op is not on autocast's cast lists; do what autocast does for conv3d.
            dtype = torch.get_autocast_dtype(device_type)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        return st_conv3d(x, weight, bias, self.stride, padding,
                         "relu" if self.relu else None)
