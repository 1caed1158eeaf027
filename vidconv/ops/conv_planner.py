"""Which algorithm runs each st_conv3d: measured per layer on the user's device, and remembered.

vidconv must never make a network slower or less correct than plain PyTorch. So the first time
st_conv3d meets a layer (a :class:`ConvKey`: device, dtype, layout, sizes, kernel, stride,
padding, ReLU, bias, direction), every algorithm of :mod:`vidconv.ops.conv_algos` that applies
is run on the real tensors, its result checked against the reference (ATen's conv3d, ``"aten"``)
and timed: CUDA events on a GPU (after two untimed warm-up runs), ``perf_counter`` on the CPU
(where the checked run is the first timed one: a layer takes tens of milliseconds there and a
model's tuning must stay within seconds). Candidates within 15% of the fastest first time are
timed again, run by run in turn (so a change in the machine's load falls on all of them alike),
and their best run (CPU: other processes only ever add time) or median run (CUDA) decides; a
clear winner needs no more runs. The fastest one that agrees is kept for the key (another
candidate replaces the reference only when it beats it by more than the timing noise: 10% on the
CPU, 3% on CUDA), in memory and in ``$VIDCONV_CACHE_DIR/conv_plan.json`` (default
``~/.cache/vidconv``), which is keyed by the device and the torch / CUDA / cuDNN / vidconv
versions. The reference is always a candidate, so the choice is never slower than it by more
than the timing noise.

A busy machine (data-loading workers, another job on the same cores) makes timings meaningless
and a choice made then would be remembered for good. So when the repeated runs of the reference
or of the winner differ by more than 1.5x (CPU) or 1.25x (CUDA), and the layer takes at least
0.5 ms (CPU) / 0.05 ms (CUDA), the decision is "noisy": the
reference runs, for this process only, nothing is written to the file, one warning says so, and
a later process decides again.

"Agrees" means: the largest absolute difference from the reference, relative to the reference's
largest magnitude, is within ``4 x drift + 2 eps(dtype) + 4 sqrt(R) eps(accumulator)``, where
drift is how far the reference itself lands from a float64 computation of the same layer (measured
on a few output positions of the first clip, scaled by sqrt(R) for the weight gradient) and R
is the length of the reduction. A candidate that disagrees or raises is never chosen for that
key, and one warning names the layer and the candidate.

Knobs:

- ``VIDCONV_CONV_ALGO=auto`` (default) as above; ``aten`` always runs the reference (plain
  PyTorch); ``fused`` the hand-written CUDA kernel's tiles (timed among themselves; the backward
  and the CPU use the reference); or any candidate name (:func:`algorithm_names`), used wherever
  it applies, the reference elsewhere. An unknown name is a ValueError listing the names.
- ``VIDCONV_TUNE=0``: no timing; a fixed choice (the reference) for every key not in the cache.

Under ``torch.distributed`` every rank uses rank 0's choice, broadcast once per layer (the key
without the batch size), since algorithms round differently; ranks therefore meet each layer for
the first time together (as data-parallel training does), and a later batch of another size (a
partial last batch on one rank) reuses the agreement without a collective. A first call during
CUDA-graph capture (where nothing may synchronise) runs the fixed choice and decides nothing;
the next eager call tunes.

:func:`conv_plan` lists the decisions, :func:`clear_conv_plan` forgets them (memory only, or the
file too).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from vidconv.ops import conv_algos
from vidconv.ops.conv_algos import REFERENCE, Algorithm, Problem

try:  # advisory file locks; without them (Windows) writes stay atomic but may drop entries
    import fcntl
except ImportError:  # pragma: no cover - not on Linux/macOS
    fcntl = None  # type: ignore[assignment]

CACHE_FORMAT = "vidconv-conv-plan"
CACHE_VERSION = 1
CACHE_FILE = "conv_plan.json"
MODES = ("auto", "aten", "fused")

# Timing (see the module docstring): untimed warm-up runs before the first timed one, timed runs
# in all for the candidates that are close after the first round, and how close is close.
_CPU_WARMUP, _CPU_REPEATS = 0, 3
_CUDA_WARMUP, _CUDA_REPEATS = 2, 5
_CLOSE = 1.15
# A candidate replaces the reference only when it is faster by more than this fraction: less is
# within the timing noise (CPU timers over 3 runs), and one op's time misses what its choice
# costs around it (a model measured end to end ran up to 15% slower on the CPU when every 5%
# win was taken). Between candidates the fastest still decides.
_REFERENCE_MARGIN = {"cpu": 0.10, "cuda": 0.03}
# Slowest / fastest of a candidate's warm runs above which its timing says more about the
# machine's load than about the algorithm (quiet machines stay within ~1.15x on 2 CPU cores),
# for runs of at least _NOISE_FLOOR_MS: below that, launch and timer jitter alone exceed it and
# the choice matters little.
_NOISY = {"cpu": 1.5, "cuda": 1.25}
_NOISE_FLOOR_MS = {"cpu": 0.5, "cuda": 0.05}

_EPS = {torch.float64: 2.0**-52, torch.float32: 2.0**-23, torch.float16: 2.0**-10,
        torch.bfloat16: 2.0**-7}


# ---- keys and decisions ---------------------------------------------------------------------


@dataclass(frozen=True)
class ConvKey:
    """What a decision is made for: one layer shape on one device, in one direction."""

    direction: str  # "forward", "input_grad" or "weight_grad"
    device: str  # device name ("NVIDIA H200"; "cpu: <model>, <threads> threads")
    dtype: str
    memory_format: str  # x's: "contiguous", "channels_last_3d" or "strided"
    n: int
    c: int
    t: int
    h: int
    w: int
    k: int
    kernel: tuple[int, int, int]
    stride: tuple[int, int, int]
    padding: tuple[int, int, int]
    relu: bool
    bias: bool
    weight_format: str = "contiguous"

    def text(self) -> str:
        """A stable one-line form: the key of the cache file's entries."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    def describe(self) -> str:
        """The layer as a user reads it, for warnings."""
        return (f"{self.direction} of x ({self.n}, {self.c}, {self.t}, {self.h}, {self.w}) "
                f"{self.dtype} {self.memory_format}, weight ({self.k}, {self.c}, "
                f"{', '.join(map(str, self.kernel))}), stride {self.stride}, padding "
                f"{self.padding}, relu={self.relu}, bias={self.bias} on {self.device}")


