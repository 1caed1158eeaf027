"""Fully connected layers with a measured choice of GEMM orientation.

``F.linear(x, W, b)`` computes ``x @ W.T + b``: for the paper's FC layers (a batch of 8-32 rows
against a weight matrix of up to 4096 x 25,088) the GEMM streams the whole weight matrix once
and is bound by memory. Computed the other way round, ``(W @ x.T + b[:, None]).T``, the weight
matrix is the GEMM's untransposed left operand; on the 2-core CPU this project is developed on,
oneDNN/MKL ran that orientation 1.05-2.0x faster for those layers' forward (multires fc1 at
width 0.5: 11 ms against 22 ms at batch 8). The backward, which forms the weight gradient, is
not faster that way, so the "weight_major" candidate computes only its forward so and its
backward as ``F.linear``'s does.

:func:`linear` is ``F.linear`` for 2-D inputs with that choice made per layer, like
:func:`vidconv.ops.st_conv3d`'s: on the first call for a key (device, dtype, batch rows, weight
shape, bias, whether gradients are wanted) both candidates run on the real input, the
candidate's output is checked against ``F.linear``'s, and both forwards are timed by the
convolution planner's :func:`~vidconv.ops.conv_planner.race` (with autograd recording when
gradients are wanted: the backwards are the same GEMMs); the choice is kept for the process.
``F.linear`` runs as it is where nothing can be timed or where the orientation is not this
function's to choose: under ``torch.compile`` tracing, CUDA-graph capture, autocast and
dispatch modes (FLOP counters, fake tensors), ``torch.func`` transforms, forward-mode AD and
TorchScript; for tensor subclasses, other devices and inputs that are not 2-D; under
``torch.distributed`` with more than one rank (ranks must agree); with
``VIDCONV_CONV_ALGO=aten`` (plain PyTorch, the knob ``benchmarks/speed.py`` compares against)
or ``VIDCONV_TUNE=0``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad
from torch.utils._python_dispatch import _get_current_dispatch_mode

from vidconv.ops import conv_planner

CANDIDATES = ("aten", "weight_major")


@dataclass(frozen=True)
class LinearKey:
    device: str
    dtype: str
    rows: int
    out_features: int
    in_features: int
    bias: bool
    grad: bool
    x_contiguous: bool
    weight_contiguous: bool


@dataclass
class LinearDecision:
    chosen: str
    how: str  # "tuned", "noisy", "disagrees", "raised"
    times_ms: dict[str, float]
    rel_err: float | None = None
    tune_s: float = 0.0


_decisions = conv_planner.ChoiceTable()


class _WeightMajorLinear(torch.autograd.Function):
    """``x @ W.T + b`` computed as ``(W @ x.T + b[:, None]).T``; the backward as F.linear's."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        if bias is None:
            out = torch.mm(weight, x.t())
        else:
            out = torch.addmm(bias[:, None], weight, x.t())
        # Row-major like F.linear's: the copy is rows x out_features, small beside the weights.
        return out.t().contiguous()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad_x = grad.mm(weight) if ctx.needs_input_grad[0] else None
        grad_w = grad.t().mm(x) if ctx.needs_input_grad[1] else None
        grad_b = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def weight_major_linear(x: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """The "weight_major" candidate: ``F.linear`` for a 2-D ``x``, its forward as
    ``(W @ x.T + b[:, None]).T``."""
    return _WeightMajorLinear.apply(x, weight, bias)


_RUN = {"aten": F.linear, "weight_major": weight_major_linear}


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
           ) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, computed by whichever candidate was measured faster for
    this layer (see the module docstring); same arguments, shapes and gradients."""
    return _RUN[_choice(x, weight, bias)](x, weight, bias)


def linear_plan() -> list[dict[str, Any]]:
    """Every choice :func:`linear` made in this process, in the order made: key, chosen, how,
    times (ms), the candidate's relative difference from F.linear, seconds spent deciding."""
    return _decisions.plan()


def clear_linear_plan() -> None:
    """Forget the choices (the next call of each key measures again)."""
    _decisions.clear()


