"""Check the fovea_context / crop_normalize CUDA kernel without a GPU: step every block and
thread on the CPU.

Builds tools/emulate_fovea_context.cu with nvcc (host code; it includes
csrc/cuda/fovea_context_kernel.cu and runs the kernel's own launch plan, band geometry and
phases), runs it over awkward shapes (the paper's 178 -> 89 and 200 -> 170, odd and prime
sizes, H != W, non-integer context ratios, a 1-pixel output, a frame exactly the output size,
frames too wide to stage, which take the direct path) in both memory formats, with and without
the context stream, with clips and outputs off 16-byte alignment (the chunk stores' head and
tail), for float32, float16 and bfloat16, and for every case checks:

- every band reads frame rows within the frame and stages no more rows than planned;
- every staged byte equals the frame's, and the bin tables equal the bins;
- every output element is written exactly once (write counters; outputs start as NaN), every
  16-byte store is aligned and lands inside its output;
- the outputs equal the CPU kernel's (``vidconv.ops``) bit for bit, as the kernel promises.

What it cannot check: anything about real hardware (speed, coalescing, the __ldg path).

Usage: python tools/emulate_fovea_context.py [--quick] [--keep DIR]
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import torch

from vidconv.ops import crop_normalize, fovea_context

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/emulation.py, beside this file
from emulation import drive  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)

# (name, N, T, H, W, S, context)
CASES = [
    ("paper_multires", 2, 2, 178, 178, 89, True),
    ("paper_full", 2, 1, 200, 200, 170, False),
    ("area_37x53_17", 3, 2, 37, 53, 17, True),
    ("area_61x47_13", 1, 2, 61, 47, 13, True),
    ("area_90x91_45", 2, 1, 90, 91, 45, True),
    ("exact_7", 1, 1, 7, 7, 7, True),
    ("one_pixel", 2, 2, 23, 29, 1, True),
    ("tall_120x40_31", 1, 2, 120, 40, 31, True),
    ("crop_31x43_19", 3, 1, 31, 43, 19, False),
    ("crop_9x5_5", 1, 3, 9, 5, 5, False),
    ("direct_300x1200_20", 1, 1, 300, 1200, 20, True),
]


def random_cases(count: int, seed: int) -> list[tuple]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        s = rng.randint(1, 40)
        h, w = rng.randint(s, 3 * s + 5), rng.randint(s, 3 * s + 5)
        out.append((f"random{i}", rng.randint(1, 3), rng.randint(1, 3), h, w, s,
                    rng.random() < 0.7))
    return out


def build(work: Path) -> Path:
    exe = work / "emulate_fovea_context"
    # 20011: the counting store is host code called from the kernel's host-device functions.
    subprocess.run(["nvcc", "-std=c++17", "-O2", "-arch=sm_80", "-diag-suppress", "20011",
                    f"-I{ROOT / 'csrc'}", "-o", str(exe),
                    str(ROOT / "tools/emulate_fovea_context.cu")], check=True)
    return exe


def run_case(exe: Path, work: Path, case: tuple, dtype: torch.dtype, channels_last: bool,
             misalign: bool, seed: int) -> tuple[bool, str]:
    name, n, t, h, w, s, with_context = case
    gen = torch.Generator().manual_seed(seed)
    clips = torch.randint(0, 256, (n, t, h, w, 3), dtype=torch.uint8, generator=gen)
    offsets = torch.stack([torch.randint(0, h - s + 1, (n,), generator=gen),
                           torch.randint(0, w - s + 1, (n,), generator=gen)], dim=1)
    flip = torch.rand(n, generator=gen) < 0.5
    clips.numpy().tofile(work / "clips.bin")
    offsets.numpy().tofile(work / "offsets.bin")
    flip.to(torch.uint8).numpy().tofile(work / "flip.bin")
    args = [TYPES[dtype], n, t, h, w, s, int(with_context), int(channels_last), int(misalign),
            *MEAN, *STD, work]
    res = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True)
    if res.returncode != 0:
        return False, f"{name:20s} {str(dtype):15s} exit {res.returncode}: {res.stderr.strip()}"
    stats = dict(kv.split("=", 1) for kv in res.stdout.split())
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    kw = dict(offsets=offsets, flip=flip, mean=MEAN, std=STD, dtype=dtype, memory_format=fmt)
    want = fovea_context(clips, s, **kw) if with_context else (crop_normalize(clips, s, **kw),)
    names = ["fovea.bin", "context.bin"][:len(want)]
    same = True
    for file, ref in zip(names, want, strict=True):
        raw = torch.frombuffer(bytearray((work / file).read_bytes()), dtype=dtype)
        # The file is the output's memory: (N, 3, T, S, S) or, channels last, (N, T, S, S, 3).
        got = (raw.view(n, t, s, s, 3).permute(0, 4, 1, 2, 3) if channels_last
               else raw.view(n, 3, t, s, s))
        same = same and torch.equal(got.view(torch.int16 if dtype.itemsize == 2 else torch.int32),
                                    ref.contiguous().view(got.shape).view(
                                        torch.int16 if dtype.itemsize == 2 else torch.int32))
    counters = ("bad_band", "bad_stage", "bad_table", "unwritten", "rewritten",
                "misaligned_vec", "out_of_range")
    ok = same and all(stats[k] == "0" for k in counters)
    layout = "cl" if channels_last else "nc"
    line = (f"{name:20s} {str(dtype):15s} {layout} misalign={int(misalign)} "
            f"variant={stats['variant']} bands={stats['bands']:>3s} "
            f"outputs={stats['outputs']:>7s} "
            + " ".join(f"{k}={stats[k]}" for k in counters)
            + f" bits={'same' if same else 'DIFFER'} {'OK' if ok else 'FAIL'}")
    return ok, line


def runs(exe: Path, work: Path, quick: bool):
    torch.set_num_threads(1)
    cases = CASES + ([] if quick else random_cases(24, seed=5))
    for i, case in enumerate(cases):
        for j, dtype in enumerate(TYPES):
            for channels_last in (False, True):
                # Misaligned on every other run: heads and tails of both kinds.
                misalign = (i + j + channels_last) % 2 == 1
                yield run_case(exe, work, case, dtype, channels_last, misalign,
                               seed=100 * i + 10 * j + channels_last)


def main(argv: list[str] | None = None) -> int:
    return drive(argv, __doc__, "emulate_fovea_context_", build, runs)


if __name__ == "__main__":
    sys.exit(main())
