"""vidconv.train: metrics on hand-made scores, and training end to end on the CPU on a tiny
synthetic video dataset written by the test (narrow single-frame network): accuracy above
chance, exact resume, fine-tuning freezes what it says, 2-rank gloo DDP stays in sync."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
from pathlib import Path

import pytest
import torch

from vidconv.train import (
    TrainConfig,
    Trainer,
    compare,
    evaluate,
    finetune,
    load_checkpoint,
    save_checkpoint,
    train,
    trainable_groups,
)
from vidconv.train import metrics as M

# These small networks share CI's 2 cores with the loader's decoding threads.
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# ------------------------------------------------------------------------------------ metrics


def test_hit_at_k_by_hand() -> None:
    scores = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.3, 0.25, 0.45]])
    labels = torch.tensor([1, 1, 0, 1])
    # True class ranks 1, 2, 3, 3.
    assert M.hit_at_k(scores, labels, 1) == pytest.approx(1 / 4)
    assert M.hit_at_k(scores, labels, 2) == pytest.approx(2 / 4)
    assert M.hit_at_k(scores, labels, 3) == 1.0
    assert M.hit_at_k(scores, labels, 5) == 1.0  # k beyond the class count counts every row
    with pytest.raises(ValueError, match="k must be a positive int"):
        M.hit_at_k(scores, labels, 0)
    with pytest.raises(ValueError, match="labels must lie in"):
        M.hit_at_k(scores, torch.tensor([0, 1, 2, 3]), 1)


def test_video_scores_average_the_clips_of_each_video() -> None:
    # Video 0: clips favour class 0, 1, 0 -> mean favours 0; video 2 has no clip (skipped).
    scores = torch.tensor([[0.6, 0.4], [0.3, 0.7], [0.8, 0.2], [0.1, 0.9]])
    video = torch.tensor([0, 0, 0, 1])
    means, present = M.video_scores(scores, video, num_videos=3)
    torch.testing.assert_close(means[0], torch.tensor([1.7 / 3, 1.3 / 3], dtype=torch.float64))
    torch.testing.assert_close(means[1], torch.tensor([0.1, 0.9], dtype=torch.float64))
    assert present.tolist() == [True, True, False]
    # The paper's point: the video is right although one of its clips is wrong.
    assert M.hit_at_k(scores[:3], torch.tensor([0, 0, 0]), 1) == pytest.approx(2 / 3)
    assert M.hit_at_k(means[:1], torch.tensor([0]), 1) == 1.0


def test_confusion_per_class_and_groups_by_hand() -> None:
    pred = torch.tensor([0, 1, 1, 2, 2, 2])
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    conf = M.confusion_matrix(pred, labels, 4)
    assert conf.tolist() == [[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 2, 0], [0, 0, 0, 0]]
    acc = M.per_class_accuracy(conf)
    assert acc[:3] == [0.5, 0.5, 1.0] and math.isnan(acc[3])
    classes = ["a", "b", "c", "d"]
    groups = {"a": "g1", "b": "g1", "c": "g2"}
    assert M.video_group_accuracy(pred, labels, classes, groups) == {"g1": 0.5, "g2": 1.0}
    means = M.group_means(acc, classes, groups)  # "d" is in no group and has no video
    assert means["g1"] == 0.5 and means["g2"] == 1.0 and math.isnan(means["(none)"])
    with pytest.raises(ValueError, match="not in the dataset"):
        M.group_means(acc, classes, {"zebra": "g1"})


def test_average_precision_by_hand() -> None:
    # Class 0 scores, descending: videos 0 (pos), 2 (neg), 1 (pos) -> AP = (1/1 + 2/3) / 2.
    scores = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
    labels = torch.tensor([0, 0, 1])
    ap = M.average_precision(scores, labels)
    assert ap[0] == pytest.approx((1 + 2 / 3) / 2)
    # Class 1 scores: video 1 (neg, .8), video 2 (pos, .5) -> AP = 1/2.
    assert ap[1] == pytest.approx(0.5)
    assert M.nanmean([0.5, float("nan"), 1.0]) == 0.75


def test_compare_gains_and_losses(tmp_path: Path) -> None:
    classes = ["juggling", "climbing", "racing", "boxing"]
    a = {"classes": classes, "per_class": [0.2, 0.5, 0.9, 0.5],
         "per_class_ap": [0.3, 0.4, 0.9, 0.5]}
    b = {"classes": classes, "per_class": [0.6, 0.6, 0.7, 0.5],
         "per_class_ap": [0.45, 0.5, 0.8, 0.5]}
    (tmp_path / "a.json").write_text(json.dumps(a))
    res = compare(tmp_path / "a.json", b, names=("single", "slow"), out=tmp_path / "cmp", top=2)
    assert res["metric"] == "ap"
    assert [r["class"] for r in res["gains"]] == ["juggling", "climbing"]
    assert [r["class"] for r in res["losses"]] == ["racing"]
    assert res["diff"] == pytest.approx([0.15, 0.1, -0.1, 0.0])
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 1000
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["names"] == ["single",
                                                                                  "slow"]
    acc = compare(a, b, metric="accuracy")
    assert acc["gains"][0]["class"] == "juggling" and acc["gains"][0]["diff"] == pytest.approx(.4)
    with pytest.raises(ValueError, match="different classes"):
        compare(a, {**b, "classes": ["x", "climbing", "racing", "boxing"]})
    for bad in (("m", "m"), ("single", "class"), ("diff", "slow")):
        with pytest.raises(ValueError, match="two different labels"):
            compare(a, b, names=bad)


def test_compare_leaves_out_classes_without_a_score() -> None:
    # NaN (a class with no test video, as other tools write it) must not reach the ranking,
    # whatever the position of the class (a NaN in a sort key scrambles the order around it)
    import itertools

    va = {"c0": 0.1, "c1": 0.2, "c2": 0.3, "c3": float("nan"), "c4": 0.5, "c5": None}
    vb = {"c0": 0.9, "c1": 0.6, "c2": 0.4, "c3": 0.9, "c4": float("nan"), "c5": 0.2}
    for order in itertools.islice(itertools.permutations(va), 0, None, 7):
        a = {"classes": list(order), "per_class": [va[c] for c in order]}
        b = {"classes": list(order), "per_class": [vb[c] for c in order]}
        res = compare(a, b, metric="accuracy", top=3)
        assert [r["class"] for r in res["gains"]] == ["c0", "c1", "c2"], order
        assert res["losses"] == []
        assert [d is None for d in res["diff"]] == [c in ("c3", "c4", "c5") for c in order]


def test_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a vidconv checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="not a readable vidconv checkpoint"):
        load_checkpoint(tmp_path / "garbage.pt")
    path = save_checkpoint(tmp_path / "run" / "checkpoint.pt",
                           {"model": {}, "classes": [], "state_dict": {}})
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pt"]  # no temp file left
    assert load_checkpoint(tmp_path / "run")["path"] == str(path)


def test_config_names_bad_options() -> None:
    with pytest.raises(ValueError, match="optimizer must be one of"):
        TrainConfig(data="x", optimizer="rmsprop")
    with pytest.raises(ValueError, match="finetune_mode='top' needs init_from"):
        TrainConfig(data="x", finetune_mode="top")
    with pytest.raises(ValueError, match=r"unknown training option\(s\) \['lr_rate'\]"):
        TrainConfig.from_dict({"data": "x", "lr_rate": 0.1})


# ----------------------------------------------------------------------- end to end (CPU)

WIDTH = 0.05  # conv widths 5-19 filters, fc 205: a few ms per clip on one CPU core
CLASSES = 3
STEPS = 200  # issue 5: "a few hundred steps"; ~25 ms each at this width


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Train / held-out test / transfer sets of tiny synthetic videos (real encoded files)."""
    synthetic = pytest.importorskip("vidconv.data.synthetic")
    root = tmp_path_factory.mktemp("videos")
    out = {}
    for name, seed, classes in (("train", 0, CLASSES), ("test", 1, CLASSES),
                                ("transfer", 2, CLASSES + 1)):
        synthetic.write_dataset(root / name, classes=classes, videos_per_class=4, frames=24,
                                size=64, seed=seed)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def trained(datasets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
            ) -> dict[str, object]:
    """One trained checkpoint shared by the end-to-end tests."""
    out = tmp_path_factory.mktemp("runs") / "sf"
    summary = train(TrainConfig(data=str(datasets["train"]), out=str(out), width=WIDTH,
                                batch_size=8, steps=STEPS, lr=0.01, checkpoint_every=1000,
                                log_every=10, progress=False))
    return summary


