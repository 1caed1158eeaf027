"""The paper's FC layers: every candidate of vidconv.ops.linear, forward and gradients, per layer.

For each distinct FC layer of the paper's networks (fc1, fc2 and the classifier of every
architecture, full resolution and multires, at --width) and each batch size, one run times:

  forward    aten (F.linear), weight_major ((W @ x.T + b).T), small_batch (vidconv's kernel
             that streams W once; CPU, float32)
  gradients  aten (F.linear's backward GEMMs: grad @ W, grad.T @ x, row sums) and small_batch
             (vidconv's gradient kernels; CPU, float32), all three gradients

each checked against F.linear first (relative difference reported). The ceilings are measured
in the same run on the same weight matrix: "read" is summing W (a pure read of its bytes, which
no forward can beat at these batch sizes), "read+write" is that plus filling a W-sized tensor
(the gradients read W once and write the weight gradient once). "% ceiling" is the ceiling's
time over the best candidate's. "best / aten" > 1: faster than plain PyTorch. The models make
the same choices per layer on first use (vidconv.ops.linear_plan()).

    python benchmarks/linear.py --quick
    python benchmarks/linear.py --batches 8,32 --width 0.5
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from vidconv.models import build  # noqa: E402
from vidconv.ops import conv_planner  # noqa: E402
from vidconv.ops import fully_connected as fc  # noqa: E402

MODELS = ("single_frame", "early_fusion", "late_fusion", "slow_fusion")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:i] (default: auto)")
    p.add_argument("--batches", default=None,
                   help="comma-separated batch sizes (default: 8,32; --quick: 8)")
    p.add_argument("--width", type=float, default=None,
                   help="channel/FC width multiplier (default: 1.0 on CUDA, 0.5 on CPU)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed runs, median reported (default: 20 CUDA, 7 CPU; --quick: 2)")
    p.add_argument("--quick", action="store_true", help="batch 8 only, 2 repeats")
    p.add_argument("--json", default=None, help="output path (default benchmarks/results/)")
    _common.add_huge_pages_flag(p)
    args = p.parse_args(argv)
    try:
        batches = [int(b) for b in (args.batches or ("8" if args.quick else "8,32")).split(",")]
    except ValueError:
        p.error(f"--batches must be comma-separated integers, got {args.batches!r}")
    if any(b < 1 for b in batches):
        p.error(f"--batches must be >= 1, got {args.batches!r}")
    args.batches = batches
    if args.repeats is not None and args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.width is not None and not 0 < args.width <= 4:
        p.error(f"--width must be in (0, 4], got {args.width}")
    return args


def layers(width: float) -> dict[tuple[int, int], list[str]]:
    """(in_features, out_features) of every FC layer of the paper's networks -> its names."""
    shapes: dict[tuple[int, int], list[str]] = {}
    for name in MODELS:
        for multires in (False, True):
            model = build(name, multires=multires, width=width)
            for attr in ("fc1", "fc2", "classifier"):
                out_f, in_f = getattr(model, attr).weight.shape
                label = f"{name}{' mr' if multires else ''} {attr}"
                shapes.setdefault((in_f, out_f), []).append(label)
            del model
    return shapes


