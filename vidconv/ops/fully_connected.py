"""Fully connected layers with a measured choice of GEMM, forward and gradients apart.

``F.linear(x, W, b)`` computes ``x @ W.T + b``: for the paper's FC layers (a batch of 8-32 rows
against a weight matrix of up to 4096 x 25,088) the GEMM does a few multiply-adds per weight
and is bound by reading the weight matrix. Forward candidates:

- "aten": ``F.linear``.
- "weight_major": ``(W @ x.T + b[:, None]).T``, the weight matrix as the GEMM's untransposed
  left operand. On the 2-core CPU this project is developed on, oneDNN/MKL ran that
  orientation 1.05-2.0x faster for those layers (multires fc1 at width 0.5: 11 ms against
  22 ms at batch 8).
- "small_batch" (CPU, float32/float64, contiguous operands, at most 256 rows):
  ``torch.ops.vidconv.small_batch_linear``, which streams the weight matrix exactly once with
  every row of the batch against it (AVX2 where the CPU has it). There it ran multires fc1's
  forward at batch 8 in 7.5-10 ms against weight_major's 14 ms and F.linear's 16-26 ms.

With gradients wanted, what computes them is chosen apart: ATen's GEMMs (F.linear's backward),
or, where the small_batch kernel applies, ``torch.ops.vidconv.small_batch_linear_backward``
(the same streaming for ``grad @ W``, and the weight gradient written once, row band by row
band: multires fc1 at batch 8 took 10 and 24 ms against ATen's 28 and 32; at batch 32 ATen's
were the faster).

:func:`linear` is ``F.linear`` for 2-D inputs with those choices made per layer, like
:func:`vidconv.ops.st_conv3d`'s. On the first call for a key (device, dtype, batch rows, weight
shape, bias, whether gradients are wanted), every forward that applies runs on the real input,
is checked against ``F.linear``'s and timed by the convolution planner's
:func:`~vidconv.ops.conv_planner.race`. With gradients wanted, vidconv's gradients are then
checked against ATen's for an upstream gradient of the output's shape (only the gradients the
call needs) and the two are timed the same way. A candidate that differs or raises is left out
for the key, with a warning; the choices are kept for the process. ``F.linear`` runs as it is
where nothing can be timed or where the choice is not this function's to make: under
``torch.compile`` tracing, CUDA-graph capture, autocast and dispatch modes (FLOP counters,
fake tensors), ``torch.func`` transforms, forward-mode AD and TorchScript; for tensor
subclasses, other devices and inputs that are not 2-D; under ``torch.distributed`` with more
than one rank (ranks must agree); with ``VIDCONV_CONV_ALGO=aten`` (plain PyTorch, the knob
``benchmarks/speed.py`` compares against) or ``VIDCONV_TUNE=0``. A double backward always
differentiates ATen's GEMMs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad
from torch.utils._python_dispatch import _get_current_dispatch_mode

from vidconv.ops import conv_planner

CANDIDATES = ("aten", "weight_major", "small_batch")
# What computes the gradients when they are wanted, chosen apart from the forward: ATen's GEMMs
# (F.linear's backward) or vidconv's kernels.
GRADIENT_CANDIDATES = ("aten", "small_batch")
# Beyond this many rows the GEMM is no longer bound by reading the weights once, which is what
# the small_batch kernels are for: they are not timed there.
SMALL_BATCH_MAX_ROWS = 256
# First runs this far apart need one confirming round of the gradient race, not the usual two.
_CLEAR_LEAD = 1.3


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
    chosen: str  # the forward
    how: str  # "tuned", "noisy", or "disagrees" / "raised" when no candidate was left to time
    times_ms: dict[str, float]
    rel_err: dict[str, float] | None = None  # each checked candidate's difference from F.linear
    tune_s: float = 0.0
    rejected: dict[str, str] | None = None  # candidate -> "disagrees" or "raised"
    gradients: str | None = None  # with gradients wanted: what computes them
    gradient_times_ms: dict[str, float] | None = None


_decisions = conv_planner.ChoiceTable()


def _weight_major_forward(x: torch.Tensor, weight: torch.Tensor,
                          bias: torch.Tensor | None) -> torch.Tensor:
    if bias is None:
        out = torch.mm(weight, x.t())
    else:
        out = torch.addmm(bias[:, None], weight, x.t())
    # Row-major like F.linear's: the copy is rows x out_features, small beside the weights.
    return out.t().contiguous()


def _aten_gradients(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                    mask: list[bool]) -> tuple[torch.Tensor | None, ...]:
    """F.linear's backward: grad_x = grad @ W, grad_W = grad^T @ x, grad_b = grad summed."""
    return (grad.mm(weight) if mask[0] else None, grad.t().mm(x) if mask[1] else None,
            grad.sum(0) if mask[2] else None)


