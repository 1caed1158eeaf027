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
- ``s2d_<engine>`` (spatial stride > 1, at most 16 input channels: the paper's conv1): the
  input rearranged space-to-depth in stride-sized blocks (``C * sh * sw`` channels, rounded up
  to 8 on CUDA) and the weight into ``ceil(k / s)`` taps per spatial axis, zero-padded, so the
  layer becomes a stride-1 convolution without spatial padding, run by an engine: ATen 3D
  (``conv3d_ncdhw``, ``conv3d_cl``), the 2D folds (``conv2d_frames_*``, ``conv2d_stacked_*``,
  where they apply to the layer's time axis), and on CUDA every hand-written kernel
  (``s2d_fused_<tile>``, ``s2d_fused_sm90_<tile>``, forward only, within their limits on the
  rearranged problem). The gradients (ATen engines) are the rearranged problem's, mapped back.
- ``dgrad_as_fwd_<engine>`` (input gradient of stride-1 layers with padding below the kernel
  extent: conv2-conv5): the input gradient is the forward convolution of the (ReLU-masked)
  output gradient with the weight flipped along all three axes and transposed (C <-> K),
  padding ``k - 1 - p``; run by ATen 3D in either layout, the frame fold (extent 1), and on
  CUDA every hand-written kernel (``dgrad_as_fwd_fused_<tile>``, ``..._fused_sm90_<tile>``).
- ``wgrad_as_fwd_<engine>`` (weight gradient of stride-1 layers: conv2-conv5): the weight
  gradient is the forward convolution of the input with the batch and channel axes swapped
  (``x^T``: batch C, channels N) by the output gradient read the same way as K filters of the
  output's size, with the layer's padding, transposed back; run by the same engines (on CUDA
  ``wgrad_as_fwd_fused_<tile>``, ``..._fused_sm90_<tile>`` and their split-K variants, whose
  long reduction N x T' x H' x W' over few positions is what split-K is for). On the CPU
  oneDNN ran conv3/conv4-shaped cases 1.0-1.3x faster this way and conv2's 1.5x slower
  (batch 8, one thread): measured per layer like everything else.

All are exact reformulations: they differ from the reference only in summation order. Forward
functions return the op's documented output layout (``out_format``), gradient functions the
layout of the tensor they are the gradient of, so whichever runs, the op's strides are those its
fake kernel reports. Layout conversions are part of each algorithm's measured cost.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

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


# ---- spatial stride s as stride 1: space-to-depth (the paper's conv1) ------------------------
#
# A stride-(sh, sw) convolution reads the zero-padded input xp at rows oh*sh + i. Writing the tap
# i = qi*sh + ri (qi < ceil(kh/sh), ri < sh) makes that row (oh + qi)*sh + ri: block oh + qi,
# phase ri. So with X'[n, (c, ri, rj), t, u, v] = xp[n, c, t, u*sh + ri, v*sw + rj] and
# W'[k, (c, ri, rj), a, qi, qj] = w[k, c, a, qi*sh + ri, qj*sw + rj] (zero where the tap is past
# kh or kw), y = conv(X', W') at spatial stride 1 and no spatial padding; time is untouched
# (stride st, padding pt). Every product of the original sum appears once; the added terms are
# exact zeros for finite x (an inf under a zero tap gives NaN: the reformulation is exact for
# finite inputs only, which conv1's normalised pixels are). C*sh*sw channels are rounded up to
# 8 with zeros on CUDA, where the tensor-core kernels read 8-channel vectors (the fused kernels
# would otherwise pad a copy themselves).

# Space-to-depth only pays where the channel vectors are short: conv1's C = 3 fills 3 of 8 lanes.
S2D_MAX_CHANNELS = 16
_S2D_CHANNEL_MULTIPLE = 8


def _s2d_applies(p: Problem) -> bool:
    return max(p.stride[1:]) > 1 and p.c <= S2D_MAX_CHANNELS


@dataclass(frozen=True)
class _S2DGeometry:
    """Block sizes of one space-to-depth problem (spatial axes only)."""

    block: tuple[int, int]  # (sh, sw)
    taps: tuple[int, int]  # ceil(kh / sh), ceil(kw / sw)
    blocks: tuple[int, int]  # output size + taps - 1, along H and W
    padding: tuple[int, int]  # the original (ph, pw)
    channels: int  # C * sh * sw
    padded_channels: int  # rounded up to 8 on CUDA


def _s2d_geometry(c: int, hw: Sequence[int], khw: Sequence[int], stride: Sequence[int],
                  padding: Sequence[int], device_type: str) -> _S2DGeometry:
    sh, sw = stride[1], stride[2]
    taps = tuple(-(-k // s) for k, s in zip(khw, (sh, sw), strict=True))
    outs = tuple((i + 2 * p - k) // s + 1
                 for i, k, s, p in zip(hw, khw, (sh, sw), padding[1:], strict=True))
    blocks = tuple(o + q - 1 for o, q in zip(outs, taps, strict=True))
    cs = c * sh * sw
    mult = _S2D_CHANNEL_MULTIPLE if device_type == "cuda" else 1
    return _S2DGeometry((sh, sw), taps, blocks, (padding[1], padding[2]), cs,  # type: ignore
                        -(-cs // mult) * mult)


def _geometry_of(x: torch.Tensor, weight: torch.Tensor, stride, padding) -> _S2DGeometry:
    return _s2d_geometry(x.shape[1], x.shape[3:], weight.shape[3:], stride, padding,
                         x.device.type)


def _s2d_problem(p: Problem, fmt_name: str) -> Problem:
    """The stride-1 problem the space-to-depth candidates hand to an engine."""
    g = _s2d_geometry(p.c, (p.h, p.w), p.kernel[1:], p.stride, p.padding, p.device_type)
    return replace(p, x_format=fmt_name, w_format=fmt_name, c=g.padded_channels, h=g.blocks[0],
                   w=g.blocks[1], kernel=(p.kernel[0], *g.taps), stride=(p.stride[0], 1, 1),
                   padding=(p.padding[0], 0, 0))


def _padded_extent(g: _S2DGeometry) -> tuple[int, int]:
    return g.blocks[0] * g.block[0], g.blocks[1] * g.block[1]


def _read_window(x: torch.Tensor, g: _S2DGeometry) -> tuple[int, int]:
    """How many rows and columns of x the whole blocks cover (the rest is never read)."""
    ph, pw = g.padding
    hp, wp = _padded_extent(g)
    return max(0, min(x.shape[3], hp - ph)), max(0, min(x.shape[4], wp - pw))


def space_to_depth(x: torch.Tensor, g: _S2DGeometry, fmt: torch.memory_format) -> torch.Tensor:
    """(N, C, T, H, W) -> (N, Cp, T, Hb, Wb): channel (c, ri, rj) of block (u, v) is padded x's
    pixel (u*sh + ri, v*sw + rj); channels past C*sh*sw are zero. Laid out in `fmt`."""
    n, c, t = x.shape[:3]
    (sh, sw), (hb, wb) = g.block, g.blocks
    hp, wp = _padded_extent(g)
    ph, pw = g.padding
    rows, cols = _read_window(x, g)
    xp = x.new_zeros((n, c, t, hp, wp))
    xp[..., ph:ph + rows, pw:pw + cols] = x[..., :rows, :cols]
    x7 = xp.view(n, c, t, hb, sh, wb, sw)
    cs, cp = g.channels, g.padded_channels
    if fmt == _CL3:
        out = x.new_empty((n, t, hb, wb, cp))
        out[..., :cs].view(n, t, hb, wb, c, sh, sw).copy_(x7.permute(0, 2, 3, 5, 1, 4, 6))
        out[..., cs:].zero_()
        return out.permute(0, 4, 1, 2, 3)
    out = x.new_empty((n, cp, t, hb, wb))
    out[:, :cs].view(n, c, sh, sw, t, hb, wb).copy_(x7.permute(0, 1, 4, 6, 2, 3, 5))
    out[:, cs:].zero_()
    return out


def depth_to_space_grad(gx: torch.Tensor, g: _S2DGeometry, x: torch.Tensor) -> torch.Tensor:
    """The gradient of x from the gradient of space_to_depth(x) (the adjoint: padding and the
    zero channels dropped, pixels never read get zero), laid out like x."""
    n, c, t = x.shape[:3]
    (sh, sw), (hb, wb) = g.block, g.blocks
    ph, pw = g.padding
    rows, cols = _read_window(x, g)
    gp = (gx[:, :g.channels].reshape(n, c, sh, sw, t, hb, wb).permute(0, 1, 4, 5, 2, 6, 3)
          .reshape(n, c, t, hb * sh, wb * sw))
    out = torch.zeros_like(x)
    out[..., :rows, :cols] = gp[..., ph:ph + rows, pw:pw + cols]
    return laid_out_like(out, x)


def s2d_weight(weight: torch.Tensor, g: _S2DGeometry, fmt: torch.memory_format) -> torch.Tensor:
    """(K, C, kt, kh, kw) -> (K, Cp, kt, ceil(kh/sh), ceil(kw/sw)), channels as space_to_depth's:
    tap (qi, qj) of channel (c, ri, rj) is the original tap (qi*sh + ri, qj*sw + rj), or zero."""
    k, c, kt, kh, kw = weight.shape
    (sh, sw), (qh, qw) = g.block, g.taps
    wp = weight.new_zeros((k, c, kt, qh * sh, qw * sw))
    wp[..., :kh, :kw] = weight
    w2 = wp.view(k, c, kt, qh, sh, qw, sw).permute(0, 1, 4, 6, 2, 3, 5).reshape(
        k, g.channels, kt, qh, qw)
    # Fresh strides: the view chain leaves odd strides on size-1 dims, which ATen's slow CPU
    # path (float64) refuses for a weight gradient.
    out = torch.empty((k, g.padded_channels, kt, qh, qw), dtype=weight.dtype,
                      device=weight.device, memory_format=fmt)
    out[:, :g.channels] = w2
    out[:, g.channels:] = 0
    return out


def s2d_weight_grad_back(gw: torch.Tensor, g: _S2DGeometry, weight: torch.Tensor) -> torch.Tensor:
    """The gradient of the original weight from that of s2d_weight(weight), laid out like it."""
    k, c, kt, kh, kw = weight.shape
    (sh, sw), (qh, qw) = g.block, g.taps
    full = (gw[:, :g.channels].reshape(k, c, sh, sw, kt, qh, qw).permute(0, 1, 4, 5, 2, 6, 3)
            .reshape(k, c, kt, qh * sh, qw * sw))
    return laid_out_like(full[..., :kh, :kw], weight)


def _s2d_conv_args(x, weight, stride, padding, fmt):
    g = _geometry_of(x, weight, stride, padding)
    return (g, space_to_depth(x, g, fmt), s2d_weight(weight, g, fmt), (stride[0], 1, 1),
            (padding[0], 0, 0))


def _s2d(tag: str, engine: Algorithm, fmt: torch.memory_format,
         engine_applies: Callable[[Problem, Problem], bool]) -> Algorithm:
    """`engine` (an algorithm of the stride-1 problem) run on the space-to-depth problem."""
    fmt_name = "channels_last_3d" if fmt == _CL3 else "contiguous"

    def forward(x, weight, bias, stride, padding, relu, out_format):
        _, x2, w2, stride2, padding2 = _s2d_conv_args(x, weight, stride, padding, fmt)
        return engine.forward(x2, w2, bias, stride2, padding2, relu, out_format)

    def input_grad(grad, x, weight, stride, padding):
        g, x2, w2, stride2, padding2 = _s2d_conv_args(x, weight, stride, padding, fmt)
        return depth_to_space_grad(engine.input_grad(grad, x2, w2, stride2, padding2), g, x)

    def weight_grad(grad, x, weight, stride, padding):
        g, x2, w2, stride2, padding2 = _s2d_conv_args(x, weight, stride, padding, fmt)
        gw2 = engine.weight_grad(grad, x2, w2, stride2, padding2)
        return s2d_weight_grad_back(gw2, g, weight)

    def applies(p: Problem) -> bool:
        return _s2d_applies(p) and engine_applies(p, _s2d_problem(p, fmt_name))

    return Algorithm(f"s2d_{tag}", applies, forward,
                     input_grad if engine.input_grad is not None else None,
                     weight_grad if engine.weight_grad is not None else None)


# ---- input gradient as a forward convolution (stride-1 layers) --------------------------------
#
# At stride 1, y[o] = sum_i w[i] xp[o + i], so dx[h] = sum_o g[o] w[h + p - o]: with the tap
# j = k - 1 - (h + p - o), dx = conv(g, w~) with w~[c, k, j] = w[k, c, k - 1 - j] (the weight
# transposed C <-> K and flipped along all three axes) and padding k - 1 - p, which gives back
# x's size. It is therefore a forward problem (C' = K, K' = C) that every forward engine runs,
# the hand-written kernels included. The ReLU mask is applied by the op before any input-grad
# candidate (one elementwise pass, shared by all of them).


def _dgrad_applies(p: Problem) -> bool:
    return p.stride == (1, 1, 1) and all(pd <= k - 1 for pd, k in zip(p.padding, p.kernel,
                                                                       strict=True))


def _dgrad_padding(weight: torch.Tensor, padding: Sequence[int]) -> tuple[int, int, int]:
    return tuple(k - 1 - p for k, p in zip(weight.shape[2:], padding, strict=True))  # type: ignore


def _fresh(t: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """A copy of `t` with the canonical strides of `fmt` (size-1 dims included)."""
    out = torch.empty(t.shape, dtype=t.dtype, device=t.device, memory_format=fmt)
    return out.copy_(t)


def flipped_transposed(weight: torch.Tensor) -> torch.Tensor:
    """(K, C, kt, kh, kw) -> (C, K, kt, kh, kw), reversed along the three kernel axes."""
    return weight.flip(2, 3, 4).transpose(0, 1)


def _dgrad_problem(p: Problem, fmt_name: str) -> Problem:
    outs = [(i + 2 * pd - k) // s + 1 for i, k, s, pd in zip(
        (p.t, p.h, p.w), p.kernel, p.stride, p.padding, strict=True)]
    return replace(p, x_format=fmt_name, w_format=fmt_name, c=p.k, k=p.c, t=outs[0],
                   h=outs[1], w=outs[2],
                   padding=tuple(k - 1 - pd for k, pd in zip(p.kernel, p.padding, strict=True)))


def _like_format(x: torch.Tensor) -> torch.memory_format:
    return (_CL3 if not x.is_contiguous() and x.is_contiguous(memory_format=_CL3)
            else torch.contiguous_format)


def _dgrad_as_forward(tag: str, engine: Algorithm, fmt: torch.memory_format,
                      engine_applies: Callable[[Problem, Problem], bool]) -> Algorithm:
    """`engine`'s forward run on the input-gradient problem."""
    fmt_name = "channels_last_3d" if fmt == _CL3 else "contiguous"

    def input_grad(grad, x, weight, stride, padding):
        w2 = _fresh(flipped_transposed(weight), fmt)
        gx = engine.forward(grad.contiguous(memory_format=fmt), w2, None, (1, 1, 1),
                            _dgrad_padding(weight, padding), False, _like_format(x))
        return laid_out_like(gx, x)

    def applies(p: Problem) -> bool:
        return _dgrad_applies(p) and engine_applies(p, _dgrad_problem(p, fmt_name))

    return Algorithm(f"dgrad_as_fwd_{tag}", applies, input_grad=input_grad)


# ---- the weight gradient as a forward problem (stride 1) ----------------------------------
#
# At stride 1, dw[k, c, i] = sum over n and o of g[n, k, o] xp[n, c, o + i]: a forward
# convolution whose batch is x's channels, whose input channels are x's batch and whose K
# filters are the output gradient itself (each as large as the output), with x's padding:
# dw = conv(x^T, g^T)^T, transposing N <-> C. Its positions are the weight's taps (C x kt x kh
# x kw, few) and its reduction N x T' x H' x W' (long), so the hand-written kernels' split-K
# variants matter here; every forward engine runs it. The ReLU mask is applied by the op before
# any weight-grad candidate, as for the input gradient.


def _wgrad_applies(p: Problem) -> bool:
    return p.stride == (1, 1, 1)


def _wgrad_problem(p: Problem, fmt_name: str) -> Problem:
    outs = [(i + 2 * pd - k) // s + 1 for i, k, s, pd in zip(
        (p.t, p.h, p.w), p.kernel, p.stride, p.padding, strict=True)]
    return replace(p, x_format=fmt_name, w_format=fmt_name, n=p.c, c=p.n,
                   kernel=(outs[0], outs[1], outs[2]))


def _wgrad_as_forward(tag: str, engine: Algorithm, fmt: torch.memory_format,
                      engine_applies: Callable[[Problem, Problem], bool]) -> Algorithm:
    """`engine`'s forward run on the weight-gradient problem."""
    fmt_name = "channels_last_3d" if fmt == _CL3 else "contiguous"

    def weight_grad(grad, x, weight, stride, padding):
        xt = _fresh(x.transpose(0, 1), fmt)
        gt = _fresh(grad.transpose(0, 1), fmt)
        gw = engine.forward(xt, gt, None, (1, 1, 1), tuple(padding), False, fmt)
        return laid_out_like(gw.transpose(0, 1), weight)

    def applies(p: Problem) -> bool:
        return _wgrad_applies(p) and engine_applies(p, _wgrad_problem(p, fmt_name))

    return Algorithm(f"wgrad_as_fwd_{tag}", applies, weight_grad=weight_grad)


def _reformulations(base: Sequence[Algorithm]) -> list[Algorithm]:
    """The space-to-depth, dgrad- and wgrad-as-forward candidates, over every engine in `base`
    that runs their rearranged problem: ATen 3D (both layouts), the 2D folds, every hand-written
    kernel."""
    contiguous = torch.contiguous_format
    not_cpu_cl = (lambda p, q: not _cpu_channels_last(p))  # noqa: E731 - as in _conv3d_in
    conv3d = [("conv3d_ncdhw", _conv3d_in(contiguous), contiguous, not_cpu_cl),
              ("conv3d_cl", _conv3d_in(_CL3), _CL3, lambda p, q: True)]
    frames = [("conv2d_frames_nchw", _frames_in(contiguous), contiguous,
               lambda p, q: _frames_apply(q) and not _cpu_channels_last(p)),
              ("conv2d_frames_cl", _frames_in(_CL2), _CL3, lambda p, q: _frames_apply(q))]
    stacked = [("conv2d_stacked_nchw", _stacked_in(contiguous), contiguous,
                lambda p, q: _stacked_apply(q) and not _cpu_channels_last(p)),
               ("conv2d_stacked_cl", _stacked_in(_CL2), _CL3, lambda p, q: _stacked_apply(q))]
    # Hand-written kernels (forward only): whatever tiles and variants this build offers.
    kernels = [(a.name, a, _CL3, lambda p, q, a=a: a.applies(q)) for a in base
               if a.name.startswith("fused_") and a.forward is not None]
    return ([_s2d(*e) for e in conv3d + frames + stacked + kernels]
            + [_dgrad_as_forward(*e) for e in conv3d + frames + kernels]
            + [_wgrad_as_forward(*e) for e in conv3d + frames + kernels])


REFORMULATION_PREFIXES = ("s2d_", "dgrad_as_fwd_", "wgrad_as_fwd_")


def is_reformulation(name: str) -> bool:
    """Whether candidate `name` rearranges the problem (space-to-depth, dgrad or wgrad as
    forward)."""
    return name.startswith(REFORMULATION_PREFIXES)


def runs_hand_written_kernel(name: str) -> bool:
    """Whether candidate `name` runs one of vidconv's own CUDA kernels (rather than ATen's)."""
    base = name
    for prefix in REFORMULATION_PREFIXES:
        base = base.removeprefix(prefix)
    return base.startswith("fused_")


def _always(_: Problem) -> bool:
    return True


def build_algorithms() -> dict[str, Algorithm]:
    """Every algorithm, the reference first, by name."""
    algos = [Algorithm(REFERENCE, _always, _aten_forward, _aten_input_grad, _aten_weight_grad),
             _conv3d_in(torch.contiguous_format), _conv3d_in(_CL3),
             _frames_in(torch.contiguous_format), _frames_in(_CL2),
             _stacked_in(torch.contiguous_format), _stacked_in(_CL2),
             *_fused_algorithms(), *_fused_sm90_algorithms()]
    algos += _reformulations(algos)
    return {a.name: a for a in algos}


ALGORITHMS: dict[str, Algorithm] = build_algorithms()
