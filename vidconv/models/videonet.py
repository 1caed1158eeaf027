"""`VideoNet`: one class for all of the paper's networks, built from a layer table."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vidconv.clip import ClipSpec
from vidconv.models.multires import (
    MULTIRES_FRAME_SIZE,
    MULTIRES_STREAM_SIZE,
    STREAMS,
    split_fovea_context,
)
from vidconv.models.registry import Architecture
from vidconv.models.tower import (
    ConvLayer,
    Tower,
    conv_macs,
    scale_width,
    scaled,
    stage_sizes,
    twin_towers,
    without_last_pool,
)
from vidconv.nn import Linear
from vidconv.ops._validate import expect_bool, expect_int, expect_real

FULL_RES_SIZE = 170
FULL_RES_FRAME_SIZE = 200
IN_CHANNELS = 3
# Widest network built: at 4x the paper's width the largest model (late fusion) has 2.0 B
# parameters, 7.4 GiB in float32 before gradients and optimizer state (about 30 GiB with Adam),
# which one training GPU still holds; at 8x it is 7.9 B parameters, 29 GiB for the weights
# alone. Wider than this is a typo (width=40 for 0.40), not a model anyone can train here.
MAX_WIDTH = 4.0

_Input = torch.Tensor | tuple[torch.Tensor, torch.Tensor] | list[torch.Tensor]


class VideoNet(nn.Module):
    """A video classification network of the paper: tower(s), fc1, fc2, classifier.

    Build one with :func:`vidconv.models.build`. Attributes:

    - ``name``: the registry name ("slow_fusion", ...); ``variant`` adds multires/stream.
    - ``spec``: the :class:`vidconv.clip.ClipSpec` the model consumes (frames, input size,
      multires, stream, decoded frame size); loaders build their batches from it.
    - ``layers``: the tower's layer table as built (width-scaled, last pooling removed for
      multires), ``towers``: ``{"frames": Tower}`` or ``{"fovea": ..., "context": ...}``.
    - ``drop1``, ``fc1``, ``drop2``, ``fc2``, ``drop3``, ``classifier``.

    Input of ``forward``/``features``: float clips ``(N, 3, T, S, S)`` normalised as
    :func:`vidconv.ops.crop_normalize` does; for multires models either the 178x178 clip (split
    here) or the ``(fovea, context)`` pair of :func:`vidconv.ops.fovea_context`, and for a
    single-stream multires model also that stream's ``(N, 3, T, 89, 89)`` tensor alone.
    """

    def __init__(
        self,
        arch: Architecture,
        num_classes: int = 487,
        *,
        multires: bool = False,
        stream: str = "both",
        width: float = 1.0,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        num_classes = expect_int("num_classes", num_classes, minimum=1)
        multires = expect_bool("multires", multires)
        if not isinstance(stream, str) or stream not in STREAMS:
            raise ValueError(f"stream must be one of {', '.join(STREAMS)}, got {stream!r}")
        if stream != "both" and not multires:
            raise ValueError(
                f"stream={stream!r} needs multires=True (fovea and context are the two streams "
                "of the multiresolution models)"
            )
        width = expect_real("width", width)
        if not 0.0 < width <= MAX_WIDTH:
            raise ValueError(f"width must be in (0, {MAX_WIDTH:g}] (1.0 = the paper's network), "
                             f"got {width!r}")
        dropout = _check_dropout("dropout", dropout)

        self.name = arch.name
        self.arch = arch
        self.multires = bool(multires)
        self.stream = stream
        self.width = float(width)
        layers = scale_width(arch.layers, width)
        if multires:
            layers = without_last_pool(layers)
        self.layers: tuple[ConvLayer, ...] = layers
        self.spec = ClipSpec(
            frame_offsets=arch.frame_offsets,
            size=MULTIRES_STREAM_SIZE if multires else FULL_RES_SIZE,
            multires=self.multires,
            stream=stream,
            frame_size=MULTIRES_FRAME_SIZE if multires else FULL_RES_FRAME_SIZE,
        )
        if not multires:
            stream_names: tuple[str, ...] = ("frames",)
        elif stream == "both":
            stream_names = ("fovea", "context")
        else:
            stream_names = (stream,)
        self.towers = nn.ModuleDict({s: Tower(layers, IN_CHANNELS) for s in stream_names})

        t, h, w = self.feature_size()
        tower_features = layers[-1].channels * t * h * w
        fc1_units, fc2_units = (scaled(n, width) for n in arch.fc_units)
        self.drop1 = nn.Dropout(dropout)
        self.fc1 = Linear(len(stream_names) * tower_features, fc1_units)
        self.drop2 = nn.Dropout(dropout)
        self.fc2 = Linear(fc1_units, fc2_units)
        self.drop3 = nn.Dropout(dropout)
        self.classifier = Linear(fc2_units, num_classes)
        self._init_weights()

    # ----------------------------------------------------------------------------- description

    @property
    def num_classes(self) -> int:
        return self.classifier.out_features

    @property
    def variant(self) -> str:
        """The row name of the paper's Table 1, e.g. 'single_frame+multires', '... fovea only'."""
        if not self.multires:
            return self.name
        if self.stream == "both":
            return f"{self.name}+multires"
        return f"{self.name} {self.stream} only"

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, multires={self.multires}, stream={self.stream!r}, "
                f"width={self.width}, frames={self.spec.frames}, size={self.spec.size}")

    def feature_size(self) -> tuple[int, int, int]:
        """(T, H, W) of each tower's output: (1, 7, 7) for all but late fusion's (2, 7, 7)."""
        return stage_sizes(self.layers, self.spec.frames, self.spec.size)[-1]

    def expected_input(self) -> str:
        """What forward accepts, in words (used in error messages)."""
        t, s = self.spec.frames, self.spec.size
        stream = f"(N, 3, {t}, {s}, {s})"
        if not self.multires:
            return f"clips {stream} ({t} frame(s) of {s}x{s}, 3 channels)"
        full = f"(N, 3, {t}, {2 * s}, {2 * s})"
        if self.stream == "both":
            return (f"a clip {full} ({t} frame(s) of {2 * s}x{2 * s}) or the (fovea, context) "
                    f"pair, each {stream}")
        return (f"a clip {full}, the (fovea, context) pair, or the {self.stream} stream alone, "
                f"each stream {stream}")

    def complexity(self) -> dict[str, int]:
        """Parameters and multiply-adds per clip (convolutions and FC layers; LRN, pooling,
        biases and ReLUs not counted). The MACs come from the layer table's arithmetic."""
        frames, size = self.spec.frames, self.spec.size
        macs = len(self.towers) * conv_macs(self.layers, frames, size, IN_CHANNELS)
        for fc in (self.fc1, self.fc2, self.classifier):
            macs += fc.in_features * fc.out_features
        params = sum(p.numel() for p in self.parameters())
        return {"params": params, "macs": macs}

    # ------------------------------------------------------------------------------- training

    def layer_groups(self) -> list[tuple[str, nn.Module]]:
        """("conv1", ...) ... ("conv5", ...), ("fc1", ...), ("fc2", ...), ("classifier", ...),
        input to output, for fine-tuning the top k groups. A conv group of a two-stream model
        holds that stage of both streams."""
        groups: list[tuple[str, nn.Module]] = []
        for layer in self.layers:
            stages = [tower.get_submodule(layer.name) for tower in self.towers.values()]
            groups.append((layer.name, stages[0] if len(stages) == 1 else nn.ModuleList(stages)))
        groups += [("fc1", self.fc1), ("fc2", self.fc2), ("classifier", self.classifier)]
        return groups

    def reset_classifier(self, num_classes: int) -> None:
        """A new, freshly initialised classifier for `num_classes` classes (transfer learning)."""
        num_classes = expect_int("num_classes", num_classes, minimum=1)
        old = self.classifier.weight
        self.classifier = Linear(self.fc2.out_features, num_classes, device=old.device,
                                    dtype=old.dtype)
        _init_classifier(self.classifier)

    def set_dropout(self, p: float) -> None:
        """Drop probability of drop1, drop2 and drop3 (keeping 10% of units is ``p=0.9``)."""
        p = _check_dropout("p", p)
        for drop in (self.drop1, self.drop2, self.drop3):
            drop.p = p

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv3d | nn.Linear):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        _init_classifier(self.classifier)

    # -------------------------------------------------------------------------------- forward

    def _streams(self, x: _Input) -> dict[str, torch.Tensor]:
        """The input of each tower, after checking `x` against what the model expects."""
        names = list(self.towers)
        if isinstance(x, tuple | list):
            if not self.multires:
                raise ValueError(f"{self.variant} expects {self.expected_input()}; got a "
                                 f"{type(x).__name__} of {len(x)} items")
            if len(x) != 2:
                raise ValueError(f"{self.variant} expects {self.expected_input()}; got a "
                                 f"{type(x).__name__} of {len(x)} items")
            fovea, context = x
            self._check_stream("fovea", fovea)
            self._check_stream("context", context)
            pair = {"fovea": fovea, "context": context}
            return {name: pair[name] for name in names}
        self._check_clip(x)
        if not self.multires:
            return {"frames": x}
        if x.shape[-1] == self.spec.size and self.stream != "both":
            return {self.stream: x}
        fovea, context = split_fovea_context(x, self.spec.size)
        pair = {"fovea": fovea, "context": context}
        return {name: pair[name] for name in names}

    def _check_clip(self, x: object) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{self.variant} expects {self.expected_input()}; got "
                            f"{type(x).__name__}")
        if not (x.is_floating_point()):
            raise TypeError(
                f"{self.variant} expects normalised floating-point clips, got dtype {x.dtype}; "
                "make them with vidconv.ops.crop_normalize / fovea_context"
            )
        s = self.spec.size
        sizes = [s] if not self.multires else [2 * s] + ([s] if self.stream != "both" else [])
        if (x.dim() != 5 or x.shape[1] != IN_CHANNELS or x.shape[2] != self.spec.frames
                or x.shape[3] != x.shape[4] or x.shape[3] not in sizes):
            raise ValueError(f"{self.variant} expects {self.expected_input()}; got shape "
                             f"{tuple(x.shape)}")

    def _check_stream(self, which: str, x: object) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{which} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{which} must be a floating-point tensor, got dtype {x.dtype}")
        t, s = self.spec.frames, self.spec.size
        if x.dim() != 5 or tuple(x.shape[1:]) != (IN_CHANNELS, t, s, s):
            raise ValueError(f"{self.variant} expects {self.expected_input()}; got {which} "
                             f"shape {tuple(x.shape)}")

    def tower_features(self, x: _Input) -> torch.Tensor:
        """The concatenated tower outputs fed to fc1, ``(N, fc1.in_features)``.

        Each tower's ``(N, C, T, 7, 7)`` output is flattened frame by frame (T outermost), so
        late fusion's fc1 sees frame 0's features followed by frame 15's, and a multires model's
        the fovea's followed by the context's.
        """
        streams = self._streams(x)
        names = list(self.towers)
        if names == ["fovea", "context"]:
            # Both streams stage by stage: each stage's two convolutions are one grouped
            # launch where that is measured faster (vidconv.ops.st_conv3d_pair).
            outs = twin_towers(self.towers["fovea"], self.towers["context"], streams["fovea"],
                               streams["context"])
        else:
            outs = tuple(self.towers[name](streams[name]) for name in names)
        flat = [out.transpose(1, 2).flatten(1) for out in outs]
        return flat[0] if len(flat) == 1 else torch.cat(flat, dim=1)

    def features(self, x: _Input) -> torch.Tensor:
        """fc2's output after ReLU, ``(N, fc2.out_features)``: the clip descriptor for transfer."""
        h = self.tower_features(x)
        h = F.relu(self.fc1(self.drop1(h)))
        return F.relu(self.fc2(self.drop2(h)))

    def forward(self, x: _Input) -> torch.Tensor:
        """Class scores (logits) ``(N, num_classes)``."""
        return self.classifier(self.drop3(self.features(x)))


def _check_dropout(name: str, p: object) -> float:
    """`p` as a float drop probability; TypeError for non-numbers, ValueError outside [0, 1)."""
    value = expect_real(name, p)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a drop probability in [0, 1), got {p!r}")
    return value


def _init_classifier(layer: nn.Linear) -> None:
    nn.init.normal_(layer.weight, std=0.01)
    nn.init.zeros_(layer.bias)