def _small_batch_gradients(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                           mask: list[bool]) -> tuple[torch.Tensor | None, ...]:
    got = torch.ops.vidconv.small_batch_linear_backward(grad, x, weight, mask)
    return tuple(g if m else None for g, m in zip(got, mask, strict=True))


# The forwards and the gradient computations, each without autograd of its own.
_FORWARD = {"aten": F.linear, "weight_major": _weight_major_forward,
            "small_batch": lambda x, w, b: torch.ops.vidconv.small_batch_linear(x, w, b)}
_GRADIENTS = {"aten": _aten_gradients, "small_batch": _small_batch_gradients}


class _Linear(torch.autograd.Function):
    """``x @ W.T + b`` by the forward ``forward`` names, its gradients by ``gradients``
    (vidconv's kernels are used on a first backward only; a double backward differentiates
    ATen's GEMMs)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                forward: str, gradients: str) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.gradients = gradients
        return _FORWARD[forward](x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                ctx.has_bias and ctx.needs_input_grad[2]]
        how = "aten" if torch.is_grad_enabled() else ctx.gradients
        return (*_GRADIENTS[how](grad.contiguous() if how != "aten" else grad, x, weight, mask),
                None, None)


def weight_major_linear(x: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """The "weight_major" candidate: ``F.linear`` for a 2-D ``x``, its forward as
    ``(W @ x.T + b[:, None]).T``, its backward as F.linear's."""
    return _Linear.apply(x, weight, bias, "weight_major", "aten")


def small_batch_linear(x: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """The "small_batch" kernels: ``F.linear`` for a 2-D ``x`` on the CPU (float32 or float64,
    contiguous ``x``, ``weight`` and ``bias``), the weight matrix read once for all rows, and
    the gradients the same way."""
    return torch.ops.vidconv.small_batch_linear(x, weight, bias)


@torch.library.register_fake("vidconv::small_batch_linear")
def _small_batch_linear_fake(x, weight, bias):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.register_fake("vidconv::small_batch_linear_backward")
def _small_batch_linear_backward_fake(grad, x, weight, output_mask):
    return (x.new_empty(x.shape) if output_mask[0] else None,
            weight.new_empty(weight.shape) if output_mask[1] else None,
            grad.new_empty(grad.shape[1:]) if output_mask[2] else None)


def _small_batch_setup(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _small_batch_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1],
            ctx.has_bias and ctx.needs_input_grad[2]]
    how = "aten" if torch.is_grad_enabled() else "small_batch"  # double backward: ATen's
    return _GRADIENTS[how](grad.contiguous(), x, weight, mask)


torch.library.register_autograd("vidconv::small_batch_linear", _small_batch_backward,
                                setup_context=_small_batch_setup)


def _small_batch_applies(x: torch.Tensor, weight: torch.Tensor,
                         bias: torch.Tensor | None) -> bool:
    """Whether the small_batch kernels can run these operands (F.linear and weight_major run
    all)."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and x.shape[0] <= SMALL_BATCH_MAX_ROWS
            and x.is_contiguous() and weight.is_contiguous()
            and (bias is None or (bias.dim() == 1 and bias.is_contiguous()
                                  and bias.dtype == x.dtype)))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
           ) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, computed by whichever candidates were measured faster
    for this layer (see the module docstring); same arguments, shapes and gradients."""
    decision = _choice(x, weight, bias)
    if decision is None or (decision.chosen == "aten" and decision.gradients in (None, "aten")):
        return F.linear(x, weight, bias)
    if "small_batch" in (decision.chosen, decision.gradients) and not _small_batch_applies(
            x, weight, bias):
        # What the key leaves out (the bias's layout, say) rules the kernel out for this call.
        return F.linear(x, weight, bias)
    if decision.gradients is None:  # no gradients wanted (the key says so)
        return _FORWARD[decision.chosen](x, weight, bias)
    return _Linear.apply(x, weight, bias, decision.chosen, decision.gradients)