def _choice(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> str:
    if (torch.compiler.is_compiling() or torch.jit.is_scripting() or torch.jit.is_tracing()
            or x.device.type not in ("cpu", "cuda")
            or type(x) is not torch.Tensor or type(weight) not in (torch.Tensor, nn.Parameter)
            or _get_current_dispatch_mode() is not None  # FlopCounterMode, FakeTensorMode...
            # torch.func (vmap, grad, jacrev) and forward-mode AD: _WeightMajorLinear has
            # neither a vmap rule nor a jvp
            or torch._C._are_functorch_transforms_active()
            or forward_ad._current_level >= 0
            or x.dim() != 2 or weight.dim() != 2 or x.dtype != weight.dtype
            or x.device != weight.device or x.shape[0] == 0
            or torch.is_autocast_enabled(x.device.type)
            # Ranks would decide apart, and no collective may wait inside a forward: one
            # orientation everywhere.
            or conv_planner._distributed()):
        return "aten"
    if x.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return _known(x, weight, bias) or "aten"
    if conv_planner._mode() == "aten" or not conv_planner._tuning_enabled():
        return "aten"
    key = _key(x, weight, bias)
    return _decisions.decide(key, lambda: _measure(x, weight, bias, key.grad)).chosen


def _key(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> LinearKey:
    grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return LinearKey(conv_planner._device_name(x.device), str(x.dtype).removeprefix("torch."),
                     x.shape[0], weight.shape[0], weight.shape[1], bias is not None, grad,
                     x.is_contiguous(), weight.is_contiguous())


def _known(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> str | None:
    decision = _decisions.get(_key(x, weight, bias))
    return None if decision is None else decision.chosen


def tolerance(dtype: torch.dtype, in_features: int) -> float:
    """How far two summation orders of one GEMM may differ, relative to the output's largest
    magnitude: a few roundings of the output type plus float32 accumulation over
    ``in_features`` terms. (A GEMM that accumulates in less, such as cuBLAS fp16 with reduced
    precision reductions allowed, may exceed it: the candidate is then refused and F.linear
    runs, with a warning.)"""
    eps = conv_planner._EPS.get(dtype, 2.0**-7)
    return 4 * eps + 8 * math.sqrt(max(in_features, 1)) * conv_planner._EPS[torch.float32]


def _measure(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             grad: bool) -> LinearDecision:
    xs, ws = x.detach(), weight.detach()
    bs = None if bias is None else bias.detach()

    def run(fn):
        # Forward only, gradients or not: both backwards are the same two GEMMs and a sum
        # (F.linear's autograd orders them to give the weight gradient row-major, as
        # _WeightMajorLinear does), so the step differs by the forward alone; timing it alone
        # keeps tuning cheap (a backward of fc1 costs 4x its forward). With gradients wanted
        # it runs with autograd recording, as in training.
        def forward():
            with torch.set_grad_enabled(grad):
                return fn(xg, wg, bg)
        return forward

    # Fresh leaves over the same memory when gradients are wanted (no copy of the weights).
    xg, wg = xs.detach().requires_grad_(grad), ws.detach().requires_grad_(grad)
    bg = None if bs is None else bs.detach().requires_grad_(grad)

    where = (f"x {tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}, weight "
             f"{tuple(weight.shape)} on {x.device}")
    try:
        with torch.no_grad():
            err = conv_planner._rel_err(weight_major_linear(xs, ws, bs), F.linear(xs, ws, bs))
    except Exception as exc:  # noqa: BLE001 - a failing candidate must not fail the layer
        warnings.warn(f"vidconv linear: candidate 'weight_major' raised on {where} "
                      f"({type(exc).__name__}: {str(exc).splitlines()[0]}); F.linear runs there",
                      RuntimeWarning, stacklevel=4)
        return LinearDecision("aten", "raised", {})
    if not err <= tolerance(x.dtype, weight.shape[1]):
        warnings.warn(f"vidconv linear: candidate 'weight_major' differs from F.linear by "
                      f"{err:.3g} (relative) on {where}; F.linear runs there", RuntimeWarning,
                      stacklevel=4)
        return LinearDecision("aten", "disagrees", {}, err)
    runs = {name: run(_RUN[name]) for name in CANDIDATES}
    # A warm-up run on CUDA (lazy init, cuBLAS heuristics); on the CPU the check above has run
    # both once, and the race's re-runs of the close ones are warm, as for the convolutions.
    result = conv_planner.measure_choice(runs, "aten", x.device,
                                         warm_up=x.device.type == "cuda")
    if result.noisy is not None:
        conv_planner._warn_once("linear-noisy", f"vidconv linear: timings varied "
                                f"{result.noisy:.1f}x between runs on {where} (other work on "
                                "the same device?); F.linear runs there in this process")
        return LinearDecision("aten", "noisy", result.times_ms, err)
    return LinearDecision(result.chosen, "tuned", result.times_ms, err)
