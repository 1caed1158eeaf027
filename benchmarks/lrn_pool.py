"""Fused LRN + max pooling (vidconv.ops.lrn_max_pool) vs the towers' two ops, per paper stage.

For the conv1/conv2 activations of the paper's towers (full resolution and multires; the ReLU'd
convolution output, in both memory formats) each row times, in one run and checked equal first:

  fused  vidconv.ops.lrn_max_pool
  aten   the tower's LocalResponseNorm (a banded 1x1x1 conv3d + rsqrt) then nn.MaxPool3d

and reports the ratio aten / fused (> 1: the fused op is faster) and the fused op's GB/s
(bytes read + written). The models pick per shape by measuring the same two on first use
(vidconv.ops.lrn_pool.prefer_fused); this table shows where each wins.

    python benchmarks/lrn_pool.py --device cpu --batch 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from vidconv.models.tower import (  # noqa: E402
    LRN_ALPHA,
    LRN_BETA,
    LRN_K,
    LRN_SIZE,
    POOL_CEIL_MODE,
    POOL_KERNEL,
    LocalResponseNorm,
)
from vidconv.ops import lrn_max_pool  # noqa: E402

# (stage, C, T, side): conv outputs of single-frame (T=1) and slow fusion's T, full and multires.
STAGES = [
    ("full conv1", 96, 1, 55),
    ("full conv2", 256, 1, 27),
    ("multires conv1", 96, 1, 27),
    ("multires conv2", 256, 1, 13),
]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:i] (default: auto)")
    p.add_argument("--batch", type=int, default=None, help="clips (default: 32 CUDA, 2 CPU)")
    p.add_argument("--frames", type=int, default=1, help="frames T of the activation")
    p.add_argument("--dtypes", default="float32", help="comma-separated (default: float32)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs (default 20 / 5)")
    p.add_argument("--json", default=None, help="output path (default benchmarks/results/)")
    args = p.parse_args(argv)
    unknown = [d for d in args.dtypes.split(",") if d not in DTYPES]
    if unknown:
        p.error(f"--dtypes must be from {', '.join(DTYPES)}, got {', '.join(unknown)}")
    for name in ("batch", "frames", "repeats"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name} must be >= 1, got {value}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = _common.resolve_device(args.device)
    on_cuda = device.type == "cuda"
    batch = args.batch or (32 if on_cuda else 2)
    repeats = args.repeats or (20 if on_cuda else 5)
    norm = LocalResponseNorm(LRN_SIZE, alpha=LRN_ALPHA, beta=LRN_BETA, k=LRN_K)
    pool = nn.MaxPool3d(POOL_KERNEL, POOL_KERNEL, ceil_mode=POOL_CEIL_MODE)
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = DTYPES[dtype_name]
        for stage, c, t, side in STAGES:
            for fmt_name, fmt in (("contiguous", torch.contiguous_format),
                                  ("channels_last_3d", torch.channels_last_3d)):
                x = (torch.randn(batch, c, t * args.frames, side, side, device=device) * 20
                     ).clamp_min(0).to(dtype).contiguous(memory_format=fmt)

                def fused(x=x):
                    return lrn_max_pool(x, LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K,
                                        POOL_KERNEL[1:], POOL_CEIL_MODE)

                def aten(x=x):
                    return pool(norm(x))

                with torch.no_grad():
                    a, b = fused(), aten()
                    err = ((a.double() - b.double()).abs().max()
                           / b.double().abs().max()).item()
                    tf = _common.time_fn(fused, device, warmup=2, repeats=repeats)
                    ta = _common.time_fn(aten, device, warmup=2, repeats=repeats)
                nbytes = (x.numel() + a.numel()) * x.element_size()
                rows.append({"stage": stage, "dtype": dtype_name, "layout": fmt_name,
                             "input": "x".join(map(str, x.shape)),
                             "fused_ms": tf["median_ms"], "aten_ms": ta["median_ms"],
                             "aten/fused": ta["median_ms"] / tf["median_ms"],
                             "fused_GB/s": nbytes / tf["median_ms"] / 1e6, "rel_err": err})
    payload = {"batch": batch, "repeats": repeats, "threads": torch.get_num_threads(),
               "torch": torch.__version__, "rows": rows}
    path = _common.write_json("lrn_pool", payload, path=args.json, device=device)
    print(f"wrote {path}", file=sys.stderr)
    _common.print_table(rows, title=f"lrn_max_pool vs LRN + max pool on "
                                    f"{_common.device_name(device)} (median of {repeats})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
