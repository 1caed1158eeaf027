"""A small, complete workload for compute-sanitizer: every vidconv CUDA kernel, once per path.

Run under ``compute-sanitizer --tool memcheck|racecheck|synccheck`` by benchmarks/gpu_check.py;
shapes are small (the tools slow kernels down 10-100x) but awkward, and on CUDA every tile of
the fused convolution kernel is forced in turn: odd sizes, C=3 (the
channel-padding path), a ragged last tile, a channels_last_3d view at an odd storage offset
(the 16-byte alignment fallback), every dtype the kernels take, forward and backward. Each
result is also compared with vidconv.reference, so a run that the tool reports clean but that
computes garbage still fails.

``--device cpu`` runs the same workload through the CPU kernels (the GPU check's dry run, so
the script cannot rot between lent GPUs).

Usage: python tools/sanitize_kernels.py [--device cuda|cpu] [--only NAME[,NAME...]]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

import torch

from vidconv import reference
from vidconv.ops import crop_normalize, fovea_context, lrn_max_pool, st_conv3d, use_conv_algo
from vidconv.ops.conv_algos import fused_tile_configs
from vidconv.ops.conv_planner import algorithm_names

# The preprocessing kernel itself, not the plain-PyTorch path its measured choice could fall
# back to.
os.environ["VIDCONV_PREPROCESS"] = "fused"

TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 3e-2, torch.float64: 1e-10}


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.detach().to(torch.float64).cpu()
    scale = max(ref.abs().max().item(), 1e-12)
    return ((out.detach().to(torch.float64).cpu() - ref).abs().max() / scale).item()


def _clips(n: int, t: int, h: int, w: int, device: str, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, t, h, w, 3), generator=gen, dtype=torch.uint8).to(device)


def check_fovea_context(device: str) -> None:
    clips = _clips(3, 2, 37, 41, device, seed=1)
    for dtype in (torch.float32, torch.bfloat16):
        for fmt in (torch.contiguous_format, torch.channels_last_3d):
            fovea, context = fovea_context(clips, size=17, flip=torch.tensor([True, False, True]),
                                           dtype=dtype, memory_format=fmt)
            ref_f, ref_c = reference.fovea_context(clips.cpu(), size=17,
                                                   flip=torch.tensor([True, False, True]))
            assert _rel_err(fovea, ref_f) < TOL[dtype], "fovea stream differs from the reference"
            assert _rel_err(context, ref_c) < TOL[dtype], "context stream differs"


def check_crop_normalize(device: str) -> None:
    clips = _clips(2, 3, 29, 31, device, seed=2)
    offsets = torch.tensor([[0, 0], [6, 10]])
    for dtype in (torch.float32, torch.float16):
        out = crop_normalize(clips, size=19, offsets=offsets, flip=True, dtype=dtype)
        ref = reference.crop_normalize(clips.cpu(), size=19, offsets=offsets, flip=True)
        assert _rel_err(out, ref) < TOL[dtype], "crop_normalize differs from the reference"
        # Into a given tensor one element past 16-byte alignment: the chunk stores' head and
        # tail, every byte of the write checked by the sanitizer.
        base = torch.full((out.numel() + 1,), float("nan"), dtype=dtype, device=device)
        shifted = base[1:].view(out.shape)
        crop_normalize(clips, size=19, offsets=offsets, flip=True, dtype=dtype, out=shifted)
        assert torch.equal(shifted, out), "crop_normalize(out=) differs from its own result"


def _conv_inputs(n, c, k, ksize, thw, device, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, *thw, generator=gen)
    w = torch.randn(k, c, *ksize, generator=gen) / (c * ksize[0] * ksize[1] * ksize[2]) ** 0.5
    b = torch.randn(k, generator=gen) * 0.5 + 0.5
    return (x.to(device, dtype), w.to(device, dtype), b.to(device, dtype))


# (C, K, kernel, stride, padding, (T, H, W)): conv1-like with C=3, a ragged K and positions,
# slow fusion conv2-like temporal stride, a 1x1x1 and a padded 3x3x3.
CONV_CASES = [
    (3, 13, (2, 5, 5), (1, 2, 2), (0, 1, 1), (3, 13, 11)),
    (16, 70, (3, 3, 3), (1, 1, 1), (1, 1, 1), (4, 9, 7)),
    (24, 8, (2, 3, 3), (2, 1, 1), (0, 1, 1), (4, 5, 6)),
    (8, 65, (1, 1, 1), (1, 1, 1), (0, 0, 0), (1, 5, 5)),
]


def _algos(device: str, dtype: torch.dtype) -> list[str]:
    """Every tile of the fused kernel on CUDA (the measured dispatch might otherwise pick cuDNN
    and leave our kernel unchecked); the dispatch's own choice on the CPU."""
    if device != "cuda":
        return ["auto"]
    tiles = fused_tile_configs().get(str(dtype).removeprefix("torch."), [])
    assert tiles, f"the extension reports no fused tiles for {dtype}"
    # the Hopper kernel where this device and build have it (forcing it elsewhere would only
    # run the reference)
    hopper = [name for name in algorithm_names() if name.startswith("fused_sm90")
              and dtype != torch.float32 and torch.cuda.get_device_capability() == (9, 0)]
    return [f"fused_{t}" for t in tiles] + hopper


