"""The benchmark scripts run: `--help`, a clear error for a device that is not there, and a
minimal CPU run of each fast one that writes the JSON its README promises. (Their numbers are
measurements, not test assertions; only the shape of the output is checked here.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = ["speed", "preprocess", "conv", "loader", "paper_tables", "lrn_pool", "linear"]


def _run(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / f"{script}.py"), *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script: str) -> None:
    res = _run(script, "--help")
    assert res.returncode == 0, res.stderr
    assert "usage:" in res.stdout and "--device" in res.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
@pytest.mark.parametrize("script", ["speed", "preprocess"])
def test_missing_cuda_is_a_clear_error(script: str) -> None:
    res = _run(script, "--device", "cuda")
    assert res.returncode != 0
    assert "asked for CUDA but no CUDA device is available" in res.stderr
    assert "Traceback" not in res.stderr


def test_speed_minimal_run(tmp_path: Path) -> None:
    out = tmp_path / "speed.json"
    res = _run("speed", "--device", "cpu", "--models", "single_frame,slow_fusion",
               "--batch-size", "1", "--width", "0.0625", "--warmup", "0", "--repeats", "1",
               "--json", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.read_text())
    rows = {(r["model"], r["resolution"]) for r in data["rows"]}
    assert rows == {(m, r) for m in ("single_frame", "slow_fusion") for r in ("full", "multires")}
    for r in data["rows"]:
        assert r["forward_clips_s"] > 0 and r["train_clips_s"] > 0
    assert "multires / full" in res.stdout  # the ratio table is printed last
    # the ceiling is the best of several measured kernels, and the table says which
    ceiling = data["settings"]["ceiling"]
    assert len(ceiling["kernels"]) >= 3 and data["settings"]["ceiling_tflops"] == max(
        ceiling["kernels"].values())
    assert "ceiling: best of matmul" in res.stdout and ceiling["best"] in res.stdout
    assert all("forward_pct_ceiling" in r and "train_pct_ceiling" in r for r in data["rows"])


def test_ceiling_is_the_best_of_several_kernels() -> None:
    sys.path.insert(0, str(BENCH))
    try:
        import _common
    finally:
        sys.path.remove(str(BENCH))
    c = _common.measured_ceiling("cpu", torch.bfloat16, quick=True, repeats=1)
    names = list(c["kernels"])
    assert sum(n.startswith("matmul") for n in names) >= 2 and any("conv3d" in n for n in names)
    assert c["tflops"] == max(c["kernels"].values()) == c["kernels"][c["best"]] > 0
    assert c["dtype"] == "float32"  # the CPU times low precision in float32
    assert c["label"].startswith("ceiling: best of ") and all(n in c["label"] for n in names)


def test_preprocess_minimal_run(tmp_path: Path) -> None:
    out = tmp_path / "pre.json"
    res = _run("preprocess", "--device", "cpu", "--batch", "1", "--frames", "2",
               "--dtypes", "float32", "--warmup", "0", "--repeats", "1", "--json", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.read_text())
    assert {(r["op"], r["impl"]) for r in data["rows"]} == {
        (op, impl) for op in ("fovea_context", "crop_normalize") for impl in ("vidconv", "torch")}


def test_lrn_pool_minimal_run(tmp_path: Path) -> None:
    out = tmp_path / "lrn.json"
    res = _run("lrn_pool", "--device", "cpu", "--batch", "1", "--repeats", "1", "--json",
               str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.read_text())
    assert len(data["rows"]) == 8
    assert all(r["rel_err"] < 1e-5 for r in data["rows"])
    assert "aten/fused" in res.stdout.splitlines()[-10]
    bad = _run("lrn_pool", "--dtypes", "float8")
    assert bad.returncode != 0 and "--dtypes must be from" in bad.stderr


def test_linear_minimal_run(tmp_path: Path) -> None:
    out = tmp_path / "linear.json"
    res = _run("linear", "--device", "cpu", "--quick", "--width", "0.05", "--repeats", "1",
               "--json", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.read_text())
    # fc1 of three input widths, fc2 and the classifier, each of every network that has it
    assert len(data["rows"]) == 5 and all(r["batch"] == 8 for r in data["rows"])
    assert {"fwd small_batch ms", "grad small_batch ms", "grad % ceiling"} <= set(data["rows"][0])
    assert all(r["max rel err"] < 1e-4 and r["read GB/s"] > 0 for r in data["rows"])
    assert "late_fusion mr fc1" in res.stderr
    assert "fwd best / aten" in res.stdout.splitlines()[-7]
    bad = _run("linear", "--batches", "8,x")
    assert bad.returncode != 0 and "--batches must be comma-separated integers" in bad.stderr


def test_conv_minimal_run(tmp_path: Path) -> None:
    out = tmp_path / "conv.json"
    res = _run("conv", "--device", "cpu", "--quick", "--models", "single_frame",
               "--repeats", "1", "--json", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["layers"]
    for layer in data["layers"]:
        assert any("single_frame" in use for use in layer["uses"])
        assert layer["fwd_ms"]["ours"] > 0 and layer["max_rel_diff"] < 1e-4  # checked before timing


# ---- the one-call GPU check: its dry run, its budget and its step runner -----------------------

GPU_CHECK = BENCH / "gpu_check.sh"


def _load_gpu_check():
    """benchmarks/gpu_check.py as a module (it is a script, not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", BENCH / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules["gpu_check"]
    return module


def _gpu_check(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(GPU_CHECK), *args], capture_output=True, text=True,
                          timeout=timeout)