def measure(in_f: int, out_f: int, batch: int, device: torch.device,
            repeats: int) -> dict[str, Any]:
    g = torch.Generator(device=device).manual_seed(in_f + batch)
    x = torch.randn(batch, in_f, device=device, generator=g)
    w = torch.randn(out_f, in_f, device=device, generator=g) / in_f ** 0.5
    b = torch.randn(out_f, device=device, generator=g)
    up = torch.randn(batch, out_f, device=device, generator=g)
    mask = [True, True, True]
    small = fc._small_batch_applies(x, w, b)
    forwards = {n: f for n, f in fc._FORWARD.items() if n != "small_batch" or small}
    gradients = {n: f for n, f in fc._GRADIENTS.items() if n != "small_batch" or small}

    row: dict[str, Any] = {"batch": batch, "in": in_f, "out": out_f}
    errs = []
    runs: dict[str, Any] = {}
    with torch.no_grad():
        want = F.linear(x, w, b)
        want_grads = fc._aten_gradients(up, x, w, mask)
        for name, fn in forwards.items():
            if name != "aten":
                errs.append(conv_planner._rel_err(fn(x, w, b), want))
            runs[f"fwd {name} ms"] = lambda fn=fn: fn(x, w, b)
        for name, fn in gradients.items():
            if name != "aten":
                errs += [conv_planner._rel_err(a, e)
                         for a, e in zip(fn(up, x, w, mask), want_grads, strict=True)]
            runs[f"grad {name} ms"] = lambda fn=fn: fn(up, x, w, mask)
        del want, want_grads
        scratch = torch.empty_like(w)
        runs["read ms"] = lambda: w.sum()
        runs["write ms"] = lambda: scratch.fill_(1.0)
        # Round by round, every candidate once per round: load that comes and goes (and the
        # kernel's supply of free huge pages for fresh gradients) meets them all alike.
        samples: dict[str, list[float]] = {k: [] for k in runs}
        for fn in runs.values():
            fn()
        for _ in range(repeats):
            for k, fn in runs.items():
                samples[k].append(_common.time_fn(fn, device, warmup=0, repeats=1)["median_ms"])
    for k, ts in samples.items():
        row[k] = statistics.median(ts)
    read, write = row.pop("read ms"), row.pop("write ms")
    best_fwd = min(row[f"fwd {n} ms"] for n in forwards)
    best_grad = min(row[f"grad {n} ms"] for n in gradients)
    row["fwd best"] = min(forwards, key=lambda n: row[f"fwd {n} ms"])
    row["fwd best / aten"] = row["fwd aten ms"] / best_fwd
    row["fwd % ceiling"] = 100 * read / best_fwd
    row["grad best"] = min(gradients, key=lambda n: row[f"grad {n} ms"])
    row["grad best / aten"] = row["grad aten ms"] / best_grad
    row["grad % ceiling"] = 100 * (read + write) / best_grad
    row["read GB/s"] = w.numel() * w.element_size() / read / 1e6
    row["max rel err"] = max(errs, default=0.0)
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = _common.resolve_device(args.device)
    pages = _common.huge_pages(not args.no_huge_pages) if device.type == "cpu" else "n/a"
    on_cuda = device.type == "cuda"
    width = args.width or (1.0 if on_cuda else 0.5)
    repeats = args.repeats or (2 if args.quick else 20 if on_cuda else 7)
    shapes = layers(width)
    rows = []
    todo = [(s, b) for s in shapes for b in args.batches]
    for (in_f, out_f), batch in _common.progress(todo, desc="linear", unit="layer"):
        row = measure(in_f, out_f, batch, device, repeats)
        row = {"layers": ", ".join(shapes[in_f, out_f]), **row}
        rows.append(row)
    payload = {"width": width, "batches": args.batches, "repeats": repeats,
               "threads": torch.get_num_threads(), "huge_pages": pages, "rows": rows}
    path = _common.write_json("linear", payload, path=args.json, device=device)
    print(f"wrote {path}", file=sys.stderr)
    columns = ["batch", "in", "out", *[k for k in rows[0] if k.endswith(" ms")],
               "fwd best / aten", "fwd % ceiling", "grad best / aten", "grad % ceiling",
               "read GB/s", "max rel err"] if rows else None
    for (in_f, out_f), names in shapes.items():
        print(f"  {in_f}x{out_f}: {', '.join(names)}", file=sys.stderr)
    _common.print_table(rows, columns, title=f"FC layers on {_common.device_name(device)}, "
                        f"width {width}, median of {repeats} (ceilings measured: read W, "
                        "read W + write W)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
