"""Early fusion: time is combined at the pixel level, in conv1.

Karpathy et al. 2014, Sec. 3.1: the single-frame network with conv1 extended in time to
11 x 11 x 3 x T filters over T = 10 contiguous frames (about a third of a second); every other
layer is unchanged, so conv1 gives one response in time and the rest is the single-frame tower::

    conv1   96   10 x 11 x 11  stride 1,3,3   10 frames -> 1     then as single frame

Valid (unpadded) in time: the paper's filters cover the whole clip.
"""

from __future__ import annotations

from dataclasses import replace

from vidconv.models.registry import Architecture, register
from vidconv.models.single_frame import SINGLE_FRAME_LAYERS

EARLY_FUSION_FRAMES = 10

EARLY_FUSION_LAYERS = (
    replace(SINGLE_FRAME_LAYERS[0], kernel=(EARLY_FUSION_FRAMES, 11, 11)),
    *SINGLE_FRAME_LAYERS[1:],
)

EARLY_FUSION = register(Architecture(
    name="early_fusion",
    frame_offsets=tuple(range(EARLY_FUSION_FRAMES)),
    layers=EARLY_FUSION_LAYERS,
    summary="10 contiguous frames fused in conv1 (11x11x3x10 filters)",
))