def test_train_then_evaluate_beats_chance(trained: dict, datasets: dict[str, Path],
                                          tmp_path: Path) -> None:
    run = Path(trained["run_dir"])
    assert trained["steps"] == STEPS and not trained["interrupted"]
    rows = (run / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,epoch,loss") and len(rows) == 1 + STEPS // 10
    assert json.loads((run / "summary.json").read_text())["steps"] == STEPS
    report = evaluate(trained["checkpoint"], datasets["test"], clips=3, views=2, batch_size=16,
                      out=tmp_path / "eval", progress=False)
    chance = 1 / CLASSES
    print(f"\nheld-out: clip hit@1 {report['clip_hit1']:.3f}, video hit@1 "
          f"{report['video_hit1']:.3f} (chance {chance:.3f})")
    assert report["video_hit1"] >= chance + 0.3
    assert report["clip_hit1"] >= chance + 0.2
    assert report["video_hit5"] is None  # 3 classes: always in the top 5, so not reported
    assert "3 classes" in report["not_applicable"]["video_hit5"]
    assert report["num_videos"] == 4 * CLASSES and report["num_clips"] == 4 * CLASSES * 3 * 2
    conf = torch.tensor(report["confusion"])
    assert conf.sum() == report["num_videos"]
    assert conf.diagonal().sum() / conf.sum() == pytest.approx(report["video_hit1"])
    assert len(report["per_class"]) == CLASSES
    saved = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert saved["video_hit1"] == report["video_hit1"]
    for png in ("per_class.png", "confusion.png"):
        assert (tmp_path / "eval" / png).stat().st_size > 1000


def test_evaluate_groups_and_unknown_classes(trained: dict, datasets: dict[str, Path],
                                             tmp_path: Path) -> None:
    _, classes = _classes(trained)
    groups = {classes[0]: "first", classes[1]: "rest", classes[2]: "rest"}
    (tmp_path / "groups.json").write_text(json.dumps(groups))
    report = evaluate(trained["checkpoint"], datasets["test"], clips=1, views=1,
                      groups=tmp_path / "groups.json", progress=False)
    assert set(report["groups"]) == {"first", "rest"}
    per_video = report["per_class"]
    assert report["groups"]["first"] == pytest.approx(per_video[0])
    assert report["groups"]["rest"] == pytest.approx((per_video[1] + per_video[2]) / 2)
    with pytest.raises(ValueError, match="class\\(es\\) the model does not know"):
        evaluate(trained["checkpoint"], datasets["transfer"], clips=1, views=1, progress=False)


def _classes(trained: dict) -> tuple[dict, list[str]]:
    ckpt = load_checkpoint(trained["checkpoint"])
    return ckpt, list(ckpt["classes"])


def _interrupt_at(step: int):
    def hook(s: int, loss: float) -> None:
        if s == step:
            signal.raise_signal(signal.SIGTERM)
    return hook


@pytest.mark.parametrize("schedule", ["plateau", "cosine"])
def test_resume_gives_the_weights_of_an_uninterrupted_run(datasets: dict[str, Path],
                                                          tmp_path: Path, schedule: str) -> None:
    # 12 videos, batch 4: 3 steps per epoch; stop mid-epoch (step 4) and after a checkpoint.
    cfg = dict(data=str(datasets["train"]), width=WIDTH, batch_size=4, steps=7, lr=0.01,
               checkpoint_every=3, progress=False, schedule=schedule, plateau_window=2,
               patience=1, optimizer="sgd" if schedule == "plateau" else "adamw")
    full = train(TrainConfig(out=str(tmp_path / "full"), **cfg))
    part = train(TrainConfig(out=str(tmp_path / "part"), **cfg), on_step=_interrupt_at(4))
    assert part["interrupted"] and part["steps"] == 4
    assert load_checkpoint(tmp_path / "part")["step"] == 4
    with pytest.raises(ValueError, match="different run: seed: checkpoint has 0, this run 5"):
        train(TrainConfig(out=str(tmp_path / "part"), resume=True, **{**cfg, "seed": 5}))
    resumed = train(TrainConfig(out=str(tmp_path / "part"), resume=True, **cfg))
    assert resumed["steps"] == 7 and resumed["lr"] == full["lr"]
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "part")
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(),
                      strict=True):
        for key in sa:
            assert torch.equal(torch.as_tensor(sa[key]), torch.as_tensor(sb[key])), key
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        train(TrainConfig(out=str(tmp_path / "nothing"), resume=True, **cfg))
    # a changed dropout would silently not apply (the model comes from the checkpoint)
    with pytest.raises(ValueError, match="dropout: checkpoint has 0.5, this run 0.2"):
        train(TrainConfig(out=str(tmp_path / "part"), resume=True, **{**cfg, "dropout": 0.2}))
    # resuming a finished run trains nothing and keeps its summary
    again = train(TrainConfig(out=str(tmp_path / "part"), resume=True, **cfg))
    assert again["final_loss"] == resumed["final_loss"] is not None
    assert again["clips_per_s"] == resumed["clips_per_s"] > 0


