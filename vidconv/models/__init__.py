"""The networks of Karpathy et al. 2014: single frame, early, late and slow fusion, each also in
a multiresolution (fovea + context) variant and as fovea-only / context-only networks.

>>> from vidconv.models import build, list_models
>>> list_models()
['single_frame', 'early_fusion', 'late_fusion', 'slow_fusion']
>>> net = build("slow_fusion", num_classes=101, multires=True)
>>> net.spec.frames, net.spec.size
(10, 89)

Each architecture lives in its own file with its layer table in the docstring; the tower they
share is in :mod:`vidconv.models.tower`, the multiresolution streams in
:mod:`vidconv.models.multires`, the network class in :mod:`vidconv.models.videonet`.
"""

from __future__ import annotations

# Importing the architecture files registers them, in the paper's order.
from vidconv.models import early_fusion, late_fusion, single_frame, slow_fusion  # noqa: F401
from vidconv.models.multires import split_fovea_context
from vidconv.models.registry import Architecture, get_architecture, list_models
from vidconv.models.tower import ConvLayer, Tower
from vidconv.models.videonet import VideoNet

__all__ = [
    "Architecture",
    "ConvLayer",
    "Tower",
    "VideoNet",
    "build",
    "get_architecture",
    "list_models",
    "split_fovea_context",
]


def build(
    name: str,
    num_classes: int = 487,
    *,
    multires: bool = False,
    stream: str = "both",
    width: float = 1.0,
    dropout: float = 0.5,
) -> VideoNet:
    """Build one of the paper's networks.

    Args:
        name: one of :func:`list_models` ("single_frame", "early_fusion", "late_fusion",
            "slow_fusion").
        num_classes: classifier outputs (487 for Sports-1M, 101 for UCF-101): an int (numpy
            integers too), at least 1.
        multires: the fovea + context variant on two 89x89 streams: True or False (no truthy
            strings such as 'no').
        stream: with multires, "both", or "fovea" / "context" for the single-stream networks.
        width: scales every conv's filters and the FC widths (1.0 = the paper's; e.g. 0.25 for
            CPU runs), in ``(0, 4]``: see ``vidconv.models.videonet.MAX_WIDTH`` for why 4.
        dropout: drop probability before fc1, fc2 and the classifier, in ``[0, 1)``.

    Raises:
        ValueError: unknown name (the message lists the known ones) or an argument out of
            range; TypeError: an argument of the wrong type (a bool or float num_classes, a
            string multires or width). Messages name the argument and the value given.
    """
    arch = get_architecture(name)
    return VideoNet(arch, num_classes, multires=multires, stream=stream, width=width,
                    dropout=dropout)
