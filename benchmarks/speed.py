"""Throughput of every architecture at full resolution and multiresolution (the paper's Sec. 3.2).

For each model: forward (inference) and training-step throughput in clips/s and ms/clip, on
170x170 clips (full resolution) and on the (fovea, context) pair of 89x89 streams (multires),
their ratio multires / full, and parameters and GMACs per clip. The paper reports the foveated
models 2-4x faster (single frame 6 -> 21 clips/s, slow fusion 5 -> 10 clips/s per replica).

Each case runs twice in the same run, interleaved: with ``VIDCONV_CONV_ALGO=auto`` (vidconv's
choice of convolution algorithm per layer, tuned on the first step; its cost is reported per
model) and with ``aten`` (plain PyTorch's conv3d); "x aten" is vidconv's speedup over plain
PyTorch. The multiresolution target: multires / full clips/s >= 0.9 x the ratio of their
multiply-adds (the paper's layer sizes give 1.73-1.90x fewer, not 2x), for every architecture,
forward and training step, at the default batch and at the paper's batch of 32 (modes
``forward32`` / ``train32``, auto only; on CUDA the default batch is 32 already); the summary
says pass or fail per model and mode, and "target met (batch 32)" for the paper's batch alone:
at a small batch the fully connected layers' weight reads, twice as large for multires (fc1's
input doubles), are shared by fewer clips.

On CUDA: bf16 autocast, channels_last_3d, full width, batch 32 (the paper's mini-batch), CUDA
events, median of repeats after warm-up. On the CPU the defaults (narrow width, small batch) keep
the default run to a few minutes on 2 cores (``--conv-algos auto`` or ``--modes forward,train``
halve it); the table header states them. A training step is forward + cross-entropy + backward +
fused SGD (momentum 0.9, weight decay 5e-4, the paper's). "pct_ceiling" is the achieved
multiply-add rate (a training step counted as 3x the forward MACs) over the device's ceiling
measured in the same run: the best of several dense kernels (matmuls in a few shapes and a large
conv3d, `_common.measured_ceiling`).

    python benchmarks/speed.py                      # every model, defaults for the device
    python benchmarks/speed.py --models slow_fusion --batch-size 8 --width 1.0 --plot
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import vidconv  # noqa: E402
from vidconv.models import build, list_models  # noqa: E402
from vidconv.ops import (  # noqa: E402
    conv_plan,
    linear_plan,
    lrn_pool_plan,
    pair_plan,
    use_conv_algo,
)

MODES = ("forward", "train", "forward32", "train32")
# Modes timed at the paper's batch of 32 whatever --batch-size says, and the step they time.
PAPER_BATCH_MODES = {"forward32": "forward", "train32": "train"}
CONV_ALGOS = ("auto", "aten")
PAPER_BATCH = 32
# multires / full clips/s must reach this fraction of full / multires multiply-adds.
TARGET_OF_MAC_RATIO = 0.9
# Defaults per device type: (batch size, width, warm-up runs, timed repeats).
DEFAULTS = {"cuda": (32, 1.0, 5, 20), "cpu": (8, 0.5, 1, 7)}
MEMORY_FORMATS = {"channels_last_3d": torch.channels_last_3d,
                  "contiguous": torch.contiguous_format}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="CPU defaults: batch {}, width {}, {} warm-up, {} repeats. CUDA defaults: batch "
               "{}, width {}, {} warm-up, {} repeats.".format(*DEFAULTS["cpu"], *DEFAULTS["cuda"]),
    )
    p.add_argument("--models", default=",".join(list_models()),
                   help="comma-separated model names (default: all: %(default)s)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="clips per batch (default: 32 on CUDA, 8 on CPU)")
    p.add_argument("--width", type=float, default=None,
                   help="channel/FC width multiplier (default: 1.0 on CUDA, 0.5 on CPU)")
    p.add_argument("--memory-format", choices=list(MEMORY_FORMATS), default="channels_last_3d",
                   help="layout of activations and weights (default: %(default)s; on 2 CPU "
                        "cores it was also the faster one)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:i] (default: auto)")
    p.add_argument("--modes", default=",".join(MODES),
                   help="forward, train, forward32 and/or train32 (the last two at the "
                        "paper's batch of 32; default: %(default)s)")
    p.add_argument("--conv-algos", default=",".join(CONV_ALGOS),
                   help="VIDCONV_CONV_ALGO values timed side by side (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs before timing")
    p.add_argument("--repeats", type=int, default=None, help="timed runs (median reported)")
    p.add_argument("--use-plan-cache", action="store_true",
                   help="reuse the conv algorithm decisions in $VIDCONV_CACHE_DIR (default: "
                        "decide afresh in a temporary cache, so the figures include first-use "
                        "tuning and no decision made under other conditions)")
    p.add_argument("--no-autocast", action="store_true",
                   help="on CUDA, time float32 instead of bf16 autocast")
    _common.add_huge_pages_flag(p)
    p.add_argument("--json", type=Path, default=None,
                   help="JSON path (default: benchmarks/results/speed-<device>.json)")
    p.add_argument("--plot", action="store_true",
                   help="write a PNG bar chart of clips/s, full vs multires, to "
                        "benchmarks/results/")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in list_models()]
    if unknown:
        p.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(list_models())}")
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or any(m not in MODES for m in args.modes):
        p.error(f"--modes must be a subset of {','.join(MODES)}, got {args.modes}")
    args.conv_algos = [a.strip() for a in args.conv_algos.split(",") if a.strip()]
    if not args.conv_algos:
        p.error("--conv-algos must name at least one of auto, aten, ... (got nothing)")
    for algo in args.conv_algos:
        try:
            with use_conv_algo(algo):
                pass
        except ValueError as exc:
            p.error(f"--conv-algos: {exc}")
    if args.batch_size is not None and args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.width is not None and not args.width > 0:
        p.error(f"--width must be > 0, got {args.width}")
    return args


def make_inputs(model, batch: int, device: torch.device,
                memory_format: torch.memory_format) -> Any:
    """Random normalised inputs in the form the loader hands the model."""
    t, s = model.spec.frames, model.spec.size
    g = torch.Generator(device=device).manual_seed(0)

    def clip() -> torch.Tensor:
        x = torch.randn(batch, 3, t, s, s, device=device, generator=g)
        return x.contiguous(memory_format=memory_format)

    return (clip(), clip()) if model.multires else clip()


class Case:
    """One model at one resolution: its inputs, and the step functions that are timed."""

    def __init__(self, name: str, multires: bool, args: argparse.Namespace,
                 device: torch.device, batch: int, width: float, conv_algo: str = "auto") -> None:
        memory_format = MEMORY_FORMATS[args.memory_format]
        torch.manual_seed(0)
        self.batch = batch
        self.conv_algo = conv_algo
        self.model = build(name, multires=multires, width=width).to(
            device, memory_format=memory_format)
        self.x = make_inputs(self.model, batch, device, memory_format)
        self.labels = torch.randint(0, self.model.num_classes, (batch,), device=device)
        self.autocast = device.type == "cuda" and not args.no_autocast
        # fused: one pass over parameters, gradients and momentum (the step is memory-bound);
        # foreach where this torch has no fused SGD for the device.
        try:
            self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9,
                                       weight_decay=5e-4, fused=True)
        except (RuntimeError, ValueError):
            self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9,
                                       weight_decay=5e-4, foreach=True)
        spec, cost = self.model.spec, self.model.complexity()
        side = f"{spec.frames}x{spec.size}x{spec.size}"
        self.row: dict[str, Any] = {
            "model": name, "resolution": "multires" if multires else "full",
            "input": f"2 x {side}" if multires else side,
            "params": cost["params"], "gmacs_per_clip": cost["macs"] / 1e9,
            "conv_algo": conv_algo, "batch": batch,
        }

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward(self) -> None:
        with torch.inference_mode(), self._autocast():
            self.model(self.x)

    def train(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        with self._autocast():
            loss = F.cross_entropy(self.model(self.x), self.labels)
        loss.backward()
        self.opt.step()

    def step(self, mode: str) -> Callable[[], None]:
        base = PAPER_BATCH_MODES.get(mode, mode)
        self.model.train(base != "forward")
        run = self.forward if base == "forward" else self.train

        def step() -> None:
            with use_conv_algo(self.conv_algo):
                run()

        return step

    def tune(self, mode: str, device: torch.device) -> None:
        """One untimed step, in which st_conv3d, the LRN + max pool stages and the FC layers
        decide their algorithm for every layer the step meets; the tuning time those decisions
        took is added to the row."""
        before = (len(conv_plan()), len(lrn_pool_plan()), len(linear_plan()),
                  len(pair_plan()))
        self.step(mode)()
        _common.synchronize(device)
        spent = (sum(d["tune_s"] for d in conv_plan()[before[0]:] if not d["from_cache"])
                 + sum(d["tune_s"] for d in lrn_pool_plan()[before[1]:])
                 + sum(d["tune_s"] for d in linear_plan()[before[2]:]))
        self.row["tune_s"] = self.row.get("tune_s", 0.0) + spent
        # The multires stages' grouped-launch choices (CUDA only), apart: their time includes
        # the two separate convolutions' own decisions, already counted above.
        pairs = sum(d["tune_s"] for d in pair_plan()[before[3]:])
        if pairs:
            self.row["pair_tune_s"] = self.row.get("pair_tune_s", 0.0) + pairs


def measure_mode(cases: list[Case], mode: str, device: torch.device, warmup: int,
                 repeats: int, peak_macs_s: float) -> None:
    """Time `mode` for every case, interleaving the cases repeat by repeat.

    Interleaving makes full-res and multires runs see the same machine conditions (a shared
    CPU's load drifts over seconds), so their ratio stays meaningful even when the absolute
    numbers wander.
    """
    steps = [case.step(mode) for case in cases]
    for step in steps:
        for _ in range(warmup):
            step()
    _common.synchronize(device)
    times: list[list[float]] = [[] for _ in cases]
    for _ in range(repeats):
        for step, ts in zip(steps, times, strict=True):
            ts.append(_common.time_fn(step, device, warmup=0, repeats=1)["median_ms"])
    for case, ts in zip(cases, times, strict=True):
        median = statistics.median(ts)
        case.row[f"{mode}_ms_per_clip"] = median / case.batch
        case.row[f"{mode}_clips_s"] = 1e3 * case.batch / median
        macs = case.row["gmacs_per_clip"] * 1e9 * (
            3 if PAPER_BATCH_MODES.get(mode, mode) == "train" else 1)
        case.row[f"{mode}_pct_ceiling"] = 100 * macs * case.row[f"{mode}_clips_s"] / peak_macs_s
        case.row[f"{mode}_timing"] = {"median_ms": median, "min_ms": min(ts), "max_ms": max(ts),
                                      "repeats": repeats, "batch": case.batch}


def summarise(rows: list[dict[str, Any]], models: list[str], modes: list[str],
              conv_algos: list[str], batch: int) -> list[dict[str, Any]]:
    """One row per model: full and multires side by side (vidconv's own algorithm choice, the
    first of conv_algos), their ratio against the multiply-add target, vidconv's speedup over
    each other conv algorithm, and the tuning cost."""
    out = []
    main_algo = conv_algos[0]

    def row(name: str, res: str, mode: str, algo: str) -> dict[str, Any] | None:
        for r in rows:
            if (r["model"], r["resolution"], r["conv_algo"]) == (name, res, algo) and \
                    f"{mode}_clips_s" in r:
                return r
        return None

    for name in models:
        full = row(name, "full", modes[0], main_algo)
        mr = row(name, "multires", modes[0], main_algo)
        mac_ratio = full["gmacs_per_clip"] / mr["gmacs_per_clip"]
        s: dict[str, Any] = {
            "model": name,
            "GMACs full": full["gmacs_per_clip"], "GMACs mr": mr["gmacs_per_clip"],
            "MAC ratio": mac_ratio, "target": TARGET_OF_MAC_RATIO * mac_ratio,
        }
        passed: dict[str, bool] = {}
        for mode in modes:
            key = mode
            full, mr = row(name, "full", mode, main_algo), row(name, "multires", mode, main_algo)
            if full is None or mr is None:
                continue
            ratio = mr[f"{key}_clips_s"] / full[f"{key}_clips_s"]
            s[f"{mode} full clips/s"] = full[f"{key}_clips_s"]
            s[f"{mode} mr clips/s"] = mr[f"{key}_clips_s"]
            s[f"{mode} ratio"] = ratio
            # Best-of-repeats ratio: robust to other jobs on a shared machine.
            s[f"{mode} ratio (best)"] = (full[f"{key}_timing"]["min_ms"]
                                         / mr[f"{key}_timing"]["min_ms"])
            s[f"{mode} target"] = "pass" if ratio >= s["target"] else "FAIL"
            passed[mode] = ratio >= s["target"]
            for other in conv_algos[1:]:
                for res, ours in (("full", full), ("mr", mr)):
                    base = row(name, "full" if res == "full" else "multires", mode, other)
                    if base is not None:
                        s[f"{mode} {res} x {other}"] = (ours[f"{key}_clips_s"]
                                                        / base[f"{key}_clips_s"])
        s["target met"] = "pass" if passed and all(passed.values()) else "FAIL"
        at_paper_batch = [ok for mode, ok in passed.items()
                          if mode in PAPER_BATCH_MODES or batch == PAPER_BATCH]
        s[f"target met (batch {PAPER_BATCH})"] = (
            ("pass" if all(at_paper_batch) else "FAIL") if at_paper_batch else None)
        s["tune s"] = sum(r.get("tune_s", 0.0) for r in rows if r["model"] == name)
        # Each network on its own (a user trains one of them): full resolution, multires.
        for res, label in (("full", "full"), ("multires", "mr")):
            s[f"tune s {label}"] = sum(r.get("tune_s", 0.0) for r in rows
                                       if (r["model"], r["resolution"]) == (name, res))
        s["tune s (batch 32)"] = sum(r.get(f"{m}_tune_s", 0.0) for r in rows
                                     for m in PAPER_BATCH_MODES if r["model"] == name)
        out.append(s)
    return out


def plot(rows: list[dict[str, Any]], models: list[str], modes: list[str], title: str,
         path: Path) -> Path:
    """Bars of clips/s per model, full vs multires, one panel per mode; ratio over each pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4.6), squeeze=False)
    xs = list(range(len(models)))
    for ax, mode in zip(axes[0], modes, strict=True):
        values = {}
        for i, (res, color) in enumerate((("full", "#4c72b0"), ("multires", "#dd8452"))):
            values[res] = [next(r for r in rows if r["model"] == m and r["resolution"] == res)
                           [f"{mode}_clips_s"] for m in models]
            bars = ax.bar([x + (i - 0.5) * 0.38 for x in xs], values[res], 0.38,
                          label="full 170x170" if res == "full" else "multires 2 x 89x89",
                          color=color)
            ax.bar_label(bars, fmt="%.3g", fontsize=7)
        top = max(max(values["full"]), max(values["multires"]))
        for x, f, m in zip(xs, values["full"], values["multires"], strict=True):
            ax.text(x, max(f, m) + 0.08 * top, f"{m / f:.2f}x", ha="center", fontsize=8,
                    weight="bold")
        ax.set_ylim(0, 1.25 * top)
        ax.set_xticks(xs, [m.replace("_", "\n") for m in models])
        ax.set_ylabel("clips/s")
        kind = "inference" if PAPER_BATCH_MODES.get(mode, mode) == "forward" else "SGD step"
        where = f", batch {PAPER_BATCH}" if mode in PAPER_BATCH_MODES else ""
        ax.set_title(f"{mode} ({kind}{where}); "
                     "multires/full above bars", fontsize=9)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2,
                  frameon=False)
    fig.suptitle(title.replace(" | ", "\n", 1), fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.huge_pages = _common.huge_pages(not args.no_huge_pages)  # before any CPU tensor
    with _common.conv_plan_cache(args.use_plan_cache) as plan_cache:
        return run(args, plan_cache)


def run(args: argparse.Namespace, plan_cache: str) -> int:
    """The benchmark proper, with the conv plan cache main() chose."""
    device = _common.resolve_device(args.device)
    d_batch, d_width, d_warmup, d_repeats = DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    batch = args.batch_size or d_batch
    width = args.width or d_width
    warmup = d_warmup if args.warmup is None else args.warmup
    repeats = d_repeats if args.repeats is None else args.repeats
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    precision = ("bf16 autocast" if device.type == "cuda" and not args.no_autocast
                 else "float32") + ", " + args.memory_format

    if device.type == "cuda" and not vidconv.build_info().has_cuda_kernels:
        conv_path = "F.conv3d (vidconv built without CUDA kernels)"
    elif device.type == "cuda":
        conv_path = ("vidconv.ops.st_conv3d, per-layer choice among cuDNN 3D/2D and the fused "
                     "kernel's tiles")
    else:
        conv_path = "vidconv.ops.st_conv3d, per-layer choice among oneDNN 3D/2D formulations"
    matmul_dtype = torch.bfloat16 if "bf16" in precision else torch.float32
    ceiling = _common.measured_ceiling(device, matmul_dtype)
    peak_tflops = ceiling["tflops"]
    peak_macs_s = peak_tflops * 1e12 / 2
    rows = []
    # At the paper's batch already, forward32/train32 would repeat forward/train.
    modes = [m for m in args.modes if not (m in PAPER_BATCH_MODES and batch == PAPER_BATCH)]
    for paper_mode, base in PAPER_BATCH_MODES.items():
        if paper_mode in args.modes and paper_mode not in modes and base not in modes:
            modes.append(base)
    paper_modes = [m for m in modes if m in PAPER_BATCH_MODES]
    bar = _common.progress(None, total=len(args.models) * len(modes), desc="speed",
                           unit="step")
    for name in args.models:
        cases = [Case(name, multires, args, device, batch, width, algo)
                 for multires in (False, True) for algo in args.conv_algos]
        for mode in [m for m in modes if m not in PAPER_BATCH_MODES]:
            bar.set_postfix_str(f"{name} {mode}")
            for case in cases:
                case.tune(mode, device)
            measure_mode(cases, mode, device, warmup, repeats, peak_macs_s)
            bar.update()
        rows += [case.row for case in cases]
        del cases
        if paper_modes:
            # The paper's batch, vidconv's own choice only: the multires target at batch 32.
            # Its numbers join the rows of the same model at the default batch.
            cases = [Case(name, multires, args, device, PAPER_BATCH, width, args.conv_algos[0])
                     for multires in (False, True)]
            for mode in paper_modes:
                bar.set_postfix_str(f"{name} {mode}")
                for case in cases:
                    case.row.pop("tune_s", None)
                    case.tune(mode, device)
                measure_mode(cases, mode, device, warmup, max(1, min(repeats, 3)),
                             peak_macs_s)
                for case in cases:
                    target = next(r for r in rows if r["model"] == name and
                                  r["resolution"] == case.row["resolution"] and
                                  r["conv_algo"] == args.conv_algos[0])
                    for field in ("ms_per_clip", "clips_s", "timing", "pct_ceiling"):
                        target[f"{mode}_{field}"] = case.row[f"{mode}_{field}"]
                    target[f"{mode}_tune_s"] = case.row.get("tune_s", 0.0)
                bar.update()
            del cases
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bar.close()

    summary = summarise(rows, args.models, modes, args.conv_algos, batch)
    dev = _common.device_name(device)
    header = (f"{dev} | batch {batch}, width {width:g}, {precision}, median of {repeats} "
              f"after {warmup} warm-up | full = 170x170 clip, mr = two 89x89 streams | "
              f"{ceiling['label']}")
    payload = {
        "settings": {"models": args.models, "modes": modes, "batch_size": batch,
                     "plan_cache": plan_cache,
                     "conv_algos": args.conv_algos, "paper_batch": PAPER_BATCH,
                     "target": f"multires/full clips/s >= {TARGET_OF_MAC_RATIO} x MAC ratio",
                     "width": width, "warmup": warmup, "repeats": repeats,
                     "precision": precision, "memory_format": args.memory_format,
                     "conv_path": conv_path, "ceiling_tflops": peak_tflops,
                     "huge_pages": args.huge_pages,
                     "ceiling": ceiling},
        "rows": rows, "summary": summary, "conv_plan": conv_plan(),
        "lrn_pool_plan": [{**d, "key": asdict(d["key"])} for d in lrn_pool_plan()],
        "linear_plan": [{**d, "key": asdict(d["key"])} for d in linear_plan()],
        "pair_plan": [{**d, "key": asdict(d["key"])} for d in pair_plan()],
    }
    path = _common.write_json("speed", payload, args.json, device=device)
    if args.plot:
        main_rows = [r for r in rows
                     if r["conv_algo"] == args.conv_algos[0] and not r.get("paper_batch")]
        png = plot(main_rows, args.models, modes, header,
                   _common.RESULTS_DIR / f"speed-{_common.device_slug(device)}.png")
        print(f"plot: {png}", file=sys.stderr)
    print(f"json: {path}", file=sys.stderr)

    detail_cols = ["model", "resolution", "conv_algo", "input", "params", "gmacs_per_clip",
                   "tune_s"]
    for mode in modes:
        detail_cols += [f"{mode}_clips_s", f"{mode}_ms_per_clip"]
        detail_cols.append(f"{mode}_pct_ceiling")
    _common.print_table(rows, detail_cols, title=header)
    print()
    _common.print_table(summary, title=(
        f"multires / full with conv algo {args.conv_algos[0]} ({dev}); target: ratio >= "
        f"{TARGET_OF_MAC_RATIO} x MAC ratio, every mode (paper: 2-4x); 'x aten' = clips/s over "
        f"plain PyTorch's conv3d; tune s = first-use tuning of the model's layers, both networks "
        f"(tune s full / mr: each network alone; a layer shape met earlier was decided there)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
