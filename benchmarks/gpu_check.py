"""Everything a lent GPU machine should run, in one call that fits its lease.

Builds vidconv with its CUDA kernels, runs the GPU tests, compute-sanitizer (memcheck, racecheck,
synccheck) over a small workload of every kernel, and the benchmarks in quick modes, recording
the device, torch / CUDA / cuDNN versions and the TF32 settings. Each step runs under a time
limit drawn from one overall budget (default 480 s, so one call fits 8 minutes); a step that
fails is recorded and the rest still run; a step the budget no longer covers is skipped and
says so. OUT ends with at most 8 files: summary.txt (the table), summary.json (steps, versions),
logs.tar.gz (every log, the junit XML), and one JSON per benchmark. The table is printed last.

``--dry-run`` runs every step's CPU part on any machine (no build, GPU tests collected but not
run, the sanitizer workload and the benchmarks on the CPU with tiny sizes): the test suite runs
it, so the check cannot rot between lent GPUs.

Usage: bash benchmarks/gpu_check.sh [--dry-run] [--budget S] [--skip STEP,...] OUT
Knobs: TORCH_CUDA_ARCH_LIST (default 9.0a here: the H200's; setup.py's default is 8.0;9.0a),
MAX_JOBS (default: CPU count), DALI_WHEELS (folder of DALI wheels, default ./.whl: installed,
then DALI's GPU tests run, only if budget is left after everything else).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
MAX_FILES = 8  # what one device call brings back
FINAL_RESERVE_S = 10  # kept back from the budget for the tar and the table
SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck")
# compute-sanitizer's words when the runtime (e.g. a sandboxed one) refuses to instrument
SANITIZER_REFUSED = re.compile(r"Device not supported|not supported on this|"
                               r"Unable to (?:create|initialize)|error 999|"
                               r"Target application terminated before first instrumented",
                               re.IGNORECASE)

VERSIONS_PY = r"""
import json, platform, subprocess, shutil, sys, torch
info = {
    "python": platform.python_version(),
    "torch": torch.__version__,
    "torch_cuda": torch.version.cuda,
    "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    "cuda_available": torch.cuda.is_available(),
    "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
    "tf32_cudnn": torch.backends.cudnn.allow_tf32,
    "float32_matmul_precision": torch.get_float32_matmul_precision(),
    "cpu_count": __import__("os").cpu_count(),
}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(device=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                memory_gib=round(p.total_memory / 2**30, 1))
else:
    info["device"] = "cpu: " + (platform.processor() or platform.machine())
def tool(*cmd):
    if not shutil.which(cmd[0]):
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        text = (out.stdout or out.stderr).strip()
        return text.splitlines()[-1] if text else None
    except Exception as e:
        return f"failed: {e}"
