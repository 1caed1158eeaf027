"""st_conv3d's per-layer algorithm choice (vidconv.ops.conv_planner): timing, checking, cache,
knobs, compile, torch.distributed, and that whatever runs equals the reference.

Timings are injected where a test asserts which candidate wins (real timings on a shared CPU
are noise); conftest gives every test its own empty cache directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import vidconv
from vidconv.ops import clear_conv_plan, conv_algos, conv_plan, conv_planner, st_conv3d
from vidconv.reference import st_conv3d_reference

ROOT = Path(__file__).resolve().parents[1]
# One intra-op thread: on 2 shared cores, tiny convolutions otherwise spend most of their time
# waking threads.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def fresh_plan(tmp_path_factory, monkeypatch) -> Path:
    """An empty plan, in memory and on disk, for every test here: the cache directory."""
    cache = tmp_path_factory.mktemp("conv-plan")
    monkeypatch.setenv("VIDCONV_CACHE_DIR", str(cache))
    clear_conv_plan()
    yield cache
    clear_conv_plan()

# A temporal-extent-1 layer (every 2D reformulation applies) and a kt = st = 2 one (stacking).
FRAMES_LAYER = dict(c=5, k=7, ksize=(1, 3, 3), stride=(1, 1, 2), padding=(0, 1, 1), thw=(3, 7, 8))
STACKED_LAYER = dict(c=4, k=6, ksize=(2, 3, 3), stride=(2, 1, 1), padding=(0, 1, 0),
                     thw=(4, 6, 5))


def _inputs(c, k, ksize, thw, *, n=2, device="cpu", dtype=torch.float32, seed=0, **_):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, *thw, generator=gen)
    w = torch.randn(k, c, *ksize, generator=gen) / (c * ksize[0] * ksize[1] * ksize[2]) ** 0.5
    b = torch.randn(k, generator=gen) * 0.5 + 0.5
    return [t.to(device=device, dtype=dtype) for t in (x, w, b)]


def _run(layer, *, device="cpu", dtype=torch.float32, backward=True, seed=0, x_format=None):
    """st_conv3d forward (and backward) on `layer`: (out, grads) and the float64 reference's."""
    x, w, b = _inputs(**layer, device=device, dtype=dtype, seed=seed)
    if x_format is not None:
        x = x.contiguous(memory_format=x_format)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    out = st_conv3d(*leaves, layer["stride"], layer["padding"])
    ref = st_conv3d_reference(x, w, b, layer["stride"], layer["padding"])
    if not backward:
        return out, ref, None, None
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1))
    got = torch.autograd.grad(out, leaves, grad.to(device=device, dtype=dtype))
    ref_leaves = [t.detach().double().cpu().requires_grad_() for t in (x, w, b)]
    conv = F.conv3d(*ref_leaves, stride=layer["stride"], padding=layer["padding"])
    # The mask of our own output: values within rounding of 0 may fall on either side.
    masked = conv * (out.detach().cpu() > 0).double()
    want = torch.autograd.grad(masked, ref_leaves, grad.double())
    return out, ref, got, want


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    b = b.double().cpu()
    scale = b.abs().max().item()
    assert scale > 0, "an all-zero reference proves nothing"
    return ((a.double().cpu() - b).abs().max() / scale).item()


TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def _assert_matches(out, ref, got, want, dtype):
    assert _rel(out, ref) < TOL[dtype]
    if got is not None:
        for g, r in zip(got, want, strict=True):
            assert _rel(g, r) < TOL[dtype]


def _inject(monkeypatch, times_ms: dict[str, float], calls: list | None = None):
    """Every candidate's timed runs report times_ms[name] (default 50 ms)."""
    def fake(name, run, device, repeats):
        run()
        if calls is not None:
            calls.append(name)
        return [times_ms.get(name, 50.0)] * repeats

    monkeypatch.setattr(conv_planner, "time_candidate", fake)


def _decision(direction: str, **match) -> dict:
    found = [d for d in conv_plan() if d["key"]["direction"] == direction
             and all(d["key"][k] == v for k, v in match.items())]
    assert len(found) == 1, conv_plan()
    return found[0]


# ---- choosing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fastest", ["conv2d_frames_cl", "conv3d_cl", "aten"])
def test_injected_timings_pick_the_fastest(device, monkeypatch, fastest):
    _inject(monkeypatch, {fastest: 1.0, "conv2d_frames_nchw": 3.0})
    out, ref, got, want = _run(FRAMES_LAYER, device=device)
    _assert_matches(out, ref, got, want, torch.float32)
    for direction in conv_algos.DIRECTIONS:
        d = _decision(direction)
        assert d["chosen"] == fastest and d["how"] == "tuned" and not d["from_cache"]
        # Every applicable candidate was run, checked and timed.
        assert {"aten", "conv3d_cl", "conv2d_frames_nchw", "conv2d_frames_cl"} <= set(d["passed"])
        assert all(d["passed"].values()), d["errors"]
        assert d["times_ms"][fastest] == 1.0 and d["times_ms"]["conv2d_frames_nchw"] == 3.0


@pytest.mark.parametrize("speedup, chosen", [(1.05, "aten"), (1.25, "conv3d_cl")])
def test_reference_kept_unless_beaten_beyond_the_noise(monkeypatch, speedup, chosen):
    # 5% faster is within the CPU's timing noise (and one op's time misses its cost around
    # it): the reference stays; 25% faster replaces it.
    _inject(monkeypatch, {"aten": 10.0, "conv3d_cl": 10.0 / speedup})
    _run(FRAMES_LAYER, device="cpu")
    for direction in conv_algos.DIRECTIONS:
        d = _decision(direction)
        assert d["chosen"] == chosen, (direction, d["times_ms"])


def _inject_sequence(monkeypatch, samples: dict[str, list[float]], calls: list) -> None:
    """Each candidate's timed runs report its next sample (the last one once they run out)."""
    used: dict[str, int] = {}

    def fake(name, run, device, repeats):
        run()
        out = []
        for _ in range(repeats):
            seq = samples.get(name, [50.0])
            out.append(seq[min(used.get(name, 0), len(seq) - 1)])
            used[name] = used.get(name, 0) + 1
            calls.append(name)
        return out

    monkeypatch.setattr(conv_planner, "time_candidate", fake)


