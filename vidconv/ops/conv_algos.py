"""The algorithms st_conv3d can run: exact ways of computing conv3d + bias + ReLU and its grads.

Each :class:`Algorithm` computes the same thing as ATen's ``conv3d`` (the reference, ``"aten"``)
by another route, and :mod:`vidconv.ops.conv_planner` times the ones that apply to a layer and keeps
the fastest that agrees with the reference:

- ``conv3d_ncdhw``, ``conv3d_cl``: ATen's 3D convolution (cuDNN / oneDNN) with x, weight and the
  gradients first laid out in NCDHW or ``channels_last_3d``. Each is left out where it would be
  the reference again (x and weight already in that layout).

On the CPU, the candidates that would turn a ``channels_last_3d`` x into NC(D)HW
(``conv3d_ncdhw``, ``*_nchw``) are not offered: oneDNN computes in channels-last (or blocked)
layouts anyway, so they add two layout copies to its work and lost every layer in measurement,
and leaving them out halves a model's tuning time on the CPU. From a contiguous x, converting to
channels-last can pay off, so those candidates stay.
- ``conv2d_frames_nchw``, ``conv2d_frames_cl``: temporal extent 1 and no temporal padding (the
  single-frame tower, late fusion, conv4/conv5 of every model): the frames the convolution reads
  (every ``st``-th) are folded into the batch and one 2D convolution runs over them. From a
  ``channels_last_3d`` x this fold is a view, no copy.
- ``conv2d_stacked_nchw``, ``conv2d_stacked_cl``: temporal extent kt > 1 equal to the temporal
  stride, or one output frame (kt = T: early fusion's conv1), no temporal padding: the output
  frames read disjoint groups of kt frames, so each group is stacked along channels
  (``C * kt``) and the weight ``(K, C, kt, kh, kw)`` read as ``(K, C * kt, kh, kw)``.
- ``fused_<tile>`` (CUDA, float32/float16/bfloat16, forward): the hand-written implicit-GEMM
  kernel, ``torch.ops.vidconv.st_conv3d_fused``, one candidate per compiled block tile.
- ``fused_sm90_<tile>`` (CUDA, float16/bfloat16, forward): the Hopper wgmma kernel,
  ``torch.ops.vidconv.st_conv3d_fused_sm90``, offered only on a compute capability 9.0 device
  with an extension built for ``9.0a`` and within the kernel's shape limits.

All are exact reformulations: they differ from the reference only in summation order. Forward
functions return the op's documented output layout (``out_format``), gradient functions the
layout of the tensor they are the gradient of, so whichever runs, the op's strides are those its
fake kernel reports. Layout conversions are part of each algorithm's measured cost.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

REFERENCE = "aten"
DIRECTIONS = ("forward", "input_grad", "weight_grad")


@dataclass(frozen=True)
class Problem:
    """One st_conv3d call's sizes: what decides which algorithms apply."""

    device_type: str
    dtype: torch.dtype
    x_format: str  # "contiguous", "channels_last_3d" or "strided"
    w_format: str
    n: int
    c: int
    t: int
    h: int
    w: int
    k: int
    kernel: tuple[int, int, int]
    stride: tuple[int, int, int]
    padding: tuple[int, int, int]

    @property
    def t_out(self) -> int:
        return (self.t + 2 * self.padding[0] - self.kernel[0]) // self.stride[0] + 1


def memory_format_name(t: torch.Tensor) -> str:
    """How a 5-D tensor is laid out; a tensor that is both (a size-1 dim) counts as contiguous."""
    if t.is_contiguous():
        return "contiguous"
    if t.is_contiguous(memory_format=torch.channels_last_3d):
        return "channels_last_3d"
    return "strided"


@dataclass(frozen=True)
class Algorithm:
    """One way of computing st_conv3d, its input gradient and/or its weight gradient.

    forward(x, weight, bias, stride, padding, relu, out_format) -> out
    input_grad(grad, x, weight, stride, padding) -> grad_x (laid out like x)
    weight_grad(grad, x, weight, stride, padding) -> grad_weight (laid out like weight)
    ``grad`` is the gradient of the convolution's output (the ReLU mask already applied).
    """

    name: str
    applies: Callable[[Problem], bool]
    forward: Callable | None = None
    input_grad: Callable | None = None
    weight_grad: Callable | None = None

    def runs(self, direction: str) -> Callable | None:
        return {"forward": self.forward, "input_grad": self.input_grad,
                "weight_grad": self.weight_grad}[direction]


# ---- layout helpers -------------------------------------------------------------------------

_CL3 = torch.channels_last_3d
_CL2 = torch.channels_last


def _finish(out: torch.Tensor, relu: bool, out_format: torch.memory_format) -> torch.Tensor:
    out = out.contiguous(memory_format=out_format)
    return out.relu_() if relu else out


