"""Two convolutions of one layer shape at once: the multiresolution fovea and context streams.

:func:`st_conv3d_pair` computes ``st_conv3d(x0, weight0, bias0, ...)`` and
``st_conv3d(x1, weight1, bias1, ...)`` for two problems of identical sizes with their own
tensors. Each multires stream is a small layer on its own (89x89 input frames; at batch 32 the
13x13 and 6x6 layers fill a fraction of a Hopper GPU's SMs), so on an sm_90a build on a compute
capability 9.0 device both can be one persistent launch of the wgmma kernel
(``torch.ops.vidconv.st_conv3d_fused_sm90_grouped``, csrc/cuda/st_conv3d_sm90_kernel.cu) whose
work units span the two problems.

Whether the grouped launch runs is measured per shape, like every kernel of the project: on the
first call of a shape (device, dtype, layout, sizes, stride, padding, ReLU, bias, and whether
gradients are wanted) it runs beside the two separate ``st_conv3d`` calls (each with its own
measured algorithm), must be as close to float32 ATen as they are, and is used only where it is
faster by more than the timing noise (3% on CUDA, see
:func:`~vidconv.ops.conv_planner.race`); otherwise, or when it raises, the two calls run, with
one warning. The choice is kept for the process (:func:`pair_plan`). With gradients, both
sides are timed forward and backward; the grouped launch's backward is each stream's own
``st_conv3d`` backward (its measured input- and weight-gradient algorithms), so only the
forward differs.

``VIDCONV_CONV_PAIR=fused`` runs the grouped launch wherever it applies, ``aten`` never;
``auto`` (default) measures, except under ``VIDCONV_CONV_ALGO=aten`` (plain PyTorch),
``VIDCONV_TUNE=0`` (no timing) and ``torch.distributed`` with more than one rank (ranks choosing
on their own timings could differ, and the two ways round differently), where the two calls
run. While ``torch.compile`` traces, and under CUDA-graph capture for a shape without a choice
yet, the two calls run.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vidconv.ops import conv_algos, conv_planner
from vidconv.ops.st_conv import _no_autocast, validate

# Warnings name st_conv3d_pair's caller: _measure_as_given < _measure < decide's lambda <
# ChoiceTable.decide < prefer_grouped < st_conv3d_pair < caller.
_USER = 7


def st_conv3d_pair(
    x0: torch.Tensor, weight0: torch.Tensor, bias0: torch.Tensor | None,
    x1: torch.Tensor, weight1: torch.Tensor, bias1: torch.Tensor | None,
    stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0,
    activation: str | None = "relu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(st_conv3d(x0, weight0, bias0, ...), st_conv3d(x1, weight1, bias1, ...))``, as one
    grouped launch where that is measured faster (see the module docstring).

    Args:
        x0, weight0, bias0, x1, weight1, bias1: as :func:`~vidconv.ops.st_conv3d`'s, twice: the
            two problems must have the same sizes, dtype and device (their own values).
        stride, padding, activation: shared by both, as for :func:`~vidconv.ops.st_conv3d`.

    Returns:
        The two outputs, each exactly what :func:`~vidconv.ops.st_conv3d` returns for its
        problem (shape, dtype, layout); differentiable in every tensor.
    """
    stride_, padding_ = validate(x0, weight0, bias0, stride, padding, activation)
    validate(x1, weight1, bias1, stride, padding, activation)
    if tuple(x1.shape) != tuple(x0.shape) or tuple(weight1.shape) != tuple(weight0.shape):
        raise ValueError(f"x1 and weight1 must have x0's and weight0's shapes "
                         f"{tuple(x0.shape)} and {tuple(weight0.shape)}, got "
                         f"{tuple(x1.shape)} and {tuple(weight1.shape)}")
    if x1.dtype != x0.dtype or x1.device != x0.device:
        raise ValueError(f"x1 must have x0's dtype and device ({x0.dtype} on {x0.device}), got "
                         f"{x1.dtype} on {x1.device}")
    if (bias0 is None) != (bias1 is None):
        raise ValueError("bias0 and bias1 must both be tensors or both be None, got "
                         f"{type(bias0).__name__} and {type(bias1).__name__}")
    relu = activation == "relu"
    args = (x0, weight0, bias0, x1, weight1, bias1, stride_, padding_, relu)
    if prefer_grouped(*args):
        return _grouped(*args)
    return _separate(*args)


def _separate(x0, weight0, bias0, x1, weight1, bias1, stride, padding, relu):
    st = torch.ops.vidconv.st_conv3d
    return st(x0, weight0, bias0, stride, padding, relu), st(x1, weight1, bias1, stride,
                                                             padding, relu)