def test_close_candidates_are_timed_in_turn_and_the_best_cpu_run_decides(monkeypatch):
    calls: list[str] = []
    # conv3d_cl's median (10) ties with the reference's, its best run (7.5) wins by > 10%:
    # on the CPU other processes only ever add time, so the best run is the algorithm's own.
    _inject_sequence(monkeypatch, {"aten": [10.0, 10.0, 10.5], "conv3d_cl": [10.0, 7.5, 10.5],
                                   "conv2d_frames_cl": [30.0], "conv2d_frames_nchw": [30.0]},
                     calls)
    _run(FRAMES_LAYER, device="cpu", backward=False)
    d = _decision("forward")
    assert d["chosen"] == "conv3d_cl" and d["times_ms"]["conv3d_cl"] == 7.5, d["times_ms"]
    # Round 2 alternates between the close candidates run by run; the far ones ran once.
    second = calls[len(d["passed"]):]
    assert second == ["aten", "conv3d_cl"] * (conv_planner._CPU_REPEATS - 1), calls
    assert calls.count("conv2d_frames_cl") == 1


def test_uneven_timings_keep_the_reference_for_this_process_only(fresh_plan, monkeypatch):
    calls: list[str] = []
    # A busy machine: the reference's warm runs differ 3x; a candidate "wins" by luck.
    _inject_sequence(monkeypatch, {"aten": [10.0, 30.0, 10.0], "conv3d_cl": [5.0, 5.0, 5.0]},
                     calls)
    with pytest.warns(RuntimeWarning, match="varied 3.0x between runs"):
        _run(FRAMES_LAYER, device="cpu", backward=False)
    d = _decision("forward")
    assert d["chosen"] == "aten" and d["how"] == "noisy", d
    n_calls = len(calls)
    _run(FRAMES_LAYER, device="cpu", backward=False, seed=2)  # same key: decided for now
    assert len(calls) == n_calls
    assert not (fresh_plan / "conv_plan.json").exists()  # nothing remembered for good
    clear_conv_plan()  # a later process, on a quiet machine, decides again
    _inject(monkeypatch, {"aten": 10.0, "conv3d_cl": 5.0})
    _run(FRAMES_LAYER, device="cpu", backward=False)
    assert _decision("forward")["chosen"] == "conv3d_cl"
    assert (fresh_plan / "conv_plan.json").exists()


def test_all_zero_reference_proves_nothing_so_the_reference_stays(monkeypatch, tmp_path):
    # Every ReLU dead on the first call: any candidate that also returns zeros would "agree".
    monkeypatch.setenv("VIDCONV_CACHE_DIR", str(tmp_path))
    _inject(monkeypatch, {"aten": 10.0, "conv3d_cl": 1.0})
    x = torch.rand(2, 5, 3, 7, 8)
    w = -torch.rand(7, 5, 1, 3, 3)
    out = st_conv3d(x, w, None, 1, 0)
    assert not out.any()
    (d,) = conv_plan()
    assert d["chosen"] == "aten" and d["how"] == "unchecked"
    assert not (tmp_path / "conv_plan.json").exists()  # decided again in the next process


def test_candidates_follow_the_layer_shape():
    def names(**kw):
        p = conv_algos.Problem("cpu", torch.float32, "contiguous", "contiguous", 1, 3, 10, 9, 9,
                               4, (1, 3, 3), (1, 1, 1), (0, 0, 0))
        p = replace(p, **kw)
        # Forward candidates (the input-gradient-only reformulations: test_conv_reformulations).
        return {a.name for a in conv_algos.ALGORITHMS.values()
                if a.forward is not None and a.applies(p)}

    assert names() == {"aten", "conv3d_cl", "conv2d_frames_nchw", "conv2d_frames_cl"}
    # Temporal padding or extent 2 with stride 1 (windows overlap): no 2D reformulation.
    assert names(padding=(1, 0, 0)) == {"aten", "conv3d_cl"}
    assert names(kernel=(2, 3, 3)) == {"aten", "conv3d_cl"}
    assert names(kernel=(2, 3, 3), stride=(2, 1, 1)) >= {"conv2d_stacked_nchw",
                                                          "conv2d_stacked_cl"}
    assert names(kernel=(10, 3, 3)) >= {"conv2d_stacked_cl"}  # one output frame (early fusion)
    # Already channels_last_3d: the reference is conv3d_cl, which is then not timed twice.
    assert "conv3d_cl" not in names(x_format="channels_last_3d", w_format="channels_last_3d")
    # On the CPU a channels_last_3d x is not turned into NC(D)HW; on CUDA it may be.
    assert names(x_format="channels_last_3d") == {"aten", "conv3d_cl", "conv2d_frames_cl"}
    assert names(x_format="channels_last_3d", device_type="cuda") >= {
        "conv3d_ncdhw", "conv2d_frames_nchw", "conv2d_frames_cl"}
    assert not any(n.startswith("fused_") for n in names())


