"""vidconv.ops.st_conv3d against the float64 reference, its gradients, compile and input errors.

CPU tests run whatever the planner chooses (all ATen formulations) on small spatial sizes; CUDA
tests (skipped without a device) run the planner's choice and every tile of the implicit-GEMM
kernel (forced with VIDCONV_CONV_ALGO) on the paper's full layer shapes with poisoned output
memory. tests/test_conv_plan.py tests the choosing itself.
"""

from __future__ import annotations

import importlib.util
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vidconv.ops import st_conv3d, use_conv_algo
from vidconv.reference import st_conv3d_reference

# (name, C, K, (kt, kh, kw), stride, padding, (T, H, W) small for the CPU, (T, H, W) paper size).
# Slow fusion conv1/conv2/conv3 follow paper.md (valid in time, extent 4/2/2, stride 2/2/1); the
# spatial sizes are those after the preceding pooling (170 -> 54 -> 27 -> 27 -> 14, multires 89).
PAPER_LAYERS = [
    ("single_conv1", 3, 96, (1, 11, 11), (1, 3, 3), (0, 0, 0), (1, 26, 23), (1, 170, 170)),
    ("early_conv1", 3, 96, (10, 11, 11), (1, 3, 3), (0, 0, 0), (10, 14, 17), (10, 170, 170)),
    ("slow_conv1", 3, 96, (4, 11, 11), (2, 3, 3), (0, 0, 0), (10, 14, 14), (10, 170, 170)),
    ("multires_conv1", 3, 96, (1, 11, 11), (1, 3, 3), (0, 0, 0), (1, 17, 20), (1, 89, 89)),
    ("slow_conv2", 96, 256, (2, 5, 5), (2, 1, 1), (0, 2, 2), (4, 5, 6), (4, 27, 27)),
    ("single_conv2", 96, 256, (1, 5, 5), (1, 1, 1), (0, 2, 2), (1, 6, 5), (1, 27, 27)),
    ("slow_conv3", 256, 384, (2, 3, 3), (1, 1, 1), (0, 1, 1), (2, 4, 5), (2, 14, 14)),
    ("conv4", 384, 384, (1, 3, 3), (1, 1, 1), (0, 1, 1), (1, 4, 3), (1, 14, 14)),
    ("conv5", 384, 256, (1, 3, 3), (1, 1, 1), (0, 1, 1), (1, 3, 4), (1, 14, 14)),
    ("multires_conv5", 384, 256, (1, 3, 3), (1, 1, 1), (0, 1, 1), (1, 3, 3), (1, 7, 7)),
]


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute error relative to the largest reference magnitude."""
    ref = ref.to(torch.float64).cpu()
    scale = ref.abs().max().item()
    assert scale > 0, "the reference is all zeros: the check would prove nothing"
    return ((out.to(torch.float64).cpu() - ref).abs().max() / scale).item()


def _inputs(n, c, k, ksize, thw, *, device="cpu", dtype=torch.float32, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, *thw, generator=gen)
    w = torch.randn(k, c, *ksize, generator=gen) / (c * ksize[0] * ksize[1] * ksize[2]) ** 0.5
    # A positive bias keeps most ReLU outputs alive, so the comparison is never against zeros.
    b = torch.randn(k, generator=gen) * 0.5 + 0.5 if bias else None
    cast = {"device": device, "dtype": dtype}
    return x.to(**cast), w.to(**cast), None if b is None else b.to(**cast)


def _random_cases(count: int, seed: int) -> list[tuple]:
    """Odd and prime sizes, N=1, C=3, K not a multiple of any tile, strides and padding."""
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        ksize = (rng.choice([1, 2, 3, 5, 11]), rng.randint(1, 11), rng.randint(1, 11))
        stride = (rng.randint(1, 3), rng.randint(1, 3), rng.randint(1, 3))
        padding = tuple(rng.randint(0, k // 2 + 1) for k in ksize)
        out = (rng.randint(1, 3), rng.randint(1, 7), rng.randint(1, 7))
        thw = tuple(max(1, (o - 1) * s + k - 2 * p)
                    for o, s, k, p in zip(out, stride, ksize, padding, strict=True))
        cases.append((rng.choice([1, 2, 3]), rng.choice([1, 3, 5, 8, 13, 16, 24]),
                      rng.choice([1, 7, 13, 64, 65, 70]), ksize, stride, padding, thw,
                      rng.choice([True, False]), rng.choice(["relu", None])))
        if cases[-1][-1] == "relu":  # relu without a bias may zero a tiny output entirely
            cases[-1] = (*cases[-1][:-2], True, "relu")
    return cases


RANDOM_CASES = _random_cases(12, seed=4)


# ---- CPU path ------------------------------------------------------------------------------


@pytest.mark.parametrize("layer", PAPER_LAYERS, ids=[layer[0] for layer in PAPER_LAYERS])
def test_cpu_paper_layers_match_reference(layer):
    _, c, k, ksize, stride, padding, thw, _ = layer
    x, w, b = _inputs(2, c, k, ksize, thw, seed=PAPER_LAYERS.index(layer))
    out = st_conv3d(x, w, b, stride, padding)
    ref = st_conv3d_reference(x, w, b, stride, padding)
    assert out.shape == ref.shape
    assert out.dtype == torch.float32
    assert (out >= 0).all()
    assert _rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("case", RANDOM_CASES)
def test_cpu_random_shapes_match_reference(case):
    n, c, k, ksize, stride, padding, thw, bias, act = case
    x, w, b = _inputs(n, c, k, ksize, thw, bias=bias, seed=n * 7 + c)
    out = st_conv3d(x, w, b, stride, padding, activation=act)
    ref = st_conv3d_reference(x, w, b, stride, padding, activation=act)
    assert out.shape == ref.shape
    assert _rel_err(out, ref) < 1e-5


def test_cpu_float64_matches_reference_exactly_enough():
    x, w, b = _inputs(1, 5, 6, (3, 3, 3), (4, 6, 7), dtype=torch.float64)
    out = st_conv3d(x, w, b, (1, 2, 1), (1, 1, 0))
    ref = st_conv3d_reference(x, w, b, (1, 2, 1), (1, 1, 0))
    assert _rel_err(out, ref) < 1e-12


def test_cpu_channels_last_input_and_empty_batch():
    x, w, b = _inputs(2, 3, 5, (2, 3, 3), (3, 7, 6), seed=6)
    want = st_conv3d(x, w, b, (1, 2, 1), (1, 1, 0))
    got = st_conv3d(x.contiguous(memory_format=torch.channels_last_3d), w, b, (1, 2, 1),
                    (1, 1, 0))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    empty = st_conv3d(x[:0], w, b, (1, 2, 1), (1, 1, 0))
    assert empty.shape == (0, 5, *want.shape[2:])


def test_activation_none_keeps_negative_outputs():
    x, w, b = _inputs(1, 3, 4, (1, 3, 3), (1, 5, 5))
    out = st_conv3d(x, w, b, activation=None)
    assert (out < 0).any()
    # With and without ReLU are two layers to the planner, which may pick differently rounding
    # algorithms for them: equal up to float32 rounding, not bit for bit.
    torch.testing.assert_close(st_conv3d(x, w, b), out.clamp_min(0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("activation", ["relu", None])
def test_gradcheck_float64(device, activation):
    x, w, b = _inputs(2, 2, 3, (2, 2, 3), (3, 4, 5), device=device, dtype=torch.float64, seed=1)
    x.requires_grad_()
    w.requires_grad_()
    b.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x_, w_, b_: st_conv3d(x_, w_, b_, (1, 2, 1), (1, 0, 1), activation),
        (x, w, b))


def test_grad_only_for_inputs_that_need_it():
    x, w, b = _inputs(1, 2, 3, (1, 2, 2), (2, 3, 3), dtype=torch.float64)
    w.requires_grad_()
    st_conv3d(x, w, b).sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    assert x.grad is None


def test_opcheck_forward_and_backward(device):
    x, w, b = _inputs(1, 3, 5, (2, 3, 3), (3, 5, 6), device=device, seed=2)
    x.requires_grad_()
    w.requires_grad_()
    b.requires_grad_()
    torch.library.opcheck(torch.ops.vidconv.st_conv3d.default,
                          (x, w, b, [1, 2, 1], [0, 1, 1], True))
    torch.library.opcheck(torch.ops.vidconv.st_conv3d.default,
                          (x, w, None, [2, 1, 1], [1, 0, 0], False))
    out = torch.ops.vidconv.st_conv3d(x.detach(), w.detach(), b.detach(), [1, 2, 1], [0, 1, 1],
                                      True)
    grad = torch.randn_like(out)
    torch.library.opcheck(torch.ops.vidconv.st_conv3d_backward.default,
                          (grad, x.detach(), w.detach(), out, [1, 2, 1], [0, 1, 1], True,
                           [True, True, True]))
    # channels_last_3d x and weight: the real kernels must return the strides the fake reports.
    cl = torch.channels_last_3d
    x_cl = x.detach().contiguous(memory_format=cl).requires_grad_()
    w_cl = w.detach().contiguous(memory_format=cl).requires_grad_()
    torch.library.opcheck(torch.ops.vidconv.st_conv3d.default,
                          (x_cl, w_cl, b, [1, 1, 2], [1, 1, 0], True))
    torch.library.opcheck(torch.ops.vidconv.st_conv3d_backward.default,
                          (grad, x_cl.detach(), w_cl.detach(), out, [1, 2, 1], [0, 1, 1], True,
                           [True, True, False]))


def test_compile_fullgraph_matches_eager(device):
    torch._dynamo.reset()
    x, w, b = _inputs(2, 3, 4, (2, 3, 3), (3, 6, 5), device=device, seed=3)
    x.requires_grad_()

    def f(x_, w_, b_):
        return st_conv3d(x_, w_, b_, (1, 1, 2), (0, 1, 1)).square().sum()

    # aot_eager traces through the fake kernel and the registered autograd without Inductor's
    # C++ compile on the CPU; on CUDA the default backend is exercised.
    backend = "inductor" if device == "cuda" else "aot_eager"
    compiled = torch.compile(f, fullgraph=True, backend=backend)
    got = compiled(x, w, b)
    (gx,) = torch.autograd.grad(got, x)
    want = f(x, w, b)
    (wx,) = torch.autograd.grad(want, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, wx, rtol=1e-5, atol=1e-5)


# ---- CUDA kernel, emulated on the host (no GPU needed, nvcc is) ------------------------------


def _emulator():
    path = Path(__file__).resolve().parent.parent / "tools" / "emulate_st_conv.py"
    spec = importlib.util.spec_from_file_location("emulate_st_conv", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc to build the emulator")
def test_cuda_kernel_host_emulation(tmp_path):
    # Every block and thread of the kernel stepped on the CPU (tools/emulate_st_conv.py): shared
    # memory contents per stage, each output written once, values vs float64 conv3d; in every
    # tile configuration the launcher can choose.
    emu = _emulator()
    exe = emu.build(tmp_path)
    case = ("ragged", 2, 5, 65, (3, 2, 5), (1, 2, 1), (2, 1, 3), (3, 6, 7))
    for i, dtype in enumerate((torch.float32, torch.float16, torch.bfloat16)):
        names = emu.tiles(exe, dtype)
        assert len(names) >= 2, names
        for tile, name in enumerate(names):
            ok, line = emu.run_case(exe, tmp_path, case, dtype, relu=i != 1,
                                    has_bias=(i + tile) % 3 != 2, seed=i + 10 * tile, tile=tile)
            assert ok, line
            assert f"tile={name}" in line


def _sm90_emulator():
    path = Path(__file__).resolve().parent.parent / "tools" / "emulate_st_conv_sm90.py"
    spec = importlib.util.spec_from_file_location("emulate_st_conv_sm90", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc to build the emulator")
def test_sm90_kernel_host_emulation(tmp_path):
    # Every thread of the Hopper kernel's blocks runs the kernel's own block routine on the CPU
    # (tools/emulate_st_conv_sm90.py, mbarrier/wgmma/swizzle modelled from the PTX ISA): every
    # stage's shared memory at each "full" completion, no stage released early, each output
    # written once, values vs float64 conv3d; with a persistent grid (several tiles through one
    # pipeline) and with one block per tile.
    emu = _sm90_emulator()
    exe = emu.build(tmp_path)
    ragged = ("ragged", 2, 5, 65, (3, 2, 5), (1, 2, 1), (2, 1, 3), (3, 6, 7))
    runs = [(ragged, torch.bfloat16, True, True, 2), (ragged, torch.float16, False, False, 0),
            (emu.SM90_CASES[0], torch.bfloat16, True, False, 1),  # K = 129 across two tiles
            (emu.SM90_CASES[1], torch.float16, True, True, 0)]  # M = 129, reduction 72
    for i, (case, dtype, relu, has_bias, grid) in enumerate(runs):
        ok, line = emu.run_case(exe, tmp_path, case, dtype, relu=relu, has_bias=has_bias,
                                seed=i, grid=grid)
        assert ok, line
        assert "tile=128x128x64" in line


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc to build the emulator")
def test_sm90_emulation_catches_an_early_stage_release(tmp_path):
    # The emulation runs the kernel's code, so a kernel bug fails it, here one that shows as a
    # race on the device: the consumers hand a stage back to the producer while a wgmma reading
    # it may still be in flight (the producer could overwrite operands being read).
    bug = "      wgmma_wait<1>();"
    fix = "      wgmma_wait<2>();"  # two groups in flight: the released stage may still be read
    root = Path(__file__).resolve().parent.parent
    shutil.copytree(root / "csrc", tmp_path / "csrc")
    kernel = tmp_path / "csrc" / "cuda" / "st_conv3d_sm90_kernel.cu"
    text = kernel.read_text()
    assert bug in text
    kernel.write_text(text.replace(bug, fix, 1))
    emu = _sm90_emulator()
    exe = emu.build(tmp_path, kernel_root=tmp_path)
    case = ("ragged", 2, 5, 65, (3, 2, 5), (1, 2, 1), (2, 1, 3), (3, 6, 7))
    ok, line = emu.run_case(exe, tmp_path, case, torch.float16, relu=True, has_bias=True,
                            seed=0, grid=2)
    assert not ok, line
    assert "stage release) while this thread's wgmma are in flight on that stage" in line, line


_SPLIT_CASE = ("c64_k9tiles", 2, 64, 160, (1, 3, 3), (1, 1, 1), (0, 1, 1), (1, 5, 6))  # 9 k-tiles


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc to build the emulator")
def test_sm90_split_k_host_emulation(tmp_path):
    # Split-K through the kernel's own code: each (tile, slice) unit's partial stored once, every
    # unit arriving once on its tile's counter, release/acquire fences in place, the last unit's
    # slice-ordered sum vs float64 conv3d; blocks run in three orders (so a different unit of the
    # tile arrives last) and the output must be bit-identical across them. 9 reduction tiles: no
    # split divides them evenly; split 2 on a 3-block grid runs several units per block.
    emu = _sm90_emulator()
    exe = emu.build(tmp_path)
    for split, grid, dtype in ((2, 3, torch.bfloat16), (4, 0, torch.float16),
                               (8, 3, torch.bfloat16)):
        outputs = []
        for order in (0, 1, 7):
            ok, line = emu.run_case(exe, tmp_path, _SPLIT_CASE, dtype, relu=True,
                                    has_bias=True, seed=split, grid=grid, split=split,
                                    order=order)
            assert ok, line
            assert f"split={split} " in line and f"units={2 * split} " in line, line
            outputs.append((tmp_path / "out.bin").read_bytes())
        assert outputs[1] == outputs[0] and outputs[2] == outputs[0], (split, grid)
    # split_k = 1 touches no workspace (any partial access or counter atomic would be an error)
    # and is one unit per tile, as without split-K.
    ok, line = emu.run_case(exe, tmp_path, _SPLIT_CASE, torch.bfloat16, relu=True,
                            has_bias=True, seed=1, grid=0, split=1, order=1)
    assert ok and "split=1 " in line and "units=2 " in line, line


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc to build the emulator")
def test_sm90_grouped_launch_host_emulation(tmp_path):
    # Two problems of one shape (the multires streams) in one launch: a 3-block grid runs units
    # of both problems in one block, each problem's tiles read its own input and weight (every
    # stage checked against that problem), both outputs written once and right; problem 0's
    # output is bit-identical to its launch alone (same units, same sums); with split-K the
    # workspace and counters span both problems and the result does not depend on block order.
    emu = _sm90_emulator()
    exe = emu.build(tmp_path)
    ok, line = emu.run_case(exe, tmp_path, _SPLIT_CASE, torch.float16, relu=True,
                            has_bias=True, seed=4, grid=3)
    assert ok, line
    alone = (tmp_path / "out.bin").read_bytes()
    for split, order in ((1, 0), (4, 0), (4, 1)):
        ok, line = emu.run_case(exe, tmp_path, _SPLIT_CASE, torch.float16, relu=True,
                                has_bias=True, seed=4, grid=3, split=split, order=order,
                                groups=2)
        assert ok, line
        assert "groups=2 " in line and f"units={4 * split} " in line, line
        if split == 1:
            assert (tmp_path / "out.bin").read_bytes() == alone
            assert (tmp_path / "out1.bin").read_bytes() != alone
        elif order == 0:
            grouped = [(tmp_path / f"out{s}.bin").read_bytes() for s in ("", "1")]
        else:
            assert [(tmp_path / f"out{s}.bin").read_bytes() for s in ("", "1")] == grouped


_SPLIT_BUGS = {
    # the release fence between the consumer barrier and the counter arrival
    "no_release_fence": ("    fence_gpu();  // release: this unit's partials before its arrival\n",
                         "", "tile counter arrival before the unit's partial stores"),
    # the acquire fence after the last arrival
    "no_acquire_fence": ("      fence_gpu();  // acquire: the other units' partials, released "
                         "before their arrivals\n", "", "partial read without an acquire"),
    # the barrier ordering every consumer's stores before thread 0's arrival
    "no_consumer_barrier": ("  consumer_sync();  // every consumer's stores are ordered before "
                            "thread 0's release\n", "", "ws_errors=[1-9]"),
    # slices that drop the remainder of an uneven split (9 reduction tiles in 4 slices)
    "slice_bound": ("  u.kt_end = static_cast<int>(static_cast<long long>(u.slice + 1) * "
                    "plan.k_tiles / plan.split_k);",
                    "  u.kt_end = u.kt_begin + plan.k_tiles / plan.split_k;", "FAIL"),
    # a grouped launch's second problem multiplied with the first one's weight
    "grouped_weight": ("      producer.set_problem(second.input, second.weight);",
                       "      producer.set_problem(second.input, p.weight);", "bad_smem=[1-9]"),
}


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc to build the emulator")
@pytest.mark.parametrize("bug", sorted(_SPLIT_BUGS))
def test_sm90_split_k_emulation_catches_planted_bugs(tmp_path, bug):
    # Each a race or a wrong result on the device that the emulation must fail: partials
    # published without a fence or a barrier, read without acquiring them, slices that miss
    # part of the reduction, a grouped launch mixing up its problems' operands.
    old, new, expect = _SPLIT_BUGS[bug]
    root = Path(__file__).resolve().parent.parent
    shutil.copytree(root / "csrc", tmp_path / "csrc")
    kernel = tmp_path / "csrc" / "cuda" / "st_conv3d_sm90_kernel.cu"
    text = kernel.read_text()
    assert text.count(old) == 1, old
    kernel.write_text(text.replace(old, new))
    emu = _sm90_emulator()
    exe = emu.build(tmp_path, kernel_root=tmp_path)
    ok, line = emu.run_case(exe, tmp_path, _SPLIT_CASE, torch.float16, relu=False,
                            has_bias=True, seed=0, grid=3, split=4, order=1,
                            groups=2 if bug.startswith("grouped") else 1)
    assert not ok, line
    assert re.search(expect, line), line


# ---- bad input ----------------------------------------------------------------------------


def _ok():
    return _inputs(1, 3, 4, (1, 3, 3), (2, 5, 5))


@pytest.mark.parametrize(
    ("mutate", "error", "match"),
    [
        (lambda x, w, b: (x[0], w, b, {}), ValueError, "x must have 5 dimensions"),
        (lambda x, w, b: (x.long(), w, b, {}), TypeError, "x must have dtype"),
        (lambda x, w, b: (x, w[:, :, 0], b, {}), ValueError, "weight must have 5 dimensions"),
        (lambda x, w, b: (x, w.double(), b, {}), TypeError, "weight must have x's dtype"),
        (lambda x, w, b: (x, w[:, :2], b, {}), ValueError, "weight must have x's 3 input"),
        (lambda x, w, b: (x, w, b[:2], {}), ValueError, r"bias must have shape \(4,\)"),
        (lambda x, w, b: (x, w, b.double(), {}), TypeError, "bias must have x's dtype"),
        (lambda x, w, b: (x, w, b, {"activation": "gelu"}), ValueError, "activation must be"),
        (lambda x, w, b: (x, w, b, {"stride": 0}), ValueError, "stride must be >= 1"),
        (lambda x, w, b: (x, w, b, {"stride": (1, 2)}), ValueError, "stride must be an int"),
        (lambda x, w, b: (x, w, b, {"padding": -1}), ValueError, "padding must be >= 0"),
        (lambda x, w, b: (x[:, :, :, :2], w, b, {}), ValueError, "kernel extent 3 along H"),
        (lambda x, w, b: (x.numpy(), w, b, {}), TypeError, "x must be a torch.Tensor"),
    ],
)
def test_bad_input_names_the_argument(mutate, error, match):
    x, w, b, kwargs = mutate(*_ok())
    with pytest.raises(error, match=match):
        st_conv3d(x, w, b, **kwargs)


# ---- CUDA kernel --------------------------------------------------------------------------

CUDA_TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def _poison_allocator(nbytes: int, copies: int = 4) -> None:
    """Leave freed blocks of `nbytes` full of 0xFF (NaN in every float type) in the cache, so an
    output the kernel fails to write shows up as NaN."""
    blocks = [torch.full((nbytes,), 255, dtype=torch.uint8, device="cuda") for _ in range(copies)]
    torch.cuda.synchronize()
    del blocks


def _fused_algos(dtype: torch.dtype) -> list[str]:
    """VIDCONV_CONV_ALGO names of every tile of the fused kernel for dtype."""
    from vidconv.ops.conv_algos import fused_tile_configs

    return [f"fused_{t}" for t in fused_tile_configs().get(str(dtype).removeprefix("torch."), [])]


def _check_cuda(c, k, ksize, stride, padding, thw, dtype, *, n=2, bias=True, act="relu",
                seed=0, channels_last=True):
    x, w, b = _inputs(n, c, k, ksize, thw, device="cuda", dtype=dtype, bias=bias, seed=seed)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    ref = st_conv3d_reference(x, w, b, stride, padding, act, compute_device="cuda")
    algos = ["auto", *_fused_algos(dtype)]
    assert len(algos) >= 3 or dtype == torch.float64, algos
    for algo in algos:
        _poison_allocator(ref.numel() * x.element_size())
        with use_conv_algo(algo):
            out = st_conv3d(x, w, b, stride, padding, activation=act)
        torch.cuda.synchronize()
        assert out.shape == ref.shape and out.dtype == dtype
        assert out.is_contiguous(memory_format=torch.channels_last_3d)
        assert not out.isnan().any(), f"{algo} left outputs unwritten (poisoned NaN survived)"
        err = _rel_err(out, ref)
        assert err < CUDA_TOL[dtype], f"{algo}: relative error {err:.3g} for {dtype}"


@pytest.fixture
def no_tf32():
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layer", PAPER_LAYERS, ids=[layer[0] for layer in PAPER_LAYERS])
def test_cuda_paper_layers_match_reference(layer, dtype, no_tf32):
    _, c, k, ksize, stride, padding, _, thw = layer
    _check_cuda(c, k, ksize, stride, padding, thw, dtype, n=2, seed=PAPER_LAYERS.index(layer))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", _random_cases(24, seed=11))
def test_cuda_random_shapes_match_reference(case, dtype, no_tf32):
    n, c, k, ksize, stride, padding, thw, bias, act = case
    _check_cuda(c, k, ksize, stride, padding, thw, dtype, n=n, bias=bias, act=act,
                seed=n + c + k, channels_last=bias)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_many_position_tiles_and_misaligned_input(dtype, no_tf32):
    # Several position tiles with a ragged last one, and x a view at an odd storage offset
    # (the glue must copy it to reach 16-byte alignment).
    x, w, b = _inputs(3, 16, 70, (3, 3, 3), (5, 13, 12), device="cuda", dtype=dtype, seed=5)
    big = torch.randn(x.numel() + 1, device="cuda", dtype=dtype)
    xv = big[1:].view_as(x)
    xv.copy_(x)
    ref = st_conv3d_reference(xv, w, b, (1, 1, 1), (1, 1, 1), compute_device="cuda")
    for algo in ["auto", *_fused_algos(dtype)]:
        _poison_allocator(ref.numel() * x.element_size())
        with use_conv_algo(algo):
            out = st_conv3d(xv, w, b, (1, 1, 1), (1, 1, 1))
        assert not out.isnan().any(), algo
        assert _rel_err(out, ref) < CUDA_TOL[dtype], algo


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_channels_last_view_at_odd_offset(dtype, no_tf32):
    # C a multiple of 8 and channels_last_3d memory: the launcher would read x in place, but at
    # an odd element offset its 16-byte vector loads are misaligned, so it must copy first.
    n, c, t, h, w = 2, 16, 3, 9, 7
    x, wt, b = _inputs(n, c, 24, (2, 3, 3), (t, h, w), device="cuda", dtype=dtype, seed=11)
    flat = torch.empty(x.numel() + 1, device="cuda", dtype=dtype)
    xv = flat[1:].view(n, t, h, w, c).permute(0, 4, 1, 2, 3)
    xv.copy_(x)
    assert xv.is_contiguous(memory_format=torch.channels_last_3d)
    assert xv.data_ptr() % 16 != 0  # the case under test
    ref = st_conv3d_reference(xv, wt, b, (1, 1, 1), (0, 1, 1), compute_device="cuda")
    for algo in ["auto", *_fused_algos(dtype)]:
        _poison_allocator(ref.numel() * x.element_size())
        with use_conv_algo(algo):
            out = st_conv3d(xv, wt, b, (1, 1, 1), (0, 1, 1))
        assert not out.isnan().any(), algo
        assert _rel_err(out, ref) < CUDA_TOL[dtype], algo
        assert torch.equal(xv, x), algo  # the input view is left as it was


@pytest.mark.cuda
def test_cuda_slow_fusion_conv1_at_batch_256(no_tf32):
    # The paper's slow fusion conv1 at full size and N=256, the largest layer its models run:
    # ~3M output positions (~47k blocks), and the channel-padded input copy is 1.2 GB, so the
    # per-clip base offsets reach 5.9e8 elements (computed in 64 bits in the kernel).
    n, c, k, ksize, stride, thw = 256, 3, 96, (4, 11, 11), (2, 3, 3), (10, 170, 170)
    _, w, b = _inputs(1, c, k, ksize, (4, 11, 11), device="cuda", dtype=torch.bfloat16, seed=12)
    gen = torch.Generator(device="cuda").manual_seed(12)
    x = torch.randn(n, c, *thw, device="cuda", generator=gen).to(torch.bfloat16)
    # All of it against cuDNN in float32 (TF32 off), and the first and last clips against
    # float64: an offset bug at the far end of the batch shows in the last clip.
    ref32 = F.relu(F.conv3d(x.float(), w.float(), b.float(), stride))
    ref64 = st_conv3d_reference(x[[0, n - 1]], w, b, stride, 0, compute_device="cuda")
    for algo in ["auto", *_fused_algos(torch.bfloat16)]:
        with use_conv_algo(algo):
            out = st_conv3d(x, w, b, stride, 0)
        assert out.shape == (n, k, 4, 54, 54), algo
        assert _rel_err(out, ref32) < CUDA_TOL[torch.bfloat16], algo
        assert _rel_err(out[[0, n - 1]], ref64) < CUDA_TOL[torch.bfloat16], algo
        del out


@pytest.mark.cuda
def test_cuda_repeated_calls_fresh_inputs(no_tf32):
    # Fresh random inputs each call, outputs poisoned before each: a stale or partial write fails.
    for i in range(5):
        _check_cuda(96, 256, (2, 5, 5), (2, 1, 1), (0, 2, 2), (4, 11, 9), torch.bfloat16,
                    n=1, seed=100 + i)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", ["relu", None])
def test_cuda_gradients_match_torch(dtype, act, no_tf32):
    x, w, b = _inputs(2, 8, 13, (2, 3, 3), (4, 9, 8), device="cuda", dtype=dtype, seed=9)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    out = st_conv3d(*leaves, (2, 1, 2), (0, 1, 1), activation=act)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, grad)
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]
    ref = F.conv3d(*ref_leaves, stride=(2, 1, 2), padding=(0, 1, 1))
    if act == "relu":
        # Our own output's mask: in bfloat16 an output within rounding of 0 may land on either
        # side, and the gradient check is about the convolution, not that coin toss.
        ref = ref * (out.detach() > 0).double()
    want = torch.autograd.grad(ref, ref_leaves, grad.double())
    for g, r in zip(got, want, strict=True):
        assert _rel_err(g, r) < CUDA_TOL[dtype]


@pytest.mark.cuda
def test_cuda_float64_and_empty_batch():
    x, w, b = _inputs(1, 3, 5, (1, 3, 3), (2, 6, 6), device="cuda", dtype=torch.float64)
    assert _rel_err(st_conv3d(x, w, b), st_conv3d_reference(x, w, b)) < 1e-12
    empty = st_conv3d(x[:0].float(), w.float(), b.float())
    assert empty.shape == (0, 5, 2, 4, 4)
