"""Slow fusion: time is combined gradually through conv1, conv2 and conv3.

Karpathy et al. 2014, Sec. 3.1: on a 10-frame clip, conv1 has temporal extent 4 and stride 2
(4 responses in time), conv2 extent 2 stride 2 (2 responses), conv3 extent 2 (1 response);
convolutions are valid in time, and weights are shared along time, i.e. they are 3D
convolutions. conv4, conv5 and the FC layers are as in the single-frame network::

    layer   filters  kernel (t,h,w)  stride   frames
    input                                     10
    conv1   96       4 x 11 x 11     2,3,3    (10 - 4) / 2 + 1 = 4
    conv2   256      2 x 5 x 5       2,1,1    (4 - 2) / 2 + 1 = 2
    conv3   384      2 x 3 x 3       1        2 - 2 + 1 = 1
    conv4   384      1 x 3 x 3       1        1
    conv5   256      1 x 3 x 3       1        1

Spatial kernels, strides, padding, LRN and pooling are the single-frame tower's, so the spatial
sizes are the same (170 -> 54 -> 27 -> 27 -> 14 -> 14 -> 7).
"""

from __future__ import annotations

from dataclasses import replace

from vidconv.models.registry import Architecture, register
from vidconv.models.single_frame import SINGLE_FRAME_LAYERS

SLOW_FUSION_FRAMES = 10

_conv1, _conv2, _conv3, _conv4, _conv5 = SINGLE_FRAME_LAYERS

SLOW_FUSION_LAYERS = (
    replace(_conv1, kernel=(4, 11, 11), stride=(2, 3, 3)),
    replace(_conv2, kernel=(2, 5, 5), stride=(2, 1, 1)),
    replace(_conv3, kernel=(2, 3, 3)),
    _conv4,
    _conv5,
)

SLOW_FUSION = register(Architecture(
    name="slow_fusion",
    frame_offsets=tuple(range(SLOW_FUSION_FRAMES)),
    layers=SLOW_FUSION_LAYERS,
    summary="10 frames fused gradually: conv1 t4/s2, conv2 t2/s2, conv3 t2",
))