def _broken(name: str, direction: str, how: str) -> conv_algos.Algorithm:
    algo = conv_algos.ALGORITHMS[name]
    inner = algo.runs(direction)

    def wrong(*args):
        out = inner(*args)
        if how == "raise":
            raise RuntimeError("injected failure")
        if how == "layout":
            return out.contiguous() if not out.is_contiguous() else out.transpose(-1, -2) \
                .contiguous().transpose(-1, -2)
        # Off by less than a percent in one element: small, but far beyond rounding.
        out = out.clone()
        out.view(-1)[out.numel() // 2] += 0.005 * out.abs().max()
        return out

    return replace(algo, **{direction: wrong})


@pytest.mark.parametrize("direction", list(conv_algos.DIRECTIONS))
@pytest.mark.parametrize("how", ["wrong", "raise", "layout"])
def test_bad_candidate_is_rejected_and_reported_once(device, monkeypatch, direction, how):
    name = "conv2d_frames_cl"
    monkeypatch.setitem(conv_algos.ALGORITHMS, name, _broken(name, direction, how))
    _inject(monkeypatch, {name: 0.5})  # it would win if it were right
    with pytest.warns(RuntimeWarning) as record:
        out, ref, got, want = _run(FRAMES_LAYER, device=device)
        _run(FRAMES_LAYER, device=device, seed=1)  # the same key again: no second warning
    _assert_matches(out, ref, got, want, torch.float32)
    ours = [str(w.message) for w in record if name in str(w.message)]
    assert len(ours) == 1, ours
    assert direction in ours[0] and "(2, 5, 3, 7, 8)" in ours[0]  # names the layer
    d = _decision(direction)
    assert d["chosen"] != name and d["passed"][name] is False
    assert d["times_ms"][name] is None
    assert {"wrong": "differs from the reference", "raise": "raised RuntimeError",
            "layout": "strides"}[how] in d["errors"][name]


def test_reference_is_always_a_candidate_even_when_alone(monkeypatch):
    # A layer with temporal padding: only the reference and the other 3D layout apply.
    layer = dict(FRAMES_LAYER, ksize=(3, 3, 3), padding=(1, 1, 1))
    monkeypatch.setitem(conv_algos.ALGORITHMS, "conv3d_cl",
                        _broken("conv3d_cl", "forward", "raise"))
    with pytest.warns(RuntimeWarning, match="conv3d_cl"):
        out, ref, _, _ = _run(layer, backward=False)
    assert _rel(out, ref) < 1e-5
    assert _decision("forward")["chosen"] == "aten"


# ---- the cache file ---------------------------------------------------------------------------


def test_cache_round_trip(fresh_plan, monkeypatch):
    _inject(monkeypatch, {"conv2d_frames_nchw": 2.0})
    _run(FRAMES_LAYER)
    path = fresh_plan / "conv_plan.json"
    data = json.loads(path.read_text())
    assert data["format"] == "vidconv-conv-plan"
    (env,) = data["environments"]
    assert f"vidconv={vidconv.__version__}" in env and f"torch={torch.__version__}" in env
    assert len(data["environments"][env]) == 3  # forward, input grad, weight grad
    first = {d["key"]["direction"]: d["chosen"] for d in conv_plan()}

    clear_conv_plan()  # a new process, as far as the plan knows

    def no_timing(*args):
        raise AssertionError("a cached decision must not be timed again")

    monkeypatch.setattr(conv_planner, "time_candidate", no_timing)
    out, ref, got, want = _run(FRAMES_LAYER, seed=3)
    _assert_matches(out, ref, got, want, torch.float32)
    assert all(d["from_cache"] for d in conv_plan())
    assert {d["key"]["direction"]: d["chosen"] for d in conv_plan()} == first == {
        d: "conv2d_frames_nchw" for d in conv_algos.DIRECTIONS}
    assert list(fresh_plan.glob("*.tmp")) == []  # no temporary file left behind

    clear_conv_plan(cache_file=True)
    assert not path.exists()


def test_other_environment_is_not_used(fresh_plan, monkeypatch):
    _inject(monkeypatch, {"conv3d_cl": 1.0})
    _run(FRAMES_LAYER, backward=False)
    clear_conv_plan()
    monkeypatch.setattr(conv_planner, "environment", lambda: "torch=0.0;vidconv=other")
    _inject(monkeypatch, {"conv2d_frames_cl": 1.0})
    _run(FRAMES_LAYER, backward=False)
    d = _decision("forward")
    assert not d["from_cache"] and d["chosen"] == "conv2d_frames_cl"
    # Both environments' entries are kept (merged, not clobbered).
    data = json.loads((fresh_plan / "conv_plan.json").read_text())
    assert len(data["environments"]) == 2


@pytest.mark.parametrize("content", [
    "{not json",
    "truncated",
    json.dumps([1, 2, 3]),
    json.dumps({"format": "someone-else", "entries": {}}),
    json.dumps({"format": "vidconv-conv-plan", "version": 999, "environments": {}}),
], ids=["corrupt", "truncated", "list", "foreign", "future-version"])
def test_bad_cache_file_warns_once_and_is_rewritten(fresh_plan, monkeypatch, content):
    path = fresh_plan / "conv_plan.json"
    if content == "truncated":
        _inject(monkeypatch, {})
        _run(FRAMES_LAYER, backward=False)
        full = path.read_text()
        content = full[: len(full) // 2]
        clear_conv_plan()
    path.write_text(content)
    _inject(monkeypatch, {"conv3d_cl": 1.0})
    with pytest.warns(RuntimeWarning, match="conv_plan.json") as record:
        out, ref, got, want = _run(FRAMES_LAYER)
    _assert_matches(out, ref, got, want, torch.float32)
    assert len([w for w in record if "conv_plan.json" in str(w.message)]) == 1
    data = json.loads(path.read_text())
    assert data["format"] == "vidconv-conv-plan" and data["version"] == 1
    (entries,) = data["environments"].values()
    assert len(entries) == 3


def test_unwritable_cache_dir_warns_and_keeps_working(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache directory should be")
    monkeypatch.setenv("VIDCONV_CACHE_DIR", str(blocker / "sub"))
    _inject(monkeypatch, {"conv3d_cl": 1.0})
    with pytest.warns(RuntimeWarning, match="cannot write the conv plan cache"):
        out, ref, _, _ = _run(FRAMES_LAYER, backward=False)
    assert _rel(out, ref) < 1e-5
    assert _decision("forward")["chosen"] == "conv3d_cl"


_WRITER = """
import os, sys
from vidconv.ops import conv_planner
tag = sys.argv[1]
for i in range(int(sys.argv[2])):
    conv_planner.store_entries({f"{tag}-{i}": {"chosen": "aten", "i": i}})
"""


def test_two_processes_writing_at_once_lose_nothing(fresh_plan, tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    env = dict(os.environ, PYTHONPATH=str(ROOT), VIDCONV_CACHE_DIR=str(fresh_plan))
    procs = [subprocess.Popen([sys.executable, str(script), tag, "40"], env=env,
                              stderr=subprocess.PIPE, text=True) for tag in ("a", "b")]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    data = json.loads((fresh_plan / "conv_plan.json").read_text())
    (entries,) = data["environments"].values()
    assert set(entries) == {f"{t}-{i}" for t in "ab" for i in range(40)}


# ---- knobs ------------------------------------------------------------------------------------


def test_algo_aten_runs_the_reference_without_timing(monkeypatch):
    calls: list[str] = []
    _inject(monkeypatch, {}, calls)
    monkeypatch.setenv("VIDCONV_CONV_ALGO", "aten")
    out, ref, got, want = _run(STACKED_LAYER)
    _assert_matches(out, ref, got, want, torch.float32)
    assert calls == [] and conv_plan() == []


def test_algo_named_candidate_is_used_where_it_applies(monkeypatch):
    calls: list[str] = []
    _inject(monkeypatch, {}, calls)
    monkeypatch.setenv("VIDCONV_CONV_ALGO", "conv2d_frames_cl")
    out, ref, got, want = _run(FRAMES_LAYER)
    _assert_matches(out, ref, got, want, torch.float32)
    assert calls == []
    assert all(d["chosen"] == "conv2d_frames_cl" and d["how"] == "forced" for d in conv_plan())
    # Where it does not apply (kt = 2): the reference, and one warning saying so.
    with pytest.warns(RuntimeWarning, match="does not apply"):
        _run(STACKED_LAYER, backward=False)
    assert _decision("forward", kernel=(2, 3, 3))["chosen"] == "aten"
    # Back to auto: the forced decisions are not taken for tuned ones.
    monkeypatch.setenv("VIDCONV_CONV_ALGO", "auto")
    _inject(monkeypatch, {"conv3d_cl": 1.0}, calls)
    _run(FRAMES_LAYER, backward=False)
    d = _decision("forward", kernel=(1, 3, 3))
    assert d["how"] == "tuned" and d["chosen"] == "conv3d_cl"


def test_algo_fused_without_the_kernel_runs_the_reference(monkeypatch):
    monkeypatch.setenv("VIDCONV_CONV_ALGO", "fused")
    out, ref, got, want = _run(FRAMES_LAYER)  # CPU: the fused kernel is CUDA only
    _assert_matches(out, ref, got, want, torch.float32)


@pytest.mark.parametrize(("var", "value", "match"), [
    ("VIDCONV_CONV_ALGO", "cudnn_magic", r"VIDCONV_CONV_ALGO must be one of auto, aten, fused"),
    ("VIDCONV_TUNE", "maybe", r"VIDCONV_TUNE must be 0 or 1, got 'maybe'"),
])
def test_bad_knob_value_is_a_clear_error(monkeypatch, var, value, match):
    monkeypatch.setenv(var, value)
    x, w, b = _inputs(**FRAMES_LAYER)
    with pytest.raises(ValueError, match=match) as info:
        st_conv3d(x, w, b, FRAMES_LAYER["stride"], FRAMES_LAYER["padding"])
    if var == "VIDCONV_CONV_ALGO":
        assert "conv2d_frames_cl" in str(info.value) and "'cudnn_magic'" in str(info.value)


def test_use_conv_algo_overrides_the_environment_and_checks_the_name(monkeypatch):
    monkeypatch.setenv("VIDCONV_CONV_ALGO", "conv3d_cl")
    with vidconv.ops.use_conv_algo("aten"):
        _run(FRAMES_LAYER, backward=False)
    assert conv_plan() == []
    with pytest.raises(ValueError, match="VIDCONV_CONV_ALGO must be"), \
            vidconv.ops.use_conv_algo("nope"):
        pass
    assert conv_planner._mode() == "conv3d_cl"


def test_tune_0_uses_the_fixed_choice_without_timing(monkeypatch):
    calls: list[str] = []
    _inject(monkeypatch, {}, calls)
    monkeypatch.setenv("VIDCONV_TUNE", "0")
    out, ref, got, want = _run(FRAMES_LAYER)
    _assert_matches(out, ref, got, want, torch.float32)
    assert calls == []
    assert [d["how"] for d in conv_plan()] == ["heuristic"] * 3
    assert all(d["chosen"] == "aten" for d in conv_plan())


# ---- compile ----------------------------------------------------------------------------------


def test_compile_fullgraph_with_auto(device, monkeypatch):
    torch._dynamo.reset()
    _inject(monkeypatch, {"conv2d_frames_cl": 1.0})
    x, w, b = _inputs(**FRAMES_LAYER, device=device)
    x.requires_grad_()
    w.requires_grad_()

    def f(x_, w_, b_):
        return st_conv3d(x_, w_, b_, FRAMES_LAYER["stride"], FRAMES_LAYER["padding"]).sum()

    backend = "inductor" if device == "cuda" else "aot_eager"
    compiled = torch.compile(f, fullgraph=True, backend=backend)
    got = compiled(x, w, b)
    gx, gw = torch.autograd.grad(got, (x, w))
    want = f(x, w, b)
    wx, ww = torch.autograd.grad(want, (x, w))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gx, wx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, ww, rtol=1e-5, atol=1e-5)
    assert {d["key"]["direction"]: d["chosen"] for d in conv_plan()} == {
        d: "conv2d_frames_cl" for d in conv_algos.DIRECTIONS}


# ---- whatever is chosen equals the reference ----------------------------------------------------


def _paper_layers(width: float = 0.125) -> list[dict]:
    """Every conv layer shape of every architecture, full resolution and multires, at a small
    width (so C and K are small) and batch 1: captured from the models' own layer tables."""
    from vidconv.models import conv_layer_shapes

    shapes: dict[tuple, dict] = {}
    for layer in conv_layer_shapes(width).values():
        layer = dict(n=1, **layer)
        shapes.setdefault(tuple(sorted(layer.items())), layer)
    return list(shapes.values())


PAPER_LAYERS = _paper_layers()


def test_paper_layer_table_is_complete():
    kernels = {layer["ksize"] for layer in PAPER_LAYERS}
    # single frame, early fusion (T=10 at once), slow fusion (4/2/2), and the shared 3x3 layers
    assert {(1, 11, 11), (10, 11, 11), (4, 11, 11), (2, 5, 5), (2, 3, 3), (1, 3, 3)} <= kernels
    sizes = {layer["thw"][1] for layer in PAPER_LAYERS if layer["ksize"][1] == 11}
    assert sizes == {170, 89}  # full resolution and the multires streams


def _every_candidate(layer, device, dtype, x_format=torch.contiguous_format):
    x, w, _ = _inputs(**layer, device=device, dtype=dtype)
    x = x.contiguous(memory_format=x_format)
    key = conv_planner.make_key("forward", x, w, True, layer["stride"], layer["padding"], True)
    return [a.name for a in conv_planner.candidates_for(key, x.device.type, dtype)]


@pytest.mark.parametrize("layer", PAPER_LAYERS,
                         ids=[f"{la['ksize']}-{la['thw']}-{la['c']}" for la in PAPER_LAYERS])
def test_every_candidate_matches_reference_on_paper_layers(device, layer, monkeypatch):
    dtype = torch.float32
    if device == "cuda":
        torch.backends.cudnn.allow_tf32 = False
    for name in _every_candidate(layer, device, dtype):
        monkeypatch.setenv("VIDCONV_CONV_ALGO", name)
        out, ref, got, want = _run(layer, device=device, dtype=dtype)
        _assert_matches(out, ref, got, want, dtype)
    monkeypatch.setenv("VIDCONV_CONV_ALGO", "auto")
    _inject(monkeypatch, {})
    out, ref, got, want = _run(layer, device=device, dtype=dtype,
                               x_format=torch.channels_last_3d)
    _assert_matches(out, ref, got, want, dtype)
    assert all(all(d["passed"].values()) for d in conv_plan()), [d["errors"] for d in conv_plan()]


def _awkward(count: int, seed: int) -> list[dict]:
    import random

    rng = random.Random(seed)
    cases = []
    while len(cases) < count:
        kt = rng.choice([1, 1, 2, 3, 4])
        st = rng.choice([1, kt, kt, 2])
        pt = rng.choice([0, 0, 0, 1])
        kh, kw = rng.randint(1, 5), rng.randint(1, 5)
        to, ho, wo = rng.randint(1, 3), rng.randint(1, 5), rng.randint(1, 5)
        sh, sw = rng.randint(1, 3), rng.randint(1, 3)
        ph, pw = rng.randint(0, kh // 2), rng.randint(0, kw // 2)
        thw = (max(kt - 2 * pt, (to - 1) * st + kt - 2 * pt) + rng.randint(0, st - 1),
               (ho - 1) * sh + kh - 2 * ph, (wo - 1) * sw + kw - 2 * pw)
        if min(thw) < 1:
            continue
        cases.append(dict(c=rng.choice([1, 3, 5, 13]), k=rng.choice([1, 7, 13, 17]),
                          ksize=(kt, kh, kw), stride=(st, sh, sw), padding=(pt, ph, pw),
                          thw=thw))
    return cases


AWKWARD = _awkward(16, seed=5)


@pytest.mark.parametrize("layer", AWKWARD, ids=[f"{la['ksize']}-{la['stride']}-{la['thw']}"
                                                 for la in AWKWARD])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_candidate_matches_reference_on_awkward_shapes(device, layer, dtype, monkeypatch):
    if device == "cuda":
        torch.backends.cudnn.allow_tf32 = False
    for x_format in (torch.contiguous_format, torch.channels_last_3d):
        for name in ["auto", *_every_candidate(layer, device, dtype, x_format)]:
            monkeypatch.setenv("VIDCONV_CONV_ALGO", name)
            out, ref, got, want = _run(layer, device=device, dtype=dtype, x_format=x_format)
            _assert_matches(out, ref, got, want, dtype)
            # The documented layout, whichever candidate ran.
            expect = (torch.channels_last_3d if device == "cuda" or (
                x_format == torch.channels_last_3d and not out.is_contiguous())
                else torch.contiguous_format)
            assert out.is_contiguous(memory_format=expect)
            for g, like in zip(got, _inputs(**layer, dtype=dtype)[:2], strict=False):
                assert g.shape == like.shape


# ---- torch.distributed ------------------------------------------------------------------------

_DDP_RANK = """
import json, os, sys, warnings
import torch
import torch.distributed as dist
from vidconv.ops import conv_plan, conv_planner, st_conv3d

rank = int(os.environ["RANK"])
# Each rank's own measurement prefers another candidate: only the broadcast can make them agree.
fastest = ["conv2d_frames_cl", "conv3d_cl"][rank]
def fake(name, run, device, repeats):
    run()
    return [1.0 if name == fastest else 5.0] * repeats
conv_planner.time_candidate = fake
dist.init_process_group("gloo", init_method="env://")
x = torch.randn(2, 5, 3, 7, 8, requires_grad=True)
w = torch.randn(7, 5, 1, 3, 3, requires_grad=True)
out = st_conv3d(x, w, None, (1, 1, 2), (0, 1, 1))
out.sum().backward()
# A partial last batch on rank 1 only: a new key there, a known one on rank 0. No collective may
# start on one rank alone (it would hang, or pair with DDP's own all-reduce).
x2 = torch.randn(2 if rank == 0 else 1, 5, 3, 7, 8, requires_grad=True)
st_conv3d(x2, w, None, (1, 1, 2), (0, 1, 1)).sum().backward()
total = torch.ones(1)
dist.all_reduce(total)
assert total.item() == 2
dist.barrier()
print(json.dumps([[d["key"]["direction"], d["chosen"], d["how"], d["key"]["n"]]
                  for d in conv_plan()]))
dist.destroy_process_group()
"""


def test_ddp_ranks_use_rank0_choice(tmp_path):
    import socket

    script = tmp_path / "rank.py"
    script.write_text(_DDP_RANK)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        cache = tmp_path / f"cache{rank}"
        env = dict(os.environ, PYTHONPATH=str(ROOT), RANK=str(rank), WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), VIDCONV_CACHE_DIR=str(cache),
                   OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(script)], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    results = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    rank0, rank1 = results
    assert [c for _, c, _, n in rank0] == ["conv2d_frames_cl"] * 3  # batch 2 twice: one key each
    assert [c for _, c, _, n in rank1] == ["conv2d_frames_cl"] * 6  # not its own conv3d_cl
    assert sorted(n for *_, n in rank1) == [1, 1, 1, 2, 2, 2]
    assert {h for _, _, h, _ in rank0} == {"tuned"} and {h for _, _, h, _ in rank1} == {"rank0"}
    assert (tmp_path / "cache0" / "conv_plan.json").exists()
    assert not (tmp_path / "cache1" / "conv_plan.json").exists()  # only rank 0 writes


# ---- CUDA only ----------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_fused_tiles_are_candidates_and_correct(dtype, monkeypatch):
    torch.backends.cudnn.allow_tf32 = False
    tiles = conv_algos.fused_tile_configs()[str(dtype).removeprefix("torch.")]
    assert len(tiles) >= 2
    names = _every_candidate(STACKED_LAYER, "cuda", dtype)
    assert {f"fused_{t}" for t in tiles} <= set(names)
    for name in [f"fused_{t}" for t in tiles]:
        monkeypatch.setenv("VIDCONV_CONV_ALGO", name)
        out, ref, got, want = _run(STACKED_LAYER, device="cuda", dtype=dtype)
        assert out.is_contiguous(memory_format=torch.channels_last_3d)
        _assert_matches(out, ref, got, want, dtype)
    monkeypatch.setenv("VIDCONV_CONV_ALGO", "fused")
    _run(STACKED_LAYER, device="cuda", dtype=dtype, backward=False)
    assert _decision("forward")["chosen"].startswith("fused_")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_auto_is_never_the_slower_of_chosen_and_reference(dtype):
    # Real timings: the chosen candidate's median is the smallest measured, so never above the
    # reference's (what "never slower than cuDNN" means per key).
    out, ref, got, want = _run(dict(c=64, k=128, ksize=(1, 3, 3), stride=(1, 1, 1),
                                    padding=(0, 1, 1), thw=(4, 28, 28)), device="cuda",
                               dtype=dtype)
    _assert_matches(out, ref, got, want, dtype)
    for d in conv_plan():
        times = {n: t for n, t in d["times_ms"].items() if t is not None}
        assert d["chosen"] in times and times[d["chosen"]] <= times["aten"]


@pytest.mark.cuda
def test_cuda_graph_capture_after_first_call():
    x, w, b = _inputs(**FRAMES_LAYER, device="cuda", dtype=torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last_3d)
    eager = st_conv3d(x, w, b, FRAMES_LAYER["stride"], FRAMES_LAYER["padding"])  # tunes
    graph = torch.cuda.CUDAGraph()
    static_x = x.clone()
    with torch.cuda.graph(graph):
        captured = st_conv3d(static_x, w, b, FRAMES_LAYER["stride"], FRAMES_LAYER["padding"])
    static_x.copy_(x)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, eager)
    # A layer first met during capture: the fixed choice, nothing decided or synchronised.
    layer = STACKED_LAYER
    x2, w2, b2 = _inputs(**layer, device="cuda", dtype=torch.bfloat16)
    graph2 = torch.cuda.CUDAGraph()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.cuda.graph(graph2):
            out2 = st_conv3d(x2, w2, b2, layer["stride"], layer["padding"])
    graph2.replay()
    torch.cuda.synchronize()
    ref2 = st_conv3d_reference(x2, w2, b2, layer["stride"], layer["padding"],
                               compute_device="cuda")
    assert _rel(out2, ref2) < 2e-2
    assert not [d for d in conv_plan() if d["key"]["kernel"] == (2, 3, 3)]


def test_autocast_does_not_reach_inside_the_op(monkeypatch):
    # The float64 check must stay float64 and the output keep x's dtype (what the fake says).
    _inject(monkeypatch, {"conv3d_cl": 1.0})
    x, w, b = _inputs(**FRAMES_LAYER)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = st_conv3d(x, w, b, FRAMES_LAYER["stride"], FRAMES_LAYER["padding"])
    assert out.dtype == torch.float32
    ref = st_conv3d_reference(x, w, b, FRAMES_LAYER["stride"], FRAMES_LAYER["padding"])
    assert _rel(out, ref) < 1e-5
    d = _decision("forward")
    assert d["chosen"] == "conv3d_cl" and all(d["passed"].values())
    assert d["tolerance"] < 1e-4  # derived from a float32-vs-float64 drift, not bfloat16's


# ---- the Hopper (sm_90a) kernel -----------------------------------------------------------------


def _problem(dtype=torch.bfloat16, device_type="cuda", c=96, kernel=(2, 5, 5)):
    return conv_algos.Problem(device_type, dtype, "channels_last_3d", "contiguous", 2, c, 4, 27,
                              27, 256, kernel, (2, 1, 1), (0, 2, 2))


def _pretend_hopper_build(monkeypatch, archs=("8.0", "9.0a"), tile="128x128x64",
                          capability=(9, 0)):
    import vidconv._extension as ext

    monkeypatch.setattr(conv_algos, "fused_sm90_tile", lambda: tile)
    monkeypatch.setattr(ext, "build_info", lambda: ext.BuildInfo("13.0", archs, "13.0"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)


def test_sm90_kernel_is_a_candidate_only_on_hopper_builds_and_devices(monkeypatch):
    _pretend_hopper_build(monkeypatch)
    algo, *splits = conv_algos._fused_sm90_algorithms()
    assert algo.name == "fused_sm90_128x128x64" and algo.forward is not None
    assert [a.name for a in splits] == [f"fused_sm90_128x128x64_split{s}" for s in (2, 4, 8)]
    assert algo.input_grad is None and algo.weight_grad is None  # forward only
    assert algo.applies(_problem(torch.bfloat16)) and algo.applies(_problem(torch.float16))
    assert not algo.applies(_problem(torch.float32))
    assert not algo.applies(_problem(device_type="cpu"))
    assert not algo.applies(_problem(kernel=(1, 256, 1)))  # the tap table packs extents < 256
    assert not algo.applies(_problem(c=8 * 12537, kernel=(1, 1, 1)))  # tap table too large
    assert algo.applies(_problem(c=8 * 12536, kernel=(1, 1, 1)))
    for capability in [(8, 0), (8, 9), (10, 0)]:
        _pretend_hopper_build(monkeypatch, capability=capability)
        assert not conv_algos._fused_sm90_algorithms()[0].applies(_problem())
    # No sm_90a code in the extension, or no CUDA kernels at all: no candidate.
    _pretend_hopper_build(monkeypatch, archs=("8.0", "9.0"))
    assert conv_algos._fused_sm90_algorithms() == []
    _pretend_hopper_build(monkeypatch, archs=("8.0 9.0a+PTX",))
    assert len(conv_algos._fused_sm90_algorithms()) == 4
    _pretend_hopper_build(monkeypatch, tile=None)
    assert conv_algos._fused_sm90_algorithms() == []


def _layer_7x7(c):
    # a 7x7 -> 256-filter 3x3 layer (pad 1) at batch 32: 1568 positions, 13 x 2 = 26 tiles
    return conv_algos.Problem("cuda", torch.bfloat16, "channels_last_3d", "contiguous", 32, c, 1,
                              7, 7, 256, (1, 3, 3), (1, 1, 1), (0, 1, 1))


def test_sm90_split_k_candidates_only_where_tiles_leave_sms_idle(monkeypatch):
    # The split variants are offered where the 128x128 tiles are fewer than the SMs and every
    # slice keeps at least 4 of the 64-wide reduction tiles; the unsplit kernel everywhere.
    _pretend_hopper_build(monkeypatch)
    monkeypatch.setattr(conv_algos, "_sm_count", lambda: 132)
    algos = {a.name.removeprefix("fused_sm90_128x128x64"): a
             for a in conv_algos._fused_sm90_algorithms()}
    # 256 channels: 9 * 32 = 288 vectors = 36 reduction tiles
    small = _layer_7x7(256)
    assert conv_algos._sm90_tiles(small) == (26, 36)
    assert all(algos[name].applies(small) for name in ("", "_split2", "_split4", "_split8"))
    # 5 reduction tiles: too few for any split; 14: split 2 (7 per slice) but not 4 (3 or 4)
    short = _layer_7x7(32)
    assert conv_algos._sm90_tiles(short) == (26, 5)
    assert not algos["_split2"].applies(short)
    wide = _layer_7x7(96)
    assert conv_algos._sm90_tiles(wide) == (26, 14)
    assert algos["_split2"].applies(wide) and not algos["_split4"].applies(wide)
    # enough tiles for every SM: no split variant
    monkeypatch.setattr(conv_algos, "_sm_count", lambda: 26)
    assert algos[""].applies(small)
    assert not any(algos[name].applies(small) for name in ("_split2", "_split4", "_split8"))
    # where the unsplit kernel does not apply, no split does either
    monkeypatch.setattr(conv_algos, "_sm_count", lambda: 132)
    assert not algos["_split2"].applies(replace(small, dtype=torch.float32))


def test_sm90_op_takes_a_split_factor():
    schema = str(torch.ops.vidconv.st_conv3d_fused_sm90.default._schema)
    assert "int split_k=1" in schema, schema


def test_sm90_grouped_op_takes_two_problems():
    schema = str(torch.ops.vidconv.st_conv3d_fused_sm90_grouped.default._schema)
    assert "Tensor x1, Tensor weight1, Tensor? bias1" in schema and "-> (Tensor, Tensor)" in schema
    # The fake kernel (torch.compile, meta tensors): both outputs like the single op's.
    x = torch.empty(2, 16, 3, 9, 9, device="meta", dtype=torch.bfloat16)
    w = torch.empty(32, 16, 1, 3, 3, device="meta", dtype=torch.bfloat16)
    out0, out1 = torch.ops.vidconv.st_conv3d_fused_sm90_grouped(x, w, None, x, w, None,
                                                                [1, 1, 1], [0, 1, 1], True, 2)
    assert out0.shape == out1.shape == (2, 32, 3, 9, 9)
    assert out1.is_contiguous(memory_format=torch.channels_last_3d)


def test_sm90_kernel_absent_from_a_cpu_build():
    if vidconv.build_info().has_cuda_kernels:
        pytest.skip("this build has CUDA kernels")
    assert conv_algos.fused_sm90_tile() is None
    assert not any(name.startswith("fused_sm90") for name in conv_algos.ALGORITHMS)


def _is_hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


_SM90_NAME = f"fused_sm90_{conv_algos.fused_sm90_tile()}"
_sm90_only = pytest.mark.skipif(not _is_hopper() or _SM90_NAME not in conv_algos.ALGORITHMS,
                                reason="needs an H100/H200 and an extension built for 9.0a")


def _check_sm90(layer, dtype, seed=0):
    x, w, b = _inputs(**layer, device="cuda", dtype=dtype, seed=seed)
    x = x.contiguous(memory_format=torch.channels_last_3d)
    for bias, relu in ((b, True), (None, False)):
        out = torch.ops.vidconv.st_conv3d_fused_sm90(x, w, bias, list(layer["stride"]),
                                                     list(layer["padding"]), relu)
        ref = F.conv3d(x.double(), w.double(), None if bias is None else bias.double(),
                       layer["stride"], layer["padding"])
        ref = ref.clamp_min(0) if relu else ref
        assert out.is_contiguous(memory_format=torch.channels_last_3d)
        assert out.dtype == dtype and out.shape == ref.shape
        # PyTorch's own low-precision result sets the bar (its drift from float64, doubled).
        mine = _rel(out, ref)
        own = F.conv3d(x, w, bias, layer["stride"], layer["padding"])
        own = own.relu() if relu else own
        assert mine < max(2 * _rel(own, ref), TOL[dtype]), (layer, dtype, mine)


@pytest.mark.cuda
@_sm90_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layer", PAPER_LAYERS,
                         ids=[f"{la['ksize']}-{la['thw']}-{la['c']}" for la in PAPER_LAYERS])
def test_cuda_sm90_kernel_matches_reference_on_paper_layers(layer, dtype):
    _check_sm90(layer, dtype)


@pytest.mark.cuda
@_sm90_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layer", AWKWARD + [
    # a 128-filter edge, one full 64-wide reduction tile, a 129-position M
    dict(n=1, c=64, k=129, ksize=(1, 1, 1), stride=(1, 1, 1), padding=(0, 0, 0), thw=(1, 4, 32)),
    dict(n=1, c=8, k=40, ksize=(1, 3, 3), stride=(1, 1, 1), padding=(0, 1, 1), thw=(1, 3, 43)),
    # full-width slow-fusion conv2 at batch 4: many persistent tiles per SM
    dict(n=4, c=96, k=256, ksize=(2, 5, 5), stride=(2, 1, 1), padding=(0, 2, 2),
         thw=(4, 27, 27)),
], ids=lambda la: f"{la['ksize']}-{la['stride']}-{la['thw']}-{la['c']}-{la['k']}")
def test_cuda_sm90_kernel_matches_reference_on_awkward_shapes(layer, dtype):
    _check_sm90(layer, dtype, seed=3)


