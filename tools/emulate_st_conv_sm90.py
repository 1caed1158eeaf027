"""Check the Hopper st_conv3d kernel without a GPU: run every thread of every block on the CPU.

Builds tools/emulate_st_conv_sm90.cu with nvcc (host code; it includes
csrc/cuda/st_conv3d_sm90_kernel.cu and runs the kernel's own block routine, one host thread per
device thread, with mbarrier (arrivals and transaction bytes), wgmma, the 128B swizzle, cp.async
and cp.async.bulk modelled from the PTX ISA, and the weight repacked by the kernel's own code),
over the awkward and paper-layer shapes of tools/emulate_st_conv.py, for float16 and bfloat16,
with a small persistent grid (so blocks run several tiles through one pipeline) and with one
block per tile, and for every case checks:

- every shared-memory slot of every stage, at every completion of its "full" barrier, holds the
  implicit-im2col / (unpacked) weight element that the persistent schedule puts there (zero past
  an edge, in padding, past K or past the reduction), read through the swizzle model;
- no synchronisation misuse the model can see: a stage released while its wgmma are in flight,
  a wgmma without wgmma.fence or without fence.proxy.async after the wait, uncommitted wgmma,
  barriers left mid-phase, shared accesses outside the launch's dynamic shared memory; a
  deadlock ends the run;
- every output element is written exactly once (write counters; the output starts as NaN);
- with split-K (``split`` > 1): every work unit stores its whole partial tile exactly once and
  arrives exactly once on its tile's counter; no partial is stored after its unit's arrival or
  read before it; the release (stores, consumer barrier, gpu-scope fence, then the arrival) and
  acquire (fence after the last arrival, then the barrier, then the reads) orderings hold; and
  blocks run in a chosen order (``order``: ascending, descending, shuffled), so which unit of a
  tile arrives last varies between runs of one case;
- with ``groups`` = 2 (a grouped launch of two problems of one shape): every stage against the
  problem its work unit belongs to, both outputs written once and right;
- the output matches float64 ``F.conv3d`` + bias + ReLU on the same (rounded) inputs within
  1e-2 of the largest reference value.

What it cannot check: anything about real hardware (timing, the actual asynchrony of cp.async
and wgmma beyond the orderings above, bank conflicts, speed), and a misreading of the PTX ISA
shared by kernel and model would not show.

Usage: python tools/emulate_st_conv_sm90.py [--quick] [--keep DIR]
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from emulate_st_conv import CASES, random_cases  # noqa: E402
from emulation import drive  # noqa: E402

TYPES = {torch.float16: 1, torch.bfloat16: 2}
TOL = 1e-2
STATS_ZERO = ("bad_smem", "smem_oob", "sync_errors", "unwritten", "rewritten", "ws_errors",
              "ws_unstored", "counter_errors")

# Shapes for split-K: few tiles, long reductions (a 7x7-like layer across a 128-filter edge), and
# a reduction of 9 tiles (no split in {2, 4, 8} divides it) over two filter tiles.
SPLIT_CASES = [
    ("conv5_7x7", 1, 128, 130, (1, 3, 3), (1, 1, 1), (0, 1, 1), (1, 7, 7)),
    ("c64_k9tiles", 2, 64, 160, (1, 3, 3), (1, 1, 1), (0, 1, 1), (1, 5, 6)),
]

# Shapes aimed at this kernel's tiles (128 x 128 x 64): K across a 128-filter edge, a reduction
# of exactly one and just over one 64-wide tile, M exactly one tile and one past it.
SM90_CASES = [
    ("k129_r64", 1, 64, 129, (1, 1, 1), (1, 1, 1), (0, 0, 0), (1, 4, 32)),
    ("r72_m129", 1, 8, 40, (1, 3, 3), (1, 1, 1), (0, 1, 1), (1, 3, 43)),
    ("k256_3taps", 2, 24, 256, (3, 1, 1), (1, 1, 1), (1, 0, 0), (3, 4, 5)),
]


def build(work: Path, kernel_root: Path = ROOT) -> Path:
    """Compiles the emulator into `work` against the kernel under kernel_root/csrc."""
    exe = work / "emulate_st_conv_sm90"
    subprocess.run(["nvcc", "-std=c++17", "-O2", "-arch=sm_80", "-diag-suppress", "20011",
                    f"-I{kernel_root / 'csrc'}", "-o", str(exe),
                    str(ROOT / "tools/emulate_st_conv_sm90.cu"), "-lpthread"], check=True)
    return exe


def run_case(exe: Path, work: Path, case: tuple, dtype: torch.dtype, relu: bool,
             has_bias: bool, seed: int, grid: int = 0, split: int = 1,
             order: int = 0, groups: int = 1) -> tuple[bool, str]:
    """Emulate one launch and compare; the output stays in work/out.bin (and out1.bin).

    `grid` persistent blocks (0 = one per work unit), `split` reduction slices per tile, blocks
    run in `order` (0 ascending, 1 descending, >1 a permutation seeded by it), `groups` 2: a
    grouped launch of two problems of the case's sizes with their own random tensors.
    """
    name, n, c, k, ks, st, pd, thw = case
    gen = torch.Generator().manual_seed(seed)
    cp = -(-c // 8) * 8
    refs = []
    for g in range(groups):
        suffix = "" if g == 0 else "1"
        x = torch.randn(n, c, *thw, generator=gen).to(dtype)
        w = (torch.randn(k, c, *ks, generator=gen) / math.sqrt(c * math.prod(ks))).to(dtype)
        b = (torch.randn(k, generator=gen) * 0.5 + 0.5) if has_bias else None
        # The launcher's layout: NTHWC and (K, kt, kh, kw, C), C zero-padded to 8.
        xp = torch.zeros(n, *thw, cp, dtype=dtype)
        xp[..., :c] = x.permute(0, 2, 3, 4, 1)
        wp = torch.zeros(k, *ks, cp, dtype=dtype)
        wp[..., :c] = w.permute(0, 2, 3, 4, 1)
        xp.view(torch.uint8).numpy().tofile(work / f"x{suffix}.bin")
        wp.view(torch.uint8).numpy().tofile(work / f"w{suffix}.bin")
        if b is not None:
            b.float().numpy().tofile(work / f"b{suffix}.bin")
        ref = F.conv3d(x.double(), w.double(), None if b is None else b.double(), st, pd)
        refs.append(ref.clamp_min(0) if relu else ref)
    args = [TYPES[dtype], grid, split, order, groups, n, cp, *thw, k, *ks, *st, *pd, int(relu),
            int(has_bias)]
    res = subprocess.run([str(exe), *map(str, args), str(work)], capture_output=True, text=True,
                         timeout=600)
    if res.returncode != 0:
        return False, f"{name:15s} {str(dtype):15s} emulator failed ({res.returncode}): " + \
            res.stderr.strip()[-500:]
    stats = dict(kv.split("=") for kv in res.stdout.split())
    err, nan = 0.0, False
    for g, ref in enumerate(refs):
        raw = torch.frombuffer(bytearray((work / f"out{'' if g == 0 else '1'}.bin").read_bytes()),
                               dtype=torch.uint8)
        out = raw.view(dtype).reshape(n, *ref.shape[2:], k).permute(0, 4, 1, 2, 3).double()
        scale = ref.abs().max().item()
        err = max(err, (out - ref).abs().max().item() / (scale if scale > 0 else 1.0))
        nan = nan or out.isnan().any().item()
    ok = all(stats[key] == "0" for key in STATS_ZERO) and not nan and err < TOL
    line = (f"{name:15s} {str(dtype):15s} tile={stats['tile']} blocks={stats['blocks']:>3s} "
            f"units={stats['units']} tiles={stats['tiles']} k_tiles={stats['k_tiles']} "
            f"split={stats['split']} groups={stats['groups']} order={order} relu={int(relu)} "
            f"bias={int(has_bias)} outputs={stats['outputs']:>6s} "
            + " ".join(f"{key}={stats[key]}" for key in STATS_ZERO)
            + f" rel_err={err:.2e} {'OK' if ok else 'FAIL'}")
    if res.stderr.strip():
        line += "\n    " + res.stderr.strip()[-500:]
    return ok, line


def split_cases(work: Path, exe: Path, quick: bool) -> list[tuple[bool, str]]:
    """Split-K runs: each case at splits 2/4/8 (as far as its reduction allows), with a small
    persistent grid and one block per unit, in three block orders; the output must be
    bit-identical across orders (the slice-ordered reduction does not depend on which unit of a
    tile arrives last). Returns (ok, line) per run."""
    results = []
    cases = SPLIT_CASES[:1] if quick else SPLIT_CASES + [CASES[5], CASES[8]]
    for i, case in enumerate(cases):
        dtype = (torch.bfloat16, torch.float16)[i % 2]
        k_tiles = -(-math.prod(case[4]) * -(-case[2] // 8) // 8)
        for split in (2, 4, 8):
            if split > k_tiles:
                continue
            grid = (3, 0)[(i + split) % 2]
            outputs = []
            for order in (0, 1, 7):
                ok, line = run_case(exe, work, case, dtype, relu=split != 4, has_bias=True,
                                    seed=i, grid=grid, split=split, order=order)
                outputs.append((work / "out.bin").read_bytes() if ok else b"")
                results.append((ok, line))
            same = all(o == outputs[0] and o for o in outputs)
            results.append((same, f"{case[0]:15s} {str(dtype):15s} split={split} grid={grid}: "
                                  f"outputs bit-identical across block orders "
                                  f"{'OK' if same else 'FAIL'}"))
    return results


def runs(exe: Path, work: Path, quick: bool):
    if quick:
        cases = [CASES[3], CASES[8], CASES[11], *SM90_CASES[:2]]
    else:
        cases = CASES + SM90_CASES + random_cases(8, seed=11)
    yield from split_cases(work, exe, quick=quick)
    for i, case in enumerate(cases):
        for j, dtype in enumerate(TYPES):
            # Alternate a 2-block persistent grid (several tiles per block) with one block per
            # tile, ReLU and bias on and off.
            yield run_case(exe, work, case, dtype, relu=(i + j) % 3 != 0,
                           has_bias=(i + j) % 4 != 1, seed=100 * i + j,
                           grid=2 if (i + j) % 2 == 0 else 0)


def main(argv: list[str] | None = None) -> int:
    return drive(argv, __doc__, "emulate_st_conv_sm90_", build, runs,
                 quick_help="a few edge cases only (what the test suite runs)")


if __name__ == "__main__":
    sys.exit(main())