def test_summary_counts_the_clips_really_trained(datasets: dict[str, Path],
                                                 tmp_path: Path) -> None:
    # 12 videos with batch 32: every batch holds 12 clips, not 32
    summary = train(TrainConfig(data=str(datasets["train"]), out=str(tmp_path / "r"),
                                width=WIDTH, batch_size=32, steps=3, progress=False))
    clips = summary["clips_per_s"] * summary["elapsed_s"]
    assert clips == pytest.approx(3 * 4 * CLASSES, rel=1e-6)


def test_resume_mid_epoch_skips_batches_without_decoding(datasets: dict[str, Path]) -> None:
    from vidconv.data import ClipLoader, VideoFolder
    from vidconv.models import build

    loader = ClipLoader(VideoFolder(datasets["train"]), build("single_frame", width=WIDTH).spec,
                        batch_size=4, train=True, seed=3)
    loader.set_epoch(2)
    full = list(loader)
    decoded = []
    load = loader._load
    loader._load = lambda chunk: decoded.append(len(chunk)) or load(chunk)
    tail = list(loader.iter_from(1))
    assert len(decoded) == len(full) - 1 == len(tail)
    for a, b in zip(full[1:], tail, strict=True):
        assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
    with pytest.raises(ValueError, match="start_batch"):
        list(loader.iter_from(-1))


