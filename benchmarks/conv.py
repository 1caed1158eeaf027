"""Fused spatio-temporal convolution (vidconv.ops.st_conv3d) against PyTorch's convolutions.

Every conv layer shape of the single-frame, early-fusion and slow-fusion models, full resolution
(170x170 input) and multiresolution (89x89 per stream), at batch 32 in bfloat16 on CUDA. Ours
(conv + bias + ReLU fused, channels_last_3d input) is timed against the fastest of:
  - F.conv3d + ReLU in channels_last_3d and in NCDHW (cuDNN, cudnn.benchmark=True), and
  - F.conv2d + ReLU over frames stacked along channels (channels_last), where the temporal
    extent equals the temporal stride with no temporal padding (then the 3D conv is exactly a
    2D one over groups of kt frames; kt = 1 layers qualify too).
Forward and backward (grad of x, weight, bias through the ReLU) are timed separately; the
backward of ours is ATen's convolution_backward behind the ReLU mask (no hand-written backward
kernel yet), so its column shows the cost of that first step.

On a CPU it runs a reduced check (float32, batch 1, multires shapes, fewer repeats; our op is
ATen's conv3d + ReLU there, so this only exercises the script) and labels every number with the
CPU it ran on. `--quick` asks for that reduced run on any device (on CUDA: batch 8, bfloat16).
Table printed last; JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    device_name,
    matmul_tflops,
    print_table,
    progress,
    resolve_device,
    time_fn,
    write_json,
)

import vidconv  # noqa: E402
from vidconv.ops import st_conv3d  # noqa: E402


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
        """2 x multiply-adds of the forward convolution (the real C, not the padded one)."""
        return 2 * batch * math.prod(self.out_thw()) * self.k * self.c * math.prod(self.ksize)

    def stackable(self) -> bool:
        """Whether conv2d over frames stacked along channels computes the same thing."""
        return self.ksize[0] == self.stride[0] and self.padding[0] == 0 \
            and self.thw[0] % self.ksize[0] == 0


def model_layers() -> dict[tuple[str, str], Layer]:
    """(model, layer) -> shape, following /work/shared/paper.md: 170 -> 54 -> 27 -> 27 -> 14
    -> 14 -> 7 full-res, 89 -> 27 -> 14 -> 14 -> 7 -> 7 per multires stream."""
    layers: dict[tuple[str, str], Layer] = {}
    for res, size, s2, s3 in (("", 170, 27, 14), ("multires ", 89, 14, 7)):
        # conv1 time extent/stride and the T seen by conv2/conv3 per model.
        for model, kt1, st1, t1, kt2, st2, kt3 in (
            ("single_frame", 1, 1, 1, 1, 1, 1),
            ("early_fusion", 10, 1, 10, 1, 1, 1),
            ("slow_fusion", 4, 2, 10, 2, 2, 2),
        ):
            name = res + model
            layers[(name, "conv1")] = Layer(3, 96, (kt1, 11, 11), (st1, 3, 3), (0, 0, 0),
                                            (t1, size, size))
            t2 = (t1 - kt1) // st1 + 1
            layers[(name, "conv2")] = Layer(96, 256, (kt2, 5, 5), (st2, 1, 1), (0, 2, 2),
                                            (t2, s2, s2))
            t3 = (t2 - kt2) // st2 + 1
            layers[(name, "conv3")] = Layer(256, 384, (kt3, 3, 3), (1, 1, 1), (0, 1, 1),
                                            (t3, s3, s3))
            t4 = t3 - kt3 + 1
            layers[(name, "conv4")] = Layer(384, 384, (1, 3, 3), (1, 1, 1), (0, 1, 1),
                                            (t4, s3, s3))
            layers[(name, "conv5")] = Layer(384, 256, (1, 3, 3), (1, 1, 1), (0, 1, 1),
                                            (t4, s3, s3))
    return layers


def unique_shapes(layers: dict[tuple[str, str], Layer]) -> dict[Layer, list[str]]:
    shapes: dict[Layer, list[str]] = {}
    for (model, name), layer in layers.items():
        shapes.setdefault(layer, []).append(f"{model}/{name}")
    return shapes


def _stack_frames(x: torch.Tensor, kt: int) -> torch.Tensor:
    """(N, C, T, H, W) -> (N * T/kt, C * kt, H, W), channels_last: groups of kt frames."""
    n, c, t, h, w = x.shape
    return (x.reshape(n, c, t // kt, kt, h, w).permute(0, 2, 1, 3, 4, 5)
            .reshape(n * (t // kt), c * kt, h, w).contiguous(memory_format=torch.channels_last))


def _candidates(layer: Layer, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor):
    """name -> (forward fn, leaves) for ours and each baseline; inputs prepared in the layout
    each one reads (layout changes are not timed)."""
    cl = torch.channels_last_3d
    x_cl = x.contiguous(memory_format=cl).requires_grad_()
    w_cl = w.contiguous(memory_format=cl).requires_grad_()
    x_nc = x.contiguous().requires_grad_()
    w_nc = w.contiguous().requires_grad_()
    w_ours = w.clone().requires_grad_()
    b_ = [b.clone().requires_grad_() for _ in range(4)]
    cands = {
        "ours": (lambda: st_conv3d(x_cl, w_ours, b_[0], layer.stride, layer.padding),
                 (x_cl, w_ours, b_[0])),
        "conv3d_cl": (lambda: F.conv3d(x_cl, w_cl, b_[1], layer.stride, layer.padding).relu_(),
                      (x_cl, w_cl, b_[1])),
        "conv3d_ncdhw": (lambda: F.conv3d(x_nc, w_nc, b_[2], layer.stride,
                                          layer.padding).relu_(), (x_nc, w_nc, b_[2])),
    }
    if layer.stackable():
        kt = layer.ksize[0]
        x2 = _stack_frames(x.detach(), kt).requires_grad_()
        w2 = (w.detach().reshape(w.shape[0], -1, *w.shape[3:])
              .contiguous(memory_format=torch.channels_last).requires_grad_())
        # weight (K, C, kt, kh, kw) -> (K, C*kt, kh, kw) matches the (C, kt) channel stacking.
        cands["conv2d_stacked"] = (
            lambda: F.conv2d(x2, w2, b_[3], layer.stride[1:], layer.padding[1:]).relu_(),
            (x2, w2, b_[3]))
    return cands


def bench_layer(layer: Layer, batch: int, device: torch.device, dtype: torch.dtype,
                backward: bool, warmup: int, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, layer.c, *layer.thw, generator=gen).to(device, dtype)
    fan_in = layer.c * math.prod(layer.ksize)
    w = (torch.randn(layer.k, layer.c, *layer.ksize, generator=gen) / fan_in**0.5).to(device,
                                                                                        dtype)
    b = (torch.randn(layer.k, generator=gen) * 0.1).to(device, dtype)
    cands = _candidates(layer, x, w, b)
    result: dict = {"fwd_ms": {}, "bwd_ms": {}}
    # Ours must agree with the baseline it is compared with (a wrong fast kernel is no result).
    with torch.no_grad():
        ours = cands["ours"][0]().float()
        base = cands["conv3d_cl"][0]().float()
        result["max_rel_diff"] = ((ours - base).abs().max() / base.abs().max()).item()
    for name, (fn, leaves) in cands.items():
        with torch.no_grad():
            result["fwd_ms"][name] = time_fn(fn, device, warmup=warmup,
                                             repeats=repeats)["median_ms"]
        if backward:
            out = fn()
            grad = torch.randn_like(out)

            def bwd(out=out, grad=grad, leaves=leaves):
                return torch.autograd.grad(out, leaves, grad, retain_graph=True)

            result["bwd_ms"][name] = time_fn(bwd, device, warmup=warmup,
                                             repeats=repeats)["median_ms"]
            del out
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
    parser.add_argument("--models", default="",
                        help="comma-separated substrings; only layers of matching models")
    parser.add_argument("--no-backward", action="store_true", help="time the forward only")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (median)")
    parser.add_argument("--json", type=Path, default=None,
                        help="JSON path (default benchmarks/results/conv-<device>.json)")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    on_gpu = device.type == "cuda"
    if on_gpu and not vidconv.build_info().has_cuda_kernels:
        parser.error("vidconv was built without CUDA kernels; rebuild it on this machine")
    quick = args.quick or not on_gpu
    batch = args.batch or (1 if not on_gpu else 8 if args.quick else 32)
    dtype = getattr(torch, args.dtype or ("bfloat16" if on_gpu else "float32"))
    repeats = args.repeats or (2 if not on_gpu else 5 if args.quick else 20)
    warmup = 5 if on_gpu else 2
    torch.backends.cudnn.benchmark = True
    label = device_name(device)
    if not on_gpu:
        label += " -- ATen path, not the CUDA kernel"
    print(f"conv benchmark on {label}, batch {batch}, {dtype}", file=sys.stderr)

    shapes = unique_shapes(model_layers())
    if args.models:
        wanted = [m.strip() for m in args.models.split(",") if m.strip()]
        shapes = {s: u for s, u in shapes.items() if any(w in x for w in wanted for x in u)}
    if quick and not args.models:
        # The reduced run: the multires shapes cover every layer type at a quarter the cost.
        shapes = {s: u for s, u in shapes.items() if any(x.startswith("multires") for x in u)}
    ceiling = matmul_tflops(device, dtype)

    rows, records = [], []
    for layer, uses in progress(list(shapes.items()), desc="layers"):
        r = bench_layer(layer, batch, device, dtype, not args.no_backward, warmup, repeats)
        flops = layer.flops(batch)
        base_fwd = {k: v for k, v in r["fwd_ms"].items() if k != "ours"}
        best_fwd = min(base_fwd, key=base_fwd.get)
        ours_tflops = flops / (r["fwd_ms"]["ours"] * 1e-3) / 1e12
        row = {
            "layer": uses[0] + (f" (+{len(uses) - 1})" if len(uses) > 1 else ""),
            "C>K": f"{layer.c}>{layer.k}",
            "k": "x".join(map(str, layer.ksize)),
            "in": "x".join(map(str, layer.thw)),
            "fwd ms": r["fwd_ms"]["ours"],
            "best base": best_fwd,
            "base ms": base_fwd[best_fwd],
            "fwd x": base_fwd[best_fwd] / r["fwd_ms"]["ours"],
            "TFLOP/s": ours_tflops,
            "% mm": 100 * ours_tflops / ceiling,
        }
        record = {"uses": uses, "shape": asdict(layer), "batch": batch, "flops": flops, **r,
                  "best_fwd_baseline": best_fwd, "fwd_speedup": row["fwd x"],
                  "fwd_tflops": ours_tflops}
        if r["bwd_ms"]:
            base_bwd = {k: v for k, v in r["bwd_ms"].items() if k != "ours"}
            best_bwd = min(base_bwd, key=base_bwd.get)
            row["bwd ms"] = r["bwd_ms"]["ours"]
            row["bwd x"] = base_bwd[best_bwd] / r["bwd_ms"]["ours"]
            record.update(best_bwd_baseline=best_bwd, bwd_speedup=row["bwd x"],
                          bwd_tflops=2 * flops / (r["bwd_ms"]["ours"] * 1e-3) / 1e12)
        row["diff"] = r["max_rel_diff"]
        rows.append(row)
        records.append(record)

    fwd_x = [r["fwd x"] for r in rows]
    geo = math.exp(sum(math.log(v) for v in fwd_x) / len(fwd_x)) if fwd_x else float("nan")
    payload = {"batch": batch, "dtype": str(dtype), "matmul_tflops": ceiling,
               "fwd_speedup_geomean": geo, "fwd_speedup_min": min(fwd_x, default=float("nan")),
               "backward": "ATen convolution_backward behind the ReLU mask (not hand-written)",
               "layers": records}
    path = write_json("conv", payload, path=args.json, device=device)
    print(f"JSON: {path}", file=sys.stderr)
    print_table(rows, title=(f"st_conv3d vs best of cuDNN conv3d (CL/NCDHW) and stacked conv2d "
                             f"on {label}, batch {batch}, {dtype}; fwd x > 1 = ours faster; "
                             f"% mm of measured matmul {ceiling:.1f} TFLOP/s; "
                             f"fwd geomean {geo:.2f}x, min {min(fwd_x, default=0):.2f}x"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