@dataclass
class Decision:
    """The algorithm chosen for one key, and the evidence."""

    key: ConvKey
    chosen: str
    how: str  # "tuned", "unchecked" (all-zero reference: kept, not cached), "noisy" (timings
    # too uneven to trust: the reference, kept, not cached), "heuristic",
    # "forced", "rank0"
    times_ms: dict[str, float | None] = field(default_factory=dict)
    passed: dict[str, bool] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    tolerance: float | None = None
    tune_s: float = 0.0
    from_cache: bool = False
    forced_by: str | None = None  # the VIDCONV_CONV_ALGO value of a "forced" decision

    def record(self) -> dict[str, Any]:
        return {"chosen": self.chosen, "how": self.how, "times_ms": self.times_ms,
                "passed": self.passed, "errors": self.errors, "tolerance": self.tolerance,
                "tune_s": self.tune_s}

    def report(self) -> dict[str, Any]:
        return {"key": asdict(self.key), **self.record(), "from_cache": self.from_cache}


_lock = threading.RLock()
_plan: dict[ConvKey, Decision] = {}
_file_entries: dict[str, dict[str, Any]] | None = None  # this environment's, as read
_warned: set[str] = set()
_forced_algo: str | None = None


def _warn_once(tag: str, message: str) -> None:
    if tag not in _warned:
        _warned.add(tag)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def algorithm_names() -> list[str]:
    """Every candidate's name (the reference, ``aten``, first)."""
    return list(conv_algos.ALGORITHMS)


def _mode() -> str:
    value = _forced_algo if _forced_algo is not None else os.environ.get("VIDCONV_CONV_ALGO",
                                                                          "auto")
    value = value.strip() or "auto"
    if value not in MODES and value not in conv_algos.ALGORITHMS:
        raise ValueError(
            f"VIDCONV_CONV_ALGO must be one of {', '.join(MODES)} or a candidate name "
            f"({', '.join(algorithm_names())}), got {value!r}")
    return value


def _tuning_enabled() -> bool:
    value = os.environ.get("VIDCONV_TUNE", "1").strip().lower()
    if value in ("0", "false", "no", "off"):
        return False
    if value in ("", "1", "true", "yes", "on"):
        return True
    raise ValueError(f"VIDCONV_TUNE must be 0 or 1, got {value!r}")


@contextlib.contextmanager
def use_conv_algo(name: str) -> Iterator[None]:
    """Run the block as if ``VIDCONV_CONV_ALGO=name`` (benchmarks compare ``auto`` and ``aten``
    in one process this way)."""
    global _forced_algo
    previous = _forced_algo
    _forced_algo = name
    try:
        _mode()
    except ValueError:
        _forced_algo = previous
        raise
    try:
        yield
    finally:
        _forced_algo = previous