@pytest.mark.cuda
@_sm90_only
def test_cuda_sm90_kernel_is_a_candidate_and_can_be_forced(monkeypatch):
    names = _every_candidate(STACKED_LAYER, "cuda", torch.bfloat16, torch.channels_last_3d)
    assert _SM90_NAME in names
    monkeypatch.setenv("VIDCONV_CONV_ALGO", _SM90_NAME)
    out, ref, got, want = _run(STACKED_LAYER, device="cuda", dtype=torch.bfloat16,
                               x_format=torch.channels_last_3d)
    _assert_matches(out, ref, got, want, torch.bfloat16)
    assert _decision("forward")["chosen"] == _SM90_NAME


@pytest.mark.cuda
@_sm90_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_sm90_split_k_matches_reference_and_is_deterministic(dtype):
    # A 7x7 layer at batch 32 (26 tiles for 132 SMs): every split, and the automatic one (0),
    # against float64; the slice-ordered reduction gives the same bits on every run.
    layer = dict(n=32, c=256, k=256, ksize=(1, 3, 3), stride=(1, 1, 1), padding=(0, 1, 1),
                 thw=(1, 7, 7))
    x, w, b = _inputs(**layer, device="cuda", dtype=dtype, seed=5)
    x = x.contiguous(memory_format=torch.channels_last_3d)
    ref = F.conv3d(x.double(), w.double(), b.double(), layer["stride"], layer["padding"])
    ref = ref.clamp_min(0)
    own = F.conv3d(x, w, b, layer["stride"], layer["padding"]).relu()
    for split in (0, 1, 2, 4, 8, 16):
        out = torch.ops.vidconv.st_conv3d_fused_sm90(x, w, b, [1, 1, 1], [0, 1, 1], True, split)
        again = torch.ops.vidconv.st_conv3d_fused_sm90(x, w, b, [1, 1, 1], [0, 1, 1], True,
                                                       split)
        assert torch.equal(out, again), split
        assert _rel(out, ref) < max(2 * _rel(own, ref), TOL[dtype]), (split, _rel(out, ref))
    with pytest.raises(RuntimeError, match="split_k must be at most the reduction's 2 64-wide"):
        torch.ops.vidconv.st_conv3d_fused_sm90(x[:, :8], w[:, :8].contiguous(), b, [1, 1, 1],
                                               [0, 1, 1], True, 16)
    with pytest.raises(RuntimeError, match=r"split_k must be 0 \(automatic\) or in \[1, 16\]"):
        torch.ops.vidconv.st_conv3d_fused_sm90(x, w, b, [1, 1, 1], [0, 1, 1], True, 17)