def test_gpu_check_dry_run_runs_every_step_cpu_part(tmp_path: Path) -> None:
    out = tmp_path / "gpu"
    res = _gpu_check("--dry-run", str(out))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files  # what one device call can bring back
    assert {"summary.txt", "summary.json", "logs.tar.gz"} <= set(files)
    summary = json.loads((out / "summary.json").read_text())
    steps = {s["name"]: s for s in summary["steps"]}
    for name in ("versions", "build", "build_info", "pytest_cuda", "sanitize_workload_cpu",
                 "bench_preprocess", "bench_conv", "bench_speed", "bench_loader"):
        assert steps[name]["status"] == "ok", steps[name]
    assert "GPU tests collected" in steps["pytest_cuda"]["detail"]
    for bench in ("preprocess", "conv", "speed", "loader"):
        assert json.loads((out / f"{bench}.json").read_text())  # each benchmark wrote its JSON
    assert summary["versions"]["torch"] == torch.__version__
    # the table is printed last, with the budget used
    assert res.stdout.rstrip().splitlines()[-1].startswith("budget: used")
    assert "(dry run)" in res.stdout.splitlines()[-1]


def test_gpu_check_out_of_budget_skips_and_says_why(tmp_path: Path) -> None:
    out = tmp_path / "gpu"
    res = _gpu_check("--dry-run", "--budget", "11", str(out), timeout=120)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    steps = json.loads((out / "summary.json").read_text())["steps"]
    assert steps and all(s["status"] == "skipped" for s in steps), steps
    assert any("budget left" in s["detail"] for s in steps)
    assert len(list(out.iterdir())) <= 8


@pytest.mark.parametrize("args, message", [
    (["--budget", "-5"], "--budget must be a positive number"),
    (["--budget", "nan"], "--budget must be a positive number"),
])
def test_gpu_check_bad_arguments_are_one_line(tmp_path: Path, args, message) -> None:
    res = _gpu_check("--dry-run", *args, str(tmp_path / "o"), timeout=60)
    assert res.returncode == 2 and message in res.stderr
    assert "Traceback" not in res.stderr