# ---- the environment a decision belongs to -------------------------------------------------------


_gpu_names: dict[int, str] = {}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in _gpu_names:
            _gpu_names[index] = torch.cuda.get_device_name(index)
        return _gpu_names[index]
    # The thread count changes which CPU algorithm is fastest.
    return f"{device.type}: {_cpu_model()}, {torch.get_num_threads()} threads"


_cpu_model_cache: list[str] = []


def _cpu_model() -> str:
    if not _cpu_model_cache:
        model = "unknown"
        with contextlib.suppress(OSError):
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        model = line.split(":", 1)[1].strip()
                        break
        _cpu_model_cache.append(model)
    return _cpu_model_cache[0]


def environment() -> str:
    """The software a decision holds for: torch, CUDA, cuDNN, vidconv versions."""
    import vidconv

    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return (f"torch={torch.__version__};cuda={torch.version.cuda};cudnn={cudnn};"
            f"vidconv={vidconv.__version__}")


def make_key(direction: str, x: torch.Tensor, weight: torch.Tensor, has_bias: bool,
             stride, padding, relu: bool) -> ConvKey:
    n, c, t, h, w = x.shape
    return ConvKey(direction, _device_name(x.device), str(x.dtype).removeprefix("torch."),
                   conv_algos.memory_format_name(x), n, c, t, h, w, weight.shape[0],
                   tuple(weight.shape[2:]), tuple(stride), tuple(padding), bool(relu),
                   bool(has_bias), conv_algos.memory_format_name(weight))


def _problem(key: ConvKey, device_type: str, dtype: torch.dtype) -> Problem:
    return Problem(device_type, dtype, key.memory_format, key.weight_format, key.n, key.c,
                   key.t, key.h, key.w, key.k, key.kernel, key.stride, key.padding)


def candidates_for(key: ConvKey, device_type: str, dtype: torch.dtype) -> list[Algorithm]:
    """The algorithms that apply to `key` (the reference first)."""
    problem = _problem(key, device_type, dtype)
    return [a for a in conv_algos.ALGORITHMS.values()
            if a.runs(key.direction) is not None and a.applies(problem)]


# ---- the cache file ---------------------------------------------------------------------------


def cache_path() -> Path:
    root = os.environ.get("VIDCONV_CACHE_DIR") or os.path.join("~", ".cache", "vidconv")
    return Path(root).expanduser() / CACHE_FILE


def _read_file(path: Path) -> dict[str, Any] | None:
    """The file's content if it is ours; None (with one warning) if it is unreadable or not."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as err:
        _warn_once(f"read:{path}", f"vidconv: cannot read the conv plan cache {path} ({err}); "
                                   "tuning without it")
        return None
    try:
        data = json.loads(text)
    except ValueError as err:
        _warn_once(f"corrupt:{path}", f"vidconv: the conv plan cache {path} is corrupt or "
                                      f"truncated ({err}); ignoring it, it will be rewritten")
        return None
    if (not isinstance(data, dict) or data.get("format") != CACHE_FORMAT
            or data.get("version") != CACHE_VERSION
            or not isinstance(data.get("environments"), dict)):
        _warn_once(f"foreign:{path}", f"vidconv: {path} is not a vidconv conv plan cache (format "
                                      f"{CACHE_FORMAT} v{CACHE_VERSION}); ignoring it, it will "
                                      "be rewritten")
        return None
    return data["environments"]


def _load_entries() -> dict[str, dict[str, Any]]:
    global _file_entries
    if _file_entries is None:
        envs = _read_file(cache_path()) or {}
        entries = envs.get(environment(), {})
        _file_entries = entries if isinstance(entries, dict) else {}
    return _file_entries


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    if fcntl is None:
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def store_entries(new: dict[str, dict[str, Any]]) -> None:
    """Merge `new` (key text -> record) into the cache file: under a lock, re-read what other
    processes wrote, add ours, write a temporary file, fsync it, and rename it over the old one,
    so a reader sees the old or the new file, never half of one. A failure is one warning."""
    path = cache_path()
    env = environment()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(path):
            envs = _read_file(path) or {}
            merged = dict(envs.get(env, {})) if isinstance(envs.get(env), dict) else {}
            merged.update(new)
            envs[env] = merged
            payload = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "environments": envs}
            fd, tmp = tempfile.mkstemp(prefix=CACHE_FILE + ".", suffix=".tmp", dir=path.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(payload, f, indent=1, sort_keys=True)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
    except OSError as err:
        _warn_once(f"write:{path}", f"vidconv: cannot write the conv plan cache {path} ({err}); "
                                    "decisions are kept in memory only")


# ---- checking and timing ---------------------------------------------------------------------


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute difference over the reference's largest magnitude (NaN-propagating)."""
    if out.shape != ref.shape:
        return math.inf
    if out.dtype == ref.dtype and out.dtype in (torch.float32, torch.float64):
        # Close values subtract exactly in their own type (Sterbenz); no float64 copies of
        # what may be a 100 MB weight gradient.
        if not ref.numel():
            return 0.0
        ends = [*torch.aminmax(ref), *torch.aminmax(out - ref)]  # one pass each, no |x| copy
        lo, hi, dlo, dhi = (abs(v.item()) for v in ends)
        if any(math.isnan(v) for v in (lo, hi, dlo, dhi)):
            return math.nan
        scale, diff = max(lo, hi), max(dlo, dhi)
        if not (math.isinf(diff) and math.isfinite(scale)):
            return diff / scale if scale > 0 else diff
        # The difference of finite values overflowed its type (near its largest value):
        # float64 below, as for every other dtype.
    ref64 = ref.double()
    scale = ref64.abs().max().item() if ref.numel() else 0.0
    diff = (out.double() - ref64).abs().max().item() if ref.numel() else 0.0
    return diff / scale if scale > 0 else diff


