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

from typing import Any

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
    "conv_layer_shapes",
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


def conv_layer_shapes(width: float = 1.0) -> dict[tuple[str, str], dict[str, Any]]:
    """What every convolution of every architecture receives at batch 1, full resolution and
    multires: ``(model, conv) -> {"c", "k", "ksize", "stride", "padding", "thw"}`` (model
    "slow_fusion" or "multires slow_fusion", conv "conv1" ... "conv5"; ``thw`` is the input's
    (T, H, W)), in the order the forward meets them. Each model runs once on the meta device,
    and every SpatioTemporalConv reports its input, so the shapes come from the models' own
    layer tables. A multires model's two streams have the same shapes: the first is kept."""
    import torch

    from vidconv.nn import SpatioTemporalConv

    layers: dict[tuple[str, str], dict[str, Any]] = {}
    for name in list_models():
        for multires in (False, True):
            model = build(name, multires=multires, width=width).to("meta").eval()
            label = ("multires " if multires else "") + name
            handles = []
            for path, module in model.named_modules():
                if not isinstance(module, SpatioTemporalConv):
                    continue
                # "towers.fovea.conv1.conv" -> "conv1"
                conv = path.split(".")[-2] if "." in path else path

                def hook(mod, args, key=(label, conv)):
                    layers.setdefault(key, dict(
                        c=args[0].shape[1], k=mod.out_channels, ksize=tuple(mod.kernel_size),
                        stride=tuple(mod.stride), padding=tuple(mod.padding),
                        thw=tuple(args[0].shape[2:])))

                handles.append(module.register_forward_pre_hook(hook))
            t, s = model.spec.frames, model.spec.size
            clip = torch.empty(1, 3, t, s, s, device="meta")
            with torch.no_grad():
                model((clip, clip) if model.multires else clip)
            for h in handles:
                h.remove()
    return layers