def _grouped(x0, weight0, bias0, x1, weight1, bias1, stride, padding, relu):
    """The grouped launch (0 lets the launcher pick the split-K factor), in st_conv3d's output
    layout (channels_last_3d on CUDA, as the kernel writes)."""
    return tuple(torch.ops.vidconv.st_conv3d_fused_sm90_grouped(
        x0, weight0, bias0, x1, weight1, bias1, list(stride), list(padding), relu, 0))


def grouped_applies(x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int],
                    padding: Sequence[int]) -> bool:
    """Whether the grouped launch exists for this problem here: an sm_90a build of the Hopper
    kernel, a compute capability 9.0 device, float16/bfloat16, sizes within its limits."""
    if x.device.type != "cuda" or conv_algos.fused_sm90_tile() is None \
            or not conv_algos._built_for_sm90a():
        return False
    problem = conv_algos.Problem(
        "cuda", x.dtype, conv_algos.memory_format_name(x), conv_algos.memory_format_name(weight),
        *x.shape, weight.shape[0], tuple(weight.shape[2:]), tuple(stride), tuple(padding))
    return conv_algos._sm90_applies(problem)


# ---- grouped or not: measured per shape ----------------------------------------------------


@dataclass(frozen=True)
class PairKey:
    """What a choice is made for: one layer shape (both problems') on one device."""

    device: str
    dtype: str
    memory_format: str  # x0's, x1's, weight0's, weight1's
    x_shape: tuple[int, ...]
    weight_shape: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    relu: bool
    bias: bool
    grad: bool  # timed with the backward (training) or without (inference)


_decisions = conv_planner.ChoiceTable()


def pair_plan() -> list[dict]:
    """Every choice :func:`prefer_grouped` measured in this process: key, grouped (``fused``)
    or not, how it was decided, both sides' times (ms), the grouped launch's error."""
    return _decisions.plan()


def clear_pair_plan() -> None:
    """Forget the choices (the next call of each shape measures again)."""
    _decisions.clear()


def prefer_grouped(x0, weight0, bias0, x1, weight1, bias1, stride, padding, relu) -> bool:
    """Whether the grouped launch computes this pair (see the module docstring)."""
    if torch.compiler.is_compiling():
        return False
    mode = conv_planner.fused_mode("VIDCONV_CONV_PAIR")
    if mode == "aten" or not grouped_applies(x0, weight0, stride, padding):
        return False
    if mode == "fused":
        return True
    if conv_planner._mode() == "aten" or not conv_planner._tuning_enabled():
        return False
    if conv_planner._distributed():
        # Ranks timing on their own could choose differently, and the two ways round
        # differently: the ranks' replicas would drift apart. The two calls, whose algorithms
        # the planner agrees on across ranks.
        return False
    tensors = (x0, weight0, bias0, x1, weight1, bias1)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    key = PairKey(conv_planner._device_name(x0.device), str(x0.dtype).removeprefix("torch."),
                  "/".join(conv_algos.memory_format_name(t) for t in (x0, x1, weight0, weight1)),
                  tuple(x0.shape), tuple(weight0.shape),
                  tuple(stride), tuple(padding), bool(relu), bias0 is not None, grad)
    decision = _decisions.get(key)
    if decision is not None:
        return decision.fused
    if x0.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    args = (x0, weight0, bias0, x1, weight1, bias1, stride, padding, relu)
    return _decisions.decide(key, lambda: _measure(args, grad)).fused