def linear_plan() -> list[dict[str, Any]]:
    """Every choice :func:`linear` made in this process, in the order made: key, the forward
    chosen, how, its candidates' times (ms), each checked candidate's relative difference from
    F.linear, seconds spent deciding, the candidates left out (and why), and with gradients
    wanted what computes them and their times."""
    return _decisions.plan()


def clear_linear_plan() -> None:
    """Forget the choices (the next call of each key measures again)."""
    _decisions.clear()


def _choice(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
            ) -> LinearDecision | None:
    """The decision for this call's key (measured now if new), or None where F.linear runs as
    it is."""
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
        return None
    if x.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return _decisions.get(_key(x, weight, bias))
    if conv_planner._mode() == "aten" or not conv_planner._tuning_enabled():
        return None
    key = _key(x, weight, bias)
    return _decisions.decide(key, lambda: _measure(x, weight, bias, key.grad))


def _key(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> LinearKey:
    grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return LinearKey(conv_planner._device_name(x.device), str(x.dtype).removeprefix("torch."),
                     x.shape[0], weight.shape[0], weight.shape[1], bias is not None, grad,
                     x.is_contiguous(), weight.is_contiguous())


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
    """Check and time the forwards; with gradients wanted, then check and time what computes
    them (ATen's GEMMs or vidconv's kernels), apart: each part's best, put together."""
    xs, ws = x.detach(), weight.detach()
    bs = None if bias is None else bias.detach()
    where = (f"x {tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}, weight "
             f"{tuple(weight.shape)} on {x.device}")
    small = _small_batch_applies(x, weight, bias)
    names = [n for n in CANDIDATES if n != "small_batch" or small]

    def check(name: str, run: Callable[[], Any], want: Any, terms: list[int],
              errors: dict[str, float], rejected: dict[str, str]) -> bool:
        try:
            with torch.no_grad():
                got = run()
        except Exception as exc:  # noqa: BLE001 - a failing candidate must not fail the layer
            _reject_raised(name, exc, where, rejected)
            return False
        pairs = [(a, b) for a, b in zip(got, want, strict=True) if b is not None]
        errs = [conv_planner._rel_err(a, b) if a is not None and a.shape == b.shape
                else math.inf for a, b in pairs]
        errors[name] = max(errs)
        if all(e <= tolerance(x.dtype, n) for e, n in zip(errs, terms, strict=True)):
            return True
        warnings.warn(f"vidconv linear: candidate {name!r} differs from F.linear by "
                      f"{max(errs):.3g} (relative) on {where}; it is not used there",
                      RuntimeWarning, stacklevel=5)
        rejected[name] = "disagrees"
        return False

    # The forwards (no autograd recording: what differs between them is the product alone), so
    # a key with gradients wanted takes the forward of its twin without, when that is decided.
    errors: dict[str, float] = {}
    rejected: dict[str, str] = {}
    twin = _decisions.get(dataclasses.replace(_key(x, weight, bias), grad=False)) if grad else None
    if twin is not None and twin.how == "tuned":
        decision = LinearDecision(twin.chosen, "tuned", dict(twin.times_ms),
                                  dict(twin.rel_err or {}), rejected=dict(twin.rejected or {}))
        return _measure_gradients(x, weight, bias, decision, small, where, check)
    with torch.no_grad():
        want = (F.linear(xs, ws, bs),)
    runs = {"aten": lambda: _FORWARD["aten"](xs, ws, bs)}
    for name in names[1:]:
        run = functools.partial(_FORWARD[name], xs, ws, bs)
        if check(name, lambda run=run: (run(),), want, [weight.shape[1]], errors, rejected):
            runs[name] = run
    if len(runs) == 1:
        chosen, how, times = "aten", next(iter(rejected.values()), "tuned"), {}
    else:
        with torch.no_grad():
            result = conv_planner.measure_choice(runs, "aten", x.device,
                                                 warm_up=x.device.type == "cuda")
        chosen, times = result.chosen, result.times_ms
        how = "tuned"
        if result.noisy is not None:
            conv_planner._warn_once("linear-noisy", f"vidconv linear: timings varied "
                                    f"{result.noisy:.1f}x between runs on {where} (other work "
                                    "on the same device?); F.linear runs there in this process")
            chosen, how = "aten", "noisy"
    decision = LinearDecision(chosen, how, times, errors, rejected=rejected)
    if not grad:
        return decision
    return _measure_gradients(x, weight, bias, decision, small, where, check)


def _reject_raised(name: str, exc: Exception, where: str, rejected: dict[str, str]) -> None:
    """Leave candidate ``name`` out for the key: it raised ``exc``."""
    warnings.warn(f"vidconv linear: candidate {name!r} raised on {where} "
                  f"({type(exc).__name__}: {str(exc).splitlines()[0]}); it is not used there",
                  RuntimeWarning, stacklevel=6)
    rejected[name] = "raised"


def _measure_gradients(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       decision: LinearDecision, small: bool, where: str,
                       check: Callable[..., bool]) -> LinearDecision:
    """The gradient part of :func:`_measure`: ATen's GEMMs or vidconv's kernels."""
    xs, ws = x.detach(), weight.detach()
    errors, rejected = decision.rel_err, decision.rejected
    # The gradients, for an upstream gradient of the output's shape: all of them, since a later
    # call of the key may need others than this one.
    decision.gradients, decision.gradient_times_ms = "aten", {}
    mask = [True, True, bias is not None]
    if not small or decision.how == "noisy":
        return decision
    upstream = torch.randn(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device,
                           generator=torch.Generator(x.device).manual_seed(0))
    grad_runs = {f"{name} gradients": functools.partial(_GRADIENTS[name], upstream, xs, ws, mask)
                 for name in GRADIENT_CANDIDATES}
    # The first timed run of each also gives the results to check (a gradient step of fc1 costs
    # several forwards: no separate checking run).
    outputs: dict[str, Any] = {}

    def keeping(name: str) -> Callable[[], None]:
        def run() -> None:
            outputs[name] = grad_runs[name]()
        return run

    ours = "small_batch gradients"
    first: dict[str, list[float]] = {}
    with torch.no_grad():
        for name in grad_runs:
            if x.device.type == "cuda":
                grad_runs[name]()  # warm-up (lazy init, cuBLAS heuristics)
            try:
                first[name] = conv_planner.time_candidate(name, keeping(name), x.device, 1)
            except Exception as exc:  # noqa: BLE001 - a failing candidate must not fail the layer
                if name != ours:
                    raise
                _reject_raised(ours, exc, where, rejected)
                return decision
    # Reductions: grad_x over out_features, grad_weight and grad_bias over the rows.
    terms = [n for n, m in zip((weight.shape[0], x.shape[0], x.shape[0]), mask, strict=True)
             if m]
    want_grads, got = outputs.pop("aten gradients"), outputs.pop(ours)
    if not check(ours, lambda: got, want_grads, terms, errors, rejected):
        return decision
    want_grads = got = None  # not kept through the race
    # One confirming round where the first runs are far apart (a gradient step of multires fc1
    # is 0.1-0.2 s a run on 2 CPU cores), the usual rounds otherwise. With one warm run each
    # the race cannot call the timings noisy; the reference's warm run still has to lose.
    rounds = conv_planner._CHOICE_REPEATS.get(x.device.type, 3) - 1
    if max(t[0] for t in first.values()) >= _CLEAR_LEAD * min(t[0] for t in first.values()):
        rounds = 1
    with torch.no_grad():
        result = conv_planner.race(grad_runs, first, "aten gradients", x.device, rounds)
    decision.gradient_times_ms = {k.removesuffix(" gradients"): v
                                  for k, v in result.times_ms.items()}
    if result.noisy is None:
        decision.gradients = result.chosen.removesuffix(" gradients")
    else:
        conv_planner._warn_once("linear-noisy", f"vidconv linear: timings varied "
                                f"{result.noisy:.1f}x between runs on {where} (other work on "
                                "the same device?); ATen's gradients run there in this process")
    return decision
