"""The `vidconv` command line: help, argument errors, and train -> evaluate -> finetune -> compare
on a tiny synthetic dataset (CPU, a few steps; accuracy is tested in test_train.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vidconv.cli import main

# These small networks share CI's 2 cores with the loader's decoding threads.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_python_dash_m_help_lists_the_commands() -> None:
    out = subprocess.run([sys.executable, "-m", "vidconv", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for command in ("train", "evaluate", "finetune", "compare", "baseline"):
        assert command in out


@pytest.mark.parametrize("command, options", [
    ("train", ["--model", "--multires", "--width", "--optimizer", "--schedule", "--resume",
               "--grad-clip", "--checkpoint-every", "--weight-decay"]),
    ("evaluate", ["--clips", "--views", "--groups", "--out"]),
    ("finetune", ["--mode", "--keep-prob", "top3", "scratch"]),
    ("compare", ["--names", "--top"]),
])
def test_subcommand_help(command: str, options: list[str],
                         capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in options:
        assert option in out


def test_baseline_is_dispatched(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("vidconv.baselines.cli")
    with pytest.raises(SystemExit) as exc:
        main(["baseline", "--help"])
    assert exc.value.code == 0
    assert "train" in capsys.readouterr().out


def test_argument_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["train", str(tmp_path), "--model", "fast_fusion"])
    assert exc.value.code == 2
    assert "invalid choice: 'fast_fusion'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["evaluate", "ckpt.pt", str(tmp_path), "--clips", "0"])
    assert "must be a positive integer" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "missing.pt"), str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "vidconv: error:" in err and "missing.pt" in err
    assert main(["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 2
    assert "report not found" in capsys.readouterr().err


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    synthetic = pytest.importorskip("vidconv.data.synthetic")
    root = tmp_path_factory.mktemp("cli_videos")
    synthetic.write_dataset(root / "train", classes=2, videos_per_class=3, frames=16, size=64,
                            seed=3)
    synthetic.write_dataset(root / "transfer", classes=3, videos_per_class=2, frames=16, size=64,
                            seed=4)
    return {"train": root / "train", "transfer": root / "transfer"}


def test_train_evaluate_finetune_compare(data: dict[str, Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    common = ["--batch-size", "3", "--no-progress"]
    assert main(["train", str(data["train"]), "--out", str(run), "--steps", "3",
                 "--lr", "0.01", "--width", "0.05", *common]) == 0
    out = capsys.readouterr().out
    assert main(["evaluate", str(run), str(data["train"]), "--device", "tpu9"]) == 2
    assert "device must be auto, cpu, cuda or cuda:N, got 'tpu9'" in capsys.readouterr().err
    assert "done: 3/3 steps" in out and str(run / "checkpoint.pt") in out
    assert (run / "metrics.csv").is_file() and (run / "config.json").is_file()

    classes = sorted(p.name for p in data["train"].iterdir() if p.is_dir())
    groups = tmp_path / "groups.json"
    groups.write_text(json.dumps({"g": classes}))  # group -> [classes] form
    assert main(["evaluate", str(run), str(data["train"]), "--clips", "2", "--views", "1",
                 "--groups", str(groups), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "video hit@1" in out and "group g" in out
    report = json.loads((run / "eval" / "report.json").read_text())
    assert report["num_videos"] == 6 and report["num_clips"] == 12
    assert set(report["groups"]) == {"g"}
    assert (run / "eval" / "confusion.png").is_file()

    # A dataset with classes the checkpoint does not know: named, exit code 2.
    assert main(["evaluate", str(run), str(data["transfer"]), "--clips", "1", "--views", "1",
                 "--no-progress"]) == 2
    assert "does not know" in capsys.readouterr().err

    ft = tmp_path / "ft"
    assert main(["finetune", str(run / "checkpoint.pt"), str(data["transfer"]), "--mode",
                 "top3", "--keep-prob", "0.1", "--out", str(ft), "--steps", "2",
                 *common]) == 0
    capsys.readouterr()
    # Resuming a fine-tuning run: the model fields come from the pretrained checkpoint.
    assert main(["finetune", str(run / "checkpoint.pt"), str(data["transfer"]), "--mode",
                 "top3", "--keep-prob", "0.1", "--out", str(ft), "--steps", "2", "--resume",
                 *common]) == 0
    assert "done: 2/2 steps" in capsys.readouterr().out
    config = json.loads((ft / "config.json").read_text())
    assert config["finetune_mode"] == "top3" and config["keep_prob"] == 0.1
    assert config["model"] == "single_frame" and config["width"] == 0.05

    second = tmp_path / "eval2"
    assert main(["evaluate", str(ft), str(data["transfer"]), "--clips", "2", "--views", "1",
                 "--out", str(second), "--no-plots", "--no-progress"]) == 0
    assert not (second / "confusion.png").exists()
    capsys.readouterr()
    assert main(["compare", str(second / "report.json"), str(second / "report.json"),
                 "--names", "single", "slow", "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "largest gains (slow - single)" in out
    assert (tmp_path / "cmp" / "compare.png").is_file()

    # --resume of a finished run: nothing left to do, same checkpoint.
    assert main(["train", str(data["train"]), "--out", str(run), "--steps", "3",
                 "--lr", "0.01", "--width", "0.05", "--resume", *common]) == 0
    assert "done: 3/3 steps" in capsys.readouterr().out
    # --resume with another model: the differences are named.
    assert main(["train", str(data["train"]), "--out", str(run), "--steps", "3", "--lr", "0.01",
                 "--width", "0.05", "--resume", "--model", "early_fusion", *common]) == 2
    assert "model: checkpoint has 'single_frame', this run 'early_fusion'" in \
        capsys.readouterr().err


def test_baseline_train_and_evaluate_report(data: dict[str, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """`vidconv baseline`: the report is strict JSON with the CNN report's keys and meanings,
    also when a class has no test video (its per-class numbers are null, not NaN)."""
    pytest.importorskip("sklearn")
    import shutil

    model = tmp_path / "bow.pkl"
    assert main(["baseline", "train", str(data["train"]), "--out", str(model), "--words", "8",
                 "--clips-per-video", "2"]) == 0
    one_class = tmp_path / "one_class"
    first = sorted(p for p in data["train"].iterdir() if p.is_dir())[0]
    shutil.copytree(first, one_class / first.name)
    report_path = tmp_path / "bow.json"
    assert main(["baseline", "evaluate", str(model), str(one_class), "--clips-per-video", "2",
                 "--json", str(report_path)]) == 0
    assert "videos" in capsys.readouterr().out

    def no_nan(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name} in the report")

    report = json.loads(report_path.read_text(), parse_constant=no_nan)
    assert report["clips"] == 2 and report["views"] == 1 and report["skipped_videos"] == 0
    assert report["num_videos"] == 3 and report["num_clips"] == 6
    assert len(report["classes"]) == 2 and report["per_class"][1] is None


@pytest.mark.parametrize("argv, expected", [
    (["--weight-decay", "nan"], "argument --weight-decay: must be a finite number, got nan"),
    (["--lr", "inf"], "argument --lr: must be a finite number, got inf"),
    (["--width", "1e400"], "argument --width: must be a finite number"),
    (["--dropout", "x"], "argument --dropout: must be a number, got 'x'"),
    (["--seed", "1e23"], "argument --seed: must be an integer in [0, 2**32), got '1e23'"),
    (["--seed", str(10**23)], "argument --seed: must be an integer in [0, 2**32)"),
    (["--resume", "--overwrite"], "argument --overwrite: not allowed with argument --resume"),
])
def test_bad_numbers_are_argument_errors(argv: list[str], expected: str, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["train", str(tmp_path), *argv])
    assert exc.value.code == 2
    assert expected in capsys.readouterr().err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("vidconv: error: "), err
    return lines[0]


@pytest.mark.parametrize("device", ["meta", "mps"])
def test_devices_without_kernels_are_one_line_errors(device: str, data: dict[str, Path],
                                                     tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", str(data["train"]), "--out", str(tmp_path / "r"), "--device", device,
                 "--no-progress"]) == 2
    assert f"got {device!r}" in _one_error_line(capsys.readouterr().err)


def test_run_directory_errors_are_one_line(data: dict[str, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import torch

    common = ["--steps", "2", "--batch-size", "3", "--width", "0.05", "--no-progress",
              "--checkpoint-every", "1"]
    (tmp_path / "file").write_text("x")
    assert main(["train", str(data["train"]), "--out", str(tmp_path / "file"), *common]) == 2
    assert "is a file, not a directory" in _one_error_line(capsys.readouterr().err)

    # the default --out of a second run would replace the first one: refused
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "run"
    assert main(["train", str(data["train"]), *common]) == 0
    assert (run / "checkpoint.pt").is_file()
    before = (run / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert main(["train", str(data["train"]), *common]) == 2
    assert "runs/run already holds a run" in _one_error_line(capsys.readouterr().err)
    assert main(["finetune", str(run), str(data["train"]), "--out", str(run), "--steps", "2",
                 "--no-progress"]) == 2
    assert "already holds a run" in _one_error_line(capsys.readouterr().err)
    assert (run / "checkpoint.pt").read_bytes() == before

    # a full disk while saving: named, and no partial checkpoint left to keep it full
    def disk_full(obj: object, f: object, *args: object, **kwargs: object) -> None:
        f.write(b"\x80" * 4096)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", disk_full)
    assert main(["train", str(data["train"]), "--out", str(run), "--overwrite", *common]) == 2
    err = capsys.readouterr().err
    line = [ln for ln in err.splitlines() if ln.startswith("vidconv: error:")]
    assert line == [f"vidconv: error: cannot write the checkpoint {run / 'checkpoint.pt'}: the "
                    "disk is full (no space left on device)"], err
    assert not [p for p in os.listdir(run) if ".tmp" in p]


def test_a_second_ctrl_c_is_one_line_and_exit_130(data: dict[str, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import signal

    from vidconv.train.engine import Trainer

    step = Trainer._train_step

    def pressed_twice(self: Trainer, batch: object) -> object:
        out = step(self, batch)
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)
        return out

    monkeypatch.setattr(Trainer, "_train_step", pressed_twice)
    try:
        code = main(["train", str(data["train"]), "--out", str(tmp_path / "r"), "--steps", "3",
                     "--batch-size", "3", "--width", "0.05", "--no-progress"])
    except KeyboardInterrupt:
        pytest.fail("the second Ctrl-C escaped as a KeyboardInterrupt traceback")
    assert code == 130
    err = capsys.readouterr().err
    line = [ln for ln in err.splitlines() if ln.startswith("vidconv: error:")]
    assert line and "interrupted twice" in line[0] and str(tmp_path / "r") in line[0]
    assert not [p for p in os.listdir(tmp_path / "r") if ".tmp" in p]


def test_two_trainings_on_one_run_directory(data: dict[str, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """A second training on a directory a running one uses is refused, naming the first one's
    PID, and leaves the first one's files alone."""
    import signal
    import time

    run = tmp_path / "run"
    args = ["train", str(data["train"]), "--out", str(run), "--batch-size", "3", "--width",
            "0.05", "--no-progress", "--log-every", "100000"]
    first = subprocess.Popen([sys.executable, "-m", "vidconv", *args, "--steps", "100000",
                              "--checkpoint-every", "100000"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 180
        while not (run / "config.json").exists():  # written once the run holds the directory
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline, "the first training did not start"
            time.sleep(0.2)
        config = (run / "config.json").read_text()
        assert main([*args, "--steps", "2"]) == 2
        err = capsys.readouterr().err
        assert f"run directory {run} is in use by another vidconv run (PID {first.pid})" in err
        assert (run / "config.json").read_text() == config
    finally:
        first.send_signal(signal.SIGTERM)
        try:
            code = first.wait(timeout=120)
        except subprocess.TimeoutExpired:
            first.kill()
            raise
    assert code == 130  # stopped by SIGTERM after saving a checkpoint
    assert main([*args, "--steps", "2", "--overwrite"]) == 0  # free once it has ended