@pytest.mark.cuda
@_sm90_only
@pytest.mark.parametrize("split", [1, 4])
def test_cuda_sm90_grouped_launch_equals_two_launches(split):
    # The multires streams' shape (batch 32, 13x13 after conv2+pool, conv3 3x3): one grouped
    # launch gives each stream exactly what its own launch gives.
    layer = dict(n=32, c=256, k=384, ksize=(1, 3, 3), stride=(1, 1, 1), padding=(0, 1, 1),
                 thw=(1, 13, 13))
    x0, w0, b0 = _inputs(**layer, device="cuda", dtype=torch.bfloat16, seed=1)
    x1, w1, b1 = _inputs(**layer, device="cuda", dtype=torch.bfloat16, seed=2)
    args = ([1, 1, 1], [0, 1, 1], True, split)
    out0, out1 = torch.ops.vidconv.st_conv3d_fused_sm90_grouped(x0, w0, b0, x1, w1, b1, *args)
    assert torch.equal(out0, torch.ops.vidconv.st_conv3d_fused_sm90(x0, w0, b0, *args))
    assert torch.equal(out1, torch.ops.vidconv.st_conv3d_fused_sm90(x1, w1, b1, *args))
    with pytest.raises(RuntimeError, match="both problems must have the same sizes"):
        torch.ops.vidconv.st_conv3d_fused_sm90_grouped(x0, w0, b0, x1[:1], w1, b1, *args)


@pytest.mark.cuda
@pytest.mark.skipif(_is_hopper(), reason="checks the error off Hopper")
def test_cuda_sm90_kernel_off_hopper_is_a_clear_error():
    x, w, b = _inputs(**STACKED_LAYER, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="st_conv3d_fused_sm90: the (Hopper kernel needs a "
                                           "device of compute capability 9.0|extension was not)"):
        torch.ops.vidconv.st_conv3d_fused_sm90(x, w, b, list(STACKED_LAYER["stride"]),
                                               list(STACKED_LAYER["padding"]), True)