def _reduction_length(key: ConvKey) -> int:
    kt, kh, kw = key.kernel
    if key.direction == "forward":
        return key.c * kt * kh * kw
    if key.direction == "input_grad":
        st, sh, sw = key.stride
        return key.k * max(1, kt // st) * max(1, kh // sh) * max(1, kw // sw)
    t_o, h_o, w_o = _out_size(key)
    return key.n * t_o * h_o * w_o


def _out_size(key: ConvKey) -> tuple[int, int, int]:
    return tuple((i + 2 * p - k) // s + 1 for i, k, s, p in   # type: ignore[return-value]
                 zip((key.t, key.h, key.w), key.kernel, key.stride, key.padding, strict=True))


def _drift(key: ConvKey, args: tuple) -> float:
    """How far the reference lands from float64 on this layer: on at most 2 x 4 x 4 output
    positions of the first clip (the input window they read cut out and padded explicitly)."""
    x, weight = (args[0], args[1]) if key.direction == "forward" else (args[1], args[2])
    st, sh, sw = key.stride
    kt, kh, kw = key.kernel
    t_o, h_o, w_o = _out_size(key)
    to_c, ho_c, wo_c = min(t_o, 2), min(h_o, 4), min(w_o, 4)
    pt, ph, pw = key.padding
    xc = torch.nn.functional.pad(x[:1], (pw, pw, ph, ph, pt, pt))
    xc = xc[:, :, :(to_c - 1) * st + kt, :(ho_c - 1) * sh + kh, :(wo_c - 1) * sw + kw]
    zero = (0, 0, 0)
    ref = conv_algos.ALGORITHMS[REFERENCE]
    if key.direction == "forward":
        bc = args[2]
        low = ref.forward(xc, weight, bc, key.stride, zero, False, torch.contiguous_format)
        high = ref.forward(xc.double(), weight.double(), None if bc is None else bc.double(),
                           key.stride, zero, False, torch.contiguous_format)
        return _rel_err(low, high)
    grad = args[0][:1, :, :to_c, :ho_c, :wo_c]
    fn = ref.runs(key.direction)
    low = fn(grad, xc, weight, key.stride, zero)
    high = fn(grad.double(), xc.double(), weight.double(), key.stride, zero)
    drift = _rel_err(low, high)
    if key.direction == "weight_grad":
        drift *= math.sqrt(_reduction_length(key) / max(1, to_c * ho_c * wo_c))
    return drift


def tolerance(key: ConvKey, dtype: torch.dtype, drift: float) -> float:
    eps = _EPS.get(dtype, 2.0**-23)
    eps_acc = eps if dtype in (torch.float32, torch.float64) else _EPS[torch.float32]
    return 4 * drift + 2 * eps + 4 * math.sqrt(_reduction_length(key)) * eps_acc


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_candidate(name: str, run: Callable[[], Any], device: torch.device,
                   repeats: int) -> list[float]:
    """`repeats` timed runs of `run`, in ms: CUDA events on a GPU, perf_counter on the CPU.
    (`name` is for a replacement of this function that injects timings: the tests.)"""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            run()
            times.append(1e3 * (time.perf_counter() - t0))
    return times


def run_algorithm(algo: Algorithm, direction: str, args: tuple, out_format) -> torch.Tensor:
    """One call of `algo` in `direction` with st_conv3d's arguments (see :func:`choose`)."""
    fn = algo.runs(direction)
    if direction == "forward":
        return fn(*args, out_format)
    return fn(*args)


def _tune(key: ConvKey, args: tuple, device: torch.device, dtype: torch.dtype,
          candidates: list[Algorithm], out_format, expect) -> Decision:
    """Run, check and time every candidate; the fastest that agrees wins."""
    t_start = time.perf_counter()
    on_cuda = device.type == "cuda"
    warmup, repeats = (_CUDA_WARMUP, _CUDA_REPEATS) if on_cuda else (_CPU_WARMUP, _CPU_REPEATS)
    decision = Decision(key, REFERENCE, "tuned")
    ref_algo = conv_algos.ALGORITHMS[REFERENCE]
    ordered = [ref_algo] + [a for a in candidates if a.name != REFERENCE]
    reference: torch.Tensor | None = None
    tol = math.inf
    runs: dict[str, Callable[[], Any]] = {}
    times: dict[str, list[float]] = {}

    def reject(name: str, why: str) -> None:
        decision.passed[name] = False
        decision.errors[name] = why
        decision.times_ms[name] = None
        if decision.how == "unchecked":  # not the candidate's fault: no warning
            return
        _warn_once(f"reject:{key.text()}:{name}",
                   f"vidconv st_conv3d: candidate {name!r} {why} on {key.describe()}; it is not "
                   "used for this layer")

    # Round 1: every candidate once (after the warm-up), its output checked.
    for algo in ordered:
        name = algo.name
        kept: list[torch.Tensor] = []

        def run(a=algo, keep=kept) -> None:
            out = run_algorithm(a, key.direction, args, out_format)
            if not keep:
                keep.append(out)

        try:
            for _ in range(warmup):
                run()
            _sync(device)
            first = time_candidate(name, run, device, 1)
            _sync(device)
        except Exception as exc:  # noqa: BLE001 - a failing candidate must not fail the op
            if algo is ref_algo:
                raise
            reject(name, f"raised {type(exc).__name__}: {exc}")
            continue
        out = kept[0]
        problem = expect(out)
        if algo is ref_algo:
            if problem is not None:
                raise RuntimeError(f"vidconv st_conv3d: the reference {problem}")
            reference = out
            tol = tolerance(key, dtype, _drift(key, args))
            decision.tolerance = tol
            if reference.numel() and not reference.any():
                # Nothing to check against (every ReLU dead, a zero gradient): keep the reference
                # for this process and decide again, on other data, in the next one.
                decision.how = "unchecked"
        elif problem is None and decision.how == "unchecked":
            problem = "not checked: the reference output of this call is all zero"
        elif problem is None:
            err = _rel_err(out, reference)
            if not err <= tol:
                problem = (f"differs from the reference by {err:.3g} (relative), tolerance "
                           f"{tol:.3g}")
        del out, kept[:]
        if problem is not None:
            reject(name, problem)
            continue
        decision.passed[name] = True
        runs[name], times[name] = run, list(first)
    del reference

    # Round 2: the close ones again, so noise cannot decide between them.
    result = race(runs, times, REFERENCE, device, repeats - 1)
    for name, why in result.failed.items():
        reject(name, why)
    decision.times_ms.update(result.times_ms)
    decision.chosen = result.chosen
    if result.noisy is not None:
        decision.how = "noisy"
        _warn_once("noisy", f"vidconv st_conv3d: timings varied {result.noisy:.1f}x between runs "
                   f"of one algorithm on {key.describe()} (other work on the same device?): "
                   "such layers run the reference in this process and are timed again in a "
                   "later one (VIDCONV_TUNE=0 skips timing)")
    decision.tune_s = time.perf_counter() - t_start
    return decision


def _spread(times_ms: list[float]) -> float:
    """Slowest / fastest of the warm runs (the first, cold run left out); 1.0 for fewer than 2."""
    warm = times_ms[1:]
    if len(warm) < 2 or min(warm) <= 0:
        return 1.0
    return max(warm) / min(warm)


@dataclass
class RaceResult:
    """What :func:`race` found: the winner, each runner's time (best run on the CPU, median on
    CUDA, ms), the runners that raised (name: why), and the spread (slowest / fastest warm run)
    that made the result "noisy" (the reference chosen, not to be kept), or None."""

    chosen: str
    times_ms: dict[str, float]
    failed: dict[str, str]
    noisy: float | None


def race(runs: dict[str, Callable[[], Any]], times: dict[str, list[float]], reference: str,
         device: torch.device, repeats: int) -> RaceResult:
    """Choose the fastest of ``runs`` (name: a call), all already checked against
    ``reference`` (one of them) and timed once (``times``: name: [ms], extended in place).

    The runners within 15% of the fastest first time, and the reference, run ``repeats`` more
    times, run by run in turn (load that comes and goes slows them alike). A runner other than
    the reference must be faster than it by the device's margin (10% CPU, 3% CUDA) to win. When
    the warm runs of the reference or the winner vary by more than 1.5x (CPU) / 1.25x (CUDA) on
    a call of at least 0.5 ms / 0.05 ms, the reference wins and the result is "noisy".
    A runner that raises drops out (the reference raising raises).
    """
    times = {name: times[name] for name in runs}
    failed: dict[str, str] = {}
    best_first = min(t[0] for t in times.values())
    close = [n for n, t in times.items() if t[0] <= _CLOSE * best_first]
    if reference in times and reference not in close:
        # The reference ran first and cold (no CPU warm-up): one sample is no fair comparison.
        close.append(reference)
    if len(close) > 1:
        for _ in range(repeats):
            for name in [n for n in close if n in times]:
                try:
                    times[name] += time_candidate(name, runs[name], device, 1)
                except Exception as exc:  # noqa: BLE001 - a failing runner must not fail the op
                    if name == reference:
                        raise
                    times.pop(name)
                    failed[name] = f"raised {type(exc).__name__}: {exc}"
    # On the CPU other processes only ever add time: the best run is the algorithm's own. CUDA
    # events time the GPU alone; there the median is the steadier figure.
    summary = min if device.type != "cuda" else statistics.median
    times_ms = {name: summary(t) for name, t in times.items()}
    chosen = min(times_ms, key=times_ms.__getitem__)
    margin = _REFERENCE_MARGIN.get(device.type, 0.10)
    if reference in times_ms and times_ms[chosen] * (1 + margin) > times_ms[reference]:
        chosen = reference
    spread = max(_spread(times[name]) for name in {reference, chosen} if name in times)
    noisy = None
    if (spread > _NOISY.get(device.type, 1.5)
            and times_ms[chosen] >= _NOISE_FLOOR_MS.get(device.type, 0.5)):
        noisy, chosen = spread, reference
    return RaceResult(chosen, times_ms, failed, noisy)


_CHOICE_REPEATS = {"cpu": _CPU_REPEATS, "cuda": _CUDA_REPEATS}


def measure_choice(runs: dict[str, Callable[[], Any]], reference: str, device: torch.device,
                   *, warm_up: bool) -> RaceResult:
    """Time ``runs`` (name: a call, already checked against ``reference``, one of them) and
    :func:`race` them: each once (after one untimed call when ``warm_up``), then the close
    ones again, 3 runs in all on the CPU, 5 on CUDA. For the choices made outside this
    planner (the LRN + pool stage, the FC layers' orientation)."""
    times: dict[str, list[float]] = {}
    for name, fn in runs.items():
        if warm_up:
            fn()
        times[name] = time_candidate(name, fn, device, 1)
    return race(runs, times, reference, device, _CHOICE_REPEATS.get(device.type, 3) - 1)


FUSED_MODES = ("auto", "fused", "aten")


def own_saved_tensors() -> contextlib.AbstractContextManager:
    """For a measurement that runs a backward inside the caller's forward: saved-tensor hooks
    of the caller (non-reentrant activation checkpointing, offloading) left out of the
    measured graph. Under checkpointing, unpacking a saved tensor of the measured graph would
    recompute the caller's checkpointed function, which would meet the shape being measured
    again and wait for its own measurement for ever."""
    return torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)


