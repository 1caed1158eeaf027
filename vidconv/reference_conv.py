"""Plain-PyTorch version of `vidconv.ops.st_conv3d`: the tests' oracle.

Computed in float64 on the CPU (so no TF32, cuDNN or reduced-precision path can leak in) and
cast back to the input's dtype and device only when asked.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _triple(value: int | Sequence[int]) -> tuple[int, int, int]:
    if isinstance(value, int):
        return (value, value, value)
    t, h, w = value
    return (int(t), int(h), int(w))


def st_conv3d_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    activation: str | None = "relu",
    *,
    out_dtype: torch.dtype | None = torch.float64,
    compute_device: str | torch.device = "cpu",
) -> torch.Tensor:
    """conv3d + bias + optional ReLU in float64.

    Args:
        x, weight, bias, stride, padding, activation: as `vidconv.ops.st_conv3d`.
        out_dtype: dtype of the result (default float64, left on `compute_device`); None
            returns x's dtype on x's device.
        compute_device: where the float64 convolution runs (the CPU by default; a GPU test may
            pass "cuda" to keep large shapes fast, float64 has no TF32 path there either).
    """
    if activation not in ("relu", None):
        raise ValueError(f"activation must be 'relu' or None, got {activation!r}")
    x64 = x.detach().to(compute_device, torch.float64)
    w64 = weight.detach().to(compute_device, torch.float64)
    b64 = None if bias is None else bias.detach().to(compute_device, torch.float64)
    out = F.conv3d(x64, w64, b64, stride=_triple(stride), padding=_triple(padding))
    if activation == "relu":
        out = out.clamp_min(0)
    if out_dtype is None:
        return out.to(x.device, x.dtype)
    return out.to(out_dtype)
