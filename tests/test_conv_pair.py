"""st_conv3d_pair: the multires streams' twin convolutions, one grouped launch where measured
faster. On the CPU the grouped launch does not exist, so the choice is tested with an injected
one (right, wrong, raising) and injected timings; the real launch is a CUDA test."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from vidconv.models import build
from vidconv.ops import conv_planner, st_conv3d, st_conv3d_pair
from vidconv.ops import st_conv_pair as pair_mod

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def fresh_plan():
    pair_mod.clear_pair_plan()
    yield
    pair_mod.clear_pair_plan()


def _problem(seed: int, shape=(2, 8, 3, 9, 11), k=5, kernel=(1, 3, 3), dtype=torch.float32,
             bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype)
    w = (torch.randn((k, shape[1], *kernel), generator=g) * 0.2).to(dtype)
    b = torch.randn(k, generator=g).to(dtype) if bias else None
    return x, w, b


def _pair_args(dtype=torch.float32, bias=True, **kw):
    return (*_problem(1, dtype=dtype, bias=bias, **kw), *_problem(2, dtype=dtype, bias=bias, **kw))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_equals_two_st_conv3d_calls_forward_and_backward(dtype: torch.dtype, bias: bool) -> None:
    args = [t.requires_grad_(True) if t is not None else None
            for t in _pair_args(dtype, bias, shape=(3, 5, 4, 7, 6), kernel=(2, 3, 1))]
    y0, y1 = st_conv3d_pair(*args, stride=(1, 2, 1), padding=(1, 0, 1), activation="relu")
    r0 = st_conv3d(args[0], args[1], args[2], (1, 2, 1), (1, 0, 1), "relu")
    r1 = st_conv3d(args[3], args[4], args[5], (1, 2, 1), (1, 0, 1), "relu")
    assert torch.equal(y0, r0) and torch.equal(y1, r1)
    leaves = [t for t in args if t is not None]
    got = torch.autograd.grad((y0 * 1.5).sum() + y1.sum(), leaves)
    want = torch.autograd.grad((r0 * 1.5).sum() + r1.sum(), leaves)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_bad_pairs_are_named() -> None:
    x0, w0, b0, x1, w1, b1 = _pair_args()
    with pytest.raises(ValueError, match="x1 and weight1 must have x0's and weight0's shapes"):
        st_conv3d_pair(x0, w0, b0, x1[:1], w1, b1)
    with pytest.raises(ValueError, match="x1 must have x0's dtype and device"):
        st_conv3d_pair(x0, w0, b0, x1.double(), w1.double(), b1.double())
    with pytest.raises(ValueError, match="bias0 and bias1 must both be tensors or both be None"):
        st_conv3d_pair(x0, w0, b0, x1, w1, None)
    with pytest.raises(ValueError, match="weight must have x's 8 input channels"):
        st_conv3d_pair(x0, w0[:, :4], b0, x1, w1, b1)


def _inject_grouped(monkeypatch, *, wrong: bool = False, raises: bool = False,
                    faster: bool = True) -> list[int]:
    """A grouped launch on the CPU (the two calls, optionally off by a little or raising) and
    timings that make it clearly faster or slower; returns the list its calls append to."""
    calls: list[int] = []

    def grouped(x0, w0, b0, x1, w1, b1, stride, padding, relu):
        calls.append(1)
        if raises:
            raise RuntimeError("no grouped launch here")
        y0, y1 = pair_mod._separate(x0, w0, b0, x1, w1, b1, stride, padding, relu)
        return (y0 + 0.05 * y0.abs().max(), y1) if wrong else (y0, y1)

    monkeypatch.setattr(pair_mod, "grouped_applies", lambda *a: True)
    monkeypatch.setattr(pair_mod, "_grouped", grouped)
    real = conv_planner.time_candidate

    def timed(name, run, device, repeats):
        real(name, run, device, repeats)
        return [1.0 if (name == "fused") == faster else 2.0]

    monkeypatch.setattr(conv_planner, "time_candidate", timed)
    return calls


def test_the_grouped_launch_is_measured_once_and_used_where_faster(monkeypatch) -> None:
    calls = _inject_grouped(monkeypatch)
    args = _pair_args()
    st_conv3d_pair(*args)
    (entry,) = pair_mod.pair_plan()
    assert entry["fused"] and entry["how"] == "tuned" and entry["rel_err"] < 1e-6
    assert set(entry["times_ms"]) == {"fused", "aten"} and not entry["key"].grad
    before = len(calls)
    y0, y1 = st_conv3d_pair(*args)
    assert len(calls) == before + 1 and len(pair_mod.pair_plan()) == 1  # remembered, used
    assert torch.equal(y0, st_conv3d(*args[:3]))
    # Slower elsewhere: another shape keeps the two calls.
    monkeypatch.setattr(pair_mod, "_grouped", pair_mod._grouped)  # keep the injected one
    other = _pair_args(shape=(1, 8, 2, 6, 6))
    _inject_grouped(monkeypatch, faster=False)
    st_conv3d_pair(*other)
    assert [e["fused"] for e in pair_mod.pair_plan()] == [True, False]


def test_a_wrong_or_raising_grouped_launch_is_never_used(monkeypatch) -> None:
    calls = _inject_grouped(monkeypatch, wrong=True)
    args = _pair_args()
    with pytest.warns(RuntimeWarning, match="grouped launch differs from float32 ATen"):
        y0, _ = st_conv3d_pair(*args)
    assert torch.equal(y0, st_conv3d(*args[:3]))
    assert pair_mod.pair_plan()[0]["how"] == "disagrees"
    n = len(calls)
    st_conv3d_pair(*args)
    assert len(calls) == n  # not run again
    pair_mod.clear_pair_plan()
    _inject_grouped(monkeypatch, raises=True)
    with pytest.warns(RuntimeWarning, match="grouped launch cannot run .*no grouped launch"):
        y0, _ = st_conv3d_pair(*args)
    assert torch.equal(y0, st_conv3d(*args[:3]))
    assert pair_mod.pair_plan()[0]["how"] == "raised"


def test_knobs(monkeypatch) -> None:
    calls = _inject_grouped(monkeypatch, faster=False)
    args = _pair_args()
    monkeypatch.setenv("VIDCONV_CONV_PAIR", "fused")
    st_conv3d_pair(*args)
    assert len(calls) == 1 and pair_mod.pair_plan() == []  # used unmeasured
    for env, value in (("VIDCONV_CONV_PAIR", "aten"), ("VIDCONV_CONV_ALGO", "aten"),
                       ("VIDCONV_TUNE", "0")):
        monkeypatch.delenv("VIDCONV_CONV_PAIR")
        monkeypatch.setenv(env, value)
        st_conv3d_pair(*args)
        assert len(calls) == 1 and pair_mod.pair_plan() == [], env
        monkeypatch.delenv(env)
        monkeypatch.setenv("VIDCONV_CONV_PAIR", "fused")
    monkeypatch.delenv("VIDCONV_CONV_PAIR")
    monkeypatch.setattr(conv_planner, "_distributed", lambda: True)
    st_conv3d_pair(*args)
    assert len(calls) == 1 and pair_mod.pair_plan() == []  # ranks keep the two calls
    monkeypatch.setenv("VIDCONV_CONV_PAIR", "bogus")
    with pytest.raises(ValueError, match="VIDCONV_CONV_PAIR must be one of auto, fused, aten"):
        st_conv3d_pair(*args)


def test_compile_fullgraph_runs_the_two_calls(monkeypatch) -> None:
    calls = _inject_grouped(monkeypatch)
    args = _pair_args()
    fn = torch.compile(lambda *a: st_conv3d_pair(*a), fullgraph=True, backend="eager")
    y0, y1 = fn(*args)
    assert calls == [] and torch.equal(y1, st_conv3d(*args[3:]))


def _multires(seed: int = 0):
    torch.manual_seed(seed)
    model = build("slow_fusion", num_classes=4, multires=True, width=0.1).eval()
    g = torch.Generator().manual_seed(seed)
    fovea = torch.randn(2, 3, 10, 89, 89, generator=g)
    context = torch.randn(2, 3, 10, 89, 89, generator=g)
    return model, (fovea, context)


def test_multires_models_run_their_twin_stages_as_pairs(monkeypatch) -> None:
    model, x = _multires()
    monkeypatch.setenv("VIDCONV_CONV_PAIR", "aten")
    with torch.no_grad():
        expected = model(x)
        towers = [model.towers[s](t) for s, t in zip(("fovea", "context"), x, strict=True)]
    monkeypatch.delenv("VIDCONV_CONV_PAIR")
    calls = _inject_grouped(monkeypatch)
    with torch.no_grad():
        got = model(x)
    assert torch.equal(got, expected)
    assert len(pair_mod.pair_plan()) == len(model.layers)  # each stage measured once
    before = len(calls)
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    assert len(calls) == before + len(model.layers)  # then every stage runs grouped
    assert {e["key"].x_shape[1] for e in pair_mod.pair_plan()} == \
        {3, *(layer.channels for layer in model.layers[:-1])}
    # A hook on one stream's stage makes that stage run as modules (the hook sees its call).
    seen = []
    model.towers["context"].conv2.conv.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    assert len(seen) == 1 and seen[0].shape[1] == model.layers[1].channels
    assert len(towers) == 2


def test_training_through_pairs_gives_the_same_gradients(monkeypatch) -> None:
    model, x = _multires(1)
    model.train()
    monkeypatch.setenv("VIDCONV_CONV_PAIR", "aten")
    torch.manual_seed(5)
    loss = F.cross_entropy(model(x), torch.tensor([1, 3]))
    expected = torch.autograd.grad(loss, list(model.parameters()))
    monkeypatch.setenv("VIDCONV_CONV_PAIR", "fused")
    calls = _inject_grouped(monkeypatch)
    torch.manual_seed(5)
    loss = F.cross_entropy(model(x), torch.tensor([1, 3]))
    got = torch.autograd.grad(loss, list(model.parameters()))
    assert len(calls) == len(model.layers)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)


def test_the_grouped_ops_backward_is_each_streams_st_conv3d_backward() -> None:
    """The autograd formula registered for the CUDA-only grouped op, run on CPU tensors."""
    x0, w0, b0, x1, w1, b1 = _pair_args(shape=(2, 8, 3, 7, 7))
    stride, padding = [1, 1, 1], [0, 1, 1]
    leaves = [t.clone().requires_grad_(True) for t in (x0, w0, b0, x1, w1, b1)]
    outs = [st_conv3d(*leaves[:3], stride, padding, "relu"),
            st_conv3d(*leaves[3:], stride, padding, "relu")]
    g0, g1 = torch.randn_like(outs[0]), torch.randn_like(outs[1])
    want = torch.autograd.grad(outs, leaves, [g0, g1])
    ctx = SimpleNamespace(needs_input_grad=(True,) * 6 + (False,) * 4)
    ctx.save_for_backward = lambda *t: setattr(ctx, "saved_tensors", t)
    pair_mod._setup_context(ctx, (x0, w0, b0, x1, w1, b1, stride, padding, True, 0),
                            (outs[0].detach(), outs[1].detach()))
    got = pair_mod._backward(ctx, g0, g1)
    assert got[6:] == (None,) * 4
    for a, b in zip(got[:6], want, strict=True):
        assert torch.equal(a, b)
    ctx.needs_input_grad = (False, True, False, True, False, False) + (False,) * 4
    got = pair_mod._backward(ctx, g0, None)
    assert got[0] is None and torch.equal(got[1], want[1]) and got[3:6] == (None,) * 3


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_grouped_launch_is_a_measured_candidate(dtype: torch.dtype) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    shape, kernel = (32, 256, 1, 13, 13), (1, 3, 3)
    args = [t.cuda().contiguous(memory_format=torch.channels_last_3d) if t.dim() == 5 else t.cuda()
            for t in _pair_args(dtype, shape=shape, k=384, kernel=kernel)]
    if not pair_mod.grouped_applies(args[0], args[1], (1, 1, 1), (0, 1, 1)):
        pytest.skip("no sm_90a grouped launch on this device / build")
    y0, y1 = st_conv3d_pair(*args, stride=1, padding=(0, 1, 1))
    (entry,) = pair_mod.pair_plan()
    assert entry["how"] in ("tuned", "noisy") and entry["rel_err"] < 0.02
    r0 = st_conv3d(*args[:3], 1, (0, 1, 1))
    assert (y0.float() - r0.float()).abs().max() <= 0.02 * r0.float().abs().max()
    g0, g1 = pair_mod._grouped(*args, [1, 1, 1], [0, 1, 1], True)
    leaves = [t.clone().requires_grad_(True) for t in args]
    outs = pair_mod._grouped(*leaves, [1, 1, 1], [0, 1, 1], True)
    grads = torch.autograd.grad([outs[0].sum(), outs[1].sum()], leaves)
    ref_leaves = [t.clone().requires_grad_(True) for t in args]
    ref = [st_conv3d(*ref_leaves[:3], 1, (0, 1, 1)), st_conv3d(*ref_leaves[3:], 1, (0, 1, 1))]
    ref_grads = torch.autograd.grad([ref[0].sum(), ref[1].sum()], ref_leaves)
    for a, b in zip(grads, ref_grads, strict=True):
        assert (a.float() - b.float()).abs().max() <= 0.05 * b.float().abs().max() + 1e-3
    assert torch.equal(g1, outs[1].detach())


def test_measuring_inside_activation_checkpointing_does_not_hang(monkeypatch) -> None:
    import threading

    from torch.utils.checkpoint import checkpoint

    _inject_grouped(monkeypatch)
    args = [t.requires_grad_(True) for t in _pair_args()]

    def step():
        y0, y1 = checkpoint(lambda *a: st_conv3d_pair(*a), *args, use_reentrant=False)
        (y0.sum() + y1.sum()).backward()
        return True

    done: list[bool] = []
    worker = threading.Thread(target=lambda: done.append(step()), daemon=True)
    worker.start()
    worker.join(60)
    assert done == [True], "the measurement waited for itself under checkpointing"
    assert pair_mod.pair_plan()[0]["key"].grad


def test_the_yardstick_stays_float32_under_autocast(monkeypatch) -> None:
    _inject_grouped(monkeypatch)
    args = _pair_args(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        st_conv3d_pair(*args)
    # The grouped launch (here: the same bf16 convolutions) is off float32 by bf16 rounding;
    # measured against an autocast (bf16) reference it would be off by exactly nothing.
    assert 0 < pair_mod.pair_plan()[0]["rel_err"] < 0.02


def test_conv_pair_runs_the_modules_where_it_must(monkeypatch) -> None:
    from vidconv.nn import SpatioTemporalConv
    from vidconv.nn.conv import conv_pair

    calls = _inject_grouped(monkeypatch)
    monkeypatch.setenv("VIDCONV_CONV_PAIR", "fused")
    torch.manual_seed(0)
    a, b = SpatioTemporalConv(4, 6, 3, padding=1, relu=True), \
        SpatioTemporalConv(4, 6, 3, padding=1, relu=True)
    x0, x1 = torch.randn(2, 4, 3, 5, 5), torch.randn(2, 4, 3, 5, 5)
    y0, y1 = conv_pair(a, b, x0, x1)
    assert len(calls) == 1 and torch.equal(y0, a(x0)) and torch.equal(y1, b(x1))

    class Doubled(SpatioTemporalConv):
        def forward(self, x):
            return 2 * super().forward(x)

    d = Doubled(4, 6, 3, padding=1, relu=True)
    d.load_state_dict(b.state_dict())
    assert torch.equal(conv_pair(a, d, x0, x1)[1], d(x1))  # its own forward
    seen = []
    handle = b.register_full_backward_hook(lambda m, gi, go: seen.append(1))
    x1g = x1.clone().requires_grad_(True)
    conv_pair(a, b, x0, x1g)[1].sum().backward()
    assert seen == [1]  # the module was called, so its backward hook ran
    handle.remove()
    other = SpatioTemporalConv(4, 6, 3, padding=0, relu=True)
    assert conv_pair(a, other, x0, x1)[1].shape == other(x1).shape  # configs differ
    assert conv_pair(a, b, x0, x1.to("meta"))[1].device.type == "meta"  # devices differ
    assert len(calls) == 1


def test_twin_towers_leave_wrapped_towers_alone(monkeypatch) -> None:
    from vidconv.models.tower import twin_towers

    model, x = _multires(2)
    calls = _inject_grouped(monkeypatch)
    monkeypatch.setenv("VIDCONV_CONV_PAIR", "fused")
    fovea, context = model.towers["fovea"], model.towers["context"]
    with torch.no_grad():
        expected = (fovea(x[0]), context(x[1]))
        calls.clear()
        wrapped = torch.nn.Sequential(context)
        wrapped.layer_names = context.layer_names  # looks like a tower, is not one
        got = twin_towers(fovea, wrapped, *x)
    assert calls == [] and torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