def fused_mode(variable: str) -> str:
    """The value of ``variable`` (``VIDCONV_LRN_POOL``, ``VIDCONV_PREPROCESS``): one of
    :data:`FUSED_MODES`, "auto" when unset or empty; anything else is a clear error."""
    value = os.environ.get(variable, "auto").strip() or "auto"
    if value not in FUSED_MODES:
        raise ValueError(f"{variable} must be one of {', '.join(FUSED_MODES)}, got {value!r}")
    return value


@dataclass
class FusedDecision:
    """A fused kernel against the composition it replaces, for one key: whether the kernel
    runs, how that was decided ("tuned", "noisy", "disagrees", "raised", "unchecked"), each
    side's time (ms), the kernel's difference from the composition, seconds spent deciding."""

    fused: bool
    how: str
    times_ms: dict[str, float]
    rel_err: float | None = None
    tune_s: float = 0.0


class ChoiceTable:
    """Per-process decisions of a measured choice made outside this planner (the LRN + pool
    stage, the FC layers' orientation, the preprocessing kernel), keyed by layer: each key is
    measured once, and one thread measures at a time, since threads timing at once would time
    each other's work. Decisions are dataclasses with a ``tune_s`` field."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._measure_lock = threading.Lock()
        self._decisions: dict[Any, Any] = {}

    def get(self, key: Any) -> Any | None:
        """The decision made for ``key``, or None."""
        with self._lock:
            return self._decisions.get(key)

    def decide(self, key: Any, measure: Callable[[], Any]) -> Any:
        """The decision for ``key``: the one made, else ``measure()``'s (kept, with the seconds
        it took in its ``tune_s``). A thread meeting a key another is measuring waits for that
        decision instead of measuring too."""
        decision = self.get(key)
        if decision is not None:
            return decision
        with self._measure_lock:
            decision = self.get(key)
            if decision is None:
                start = time.perf_counter()
                decision = measure()
                decision.tune_s = time.perf_counter() - start
                with self._lock:
                    self._decisions[key] = decision
        return decision

    def items(self) -> list[tuple[Any, Any]]:
        """(key, decision) pairs in the order decided."""
        with self._lock:
            return list(self._decisions.items())

    def plan(self) -> list[dict[str, Any]]:
        """The decisions as the ``*_plan()`` functions report them: ``{"key": key, **fields}``
        per key, in the order decided (copies: changing them changes nothing)."""
        return [{"key": key, **asdict(d)} for key, d in self.items()]

    def clear(self) -> None:
        with self._lock:
            self._decisions.clear()


# ---- deciding ---------------------------------------------------------------------------------


def _distributed() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _from_cache(key: ConvKey, names: set[str]) -> Decision | None:
    rec = _load_entries().get(key.text())
    if not isinstance(rec, dict) or rec.get("chosen") not in names:
        return None
    times = rec.get("times_ms") if isinstance(rec.get("times_ms"), dict) else {}
    passed = rec.get("passed") if isinstance(rec.get("passed"), dict) else {}
    errors = rec.get("errors") if isinstance(rec.get("errors"), dict) else {}
    return Decision(key, rec["chosen"], "tuned", times, passed, errors,
                    rec.get("tolerance"), float(rec.get("tune_s") or 0.0), from_cache=True)


def _decide_locally(key: ConvKey, args: tuple, device: torch.device, dtype: torch.dtype,
                    candidates: list[Algorithm], out_format, expect) -> tuple[Decision, bool]:
    """(decision, whether to remember it)."""
    names = {a.name for a in candidates}
    cached = _from_cache(key, names)
    if cached is not None:
        return cached, True
    if not _tuning_enabled():
        return Decision(key, REFERENCE, "heuristic"), True
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return Decision(key, REFERENCE, "heuristic"), False
    decision = _tune(key, args, device, dtype, candidates, out_format, expect)
    if decision.how in ("unchecked", "noisy"):  # this process only: the next one decides again
        return decision, True
    store_entries({key.text(): decision.record()})
    global _file_entries
    if _file_entries is not None:
        _file_entries[key.text()] = decision.record()
    return decision, True


# Under torch.distributed: rank 0's choice per layer signature (the key without the batch size),
# agreed once. Ranks meet a layer for the first time together (same model, same order), but later
# batches can differ in size between ranks (a partial last batch, a shard one video shorter, a
# dropped bad video): those keys must not start a collective that only some ranks enter.
_agreed: dict[ConvKey, str] = {}


def _decide(key: ConvKey, args: tuple, device: torch.device, dtype: torch.dtype,
            candidates: list[Algorithm], out_format, expect) -> tuple[Decision, bool]:
    if not _distributed():
        return _decide_locally(key, args, device, dtype, candidates, out_format, expect)
    names = {a.name for a in candidates}
    signature = replace(key, n=0)
    agreed = _agreed.get(signature)
    if agreed is not None:
        # Agreed for this layer already: no collective; the same algorithm where it applies.
        return Decision(key, agreed if agreed in names else REFERENCE, "rank0"), True
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        # No collective may run inside a graph capture: the reference now, agreement later.
        return Decision(key, REFERENCE, "heuristic"), False
    dist = torch.distributed
    if dist.get_rank() == 0:
        decision, keep = _decide_locally(key, args, device, dtype, candidates, out_format,
                                         expect)
        message = [key.text(), decision.record(), decision.from_cache]
    else:
        message = [None, None, None]
    dist.broadcast_object_list(message, src=0)
    key_text, record, from_cache = message
    _agreed[signature] = record["chosen"]
    if dist.get_rank() == 0:
        return decision, keep
    chosen = record["chosen"]
    if chosen not in names:
        # rank 0 met another batch size (or can run a candidate this rank cannot): the
        # reference is correct everywhere.
        _warn_once(f"rank0:{key.text()}",
                   f"vidconv: rank 0 chose {chosen!r} for {key_text}, which does not apply to "
                   f"{key.describe()} on rank {dist.get_rank()}; running {REFERENCE}")
        return Decision(key, REFERENCE, "rank0"), True
    return Decision(key, chosen, "rank0", record["times_ms"], record["passed"],
                    record["errors"], record["tolerance"], record["tune_s"],
                    from_cache=bool(from_cache)), True


def choose(direction: str, args: tuple, x: torch.Tensor, weight: torch.Tensor, has_bias: bool,
           stride, padding, relu: bool, out_format, expect) -> Algorithm:
    """The algorithm st_conv3d runs for this call (deciding on the first call of its key).

    args: the candidate's arguments (without out_format); expect(out) -> None, or why `out` is
    not what the op must return (shape, strides).
    """
    mode = _mode()
    if mode == REFERENCE:
        return conv_algos.ALGORITHMS[REFERENCE]
    key = make_key(direction, x, weight, has_bias, stride, padding, relu)
    with _lock:
        decision = _plan.get(key)
    # A decision is reused while the knob still says what it said when it was made.
    if decision is not None and decision.forced_by == (None if mode == "auto" else mode):
        return conv_algos.ALGORITHMS[decision.chosen]
    candidates = candidates_for(key, x.device.type, x.dtype)
    if mode not in ("auto", "fused"):
        algo = next((a for a in candidates if a.name == mode), None)
        if algo is None:
            _warn_once(f"forced:{mode}:{key.text()}",
                       f"vidconv: VIDCONV_CONV_ALGO={mode} does not apply to {key.describe()}; "
                       f"running {REFERENCE}")
            algo = conv_algos.ALGORITHMS[REFERENCE]
        with _lock:
            _plan[key] = Decision(key, algo.name, "forced", forced_by=mode)
        return algo
    if mode == "fused":
        return _choose_fused(key, args, x, candidates, out_format, expect)
    with _lock:
        decision, keep = _decide(key, args, x.device, x.dtype, candidates, out_format, expect)
        if keep:
            _plan[key] = decision
    return conv_algos.ALGORITHMS[decision.chosen]


def _choose_fused(key: ConvKey, args: tuple, x: torch.Tensor, candidates: list[Algorithm],
                  out_format, expect) -> Algorithm:
    """VIDCONV_CONV_ALGO=fused: the fastest correct tile of the hand-written kernel (the first
    tile without tuning; the reference where the kernel does not apply or every tile fails)."""
    fused = [a for a in candidates if a.name.startswith("fused_")]
    if not fused:
        return conv_algos.ALGORITHMS[REFERENCE]
    if _tuning_enabled() and not (x.device.type == "cuda"
                                  and torch.cuda.is_current_stream_capturing()):
        decision = _tune(key, args, x.device, x.dtype, fused, out_format, expect)
        good = [a.name for a in fused if decision.passed.get(a.name)]
        decision.chosen = min(good, key=lambda n: decision.times_ms[n]) if good else REFERENCE
    else:
        decision = Decision(key, fused[0].name, "heuristic")
    decision.how, decision.forced_by = "forced", "fused"
    with _lock:
        _plan[key] = decision
    return conv_algos.ALGORITHMS[decision.chosen]


# ---- reporting --------------------------------------------------------------------------------


def conv_plan() -> list[dict[str, Any]]:
    """Every decision made (or read from the cache) in this process: for each, the key, the
    chosen algorithm, how it was chosen ("tuned", "heuristic", "forced", "rank0"), each
    candidate's time in ms (best run on the CPU, median on CUDA; None if it failed), whether it
    passed the check (and why
    not), the tolerance, the tuning time and whether the decision came from the cache file."""
    with _lock:
        return [d.report() for d in _plan.values()]


def decision_for(key: ConvKey) -> Decision | None:
    """The decision made for `key` in this process, if any."""
    with _lock:
        return _plan.get(key)


def clear_conv_plan(*, cache_file: bool = False) -> None:
    """Forget the decisions in memory (the next call of each layer decides again, from the cache
    file when it has the layer); with ``cache_file=True`` delete the file too."""
    global _file_entries
    with _lock:
        _plan.clear()
        _agreed.clear()
        _file_entries = None
        _warned.clear()
        if cache_file:
            path = cache_path()
            with contextlib.suppress(FileNotFoundError):
                with _file_lock(path):
                    path.unlink(missing_ok=True)
