"""A new user's first steps with the `vidconv` command: `vidconv synth` makes a dataset that
`train` and `evaluate` take, and the small things met on the way (an empty comparison table,
hit@5 with few classes, `--views`, `--dropout` / `--keep-prob`) say what they mean."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vidconv.cli import MAX_VIEWS, build_parser, main

# The small networks here share CI's 2 cores with the loader's decoding threads.
pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["--frames", "12", "--size", "32", "--no-progress"]


@pytest.fixture(autouse=True)
def wide_help(monkeypatch: pytest.MonkeyPatch) -> None:
    """argparse wraps help at the terminal width, also inside hyphenated words."""
    monkeypatch.setenv("COLUMNS", "1000")


def _help(command: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def _parse_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# vidconv synth
# ------------------------------------------------------------------------------------------

def test_synth_help_lists_its_options(capsys: pytest.CaptureFixture[str]) -> None:
    out = _help("synth", capsys)
    for option in ("--classes", "--videos", "--test-videos", "--frames", "--size", "--seed",
                   "--codec", "--no-progress", "--list-classes", "vidconv train OUT/train"):
        assert option in out


def test_synth_lists_the_catalogue(capsys: pytest.CaptureFixture[str]) -> None:
    from vidconv.data.synthetic import DEFAULT_ORDER

    assert main(["synth", "unused", "--list-classes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == DEFAULT_ORDER
    assert not Path("unused").exists()


def test_synth_writes_train_and_test_splits(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("av")
    from vidconv.data import VideoFolder

    out = tmp_path / "synth"
    argv = ["synth", str(out), "--classes", "3", "--videos", "2", "--test-videos", "1",
            "--seed", "5", *TINY]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "3 classes x 2 videos (written)" in printed and "vidconv train" in printed
    train, test = VideoFolder(out / "train"), VideoFolder(out / "test")
    assert train.classes == test.classes and len(train.classes) == 3
    assert len(train.videos) == 6 and len(test.videos) == 3
    # different scenes in the two splits: no file is byte-identical to one in the other
    train_bytes = {Path(v.path).read_bytes() for v in train.videos}
    assert not train_bytes & {Path(v.path).read_bytes() for v in test.videos}
    manifest = json.loads((out / "train" / "manifest.json").read_text())
    assert manifest["params"]["frames"] == 12 and manifest["params"]["size"] == 32
    # the same command again reuses every file
    mtimes = {v.path: Path(v.path).stat().st_mtime_ns for v in train.videos}
    assert main(argv) == 0
    assert "(reused, unchanged)" in capsys.readouterr().out
    assert mtimes == {v.path: Path(v.path).stat().st_mtime_ns for v in train.videos}


def test_synth_class_names_and_no_test_split(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("av")
    out = tmp_path / "named"
    assert main(["synth", str(out), "--classes", "red_disk_rising, green_square_spinning",
                 "--videos", "1", "--test-videos", "0", *TINY]) == 0
    assert sorted(p.name for p in (out / "train").iterdir() if p.is_dir()) == [
        "green_square_spinning", "red_disk_rising"]
    assert not (out / "test").exists()
    assert "next:" not in capsys.readouterr().out


@pytest.mark.parametrize("option, value, message", [
    ("--size", "33", "even number of pixels"),
    ("--size", "4", "even number of pixels"),
    ("--videos", "0", "positive integer"),
    ("--camera", "2", "probability in [0, 1]"),
    ("--noise", "inf", "finite number >= 0"),
    ("--codec", "av1", "invalid choice"),
])
def test_synth_argument_errors(option: str, value: str, message: str, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    err = _parse_error(["synth", str(tmp_path / "x"), option, value], capsys)
    assert f"argument {option}" in err and message in err
    assert not (tmp_path / "x").exists()


def test_synth_refuses_what_it_must_not_write_into(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("av")
    assert main(["synth", str(tmp_path / "x"), "--classes", "0", *TINY]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vidconv: error: --classes:") and "between 1 and" in err
    assert main(["synth", str(tmp_path / "x"), "--classes", "no_such_class", *TINY]) == 2
    assert "unknown class 'no_such_class'" in capsys.readouterr().err
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert main(["synth", str(a_file), *TINY]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err
    # someone's real dataset: nothing is added to it
    real = tmp_path / "real"
    (real / "train" / "basketball").mkdir(parents=True)
    (real / "train" / "basketball" / "game.mp4").write_bytes(b"")
    assert main(["synth", str(real), *TINY]) == 2
    assert "is not a synthetic dataset" in capsys.readouterr().err
    assert [p.name for p in (real / "train").iterdir()] == ["basketball"]


def test_synth_unwritable_out_is_one_error_line(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("av")
    import os

    if os.geteuid() == 0:
        # root writes anywhere: a path under a file gives the OS error instead
        target = tmp_path / "file"
        target.write_text("")
        out = target / "synth"
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        out = locked / "synth"
    assert main(["synth", str(out), "--videos", "1", *TINY]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vidconv: error: cannot write") and len(err.splitlines()) == 1


def test_synth_dataset_trains_and_evaluates(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """The README's first steps, at a tiny size: synth -> train -> evaluate."""
    pytest.importorskip("av")
    data = tmp_path / "data"
    assert main(["synth", str(data), "--classes", "2", "--videos", "2", "--test-videos", "1",
                 *TINY]) == 0
    run = tmp_path / "run"
    assert main(["train", str(data / "train"), "--width", "0.0625", "--batch-size", "2",
                 "--steps", "2", "--out", str(run), "--no-progress"]) == 0
    assert main(["evaluate", str(run), str(data / "test"), "--clips", "1", "--views", "1",
                 "--no-plots", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "2 videos" in out and "video_hit5: not applicable (2 classes" in out
    report = json.loads((run / "eval" / "report.json").read_text())
    assert report["video_hit5"] is None and "video_hit5" in report["not_applicable"]


# ------------------------------------------------------------------------------------------
# compare: an empty side of the table says so
# ------------------------------------------------------------------------------------------

def _report(path: Path, per_class: list[float]) -> Path:
    path.write_text(json.dumps({"classes": [f"c{i}" for i in range(len(per_class))],
                                "per_class": per_class, "per_class_ap": per_class}))
    return path


def test_compare_says_none_instead_of_an_empty_table(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _report(tmp_path / "a.json", [0.2, 0.5, 0.5])
    b = _report(tmp_path / "b.json", [0.6, 0.5, 0.9])  # never below A
    assert main(["compare", str(a), str(b), "--names", "single", "slow"]) == 0
    lines = capsys.readouterr().out.splitlines()
    losses = lines.index("largest losses (slow - single):")
    assert lines[losses + 1] == "  none: no class where slow is below single"
    assert losses == len(lines) - 2  # no header row for an empty table
    gains = lines.index("largest gains (slow - single):")
    assert lines[gains + 1].split() == ["class", "single", "slow", "diff"]
    # and the other way round: no gains
    assert main(["compare", str(b), str(a), "--names", "slow", "single"]) == 0
    out = capsys.readouterr().out
    assert "  none: no class where single is above slow" in out


# ------------------------------------------------------------------------------------------
# hit@5 with 5 classes or fewer
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_classes", [2, 5, 6])
def test_video_hit5_is_not_applicable_up_to_five_classes(num_classes: int) -> None:
    from vidconv.train.evaluation import hit5_fields, video_hit5

    g = torch.Generator().manual_seed(num_classes)
    scores = torch.rand(12, num_classes, generator=g)
    labels = scores.argmin(1)  # the worst-scored class: hit@5 is 0 once there are 6 classes
    value, why = video_hit5(scores, labels)
    fields = hit5_fields(scores, labels)
    if num_classes <= 5:
        assert value is None and f"{num_classes} classes" in why
        assert fields == {"video_hit5": None, "not_applicable": {"video_hit5": why}}
    else:
        assert value == 0.0 and why is None and fields == {"video_hit5": 0.0}


# ------------------------------------------------------------------------------------------
# --views: what is accepted is what --help documents
# ------------------------------------------------------------------------------------------

def test_views_accepted_are_the_views_documented(capsys: pytest.CaptureFixture[str]) -> None:
    from vidconv.data.loader import VIEWS

    assert len(VIEWS) == MAX_VIEWS
    out = _help("evaluate", capsys)
    assert f"views per clip, 1 to {MAX_VIEWS}" in out
    for corner in ("centre", "top-left", "bottom-right", "top-right", "bottom-left"):
        assert corner in out
    for views in range(1, MAX_VIEWS + 1):
        assert build_parser().parse_args(["evaluate", "c", "d", "--views", str(views)]).views \
            == views
    for bad in ("0", str(MAX_VIEWS + 1), "two"):
        err = _parse_error(["evaluate", "c", "d", "--views", bad], capsys)
        assert "argument --views" in err and f"1 to {MAX_VIEWS}" in err


# ------------------------------------------------------------------------------------------
# --dropout (drop probability) and --keep-prob (keep probability) on train and finetune
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command, dest", [("train", "dropout"), ("finetune", "keep_prob")])
def test_dropout_and_keep_prob_are_two_spellings(command: str, dest: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    head = [command, "DATA"] if command == "train" else [command, "ckpt.pt", "DATA"]

    def parsed(*extra: str) -> float:
        return getattr(build_parser().parse_args([*head, *extra]), dest)

    assert parsed() == 0.5
    if dest == "dropout":
        assert parsed("--dropout", "0.3") == 0.3 and parsed("--keep-prob", "0.9") == 0.1
    else:
        assert parsed("--keep-prob", "0.3") == 0.3 and parsed("--dropout", "0.9") == 0.1
    err = _parse_error([*head, "--dropout", "0.5", "--keep-prob", "0.5"], capsys)
    assert "not allowed with argument" in err
    assert "drop probability in [0, 1)" in _parse_error([*head, "--dropout", "1"], capsys)
    assert "keep probability in (0, 1]" in _parse_error([*head, "--keep-prob", "0"], capsys)
    out = _help(command, capsys)
    assert "--dropout P" in out and "--keep-prob Q" in out
    assert "DROPPING" in out and "KEEPING" in out and "--keep-prob 1-P" in out


# ------------------------------------------------------------------------------------------
# The README's commands are commands this parser takes
# ------------------------------------------------------------------------------------------

def test_readme_first_steps_are_valid_commands() -> None:
    import shlex

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    commands = [shlex.split(line, comments=True)[1:] for line in readme.splitlines()
                if line.startswith("vidconv ")]
    assert [c[0] for c in commands[:3]] == ["synth", "train", "evaluate"]  # the first steps
    synth, train, evaluate = commands[:3]
    out = Path(synth[1])
    assert train[1] == str(out / "train") and evaluate[2] == str(out / "test")
    assert evaluate[1] == train[train.index("--out") + 1]  # evaluates the run it trained
    for argv in commands:
        build_parser().parse_args(argv)  # exits 2 on anything the parser does not take
