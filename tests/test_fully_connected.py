"""vidconv.ops.linear: the measured choice between F.linear, its weight-major form and the
small-batch kernel that streams the weights once."""

from __future__ import annotations

import math

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


# Rows around the kernel's blocks of 4, features around its 8 lanes and 2048-feature chunks,
# an odd number of weight rows (the last pair has one), and the paper's fc1 at batch 8.
SMALL_BATCH_SHAPES = [(1, 1, 1), (2, 7, 3), (3, 8, 5), (5, 9, 4), (4, 2047, 7), (7, 2049, 6),
                      (9, 4100, 1), (32, 63, 33), (8, 6272, 2048)]


def _floor(dtype: torch.dtype, terms: int) -> float:
    """Where F.linear lands exactly on the float64 reference (tiny sizes): the roundings of a
    sum of ``terms`` products in ``dtype`` (a float64 path summing in float32 is far above)."""
    return 16 * math.sqrt(terms) * (2.0**-24 if dtype == torch.float32 else 2.0**-53)


@pytest.mark.parametrize("rows,in_features,out_features", SMALL_BATCH_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("simd", ["1", "0"])
def test_small_batch_equals_f_linear(rows, in_features, out_features, dtype, simd, monkeypatch):
    monkeypatch.setenv("VIDCONV_CPU_SIMD", simd)  # the AVX2 rows and the portable ones
    g = torch.Generator().manual_seed(rows * 7919 + in_features)
    x = torch.randn(rows, in_features, generator=g, dtype=dtype)
    w = torch.randn(out_features, in_features, generator=g, dtype=dtype)
    b = torch.randn(out_features, generator=g, dtype=dtype)
    want = F.linear(x.double(), w.double(), b.double())
    for bias in (b, None):
        got = fc.small_batch_linear(x, w, bias)
        assert got.shape == (rows, out_features) and got.dtype == dtype
        ref = want if bias is not None else want - b.double()
        # as close to float64 as F.linear's own result in the same dtype
        own = conv_planner._rel_err(F.linear(x, w, bias), ref)
        assert conv_planner._rel_err(got, ref) <= max(4 * own, _floor(dtype, in_features))
    # Gradients through the registered autograd (vidconv's gradient kernels).
    upstream = torch.randn(rows, out_features, generator=g, dtype=dtype)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    got = torch.autograd.grad(fc.small_batch_linear(*leaves), leaves, upstream)
    ref = (upstream.double() @ w.double(), upstream.double().t() @ x.double(),
           upstream.double().sum(0))
    own = torch.autograd.grad(F.linear(*leaves), leaves, upstream)
    for g_got, g_own, g_ref, n in zip(got, own, ref, (out_features, rows, rows), strict=True):
        assert g_got.dtype == dtype and g_got.shape == g_ref.shape
        assert conv_planner._rel_err(g_got, g_ref) <= max(4 * conv_planner._rel_err(g_own, g_ref),
                                                          _floor(dtype, n))


@pytest.mark.parametrize("mask", [(True, False, False), (False, True, False),
                                  (False, False, True), (True, True, True)])
def test_small_batch_backward_op_computes_what_is_asked(mask):
    g, x, w = torch.randn(3, 5), torch.randn(3, 7), torch.randn(5, 7)
    got = torch.ops.vidconv.small_batch_linear_backward(g, x, w, list(mask))
    want = (g @ w, g.t() @ x, g.sum(0))
    for asked, a, b in zip(mask, got, want, strict=True):
        if asked:
            torch.testing.assert_close(a, b)
        else:
            assert a is None
    torch.library.opcheck(torch.ops.vidconv.small_batch_linear_backward.default,
                          (g, x, w, list(mask)))
    # Empty sizes: zero gradients of the right shapes (the bias's is still grad's row sum).
    for m, k, o in ((0, 7, 5), (3, 0, 5), (3, 7, 0)):
        up = torch.randn(m, o)
        gx, gw, gb = torch.ops.vidconv.small_batch_linear_backward(
            up, torch.randn(m, k), torch.randn(o, k), [True, True, True])
        assert gx.shape == (m, k) and gw.shape == (o, k)
        assert not gx.any() and not gw.any()
        torch.testing.assert_close(gb, up.sum(0))
    with pytest.raises(RuntimeError, match="do not fit"):
        torch.ops.vidconv.small_batch_linear_backward(g, x, torch.randn(5, 6), [True] * 3)


def test_small_batch_edge_sizes_and_bad_arguments():
    x, w = torch.randn(3, 0), torch.randn(4, 0)
    torch.testing.assert_close(fc.small_batch_linear(x, w), torch.zeros(3, 4))
    torch.testing.assert_close(fc.small_batch_linear(x, w, torch.ones(4)), torch.ones(3, 4))
    assert fc.small_batch_linear(torch.randn(0, 5), torch.randn(4, 5)).shape == (0, 4)
    with pytest.raises(RuntimeError, match="x has 5 features, weight expects 6"):
        fc.small_batch_linear(torch.randn(2, 5), torch.randn(4, 6))
    with pytest.raises(RuntimeError, match="float32 or float64"):
        fc.small_batch_linear(torch.randn(2, 5).bfloat16(), torch.randn(4, 5).bfloat16())
    with pytest.raises(RuntimeError, match="contiguous"):
        fc.small_batch_linear(torch.randn(5, 2).t(), torch.randn(4, 5))
    with pytest.raises(RuntimeError, match="bias must be"):
        fc.small_batch_linear(torch.randn(2, 5), torch.randn(4, 5), torch.randn(3))


def test_small_batch_opcheck_and_gradcheck():
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.vidconv.small_batch_linear.default, (x, w, b))
    torch.library.opcheck(torch.ops.vidconv.small_batch_linear.default, (x, w, None))
    assert torch.autograd.gradcheck(fc.small_batch_linear, (x, w, b))
    assert torch.autograd.gradgradcheck(fc.small_batch_linear, (x, w, b))


