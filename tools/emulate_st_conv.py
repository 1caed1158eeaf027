"""Check the st_conv3d CUDA kernel without a GPU: step every block and thread on the CPU.

Builds tools/emulate_st_conv.cu with nvcc (host code; it includes
csrc/cuda/st_conv3d_kernel.cu and calls the kernel's own __host__ __device__ loader, fp32 stage,
ldmatrix lane offsets and epilogues), runs it over awkward shapes and the paper's layer shapes
for float32, float16 and bfloat16, in every tile configuration the launcher can run (the
emulator lists them from the kernel file), and for every case checks:

- every shared-memory slot of every stage of every block holds exactly the implicit-im2col or
  weight element it should (zero past an edge, in padding or past the reduction), and no skew
  column is written (reported by the emulator);
- every output element is written exactly once (write counters; the output starts as NaN);
- the output matches float64 ``F.conv3d`` + bias + ReLU on the same (rounded) inputs: relative
  error < 1e-5 for float32, < 1e-2 for float16/bfloat16 (max abs error / max abs reference).

What it cannot check: anything about real hardware (cp.async asynchrony and the wait_group
counts, barriers, bank conflicts, speed); ldmatrix/mma.sync are modelled from the PTX ISA
fragment tables, so a misreading of those tables shared by kernel and model would not show.

Usage: python tools/emulate_st_conv.py [--quick] [--keep DIR]
"""

from __future__ import annotations

import math
import random
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/emulation.py, beside this file
from emulation import drive  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TYPES = {torch.float32: (0, 4), torch.float16: (1, 8), torch.bfloat16: (2, 8)}
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}

# (name, N, C, K, (kt, kh, kw), stride, padding, (T, H, W)): the paper's layers at reduced
# spatial size, plus shapes aimed at the edges (ragged M and K tiles, C below/above the vector
# width, padding larger than the kernel's reach, N*T'*H'*W' exactly a tile).
CASES = [
    ("slow_conv1", 1, 3, 96, (4, 11, 11), (2, 3, 3), (0, 0, 0), (6, 23, 20)),
    ("early_conv1", 1, 3, 96, (10, 11, 11), (1, 3, 3), (0, 0, 0), (10, 14, 17)),
    ("single_conv1", 2, 3, 96, (1, 11, 11), (1, 3, 3), (0, 0, 0), (1, 26, 23)),
    ("slow_conv2", 1, 96, 256, (2, 5, 5), (2, 1, 1), (0, 2, 2), (4, 7, 6)),
    ("slow_conv3", 1, 256, 384, (2, 3, 3), (1, 1, 1), (0, 1, 1), (2, 5, 4)),
    ("conv4", 2, 384, 384, (1, 3, 3), (1, 1, 1), (0, 1, 1), (1, 4, 3)),
    ("conv5", 1, 384, 256, (1, 3, 3), (1, 1, 1), (0, 1, 1), (1, 7, 7)),
    ("c1_k1", 1, 1, 1, (1, 1, 1), (1, 1, 1), (0, 0, 0), (1, 1, 1)),
    ("c5_k65_pad", 2, 5, 65, (3, 2, 5), (1, 2, 1), (2, 1, 3), (3, 6, 7)),
    ("c12_k70_stride", 3, 12, 70, (2, 3, 3), (2, 3, 2), (1, 0, 1), (5, 13, 12)),
    ("m_exact_tile", 2, 8, 64, (1, 1, 1), (1, 1, 1), (0, 0, 0), (2, 4, 8)),
    ("c13_k7_odd", 1, 13, 7, (5, 1, 3), (3, 1, 2), (2, 0, 1), (7, 5, 9)),
]


def random_cases(count: int, seed: int) -> list[tuple]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        ks = (rng.choice([1, 2, 3, 4]), rng.randint(1, 7), rng.randint(1, 7))
        st = tuple(rng.randint(1, 3) for _ in range(3))
        pd = tuple(rng.randint(0, k) for k in ks)
        o = (rng.randint(1, 3), rng.randint(1, 6), rng.randint(1, 6))
        thw = tuple(max(1, (a - 1) * s + k - 2 * p) for a, s, k, p in zip(o, st, ks, pd,
                                                                          strict=True))
        out.append((f"random{i}", rng.randint(1, 3), rng.choice([1, 3, 4, 8, 9, 17]),
                    rng.choice([1, 13, 63, 64, 65, 129]), ks, st, pd, thw))
    return out


