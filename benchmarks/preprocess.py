"""Fused preprocessing vs the same work in composed torch ops.

Two workloads, each timed for vidconv's op and for a composed-torch baseline that computes the
same tensor (checked before timing):
  fovea_context   uint8 (N, T, 178, 178, 3) -> fovea + context, each (N, 3, T, 89, 89)
  crop_normalize  uint8 (N, T, 200, 200, 3) -> (N, 3, T, 170, 170)
with random per-clip flips and centre crops (the baseline slices, so a centre crop is its best
case). The baseline: permute, slice, float, avg_pool2d (context), normalise, flip, cast.

Throughput is in GB/s of bytes the op must move: the bytes it must read (the whole frame for
fovea_context, the crop for crop_normalize) plus the bytes it writes, beside the device's
measured copy bandwidth (read + write) from the same run. Target on an H100: >= 80% of copy
bandwidth and >= 4x the composed ops at N=256, T=10.

    python benchmarks/preprocess.py                   # defaults for the device found
    python benchmarks/preprocess.py --device cpu --batch 16 --dtypes float32
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import vidconv  # noqa: E402
from vidconv.ops import DEFAULT_MEAN, DEFAULT_STD  # noqa: E402

# Defaults per device type: (clips per batch, warm-up runs, timed repeats).
DEFAULTS = {"cuda": (256, 5, 20), "cpu": (16, 2, 5)}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:i] (default: auto)")
    p.add_argument("--batch", type=int, default=None,
                   help="clips N (default: 256 on CUDA, 16 on CPU)")
    p.add_argument("--frames", type=int, default=10, help="frames per clip T (default: 10)")
    p.add_argument("--frame-size", type=int, default=178,
                   help="fovea_context input frames (default: 178, the paper's multires)")
    p.add_argument("--size", type=int, default=89, help="fovea/context side (default: 89)")
    p.add_argument("--crop-frame-size", type=int, default=200,
                   help="crop_normalize input frames (default: 200)")
    p.add_argument("--crop-size", type=int, default=170, help="crop side (default: 170)")
    p.add_argument("--dtypes", default="float32,bfloat16",
                   help="output dtypes, comma-separated (default: %(default)s)")
    p.add_argument("--channels-last", action="store_true",
                   help="write channels_last_3d outputs (the baseline then converts too)")
    p.add_argument("--ops", default="fovea_context,crop_normalize",
                   help="workloads (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs before timing")
    p.add_argument("--repeats", type=int, default=None, help="timed runs (median reported)")
    p.add_argument("--json", type=Path, default=None,
                   help="JSON path (default: benchmarks/results/preprocess-<device>.json)")
    p.add_argument("--no-json", action="store_true", help="do not write JSON")
    return p.parse_args(argv)


def _normalise(x: torch.Tensor, dtype: torch.dtype, flip: torch.Tensor,
               memory_format: torch.memory_format) -> torch.Tensor:
    mean = torch.tensor(DEFAULT_MEAN, device=x.device).view(1, 3, 1, 1, 1)
    std = torch.tensor(DEFAULT_STD, device=x.device).view(1, 3, 1, 1, 1)
    x = (x - mean) / std
    x = torch.where(flip.view(-1, 1, 1, 1, 1), x.flip(-1), x)
    return x.to(dtype).contiguous(memory_format=memory_format)


def composed_fovea_context(clips: torch.Tensor, size: int, flip: torch.Tensor,
                           dtype: torch.dtype, memory_format: torch.memory_format
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The baseline: what one writes with torch ops (centre crop, per-clip flips)."""
    n, t, h, w, c = clips.shape
    x = clips.permute(0, 4, 1, 2, 3)  # (N, 3, T, H, W) view
    oy, ox = (h - size) // 2, (w - size) // 2
    fovea = x[..., oy:oy + size, ox:ox + size].float()
    frames = x.reshape(n, c * t, h, w).float()
    if h == 2 * size and w == 2 * size:
        ctx = F.avg_pool2d(frames, 2)
    else:
        ctx = F.adaptive_avg_pool2d(frames, size)
    ctx = ctx.view(n, c, t, size, size)
    return (_normalise(fovea, dtype, flip, memory_format),
            _normalise(ctx, dtype, flip, memory_format))


def composed_crop_normalize(clips: torch.Tensor, size: int, flip: torch.Tensor,
                            dtype: torch.dtype, memory_format: torch.memory_format
                            ) -> torch.Tensor:
    _, _, h, w, _ = clips.shape
    oy, ox = (h - size) // 2, (w - size) // 2
    crop = clips.permute(0, 4, 1, 2, 3)[..., oy:oy + size, ox:ox + size].float()
    return _normalise(crop, dtype, flip, memory_format)