def test_config_spellings_of_one_run(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    a = TrainConfig(data="x", init_from=str(tmp_path / "run"), finetune_mode="top")
    b = TrainConfig(data="x", init_from=str(tmp_path / "run" / "checkpoint.pt"),
                    finetune_mode="top")
    assert a.init_from == b.init_from == os.path.realpath(tmp_path / "run" / "checkpoint.pt")


EXPECTED_TRAINED = {
    "top": ["classifier"],
    "top3": ["fc1", "fc2", "classifier"],
    "all": ["conv1", "conv2", "conv3", "conv4", "conv5", "fc1", "fc2", "classifier"],
    "scratch": ["conv1", "conv2", "conv3", "conv4", "conv5", "fc1", "fc2", "classifier"],
}


@pytest.mark.parametrize("mode", ["top", "top3", "all", "scratch"])
def test_finetune_freezes_exactly_what_the_mode_says(trained: dict, datasets: dict[str, Path],
                                                     tmp_path: Path, mode: str) -> None:
    pre, _ = _classes(trained)
    cfg = TrainConfig(data=str(datasets["transfer"]), out=str(tmp_path / mode),
                      init_from=trained["checkpoint"], finetune_mode=mode, keep_prob=0.1,
                      steps=2, batch_size=4, lr=0.05, progress=False)
    trainer = Trainer(cfg)
    model = trainer.model
    assert model.num_classes == CLASSES + 1
    assert trainable_groups(model, mode) == EXPECTED_TRAINED[mode]
    groups = dict(model.layer_groups())
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    for name, group in groups.items():
        for p in group.parameters():
            trained_here = name in EXPECTED_TRAINED[mode]
            assert p.requires_grad == trained_here, name
            assert (id(p) in in_optimizer) == trained_here, name
    # Dropout before every retrained FC layer keeps 10%.
    for drop, fc in (("drop1", "fc1"), ("drop2", "fc2"), ("drop3", "classifier")):
        if fc in EXPECTED_TRAINED[mode]:
            assert getattr(model, drop).p == pytest.approx(0.9)

    seen_modes: list[bool] = []

    def check(step: int, loss: float) -> None:
        seen_modes.append(model.fc1.training)

    trainer.on_step = check
    try:
        trainer.run()
    finally:
        trainer.close()
    # Frozen layers (and the dropout in front of them) stay in eval mode while training.
    assert seen_modes == [mode != "top"] * 2
    post = load_checkpoint(tmp_path / mode)["state_dict"]
    for name in groups:
        prefix_keys = [k for k in post if _group_of(k) == name]
        assert prefix_keys, name
        same = all(torch.equal(post[k], pre["state_dict"][k]) for k in prefix_keys
                   if k in pre["state_dict"] and pre["state_dict"][k].shape == post[k].shape)
        if name in EXPECTED_TRAINED[mode]:
            assert not same or name == "classifier", f"{mode}: {name} did not change"
        else:
            assert same, f"{mode}: frozen {name} changed"


def _group_of(key: str) -> str:
    # towers.frames.conv1.conv.weight -> conv1; fc1.weight -> fc1
    parts = key.split(".")
    return parts[2] if parts[0] == "towers" else parts[0]


def test_finetune_function_and_bad_checkpoint(trained: dict, datasets: dict[str, Path],
                                              tmp_path: Path) -> None:
    summary = finetune(trained["checkpoint"], datasets["transfer"], mode="top", keep_prob=0.5,
                       out=tmp_path / "ft", steps=1, batch_size=4, progress=False)
    assert summary["model"]["num_classes"] == CLASSES + 1
    assert summary["trainable_params"] == 4 * (205 + 1)  # classifier only: 4 x (fc2 + bias)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        finetune(tmp_path / "nope.pt", datasets["transfer"], out=tmp_path / "x", steps=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, data: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    trainer = Trainer(TrainConfig(data=data, out=out, width=WIDTH, batch_size=2, steps=4,
                                  lr=0.01, progress=False, device="cpu"))
    try:
        init = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        trainer.run()
        torch.save({"init": init, "final": trainer.model.state_dict(), "steps": trainer.step},
                   f"{out}/rank{rank}.pt")
    finally:
        trainer.close()


