"""What every benchmark script shares: device facts, timing, ceilings, tables and JSON.

Timings are medians of repeats after warm-up; on CUDA they come from CUDA events, on the CPU from
perf_counter. Every JSON file carries `device_info()` so a number never travels without the
device it was measured on.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def resolve_device(name: str | None) -> torch.device:
    """'auto' or None picks CUDA when there is a device; a device that is not there (or a bad
    name) ends the script with vidconv.train's one-line message instead of a traceback."""
    from vidconv.train.device import resolve_device as resolve

    try:
        return resolve(name or "auto")
    except ValueError as exc:
        raise SystemExit(f"--device: {exc}") from exc


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU: {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def device_info(device: torch.device | str) -> dict[str, Any]:
    """The device and software versions a measurement was taken with."""
    import vidconv

    device = torch.device(device)
    build = vidconv.build_info()
    info: dict[str, Any] = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "vidconv": vidconv.__version__,
        "vidconv_cuda": build.cuda,
        "vidconv_archs": list(build.archs),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["sm_count"] = props.multi_processor_count
        info["capability"] = f"{props.major}.{props.minor}"
        info["memory_gib"] = round(props.total_memory / 2**30, 1)
    return info


def device_slug(device: torch.device | str) -> str:
    """A file-name-safe tag for the device: 'cpu', or e.g. 'nvidia-h100-80gb-hbm3'."""
    device = torch.device(device)
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], Any], device: torch.device | str, *, warmup: int = 3,
            repeats: int = 10) -> dict[str, float]:
    """Median, min and max milliseconds of `fn()` over `repeats` runs after `warmup` runs."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: list[float] = []
    if device.type == "cuda":
        for _ in range(repeats):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
            "repeats": repeats}


def copy_bandwidth_gbs(device: torch.device | str, nbytes: int | None = None) -> float:
    """Measured copy bandwidth in GB/s, counting bytes read plus bytes written."""
    device = torch.device(device)
    if nbytes is None:
        nbytes = 1 << 30 if device.type == "cuda" else 1 << 27
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, warmup=2, repeats=10)
    return 2 * nbytes / (t["median_ms"] * 1e-3) / 1e9


def matmul_tflops(device: torch.device | str, dtype: torch.dtype = torch.bfloat16,
                  n: int | None = None) -> float:
    """Measured dense matmul rate in TFLOP/s on random data (the device's practical ceiling)."""
    device = torch.device(device)
    if n is None:
        n = 8192 if device.type == "cuda" else 1024
    if device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = time_fn(lambda: a @ b, device, warmup=2, repeats=5)
    return 2 * n**3 / (t["median_ms"] * 1e-3) / 1e12


def _ceiling_kernels(device: torch.device, dtype: torch.dtype, quick: bool
                     ) -> list[tuple[str, float, Callable[[], Any]]]:
    """(name, FLOPs, run) of the dense kernels a ceiling is the best of: square and
    im2col-shaped matmuls, and a large 3D convolution in the layout the models use (oneDNN /
    cuDNN may run it faster than any one GEMM of the BLAS library)."""
    cuda = device.type == "cuda"
    if quick:
        squares, tall, conv = (256,), (1024, 128, 256), (1, 16, 2, 16, 16, 32)
    elif cuda:
        squares, tall, conv = (4096, 8192), (65536, 1024, 2048), (32, 96, 10, 27, 27, 256)
    else:
        squares, tall, conv = (1024,), (4096, 256, 1024), (2, 96, 4, 27, 27, 256)
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=dtype, generator=g)

    kernels = []
    for n in squares:
        a, b = rand(n, n), rand(n, n)
        kernels.append((f"matmul {n}x{n}x{n}", 2.0 * n**3, lambda a=a, b=b: a @ b))
    m, k, n = tall
    a, b = rand(m, k), rand(k, n)
    kernels.append((f"matmul {m}x{k}x{n}", 2.0 * m * k * n, lambda a=a, b=b: a @ b))
    batch, cin, frames, h, w, cout = conv
    x = rand(batch, cin, frames, h, w).contiguous(memory_format=torch.channels_last_3d)
    weight = rand(cout, cin, 1, 5, 5).contiguous(memory_format=torch.channels_last_3d)
    flops = 2.0 * batch * cout * cin * 25 * frames * h * w
    kernels.append((f"conv3d {cin}->{cout} 1x5x5 on {batch}x{frames}x{h}x{w}", flops,
                    lambda: torch.nn.functional.conv3d(x, weight, padding=(0, 2, 2))))
    return kernels