def laid_out_like(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`grad` with the strides `torch.empty_like(like)` has (what the fake kernel reports)."""
    if grad.stride() == like.stride():
        return grad
    out = torch.empty_like(like)
    out.copy_(grad)
    return out


def _conv_backward(grad, x, weight, stride, padding, mask):
    dims = x.dim() - 2
    return torch.ops.aten.convolution_backward(
        grad, x, weight, None, list(stride), list(padding), [1] * dims, False, [0] * dims, 1,
        mask)


# ---- the reference and the 3D layouts ---------------------------------------------------------


def _aten_forward(x, weight, bias, stride, padding, relu, out_format):
    return _finish(F.conv3d(x, weight, bias, stride, padding), relu, out_format)


def _aten_input_grad(grad, x, weight, stride, padding):
    return laid_out_like(_conv_backward(grad, x, weight, stride, padding,
                                        [True, False, False])[0], x)


def _aten_weight_grad(grad, x, weight, stride, padding):
    return laid_out_like(_conv_backward(grad, x, weight, stride, padding,
                                        [False, True, False])[1], weight)


def _conv3d_in(fmt: torch.memory_format) -> Algorithm:
    tag = "cl" if fmt == _CL3 else "ncdhw"
    name = "channels_last_3d" if fmt == _CL3 else "contiguous"

    def forward(x, weight, bias, stride, padding, relu, out_format):
        return _aten_forward(x.contiguous(memory_format=fmt), weight.contiguous(memory_format=fmt),
                             bias, stride, padding, relu, out_format)

    def input_grad(grad, x, weight, stride, padding):
        gx = _conv_backward(grad.contiguous(memory_format=fmt), x.contiguous(memory_format=fmt),
                            weight.contiguous(memory_format=fmt), stride, padding,
                            [True, False, False])[0]
        return laid_out_like(gx, x)

    def weight_grad(grad, x, weight, stride, padding):
        gw = _conv_backward(grad.contiguous(memory_format=fmt), x.contiguous(memory_format=fmt),
                            weight.contiguous(memory_format=fmt), stride, padding,
                            [False, True, False])[1]
        return laid_out_like(gw, weight)

    def applies(p: Problem) -> bool:
        # Already in this layout, the reference runs exactly this.
        return not (p.x_format == name and p.w_format == name) and (
            fmt == _CL3 or not _cpu_channels_last(p))

    return Algorithm(f"conv3d_{tag}", applies, forward, input_grad, weight_grad)


# ---- temporal extent 1: frames folded into the batch ------------------------------------------


def _cpu_channels_last(p: Problem) -> bool:
    return p.device_type == "cpu" and p.x_format == "channels_last_3d"


def _frames_apply(p: Problem) -> bool:
    return p.kernel[0] == 1 and p.padding[0] == 0


def _fold_frames(t5: torch.Tensor, step: int, fmt: torch.memory_format) -> torch.Tensor:
    """(N, C, T, H, W) -> (N * T', C, H, W) of frames 0, step, 2 step, ..."""
    sel = t5[:, :, ::step] if step > 1 else t5
    n, c, t, h, w = sel.shape
    return sel.transpose(1, 2).reshape(n * t, c, h, w).contiguous(memory_format=fmt)


def _unfold_frames(t4: torch.Tensor, n: int) -> torch.Tensor:
    """(N * T', C, H, W) -> (N, C, T', H, W) (a view)."""
    nt, c, h, w = t4.shape
    return t4.reshape(n, nt // n, c, h, w).transpose(1, 2)


def _frames_in(fmt: torch.memory_format) -> Algorithm:
    tag = "cl" if fmt == _CL2 else "nchw"

    def forward(x, weight, bias, stride, padding, relu, out_format):
        x2 = _fold_frames(x, stride[0], fmt)
        w2 = weight[:, :, 0].contiguous(memory_format=fmt)
        y2 = F.conv2d(x2, w2, bias, stride[1:], padding[1:])
        return _finish(_unfold_frames(y2, x.shape[0]), relu, out_format)

    def input_grad(grad, x, weight, stride, padding):
        x2 = _fold_frames(x, stride[0], fmt)
        w2 = weight[:, :, 0].contiguous(memory_format=fmt)
        g2 = _fold_frames(grad, 1, fmt)
        gx2 = _conv_backward(g2, x2, w2, stride[1:], padding[1:], [True, False, False])[0]
        gsel = _unfold_frames(gx2, x.shape[0])
        if stride[0] == 1:
            return laid_out_like(gsel, x)
        gx = torch.zeros_like(x)
        gx[:, :, ::stride[0]] = gsel
        return gx

    def weight_grad(grad, x, weight, stride, padding):
        x2 = _fold_frames(x, stride[0], fmt)
        w2 = weight[:, :, 0].contiguous(memory_format=fmt)
        g2 = _fold_frames(grad, 1, fmt)
        gw2 = _conv_backward(g2, x2, w2, stride[1:], padding[1:], [False, True, False])[1]
        return laid_out_like(gw2.unsqueeze(2), weight)

    def applies(p: Problem) -> bool:
        return _frames_apply(p) and (fmt == _CL2 or not _cpu_channels_last(p))

    return Algorithm(f"conv2d_frames_{tag}", applies, forward, input_grad, weight_grad)


# ---- disjoint groups of kt frames stacked along channels --------------------------------------


def _stacked_apply(p: Problem) -> bool:
    kt, st = p.kernel[0], p.stride[0]
    return kt > 1 and p.padding[0] == 0 and (kt == st or p.t_out == 1)


def _stack(x: torch.Tensor, kt: int, t_out: int, fmt: torch.memory_format) -> torch.Tensor:
    """(N, C, T, H, W) -> (N * T', C * kt, H, W): output frame i reads frames i*kt .. i*kt+kt-1."""
    n, c, _, h, w = x.shape
    return (x[:, :, :t_out * kt].reshape(n, c, t_out, kt, h, w).transpose(1, 2)
            .reshape(n * t_out, c * kt, h, w).contiguous(memory_format=fmt))


def _stacked_weight(weight: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    k, c, kt, kh, kw = weight.shape
    # (C, kt) flattened in the same order as _stack's channels.
    return weight.reshape(k, c * kt, kh, kw).contiguous(memory_format=fmt)


def _t_out(x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int]) -> int:
    return (x.shape[2] - weight.shape[2]) // stride[0] + 1


def _stacked_in(fmt: torch.memory_format) -> Algorithm:
    tag = "cl" if fmt == _CL2 else "nchw"

    def forward(x, weight, bias, stride, padding, relu, out_format):
        t_out = _t_out(x, weight, stride)
        x2 = _stack(x, weight.shape[2], t_out, fmt)
        y2 = F.conv2d(x2, _stacked_weight(weight, fmt), bias, stride[1:], padding[1:])
        return _finish(_unfold_frames(y2, x.shape[0]), relu, out_format)

    def input_grad(grad, x, weight, stride, padding):
        n, c, t, h, w = x.shape
        kt, t_out = weight.shape[2], _t_out(x, weight, stride)
        x2 = _stack(x, kt, t_out, fmt)
        g2 = _fold_frames(grad, 1, fmt)
        gx2 = _conv_backward(g2, x2, _stacked_weight(weight, fmt), stride[1:], padding[1:],
                             [True, False, False])[0]
        used = gx2.reshape(n, t_out, c, kt, h, w).transpose(1, 2).reshape(n, c, t_out * kt, h, w)
        if t_out * kt == t:
            return laid_out_like(used, x)
        gx = torch.zeros_like(x)
        gx[:, :, :t_out * kt] = used
        return gx

    def weight_grad(grad, x, weight, stride, padding):
        kt, t_out = weight.shape[2], _t_out(x, weight, stride)
        x2 = _stack(x, kt, t_out, fmt)
        g2 = _fold_frames(grad, 1, fmt)
        gw2 = _conv_backward(g2, x2, _stacked_weight(weight, fmt), stride[1:], padding[1:],
                             [False, True, False])[1]
        return laid_out_like(gw2.reshape(weight.shape), weight)

    def applies(p: Problem) -> bool:
        return _stacked_apply(p) and (fmt == _CL2 or not _cpu_channels_last(p))

    return Algorithm(f"conv2d_stacked_{tag}", applies, forward, input_grad, weight_grad)


# ---- the hand-written CUDA kernel -------------------------------------------------------------

_FUSED_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def fused_tile_configs() -> dict[str, list[str]]:
    """dtype name -> the fused kernel's tile names (index = tile_config); {} without CUDA."""
    from vidconv._extension import _C

    # An extension built before the fused op had tiles has no list: no fused candidates then.
    configs = getattr(_C, "fused_tile_configs", None)
    return dict(configs()) if configs is not None else {}


def _fused(index: int, tile: str, dtypes: frozenset[torch.dtype]) -> Algorithm:
    def forward(x, weight, bias, stride, padding, relu, out_format):
        out = torch.ops.vidconv.st_conv3d_fused(x, weight, bias, list(stride), list(padding),
                                                relu, index)
        return out.contiguous(memory_format=out_format)

    def applies(p: Problem) -> bool:
        return p.device_type == "cuda" and p.dtype in dtypes

    return Algorithm(f"fused_{tile}", applies, forward)


def _fused_algorithms() -> list[Algorithm]:
    by_tile: dict[tuple[int, str], set[torch.dtype]] = {}
    for dtype, name in _FUSED_DTYPES.items():
        for index, tile in enumerate(fused_tile_configs().get(name, [])):
            by_tile.setdefault((index, tile), set()).add(dtype)
    return [_fused(index, tile, frozenset(dtypes)) for (index, tile), dtypes in by_tile.items()]


_SM90_DTYPES = frozenset({torch.float16, torch.bfloat16})
# The Hopper kernel's limits (csrc/cuda/st_conv3d_sm90_kernel.cu, sm90_check_shape): kernel
# extents below 256, at most this many 8-channel vectors in the reduction (its tap table).
_SM90_MAX_EXTENT = 255
_SM90_MAX_VECTORS = 12536


def fused_sm90_tile() -> str | None:
    """The Hopper kernel's block tile name, or None without CUDA kernels."""
    from vidconv._extension import _C

    # An extension built before the Hopper kernel has no such query: no candidate then.
    tile = getattr(_C, "fused_sm90_tile", None)
    return tile() if tile is not None else None


def _built_for_sm90a() -> bool:
    from vidconv._extension import build_info

    archs = {a.strip().removesuffix("+PTX").lower() for a in " ".join(build_info().archs)
             .replace(";", " ").replace(",", " ").split()}
    return bool(archs & {"9.0a", "90a", "sm_90a"})


def _sm90_applies(p: Problem) -> bool:
    if p.device_type != "cuda" or p.dtype not in _SM90_DTYPES:
        return False
    if max(p.kernel) > _SM90_MAX_EXTENT:
        return False
    if p.kernel[0] * p.kernel[1] * p.kernel[2] * -(-p.c // 8) > _SM90_MAX_VECTORS:
        return False
    # The sm_90a binary runs on compute capability 9.0 exactly (H100/H200), not on 8.x or 10.x.
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


# ``fused_sm90_<tile>_split<S>``: the same kernel with split-K (each tile's reduction cut into S
# slices, summed in slice order by the last to finish), offered where the unsplit tiles are fewer
# than the SMs. The factors, and the fewest 64-wide reduction tiles one slice keeps (the kernel's
# pipeline depth: fewer never fill its 4 stages).
_SM90_SPLITS = (2, 4, 8)
_SM90_MIN_SLICE_TILES = 4
_SM90_TILE = 128  # positions and filters per block tile


def _sm90_tiles(p: Problem) -> tuple[int, int]:
    """(block tiles, 64-wide reduction tiles) of the Hopper kernel's GEMM for `p`."""
    h_out = (p.h + 2 * p.padding[1] - p.kernel[1]) // p.stride[1] + 1
    w_out = (p.w + 2 * p.padding[2] - p.kernel[2]) // p.stride[2] + 1
    m = p.n * p.t_out * h_out * w_out
    tiles = -(-m // _SM90_TILE) * -(-p.k // _SM90_TILE)
    vectors = p.kernel[0] * p.kernel[1] * p.kernel[2] * -(-p.c // 8)
    return tiles, -(-vectors // 8)


def _sm_count() -> int:
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def _sm90_split_applies(split: int) -> Callable[[Problem], bool]:
    def applies(p: Problem) -> bool:
        if not _sm90_applies(p):
            return False
        tiles, k_tiles = _sm90_tiles(p)
        # Only where the unsplit tiles leave SMs idle, and every slice keeps a full pipeline.
        return tiles < _sm_count() and k_tiles >= split * _SM90_MIN_SLICE_TILES

    return applies


def _fused_sm90_algorithms() -> list[Algorithm]:
    tile = fused_sm90_tile()
    if tile is None or not _built_for_sm90a():
        return []

    def forward_split(split: int) -> Callable:
        def forward(x, weight, bias, stride, padding, relu, out_format):
            out = torch.ops.vidconv.st_conv3d_fused_sm90(x, weight, bias, list(stride),
                                                         list(padding), relu, split)
            return out.contiguous(memory_format=out_format)

        return forward

    return [Algorithm(f"fused_sm90_{tile}", _sm90_applies, forward_split(1)),
            *(Algorithm(f"fused_sm90_{tile}_split{s}", _sm90_split_applies(s), forward_split(s))
              for s in _SM90_SPLITS)]


def _always(_: Problem) -> bool:
    return True


def build_algorithms() -> dict[str, Algorithm]:
    """Every algorithm, the reference first, by name."""
    algos = [Algorithm(REFERENCE, _always, _aten_forward, _aten_input_grad, _aten_weight_grad),
             _conv3d_in(torch.contiguous_format), _conv3d_in(_CL3),
             _frames_in(torch.contiguous_format), _frames_in(_CL2),
             _stacked_in(torch.contiguous_format), _stacked_in(_CL2),
             *_fused_algorithms(), *_fused_sm90_algorithms()]
    return {a.name: a for a in algos}


ALGORITHMS: dict[str, Algorithm] = build_algorithms()
