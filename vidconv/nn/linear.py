"""``nn.Linear`` whose forward is :func:`vidconv.ops.linear` (a measured GEMM orientation)."""

from __future__ import annotations

import torch
from torch import nn

from vidconv.ops.fully_connected import linear


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, state dict and initialisation) computed by
    :func:`vidconv.ops.linear`: for 2-D inputs, whichever of ``F.linear`` and its
    weight-major form was measured faster for the layer; ``F.linear`` otherwise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
