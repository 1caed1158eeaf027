"""Check the lrn_max_pool CUDA kernel without a GPU: step every block and thread on the CPU.

Builds tools/emulate_lrn_max_pool.cu with nvcc (host code; it includes
csrc/cuda/lrn_max_pool_kernel.cu and runs the kernel's own launch plan and per-thread phases),
runs it over awkward shapes (channel counts below, at and above the vector width and not a
multiple of it, LRN windows wider than the channels, odd and prime frame sizes, partial ceil_mode
windows, misaligned pointers for the scalar path) and the paper's conv1/conv2 stages at reduced
size, for float32, float16, bfloat16 and float64, and for every case checks:

- every shared-memory entry of every loaded row is the square of its channel or zero padding;
- every output element is written exactly once (write counters; the output starts as NaN);
- the output matches float64 ``F.local_response_norm`` + ``F.max_pool3d`` on the same (rounded)
  input within one rounding of the output type (float64: 1e-12), relative to the largest
  magnitude.

What it cannot check: anything about real hardware (barrier placement beyond the phase order,
bank conflicts, speed, rsqrtf's last bits: the host uses 1 / sqrt).

Usage: python tools/emulate_lrn_max_pool.py [--quick] [--keep DIR]
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/emulation.py, beside this file
from emulation import drive  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
# float32: each channel's window is summed afresh, a few roundings of the squares and the power.
TOL = {torch.float32: 1e-5, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7,
       torch.float64: 1e-12}

# (name, N, T, C, H, W, (kh, kw), size, alpha, beta, k, ceil_mode, misalign)
CASES = [
    ("paper_conv1", 1, 2, 96, 11, 11, (2, 2), 5, 1e-4, 0.5, 2.0, True, False),
    ("paper_conv2", 1, 1, 256, 5, 7, (2, 2), 5, 1e-4, 0.5, 2.0, True, False),
    ("c1", 1, 1, 1, 1, 1, (2, 2), 5, 1e-4, 0.5, 2.0, True, False),
    ("c3_size7", 2, 1, 3, 5, 4, (2, 2), 7, 0.5, 0.75, 1.0, True, False),
    ("c13_prime", 1, 3, 13, 7, 5, (2, 3), 5, 0.3, 0.5, 2.0, True, False),
    ("c13_floor", 1, 1, 13, 7, 5, (2, 2), 4, 0.3, 0.5, 2.0, False, False),
    ("c24_misaligned", 1, 2, 24, 5, 5, (2, 2), 5, 0.2, 0.5, 2.0, True, True),
    ("c17_pool1", 2, 1, 17, 3, 3, (1, 1), 2, 0.4, 1.0, 1.5, False, False),
    ("c64_pool3", 1, 1, 64, 8, 7, (3, 3), 5, 0.1, 0.5, 2.0, True, False),
    ("c2048_many", 1, 1, 2048, 2, 2, (2, 2), 5, 0.1, 0.5, 2.0, True, False),
    # One inf activation: NaN in its own channel (inf / inf) and 0 beside it, as the reference;
    # every other channel of its thread's group stays finite.
    ("c24_inf", 1, 1, 24, 4, 4, (2, 2), 5, 1e-4, 0.5, 2.0, True, False),
]
# Where a case named *_inf puts its inf: (n, c, t, h, w).
INF_AT = (0, 9, 0, 1, 2)


def random_cases(count: int, seed: int) -> list[tuple]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        ceil_mode = rng.random() < 0.7
        pool = (rng.randint(1, 3), rng.randint(1, 3))
        low = (1, 1) if ceil_mode else pool  # floor mode needs a whole window
        out.append((f"random{i}", rng.randint(1, 2), rng.randint(1, 2),
                    rng.choice([1, 2, 5, 8, 9, 31, 32, 40, 96]), rng.randint(low[0], 9),
                    rng.randint(low[1], 9), pool,
                    rng.choice([1, 2, 3, 5, 6]), rng.choice([1e-4, 0.5]),
                    rng.choice([0.5, 0.75]), rng.choice([1.0, 2.0]), ceil_mode,
                    rng.random() < 0.3))
    return out


def build(work: Path) -> Path:
    exe = work / "emulate_lrn_max_pool"
    subprocess.run(["nvcc", "-std=c++17", "-O2", "-arch=sm_80", "-diag-suppress", "20011",
                    f"-I{ROOT / 'csrc'}", "-o",
                    str(exe), str(ROOT / "tools/emulate_lrn_max_pool.cu")], check=True)
    return exe


def run_case(exe: Path, work: Path, case: tuple, dtype: torch.dtype, seed: int
             ) -> tuple[bool, str]:
    name, n, t, c, h, w, pool, size, alpha, beta, k, ceil_mode, misalign = case
    gen = torch.Generator().manual_seed(seed)
    # ReLU'd activations of a convolution, large enough that the LRN term matters.
    x = (torch.randn(n, c, t, h, w, generator=gen) * 20).clamp_min(0).to(dtype)
    if name.endswith("_inf"):
        x[INF_AT] = float("inf")
    x.permute(0, 2, 3, 4, 1).contiguous().view(torch.uint8).numpy().tofile(work / "x.bin")
    args = [TYPES[dtype], n, t, c, h, w, *pool, size, alpha, beta, k, int(ceil_mode),
            int(misalign), work]
    res = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True,
                         check=True)
    if res.stdout.startswith("refused=1"):
        return False, f"{name:15s} {str(dtype):15s} {res.stdout.strip()} FAIL"
    stats = dict(kv.split("=", 1) for kv in res.stdout.split())
    window = (1, *pool)
    ref = F.max_pool3d(F.local_response_norm(x.double(), size, alpha, beta, k), window, window,
                       ceil_mode=ceil_mode)
    raw = torch.frombuffer(bytearray((work / "out.bin").read_bytes()), dtype=torch.uint8)
    out = raw.view(dtype).reshape(n, t, *ref.shape[3:], c).permute(0, 4, 1, 2, 3).double()
    same_nan = torch.equal(out.isnan(), ref.isnan())
    out, ref = out.nan_to_num(0.0), ref.nan_to_num(0.0)
    scale = ref.abs().max().item()
    err = (out - ref).abs().max().item() / (scale if scale > 0 else 1.0)
    ok = (stats["bad_smem"] == "0" and stats["unwritten"] == "0" and stats["rewritten"] == "0"
          and same_nan and err <= TOL[dtype])
    line = (f"{name:15s} {str(dtype):15s} vector={stats['vector']} threads={stats['threads']:>4s} "
            f"positions={stats['positions']:>3s} outputs={stats['outputs']:>6s} "
            f"bad_smem={stats['bad_smem']} unwritten={stats['unwritten']} "
            f"rewritten={stats['rewritten']} rel_err={err:.2e} {'OK' if ok else 'FAIL'}")
    return ok, line


def runs(exe: Path, work: Path, quick: bool):
    cases = CASES + ([] if quick else random_cases(16, seed=11))
    for i, case in enumerate(cases):
        for j, dtype in enumerate(TYPES):
            yield run_case(exe, work, case, dtype, seed=10 * i + j)


def main(argv: list[str] | None = None) -> int:
    return drive(argv, __doc__, "emulate_lrn_max_pool_", build, runs)


if __name__ == "__main__":
    sys.exit(main())