def test_two_rank_gloo_ddp_stays_in_sync(datasets: dict[str, Path], tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, _free_port(), str(datasets["train"]), str(tmp_path)),
             nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r0["steps"] == r1["steps"] == 4
    changed = False
    for key in r0["final"]:
        assert torch.equal(r0["final"][key], r1["final"][key]), key
        changed |= not torch.equal(r0["init"][key], r0["final"][key])
    assert changed
    assert load_checkpoint(tmp_path)["step"] == 4


def test_bad_videos_are_skipped_and_counted(trained: dict, datasets: dict[str, Path],
                                            tmp_path: Path) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(datasets["test"], data)
    first_class = sorted(p for p in data.iterdir() if p.is_dir())[0]
    (first_class / "broken.webm").write_bytes(b"\x1aE\xdf\xa3 this is not a video")
    summary = train(TrainConfig(data=str(data), out=str(tmp_path / "run"), width=WIDTH,
                                batch_size=4, steps=2, progress=False))
    assert summary["steps"] == 2 and summary["skipped_videos"] == 1
    report = evaluate(trained["checkpoint"], data, clips=1, views=1, progress=False)
    assert report["skipped_videos"] == 1
    assert report["num_videos"] == 4 * CLASSES  # the broken one has no clip and is left out


def test_a_diverged_step_stops_before_touching_the_weights(datasets: dict[str, Path],
                                                           tmp_path: Path) -> None:
    trainer = Trainer(TrainConfig(data=str(datasets["train"]), out=str(tmp_path / "r"),
                                  width=WIDTH, batch_size=4, steps=3, progress=False))
    with torch.no_grad():
        trainer.model.classifier.bias.fill_(float("nan"))
    conv1 = trainer.model.state_dict()["towers.frames.conv1.conv.weight"].clone()
    try:
        with pytest.raises(FloatingPointError, match="not finite at step 1"):
            trainer.run()
    finally:
        trainer.close()
    assert torch.equal(trainer.model.state_dict()["towers.frames.conv1.conv.weight"], conv1)
    assert not (tmp_path / "r" / "checkpoint.pt").exists()
