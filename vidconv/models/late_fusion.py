"""Late fusion: two single-frame towers on frames 15 apart, merged at the first FC layer.

Karpathy et al. 2014, Sec. 3.1: two separate single-frame networks with shared parameters up to
the last convolutional layer, applied to frames 15 frames apart, their outputs concatenated and
fed to fc1, so only the fully connected layers can compare the two frames.

We run the shared tower as one 3D tower over the 2-frame clip ``(N, 3, 2, 170, 170)`` with
temporal extent 1 everywhere: the same filters applied to each frame *is* weight sharing. The
tower ends at ``(N, 256, 2, 7, 7)``; the model flattens it frame by frame, so fc1's 25,088 inputs
are frame 0's 7x7x256 followed by frame 15's (the concatenation of the paper)::

    layers     as single frame, on each of the 2 frames
    fc1        4096   (25,088 inputs = 2 x 256*7*7)
"""

from __future__ import annotations

from vidconv.models.registry import Architecture, register
from vidconv.models.single_frame import SINGLE_FRAME_LAYERS

LATE_FUSION_GAP = 15

LATE_FUSION = register(Architecture(
    name="late_fusion",
    frame_offsets=(0, LATE_FUSION_GAP),
    layers=SINGLE_FRAME_LAYERS,
    summary="two frames 15 apart, shared towers, merged at fc1",
))