def measured_ceiling(device: torch.device | str, dtype: torch.dtype = torch.bfloat16, *,
                     quick: bool = False, repeats: int = 5) -> dict[str, Any]:
    """The device's compute ceiling as measured in this run: the best rate of several dense
    kernels (matmuls in a few shapes, a large conv3d), each its fastest of `repeats`.

    One GEMM alone is not a ceiling: a vendor BLAS can run below what the convolution library
    reaches on the same chip, and a model's convolutions then show above 100% of it. The best of
    several kernels is still a measured figure, not the datasheet's; a workload may come close
    to it but is not bounded by it. Low-precision dtypes are timed in float32 on the CPU.

    Returns ``{"tflops", "best", "kernels": {name: TFLOP/s}, "dtype", "label"}``; `label`
    names what was measured, for a table header ("ceiling: best of ... measured").
    """
    device = torch.device(device)
    if device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    rates: dict[str, float] = {}
    with torch.inference_mode():
        for name, flops, run in _ceiling_kernels(device, dtype, quick):
            t = time_fn(run, device, warmup=2, repeats=repeats)
            rates[name] = flops / (t["min_ms"] * 1e-3) / 1e12
    best = max(rates, key=rates.__getitem__)
    dtype_name = str(dtype).replace("torch.", "")
    label = (f"ceiling: best of {', '.join(rates)} measured ({dtype_name}): "
             f"{rates[best] * 1e3:,.0f} GFLOP/s, by {best}")
    return {"tflops": rates[best], "best": best, "kernels": rates, "dtype": dtype_name,
            "label": label}


def cpu_seconds() -> float:
    """CPU seconds (user + system) used so far by this process and every process under it,
    living (read from /proc, Linux) or exited and waited for: a loader's worker processes and
    DALI's decoder process count with the thread doing the loading."""
    import resource

    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    proc = Path("/proc")
    if not proc.is_dir():
        return total
    children: dict[int, list[int]] = {}
    ticks: dict[int, int] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        fields = stat[stat.rindex(")") + 2:].split()
        pid = int(entry.name)
        children.setdefault(int(fields[1]), []).append(pid)
        ticks[pid] = int(fields[11]) + int(fields[12])  # utime + stime
    todo, per_second = list(children.get(os.getpid(), [])), os.sysconf("SC_CLK_TCK")
    while todo:
        pid = todo.pop()
        total += ticks.get(pid, 0) / per_second
        todo += children.get(pid, [])
    return total


def huge_pages(enabled: bool) -> str:
    """Big CPU tensors on transparent huge pages (vidconv.host_memory.use_huge_pages), as the
    ``vidconv`` command runs, unless not `enabled`: "on", or "off: <why>" for the JSON."""
    from vidconv.host_memory import use_huge_pages

    if not enabled:
        return "off: --no-huge-pages"
    why = use_huge_pages()
    return "on" if why is None else f"off: {why}"


def add_huge_pages_flag(p: Any) -> None:
    p.add_argument("--no-huge-pages", action="store_true",
                   help="leave PyTorch's CPU tensors on 4 KiB pages (default: huge pages for "
                        "tensors of 2 MiB and more, as the vidconv command does; see "
                        "vidconv.host_memory)")


@contextlib.contextmanager
def conv_plan_cache(use_users: bool) -> Iterator[str]:
    """The conv algorithm plan a benchmark runs with: the user's ($VIDCONV_CACHE_DIR) when
    `use_users`, else a fresh temporary one, so that the figures include first-use tuning and
    inherit no decision made on another day or under another load. Yields "user" or "fresh"."""
    from vidconv.ops import clear_conv_plan

    if use_users:
        yield "user"
        return
    plan_dir = tempfile.mkdtemp(prefix="vidconv-bench-plan-")
    saved = os.environ.get("VIDCONV_CACHE_DIR")
    os.environ["VIDCONV_CACHE_DIR"] = plan_dir
    clear_conv_plan()
    try:
        yield "fresh"
    finally:
        if saved is None:
            os.environ.pop("VIDCONV_CACHE_DIR", None)
        else:
            os.environ["VIDCONV_CACHE_DIR"] = saved
        clear_conv_plan()
        shutil.rmtree(plan_dir, ignore_errors=True)


def write_json(name: str, payload: dict[str, Any], path: str | Path | None = None,
               device: torch.device | str | None = None) -> Path:
    """Write `payload` (plus device_info) to `path` or benchmarks/results/<name>-<device>.json."""
    device = torch.device(device) if device is not None else resolve_device(None)
    data = {"benchmark": name, "device_info": device_info(device), **payload}
    if path is None:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path = RESULTS_DIR / f"{name}-{device_slug(device)}.json"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value == 0 or 0.01 <= abs(value) < 1e5:
            return f"{value:.3g}" if abs(value) < 10 else f"{value:,.1f}"
        return f"{value:.3g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return "-" if value is None else str(value)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None,
                 title: str | None = None) -> str:
    """A plain-text table, one row per dict; columns default to the first row's keys."""
    if not rows:
        return (title + "\n" if title else "") + "(no rows)"
    columns = list(columns or rows[0].keys())
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = [title] if title else []
    lines.append("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None,
                title: str | None = None) -> None:
    print(format_table(rows, columns, title), flush=True)


def progress(iterable: Iterable[Any] | None = None, **tqdm_kwargs: Any) -> Any:
    """A tqdm progress bar on stderr (so the table on stdout stays clean). Without an iterable,
    a manual bar (pass ``total=`` and call ``.update()``)."""
    from tqdm import tqdm

    tqdm_kwargs.setdefault("file", sys.stderr)
    tqdm_kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **tqdm_kwargs)
