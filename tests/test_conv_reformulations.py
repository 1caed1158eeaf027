"""The exact reformulations of vidconv.ops.conv_algos that rearrange the problem for another engine:
space-to-depth for spatially strided layers with few channels (the paper's conv1), and the input
and weight gradients of stride-1 layers as forward convolutions (conv2-conv5).

Each candidate is checked the way the planner checks it (the same reference, drift and
tolerance) and against float64, on every paper layer it applies to and on awkward shapes; the
rules of where each applies are checked on their own, so no candidate is offered where it would
be wrong.
"""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest
import torch

import vidconv
from vidconv.ops import clear_conv_plan, conv_algos, conv_plan, conv_planner, st_conv3d
from vidconv.ops.st_conv import _output_format

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ALGOS = conv_algos.ALGORITHMS
S2D = [n for n in ALGOS if n.startswith("s2d_")]
DGRAD = [n for n in ALGOS if n.startswith("dgrad_as_fwd_")]
WGRAD = [n for n in ALGOS if n.startswith("wgrad_as_fwd_")]
CL3 = torch.channels_last_3d


@pytest.fixture(autouse=True)
def fresh_plan(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("VIDCONV_CACHE_DIR", str(tmp_path_factory.mktemp("conv-plan")))
    # float32 on CUDA is compared with float64: no TF32 in cuDNN's reference or candidates.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    clear_conv_plan()
    yield
    clear_conv_plan()


def _paper_layers(width: float = 0.125) -> list[dict]:
    """Every conv layer shape of every architecture (full resolution and multires) at a small
    width, from the models' own layer tables (run on the meta device)."""
    from vidconv.models import conv_layer_shapes

    shapes: dict[tuple, dict] = {}
    for layer in conv_layer_shapes(width).values():
        shapes.setdefault(tuple(sorted(layer.items())), layer)
    return list(shapes.values())


PAPER_LAYERS = _paper_layers()
PAPER_CONV1 = [la for la in PAPER_LAYERS if la["ksize"][1] == 11]
PAPER_STRIDE1 = [la for la in PAPER_LAYERS if la["stride"] == (1, 1, 1)]


def _ids(layers):
    return [f"c{la['c']}-k{la['ksize']}-s{la['stride']}-p{la['padding']}-{la['thw']}"
            for la in layers]


def _tensors(layer, *, device="cpu", dtype=torch.float32, x_format=torch.contiguous_format,
             n=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    c, k, ksize = layer["c"], layer["k"], layer["ksize"]
    x = torch.randn(n, c, *layer["thw"], generator=gen)
    w = torch.randn(k, c, *ksize, generator=gen) / math.sqrt(c * math.prod(ksize))
    b = torch.rand(k, generator=gen) * 0.1 + 0.05  # most ReLUs live: the gradients are checked
    x, w, b = (t.to(device=device, dtype=dtype) for t in (x, w, b))
    return x.contiguous(memory_format=x_format), w, b


def _problem(x, w, stride, padding) -> conv_algos.Problem:
    n, c, t, h, wd = x.shape
    return conv_algos.Problem(x.device.type, x.dtype, conv_algos.memory_format_name(x),
                              conv_algos.memory_format_name(w), n, c, t, h, wd, w.shape[0],
                              tuple(w.shape[2:]), tuple(stride), tuple(padding))


def _applying(names, direction, x, w, stride, padding) -> list[str]:
    p = _problem(x, w, stride, padding)
    return [n for n in names if ALGOS[n].runs(direction) is not None and ALGOS[n].applies(p)]


def _check(name: str, direction: str, x, w, b, stride, padding) -> None:
    """`name` in `direction` agrees with the reference under the planner's own tolerance, has the
    layout the op must return, and (in float32/64) lands as close to float64 as the reference."""
    stride, padding = tuple(stride), tuple(padding)
    ref_algo, algo = ALGOS[conv_algos.REFERENCE], ALGOS[name]
    fmt = _output_format(x)
    with torch.no_grad():
        y = ref_algo.forward(x, w, b, stride, padding, True, fmt)
        gen = torch.Generator().manual_seed(7)
        grad = (torch.randn(y.shape, generator=gen).to(x.device, x.dtype) * (y > 0))
        args = ((x, w, b, stride, padding, True) if direction == "forward"
                else (grad, x, w, stride, padding))
        ref = conv_planner.run_algorithm(ref_algo, direction, args, fmt)
        out = conv_planner.run_algorithm(algo, direction, args, fmt)
        key = conv_planner.make_key(direction, x, w, True, stride, padding, True)
        tol = conv_planner.tolerance(key, x.dtype, conv_planner._drift(key, args))
    err = conv_planner._rel_err(out, ref)
    if not ref.any():  # outputs that read padding only (awkward shapes): exactly zero then
        assert not out.any(), (name, direction)
    assert err <= tol, f"{name} {direction}: {err:.3g} > planner tolerance {tol:.3g}"
    like = {"forward": None, "input_grad": x, "weight_grad": w}[direction]
    if like is None:
        assert out.is_contiguous(memory_format=fmt)
    else:
        assert out.shape == like.shape and out.stride() == torch.empty_like(like).stride()
    if x.dtype in (torch.float32, torch.float64):
        args64 = tuple(a.double() if isinstance(a, torch.Tensor) else a for a in args)
        ref64 = conv_planner.run_algorithm(ref_algo, direction, args64, torch.contiguous_format)
        bound = 4 * conv_planner._rel_err(ref, ref64) + 64 * conv_planner._EPS[x.dtype]
        assert conv_planner._rel_err(out, ref64) <= bound, (name, direction)


# ---- space-to-depth ---------------------------------------------------------------------------


def test_space_to_depth_places_every_pixel_where_the_formula_says():
    # x 3 channels, 7 x 8, stride 3 x 2, padding 1 x 2: channel (c, ri, rj) of block (u, v) is
    # the padded pixel (3u + ri, 2v + rj); kernel 4 x 3 -> taps 2 x 2.
    x = torch.arange(2 * 3 * 2 * 7 * 8, dtype=torch.float64).reshape(2, 3, 2, 7, 8) + 1
    w = torch.randn(5, 3, 1, 4, 3, dtype=torch.float64)
    g = conv_algos._geometry_of(x, w, (1, 3, 2), (0, 1, 2))
    assert g.taps == (2, 2) and g.channels == 18 and g.padded_channels == 18
    xp = torch.nn.functional.pad(x, (2, 2, 1, 1))
    for fmt in (torch.contiguous_format, CL3):
        y = conv_algos.space_to_depth(x, g, fmt)
        assert y.is_contiguous(memory_format=fmt)
        assert y.shape == (2, 18, 2, *g.blocks)
        for c, ri, rj, u, v in [(0, 0, 0, 0, 0), (2, 2, 1, 1, 3), (1, 1, 0, 2, 1)]:
            r, col = 3 * u + ri, 2 * v + rj
            want = xp[:, c, :, r, col] if r < xp.shape[3] and col < xp.shape[4] else 0
            assert torch.equal(y[:, c * 6 + ri * 2 + rj, :, u, v],
                               torch.as_tensor(want, dtype=x.dtype).expand(2, 2))
    wt = conv_algos.s2d_weight(w, g, torch.contiguous_format)
    assert wt.shape == (5, 18, 1, 2, 2)
    # Tap (1, 1) of phase (2, 1) would be the original tap (5, 3): past 4 x 3, so zero.
    assert not wt[:, 2 * 6 + 2 * 2 + 1, :, 1, 1].any()
    # Tap (1, 1) of phase (0, 0) of channel 1 is the original tap (3, 2).
    assert torch.equal(wt[:, 1 * 6 + 0 * 2 + 0, :, 1, 1], w[:, 1, :, 3, 2])
    assert torch.equal(wt[:, 0 * 6 + 1 * 2 + 1, :, 0, 0], w[:, 0, :, 1, 1])


def test_space_to_depth_pads_channels_to_8_on_cuda_only():
    g_cpu = conv_algos._s2d_geometry(3, (170, 170), (11, 11), (1, 3, 3), (0, 0, 0), "cpu")
    g_cuda = conv_algos._s2d_geometry(3, (170, 170), (11, 11), (1, 3, 3), (0, 0, 0), "cuda")
    # conv1: 3 x 3 blocks of 3 channels = 27, 11 x 11 at stride 3 -> 4 x 4 taps, 54 + 3 blocks.
    assert (g_cpu.channels, g_cpu.padded_channels, g_cpu.taps, g_cpu.blocks) == (
        27, 27, (4, 4), (57, 57))
    assert g_cuda.padded_channels == 32


def _conv1_problem(**kw) -> conv_algos.Problem:
    p = conv_algos.Problem("cpu", torch.float32, "contiguous", "contiguous", 2, 3, 1, 170, 170,
                           96, (1, 11, 11), (1, 3, 3), (0, 0, 0))
    return replace(p, **kw)


def _names(p: conv_algos.Problem, prefix: str) -> set[str]:
    return {n for n, a in ALGOS.items() if n.startswith(prefix) and a.applies(p)}


def test_s2d_applies_to_strided_layers_with_few_channels_only():
    assert _names(_conv1_problem(), "s2d_") == {
        "s2d_conv3d_ncdhw", "s2d_conv3d_cl", "s2d_conv2d_frames_nchw", "s2d_conv2d_frames_cl"}
    assert not _names(_conv1_problem(stride=(1, 1, 1)), "s2d_")  # nothing to fold
    assert not _names(_conv1_problem(stride=(3, 1, 1)), "s2d_")  # temporal stride only
    assert _names(_conv1_problem(stride=(1, 1, 2)), "s2d_")  # one strided axis is enough
    assert not _names(_conv1_problem(c=conv_algos.S2D_MAX_CHANNELS + 1), "s2d_")
    assert _names(_conv1_problem(c=conv_algos.S2D_MAX_CHANNELS), "s2d_")
    # Time as the other candidates treat it: the frame fold needs extent 1 and no padding,
    # stacking needs disjoint frame groups (early fusion's kt = T), 3D takes anything.
    assert _names(_conv1_problem(t=10, kernel=(10, 11, 11)), "s2d_") == {
        "s2d_conv3d_ncdhw", "s2d_conv3d_cl", "s2d_conv2d_stacked_nchw", "s2d_conv2d_stacked_cl"}
    assert _names(_conv1_problem(t=10, kernel=(4, 11, 11), stride=(2, 3, 3)), "s2d_") == {
        "s2d_conv3d_ncdhw", "s2d_conv3d_cl"}
    assert _names(_conv1_problem(t=3, padding=(1, 0, 0)), "s2d_") == {
        "s2d_conv3d_ncdhw", "s2d_conv3d_cl"}
    # On the CPU a channels_last_3d x is not turned into NC(D)HW (as for the other candidates).
    assert _names(_conv1_problem(x_format="channels_last_3d"), "s2d_") == {
        "s2d_conv3d_cl", "s2d_conv2d_frames_cl"}
    # No hand-written kernel on the CPU; all three directions otherwise.
    assert not any("fused" in n for n in _names(_conv1_problem(), "s2d_"))
    for name in _names(_conv1_problem(), "s2d_"):
        assert all(ALGOS[name].runs(d) is not None for d in conv_algos.DIRECTIONS)


def test_s2d_applies_on_every_paper_conv1_and_nowhere_else():
    for layer in PAPER_LAYERS:
        x, w, _ = _tensors(layer, device="meta")
        offered = _applying(S2D, "forward", x, w, layer["stride"], layer["padding"])
        assert bool(offered) == (layer["ksize"][1] == 11), (layer, offered)


@pytest.mark.parametrize("layer", PAPER_CONV1, ids=_ids(PAPER_CONV1))
def test_s2d_matches_reference_on_paper_conv1(device, layer):
    for x_format in (torch.contiguous_format, CL3):
        x, w, b = _tensors(layer, device=device, x_format=x_format)
        for direction in conv_algos.DIRECTIONS:
            names = _applying(S2D, direction, x, w, layer["stride"], layer["padding"])
            assert names, (layer, direction)
            for name in names:
                _check(name, direction, x, w, b, layer["stride"], layer["padding"])


@pytest.mark.parametrize("layer", [la for la in PAPER_CONV1 if la["thw"][1] == 89],
                         ids=_ids([la for la in PAPER_CONV1 if la["thw"][1] == 89]))
def test_s2d_matches_reference_on_paper_conv1_bfloat16(device, layer):
    x, w, b = _tensors(layer, device=device, dtype=torch.bfloat16, x_format=CL3)
    for direction in conv_algos.DIRECTIONS:
        for name in _applying(S2D, direction, x, w, layer["stride"], layer["padding"]):
            _check(name, direction, x, w, b, layer["stride"], layer["padding"])


def _awkward_strided(count: int, seed: int) -> list[dict]:
    """Spatially strided layers: strides 2-4, kernels not a multiple of (or smaller than) the
    stride, padding up to the kernel, odd sizes, C = 1, 3 or 5, every temporal kind."""
    rng = random.Random(seed)
    cases = []
    while len(cases) < count:
        kt = rng.choice([1, 1, 2, 3])
        st = rng.choice([1, kt, 2])
        pt = rng.choice([0, 0, 1])
        kh, kw = rng.randint(1, 7), rng.randint(1, 7)
        sh, sw = rng.choice([1, 2, 3, 4]), rng.choice([2, 3, 4])
        ph, pw = rng.randint(0, kh), rng.randint(0, kw)
        ho, wo, to = rng.randint(1, 4), rng.randint(1, 4), rng.randint(1, 3)
        thw = ((to - 1) * st + kt - 2 * pt + rng.randint(0, st - 1),
               (ho - 1) * sh + kh - 2 * ph + rng.randint(0, sh - 1),
               (wo - 1) * sw + kw - 2 * pw + rng.randint(0, sw - 1))
        if min(thw) < 1:
            continue
        if rng.random() < 0.5:
            sh, sw = sw, sh
            kh, kw, ph, pw, thw = kw, kh, pw, ph, (thw[0], thw[2], thw[1])
        cases.append(dict(c=rng.choice([1, 3, 5]), k=rng.choice([1, 4, 7]), ksize=(kt, kh, kw),
                          stride=(st, sh, sw), padding=(pt, ph, pw), thw=thw))
    return cases


AWKWARD_STRIDED = _awkward_strided(24, seed=11)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("layer", AWKWARD_STRIDED, ids=_ids(AWKWARD_STRIDED))
def test_s2d_matches_reference_on_awkward_shapes(device, layer, dtype):
    for x_format in (torch.contiguous_format, CL3):
        x, w, b = _tensors(layer, device=device, dtype=dtype, x_format=x_format, n=2, seed=3)
        for direction in conv_algos.DIRECTIONS:
            names = _applying(S2D, direction, x, w, layer["stride"], layer["padding"])
            assert names, (layer, direction)  # every case is strided with C <= 5
            for name in names:
                _check(name, direction, x, w, b, layer["stride"], layer["padding"])


# ---- the input gradient as a forward convolution ----------------------------------------------


def test_dgrad_as_forward_applies_to_stride_1_input_gradients_only():
    p = _conv1_problem(c=96, k=256, h=27, w=27, kernel=(1, 5, 5), stride=(1, 1, 1),
                       padding=(0, 2, 2))
    assert _names(p, "dgrad_as_fwd_") == {
        "dgrad_as_fwd_conv3d_ncdhw", "dgrad_as_fwd_conv3d_cl", "dgrad_as_fwd_conv2d_frames_nchw",
        "dgrad_as_fwd_conv2d_frames_cl"}
    for name in DGRAD:  # the input gradient only
        assert ALGOS[name].forward is None and ALGOS[name].weight_grad is None
        assert ALGOS[name].input_grad is not None
    # Slow fusion's conv2 (temporal stride 2) and conv1 (spatial stride 3): not a plain
    # correlation of the output gradient.
    assert not _names(replace(p, kernel=(2, 5, 5), stride=(2, 1, 1), t=4), "dgrad_as_fwd_")
    assert not _names(_conv1_problem(), "dgrad_as_fwd_")
    # Padding k - 1 - p must be >= 0.
    assert _names(replace(p, padding=(0, 4, 4)), "dgrad_as_fwd_")
    assert not _names(replace(p, padding=(0, 5, 2)), "dgrad_as_fwd_")
    # Temporal extent 2 (slow fusion's conv3): 3D only, the fold needs extent 1.
    assert _names(replace(p, kernel=(2, 3, 3), t=2, padding=(0, 1, 1)), "dgrad_as_fwd_") == {
        "dgrad_as_fwd_conv3d_ncdhw", "dgrad_as_fwd_conv3d_cl"}
    assert _names(replace(p, x_format="channels_last_3d"), "dgrad_as_fwd_") == {
        "dgrad_as_fwd_conv3d_cl", "dgrad_as_fwd_conv2d_frames_cl"}


# The gradients of stride-1 layers as forward problems: input (dgrad) and weight (wgrad).
AS_FORWARD = {"input_grad": DGRAD, "weight_grad": WGRAD}


@pytest.mark.parametrize("direction", list(AS_FORWARD))
def test_gradients_as_forward_apply_on_every_paper_stride_1_layer(direction):
    for layer in PAPER_LAYERS:
        x, w, _ = _tensors(layer, device="meta")
        offered = _applying(AS_FORWARD[direction], direction, x, w, layer["stride"],
                            layer["padding"])
        assert bool(offered) == (layer["stride"] == (1, 1, 1)), (layer, offered)
    # conv2-conv5 of every model but slow fusion's conv2 (temporal stride 2).
    assert {la["ksize"] for la in PAPER_STRIDE1} == {(1, 5, 5), (1, 3, 3), (2, 3, 3)}


@pytest.mark.parametrize("direction", list(AS_FORWARD))
@pytest.mark.parametrize("layer", PAPER_STRIDE1, ids=_ids(PAPER_STRIDE1))
def test_gradients_as_forward_match_reference_on_paper_layers(device, layer, direction):
    for x_format in (torch.contiguous_format, CL3):
        x, w, b = _tensors(layer, device=device, x_format=x_format, n=2)
        names = _applying(AS_FORWARD[direction], direction, x, w, layer["stride"],
                          layer["padding"])
        assert names
        for name in names:
            _check(name, direction, x, w, b, layer["stride"], layer["padding"])


@pytest.mark.parametrize("layer", [la for la in PAPER_STRIDE1 if la["thw"][1] == 7],
                         ids=_ids([la for la in PAPER_STRIDE1 if la["thw"][1] == 7]))
def test_dgrad_as_forward_matches_reference_on_paper_layers_bfloat16(device, layer):
    x, w, b = _tensors(layer, device=device, dtype=torch.bfloat16, x_format=CL3, n=2)
    for name in _applying(DGRAD, "input_grad", x, w, layer["stride"], layer["padding"]):
        _check(name, "input_grad", x, w, b, layer["stride"], layer["padding"])


def _awkward_stride1(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    cases = []
    while len(cases) < count:
        ksize = (rng.choice([1, 1, 2, 3]), rng.randint(1, 6), rng.randint(1, 6))
        padding = tuple(rng.randint(0, k - 1) for k in ksize)
        thw = tuple(max(1, k - 2 * p) + rng.randint(0, 4) for k, p in zip(ksize, padding,
                                                                          strict=True))
        cases.append(dict(c=rng.choice([1, 3, 5, 13]), k=rng.choice([1, 3, 8, 17]), ksize=ksize,
                          stride=(1, 1, 1), padding=padding, thw=thw))
    return cases


AWKWARD_STRIDE1 = _awkward_stride1(16, seed=4)


@pytest.mark.parametrize("direction", list(AS_FORWARD))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("layer", AWKWARD_STRIDE1, ids=_ids(AWKWARD_STRIDE1))
def test_gradients_as_forward_match_reference_on_awkward_shapes(device, layer, dtype,
                                                                direction):
    # A batch of 3 for the weight gradient: its reduction runs over the batch.
    n, seed = (2, 5) if direction == "input_grad" else (3, 6)
    for x_format in (torch.contiguous_format, CL3):
        x, w, b = _tensors(layer, device=device, dtype=dtype, x_format=x_format, n=n, seed=seed)
        names = _applying(AS_FORWARD[direction], direction, x, w, layer["stride"],
                          layer["padding"])
        assert names
        for name in names:
            _check(name, direction, x, w, b, layer["stride"], layer["padding"])


def test_wgrad_as_forward_applies_to_stride_1_weight_gradients_only():
    p = _conv1_problem(c=96, k=256, h=27, w=27, kernel=(1, 5, 5), stride=(1, 1, 1),
                       padding=(0, 2, 2))
    # The gradient problem's temporal extent is T' = 1: the frame fold applies too.
    assert _names(p, "wgrad_as_fwd_") == {
        "wgrad_as_fwd_conv3d_ncdhw", "wgrad_as_fwd_conv3d_cl", "wgrad_as_fwd_conv2d_frames_nchw",
        "wgrad_as_fwd_conv2d_frames_cl"}
    for name in WGRAD:  # the weight gradient only
        assert ALGOS[name].forward is None and ALGOS[name].input_grad is None
        assert ALGOS[name].weight_grad is not None
    # Strided layers (conv1; slow fusion's conv2, temporal stride 2) would need dilation.
    assert not _names(_conv1_problem(), "wgrad_as_fwd_")
    assert not _names(replace(p, kernel=(2, 5, 5), stride=(2, 1, 1), t=4), "wgrad_as_fwd_")
    # Two output frames (T' = 2): 3D only.
    assert _names(replace(p, kernel=(2, 3, 3), t=3, padding=(0, 1, 1)), "wgrad_as_fwd_") == {
        "wgrad_as_fwd_conv3d_ncdhw", "wgrad_as_fwd_conv3d_cl"}


# ---- through the op and the planner -------------------------------------------------------------


CONV1_SMALL = dict(c=3, k=8, ksize=(1, 11, 11), stride=(1, 3, 3), padding=(0, 0, 0),
                   thw=(2, 29, 32))
CONV2_SMALL = dict(c=8, k=16, ksize=(1, 5, 5), stride=(1, 1, 1), padding=(0, 2, 2),
                   thw=(2, 9, 8))


def _grads(layer, monkeypatch, algo: str):
    monkeypatch.setenv("VIDCONV_CONV_ALGO", algo)
    x, w, b = _tensors(layer, n=2, seed=2)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    out = st_conv3d(*leaves, layer["stride"], layer["padding"])
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    return (out, *torch.autograd.grad(out, leaves, grad))


def test_candidates_are_named_by_the_knob():
    names = conv_planner.algorithm_names()
    assert {"s2d_conv3d_cl", "s2d_conv2d_frames_cl", "dgrad_as_fwd_conv3d_cl",
            "dgrad_as_fwd_conv2d_frames_cl", "wgrad_as_fwd_conv3d_cl",
            "wgrad_as_fwd_conv2d_frames_cl"} <= set(names)


# A candidate of one direction forced on the others: the documented warning, then the reference.
@pytest.mark.filterwarnings("ignore:.*does not apply:RuntimeWarning")
@pytest.mark.parametrize(("layer", "algo"), [(CONV1_SMALL, "s2d_conv2d_frames_cl"),
                                             (CONV1_SMALL, "s2d_conv3d_ncdhw"),
                                             (CONV2_SMALL, "dgrad_as_fwd_conv3d_cl"),
                                             (CONV2_SMALL, "dgrad_as_fwd_conv2d_frames_nchw")])
def test_forced_candidate_runs_through_the_op(monkeypatch, layer, algo):
    want = _grads(layer, monkeypatch, "aten")
    got = _grads(layer, monkeypatch, algo)
    for g, r in zip(got, want, strict=True):
        assert (g - r).abs().max() <= 1e-5 * r.abs().max()
    chosen = {d["key"]["direction"]: d["chosen"] for d in conv_plan()}
    direction = "forward" if algo.startswith("s2d_") else "input_grad"
    assert chosen[direction] == algo


def _inject(monkeypatch, times_ms: dict[str, float]):
    def fake(name, run, device, repeats):
        run()
        return [times_ms.get(name, 50.0)] * repeats

    monkeypatch.setattr(conv_planner, "time_candidate", fake)


def test_planner_checks_and_picks_a_faster_reformulation(monkeypatch):
    _inject(monkeypatch, {"s2d_conv3d_cl": 5.0, "dgrad_as_fwd_conv3d_cl": 5.0})
    for layer in (CONV1_SMALL, CONV2_SMALL):
        _grads(layer, monkeypatch, "auto")
    plan = {(d["key"]["c"], d["key"]["direction"]): d for d in conv_plan()}
    conv1_fwd, conv2_dx = plan[(3, "forward")], plan[(8, "input_grad")]
    assert conv1_fwd["chosen"] == "s2d_conv3d_cl" and conv1_fwd["passed"]["s2d_conv3d_cl"]
    assert conv2_dx["chosen"] == "dgrad_as_fwd_conv3d_cl"
    assert conv2_dx["passed"]["dgrad_as_fwd_conv3d_cl"]
    # Every reformulation that applied was run and passed the check.
    assert {n for n in plan[(3, "weight_grad")]["passed"] if n.startswith("s2d_")} == {
        "s2d_conv3d_ncdhw", "s2d_conv3d_cl", "s2d_conv2d_frames_nchw", "s2d_conv2d_frames_cl"}
    assert all(all(d["passed"].values()) for d in conv_plan()), [d["errors"] for d in conv_plan()]


def test_a_wrong_reformulation_is_rejected(monkeypatch):
    good = ALGOS["s2d_conv3d_cl"]

    def off_by_one(x, weight, bias, stride, padding, relu, out_format):
        return good.forward(x, weight.roll(1, dims=-1), bias, stride, padding, relu, out_format)

    monkeypatch.setitem(ALGOS, "s2d_conv3d_cl", replace(good, forward=off_by_one))
    _inject(monkeypatch, {"s2d_conv3d_cl": 1.0})
    with pytest.warns(RuntimeWarning, match="s2d_conv3d_cl"):
        _grads(CONV1_SMALL, monkeypatch, "auto")
    d = next(d for d in conv_plan() if d["key"]["direction"] == "forward")
    assert d["chosen"] != "s2d_conv3d_cl" and d["passed"]["s2d_conv3d_cl"] is False


def test_tune_0_keeps_the_reference(monkeypatch):
    monkeypatch.setenv("VIDCONV_TUNE", "0")
    _inject(monkeypatch, {"s2d_conv3d_cl": 1.0, "dgrad_as_fwd_conv3d_cl": 1.0})
    for layer in (CONV1_SMALL, CONV2_SMALL):
        _grads(layer, monkeypatch, "auto")
    assert {d["chosen"] for d in conv_plan()} == {conv_algos.REFERENCE}
    assert {d["how"] for d in conv_plan()} == {"heuristic"}


# ---- the hand-written kernels as engines (offered on CUDA only, within their limits) ------------


def _fake_kernels() -> list[conv_algos.Algorithm]:
    def cuda_half(p):
        return p.device_type == "cuda" and p.dtype in (torch.float16, torch.bfloat16)

    def forward(*args):
        raise AssertionError("not run")

    return [conv_algos.Algorithm("fused_64x64", cuda_half, forward),
            conv_algos.Algorithm("fused_sm90_128x128x64", conv_algos._sm90_applies, forward)]


def test_every_hand_written_kernel_becomes_an_engine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    made = {a.name: a for a in conv_algos._reformulations(_fake_kernels())}
    assert {"s2d_fused_64x64", "s2d_fused_sm90_128x128x64", "dgrad_as_fwd_fused_64x64",
            "dgrad_as_fwd_fused_sm90_128x128x64", "wgrad_as_fwd_fused_64x64",
            "wgrad_as_fwd_fused_sm90_128x128x64"} <= set(made)
    for name in ("s2d_fused_64x64", "s2d_fused_sm90_128x128x64"):  # forward only
        assert made[name].input_grad is None and made[name].weight_grad is None
    conv1 = _conv1_problem(device_type="cuda", dtype=torch.bfloat16)
    conv2 = replace(conv1, c=96, k=256, h=27, w=27, kernel=(1, 5, 5), stride=(1, 1, 1),
                    padding=(0, 2, 2))
    for p in (conv1, conv2):
        offered = {n for n, a in made.items() if a.applies(p)}
        assert {"fused_64x64", "fused_sm90_128x128x64"} <= {
            n.removeprefix("s2d_").removeprefix("dgrad_as_fwd_").removeprefix("wgrad_as_fwd_")
            for n in offered}
        assert not any(a.applies(replace(p, device_type="cpu")) for n, a in made.items()
                       if "fused" in n)
        assert not any(a.applies(replace(p, dtype=torch.float64)) for n, a in made.items()
                       if "fused" in n)
    # The Hopper kernel's limits are checked on the rearranged problem: a 300 x 300 stride-3
    # kernel is 100 x 100 taps there (within 255), but 32 channels x 100 x 100 taps are more
    # 8-channel vectors than its table holds.
    sm90 = made["s2d_fused_sm90_128x128x64"]
    assert not sm90.applies(replace(conv1, kernel=(1, 300, 300), h=600, w=600))
    assert sm90.applies(replace(conv1, kernel=(1, 300, 300), h=600, w=600, c=1,
                                stride=(1, 10, 10)))
    assert not conv_algos._sm90_applies(replace(conv1, kernel=(1, 300, 300), h=600, w=600, c=1,
                                                stride=(1, 10, 10)))
    # dgrad reduces over K: 384 x 3 x 3 fits; K = 12538 over 1 x 1 x 8 taps is 8 x 1568 vectors.
    dsm90 = made["dgrad_as_fwd_fused_sm90_128x128x64"]
    assert dsm90.applies(replace(conv2, c=384, k=384, kernel=(1, 3, 3), padding=(0, 1, 1)))
    wide = replace(conv2, c=8, k=12538, kernel=(1, 1, 8), padding=(0, 0, 0))
    assert not dsm90.applies(wide)
    assert conv_algos._sm90_applies(wide)  # the forward (C = 8) fits


def test_cpu_build_offers_no_kernel_engines():
    if vidconv.build_info().has_cuda_kernels:
        pytest.skip("this build has CUDA kernels")
    assert not any("fused" in n for n in S2D + DGRAD + WGRAD)


_KERNEL_ENGINES = [n for n in S2D + DGRAD + WGRAD if "fused" in n]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("layer", PAPER_CONV1 + AWKWARD_STRIDED[:8],
                         ids=_ids(PAPER_CONV1 + AWKWARD_STRIDED[:8]))
def test_cuda_s2d_kernels_match_reference(layer, dtype):
    x, w, b = _tensors(layer, device="cuda", dtype=dtype, x_format=CL3, n=2)
    names = _applying(S2D, "forward", x, w, layer["stride"], layer["padding"])
    assert any(n.startswith("s2d_fused_") for n in names)
    for name in names:
        _check(name, "forward", x, w, b, layer["stride"], layer["padding"])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("layer", PAPER_STRIDE1 + AWKWARD_STRIDE1[:8],
                         ids=_ids(PAPER_STRIDE1 + AWKWARD_STRIDE1[:8]))
@pytest.mark.parametrize("direction", list(AS_FORWARD))
def test_cuda_gradient_kernels_match_reference(layer, dtype, direction):
    x, w, b = _tensors(layer, device="cuda", dtype=dtype, x_format=CL3, n=2)
    names = _applying(AS_FORWARD[direction], direction, x, w, layer["stride"], layer["padding"])
    prefix = "dgrad" if direction == "input_grad" else "wgrad"
    assert any(n.startswith(f"{prefix}_as_fwd_fused_") for n in names)
    for name in names:
        _check(name, direction, x, w, b, layer["stride"], layer["padding"])


# ---- the benchmark times them --------------------------------------------------------------------


def test_conv_benchmark_times_the_reformulations():
    import importlib.util
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(bench))
    spec = importlib.util.spec_from_file_location("bench_conv", bench / "conv.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_conv"] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(bench))
        del sys.modules["bench_conv"]
    device = torch.device("cpu")
    conv1 = module.Layer(3, 8, (1, 11, 11), (1, 3, 3), (0, 0, 0), (1, 29, 29))
    conv2 = module.Layer(8, 16, (1, 5, 5), (1, 1, 1), (0, 2, 2), (1, 9, 9))
    r1 = module.bench_layer(conv1, 1, device, torch.float32, list(conv_algos.DIRECTIONS), 0, 1)
    r2 = module.bench_layer(conv2, 1, device, torch.float32, ["input_grad"], 0, 1)
    for direction in conv_algos.DIRECTIONS:
        timed = {n for n in r1["ms"][direction] if n.startswith("s2d_")}
        assert {"s2d_conv3d_cl", "s2d_conv2d_frames_cl"} <= timed, r1["ms"][direction]
        assert all(r1["rel_diff"][direction][n] < 1e-4 for n in timed)
    assert {"dgrad_as_fwd_conv3d_cl", "dgrad_as_fwd_conv2d_frames_cl"} <= set(
        r2["ms"]["input_grad"])
    assert conv_algos.runs_hand_written_kernel("s2d_fused_64x64")
    assert conv_algos.runs_hand_written_kernel("dgrad_as_fwd_fused_sm90_128x128x64")
    assert not conv_algos.runs_hand_written_kernel("s2d_conv3d_cl")
