"""The convolutional tower every network of the paper is built from, and its size arithmetic.

A tower is the paper's C-N-P sequence written as 3D convolutions over clips ``(N, C, T, H, W)``:
every layer is a :class:`ConvLayer` row (filters, kernel ``(t, h, w)``, stride, padding, whether
LRN and max pooling follow). A 2D layer of the paper is a 3D one with temporal extent 1, which
applies the same filters to every frame: this is how late fusion's two towers share weights and
how slow fusion shares weights along time. Each conv is a
:class:`vidconv.nn.SpatioTemporalConv` with the ReLU fused, so on CUDA the fused kernel runs.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from vidconv._extension import build_info
from vidconv.nn import SpatioTemporalConv
from vidconv.nn.conv import conv_pair, has_hooks
from vidconv.ops import lrn_max_pool, lrn_pool

# Local response normalisation across channels (the paper's "N"): size n=5, alpha=1e-4,
# beta=0.5, k=2 (paper.md; beta is 0.5, not AlexNet's 0.75). We follow torch's
# nn.LocalResponseNorm, which like Caffe and cuda-convnet divides alpha by n:
# b = a / (k + alpha/n * sum a^2)^beta, the sum over the n channels centred on a's.
LRN_SIZE = 5
LRN_ALPHA = 1e-4
LRN_BETA = 0.5
LRN_K = 2.0

# Max pooling (the paper's "P") over non-overlapping 2x2 regions, frame by frame. ceil_mode:
# a border row/column left over (27 -> 14) gets its own window, which is what makes the paper's
# sizes come out (170 -> 54 -> 27 -> 27 -> 14 -> 14 -> 7).
POOL_KERNEL = (1, 2, 2)
POOL_CEIL_MODE = True

Triple = tuple[int, int, int]


@dataclass(frozen=True)
class ConvLayer:
    """One row of the layer table: ``C(channels, kernel, stride)`` then optional ``N`` and ``P``.

    kernel, stride, padding are ``(t, h, w)``; padding is zero padding on both sides.
    """

    name: str
    channels: int
    kernel: Triple
    stride: Triple = (1, 1, 1)
    padding: Triple = (0, 0, 0)
    norm: bool = False
    pool: bool = False

    def conv_output(self, size: Triple) -> Triple:
        """(T, H, W) after the convolution, for an input of (T, H, W)."""
        return tuple(  # type: ignore[return-value]
            (n + 2 * p - k) // s + 1
            for n, k, s, p in zip(size, self.kernel, self.stride, self.padding, strict=True)
        )

    def output(self, size: Triple) -> Triple:
        """(T, H, W) after the whole stage (conv, then pooling if any)."""
        t, h, w = self.conv_output(size)
        if self.pool:
            h, w = pooled(h), pooled(w)
        return t, h, w


def pooled(n: int) -> int:
    """Side after one 2x2 stride-2 max pooling with ceil mode."""
    return -(-(n - POOL_KERNEL[1]) // POOL_KERNEL[1]) + 1


def stage_sizes(layers: Sequence[ConvLayer], frames: int, size: int) -> list[Triple]:
    """(T, H, W) after each stage of a tower, for clips of `frames` frames of size x size."""
    sizes = []
    current: Triple = (frames, size, size)
    for layer in layers:
        current = layer.output(current)
        sizes.append(current)
    return sizes


def conv_macs(layers: Sequence[ConvLayer], frames: int, size: int, in_channels: int = 3) -> int:
    """Multiply-adds of a tower's convolutions for one clip (bias adds, LRN, pooling left out)."""
    total = 0
    current: Triple = (frames, size, size)
    channels = in_channels
    for layer in layers:
        t, h, w = layer.conv_output(current)
        kt, kh, kw = layer.kernel
        total += t * h * w * layer.channels * channels * kt * kh * kw
        current = layer.output(current)
        channels = layer.channels
    return total