def test_gpu_check_out_must_be_a_folder(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    res = _gpu_check("--dry-run", str(f), timeout=60)
    assert res.returncode == 2 and "OUT must be a folder" in res.stderr
    assert "Traceback" not in res.stderr


def test_gpu_check_step_runner_records_failures_timeouts_and_skips(tmp_path: Path) -> None:
    import time

    gpu_check = _load_gpu_check()
    logs = tmp_path / "logs"
    logs.mkdir()
    check = gpu_check.Check(tmp_path, logs, budget_s=60, dry_run=True, skip={"skipped_one"})
    py = sys.executable
    failing = check.run("failing", [py, "-c", "print('boom'); raise SystemExit(3)"], cap_s=30)
    assert failing.status == "FAILED" and "exit 3" in failing.detail
    assert "boom" in (logs / "failing.log").read_text()
    t0 = time.monotonic()
    # the child's own child must die with it (a hung pytest worker would keep the call alive)
    hung = check.run("hung", ["bash", "-c", "sleep 60 & sleep 60"], cap_s=1, min_s=0.5)
    assert hung.status == "FAILED" and "timed out" in hung.detail
    assert time.monotonic() - t0 < 20
    assert check.run("skipped_one", [py, "-c", "pass"], cap_s=30).status == "skipped"
    ok = check.run("fine", [py, "-c", "pass"], cap_s=30)
    assert ok.status == "ok"
    # compute-sanitizer verdicts: clean, errors, refused by the runtime
    judge = gpu_check._judge_sanitizer
    assert judge(0, "========= ERROR SUMMARY: 0 errors")[0] == "ok"
    assert judge(3, "========= ERROR SUMMARY: 2 errors")[0] == "FAILED"
    assert judge(1, "========= Error: Device not supported")[0] == "skipped"
    assert judge(1, "something else")[0] == "FAILED"
    pytest_judge = gpu_check._judge_pytest(False)
    assert pytest_judge(0, "12 passed, 3 skipped in 4.0s")[0] == "ok"
    assert pytest_judge(0, "15 skipped in 1.0s")[0] == "FAILED"  # nothing ran on the GPU
    assert gpu_check._judge_pytest(True)(0, "0/10 tests collected (10 deselected)")[0] == "FAILED"


def test_gpu_check_joins_wheel_parts_only_when_complete(tmp_path: Path) -> None:
    import hashlib

    gpu_check = _load_gpu_check()
    data = bytes(range(256)) * 1000
    name = "nvidia_dali_cuda130-0-py3-none-manylinux.whl"
    (tmp_path / f"{name}.sha256").write_text(hashlib.sha256(data).hexdigest() + f"  {name}\n")
    (tmp_path / f"{name}.part-aa").write_bytes(data[:100_000])
    notes = gpu_check.join_wheel_parts(tmp_path)
    assert "do not match" in notes[0] and not (tmp_path / name).exists()  # a part still missing
    (tmp_path / f"{name}.part-ab").write_bytes(data[100_000:])
    notes = gpu_check.join_wheel_parts(tmp_path)
    assert "joined 2 parts" in notes[0] and (tmp_path / name).read_bytes() == data


def test_loader_minimal_run_with_shards(tmp_path: Path) -> None:
    out = tmp_path / "loader.json"
    res = _run("loader", "--device", "cpu", "--sizes", "320x240", "--codecs", "h264",
               "--videos", "2", "--frames", "12", "--epochs", "1", "--min-seconds", "0.2",
               "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.read_text())
    # Fast rows run more epochs than asked until they have taken --min-seconds.
    shards = next(r for r in data["rows"] if r["backend"] == "shards")
    assert data["min_seconds"] == 0.2 and shards["clips"] > 2
    backends = {r["backend"] for r in data["rows"]}
    assert {"pyav", "shards", "shards jpeg only"} <= backends
    assert all(r["clips_per_s"] > 0 and r["skipped"] == 0 for r in data["rows"])
    (prep,) = data["prepare"]
    assert prep["videos"] == 2 and prep["gb_per_hour"] > 0 and prep["realtime_per_core"] > 0
    assert any("per core >= 300" in t["target"] for t in data["targets"])
    assert "targets (CPU, per core)" in res.stdout  # the targets table is printed last


@pytest.mark.parametrize("use_users", [False, True])
def test_benchmarks_decide_the_conv_plan_afresh_unless_asked(tmp_path: Path, monkeypatch,
                                                            use_users: bool) -> None:
    # A decision remembered from another day or another load must not shape the figures.
    sys.path.insert(0, str(BENCH))
    try:
        import _common
    finally:
        sys.path.remove(str(BENCH))
    from vidconv.ops import conv_planner, st_conv3d

    def steady(name, run, device, repeats):  # real timings of a tiny conv may be "noisy"
        run()
        return [1.0] * repeats

    monkeypatch.setattr(conv_planner, "time_candidate", steady)
    monkeypatch.setenv("VIDCONV_CACHE_DIR", str(tmp_path))
    with _common.conv_plan_cache(use_users) as which:
        assert which == ("user" if use_users else "fresh")
        assert (conv_planner.cache_path().parent == tmp_path) == use_users
        st_conv3d(torch.randn(1, 3, 2, 9, 9), torch.randn(4, 3, 1, 3, 3), None, 1, 1)
    assert (tmp_path / "conv_plan.json").exists() == use_users
    assert conv_planner.cache_path().parent == tmp_path  # restored
