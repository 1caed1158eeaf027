"""vidconv.ops.linear: the measured choice between F.linear and its weight-major form."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import run_in_threads
from torch import nn

from vidconv.models import build
from vidconv.nn import Linear
from vidconv.ops import conv_planner
from vidconv.ops import fully_connected as fc


@pytest.fixture(autouse=True)
def _fresh_plan():
    fc.clear_linear_plan()
    yield
    fc.clear_linear_plan()


def _inject(monkeypatch, times_ms: dict[str, list[float]], calls: list | None = None) -> None:
    """Each candidate's timed runs report its next time (the last once they run out)."""
    used: dict[str, int] = {}

    def fake(name, run, device, repeats):
        run()
        if calls is not None:
            calls.append(name)
        seq = times_ms.get(name, [50.0])  # the convolutions: all alike, the reference stays
        out = [seq[min(used.get(name, 0) + i, len(seq) - 1)] for i in range(repeats)]
        used[name] = used.get(name, 0) + repeats
        return out

    monkeypatch.setattr(conv_planner, "time_candidate", fake)


# Awkward shapes: one row, rows not a multiple of anything, a single feature, odd sizes.
SHAPES = [(1, 7, 5), (3, 1, 9), (13, 33, 1), (32, 129, 65), (8, 12, 2048)]


@pytest.mark.parametrize("rows,in_features,out_features", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_weight_major_equals_f_linear(rows, in_features, out_features, dtype, bias):
    g = torch.Generator().manual_seed(rows * 1000 + in_features)
    x = torch.randn(rows, in_features, generator=g).to(dtype).requires_grad_(True)
    w = torch.randn(out_features, in_features, generator=g).to(dtype).requires_grad_(True)
    b = torch.randn(out_features, generator=g).to(dtype).requires_grad_(True) if bias else None
    grad = torch.randn(rows, out_features, generator=g).to(dtype)
    got = fc.weight_major_linear(x, w, b)
    assert got.is_contiguous() and got.shape == (rows, out_features) and got.dtype == dtype
    got_grads = torch.autograd.grad(got, [t for t in (x, w, b) if t is not None], grad)
    want = F.linear(x, w, b)
    want_grads = torch.autograd.grad(want, [t for t in (x, w, b) if t is not None], grad)
    tol = fc.tolerance(dtype, in_features)
    assert conv_planner._rel_err(got, want) <= tol
    # Reductions: grad_x over out_features, grad_w and grad_b over the rows.
    for g_got, g_want, n in zip(got_grads, want_grads, (out_features, rows, rows), strict=False):
        assert conv_planner._rel_err(g_got, g_want) <= fc.tolerance(dtype, n)


def test_gradcheck_float64():
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fc.weight_major_linear, (x, w, b))
    assert torch.autograd.gradgradcheck(fc.weight_major_linear, (x, w, b))


def test_the_faster_candidate_is_chosen_once_per_key(monkeypatch):
    calls: list[str] = []
    _inject(monkeypatch, {"aten": [10.0], "weight_major": [5.0]}, calls)
    x, w, b = torch.randn(8, 64), torch.randn(32, 64), torch.randn(32)
    with torch.no_grad():
        out = fc.linear(x, w, b)
    torch.testing.assert_close(out, F.linear(x, w, b))
    (entry,) = fc.linear_plan()
    assert entry["chosen"] == "weight_major" and entry["how"] == "tuned"
    assert entry["times_ms"] == {"aten": 10.0, "weight_major": 5.0}
    assert not entry["key"].grad and entry["key"].rows == 8 and entry["tune_s"] >= 0
    n = len(calls)
    with torch.no_grad():
        fc.linear(x, w, b)
    assert len(calls) == n  # remembered for the key
    # Gradients wanted, another batch size, a non-contiguous input: other keys, each decided.
    w.requires_grad_(True)
    fc.linear(x, w, b)
    assert len(fc.linear_plan()) == 2 and fc.linear_plan()[1]["key"].grad
    with torch.no_grad():
        fc.linear(torch.randn(4, 64), w, b)
        x_t = torch.randn(64, 8).t()
        torch.testing.assert_close(fc.linear(x_t, w, b), F.linear(x_t, w, b))
    keys = [d["key"] for d in fc.linear_plan()]
    assert [k.rows for k in keys] == [8, 8, 4, 8]
    assert [k.x_contiguous for k in keys] == [True, True, True, False]


def test_within_the_margin_f_linear_stays(monkeypatch):
    _inject(monkeypatch, {"aten": [10.0], "weight_major": [9.5]})
    with torch.no_grad():
        fc.linear(torch.randn(8, 64), torch.randn(32, 64))
    assert fc.linear_plan()[0]["chosen"] == "aten"


def test_uneven_timings_keep_f_linear(monkeypatch):
    _inject(monkeypatch, {"aten": [10.0, 10.0, 30.0], "weight_major": [5.0]})
    conv_planner._warned.discard("linear-noisy")
    with pytest.warns(RuntimeWarning, match="timings varied 3.0x"), torch.no_grad():
        fc.linear(torch.randn(8, 64), torch.randn(32, 64))
    entry = fc.linear_plan()[0]
    assert entry["chosen"] == "aten" and entry["how"] == "noisy"