def test_gradients_are_chosen_apart_and_a_wrong_kernel_never(monkeypatch):
    calls: list[str] = []
    _inject(monkeypatch, {"aten": [10.0], "weight_major": [5.0], "small_batch": [20.0],
                          "aten gradients": [30.0], "small_batch gradients": [10.0]}, calls)
    x = torch.randn(8, 64, requires_grad=True)
    w = torch.randn(32, 64, requires_grad=True)
    b = torch.randn(32, requires_grad=True)
    upstream = torch.randn(8, 32)
    got = torch.autograd.grad(fc.linear(x, w, b), (x, w, b), upstream)
    entry = fc.linear_plan()[0]
    # the fastest forward and, timed apart, the fastest gradients
    assert entry["key"].grad and entry["chosen"] == "weight_major"
    assert entry["gradients"] == "small_batch"
    assert entry["gradient_times_ms"] == {"aten": 30.0, "small_batch": 10.0}
    want = torch.autograd.grad(F.linear(x, w, b), (x, w, b), upstream)
    for a, e, n in zip(got, want, (32, 8, 8), strict=True):
        assert conv_planner._rel_err(a, e) <= fc.tolerance(torch.float32, n)
    # Every gradient is checked and timed (a later call of the key may need others), and a
    # backward computes only those its call needs: here not the input's.
    fc.clear_linear_plan()
    seen: list[list[bool]] = []
    real = fc._GRADIENTS["small_batch"]
    monkeypatch.setitem(fc._GRADIENTS, "small_batch",
                        lambda g, xx, ww, mask: seen.append(list(mask)) or real(g, xx, ww, mask))
    fc.linear(x.detach(), w, b).sum().backward()
    assert seen[-1] == [False, True, True]
    assert set(map(tuple, seen[:-1])) == {(True, True, True)}

    # An input gradient that is wrong is refused even when the deciding call needs none.
    fc.clear_linear_plan()
    monkeypatch.setitem(fc._GRADIENTS, "small_batch",
                        lambda g, xx, ww, mask: tuple(t * 2 if t is not None and k == 0 else t
                                                      for k, t in enumerate(real(g, xx, ww,
                                                                                 mask))))
    with pytest.warns(RuntimeWarning, match="'small_batch gradients' differs"):
        fc.linear(x.detach(), w, b).sum().backward()
    assert fc.linear_plan()[0]["gradients"] == "aten"
    got = torch.autograd.grad(fc.linear(x, w, b), (x, w, b), upstream)
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e)

    # Raising on its first (timed) run: refused, not retried, the layer runs on.
    fc.clear_linear_plan()
    calls_before = len(calls)

    runs = []

    def raising_once(*a):
        runs.append(1)
        if len(runs) == 1:
            raise RuntimeError("transient")
        return real(*a)

    monkeypatch.setitem(fc._GRADIENTS, "small_batch", raising_once)
    with pytest.warns(RuntimeWarning, match="'small_batch gradients' raised .*transient"):
        got = torch.autograd.grad(fc.linear(x, w, b), (x, w, b), upstream)
    entry = fc.linear_plan()[0]
    assert entry["gradients"] == "aten"
    assert entry["rejected"] == {"small_batch gradients": "raised"}
    assert "small_batch gradients" not in calls[calls_before:][2:]

    # Wrong gradients: refused for the key, ATen's GEMMs compute them, the forward stays chosen.
    fc.clear_linear_plan()
    monkeypatch.setitem(fc._GRADIENTS, "small_batch",
                        lambda g, xx, ww, mask: tuple(t if t is None else t * 1.01
                                                      for t in real(g, xx, ww, mask)))
    with pytest.warns(RuntimeWarning, match="'small_batch gradients' differs from F.linear"):
        got = torch.autograd.grad(fc.linear(x, w, b), (x, w, b), upstream)
    entry = fc.linear_plan()[0]
    assert entry["gradients"] == "aten" and entry["rejected"] == {"small_batch gradients":
                                                                  "disagrees"}
    assert entry["chosen"] == "weight_major"
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e)