def _check_same(ours: Any, theirs: Any, dtype: torch.dtype) -> float:
    """Max abs difference between the op and the baseline (they must agree before timing)."""
    ours = ours if isinstance(ours, tuple) else (ours,)
    theirs = theirs if isinstance(theirs, tuple) else (theirs,)
    worst = 0.0
    for a, b in zip(ours, theirs, strict=True):
        diff = (a.float() - b.float()).abs().max().item()
        tol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps * 4
        if diff > tol:
            raise RuntimeError(f"op and baseline disagree by {diff} (tolerance {tol})")
        worst = max(worst, diff)
    return worst


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = _common.resolve_device(args.device)
    kind = "cuda" if device.type == "cuda" else "cpu"
    batch, warmup, repeats = DEFAULTS[kind]
    batch = args.batch or batch
    warmup = args.warmup if args.warmup is not None else warmup
    repeats = args.repeats or repeats
    fmt = torch.channels_last_3d if args.channels_last else torch.contiguous_format
    dtypes = [DTYPES[d.strip()] for d in args.dtypes.split(",") if d.strip()]
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    n, t = batch, args.frames

    copy_gbs = _common.copy_bandwidth_gbs(device)
    g = torch.Generator().manual_seed(0)
    flip = (torch.rand(n, generator=g) < 0.5).to(device)
    inputs = {}
    if "fovea_context" in ops:
        hw = args.frame_size
        inputs["fovea_context"] = torch.randint(0, 256, (n, t, hw, hw, 3), dtype=torch.uint8,
                                                generator=g).to(device)
    if "crop_normalize" in ops:
        hw = args.crop_frame_size
        inputs["crop_normalize"] = torch.randint(0, 256, (n, t, hw, hw, 3), dtype=torch.uint8,
                                                 generator=g).to(device)

    jobs = [(op, dtype, impl) for op in ops for dtype in dtypes for impl in ("vidconv", "torch")]
    rows: list[dict[str, Any]] = []
    for op, dtype, impl in _common.progress(jobs, desc=f"preprocess on {device.type}"):
        clips = inputs[op]
        _, _, h, w, _ = clips.shape
        if op == "fovea_context":
            s = args.size
            ours = lambda c=clips, s=s, d=dtype: vidconv.ops.fovea_context(  # noqa: E731
                c, s, flip=flip, dtype=d, memory_format=fmt)
            theirs = lambda c=clips, s=s, d=dtype: composed_fovea_context(  # noqa: E731
                c, s, flip, d, fmt)
            streams, read = 2, n * t * h * w * 3
        else:
            s = args.crop_size
            ours = lambda c=clips, s=s, d=dtype: vidconv.ops.crop_normalize(  # noqa: E731
                c, s, flip=flip, dtype=d, memory_format=fmt)
            theirs = lambda c=clips, s=s, d=dtype: composed_crop_normalize(  # noqa: E731
                c, s, flip, d, fmt)
            streams, read = 1, n * t * s * s * 3
        written = streams * n * 3 * t * s * s * dtype.itemsize
        fn = ours if impl == "vidconv" else theirs
        max_diff = _check_same(ours(), theirs(), dtype) if impl == "vidconv" else None
        timing = _common.time_fn(fn, device, warmup=warmup, repeats=repeats)
        seconds = timing["median_ms"] * 1e-3
        gbs = (read + written) / seconds / 1e9
        rows.append({
            "op": op, "impl": impl, "dtype": str(dtype).replace("torch.", ""),
            "input": f"{n}x{t}x{h}x{w}x3", "output": f"{streams}x{n}x3x{t}x{s}x{s}",
            "median_ms": timing["median_ms"], "min_ms": timing["min_ms"],
            "clips_per_s": n / seconds, "GB_per_s": gbs, "copy_GB_per_s": copy_gbs,
            "pct_of_copy": 100 * gbs / copy_gbs, "bytes_read": read, "bytes_written": written,
            "max_abs_diff_vs_torch": max_diff,
        })
    # Ratio of each vidconv row to its composed-torch row.
    for row in rows:
        if row["impl"] == "vidconv":
            base = next(r for r in rows if r["impl"] == "torch" and r["op"] == row["op"]
                        and r["dtype"] == row["dtype"])
            row["speedup_vs_torch"] = base["median_ms"] / row["median_ms"]
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # The fused rows time the kernel itself, not whichever path the ops' measured choice takes.
    os.environ["VIDCONV_PREPROCESS"] = "fused"
    device = _common.resolve_device(args.device)
    rows = run(args)
    info = _common.device_info(device)
    title = (f"preprocessing on {info['device']} (torch {info['torch']}, "
             f"{'channels_last_3d' if args.channels_last else 'contiguous'} outputs); "
             f"measured copy bandwidth {rows[0]['copy_GB_per_s']:.1f} GB/s" if rows else "")
    if not args.no_json:
        # Load average beside the numbers: a shared CPU makes timings noisy, and says so here.
        payload = {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                   "load_average_1_5_15": list(os.getloadavg())}
        path = _common.write_json("preprocess", payload, path=args.json, device=device)
        print(f"wrote {path}", file=sys.stderr)
    _common.print_table(rows, ["op", "impl", "dtype", "input", "median_ms", "clips_per_s",
                               "GB_per_s", "pct_of_copy", "speedup_vs_torch"], title=title)


if __name__ == "__main__":
    main()