def check_st_conv3d(device: str) -> None:
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    for i, (c, k, ksize, stride, padding, thw) in enumerate(CONV_CASES):
        for dtype in dtypes:
            for algo in _algos(device, dtype):
                x, w, b = _conv_inputs(2, c, k, ksize, thw, device, dtype, seed=i)
                x.requires_grad_(True)
                w.requires_grad_(True)
                with use_conv_algo(algo):
                    out = st_conv3d(x, w, b, stride, padding)
                    out.float().square().sum().backward()
                ref = reference.st_conv3d_reference(x.detach().cpu(), w.detach().cpu(),
                                                    b.cpu(), stride, padding, "relu")
                assert _rel_err(out, ref) < TOL[dtype], f"st_conv3d {algo} case {i} {dtype}"
                assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()
    # channels_last_3d view at an odd element offset, C a multiple of 8: read in place would be
    # misaligned for 16-byte copies, so the launcher must copy it first.
    n, c, t, h, wd = 2, 16, 3, 7, 6
    for dtype in (torch.float16, torch.bfloat16):
        x, w, b = _conv_inputs(n, c, 9, (2, 3, 3), (t, h, wd), "cpu", torch.float32, seed=7)
        flat = torch.zeros(x.numel() + 1, dtype=dtype, device=device)
        xv = flat[1:].view(n, t, h, wd, c).permute(0, 4, 1, 2, 3)
        xv.copy_(x)
        ref = reference.st_conv3d_reference(xv.cpu(), w.to(dtype), b.to(dtype), 1, (0, 1, 1),
                                            "relu")
        for algo in _algos(device, dtype):
            with use_conv_algo(algo):
                out = st_conv3d(xv, w.to(device, dtype), b.to(device, dtype), 1, (0, 1, 1))
            assert _rel_err(out, ref) < TOL[dtype], f"misaligned view {algo} {dtype}"


# (N, C, T, H, W, pool, ceil_mode): ragged borders under ceil mode, C not a multiple of the
# 16-byte vector (scalar path), C a multiple of it (vector path), a window larger than 2x2.
LRN_CASES = [(2, 7, 1, 9, 11, (2, 2), True), (1, 16, 2, 8, 6, (2, 2), False),
             (2, 24, 1, 7, 5, (3, 2), True)]


def check_lrn_max_pool(device: str) -> None:
    for i, (n, c, t, h, w, pool, ceil) in enumerate(LRN_CASES):
        gen = torch.Generator().manual_seed(i)
        base = torch.rand(n, c, t, h, w, generator=gen) * 4
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            for fmt in (torch.contiguous_format, torch.channels_last_3d):
                x = base.to(device, dtype).contiguous(memory_format=fmt).detach()
                x.requires_grad_(True)
                out = lrn_max_pool(x, 5, 1e-4, 0.5, 2.0, pool, ceil)
                out.float().square().sum().backward()
                ref = reference.lrn_max_pool_reference(base.to(dtype), 5, 1e-4, 0.5, 2.0, pool,
                                                       ceil)
                assert _rel_err(out, ref) < TOL[dtype], f"lrn_max_pool case {i} {dtype} {fmt}"
                assert torch.isfinite(x.grad).all(), f"lrn_max_pool grad case {i} {dtype}"


def check_sm90_grouped(device: str) -> None:
    """The Hopper kernel's two-problem launch (the multires streams), split and unsplit."""
    if device != "cuda" or torch.cuda.get_device_capability() != (9, 0) or not any(
            name.startswith("fused_sm90") for name in algorithm_names()):
        print("skip   sm90_grouped: needs a compute capability 9.0 device and a 9.0a build")
        return
    c, k, ksize, stride, padding, thw = 16, 24, (1, 3, 3), (1, 1, 1), (0, 1, 1), (2, 9, 7)
    for dtype in (torch.float16, torch.bfloat16):
        pairs = [_conv_inputs(2, c, k, ksize, thw, device, dtype, seed=s) for s in (11, 12)]
        for split in (1, 2):
            outs = torch.ops.vidconv.st_conv3d_fused_sm90_grouped(
                *pairs[0], *pairs[1], list(stride), list(padding), True, split)
            for (x, w, b), out in zip(pairs, outs, strict=True):
                ref = reference.st_conv3d_reference(x.cpu(), w.cpu(), b.cpu(), stride, padding,
                                                    "relu")
                assert _rel_err(out, ref) < TOL[dtype], f"sm90 grouped split {split} {dtype}"


CHECKS: dict[str, Callable[[str], None]] = {
    "fovea_context": check_fovea_context,
    "crop_normalize": check_crop_normalize,
    "st_conv3d": check_st_conv3d,
    "lrn_max_pool": check_lrn_max_pool,
    "sm90_grouped": check_sm90_grouped,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--only", default=",".join(CHECKS),
                        help=f"comma-separated checks (default: all: {','.join(CHECKS)})")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - set(CHECKS))
    if unknown:
        parser.error(f"--only: unknown check(s) {unknown}; choose from {sorted(CHECKS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("sanitize_kernels: error: --device cuda but no CUDA device is available",
              file=sys.stderr)
        return 2
    failed = 0
    for name in names:
        t0 = time.perf_counter()
        try:
            CHECKS[name](args.device)
            if args.device == "cuda":
                torch.cuda.synchronize()
        except AssertionError as e:
            failed += 1
            print(f"FAILED {name}: {e}")
            continue
        print(f"ok     {name} ({time.perf_counter() - t0:.1f} s, {args.device})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