def build(work: Path) -> Path:
    exe = work / "emulate_st_conv"
    subprocess.run(["nvcc", "-std=c++17", "-O2", "-arch=sm_80", "-diag-suppress", "20011",
                    f"-I{ROOT / 'csrc'}", "-o", str(exe), str(ROOT / "tools/emulate_st_conv.cu")],
                   check=True)
    return exe


def tiles(exe: Path, dtype: torch.dtype) -> list[str]:
    """The kernel's tile names for `dtype`, index = tile_config."""
    res = subprocess.run([str(exe), "--tiles", str(TYPES[dtype][0])], capture_output=True,
                         text=True, check=True)
    return res.stdout.split()


def run_case(exe: Path, work: Path, case: tuple, dtype: torch.dtype, relu: bool,
             has_bias: bool, seed: int, tile: int = 0) -> tuple[bool, str]:
    name, n, c, k, ks, st, pd, thw = case
    code, mult = TYPES[dtype]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, *thw, generator=gen).to(dtype)
    w = (torch.randn(k, c, *ks, generator=gen) / math.sqrt(c * math.prod(ks))).to(dtype)
    b = (torch.randn(k, generator=gen) * 0.5 + 0.5) if has_bias else None
    cp = -(-c // mult) * mult
    # The launcher's layout: NTHWC and (K, kt, kh, kw, C), C zero-padded to the vector width.
    xp = torch.zeros(n, *thw, cp, dtype=dtype)
    xp[..., :c] = x.permute(0, 2, 3, 4, 1)
    wp = torch.zeros(k, *ks, cp, dtype=dtype)
    wp[..., :c] = w.permute(0, 2, 3, 4, 1)
    xp.view(torch.uint8).numpy().tofile(work / "x.bin")
    wp.view(torch.uint8).numpy().tofile(work / "w.bin")
    if b is not None:
        b.float().numpy().tofile(work / "b.bin")
    args = [code, tile, n, cp, *thw, k, *ks, *st, *pd, int(relu), int(has_bias)]
    res = subprocess.run([str(exe), *map(str, args), str(work)], capture_output=True, text=True,
                         check=True)
    stats = dict(kv.split("=") for kv in res.stdout.split())
    ref = F.conv3d(x.double(), w.double(), None if b is None else b.double(), st, pd)
    if relu:
        ref = ref.clamp_min(0)
    raw = torch.frombuffer(bytearray((work / "out.bin").read_bytes()), dtype=torch.uint8)
    out = raw.view(dtype).reshape(n, *ref.shape[2:], k).permute(0, 4, 1, 2, 3).double()
    scale = ref.abs().max().item()
    # An all-zero reference (a single output under ReLU, say) is compared absolutely.
    err = (out - ref).abs().max().item() / (scale if scale > 0 else 1.0)
    ok = (stats["bad_smem"] == "0" and stats["bad_skew"] == "0" and stats["unwritten"] == "0"
          and stats["rewritten"] == "0" and not out.isnan().any().item()
          and err < TOL[dtype])
    line = (f"{name:15s} {str(dtype):15s} tile={stats['tile']:10s} relu={int(relu)} "
            f"bias={int(has_bias)} "
            f"outputs={stats['outputs']:>6s} bad_smem={stats['bad_smem']} "
            f"bad_skew={stats['bad_skew']} unwritten={stats['unwritten']} "
            f"rewritten={stats['rewritten']} rel_err={err:.2e} {'OK' if ok else 'FAIL'}")
    return ok, line


def runs(exe: Path, work: Path, quick: bool):
    cases = CASES + ([] if quick else random_cases(12, seed=7))
    for i, case in enumerate(cases):
        for j, dtype in enumerate(TYPES):
            relu = (i + j) % 3 != 0
            for tile in range(len(tiles(exe, dtype))):
                yield run_case(exe, work, case, dtype, relu, has_bias=(i + j + tile) % 4 != 1,
                               seed=100 * i + 10 * tile + j, tile=tile)


def main(argv: list[str] | None = None) -> int:
    return drive(argv, __doc__, "emulate_st_conv_", build, runs)


if __name__ == "__main__":
    sys.exit(main())