def test_a_wrong_or_raising_candidate_is_never_chosen(monkeypatch):
    _inject(monkeypatch, {"aten": [10.0], "weight_major": [1.0]})
    x, w = torch.randn(8, 64), torch.randn(32, 64)
    real = fc._RUN["weight_major"]
    monkeypatch.setitem(fc._RUN, "weight_major", lambda *a: real(*a) * 1.01)
    monkeypatch.setattr(fc, "weight_major_linear", lambda *a: real(*a) * 1.01)
    with pytest.warns(RuntimeWarning, match="differs from F.linear"), torch.no_grad():
        out = fc.linear(x, w)
    torch.testing.assert_close(out, F.linear(x, w))
    assert fc.linear_plan()[0]["how"] == "disagrees"

    def boom(*a):
        raise RuntimeError("no kernel")

    fc.clear_linear_plan()
    monkeypatch.setattr(fc, "weight_major_linear", boom)
    with pytest.warns(RuntimeWarning, match="raised on .*RuntimeError: no kernel"):
        torch.testing.assert_close(fc.linear(x, w), F.linear(x, w))
    assert fc.linear_plan()[0]["how"] == "raised"


@pytest.mark.parametrize("env", [{"VIDCONV_CONV_ALGO": "aten"}, {"VIDCONV_TUNE": "0"}])
def test_plain_pytorch_and_no_tuning_run_f_linear_untimed(monkeypatch, env):
    calls: list[str] = []
    _inject(monkeypatch, {"aten": [10.0], "weight_major": [1.0]}, calls)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with torch.no_grad():
        fc.linear(torch.randn(8, 64), torch.randn(32, 64))
    assert calls == [] and fc.linear_plan() == []


def test_not_2d_and_autocast_run_f_linear_untimed(monkeypatch):
    calls: list[str] = []
    _inject(monkeypatch, {"aten": [10.0], "weight_major": [1.0]}, calls)
    w = torch.randn(32, 64)
    x3 = torch.randn(2, 8, 64)
    torch.testing.assert_close(fc.linear(x3, w), F.linear(x3, w))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fc.linear(torch.randn(8, 64), w)
    assert got.dtype == torch.bfloat16
    assert calls == [] and fc.linear_plan() == []


def test_torch_compile_fullgraph_traces_f_linear():
    layer = Linear(64, 32)
    x = torch.randn(8, 64)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), F.linear(x, layer.weight, layer.bias))


def test_linear_module_is_a_drop_in_for_nn_linear():
    torch.manual_seed(0)
    ours = Linear(64, 32)
    torch.manual_seed(0)
    theirs = nn.Linear(64, 32)
    assert isinstance(ours, nn.Linear)
    torch.testing.assert_close(ours.weight, theirs.weight)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x = torch.randn(5, 64)
    torch.testing.assert_close(ours(x), theirs(x))


def test_models_use_it_and_keep_their_outputs(monkeypatch):
    _inject(monkeypatch, {"aten": [10.0], "weight_major": [1.0]})  # weight_major everywhere
    model = build("single_frame", width=0.25, num_classes=11).eval()
    assert all(isinstance(m, Linear) for m in (model.fc1, model.fc2, model.classifier))
    x = torch.randn(2, 3, 1, model.spec.size, model.spec.size)
    with torch.no_grad():
        got = model(x)
    assert {d["chosen"] for d in fc.linear_plan()} == {"weight_major"}
    monkeypatch.setenv("VIDCONV_CONV_ALGO", "aten")
    with torch.no_grad():
        want = model(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_torch_func_and_forward_ad_run_f_linear_after_a_choice(monkeypatch):
    _inject(monkeypatch, {"aten": [10.0], "weight_major": [1.0]})
    x, w, b = torch.randn(8, 64), torch.randn(32, 64), torch.randn(32)
    with torch.no_grad():
        fc.linear(x, w, b)  # this key now runs weight_major
    assert fc.linear_plan()[0]["chosen"] == "weight_major"

    def loss(weight, inputs):
        return fc.linear(inputs, weight, b).relu().sum()

    # Per-sample gradients: vmap over rows of one, grad inside (the custom Function has no
    # vmap rule; F.linear has).
    got = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(w, x[:, None])
    want = torch.func.vmap(torch.func.grad(
        lambda weight, inputs: F.linear(inputs, weight, b).relu().sum()), in_dims=(None, 0))(
        w, x[:, None])
    torch.testing.assert_close(got, want)
    import torch.autograd.forward_ad as fwad

    tangent = torch.randn_like(x)
    with fwad.dual_level():
        out = fc.linear(fwad.make_dual(x, tangent), w, b)
        jvp = fwad.unpack_dual(out).tangent
    torch.testing.assert_close(jvp, tangent @ w.t())


def test_distributed_runs_f_linear_untimed(monkeypatch):
    calls: list[str] = []
    _inject(monkeypatch, {"aten": [10.0], "weight_major": [1.0]}, calls)
    monkeypatch.setattr(conv_planner, "_distributed", lambda: True)
    with torch.no_grad():
        fc.linear(torch.randn(8, 64), torch.randn(32, 64))
    assert calls == [] and fc.linear_plan() == []


def test_threads_deciding_at_once_measure_once(monkeypatch):
    calls: list[str] = []
    _inject(monkeypatch, {"aten": [10.0], "weight_major": [5.0]}, calls)
    x, w = torch.randn(8, 64), torch.randn(32, 64)

    def work():
        with torch.no_grad():
            torch.testing.assert_close(fc.linear(x, w), F.linear(x, w))

    run_in_threads(work)
    assert len(fc.linear_plan()) == 1
    assert calls.count("weight_major") == calls.count("aten") <= 3  # one race, not four