def test_a_bias_the_kernel_cannot_take_runs_f_linear_for_that_call(monkeypatch):
    _inject(monkeypatch, {"aten": [10.0], "weight_major": [20.0], "small_batch": [1.0]})
    x, w = torch.randn(8, 64), torch.randn(32, 64)
    with torch.no_grad():
        fc.linear(x, w, torch.randn(32))
        assert fc.linear_plan()[0]["chosen"] == "small_batch"
        # the same key: a strided bias, a broadcast one
        for bias in (torch.randn(64)[::2], torch.tensor(0.5).expand(32)):
            torch.testing.assert_close(fc.linear(x, w, bias), F.linear(x, w, bias))
    assert len(fc.linear_plan()) == 1


def test_training_reuses_the_forward_decided_without_gradients(monkeypatch):
    calls: list[str] = []
    _inject(monkeypatch, {"aten": [10.0], "weight_major": [5.0]}, calls)
    x, w = torch.randn(8, 64), torch.randn(32, 64, requires_grad=True)
    with torch.no_grad():
        fc.linear(x, w)
    forward_runs = len(calls)
    assert set(calls) == {"aten", "weight_major", "small_batch"}
    fc.linear(x, w).sum().backward()
    # only the gradients were timed for the key with gradients wanted
    assert set(calls[forward_runs:]) == {"aten gradients", "small_batch gradients"}
    first, second = fc.linear_plan()
    assert second["key"].grad and second["chosen"] == first["chosen"] == "weight_major"
    assert second["times_ms"] == first["times_ms"]


def test_small_batch_is_timed_only_where_it_applies(monkeypatch):
    calls: list[str] = []
    _inject(monkeypatch, {"aten": [10.0], "weight_major": [20.0], "small_batch": [1.0]}, calls)
    with torch.no_grad():
        fc.linear(torch.randn(8, 64), torch.randn(32, 64))  # chosen here
        fc.linear(torch.randn(8, 64).bfloat16(), torch.randn(32, 64).bfloat16())
        fc.linear(torch.randn(fc.SMALL_BATCH_MAX_ROWS + 1, 64), torch.randn(32, 64))
        fc.linear(torch.randn(64, 8).t(), torch.randn(32, 64))  # x not contiguous
    chosen = [d["chosen"] for d in fc.linear_plan()]
    assert chosen == ["small_batch", "aten", "aten", "aten"]
    assert all("small_batch" not in d["times_ms"] for d in fc.linear_plan()[1:])
    # With gradients wanted the chosen kernel's backward is F.linear's.
    x = torch.randn(8, 64, requires_grad=True)
    w = torch.randn(32, 64, requires_grad=True)
    upstream = torch.randn(8, 32)  # a loss linear in the output: the same gradient GEMMs
    (fc.linear(x, w) * upstream).sum().backward()
    assert fc.linear_plan()[-1]["chosen"] == "small_batch"
    x2, w2 = x.detach().requires_grad_(), w.detach().requires_grad_()
    (F.linear(x2, w2) * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(w.grad, w2.grad)


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
    # small_batch (CPU, float32) is timed too; the injection gives it the default 50 ms
    assert entry["times_ms"] == {"aten": 10.0, "weight_major": 5.0, "small_batch": 50.0}
    assert set(entry["rel_err"]) == {"weight_major", "small_batch"} and not entry["rejected"]
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
    real = fc._FORWARD["weight_major"]
    monkeypatch.setitem(fc._FORWARD, "weight_major", lambda *a: real(*a) * 1.01)
    with pytest.warns(RuntimeWarning, match="'weight_major' differs from F.linear"), \
            torch.no_grad():
        out = fc.linear(x, w)
    torch.testing.assert_close(out, F.linear(x, w))
    entry = fc.linear_plan()[0]
    assert entry["chosen"] == "aten" and entry["rejected"] == {"weight_major": "disagrees"}
    assert "weight_major" not in entry["times_ms"] and "small_batch" in entry["times_ms"]

    def boom(*a):
        raise RuntimeError("no kernel")

    fc.clear_linear_plan()
    monkeypatch.setitem(fc._FORWARD, "weight_major", boom)
    with pytest.warns(RuntimeWarning, match="raised on .*RuntimeError: no kernel"):
        torch.testing.assert_close(fc.linear(x, w), F.linear(x, w))
    assert fc.linear_plan()[0]["rejected"] == {"weight_major": "raised"}
    # Every candidate but F.linear left out: nothing is timed, and the plan says why.
    fc.clear_linear_plan()
    monkeypatch.setitem(fc._FORWARD, "small_batch", boom)
    with pytest.warns(RuntimeWarning, match="raised"):
        torch.testing.assert_close(fc.linear(x, w), F.linear(x, w))
    entry = fc.linear_plan()[0]
    assert entry["chosen"] == "aten" and entry["how"] == "raised" and entry["times_ms"] == {}


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