info["nvcc"] = tool("nvcc", "--version")
info["compute_sanitizer"] = tool("compute-sanitizer", "--version")
info["nvidia_smi"] = tool("nvidia-smi",
                          "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                          "--format=csv,noheader")
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(json.dumps(info, indent=2))
"""

BUILD_INFO_PY = r"""
import sys, torch, vidconv
info = vidconv.build_info()
print(vidconv.__file__)
print(info)
if sys.argv[1] == "gpu":
    assert info.has_cuda_kernels, "vidconv was built without CUDA kernels"
    assert torch.cuda.is_available(), "torch sees no CUDA device"
"""


@dataclass
class Step:
    name: str
    status: str = "skipped"  # ok | FAILED | skipped
    seconds: float = 0.0
    detail: str = ""


@dataclass
class Check:
    out: Path
    logs: Path
    budget_s: float
    dry_run: bool
    skip: set[str]
    t0: float = field(default_factory=time.monotonic)
    steps: list[Step] = field(default_factory=list)

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0) - FINAL_RESERVE_S

    def run(self, name: str, cmd: list[str], *, cap_s: float, min_s: float = 5.0,
            env: dict[str, str] | None = None, cwd: Path = ROOT,
            judge: Callable[[int, str], tuple[str, str]] | None = None) -> Step:
        """Run ``cmd`` with its output in logs/NAME.log, under min(cap_s, budget left)."""
        step = Step(name)
        self.steps.append(step)
        if name in self.skip:
            step.detail = "skipped with --skip"
            return self._print(step)
        limit = min(cap_s, self.left())
        if limit < min_s:
            step.detail = (f"budget left ({max(self.left(), 0):.0f} s) below this step's "
                           f"{min_s:.0f} s")
            return self._print(step)
        log = self.logs / f"{name}.log"
        print(f"== {name}: {' '.join(cmd)}  (limit {limit:.0f} s)", flush=True)
        t = time.monotonic()
        rc, timed_out = _run_limited(cmd, log, limit, {**os.environ, **(env or {})}, cwd)
        step.seconds = time.monotonic() - t
        text = log.read_text(errors="replace")
        if timed_out:
            step.status, step.detail = "FAILED", f"timed out after {limit:.0f} s"
        elif judge is not None:
            step.status, step.detail = judge(rc, text)
        else:
            step.status = "ok" if rc == 0 else "FAILED"
            step.detail = "" if rc == 0 else f"exit {rc}"
        if step.status == "FAILED":
            tail = "\n".join(text.splitlines()[-12:])
            print(f"   last lines of {log.name}:\n" + _indent(tail), flush=True)
        return self._print(step)

    def _print(self, step: Step) -> Step:
        print(f"   {step.status} {step.seconds:.0f} s {step.detail}".rstrip(), flush=True)
        return step


def _indent(text: str) -> str:
    return "\n".join("   | " + line for line in text.splitlines())


def _run_limited(cmd: list[str], log: Path, limit: float, env: dict[str, str],
                 cwd: Path) -> tuple[int, bool]:
    """Run in its own process group, so a timeout kills the children (pytest workers, ninja)."""
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)
        try:
            return proc.wait(timeout=limit), False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return -9, True


def _judge_pytest(dry_run: bool) -> Callable[[int, str], tuple[str, str]]:
    def judge(rc: int, text: str) -> tuple[str, str]:
        if dry_run:  # "164/528 tests collected (364 deselected)", or "12 tests collected"
            found = re.search(r"(\d+)(?:/\d+)? tests? collected", text)
            selected = int(found.group(1)) if found else 0
            ok = rc == 0 and selected > 0
            return ("ok" if ok else "FAILED"), f"{selected} GPU tests collected (not run)"
        counts = ", ".join(re.findall(r"\d+ (?:passed|failed|skipped|errors?)", text)[-4:])
        # all-skipped is a pass to pytest, not here: the GPU tests must have run
        ok = rc == 0 and re.search(r"[1-9]\d* passed", text)
        return ("ok" if ok else "FAILED"), counts or f"exit {rc}"
    return judge


def _judge_sanitizer(rc: int, text: str) -> tuple[str, str]:
    summary = re.findall(r"ERROR SUMMARY: (\d+) error", text)
    if summary and rc == 0 and summary[-1] == "0":
        return "ok", "0 errors"
    if not summary and SANITIZER_REFUSED.search(text):
        line = SANITIZER_REFUSED.search(text).group(0)
        return "skipped", f"the runtime refuses compute-sanitizer ({line})"
    if summary:
        return "FAILED", f"{summary[-1]} errors (exit {rc})"
    return "FAILED", f"exit {rc}, no error summary"


def _sanitizers(check: Check) -> None:
    workload = [PY, "tools/sanitize_kernels.py"]
    if check.dry_run or not shutil.which("compute-sanitizer"):
        why = "dry run" if check.dry_run else "compute-sanitizer not on PATH"
        step = check.run("sanitize_workload_cpu", [*workload, "--device", "cpu"], cap_s=120)
        step.detail = (step.detail + f"; {why}: the workload on the CPU only").lstrip("; ")
        return
    # Unpooled allocations, so an overrun past a tensor is past an allocation that memcheck sees.
    env = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1", "CUDA_LAUNCH_BLOCKING": "0"}
    for tool in SANITIZER_TOOLS:
        cmd = ["compute-sanitizer", "--tool", tool, "--kernel-name", "kns=vidconv",
               "--error-exitcode", "3", *workload, "--device", "cuda"]
        step = check.run(f"sanitizer_{tool}", cmd, cap_s=150, min_s=20, env=env,
                         judge=_judge_sanitizer)
        if step.status == "skipped" and "refuses" in step.detail:
            for other in SANITIZER_TOOLS[SANITIZER_TOOLS.index(tool) + 1:]:
                check.steps.append(Step(f"sanitizer_{other}", "skipped", 0.0, step.detail))
            return


def _benchmarks(check: Check, device: str) -> None:
    out = check.out
    if check.dry_run:  # tiny sizes: the scripts' code paths, not numbers
        runs = {
            "preprocess": ["--batch", "1", "--frames", "2", "--dtypes", "float32",
                           "--warmup", "0", "--repeats", "1",
                           "--json", str(out / "preprocess.json")],
            "conv": ["--quick", "--models", "single_frame", "--repeats", "1",
                     "--json", str(out / "conv.json")],
            "speed": ["--models", "single_frame", "--batch-size", "1", "--width", "0.0625",
                      "--warmup", "0", "--repeats", "1", "--json", str(out / "speed.json")],
            "loader": ["--videos", "2", "--frames", "20", "--epochs", "1", "--sizes", "320x240",
                       "--codecs", "h264", "--out", str(out / "loader.json")],
        }
    else:
        runs = {
            "preprocess": ["--batch", "256", "--warmup", "3", "--repeats", "10",
                           "--json", str(out / "preprocess.json")],
            "conv": ["--quick", "--json", str(out / "conv.json")],
            "speed": ["--batch-size", "32", "--warmup", "2", "--repeats", "5",
                      "--json", str(out / "speed.json")],
            "loader": ["--quick", "--out", str(out / "loader.json")],
        }
    for name, args in runs.items():
        check.run(f"bench_{name}", [PY, f"benchmarks/{name}.py", "--device", device, *args],
                  cap_s=150, min_s=15)


def join_wheel_parts(wheels: Path) -> list[str]:
    """Join NAME.whl.part-* into NAME.whl where NAME.whl.sha256 says they are all there.

    A DALI wheel (~200 MB) is over what one device call carries (64 MiB), so it travels in
    parts over consecutive calls (`split -b 60M W W.part-`, `sha256sum W > W.sha256`); a
    part missing or damaged is reported, not installed. Returns one note per wheel."""
    import hashlib

    notes = []
    for digest_file in sorted(wheels.glob("*.whl.sha256")) if wheels.is_dir() else []:
        wheel = digest_file.with_suffix("")
        if wheel.exists():
            continue
        parts = sorted(wheels.glob(wheel.name + ".part-*"))
        h = hashlib.sha256()
        for part in parts:
            h.update(part.read_bytes())
        expected = digest_file.read_text().split()[0] if digest_file.read_text().split() else ""
        if parts and h.hexdigest() == expected:
            with wheel.open("wb") as f:
                for part in parts:
                    f.write(part.read_bytes())
            notes.append(f"joined {len(parts)} parts into {wheel.name}")
        else:
            notes.append(f"{wheel.name}: {len(parts)} part(s) here do not match its sha256 "
                         "(parts still to come, or damaged)")
    return notes


def _dali(check: Check) -> None:
    has_dali = subprocess.run([PY, "-c", "import nvidia.dali"], capture_output=True).returncode == 0
    wheels = Path(os.environ.get("DALI_WHEELS", ROOT / ".whl"))
    if not has_dali:
        for note in join_wheel_parts(wheels):
            print(f"== dali wheels: {note}", flush=True)
        found = sorted(wheels.glob("nvidia_dali_cuda*.whl")) if wheels.is_dir() else []
        if not found:
            check.steps.append(Step("dali", "skipped", 0.0,
                                    f"DALI not installed, no wheels in {wheels}"))
            print(f"== dali: skipped (not installed, no wheels in {wheels})")
            return
        if check.dry_run:
            check.steps.append(Step("dali", "skipped", 0.0,
                                    f"dry run: would install {found[0].name}"))
            return
        install = [PY, "-m", "pip", "install", "--no-index", "--no-deps", "--find-links",
                   str(wheels), *map(str, wheels.glob("*.whl"))]
        step = check.run("dali_install", install, cap_s=120, min_s=30)
        if step.status != "ok":
            return
    if check.dry_run:  # pytest_cuda's collection already covered DALI's GPU tests
        check.steps.append(Step("dali_tests", "skipped", 0.0, "dry run: DALI installed; its GPU "
                                "tests were collected with pytest_cuda"))
    else:
        check.run("dali_tests", [PY, "-m", "pytest", "-q", "-x", "-m", "cuda", "-k", "dali",
                                 "-p", "no:cacheprovider", "tests"],
                  cap_s=150, min_s=30, judge=_judge_pytest(False))


def _finish(check: Check, versions: dict) -> int:
    """Tar the logs, keep at most MAX_FILES in OUT, write and print the table."""
    with tarfile.open(check.out / "logs.tar.gz", "w:gz") as tar:
        tar.add(check.logs, arcname="logs")
    shutil.rmtree(check.logs)
    total = time.monotonic() - check.t0
    rows = [(s.name, s.status, f"{s.seconds:.0f}", s.detail) for s in check.steps]
    widths = [max(len(r[i]) for r in [("step", "status", "s", "detail"), *rows]) for i in range(3)]
    lines = [f"{'step':<{widths[0]}}  {'status':<{widths[1]}}  {'s':>{widths[2]}}  detail"]
    lines += [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:>{widths[2]}}  {d}" for a, b, c, d in rows]
    failed = [s.name for s in check.steps if s.status == "FAILED"]
    device = versions.get("device", "unknown device")
    lines.append("")
    lines.append(f"device: {device}; torch {versions.get('torch')}, "
                 f"CUDA {versions.get('torch_cuda')}, cuDNN {versions.get('cudnn')}; "
                 f"TF32 matmul {versions.get('tf32_matmul')}, "
                 f"cuDNN {versions.get('tf32_cudnn')}")
    lines.append(f"budget: used {total:.0f} s of {check.budget_s:.0f} s"
                 f"{' (dry run)' if check.dry_run else ''}; "
                 f"{'FAILED: ' + ', '.join(failed) if failed else 'no step failed'}")
    (check.out / "summary.txt").write_text("\n".join(lines) + "\n")
    (check.out / "summary.json").write_text(json.dumps({
        "dry_run": check.dry_run, "budget_s": check.budget_s, "used_s": round(total, 1),
        "versions": versions,
        "steps": [s.__dict__ for s in check.steps],
    }, indent=2))
    files = sorted(p for p in check.out.iterdir())
    if len(files) > MAX_FILES:  # never expected: the steps write known names
        lines.append(f"warning: {len(files)} files in {check.out}, more than {MAX_FILES}")
    print("\n" + "\n".join(lines), flush=True)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gpu_check", description=__doc__.split("\n\n")[0],
        epilog="Steps: versions, build, build_info, pytest_cuda, sanitizer_*, bench_*, dali.")
    parser.add_argument("out", type=Path, help="output folder (at most 8 files end up there)")
    parser.add_argument("--dry-run", action="store_true",
                        help="run every step's CPU part (no build, no GPU), as the tests do")
    parser.add_argument("--budget", type=float, default=480.0,
                        help="seconds for the whole check (default 480: fits an 8-minute call)")
    parser.add_argument("--skip", default="", help="comma-separated step names to skip")
    args = parser.parse_args(argv)
    if not args.budget > 0:
        parser.error(f"--budget must be a positive number of seconds, got {args.budget}")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"OUT must be a folder, got an existing file: {args.out}")
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out.resolve()
    for stale in ("logs.tar.gz", "summary.txt", "summary.json", "preprocess.json", "conv.json",
                  "speed.json", "loader.json"):
        (out / stale).unlink(missing_ok=True)
    logs = out / "logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir()
    check = Check(out, logs, args.budget, args.dry_run, set(filter(None, args.skip.split(","))))
    os.chdir(ROOT)
    os.environ.setdefault("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    os.environ.setdefault("PIP_ROOT_USER_ACTION", "ignore")

    check.run("versions", [PY, "-c", VERSIONS_PY, str(logs / "versions.json")], cap_s=60)
    try:
        versions = json.loads((logs / "versions.json").read_text())
    except (OSError, ValueError):
        versions = {}

    if args.dry_run:  # setup.py's decisions and metadata, without compiling
        check.run("build", [PY, "-m", "pip", "install", "--no-build-isolation", "--no-deps",
                            "--no-index", "--dry-run", "."], cap_s=120)
    else:
        env = {"MAX_JOBS": os.environ.get("MAX_JOBS", str(os.cpu_count() or 4)),
               "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0a"),
               "PIP_NO_INDEX": "1"}
        check.run("build", [PY, "-m", "pip", "install", "--no-build-isolation", "--no-deps",
                            "-v", "."], cap_s=300, min_s=60, env=env)
    # from outside the tree, so the installed package (with its kernels) is what is checked
    check.run("build_info", [PY, "-c", BUILD_INFO_PY, "cpu" if args.dry_run else "gpu"],
              cap_s=60, cwd=Path("/"))

    junit = str(logs / "pytest-cuda.xml")
    if args.dry_run:
        check.run("pytest_cuda", [PY, "-m", "pytest", "-q", "-m", "cuda", "--collect-only",
                                  "-p", "no:cacheprovider", "tests"],
                  cap_s=120, judge=_judge_pytest(True))
    else:
        check.run("pytest_cuda", [PY, "-m", "pytest", "-q", "-x", "-m", "cuda", "-rs",
                                  "-p", "no:cacheprovider", f"--junitxml={junit}", "tests"],
                  cap_s=200, min_s=30, judge=_judge_pytest(False))
    _sanitizers(check)
    _benchmarks(check, "cpu" if args.dry_run else "cuda")
    _dali(check)
    return _finish(check, versions)


if __name__ == "__main__":
    sys.exit(main())