def conv_params(layers: Sequence[ConvLayer], in_channels: int = 3) -> int:
    """Weights plus biases of a tower's convolutions."""
    total = 0
    channels = in_channels
    for layer in layers:
        kt, kh, kw = layer.kernel
        total += layer.channels * (channels * kt * kh * kw + 1)
        channels = layer.channels
    return total


def scaled(n: int, width: float) -> int:
    """A channel or unit count scaled by `width` (at least 1)."""
    return max(1, round(n * width))


def scale_width(layers: Sequence[ConvLayer], width: float) -> tuple[ConvLayer, ...]:
    return tuple(replace(layer, channels=scaled(layer.channels, width)) for layer in layers)


def without_last_pool(layers: Sequence[ConvLayer]) -> tuple[ConvLayer, ...]:
    """The layers with the last pooling removed (the multiresolution streams)."""
    layers = list(layers)
    for i in range(len(layers) - 1, -1, -1):
        if layers[i].pool:
            layers[i] = replace(layers[i], pool=False)
            break
    return tuple(layers)


class LocalResponseNorm(nn.LocalResponseNorm):
    """``nn.LocalResponseNorm`` with the same results, computed in fewer passes over memory.

    torch's version pads, average-pools and runs four elementwise ops on the activations; here
    the sum over neighbouring channels is one 1x1x1 convolution with a banded C x C matrix
    (alpha/n folded into the matrix, k into the bias), followed by rsqrt (beta = 0.5) or pow.
    On 2 CPU cores this made the LRN layers 2-4x faster; on a GPU it is one GEMM.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            return super().forward(x)
        c = x.shape[1]
        idx = torch.arange(c, device=x.device)
        offset = idx[None, :] - idx[:, None]  # input channel minus output channel
        # torch pads size//2 channels before and (size-1)//2 after: the same window here.
        band = (offset >= -(self.size // 2)) & (offset <= (self.size - 1) // 2)
        weight = (band.to(x.dtype) * (self.alpha / self.size)).view(c, c, 1, 1, 1)
        bias = torch.full((c,), self.k, dtype=x.dtype, device=x.device)
        denom = F.conv3d(x * x, weight, bias)
        if self.beta == 0.5:
            return x * denom.rsqrt()
        return x * denom.pow(-self.beta)


class Stage(nn.Sequential):
    """One C-N-P stage: ``conv`` (+ReLU), then ``norm`` and ``pool`` where the layer has them.

    A stage with both runs them as the fused :func:`vidconv.ops.lrn_max_pool` (the normalised
    activations are never written) where that gives the same numbers and is measured faster
    for the shape (:func:`vidconv.ops.lrn_pool.prefer_fused`; on a 2-core CPU the two ATen ops
    win at some shapes). The children and their names stay those of the two modules, so
    state_dicts and hooks address ``conv1.norm`` / ``conv1.pool`` as before; a stage whose norm
    or pool carries a hook (forward or backward, or a global module hook) runs them one by one,
    so the hook sees their inputs, outputs and gradients, and so does a stage traced by
    ``torch.compile``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.after_conv(self.conv(x))

    def after_conv(self, x: torch.Tensor) -> torch.Tensor:
        """The stage's norm and pool (fused where measured faster) on ``conv``'s output."""
        # Under torch.compile the two modules are traced as they are (the compiler fuses them
        # itself, and nothing can be timed while tracing).
        fused = None if torch.compiler.is_compiling() else self._fusable(x)
        if fused is None:
            for name, module in self._modules.items():
                if name != "conv":
                    x = module(x)  # type: ignore[misc]
            return x
        norm, pool = self.norm, self.pool
        if lrn_pool.prefer_fused(x, norm.size, norm.alpha, norm.beta, norm.k, fused,
                                 pool.ceil_mode, lambda t: pool(norm(t))):
            return lrn_max_pool(x, norm.size, norm.alpha, norm.beta, norm.k, fused,
                                pool.ceil_mode)
        return pool(norm(x))

    def _fusable(self, x: torch.Tensor) -> list[int] | None:
        """The pool window (kh, kw) when norm + pool can be the fused op for x, else None."""
        norm, pool = self._modules.get("norm"), self._modules.get("pool")
        if not (isinstance(norm, nn.LocalResponseNorm) and isinstance(pool, nn.MaxPool3d)
                and x.dim() == 5 and list(self._modules) == ["conv", "norm", "pool"]):
            return None
        if not (x.device.type == "cpu"
                or (x.device.type == "cuda" and build_info().has_cuda_kernels)):
            return None
        if has_hooks(norm) or has_hooks(pool):  # forward or backward, theirs or global ones
            return None
        kernel, stride = _triple_of(pool.kernel_size), _triple_of(pool.stride or pool.kernel_size)
        if (kernel[0] != 1 or stride != kernel or _triple_of(pool.padding) != (0, 0, 0)
                or _triple_of(pool.dilation) != (1, 1, 1) or pool.return_indices):
            return None
        return [kernel[1], kernel[2]]