def _reference(x, weight, bias, stride, padding, relu) -> torch.Tensor:
    """ATen's conv3d (+ ReLU) in float32 (float64 for float64): the yardstick of both sides."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = F.conv3d(x.to(compute), weight.to(compute),
                 None if bias is None else bias.to(compute), list(stride), list(padding))
    return y.relu() if relu else y


def _measure(args: tuple, grad: bool) -> conv_planner.FusedDecision:
    # The kernels compute in x's dtype (st_conv3d casts nothing), and the yardstick must stay
    # float32: autocast off, as inside st_conv3d.
    with _no_autocast(args[0].device.type):
        return _measure_as_given(args, grad)


def _measure_as_given(args: tuple, grad: bool) -> conv_planner.FusedDecision:
    x0, weight0, bias0, x1, weight1, bias1, stride, padding, relu = args
    detached = tuple(None if t is None else t.detach() for t in args[:6])
    # Timed with the gradients the real call needs (conv1's input needs none).
    needs = tuple(t is not None and t.requires_grad for t in args[:6])

    def run(fn: Callable) -> Callable[[], object]:
        if not grad:
            def forward():
                with torch.no_grad():
                    return fn(*detached, stride, padding, relu)
            return forward

        def forward_backward():
            with conv_planner.own_saved_tensors():
                leaves = tuple(None if t is None else t.clone().requires_grad_(need)
                               for t, need in zip(detached, needs, strict=True))
                outs = fn(*leaves, stride, padding, relu)
                torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
            return outs
        return forward_backward

    shape = f"x {tuple(x0.shape)} weight {tuple(weight0.shape)} {x0.dtype}"
    try:
        with torch.no_grad():
            grouped = _grouped(*detached, stride, padding, relu)
            separate = _separate(*detached, stride, padding, relu)
            refs = (_reference(detached[0], detached[1], detached[2], stride, padding, relu),
                    _reference(detached[3], detached[4], detached[5], stride, padding, relu))
    except Exception as exc:  # noqa: BLE001 - a launch the device refuses, out of memory
        warnings.warn(f"vidconv st_conv3d_pair: the grouped launch cannot run {shape} "
                      f"({type(exc).__name__}: {str(exc).splitlines()[0]}); the two "
                      "convolutions run one by one there", RuntimeWarning, stacklevel=_USER)
        return conv_planner.FusedDecision(False, "raised", {}, float("nan"))
    err = max(conv_planner._rel_err(g, r) for g, r in zip(grouped, refs, strict=True))
    baseline = max(conv_planner._rel_err(s, r) for s, r in zip(separate, refs, strict=True))
    # As close to float32 ATen as the two calls it replaces, give or take the output type's
    # rounding (both round a float32 accumulation once, in a different order).
    allowed = 2 * baseline + 4 * conv_planner._EPS[x0.dtype]
    if not err <= allowed:
        warnings.warn(f"vidconv st_conv3d_pair: the grouped launch differs from float32 ATen "
                      f"by {err:.3g} (relative; the two calls it would replace by "
                      f"{baseline:.3g}) on {shape}; not used there", RuntimeWarning,
                      stacklevel=_USER)
        return conv_planner.FusedDecision(False, "disagrees", {}, err)
    runs = {"fused": run(_grouped), "aten": run(_separate)}
    try:
        result = conv_planner.measure_choice(runs, "aten", x0.device, warm_up=True)
    except Exception as exc:  # noqa: BLE001 - e.g. out of memory in the grouped backward
        warnings.warn(f"vidconv st_conv3d_pair: timing the grouped launch on {shape} failed "
                      f"({type(exc).__name__}: {str(exc).splitlines()[0]}); the two "
                      "convolutions run one by one there", RuntimeWarning, stacklevel=_USER)
        return conv_planner.FusedDecision(False, "raised", {}, err)
    if result.noisy is not None:
        warnings.warn(f"vidconv st_conv3d_pair: timings varied {result.noisy:.1f}x between "
                      f"runs on {shape} (other work on the same device?); the two "
                      "convolutions run one by one there in this process", RuntimeWarning,
                      stacklevel=_USER)
        return conv_planner.FusedDecision(False, "noisy", result.times_ms, err)
    return conv_planner.FusedDecision(result.chosen == "fused", "tuned", result.times_ms, err)


# ---- the grouped op's gradient: each stream's st_conv3d backward -----------------------------


def _setup_context(ctx, inputs, output):
    x0, weight0, bias0, x1, weight1, bias1, stride, padding, relu, _split_k = inputs
    ctx.save_for_backward(x0, weight0, output[0], x1, weight1, output[1])
    ctx.stride, ctx.padding, ctx.relu = stride, padding, relu
    ctx.has_bias = (bias0 is not None, bias1 is not None)


def _backward(ctx, grad0, grad1):
    x0, weight0, out0, x1, weight1, out1 = ctx.saved_tensors
    need = ctx.needs_input_grad
    grads: list[torch.Tensor | None] = []
    for g, (x, weight, out), base, has_bias in ((grad0, (x0, weight0, out0), 0, ctx.has_bias[0]),
                                                (grad1, (x1, weight1, out1), 3,
                                                 ctx.has_bias[1])):
        mask = [need[base], need[base + 1], has_bias and need[base + 2]]
        if g is None or not any(mask):
            grads += [None, None, None]
            continue
        gx, gw, gb = torch.ops.vidconv.st_conv3d_backward(
            g, x, weight, out, ctx.stride, ctx.padding, ctx.relu, mask)
        grads += [gx if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None]
    return (*grads, None, None, None, None)


torch.library.register_autograd("vidconv::st_conv3d_fused_sm90_grouped", _backward,
                                setup_context=_setup_context)
