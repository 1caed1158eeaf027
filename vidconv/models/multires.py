"""Multiresolution ("foveated") variant of every architecture.

Karpathy et al. 2014, Sec. 3.2: frames are 178x178; the *context stream* sees the whole frame
downsampled to 89x89 and the *fovea stream* the centre 89x89 region at full resolution, halving
the input dimensionality. Both streams are the architecture's tower with the last pooling layer
removed, so each still ends at 7x7x256 (89 -> 27 -> 14 -> 14 -> 7 -> 7); their outputs are
concatenated (fovea first, then context) and fed to fc1. The two streams have their own weights.
The paper's Table 1 also reports a fovea-only and a context-only network: ``stream="fovea"`` or
``stream="context"`` keeps one tower, whose 7x7x256 output feeds fc1 alone.

The streams come from the uint8 frames in one pass with :func:`vidconv.ops.fovea_context`; a
model given an already normalised 178x178 clip splits it with :func:`split_fovea_context`, which
gives the same streams (normalisation is affine, so it commutes with the 2x2 mean).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MULTIRES_FRAME_SIZE = 178
MULTIRES_STREAM_SIZE = 89
STREAMS = ("both", "fovea", "context")


def split_fovea_context(clip: torch.Tensor,
                        size: int = MULTIRES_STREAM_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """A normalised ``(N, C, T, 2S, 2S)`` clip -> ``(fovea, context)``, each ``(N, C, T, S, S)``.

    fovea: the centre S x S region; context: the whole frame, mean of each 2x2 block.
    """
    if clip.dim() != 5 or clip.shape[-1] != 2 * size or clip.shape[-2] != 2 * size:
        raise ValueError(
            f"clip must have shape (N, C, T, {2 * size}, {2 * size}), got {tuple(clip.shape)}"
        )
    start = size // 2
    fovea = clip[..., start:start + size, start:start + size]
    context = F.avg_pool3d(clip, (1, 2, 2))
    return fovea, context