def _triple_of(value) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, tuple | list) else (value, value, value)


def _stage(layer: ConvLayer, in_channels: int) -> Stage:
    parts: OrderedDict[str, nn.Module] = OrderedDict()
    parts["conv"] = SpatioTemporalConv(in_channels, layer.channels, layer.kernel, layer.stride,
                                       layer.padding, relu=True)
    if layer.norm:
        parts["norm"] = LocalResponseNorm(LRN_SIZE, alpha=LRN_ALPHA, beta=LRN_BETA, k=LRN_K)
    if layer.pool:
        parts["pool"] = nn.MaxPool3d(POOL_KERNEL, POOL_KERNEL, ceil_mode=POOL_CEIL_MODE)
    return Stage(parts)


class Tower(nn.Module):
    """The stages of a layer table in order; each stage is ``conv`` (+ReLU) [``norm``] [``pool``]
    (a :class:`Stage`, fusing ``norm`` + ``pool`` where that is measured faster).

    Children are named after the layers (``conv1`` ... ``conv5``), so parameters read as
    ``conv1.conv.weight`` and fine-tuning can address a stage by name.
    """

    def __init__(self, layers: Sequence[ConvLayer], in_channels: int = 3) -> None:
        super().__init__()
        self.layer_names = tuple(layer.name for layer in layers)
        channels = in_channels
        for layer in layers:
            self.add_module(layer.name, _stage(layer, channels))
            channels = layer.channels
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.layer_names:
            x = self._modules[name](x)  # type: ignore[misc]
        return x


def twin_towers(tower0: Tower, tower1: Tower, x0: torch.Tensor,
                x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tower0(x0), tower1(x1))`` for two towers of one layer table (the multires fovea and
    context streams), stage by stage in step, so that each stage's two convolutions are one
    :func:`~vidconv.nn.conv.conv_pair` (a grouped launch where measured faster). Stages with
    hooks, or towers that differ, run as the modules they are."""
    # Exactly Tower and Stage (not compiled, wrapped or subclassed): their forward is known.
    if not (type(tower0) is Tower and type(tower1) is Tower) \
            or tower0.layer_names != tower1.layer_names or has_hooks(tower0) \
            or has_hooks(tower1):
        return tower0(x0), tower1(x1)
    for name in tower0.layer_names:
        stage0, stage1 = tower0._modules[name], tower1._modules[name]
        if not (type(stage0) is Stage and type(stage1) is Stage) or has_hooks(stage0) \
                or has_hooks(stage1):
            x0, x1 = stage0(x0), stage1(x1)  # type: ignore[misc]
            continue
        y0, y1 = conv_pair(stage0.conv, stage1.conv, x0, x1)
        x0, x1 = stage0.after_conv(y0), stage1.after_conv(y1)
    return x0, x1
