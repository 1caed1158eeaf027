"""fovea_context and crop_normalize against the float64 reference in vidconv.reference."""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FLOAT_DTYPES

import vidconv
from vidconv import reference
from vidconv.ops import crop_normalize, fovea_context

# Not the defaults, and not powers of two: every rounding step of the kernels shows.
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)

# (N, T, H, W, S): the paper's 178 -> 89 (exact 2x2 means), odd and prime sizes, H != W,
# context ratios that are not integers, a frame exactly the crop size.
SHAPES = [
    (2, 3, 178, 178, 89),
    (3, 2, 37, 53, 17),
    (1, 2, 61, 47, 13),
    (2, 1, 90, 91, 45),
    (1, 1, 7, 7, 7),
    (2, 2, 23, 29, 1),
    (1, 2, 120, 40, 31),
]


@pytest.fixture(autouse=True)
def kernel_forced(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernels themselves under test (on CUDA the ops would otherwise fall back to plain
    PyTorch where the kernel disagrees, and pass), except in the tests of that choice."""
    if "measured_here" not in request.fixturenames and "checked_and_timed" not in request.node.name:
        monkeypatch.setenv("VIDCONV_PREPROCESS", "fused")


def make_clips(n: int, t: int, h: int, w: int, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, t, h, w, 3), dtype=torch.uint8, generator=g).to(device)


def random_offsets(n: int, h: int, w: int, size: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, h - size + 1, (n,), generator=g),
                        torch.randint(0, w - size + 1, (n,), generator=g)], dim=1)


def f32_tolerance(std: tuple[float, ...]) -> float:
    """1e-6 at the default scale; the kernels round in float32 before dividing by std."""
    return 1e-6 * max(1.0, 64.0 / min(std))


def assert_matches(out: torch.Tensor, ref: torch.Tensor, std: tuple[float, ...] = STD) -> None:
    """Every element written (no NaN) and within rounding of the float64 reference.

    float32: within 1e-6 (scaled for small std). float16/bfloat16: no further from the
    reference than PyTorch's own rounding of it to that dtype, plus the float32 error (which
    can push a value near a rounding midpoint to the other neighbour).
    """
    assert out.shape == ref.shape
    assert not out.isnan().any(), "unwritten (NaN) elements in the output"
    ref = ref.to(out.device)
    err = (out.double() - ref).abs()
    tol = 2 * f32_tolerance(std) * (1 + ref.abs())
    if out.dtype != torch.float32:
        tol = tol + (ref.to(out.dtype).double() - ref).abs()
    bad = err > tol
    assert not bad.any(), (f"{int(bad.sum())} of {bad.numel()} elements off; worst "
                           f"{err.max().item():.3g} at {tuple(bad.nonzero()[0].tolist())}")


def poisoned(fn, *nbytes: int):
    """Run fn right after freeing NaN-filled buffers of the outputs' sizes, so an allocator that
    hands the memory back (CUDA's caching allocator does) exposes unwritten elements as NaN."""
    bufs = [torch.full((max(b // 4, 1),), float("nan")) for b in nbytes]
    del bufs
    return fn()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_fovea_context_matches_reference(device: str, shape: tuple[int, ...],
                                         dtype: torch.dtype) -> None:
    n, t, h, w, s = shape
    clips = make_clips(n, t, h, w, seed=sum(shape), device=device)
    offsets = random_offsets(n, h, w, s, seed=n + t)
    flip = torch.arange(n) % 2 == 1
    nbytes = n * 3 * t * s * s * dtype.itemsize
    fovea, context = poisoned(lambda: fovea_context(
        clips, s, offsets=offsets.to(device), flip=flip.to(device), mean=MEAN, std=STD,
        dtype=dtype), nbytes, nbytes)
    ref_fovea, ref_context = reference.fovea_context(clips.cpu(), s, offsets=offsets, flip=flip,
                                                     mean=MEAN, std=STD)
    assert fovea.dtype == dtype and context.dtype == dtype
    assert fovea.device.type == device and context.device.type == device
    assert_matches(fovea, ref_fovea)
    assert_matches(context, ref_context)


@pytest.mark.parametrize("shape", [(2, 2, 200, 200, 170), (3, 1, 31, 43, 19), (1, 3, 9, 5, 5)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_crop_normalize_matches_reference(device: str, shape: tuple[int, ...],
                                          dtype: torch.dtype) -> None:
    n, t, h, w, s = shape
    clips = make_clips(n, t, h, w, seed=7, device=device)
    offsets = random_offsets(n, h, w, s, seed=3)
    flip = torch.arange(n) % 2 == 0
    out = poisoned(lambda: crop_normalize(clips, s, offsets=offsets.to(device),
                                          flip=flip.to(device), mean=MEAN, std=STD, dtype=dtype),
                   n * 3 * t * s * s * dtype.itemsize)
    ref = reference.crop_normalize(clips.cpu(), s, offsets=offsets, flip=flip, mean=MEAN, std=STD)
    assert_matches(out, ref)


def test_defaults_are_paper_centre_crops(device: str) -> None:
    clips = make_clips(2, 2, 178, 178, seed=11, device=device)
    fovea, context = fovea_context(clips)
    assert fovea.shape == context.shape == (2, 3, 2, 89, 89)
    # Centre fovea: rows and columns 44..132 of the frame.
    expected = (clips[:, :, 44:133, 44:133].permute(0, 4, 1, 2, 3).double() - 117.0) / 64.0
    assert torch.equal(fovea.double(), expected)
    # Exact 2x2 means (sums of four bytes / 4 are exact in float32).
    blocks = clips.double().reshape(2, 2, 89, 2, 89, 2, 3).mean(dim=(3, 5))
    assert torch.equal(context.double(), ((blocks - 117.0) / 64.0).permute(0, 4, 1, 2, 3))
    crop = crop_normalize(make_clips(1, 1, 200, 200, device=device))
    assert crop.shape == (1, 3, 1, 170, 170)
    ref = reference.crop_normalize(make_clips(1, 1, 200, 200), 170, offsets=(15, 15))
    assert_matches(crop, ref, std=(64.0,) * 3)


def test_paper_preprocessing_without_scaling(device: str) -> None:
    """std=1 is the paper's exact recipe (subtract 117); outputs are then in byte units."""
    clips = make_clips(1, 2, 50, 50, seed=5, device=device)
    fovea, context = fovea_context(clips, 25, std=1.0)
    ref_fovea, ref_context = reference.fovea_context(clips.cpu(), 25, std=1.0)
    assert_matches(fovea, ref_fovea, std=(1.0,) * 3)
    assert_matches(context, ref_context, std=(1.0,) * 3)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_flip_mirrors_both_streams(device: str, dtype: torch.dtype) -> None:
    clips = make_clips(3, 2, 41, 37, seed=2, device=device)
    offsets = random_offsets(3, 41, 37, 15, seed=4).to(device)
    kw = dict(offsets=offsets, mean=MEAN, std=STD, dtype=dtype)
    plain = fovea_context(clips, 15, flip=False, **kw)
    flipped = fovea_context(clips, 15, flip=True, **kw)
    for a, b in zip(plain, flipped, strict=True):
        assert torch.equal(a.flip(-1), b)
    mixed = fovea_context(clips, 15, flip=torch.tensor([True, False, True], device=device), **kw)
    for a, b, m in zip(plain, flipped, mixed, strict=True):
        assert torch.equal(m[0], b[0]) and torch.equal(m[1], a[1]) and torch.equal(m[2], b[2])


def test_crop_normalize_is_the_fovea_path(device: str) -> None:
    clips = make_clips(2, 3, 64, 80, seed=9, device=device)
    offsets = random_offsets(2, 64, 80, 32).to(device)
    flip = torch.tensor([False, True], device=device)
    for dtype in FLOAT_DTYPES:
        fovea, _ = fovea_context(clips, 32, offsets=offsets, flip=flip, dtype=dtype)
        crop = crop_normalize(clips, 32, offsets=offsets, flip=flip, dtype=dtype)
        assert torch.equal(fovea, crop)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_channels_last_3d(device: str, dtype: torch.dtype) -> None:
    clips = make_clips(2, 3, 46, 52, seed=6, device=device)
    kw = dict(offsets=(3, 10), flip=torch.tensor([True, False], device=device), mean=MEAN,
              std=STD, dtype=dtype)
    plain = fovea_context(clips, 23, **kw)
    last = fovea_context(clips, 23, memory_format=torch.channels_last_3d, **kw)
    crop = crop_normalize(clips, 23, memory_format=torch.channels_last_3d, **kw)
    expected_strides = torch.empty((2, 3, 3, 23, 23), memory_format=torch.channels_last_3d).stride()
    for a, b in zip(plain, last, strict=True):
        assert a.is_contiguous()
        assert b.stride() == expected_strides
        assert torch.equal(a, b)
    assert crop.stride() == expected_strides and torch.equal(crop, plain[0])


def test_unbatched_clip(device: str) -> None:
    clips = make_clips(1, 4, 30, 30, seed=8, device=device)
    fovea, context = fovea_context(clips[0], 15, offsets=(2, 5), flip=True)
    bf, bc = fovea_context(clips, 15, offsets=(2, 5), flip=True)
    assert fovea.shape == (3, 4, 15, 15)
    assert torch.equal(fovea, bf[0]) and torch.equal(context, bc[0])
    crop = crop_normalize(clips[0], 15, offsets=(2, 5), flip=True)
    assert torch.equal(crop, bf[0])
    ref = reference.crop_normalize(clips[0].cpu(), 15, offsets=(2, 5), flip=True)
    assert_matches(crop, ref, std=(64.0,) * 3)


@pytest.mark.parametrize("n,t", [(0, 3), (2, 0)])
def test_empty_batch_or_clip(device: str, n: int, t: int) -> None:
    clips = make_clips(n, t, 20, 20, device=device)
    fovea, context = fovea_context(clips, 10, memory_format=torch.channels_last_3d)
    assert fovea.shape == context.shape == (n, 3, t, 10, 10)
    assert crop_normalize(clips, 10, offsets=torch.zeros(n, 2, dtype=torch.int64,
                                                         device=device)).shape == (n, 3, t, 10, 10)


def test_offsets_forms_agree(device: str) -> None:
    clips = make_clips(2, 1, 30, 40, seed=3, device=device)
    a = crop_normalize(clips, 20, offsets=(5, 7))
    b = crop_normalize(clips, 20, offsets=torch.tensor([5, 7], device=device))
    c = crop_normalize(clips, 20, offsets=torch.tensor([[5, 7], [5, 7]], dtype=torch.int32,
                                                       device=device))
    assert torch.equal(a, b) and torch.equal(a, c)
    centre = crop_normalize(clips, 20)
    assert torch.equal(centre, crop_normalize(clips, 20, offsets=(5, 10)))


@pytest.mark.cuda
def test_cuda_matches_cpu_bitwise() -> None:
    """Both kernels round the same float32 steps, so CUDA and CPU agree exactly."""
    for n, t, h, w, s in [(4, 3, 178, 178, 89), (2, 2, 200, 200, 170), (2, 1, 1000, 900, 40),
                          (3, 2, 37, 53, 17)]:
        clips = make_clips(n, t, h, w, seed=h)
        offsets = random_offsets(n, h, w, s)
        flip = torch.arange(n) % 2 == 0
        for dtype in FLOAT_DTYPES:
            for fmt in (torch.contiguous_format, torch.channels_last_3d):
                kw = dict(offsets=offsets, flip=flip, mean=MEAN, std=STD, dtype=dtype,
                          memory_format=fmt)
                cpu = fovea_context(clips, s, **kw)
                kw.update(offsets=offsets.cuda(), flip=flip.cuda())
                gpu = fovea_context(clips.cuda(), s, **kw)
                for a, b in zip(cpu, gpu, strict=True):
                    assert b.stride() == a.stride()
                    assert torch.equal(a, b.cpu())
                crop = crop_normalize(clips.cuda(), s, **kw)
                assert torch.equal(crop.cpu(), cpu[0])


@pytest.mark.cuda
def test_cuda_misaligned_input() -> None:
    """A clip tensor at an odd byte offset (a view into a larger buffer) still reads right."""
    base = make_clips(1, 1, 1, 178 * 178 * 3 * 2 * 2 + 7, device="cuda").flatten()
    clips = base[5:5 + 2 * 2 * 178 * 178 * 3].view(2, 2, 178, 178, 3)
    fovea, context = fovea_context(clips, 89)
    ref_fovea, ref_context = reference.fovea_context(clips.cpu(), 89)
    assert_matches(fovea, ref_fovea, std=(64.0,) * 3)
    assert_matches(context, ref_context, std=(64.0,) * 3)


@pytest.mark.parametrize("op", ["fovea_context", "crop_normalize"])
def test_opcheck(device: str, op: str) -> None:
    clips = make_clips(2, 2, 19, 23, seed=1, device=device)
    offsets = random_offsets(2, 19, 23, 11).to(device)
    flip = torch.tensor([True, False], device=device)
    overload = getattr(torch.ops.vidconv, op).default
    for dtype, channels_last in [(torch.float32, False), (torch.bfloat16, True)]:
        torch.library.opcheck(overload, (clips, 11, offsets, flip, list(MEAN), list(STD), dtype,
                                         channels_last))


@pytest.mark.parametrize("op", [fovea_context, crop_normalize], ids=lambda f: f.__name__)
def test_torch_compile_fullgraph(device: str, op) -> None:
    clips = make_clips(2, 2, 26, 26, seed=4, device=device)
    offsets = random_offsets(2, 26, 26, 13).to(device)
    flip = torch.tensor([False, True], device=device)

    def fn(c: torch.Tensor, o: torch.Tensor, f: torch.Tensor):
        return op(c, 13, offsets=o, flip=f, dtype=torch.float16,
                  memory_format=torch.channels_last_3d)

    compiled = torch.compile(fn, fullgraph=True)
    eager, traced = fn(clips, offsets, flip), compiled(clips, offsets, flip)
    for a, b in zip(*(x if isinstance(x, tuple) else (x,) for x in (eager, traced)),
                    strict=True):
        assert torch.equal(a, b) and a.stride() == b.stride()


# ---- bad input: a ValueError/TypeError that names the argument -------------------------------

CLIPS = make_clips(2, 2, 20, 24)


@pytest.mark.parametrize("op", [fovea_context, crop_normalize], ids=lambda f: f.__name__)
@pytest.mark.parametrize("args,kwargs,error,match", [
    ((CLIPS.float(), 10), {}, TypeError, "clips must have dtype torch.uint8, got torch.float32"),
    ((CLIPS[0, 0], 10), {}, ValueError, r"clips must have 4 or 5 dimensions.*\(20, 24, 3\)"),
    ((torch.zeros(2, 2, 20, 24, 4, dtype=torch.uint8), 10), {}, ValueError,
     "clips must have 3 channels.*got 4"),
    ((CLIPS.transpose(2, 3), 10), {}, ValueError, "clips must be contiguous"),
    (([[1]], 10), {}, TypeError, "clips must be a torch.Tensor, got list"),
    ((CLIPS, 21), {}, ValueError, r"frames must be at least size x size = 21x21, got 20x24"),
    ((CLIPS, 0), {}, ValueError, "size must be >= 1, got 0"),
    ((CLIPS, True), {}, TypeError, r"size must be an int, got True \(bool\)"),
    ((CLIPS, 10.0), {}, TypeError, r"size must be an int, got 10.0 \(float\)"),
    ((CLIPS, "10"), {}, TypeError, "size must be an int, got '10'"),
    ((CLIPS, 2**62), {}, ValueError, "size must be <= 2147483647"),
    ((CLIPS, 10), {"offsets": (True, 0)}, TypeError, r"offsets\[0\] must be an int, got True"),
    ((CLIPS, 10), {"offsets": (1.5, 0)}, TypeError, r"offsets\[0\] must be an int, got 1.5"),
    ((CLIPS, 10), {"offsets": 3}, TypeError, r"offsets must be \(y, x\) ints.*got 3 \(int\)"),
    ((CLIPS, 10), {"flip": 1}, TypeError, r"flip must be None, a bool or a bool tensor.*\(int\)"),
    ((CLIPS, 10), {"mean": None}, TypeError, r"mean must be one float or 3 floats, got None"),
    ((CLIPS, 10), {"std": None}, TypeError, r"std must be one float or 3 floats, got None"),
    ((CLIPS, 10), {"mean": "117"}, TypeError, r"mean must be one float or 3 floats, got '117'"),
    ((CLIPS, 10), {"mean": (1.0, None, 2.0)}, TypeError, r"item 1 is None"),
    ((CLIPS, 10), {"mean": float("nan")}, ValueError, r"mean must be finite.*nan"),
    ((CLIPS, 10), {"mean": (0.0, float("-inf"), 0.0)}, ValueError, r"mean must be finite.*-inf"),
    ((CLIPS, 10), {"std": float("nan")}, ValueError, r"std must be finite.*nan"),
    ((CLIPS, 10), {"std": float("inf")}, ValueError, r"std must be finite.*inf"),
    ((CLIPS, 10), {"std": 0}, ValueError, "std must be non-zero"),
    ((CLIPS, 10), {"std": 1e-45}, ValueError, r"std must be non-zero with 1/std within float32"),
    ((CLIPS, 10), {"offsets": (11, 0)}, ValueError, r"offsets out of range.*0 <= y <= 10"),
    ((CLIPS, 10), {"offsets": (0, -1)}, ValueError, r"offsets out of range.*got \(0, -1\)"),
    ((CLIPS, 10), {"offsets": torch.tensor([[0, 0], [3, 15]])}, ValueError,
     r"offsets out of range.*max x 15"),
    ((CLIPS, 10), {"offsets": torch.zeros(3, 2, dtype=torch.int64)}, ValueError,
     r"offsets must have shape \(2, 2\).*got \(3, 2\)"),
    ((CLIPS, 10), {"offsets": torch.zeros(2, 2)}, TypeError,
     "offsets must be an integer tensor, got torch.float32"),
    ((CLIPS, 10), {"offsets": (1, 2, 3)}, ValueError, r"offsets must be \(y, x\)"),
    ((CLIPS, 10), {"offsets": torch.zeros(2, 2, dtype=torch.int64, device="meta")}, ValueError,
     "offsets is on meta but clips is on cpu"),
    ((CLIPS, 10), {"flip": torch.zeros(2, dtype=torch.bool, device="meta")}, ValueError,
     "flip is on meta but clips is on cpu"),
    ((CLIPS, 10), {"flip": torch.zeros(2)}, TypeError, "flip must be a bool tensor"),
    ((CLIPS, 10), {"flip": torch.zeros(3, dtype=torch.bool)}, ValueError,
     r"flip must have shape \(2,\)"),
    ((CLIPS, 10), {"mean": (1.0, 2.0)}, ValueError, "mean must be one float or 3 floats, got 2"),
    ((CLIPS, 10), {"std": (1.0, 0.0, 1.0)}, ValueError, "std must be non-zero"),
    ((CLIPS, 10), {"dtype": torch.float64}, TypeError, "dtype must be one of.*got torch.float64"),
    ((CLIPS, 10), {"memory_format": torch.channels_last}, ValueError,
     "memory_format must be torch.contiguous_format or torch.channels_last_3d"),
])
def test_bad_input_names_the_argument(op, args, kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        op(*args, **kwargs)


@pytest.mark.parametrize("op", [fovea_context, crop_normalize], ids=lambda f: f.__name__)
def test_integral_and_array_arguments_as_python_ones(op) -> None:
    """numpy sizes and offsets, numpy/tensor mean and std, numpy bools: the same output as the
    Python values."""
    want = op(CLIPS, 10, offsets=(3, 5), flip=True, mean=(100.0, 110.0, 120.0), std=50.0)
    got = op(CLIPS, np.int64(10), offsets=np.array([3, 5]), flip=np.bool_(True),
             mean=np.array([100.0, 110.0, 120.0]), std=np.float32(50.0))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    got = op(CLIPS, torch.tensor(10), offsets=(np.int32(3), 5),
             mean=torch.tensor([100.0, 110.0, 120.0]), std=torch.tensor(50.0), flip=True)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_kernel_rechecks_direct_calls() -> None:
    """torch.ops.vidconv.* skip the Python checks; the C++ kernel still refuses bad input."""
    off = torch.tensor([[0, 0], [0, 15]])
    flip = torch.zeros(2, dtype=torch.bool)
    m = [0.0, 0.0, 0.0]
    s = [1.0, 1.0, 1.0]
    with pytest.raises(RuntimeError, match=r"offsets\[1\] = \(0, 15\) out of range"):
        torch.ops.vidconv.fovea_context(CLIPS, 10, off, flip, m, s, torch.float32, False)
    with pytest.raises(RuntimeError, match="offsets must be contiguous int64"):
        torch.ops.vidconv.crop_normalize(CLIPS, 10, off.int(), flip, m, s, torch.float32, False)
    with pytest.raises(RuntimeError, match="clips must be uint8"):
        torch.ops.vidconv.crop_normalize(CLIPS.float(), 10, off, flip, m, s, torch.float32, False)
    with pytest.raises(RuntimeError, match="dtype must be float32, float16 or bfloat16"):
        torch.ops.vidconv.crop_normalize(CLIPS, 10, off * 0, flip, m, s, torch.float64, False)


def test_public_api() -> None:
    assert vidconv.ops.DEFAULT_MEAN == (117.0,) * 3
    assert vidconv.ops.fovea_context is fovea_context
    assert "fovea" in (fovea_context.__doc__ or "") and "crop" in (crop_normalize.__doc__ or "")


# ---- out=: the caller's tensors ---------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2, 3, 37, 53, 17), (1, 2, 23, 29, 1), (3, 1, 200, 200, 170)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last_3d],
                         ids=["contiguous", "channels_last_3d"])
def test_out_writes_what_a_fresh_call_returns(device: str, shape: tuple[int, ...],
                                              dtype: torch.dtype,
                                              memory_format: torch.memory_format) -> None:
    n, t, h, w, s = shape
    clips = make_clips(n, t, h, w, seed=5, device=device)
    kw = dict(offsets=random_offsets(n, h, w, s, seed=2).to(device),
              flip=(torch.arange(n) % 2 == 0).to(device), mean=MEAN, std=STD, dtype=dtype,
              memory_format=memory_format)
    want = crop_normalize(clips, s, **kw)
    # NaN-filled: an element the kernel skipped would show.
    out = torch.full_like(want, float("nan"))
    got = crop_normalize(clips, s, out=out, **kw)
    assert got is out and torch.equal(out, want) and out.stride() == want.stride()
    want_f, want_c = fovea_context(clips, s, **kw)
    pair = (torch.full_like(want_f, float("nan")), torch.full_like(want_c, float("nan")))
    got_f, got_c = fovea_context(clips, s, out=pair, **kw)
    assert got_f is pair[0] and got_c is pair[1]
    assert torch.equal(got_f, want_f) and torch.equal(got_c, want_c)


def test_out_bumps_the_version_counter() -> None:
    # A backward that saved the tensor before it was written again must refuse, not use the
    # new values.
    out = torch.empty(2, 3, 2, 10, 10)
    crop_normalize(CLIPS, 10, out=out)
    assert out._version == 1
    loss = (out * torch.ones_like(out, requires_grad=True)).sum()
    crop_normalize(CLIPS, 10, out=out)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    pair = (torch.empty(2, 3, 2, 10, 10), torch.empty(2, 3, 2, 10, 10))
    fovea_context(CLIPS, 10, out=pair)
    assert pair[0]._version == 1 and pair[1]._version == 1


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_cuda_out_off_alignment(dtype: torch.dtype) -> None:
    """Outputs one element past 16-byte alignment: the chunk stores' head and tail."""
    clips = make_clips(2, 3, 37, 41, seed=6, device="cuda")
    for fmt in (torch.contiguous_format, torch.channels_last_3d):
        kw = dict(offsets=random_offsets(2, 37, 41, 17).cuda(), dtype=dtype, memory_format=fmt,
                  flip=torch.tensor([True, False], device="cuda"))
        want = crop_normalize(clips, 17, **kw)
        base = torch.full((want.numel() + 1,), float("nan"), dtype=dtype, device="cuda")
        shape = want.shape if fmt == torch.contiguous_format else (2, 3, 17, 17, 3)
        out = base[1:].view(shape)
        if fmt == torch.channels_last_3d:
            out = out.permute(0, 4, 1, 2, 3)  # (N, C, T, H, W) view of (N, T, H, W, C) memory
        crop_normalize(clips, 17, out=out, **kw)
        assert torch.equal(out, want)
        assert torch.equal(out.cpu(), crop_normalize(clips.cpu(), 17, **{
            **kw, "offsets": kw["offsets"].cpu(), "flip": kw["flip"].cpu()}))


def test_out_unbatched_clip(device: str) -> None:
    clips = make_clips(1, 2, 30, 30, seed=8, device=device)[0]
    out = torch.empty(3, 2, 16, 16, device=device)
    assert torch.equal(crop_normalize(clips, 16, out=out), crop_normalize(clips, 16))
    pair = (torch.empty(3, 2, 15, 15, device=device), torch.empty(3, 2, 15, 15, device=device))
    for a, b in zip(fovea_context(clips, 15, out=pair), fovea_context(clips, 15), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("out,error,match", [
    (5, TypeError, r"out must be a tensor of shape \(2, 3, 2, 10, 10\), got int"),
    (torch.empty(2, 3, 2, 10, 11), ValueError, r"out must have shape \(2, 3, 2, 10, 10\), got"),
    (torch.empty(2, 3, 2, 10, 10, dtype=torch.float16), TypeError,
     "out must have dtype torch.float32 .the dtype argument., got torch.float16"),
    (torch.empty(2, 3, 2, 10, 10).transpose(3, 4), ValueError,
     "out must be dense in memory_format torch.contiguous_format"),
    (torch.empty(2, 3, 2, 10, 10, memory_format=torch.channels_last_3d), ValueError,
     "out must be dense in memory_format torch.contiguous_format"),
    (torch.empty(2, 3, 2, 10, 10, device="meta"), ValueError,
     "out must be on clips' device cpu, got meta"),
    (torch.empty(2, 3, 2, 10, 10, requires_grad=True), RuntimeError, "out requires grad"),
])
def test_out_bad_names_the_argument(out, error, match) -> None:
    with pytest.raises(error, match=match):
        crop_normalize(CLIPS, 10, out=out)


def test_fovea_context_out_bad() -> None:
    good = torch.empty(2, 3, 2, 10, 10)
    with pytest.raises(TypeError, match=r"out must be a \(fovea, context\) pair"):
        fovea_context(CLIPS, 10, out=good)
    with pytest.raises(ValueError, match=r"out\[1\] \(context\) must have shape"):
        fovea_context(CLIPS, 10, out=(good, torch.empty(2, 3, 2, 9, 10)))
    with pytest.raises(RuntimeError, match="refer to a single memory location"):
        fovea_context(CLIPS, 10, out=(good, good))
    # The kernels re-check what a direct torch.ops call could get wrong.
    m, s = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    off, flip = torch.zeros(2, 2, dtype=torch.int64), torch.zeros(2, dtype=torch.bool)
    with pytest.raises(RuntimeError, match=r"out must have shape \[2, 3, 2, 10, 10\]"):
        torch.ops.vidconv.crop_normalize.out(CLIPS, 10, off, flip, m, s,
                                             out=torch.empty(2, 3, 2, 10, 9))
    with pytest.raises(RuntimeError, match="out must be float32, float16 or bfloat16, got Int"):
        torch.ops.vidconv.crop_normalize.out(CLIPS, 10, off, flip, m, s,
                                             out=torch.empty(2, 3, 2, 10, 10, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="same dtype and layout"):
        torch.ops.vidconv.fovea_context.out(CLIPS, 10, off, flip, m, s, fovea=good,
                                            context=good.half())


@pytest.mark.parametrize("op", ["fovea_context", "crop_normalize"])
def test_opcheck_out(device: str, op: str) -> None:
    clips = make_clips(2, 2, 19, 23, seed=1, device=device)
    offsets = random_offsets(2, 19, 23, 11).to(device)
    flip = torch.tensor([True, False], device=device)
    for dtype, fmt in [(torch.float32, torch.contiguous_format),
                       (torch.bfloat16, torch.channels_last_3d)]:
        names = ("fovea", "context") if op == "fovea_context" else ("out",)
        outs = {name: torch.empty(2, 3, 2, 11, 11, dtype=dtype, device=device,
                                  memory_format=fmt) for name in names}
        torch.library.opcheck(getattr(torch.ops.vidconv, op).out,
                              (clips, 11, offsets, flip, list(MEAN), list(STD)), outs)


def test_out_under_torch_compile_fullgraph(device: str) -> None:
    clips = make_clips(2, 2, 26, 26, seed=4, device=device)
    offsets = random_offsets(2, 26, 26, 13).to(device)

    def fn(c: torch.Tensor, o: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
        return crop_normalize(c, 13, offsets=o, out=buf) * 2

    buf = torch.empty(2, 3, 2, 13, 13, device=device)
    got = torch.compile(fn, fullgraph=True)(clips, offsets, buf)
    want = crop_normalize(clips, 13, offsets=offsets)
    assert torch.equal(buf, want) and torch.equal(got, want * 2)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc to build the emulator")
def test_cuda_kernel_emulation() -> None:
    """The CUDA kernel's own code, stepped on the host, writes the CPU kernel's bits."""
    tool = Path(__file__).resolve().parent.parent / "tools/emulate_fovea_context.py"
    res = subprocess.run([sys.executable, str(tool), "--quick"], capture_output=True, text=True,
                         timeout=1800)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert " 0 failed" in res.stdout and "FAIL" not in res.stdout


# ---- the CUDA kernel as a measured choice (the logic run on the CPU) ---------------------------

@pytest.fixture
def measured_here(monkeypatch: pytest.MonkeyPatch):
    """The kernel-or-PyTorch choice made on the CPU too, as it is on CUDA, from a clean plan."""
    from vidconv.ops import preprocess

    monkeypatch.setattr(preprocess, "_MEASURED_DEVICES", {"cuda", "cpu"})
    monkeypatch.delenv("VIDCONV_PREPROCESS", raising=False)
    preprocess.clear_preprocess_plan()
    yield preprocess
    preprocess.clear_preprocess_plan()


def _timings(monkeypatch: pytest.MonkeyPatch, preprocess, fused_ms: float, aten_ms: float,
             calls: list[str]) -> None:
    def timed(name, run, device, repeats):
        calls.append(name)
        run()
        return [fused_ms if name == "fused" else aten_ms] * repeats

    monkeypatch.setattr(preprocess.conv_planner, "time_candidate", timed)


@pytest.mark.parametrize("op", [fovea_context, crop_normalize], ids=lambda f: f.__name__)
@pytest.mark.parametrize("fused_ms,aten_ms,want", [(1.0, 5.0, True), (5.0, 1.0, False),
                                                   (0.95, 1.0, False)])
def test_kernel_used_only_where_measured_faster(measured_here, monkeypatch, op, fused_ms,
                                                aten_ms, want) -> None:
    calls: list[str] = []
    _timings(monkeypatch, measured_here, fused_ms, aten_ms, calls)
    clips = make_clips(2, 2, 30, 34, seed=9)
    first = op(clips, 15, flip=True)
    assert sorted(set(calls)) == ["aten", "fused"]
    n = len(calls)
    again = op(clips, 15, flip=True)  # decided once per shape
    assert len(calls) == n
    (entry,) = measured_here.preprocess_plan()
    assert entry["fused"] is want and entry["how"] == "tuned"  # 5% faster is within the margin
    for a, b in zip(*(x if isinstance(x, tuple) else (x,) for x in (first, again)), strict=True):
        assert torch.equal(a, b)
    if op is fovea_context:
        for got, ref in zip(first, reference.fovea_context(clips, 15, flip=True), strict=True):
            assert_matches(got, ref, std=(64.0,) * 3)
    else:
        assert_matches(first, reference.crop_normalize(clips, 15, flip=True), std=(64.0,) * 3)


@pytest.mark.parametrize("op", [fovea_context, crop_normalize], ids=lambda f: f.__name__)
def test_a_kernel_that_disagrees_or_raises_is_not_used(measured_here, monkeypatch, op) -> None:
    clips = make_clips(2, 2, 26, 26, seed=3)
    real = measured_here._kernel

    def wrong(*args):
        return tuple(t + 1 for t in real(*args))

    monkeypatch.setattr(measured_here, "_kernel", wrong)
    with pytest.warns(RuntimeWarning, match="kernel differs from plain PyTorch"):
        got = op(clips, 13, offsets=(2, 5))
    (entry,) = measured_here.preprocess_plan()
    assert not entry["fused"] and entry["how"] == "disagrees" and entry["rel_err"] > 0.1
    want = reference.crop_normalize(clips, 13, offsets=(2, 5))
    assert_matches(got[0] if isinstance(got, tuple) else got, want, std=(64.0,) * 3)
    # out= takes the plain path too.
    shape = (2, 3, 2, 13, 13)
    out = (torch.empty(shape), torch.empty(shape)) if op is fovea_context else torch.empty(shape)
    op(clips, 13, offsets=(2, 5), out=out)
    assert_matches(out[0] if isinstance(out, tuple) else out, want, std=(64.0,) * 3)

    measured_here.clear_preprocess_plan()

    def raising(*args):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(measured_here, "_kernel", raising)
    with pytest.warns(RuntimeWarning, match="kernel cannot run .* no kernel image"):
        got = op(clips, 13)
    assert measured_here.preprocess_plan()[0]["how"] == "raised"


def test_preprocess_knobs(measured_here, monkeypatch) -> None:
    calls: list[str] = []
    _timings(monkeypatch, measured_here, 1.0, 5.0, calls)
    plain_runs: list[int] = []
    real_plain = measured_here._plain

    def plain_spy(*args):
        plain_runs.append(1)
        return real_plain(*args)

    monkeypatch.setattr(measured_here, "_plain", plain_spy)
    clips = make_clips(1, 2, 20, 20, seed=1)
    want = reference.crop_normalize(clips, 10)
    for env, value, plain in [("VIDCONV_PREPROCESS", "aten", True),
                              ("VIDCONV_PREPROCESS", "fused", False),
                              ("VIDCONV_TUNE", "0", False), ("VIDCONV_CONV_ALGO", "aten", True)]:
        monkeypatch.setenv(env, value)
        plain_runs.clear()
        assert_matches(crop_normalize(clips, 10), want, std=(64.0,) * 3)
        assert bool(plain_runs) is plain, (env, value)
        monkeypatch.delenv(env)
    assert calls == [] and measured_here.preprocess_plan() == []  # nothing measured
    monkeypatch.setenv("VIDCONV_PREPROCESS", "bogus")
    with pytest.raises(ValueError, match="VIDCONV_PREPROCESS must be one of auto, fused, aten"):
        crop_normalize(clips, 10)


def test_low_contrast_first_batch_keeps_a_correct_kernel(measured_here, monkeypatch) -> None:
    # Outputs near zero (frames at the mean): the check is relative to the output range, not to
    # this batch's largest value.
    _timings(monkeypatch, measured_here, 1.0, 5.0, [])
    clips = torch.full((2, 2, 30, 30, 3), 117, dtype=torch.uint8)
    clips[..., ::2, :] = 118
    fovea_context(clips, 13)
    (entry,) = measured_here.preprocess_plan()
    assert entry["how"] == "tuned" and entry["fused"], entry


def test_a_plain_path_that_cannot_run_leaves_the_kernel(measured_here, monkeypatch) -> None:
    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(measured_here, "_plain", out_of_memory)
    with pytest.warns(RuntimeWarning, match="kernel runs there unchecked"):
        got = crop_normalize(make_clips(1, 1, 12, 12), 8)
    assert measured_here.preprocess_plan()[0]["how"] == "unchecked"
    assert_matches(got, reference.crop_normalize(make_clips(1, 1, 12, 12), 8), std=(64.0,) * 3)


def test_the_warning_points_at_the_callers_line(measured_here, monkeypatch) -> None:
    real = measured_here._kernel
    monkeypatch.setattr(measured_here, "_kernel", lambda *a: tuple(t + 1 for t in real(*a)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        crop_normalize(make_clips(1, 1, 12, 12), 8)
    (w,) = [c for c in caught if "differs from plain PyTorch" in str(c.message)]
    assert w.filename == __file__


def test_the_cpu_kernel_is_not_measured(monkeypatch) -> None:
    from vidconv.ops import preprocess

    monkeypatch.delenv("VIDCONV_PREPROCESS", raising=False)  # auto, as users run it
    preprocess.clear_preprocess_plan()
    crop_normalize(make_clips(1, 1, 12, 12), 8)
    assert preprocess.preprocess_plan() == []


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_cuda_kernel_is_checked_and_timed_before_use(dtype: torch.dtype) -> None:
    from vidconv.ops import preprocess

    preprocess.clear_preprocess_plan()
    clips = make_clips(4, 10, 178, 178, seed=2, device="cuda")
    fovea, context = fovea_context(clips, 89, dtype=dtype)
    (entry,) = preprocess.preprocess_plan()
    # The kernel agreed with plain PyTorch ("noisy": agreed, but a busy GPU timed unevenly).
    assert entry["how"] in ("tuned", "noisy"), entry
    assert entry["rel_err"] <= preprocess._tolerance(dtype)
    ref_f, ref_c = reference.fovea_context(clips.cpu(), 89)
    assert_matches(fovea, ref_f, std=(64.0,) * 3)
    assert_matches(context, ref_c, std=(64.0,) * 3)
