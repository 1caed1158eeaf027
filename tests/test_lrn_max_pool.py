"""lrn_max_pool (LRN then max pooling, fused) vs F.local_response_norm + F.max_pool3d."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import run_in_threads

from vidconv import reference
from vidconv.ops import lrn_max_pool
from vidconv.ops import lrn_pool as lrn_pool_mod

ROOT = Path(__file__).resolve().parents[1]
EPS = {torch.float64: 2.0**-52, torch.float32: 2.0**-23, torch.float16: 2.0**-10,
       torch.bfloat16: 2.0**-7}
PAPER = dict(size=5, alpha=1e-4, beta=0.5, k=2.0, pool=(2, 2), ceil_mode=True)


def _activations(shape, dtype, seed=0, scale=20.0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).clamp_min(0).to(device, dtype)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double().cpu()
    scale = ref.abs().max().item() or 1.0
    return (out.double().cpu() - ref).abs().max().item() / scale


def _tolerance(x: torch.Tensor, params: dict) -> float:
    """How far PyTorch's own two ops in x's dtype land from float64, plus a few roundings."""
    window = (1, *params["pool"])

    def own(t):
        return F.max_pool3d(F.local_response_norm(t, params["size"], params["alpha"],
                                                  params["beta"], params["k"]), window, window,
                            ceil_mode=params["ceil_mode"])

    try:
        own = own(x)
    except NotImplementedError:  # no float16 avg_pool3d on the CPU: float32, rounded once
        own = own(x.float()).to(x.dtype)
    drift = _rel_err(own, reference.lrn_max_pool_reference(x, **params))
    return 2 * drift + 4 * EPS[x.dtype] + 8 * EPS[torch.float32]


# (N, C, T, H, W), params: odd/prime sizes, window wider than the channels, floor mode,
# partial ceil windows, pool 1 and 3, beta other than 0.5.
CASES = [
    ((1, 1, 1, 1, 1), PAPER),
    ((2, 3, 2, 5, 7), PAPER),
    ((1, 7, 1, 13, 11), dict(PAPER, size=7, alpha=0.5, beta=0.75, k=1.0)),
    ((1, 13, 3, 7, 5), dict(PAPER, pool=(2, 3), alpha=0.3)),
    ((2, 13, 1, 7, 5), dict(PAPER, ceil_mode=False, size=4, alpha=0.3)),
    ((1, 17, 1, 3, 3), dict(PAPER, pool=(1, 1), size=2, beta=1.0, alpha=0.4, k=1.5)),
    ((1, 96, 1, 9, 9), PAPER),
    ((1, 31, 2, 8, 7), dict(PAPER, pool=(3, 3), alpha=0.1)),
]
FORMATS = [torch.contiguous_format, torch.channels_last_3d]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", FORMATS, ids=["contiguous", "channels_last_3d"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_reference(case, fmt, dtype):
    shape, params = CASES[case]
    x = _activations(shape, dtype, seed=case).contiguous(memory_format=fmt)
    out = lrn_max_pool(x, **params)
    ref = reference.lrn_max_pool_reference(x, **params)
    assert out.shape == ref.shape and out.dtype == dtype
    assert _rel_err(out, ref) <= _tolerance(x, params)
    # The layout rule on the CPU: channels_last_3d in (and not also contiguous), the same out.
    want = (torch.channels_last_3d
            if fmt == torch.channels_last_3d and not x.is_contiguous() else torch.contiguous_format)
    assert out.is_contiguous(memory_format=want)


def test_strided_input_and_nan():
    x = _activations((2, 9, 2, 6, 5), torch.float32)
    x[1, 4, 1, 3, 2] = float("nan")
    view = x.transpose(3, 4)  # neither contiguous nor channels_last_3d
    out = lrn_max_pool(view, **PAPER)
    ref = reference.lrn_max_pool_reference(view, **PAPER)
    assert torch.equal(out.isnan(), ref.isnan())
    assert out.isnan().any()
    keep = ~ref.isnan()
    assert _rel_err(out[keep], ref[keep]) < 1e-6


def test_empty():
    x = torch.zeros(0, 4, 1, 5, 5)
    assert lrn_max_pool(x, **PAPER).shape == (0, 4, 1, 3, 3)
    x = torch.zeros(1, 0, 1, 5, 5)
    assert lrn_max_pool(x, **PAPER).shape == (1, 0, 1, 3, 3)


def test_paper_stage_sizes():
    # 55 -> 28 and 27 -> 14 with ceil_mode (the towers' conv1/conv2), 27 -> 13 without.
    x = _activations((1, 8, 1, 55, 27), torch.float32)
    assert lrn_max_pool(x, **PAPER).shape == (1, 8, 1, 28, 14)
    assert lrn_max_pool(x, **dict(PAPER, ceil_mode=False)).shape == (1, 8, 1, 27, 13)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    (dict(size=0), ValueError, "size must be >= 1"),
    (dict(size=2.0), TypeError, "size must be an int"),
    (dict(pool=(2, 2, 2)), ValueError, "pool must be an int or two ints"),
    (dict(pool=(0, 2)), ValueError, r"pool\[0\] must be >= 1"),
    (dict(alpha=float("inf")), ValueError, "alpha must be finite"),
    (dict(beta="0.5"), TypeError, "beta must be a real number"),
    (dict(ceil_mode=1), TypeError, "ceil_mode must be True or False"),
    (dict(pool=(4, 4), ceil_mode=False), ValueError, "does not fit x's H=3 without ceil_mode"),
])
def test_bad_arguments(kwargs, error, match):
    x = torch.rand(1, 4, 1, 3, 5)
    with pytest.raises(error, match=match):
        lrn_max_pool(x, **{**PAPER, **kwargs})


def test_bad_tensors():
    with pytest.raises(ValueError, match="x must have 5 dimensions"):
        lrn_max_pool(torch.rand(4, 3, 5))
    with pytest.raises(TypeError, match="x must have dtype"):
        lrn_max_pool(torch.ones(1, 2, 1, 2, 2, dtype=torch.int32))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        lrn_max_pool([[1.0]])


@pytest.mark.parametrize("fmt", FORMATS, ids=["contiguous", "channels_last_3d"])
def test_opcheck(fmt):
    x = _activations((2, 6, 2, 5, 3), torch.float32).contiguous(memory_format=fmt)
    x.requires_grad_(True)
    torch.library.opcheck(torch.ops.vidconv.lrn_max_pool.default,
                          (x, 5, 1e-2, 0.5, 2.0, [2, 2], True))
    g = torch.rand(2, 6, 2, 3, 2)
    torch.library.opcheck(torch.ops.vidconv.lrn_max_pool_backward.default,
                          (g, x.detach(), 5, 1e-2, 0.5, 2.0, [2, 2], True))


@pytest.mark.parametrize("fmt", FORMATS, ids=["contiguous", "channels_last_3d"])
def test_gradcheck_float64(fmt):
    # Distinct values so no pooling window has a tie (where max is not differentiable).
    x = (torch.randperm(4 * 1 * 5 * 3, generator=torch.Generator().manual_seed(3)).double()
         .reshape(1, 4, 1, 5, 3) / 10 + 0.1).contiguous(memory_format=fmt)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda t: lrn_max_pool(t, 3, 0.5, 0.75, 1.0, (2, 2), True), (x,))


def test_gradient_matches_reference_float32():
    x = _activations((2, 9, 2, 7, 5), torch.float32, seed=4).requires_grad_(True)
    g = torch.randn(2, 9, 2, 4, 3, generator=torch.Generator().manual_seed(5))
    lrn_max_pool(x, **PAPER).backward(g)
    xr = x.detach().clone().requires_grad_(True)
    F.max_pool3d(F.local_response_norm(xr, 5, 1e-4, 0.5, 2.0), (1, 2, 2), (1, 2, 2),
                 ceil_mode=True).backward(g)
    torch.testing.assert_close(x.grad, xr.grad)


def test_torch_compile_fullgraph():
    x = _activations((2, 10, 2, 9, 7), torch.float32, seed=6)

    def stage(t):
        return lrn_max_pool(t.relu(), **PAPER) * 2

    compiled = torch.compile(stage, fullgraph=True, backend="aot_eager")
    xe = x.clone().requires_grad_(True)
    xc = x.clone().requires_grad_(True)
    eager, out = stage(xe), compiled(xc)
    torch.testing.assert_close(out, eager)
    eager.sum().backward()
    out.sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad)


# ---- the per-shape choice ----------------------------------------------------------------------


def _unfused(t):
    return F.max_pool3d(F.local_response_norm(t, 5, 1e-4, 0.5, 2.0), (1, 2, 2), (1, 2, 2),
                        ceil_mode=True)


def _fused_clearly_faster(monkeypatch) -> list[str]:
    """Timings injected (each candidate still runs): the fused op 1 ms, the composition 2 ms;
    the names timed, in order."""
    calls: list[str] = []
    real = lrn_pool_mod.conv_planner.time_candidate

    def timed(name, run, device, repeats):
        calls.append(name)
        real(name, run, device, repeats)
        return [1.0 if name == "fused" else 2.0]

    monkeypatch.setattr(lrn_pool_mod.conv_planner, "time_candidate", timed)
    return calls


def test_prefer_fused_measures_once_and_honours_the_knob(monkeypatch):
    lrn_pool_mod.clear_lrn_pool_plan()
    x = _activations((1, 8, 1, 9, 9), torch.float32)
    calls = _fused_clearly_faster(monkeypatch)
    assert lrn_pool_mod.prefer_fused(x, 5, 1e-4, 0.5, 2.0, (2, 2), True, _unfused)
    assert sorted(set(calls)) == ["aten", "fused"]
    n = len(calls)
    assert lrn_pool_mod.prefer_fused(x, 5, 1e-4, 0.5, 2.0, (2, 2), True, _unfused)
    assert len(calls) == n  # remembered
    (entry,) = lrn_pool_mod.lrn_pool_plan()
    assert entry["fused"] and entry["how"] == "tuned"
    monkeypatch.setenv("VIDCONV_LRN_POOL", "aten")
    assert not lrn_pool_mod.prefer_fused(x, 5, 1e-4, 0.5, 2.0, (2, 2), True, _unfused)
    monkeypatch.setenv("VIDCONV_LRN_POOL", "bogus")
    with pytest.raises(ValueError, match="VIDCONV_LRN_POOL must be one of"):
        lrn_pool_mod.prefer_fused(x, 5, 1e-4, 0.5, 2.0, (2, 2), True, _unfused)
    lrn_pool_mod.clear_lrn_pool_plan()


def test_measuring_inside_activation_checkpointing_does_not_hang(monkeypatch):
    """The training-mode measurement runs a backward inside the caller's forward: under
    non-reentrant checkpointing its saved tensors must not go through the checkpoint's hooks
    (unpacking them would recompute the caller, which would wait for this measurement)."""
    import threading

    from torch.utils.checkpoint import checkpoint

    lrn_pool_mod.clear_lrn_pool_plan()
    _fused_clearly_faster(monkeypatch)
    x = _activations((1, 8, 1, 9, 9), torch.float32).requires_grad_(True)

    def stage(t):
        if lrn_pool_mod.prefer_fused(t, 5, 1e-4, 0.5, 2.0, (2, 2), True, _unfused):
            return lrn_max_pool(t, 5, 1e-4, 0.5, 2.0, (2, 2), True)
        return _unfused(t)

    done: list[bool] = []

    def step():
        checkpoint(stage, x, use_reentrant=False).sum().backward()
        done.append(True)

    worker = threading.Thread(target=step, daemon=True)
    worker.start()
    worker.join(60)
    assert done == [True], "the measurement waited for itself under checkpointing"
    assert lrn_pool_mod.lrn_pool_plan()[0]["key"].grad
    lrn_pool_mod.clear_lrn_pool_plan()


def test_threads_meeting_a_new_shape_at_once_measure_once(monkeypatch):
    lrn_pool_mod.clear_lrn_pool_plan()
    x = _activations((1, 8, 1, 9, 9), torch.float32)
    calls = _fused_clearly_faster(monkeypatch)
    answers = run_in_threads(
        lambda: lrn_pool_mod.prefer_fused(x, 5, 1e-4, 0.5, 2.0, (2, 2), True, _unfused))
    assert answers == [True] * 4 and len(lrn_pool_mod.lrn_pool_plan()) == 1
    assert calls.count("fused") == calls.count("aten") <= 3  # one race, not four
    (entry,) = lrn_pool_mod.lrn_pool_plan()
    assert entry["tune_s"] > 0
    lrn_pool_mod.clear_lrn_pool_plan()


def test_prefer_fused_keeps_a_composition_that_disagrees():
    lrn_pool_mod.clear_lrn_pool_plan()
    x = _activations((1, 8, 1, 9, 9), torch.float32)
    with pytest.warns(RuntimeWarning, match="differs from the model's LRN"):
        assert not lrn_pool_mod.prefer_fused(x, 5, 1e-4, 0.5, 2.0, (2, 2), True,
                                             lambda t: _unfused(t) + 1)
    lrn_pool_mod.clear_lrn_pool_plan()


def test_prefer_fused_falls_back_when_the_fused_op_cannot_run(monkeypatch):
    # No kernel for the device (a build without CUDA kernels), or a size the kernel refuses:
    # the model's own LRN + pool run, with one warning, instead of the forward failing.
    lrn_pool_mod.clear_lrn_pool_plan()
    x = _activations((1, 8, 1, 9, 9), torch.float32)

    def no_kernel(*args, **kwargs):
        raise NotImplementedError("Could not run 'vidconv::lrn_max_pool' with arguments from "
                                  "the 'CUDA' backend")

    monkeypatch.setattr(lrn_pool_mod, "lrn_max_pool", no_kernel)
    with pytest.warns(RuntimeWarning, match="cannot run .*NotImplementedError"):
        assert not lrn_pool_mod.prefer_fused(x, 5, 1e-4, 0.5, 2.0, (2, 2), True, _unfused)
    (entry,) = lrn_pool_mod.lrn_pool_plan()
    assert not entry["fused"] and entry["how"] == "raised"
    lrn_pool_mod.clear_lrn_pool_plan()


def test_prefer_fused_slower_is_not_chosen(monkeypatch):
    lrn_pool_mod.clear_lrn_pool_plan()
    x = _activations((1, 8, 1, 9, 9), torch.float32)
    monkeypatch.setattr(lrn_pool_mod.conv_planner, "time_candidate",
                        lambda name, run, device, repeats: [1.0 if name == "aten" else 1.05])
    assert not lrn_pool_mod.prefer_fused(x, 5, 1e-4, 0.5, 2.0, (2, 2), True, _unfused)
    lrn_pool_mod.clear_lrn_pool_plan()


def test_prefer_fused_uneven_timings_keep_the_composition(monkeypatch):
    # The fused op looks 2x faster at its best, but the composition's runs vary 3x (another
    # process on the cores): no decision from such numbers.
    lrn_pool_mod.clear_lrn_pool_plan()
    x = _activations((1, 8, 1, 9, 9), torch.float32)
    runs = {"aten": iter([10.0, 10.0, 30.0]), "fused": iter([5.0, 5.0, 5.0])}
    monkeypatch.setattr(lrn_pool_mod.conv_planner, "time_candidate",
                        lambda name, run, device, repeats: [next(runs[name])])
    with pytest.warns(RuntimeWarning, match="timings varied 3.0x"):
        assert not lrn_pool_mod.prefer_fused(x, 5, 1e-4, 0.5, 2.0, (2, 2), True, _unfused)
    (entry,) = lrn_pool_mod.lrn_pool_plan()
    assert entry["how"] == "noisy" and entry["times_ms"] == {"aten": 10.0, "fused": 5.0}
    lrn_pool_mod.clear_lrn_pool_plan()


# ---- the CUDA kernel: host emulation here, the device where there is one -----------------------


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc to build the emulator")
def test_cuda_kernel_emulation():
    res = subprocess.run([sys.executable, str(ROOT / "tools/emulate_lrn_max_pool.py"),
                          "--quick"], capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert " 0 failed" in res.stdout


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", FORMATS, ids=["contiguous", "channels_last_3d"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_cuda_matches_reference(case, fmt, dtype):
    shape, params = CASES[case]
    x = _activations(shape, dtype, seed=case).contiguous(memory_format=fmt)
    out = lrn_max_pool(x.cuda(), **params)
    assert out.is_cuda and out.is_contiguous(memory_format=torch.channels_last_3d)
    assert _rel_err(out, reference.lrn_max_pool_reference(x, **params)) <= _tolerance(x, params)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_paper_stages_and_misaligned(dtype):
    for shape in [(4, 96, 3, 55, 55), (4, 256, 2, 27, 27), (2, 96, 1, 29, 29)]:
        x = _activations(shape, dtype, device="cuda").contiguous(
            memory_format=torch.channels_last_3d)
        out = lrn_max_pool(x, **PAPER)
        assert _rel_err(out, reference.lrn_max_pool_reference(x, **PAPER)) <= _tolerance(
            x.cpu(), PAPER)
    # A view one element into its storage: not 16-byte aligned, the scalar path.
    base = _activations((1 * 5 * 7 * 24 + 1,), dtype, device="cuda")
    x = base[1:].view(1, 5, 7, 24, 1).permute(0, 3, 4, 1, 2)  # (1, 24, 1, 5, 7), channels last
    out = lrn_max_pool(x, **PAPER)
    assert _rel_err(out, reference.lrn_max_pool_reference(x, **PAPER)) <= _tolerance(
        x.cpu(), PAPER)
    xg = x.detach().clone().requires_grad_(True)
    lrn_max_pool(xg, **PAPER).sum().backward()
    xr = x.detach().cpu().float().requires_grad_(True)
    _unfused(xr).sum().backward()
    torch.testing.assert_close(xg.grad.cpu().float(), xr.grad, atol=2e-2, rtol=2e-2)


# ---- the models ----------------------------------------------------------------------------------


def _model_clip(model, batch=1):
    side = 2 * model.spec.size if model.multires else model.spec.size
    return torch.randn(batch, 3, model.spec.frames, side, side,
                       generator=torch.Generator().manual_seed(9))


@pytest.mark.parametrize(("arch", "multires"), [("single_frame", False), ("slow_fusion", True)])
def test_models_same_outputs_fused_or_not(arch, multires, monkeypatch):
    from vidconv.models import build
    from vidconv.models import tower as tower_mod

    torch.manual_seed(0)
    model = build(arch, num_classes=5, multires=multires, width=1 / 16).eval()
    clip = _model_clip(model)
    calls = []
    real = tower_mod.lrn_max_pool

    def counting(*args, **kwargs):
        calls.append(tuple(args[0].shape))
        return real(*args, **kwargs)

    monkeypatch.setattr(tower_mod, "lrn_max_pool", counting)
    monkeypatch.setenv("VIDCONV_LRN_POOL", "aten")
    with torch.no_grad():
        want = model(clip)
    assert not calls
    monkeypatch.setenv("VIDCONV_LRN_POOL", "fused")
    with torch.no_grad():
        got = model(clip)
    # conv1 and conv2 of every stream (two streams in multires), odd sides with ceil_mode.
    assert len(calls) == 2 * len(model.towers)
    assert any(s[-1] % 2 for s in calls)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # Training through the fused op: the same gradients.
    grads = {}
    for mode in ("aten", "fused"):
        monkeypatch.setenv("VIDCONV_LRN_POOL", mode)
        model.zero_grad()
        model(clip).square().sum().backward()
        grads[mode] = model.towers[next(iter(model.towers))].conv1.conv.weight.grad.clone()
    torch.testing.assert_close(grads["fused"], grads["aten"], rtol=1e-4, atol=1e-6)


# The global backward hook also fires on modules whose inputs need no gradient (the first conv).
@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
def test_stage_keeps_names_state_dict_and_hooks(monkeypatch):
    from collections import OrderedDict

    from torch import nn

    from vidconv.models import build

    model = build("single_frame", num_classes=3, width=1 / 16).eval()
    keys = list(model.state_dict())
    tower = model.towers["frames"]
    assert [n for n, _ in tower.conv1.named_children()] == ["conv", "norm", "pool"]
    assert "towers.frames.conv1.conv.weight" in keys
    # A state_dict saved from plain nn.Sequential stages (the checkpoints' layout) loads.
    plain = OrderedDict((n, nn.Sequential(OrderedDict(s.named_children())))
                        for n, s in tower.named_children())
    assert list(nn.Sequential(plain).state_dict()) == list(tower.state_dict())
    tower.load_state_dict(nn.Sequential(plain).state_dict())
    # A hook on norm sees its output even when fusing is forced.
    monkeypatch.setenv("VIDCONV_LRN_POOL", "fused")
    seen = []
    handle = tower.conv1.norm.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        model(_model_clip(model))
    handle.remove()
    assert len(seen) == 1
    # So does a backward hook on pool (its gradient), and a global backward hook.
    grads = []
    handle = tower.conv1.pool.register_full_backward_hook(
        lambda m, gi, go: grads.append(go[0].shape))
    model(_model_clip(model)).sum().backward()
    handle.remove()
    assert len(grads) == 1
    handle = nn.modules.module.register_module_full_backward_hook(
        lambda m, gi, go: grads.append(type(m).__name__))
    try:
        model(_model_clip(model)).sum().backward()
    finally:
        handle.remove()
    assert "LocalResponseNorm" in grads and "MaxPool3d" in grads
