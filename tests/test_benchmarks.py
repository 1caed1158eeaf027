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
SCRIPTS = ["speed", "preprocess", "conv", "loader", "paper_tables"]


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
