"""benchmarks/paper_tables.py: the quick grid (the one CI runs, ~6 min on 2 cores) runs
end to end, its report is complete, and every model in it beats chance."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("av")
pytest.importorskip("matplotlib")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("paper_tables", BENCH / "paper_tables.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["paper_tables"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


pt = _load()


# These small networks share CI's 2 cores with the loader's decoding threads.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_ensemble_matches_clips_by_video_and_position() -> None:
    a = {"scores": torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]),
         "labels": torch.tensor([0, 0, 1]), "video_index": torch.tensor([0, 0, 1])}
    # Same clips in another order, plus a video the first network never saw.
    b = {"scores": torch.tensor([[0.0, 1.0], [0.5, 0.5], [0.2, 0.8], [0.3, 0.7]]),
         "labels": torch.tensor([1, 0, 0, 2]), "video_index": torch.tensor([1, 0, 0, 2])}
    e = pt.ensemble([a, b])
    torch.testing.assert_close(e["video_index"], torch.tensor([0, 0, 1]))
    torch.testing.assert_close(e["labels"], torch.tensor([0, 0, 1]))
    torch.testing.assert_close(e["scores"], torch.tensor([[0.75, 0.25], [0.1, 0.9], [0.5, 0.5]]))


def test_help() -> None:
    with pytest.raises(SystemExit) as exc:
        pt.parse_args(["--help"])
    assert exc.value.code == 0


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("paper_tables")
    assert pt.main(["--quick", "--device", "cpu", "--out-dir", str(out), "--work-dir",
                    str(out / "work"), "--no-progress"]) == 0
    json_files = list(out.glob("paper_tables-quick-*.json"))
    assert len(json_files) == 1
    return json.loads(json_files[0].read_text()), out


@pytest.mark.slow
def test_quick_grid_report_is_complete(quick_run: tuple[dict, Path]) -> None:
    results, out = quick_run
    keys = [r["key"] for r in results["table1"]]
    assert keys == [row.key for row in pt.TABLE1_ROWS]
    for r in results["table1"]:
        for metric in ("clip_hit1", "video_hit1", "video_hit5"):
            assert 0.0 <= r[metric] <= 1.0, (r["key"], metric, r[metric])
        assert r["video_hit5"] >= r["video_hit1"]
        assert r["clips_per_s"] > 0 and math.isfinite(r["clips_per_s"])
    assert [r["key"] for r in results["transfer"]] == [k for k, _ in pt.TRANSFER_ROWS]
    for r in results["transfer"]:
        assert set(results["transfer_groups"]) <= set(r["groups"])
        assert all(0.0 <= v <= 1.0 for v in r["groups"].values())
    kinds = {c["kind"] for c in results["motion"]["per_class"]}
    assert {"motion", "appearance"} <= kinds
    assert len(results["motion"]["per_class"]) == results["chance"]["pretrain_classes"]
    md = next(out.glob("paper_tables-quick-*.md")).read_text()
    for row in pt.TABLE1_ROWS:
        assert f"| {row.label} |" in md
    for _, label in pt.TRANSFER_ROWS:
        assert f"| {label} |" in md
    assert "Table 1" in md and "Motion contribution" in md and "What differs" in md
    for png in results["plots"].values():
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


@pytest.mark.slow
def test_quick_grid_every_model_beats_chance(quick_run: tuple[dict, Path]) -> None:
    results, _ = quick_run
    chance = results["chance"]["pretrain"]
    for r in results["table1"]:
        assert r["video_hit1"] > chance, (r["key"], r["video_hit1"], chance)
    for r in results["transfer"]:
        assert r["video_hit1"] > results["chance"]["transfer"], (r["key"], r["video_hit1"])


def test_ucf101_split_files_are_read_as_the_official_layout(tmp_path: Path) -> None:
    """--dataset ucf101: classInd.txt (1-based ids), trainlist01.txt with labels, testlist01.txt
    without, paths relative to --root; a missing split file is named."""
    from vidconv.data import synthetic

    synthetic.write_dataset(tmp_path / "videos", classes=2, videos_per_class=3, frames=12,
                            size=48, seed=5)
    classes = sorted(p.name for p in (tmp_path / "videos").iterdir() if p.is_dir())
    splits = tmp_path / "splits"
    splits.mkdir()
    (splits / "classInd.txt").write_text("".join(f"{i} {c}\n" for i, c in enumerate(classes, 1)))
    train, test = [], []
    for i, c in enumerate(classes, 1):
        files = sorted(p.name for p in (tmp_path / "videos" / c).iterdir())
        train += [f"{c}/{f} {i}\n" for f in files[:2]]
        test += [f"{c}/{f}\n" for f in files[2:]]
    (splits / "trainlist01.txt").write_text("".join(train))
    (splits / "testlist01.txt").write_text("".join(test))
    args = pt.parse_args(["--dataset", "ucf101", "--root", str(tmp_path / "videos"),
                          "--splits", str(splits)])
    data = pt.load_data(args, pt.SCALES["tiny"], tmp_path / "work")
    assert data.pretrain_train.classes == data.pretrain_test.classes == classes
    assert len(data.pretrain_train.source.videos) == 4
    assert [v.label for v in data.pretrain_test.source.videos] == [0, 1]
    assert data.transfer_train is None and "UCF-101 fold 1" in data.summary
    (splits / "testlist01.txt").unlink()
    with pytest.raises(ValueError, match="testlist01.txt"):
        pt.load_data(args, pt.SCALES["tiny"], tmp_path / "work")
