"""Modules over vidconv's fused preprocessing ops, for use inside an `nn.Sequential` or a model."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vidconv.ops import DEFAULT_MEAN, DEFAULT_STD, crop_normalize, fovea_context
from vidconv.ops._validate import INT32_MAX, expect_int, per_channel

_Offsets = torch.Tensor | Sequence[int] | None
_Flip = torch.Tensor | bool | None


class _Preprocess(nn.Module):
    def __init__(
        self,
        size: int,
        *,
        mean: float | Sequence[float],
        std: float | Sequence[float],
        dtype: torch.dtype,
        memory_format: torch.memory_format,
    ) -> None:
        super().__init__()
        # Checked here too, so a bad module fails where it is built, not at its first batch.
        self.size = expect_int("size", size, minimum=1, maximum=INT32_MAX)
        self.mean = tuple(per_channel("mean", mean, 3))
        self.std = tuple(per_channel("std", std, 3, nonzero=True))
        self.dtype = dtype
        self.memory_format = memory_format

    def _kwargs(self) -> dict[str, object]:
        return {"mean": self.mean, "std": self.std, "dtype": self.dtype,
                "memory_format": self.memory_format}

    def extra_repr(self) -> str:
        return (f"size={self.size}, mean={self.mean}, std={self.std}, dtype={self.dtype}, "
                f"memory_format={self.memory_format}")


class FoveaContext(_Preprocess):
    """uint8 frames -> the ``(fovea, context)`` streams of a multiresolution model.

    Calls :func:`vidconv.ops.fovea_context`; see it for the arguments. The module holds the
    output size, normalisation, dtype and memory format; the fovea position and flips are per
    call, so a loader can draw them per batch.
    """

    def __init__(
        self,
        size: int = 89,
        *,
        mean: float | Sequence[float] = DEFAULT_MEAN,
        std: float | Sequence[float] = DEFAULT_STD,
        dtype: torch.dtype = torch.float32,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> None:
        super().__init__(size, mean=mean, std=std, dtype=dtype, memory_format=memory_format)

    def forward(self, clips: torch.Tensor, offsets: _Offsets = None,
                flip: _Flip = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``clips`` uint8 ``(N, T, H, W, 3)`` -> ``(fovea, context)``, each ``(N, 3, T, S, S)``."""
        return fovea_context(clips, self.size, offsets=offsets, flip=flip, **self._kwargs())


class CropNormalize(_Preprocess):
    """uint8 frames -> the normalised ``(N, 3, T, S, S)`` crop a full-resolution model takes.

    Calls :func:`vidconv.ops.crop_normalize`; see it for the arguments.
    """

    def __init__(
        self,
        size: int = 170,
        *,
        mean: float | Sequence[float] = DEFAULT_MEAN,
        std: float | Sequence[float] = DEFAULT_STD,
        dtype: torch.dtype = torch.float32,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> None:
        super().__init__(size, mean=mean, std=std, dtype=dtype, memory_format=memory_format)

    def forward(self, clips: torch.Tensor, offsets: _Offsets = None,
                flip: _Flip = None) -> torch.Tensor:
        """``clips`` uint8 ``(N, T, H, W, 3)`` -> ``(N, 3, T, S, S)``."""
        return crop_normalize(clips, self.size, offsets=offsets, flip=flip, **self._kwargs())
