"""Every st_conv3d candidate on every paper layer: what vidconv chooses, against the best of ATen.

The conv layers of every architecture (single frame, early, late and slow fusion), full
resolution (170x170) and multiresolution (89x89 streams), read from the models' own layer tables.
For each layer shape and each direction (forward conv + bias + ReLU, input gradient, weight
gradient) every candidate of vidconv.ops.conv_algos that applies is timed on the same
channels_last_3d tensors (the layout the models run in): ATen's conv3d in NCDHW and
channels_last_3d (cuDNN / oneDNN), the exact 2D reformulations (frames folded into the batch,
frames stacked along channels), the rearranged problems (``s2d_*``: space-to-depth of the
spatially strided conv1; ``dgrad_as_fwd_*`` / ``wgrad_as_fwd_*``: the input / weight gradient of
stride-1 layers as a forward convolution), and on CUDA each tile configuration of the
hand-written implicit-GEMM kernels, also as engines of those rearranged problems. Each one's
output is compared with the reference (ATen conv3d) first.

Reported per layer and direction: every candidate's time and TFLOP/s, the candidate
st_conv3d's planner chose for that layer (``VIDCONV_CONV_ALGO=auto``, tuned in this run unless
the plan cache already has it), and two ratios: "x ATen" = time of the best ATen-only candidate
(everything but the hand-written kernels) / time of the chosen one, and "x plain" = plain
PyTorch (``aten``: F.conv3d on the tensors as given) / chosen. "x ATen" below 1 would mean the
planner chose a slower candidate than it could have (timing noise on a shared machine does that).
"reform." names the fastest rearranged candidate where one applies, with plain / its time.

On a CPU it runs a reduced check (float32, batch 1, multires shapes only unless --models is
given, few repeats) and labels every number with the CPU it ran on. `--quick` asks for that
reduced run on any device (on CUDA: batch 8, bfloat16). Table printed last; JSON to
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    conv_plan_cache,
    device_name,
    measured_ceiling,
    print_table,
    progress,
    resolve_device,
    time_fn,
    write_json,
)

import vidconv  # noqa: E402
from vidconv.ops import conv_algos, conv_plan, conv_planner, st_conv3d  # noqa: E402
from vidconv.ops.st_conv import _output_format  # noqa: E402

DIRECTIONS = conv_algos.DIRECTIONS
SHORT = {"forward": "fwd", "input_grad": "dx", "weight_grad": "dw"}


@dataclass(frozen=True)
class Layer:
    c: int
    k: int
    ksize: tuple[int, int, int]
    stride: tuple[int, int, int]
    padding: tuple[int, int, int]
    thw: tuple[int, int, int]  # input (T, H, W)

    def out_thw(self) -> tuple[int, ...]:
        return tuple((i + 2 * p - k) // s + 1 for i, k, s, p in
                     zip(self.thw, self.ksize, self.stride, self.padding, strict=True))

    def flops(self, batch: int) -> int:
        """2 x multiply-adds of the convolution (the same count for each gradient)."""
        return 2 * batch * math.prod(self.out_thw()) * self.k * self.c * math.prod(self.ksize)


def model_layers(width: float = 1.0) -> dict[tuple[str, str], Layer]:
    """(model, conv name) -> shape, from each model's layer table
    (:func:`vidconv.models.conv_layer_shapes`)."""
    from vidconv.models import conv_layer_shapes

    return {key: Layer(**shape) for key, shape in conv_layer_shapes(width).items()}


def unique_shapes(layers: dict[tuple[str, str], Layer]) -> dict[Layer, list[str]]:
    shapes: dict[Layer, list[str]] = {}
    for (model, name), layer in layers.items():
        uses = shapes.setdefault(layer, [])
        if f"{model}/{name}" not in uses:
            uses.append(f"{model}/{name}")
    return shapes


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    b = b.double()
    return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def bench_layer(layer: Layer, batch: int, device: torch.device, dtype: torch.dtype,
                directions: list[str], warmup: int, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, layer.c, *layer.thw, generator=gen).to(device, dtype)
    x = x.contiguous(memory_format=torch.channels_last_3d)
    fan_in = layer.c * math.prod(layer.ksize)
    w = (torch.randn(layer.k, layer.c, *layer.ksize, generator=gen) / fan_in**0.5).to(device,
                                                                                        dtype)
    b = (torch.randn(layer.k, generator=gen) * 0.1).to(device, dtype)
    fmt = _output_format(x)
    stride, padding = list(layer.stride), list(layer.padding)
    with torch.no_grad():
        out = st_conv3d(x, w, b, stride, padding)  # the planner decides the forward here
        grad = torch.randn(out.shape, generator=gen).to(device, dtype)
        grad = grad.contiguous(memory_format=torch.channels_last_3d)
        # relu and the bias gradient as the models ask for them, so the keys below match.
        mask = [d in directions for d in ("input_grad", "weight_grad")] + [True]
        if any(mask[:2]):
            torch.ops.vidconv.st_conv3d_backward(grad, x, w, out, stride, padding, True, mask)
    chosen = {}
    for direction in directions:
        key = conv_planner.make_key(direction, x, w, True, stride, padding, True)
        decision = conv_planner.decision_for(key)
        chosen[direction] = decision.chosen if decision else conv_algos.REFERENCE
    flops = layer.flops(batch)
    result: dict = {"ms": {}, "tflops": {}, "rel_diff": {}, "chosen": {}}
    for direction in directions:
        args = ((x, w, b, stride, padding, True) if direction == "forward"
                else (grad, x, w, stride, padding))
        key = conv_planner.make_key(direction, x, w, True, stride, padding, True)
        ms, tflops, diff = {}, {}, {}
        with torch.no_grad():
            ref = conv_planner.run_algorithm(conv_algos.ALGORITHMS[conv_algos.REFERENCE],
                                             direction, args, fmt)
            for algo in conv_planner.candidates_for(key, device.type, dtype):
                def run(algo=algo, args=args, direction=direction):
                    return conv_planner.run_algorithm(algo, direction, args, fmt)
                try:
                    diff[algo.name] = _rel(run(), ref)
                    ms[algo.name] = time_fn(run, device, warmup=warmup,
                                            repeats=repeats)["median_ms"]
                    tflops[algo.name] = flops / (ms[algo.name] * 1e-3) / 1e12
                except Exception as exc:  # noqa: BLE001 - a failing candidate is a result
                    diff[algo.name] = float("nan")
                    ms[algo.name] = float("nan")
                    tflops[algo.name] = float("nan")
                    print(f"  {algo.name} {direction} failed: {exc}", file=sys.stderr)
        result["ms"][direction] = ms
        result["tflops"][direction] = tflops
        result["rel_diff"][direction] = diff
        result["chosen"][direction] = chosen.get(direction, conv_algos.REFERENCE)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto (default)")
    parser.add_argument("--quick", action="store_true",
                        help="reduced run: multires shapes, small batch, few repeats")
    parser.add_argument("--batch", type=int, default=None,
                        help="clips per batch (default 32 on CUDA, 1 on the CPU)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                        help="default bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--width", type=float, default=1.0,
                        help="channel width multiplier of the models (default 1.0, the paper's)")
    parser.add_argument("--models", default="",
                        help="comma-separated substrings; only layers of matching models")
    parser.add_argument("--no-backward", action="store_true", help="time the forward only")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (median)")
    parser.add_argument("--json", type=Path, default=None,
                        help="JSON path (default benchmarks/results/conv-<device>.json)")
    parser.add_argument("--use-plan-cache", action="store_true",
                        help="let st_conv3d reuse the decisions in $VIDCONV_CACHE_DIR (default: "
                             "decide afresh in a temporary cache)")
    args = parser.parse_args(argv)
    if args.batch is not None and args.batch < 1:
        parser.error(f"--batch must be >= 1, got {args.batch}")
    if not args.width > 0:
        parser.error(f"--width must be > 0, got {args.width}")
    with conv_plan_cache(args.use_plan_cache) as plan_cache:
        return run(args, parser, plan_cache)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser, plan_cache: str) -> int:
    """The benchmark proper, with the conv plan cache main() chose."""
    device = resolve_device(args.device)
    on_gpu = device.type == "cuda"
    if on_gpu and not vidconv.build_info().has_cuda_kernels:
        parser.error("vidconv was built without CUDA kernels; rebuild it on this machine")
    quick = args.quick or not on_gpu
    batch = args.batch or (1 if not on_gpu else 8 if args.quick else 32)
    dtype = getattr(torch, args.dtype or ("bfloat16" if on_gpu else "float32"))
    repeats = args.repeats or (2 if not on_gpu else 5 if args.quick else 20)
    warmup = 5 if on_gpu else 1
    directions = ["forward"] if args.no_backward else list(DIRECTIONS)
    torch.backends.cudnn.benchmark = True
    label = device_name(device)
    print(f"conv benchmark on {label}, batch {batch}, {dtype}", file=sys.stderr)

    shapes = unique_shapes(model_layers(args.width))
    if args.models:
        wanted = [m.strip() for m in args.models.split(",") if m.strip()]
        shapes = {s: u for s, u in shapes.items() if any(w in x for w in wanted for x in u)}
    if quick and not args.models:
        # The reduced run: the multires shapes cover every layer type at a quarter the cost.
        shapes = {s: u for s, u in shapes.items() if any(x.startswith("multires") for x in u)}
    measured = measured_ceiling(device, dtype)
    ceiling = measured["tflops"]

    rows, records = [], []
    for layer, uses in progress(list(shapes.items()), desc="layers"):
        r = bench_layer(layer, batch, device, dtype, directions, warmup, repeats)
        flops = layer.flops(batch)
        record = {"uses": uses, "shape": asdict(layer), "batch": batch, "flops": flops,
                  "candidates_ms": r["ms"], "candidates_tflops": r["tflops"],
                  "candidates_rel_diff": r["rel_diff"], "chosen": r["chosen"]}
        for direction in directions:
            ms = {n: t for n, t in r["ms"][direction].items() if t == t}  # drop NaN (failed)
            aten_only = {n: t for n, t in ms.items()
                         if not conv_algos.runs_hand_written_kernel(n)}
            reform = {n: t for n, t in ms.items() if conv_algos.is_reformulation(n)}
            best_reform = min(reform, key=reform.get) if reform else None
            best_aten = min(aten_only, key=aten_only.get)
            chosen = r["chosen"][direction]
            chosen_ms = ms.get(chosen, float("nan"))
            tflops = flops / (chosen_ms * 1e-3) / 1e12
            record[direction] = {"chosen": chosen, "chosen_ms": chosen_ms, "best_aten": best_aten,
                                 "best_aten_ms": aten_only[best_aten],
                                 "x_best_aten": aten_only[best_aten] / chosen_ms,
                                 "x_plain": ms[conv_algos.REFERENCE] / chosen_ms,
                                 "tflops": tflops, "best_reformulation": best_reform,
                                 "best_reformulation_ms": reform.get(best_reform),
                                 "reformulation_x_plain": (ms[conv_algos.REFERENCE]
                                                           / reform[best_reform]
                                                           if best_reform else None)}
            rows.append({
                "layer": uses[0] + (f" (+{len(uses) - 1})" if len(uses) > 1 else ""),
                "dir": SHORT[direction],
                "C>K": f"{layer.c}>{layer.k}",
                "k": "x".join(map(str, layer.ksize)),
                "in": "x".join(map(str, layer.thw)),
                "chosen": chosen,
                "ms": chosen_ms,
                "TFLOP/s": tflops,
                "% ceiling": 100 * tflops / ceiling,
                "best ATen": best_aten,
                "x ATen": aten_only[best_aten] / chosen_ms,
                "x plain": ms[conv_algos.REFERENCE] / chosen_ms,
                "reform.": (f"{best_reform} x{ms[conv_algos.REFERENCE] / reform[best_reform]:.2f}"
                            if best_reform else "-"),
                "all (ms)": " ".join(f"{n}={t:.3g}" for n, t in sorted(ms.items(),
                                                                        key=lambda i: i[1])),
            })
        # The keys test_benchmarks and older readers know: st_conv3d as a whole ("ours").
        record["fwd_ms"] = {"ours": record["forward"]["chosen_ms"],
                            **r["ms"]["forward"]}
        record["max_rel_diff"] = max(v for v in r["rel_diff"]["forward"].values())
        records.append(record)

    def geomean(values: list[float]) -> float:
        values = [v for v in values if v == v and v > 0]
        return math.exp(sum(map(math.log, values)) / len(values)) if values else float("nan")

    summary = {}
    for direction in directions:
        xs = [rec[direction]["x_best_aten"] for rec in records]
        xp = [rec[direction]["x_plain"] for rec in records]
        summary[direction] = {"x_best_aten_geomean": geomean(xs),
                              "x_best_aten_min": min(xs, default=float("nan")),
                              "x_plain_geomean": geomean(xp)}
    payload = {"batch": batch, "dtype": str(dtype), "width": args.width,
               "layout": "channels_last_3d", "ceiling_tflops": ceiling, "ceiling": measured,
               "summary": summary, "plan_cache": plan_cache,
               "plan": conv_plan(), "layers": records}
    path = write_json("conv", payload, path=args.json, device=device)
    print(f"JSON: {path}", file=sys.stderr)
    sums = "; ".join(f"{SHORT[d]}: x ATen geomean {s['x_best_aten_geomean']:.2f} "
                     f"(min {s['x_best_aten_min']:.2f}), x plain {s['x_plain_geomean']:.2f}"
                     for d, s in summary.items())
    print_table(rows, title=(f"st_conv3d candidates per paper layer on {label}, batch {batch}, "
                             f"{dtype}, width {args.width:g}, channels_last_3d input; chosen = "
                             f"the planner's choice; x ATen = best ATen candidate / chosen, "
                             f"x plain = F.conv3d / chosen (> 1: chosen faster); % ceiling of "
                             f"{measured['label']} | {sums}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
