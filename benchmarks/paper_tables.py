"""The paper's experiment grid at small scale: Table 1, the transfer table, motion contribution.

Karpathy et al. 2014 trained on Sports-1M (487 classes, a month per network) and transferred to
UCF-101. This script runs the same grid with narrow networks (``--width``) on vidconv's
synthetic motion benchmark (`vidconv.data.synthetic`: a "pretrain" label set in the Sports-1M
role and a disjoint "transfer" set in the UCF-101 role, with motion-only, appearance-only and
mixed classes), or on real data:

- Table 1 analogue: feature-histogram baseline, single frame, single frame + multires, fovea
  only, context only, early, late and slow fusion, and the average of the four CNNs (single,
  early, late, slow; clip scores averaged): clip hit@1, video hit@1, video hit@5, clips/s.
- Transfer table: slow fusion from scratch on the transfer set, and fine-tuned from the
  pretrain-set network (top layer, top 3 layers, all layers); accuracy per class group.
- Motion contribution: per-class video accuracy, slow fusion minus single frame; grouped by
  what separates the class (motion only / appearance only / both).

Writes benchmarks/results/paper_tables-<device>.{md,json} and PNG plots beside them; the table
is printed last. Modes: ``--tiny`` (a smoke run, ~2 min on 2 CPU cores), ``--quick``
(the test suite's and CI's run, ~6 min on 2 CPU cores), default full (a GPU). Real data:
``--dataset ucf101 --root UCF101/ --splits ucfTrainTestlist/ [--fold 1]`` runs Table 1 on
UCF-101 (and the transfer table when ``--pretrained CKPT`` gives a Sports-1M-style network), and
``--dataset list --train-list train.txt --test-list test.txt --root VIDEOS/`` runs Table 1 on a
Sports-1M-style list ("relative/path label" lines, see `vidconv.data.VideoList`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    RESULTS_DIR,
    device_info,
    device_name,
    device_slug,
    print_table,
    progress,
    resolve_device,
    time_fn,
    write_json,
)

# --------------------------------------------------------------------------------------------
# The paper's numbers (see /work/shared/paper.md; Karpathy et al. 2014).
# --------------------------------------------------------------------------------------------

# Table 1 (Sports-1M test set): clip hit@1, video hit@1, video hit@5, in percent.
PAPER_TABLE1: dict[str, tuple[float | None, float | None, float | None]] = {
    "baseline": (None, 55.3, None),
    "single": (41.1, 59.3, 77.7),
    "single_multires": (42.4, 60.0, 78.5),
    "fovea": (30.0, 49.9, 72.8),
    "context": (38.1, 56.0, 77.2),
    "early": (38.9, 57.7, 76.8),
    "late": (40.7, 59.3, 78.7),
    "slow": (41.9, 60.9, 80.2),
    "average": (41.4, 63.9, 82.4),
}

# UCF-101 transfer with slow fusion (3-fold mean accuracy, percent; the paper's transfer table,
# Sec. 4.2; numbers as collected in shared/paper.md).
PAPER_TRANSFER: dict[str, float] = {
    "baseline": 59.0, "scratch": 41.3, "top": 64.1, "top3": 65.4, "all": 62.2,
}
# Per UCF-101 class group, mAP: (scratch, fine-tune top 3, fine-tune top) (the paper's per-group
# table, Sec. 4.2).
PAPER_GROUPS: dict[str, tuple[float, float, float]] = {
    "human-object interaction": (0.26, 0.55, 0.52),
    "body-motion only": (0.32, 0.57, 0.52),
    "human-human interaction": (0.40, 0.68, 0.65),
    "playing musical instruments": (0.42, 0.65, 0.46),
    "sports": (0.57, 0.79, 0.80),
    "all": (0.44, 0.68, 0.66),
}
# Motion contribution (Sec. 4.1, per-class AP of slow fusion minus single frame, Sports-1M).
PAPER_MOTION = ("largest gains: juggling club +.12, pole climbing +.10, mountain unicycling +.08; "
                "largest losses (-.07): short track motor racing, road racing, jeet kune do; "
                "motion-aware nets did worse mostly under camera motion")


@dataclass(frozen=True)
class Row:
    """One line of Table 1: how to build the network and what the paper measured."""

    key: str
    label: str
    model: str | None = None  # registry name; None for the baseline / the average
    multires: bool = False
    stream: str = "both"


TABLE1_ROWS = (
    Row("baseline", "Feature histograms + classifier"),
    Row("single", "Single-frame", "single_frame"),
    Row("single_multires", "Single-frame + multires", "single_frame", multires=True),
    Row("fovea", "Single-frame fovea only", "single_frame", multires=True, stream="fovea"),
    Row("context", "Single-frame context only", "single_frame", multires=True, stream="context"),
    Row("early", "Early fusion", "early_fusion"),
    Row("late", "Late fusion", "late_fusion"),
    Row("slow", "Slow fusion", "slow_fusion"),
    Row("average", "CNN average (single+early+late+slow)"),
)
AVERAGED = ("single", "early", "late", "slow")
TRANSFER_ROWS = (
    ("baseline", "Feature histograms + classifier"),
    ("scratch", "Slow fusion from scratch"),
    ("top", "Fine-tune top layer"),
    ("top3", "Fine-tune top 3 layers"),
    ("all", "Fine-tune all layers"),
)


@dataclass
class Scale:
    """Sizes of one mode (dataset, networks, schedule)."""

    name: str
    width: float
    epochs: int
    transfer_epochs: int
    batch_size: int
    train_clips_per_video: int
    eval_clips_per_video: int
    words: int
    synthetic: dict[str, Any] = field(default_factory=dict)


SCALES = {
    # Transfer sets are small (a few steps per pass): more epochs there, so that even the
    # network trained from scratch gets past chance.
    "tiny": Scale("tiny", width=1 / 16, epochs=12, transfer_epochs=24, batch_size=16,
                  train_clips_per_video=2, eval_clips_per_video=2, words=32,
                  synthetic={"scale": "tiny"}),
    "quick": Scale("quick", width=1 / 16, epochs=14, transfer_epochs=14, batch_size=16,
                   train_clips_per_video=4, eval_clips_per_video=4, words=64,
                   synthetic={"scale": "quick"}),
    "full": Scale("full", width=0.25, epochs=30, transfer_epochs=20, batch_size=32,
                  train_clips_per_video=8, eval_clips_per_video=20, words=256,
                  synthetic={"scale": "full"}),
}


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _paper(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def markdown_report(results: dict[str, Any], plots: dict[str, str]) -> str:
    """The Markdown report: measured numbers beside the paper's, plots, and the setup."""
    info = results["device_info"]
    setup = results["setup"]
    lines = [
        "# The paper's tables at small scale",
        "",
        f"Measured with `benchmarks/paper_tables.py --{setup['mode']}` on **{info['device']}** "
        f"(torch {info['torch']}, {info['time']}). Dataset: {setup['dataset_summary']}. "
        f"Networks at width {setup['width']:g} of the paper's, {setup['epochs']} epochs "
        f"({setup['transfer_epochs']} for transfer) of {setup['train_clips_per_video']} random "
        "training clips per video (random position, crop and flip; the baseline's vocabulary "
        f"and classifier see the same number of clips once), {setup['eval_clips_per_video']} "
        "evenly spaced evaluation clips per video in the centre view (paper: 20 clips x 4 "
        "views). Accuracies in percent; paper numbers are "
        "Karpathy et al. 2014 on Sports-1M (Table 1) and UCF-101 (transfer tables, Sec. 4.2), so "
        "they show "
        "the paper's *ordering*, not values a small synthetic set should reach.",
        "",
        f"Chance: {_pct(results['chance']['pretrain'])} (pretrain set, "
        f"{results['chance']['pretrain_classes']} classes), "
        f"{_pct(results['chance'].get('transfer'))} (transfer set).",
        "",
        "## Table 1 analogue (paper: Table 1, Sports-1M)",
        "",
        "| model | clip hit@1 | video hit@1 | video hit@5 | paper clip@1 | paper video@1 "
        "| paper video@5 | clips/s | train s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["table1"]:
        paper = PAPER_TABLE1[r["key"]]
        cps = "-" if r.get("clips_per_s") is None else f"{r['clips_per_s']:,.0f}"
        train_s = "-" if r.get("train_seconds") is None else f"{r['train_seconds']:.0f}"
        lines.append(
            f"| {r['label']} | {_pct(r['clip_hit1'])} | {_pct(r['video_hit1'])} | "
            f"{_pct(r['video_hit5'])} | {_paper(paper[0])} | {_paper(paper[1])} | "
            f"{_paper(paper[2])} | {cps} | {train_s} |")
    lines += [
        "",
        f"clips/s: inference of the network alone on ready inputs, batch "
        f"{results['timing']['batch']}, {results['timing']['device']}; for the baseline, "
        "feature extraction + classification on uint8 clips (CPU). The CNN average's figure is "
        "the harmonic combination of its four networks (they all run per clip).",
        "",
        f"![Table 1]({plots.get('table1', '')})",
        "",
    ]
    if results.get("transfer"):
        groups = results["transfer_groups"]
        lines += [
            "## Transfer (paper: UCF-101 transfer and per-group tables, Sec. 4.2)",
            "",
            "Slow fusion on the transfer set: from scratch, or starting from the pretrain-set "
            "network with the top layer / top 3 layers / all layers trained (lower layers "
            "frozen). Per-group numbers are video accuracy; the paper's are mAP.",
            "",
            "| setting | clip hit@1 | video hit@1 | video hit@5 | paper (UCF-101 acc) | "
            + " | ".join(groups) + " |",
            "|---|---:|---:|---:|---:|" + "---:|" * len(groups),
        ]
        for r in results["transfer"]:
            g = " | ".join(_pct(r["groups"].get(name)) for name in groups)
            lines.append(
                f"| {r['label']} | {_pct(r['clip_hit1'])} | {_pct(r['video_hit1'])} | "
                f"{_pct(r['video_hit5'])} | {_paper(PAPER_TRANSFER.get(r['key']))} | {g} |")
        lines += [
            "",
            "Paper per group (mAP, scratch / fine-tune top 3 / fine-tune top): "
            + "; ".join(f"{k} {a:.2f}/{b:.2f}/{c:.2f}" for k, (a, b, c) in PAPER_GROUPS.items())
            + ".",
            "",
            f"![Transfer]({plots.get('transfer', '')})",
            "",
        ]
    if results.get("motion"):
        m = results["motion"]
        lines += [
            "## Motion contribution (paper: Sec. 4.1, per-class slow fusion vs single frame)",
            "",
            "Per-class average precision (AP, as in the paper) of slow fusion and single frame "
            "on the pretrain test set, and the change in per-class video accuracy. Paper "
            f"(per-class AP on Sports-1M): {PAPER_MOTION}.",
            "",
            "| class kind | classes | AP single | AP slow | AP slow - single "
            "| accuracy slow - single |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for kind, k in m["by_kind"].items():
            lines.append(f"| {kind} | {k['classes']} | {k['single']:.2f} | {k['slow']:.2f} | "
                         f"{k['gain']:+.2f} | {100 * k['acc_gain']:+.1f} |")
        lines += ["", "| class | kind | AP single | AP slow | AP slow - single "
                  "| accuracy slow - single |", "|---|---|---:|---:|---:|---:|"]
        for c in sorted(m["per_class"], key=lambda c: -c["gain"]):
            lines.append(f"| {c['class']} | {c['kind']} | {c['single']:.2f} | {c['slow']:.2f} | "
                         f"{c['gain']:+.2f} | {100 * c['acc_gain']:+.1f} |")
        lines += ["", f"![Motion contribution]({plots.get('motion', '')})", ""]
    if results.get("observations"):
        lines += ["## What differs from the paper", ""]
        lines += [f"- {o}" for o in results["observations"]]
        lines.append("")
    lines += ["## Setup", "", "```", json.dumps(setup, indent=2, default=str), "```", ""]
    return "\n".join(lines)


def write_plots(results: dict[str, Any], out_dir: Path, stem: str) -> dict[str, str]:
    """PNG plots beside the report; returns name -> file name (relative to out_dir)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, str] = {}
    rows = results["table1"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    x = range(len(rows))
    labels = [r["label"].replace(" (single+early+late+slow)", "") for r in rows]
    for ax, (key, idx, title) in zip(axes, (("video_hit1", 1, "video hit@1"),
                                            ("clip_hit1", 0, "clip hit@1")), strict=True):
        ours = [100 * (r[key] or 0) for r in rows]
        paper = [PAPER_TABLE1[r["key"]][idx] or 0 for r in rows]
        ax.bar([i - 0.2 for i in x], ours, 0.4, label="measured (synthetic)")
        ax.bar([i + 0.2 for i in x], paper, 0.4, label="paper (Sports-1M)")
        ax.axhline(100 * results["chance"]["pretrain"], color="grey", ls="--", lw=1,
                   label="chance")
        ax.set_xticks(list(x), labels, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel(f"{title} (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"Table 1 analogue: {title}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    out["table1"] = f"{stem}-table1.png"
    fig.savefig(out_dir / out["table1"], dpi=90)
    plt.close(fig)

    if results.get("transfer"):
        groups = results["transfer_groups"]
        fig, ax = plt.subplots(figsize=(10, 4))
        n = len(results["transfer"])
        w = 0.8 / n
        for i, r in enumerate(results["transfer"]):
            ax.bar([g + (i - (n - 1) / 2) * w for g in range(len(groups))],
                   [100 * (r["groups"].get(name) or 0) for name in groups], w, label=r["label"])
        ax.set_xticks(range(len(groups)), groups, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("video hit@1 (%)")
        ax.set_ylim(0, 100)
        ax.set_title("Transfer set: accuracy per class group")
        ax.legend(fontsize=7)
        fig.tight_layout()
        out["transfer"] = f"{stem}-transfer.png"
        fig.savefig(out_dir / out["transfer"], dpi=90)
        plt.close(fig)

    if results.get("motion"):
        per_class = sorted(results["motion"]["per_class"], key=lambda c: -c["gain"])
        colours = {"motion": "tab:red", "appearance": "tab:blue", "both": "tab:purple"}
        fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(per_class)), 4))
        ax.bar(range(len(per_class)), [c["gain"] for c in per_class],
               color=[colours.get(c["kind"], "tab:grey") for c in per_class])
        ax.set_xticks(range(len(per_class)), [c["class"] for c in per_class], rotation=60,
                      ha="right", fontsize=7)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_ylabel("AP slow fusion - AP single frame")
        ax.set_title("Motion contribution per class (red: motion-only, blue: appearance-only, "
                     "purple: both)", fontsize=9)
        fig.tight_layout()
        out["motion"] = f"{stem}-motion.png"
        fig.savefig(out_dir / out["motion"], dpi=90)
        plt.close(fig)
    return out


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

@dataclass
class Split:
    """A dataset split as vidconv.train takes it (folder root or list file, plus a video root
    for list files); `.source` opens it once for the loaders used here."""

    data: str
    root: str | None = None
    _source: Any = None

    @property
    def source(self) -> Any:
        if self._source is None:
            from vidconv.data import open_source

            self._source = open_source(self.data, root=self.root)
        return self._source

    @property
    def classes(self) -> list[str]:
        return list(self.source.classes)


@dataclass
class Data:
    """Train/test splits of the pretrain (Table 1) and transfer sets, and class metadata."""

    pretrain_train: Split
    pretrain_test: Split
    transfer_train: Split | None
    transfer_test: Split | None
    kinds: dict[str, str]  # pretrain class -> "motion" | "appearance" | "both" (synthetic only)
    groups: dict[str, str]  # transfer class -> group
    pretrain_groups: dict[str, str]  # pretrain class -> group
    summary: str


def _sizes(split: Split) -> str:
    return f"{len(split.classes)} classes, {len(split.source.videos)} videos"


def synthetic_data(work_dir: Path, scale: Scale, seed: int) -> Data:
    """Write (or reuse) the synthetic benchmark under work_dir and open its four splits."""
    from vidconv.data import synthetic

    bench = synthetic.write_benchmark(work_dir, seed=seed, **scale.synthetic)
    pre, tra = bench["pretrain"], bench["transfer"]
    d = Data(Split(str(pre["train"])), Split(str(pre["test"])), Split(str(tra["train"])),
             Split(str(tra["test"])), dict(pre["kinds"]), dict(tra["groups"]),
             dict(pre["groups"]), "")
    d.summary = (f"vidconv synthetic benchmark (seed {seed}, {scale.synthetic}): pretrain "
                 f"{_sizes(d.pretrain_train)} train / {len(d.pretrain_test.source.videos)} test; "
                 f"transfer {_sizes(d.transfer_train)} train / "
                 f"{len(d.transfer_test.source.videos)} test")  # type: ignore[union-attr]
    return d


def list_data(train_list: str, test_list: str, root: str | None, name: str) -> Data:
    """A Sports-1M-style or UCF-101-style pair of list files (a classInd.txt beside them names
    the classes; see vidconv.data.VideoList)."""
    train, test = Split(train_list, root), Split(test_list, root)
    if train.classes != test.classes:
        raise ValueError(f"train and test lists must share a class index, got "
                         f"{len(train.classes)} and {len(test.classes)} classes")
    return Data(train, test, None, None, {}, {}, {},
                f"{name}: {_sizes(train)} train / {len(test.source.videos)} test")


def ucf101_data(root: str, splits: str, fold: int) -> Data:
    """UCF-101 with the official split files (trainlist0F.txt, testlist0F.txt, classInd.txt)."""
    splits_dir = Path(splits)
    files = [splits_dir / f"trainlist0{fold}.txt", splits_dir / f"testlist0{fold}.txt",
             splits_dir / "classInd.txt"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ValueError(f"--splits must hold the official UCF-101 split files; missing: "
                         f"{', '.join(missing)}")
    return list_data(str(files[0]), str(files[1]), root, f"UCF-101 fold {fold}")


# --------------------------------------------------------------------------------------------
# Networks: training, scores, timing (training and metrics are vidconv.train's)
# --------------------------------------------------------------------------------------------

@dataclass
class Settings:
    """What every network run shares."""

    scale: Scale
    device: torch.device
    seed: int
    work_dir: Path
    progress: bool


# Our schedule, not the paper's (SGD at 1e-3 for a month): short CPU runs need an adaptive
# optimiser to get anywhere in a few epochs.
TRAIN_FIELDS: dict[str, Any] = {"optimizer": "adamw", "lr": 2e-3, "weight_decay": 5e-4,
                                "schedule": "cosine", "dropout": 0.2}


def _train_fields(s: Settings, epochs: int) -> dict[str, Any]:
    # The training loader draws one random clip per video per pass (its epoch), so an epoch of
    # `train_clips_per_video` clips per video (the baseline's) is that many loader passes.
    passes = epochs * s.scale.train_clips_per_video
    # overwrite: a rerun with the same --work-dir retrains its runs (only the data is reused)
    return {**TRAIN_FIELDS, "batch_size": s.scale.batch_size, "epochs": passes,
            "device": str(s.device), "seed": s.seed, "progress": False, "overwrite": True,
            "checkpoint_every": 10**9, "log_every": 10**9, "width": s.scale.width}


def train_net(row: Row, split: Split, s: Settings) -> tuple[torch.nn.Module, str, float]:
    """Train one Table 1 network with vidconv.train; returns (network, checkpoint, seconds)."""
    from vidconv.train import TrainConfig, train
    from vidconv.train.checkpoint import load_model

    fields = _train_fields(s, s.scale.epochs)
    config = TrainConfig(data=split.data, root=split.root, out=str(s.work_dir / "runs" / row.key),
                         model=row.model, multires=row.multires, stream=row.stream, **fields)
    summary = train(config)
    net, _, _ = load_model(summary["checkpoint"], device=str(s.device))
    return net, str(summary["checkpoint"]), float(summary["elapsed_s"])


def finetune_net(checkpoint: str, mode: str, split: Split, s: Settings
                 ) -> tuple[torch.nn.Module, float]:
    """Fine-tune (or, mode "scratch", retrain) a checkpoint's network with vidconv.train."""
    from vidconv.train import finetune
    from vidconv.train.checkpoint import load_model

    fields = _train_fields(s, s.scale.transfer_epochs)
    fields.pop("width")  # the checkpoint's architecture decides
    summary = finetune(checkpoint, split.data, mode=mode, root=split.root,
                       out=str(s.work_dir / "runs" / f"transfer-{mode}"), **fields)
    net, _, _ = load_model(summary["checkpoint"], device=str(s.device))
    return net, float(summary["elapsed_s"])


def clip_scores(net: torch.nn.Module, split: Split, s: Settings) -> dict[str, torch.Tensor]:
    """Softmax scores of the evaluation clips (evenly spaced, centre view) of every video."""
    from vidconv.data import ClipLoader

    loader = ClipLoader(split.source, net.spec, batch_size=s.scale.batch_size, train=False,
                        clips_per_video=s.scale.eval_clips_per_video, views=1,
                        device=str(s.device))
    net.eval()
    scores, labels, index = [], [], []
    with torch.inference_mode():
        for batch in loader:
            scores.append(torch.softmax(net(batch.inputs).float(), dim=1).cpu())
            labels.append(batch.labels.cpu())
            index.append(batch.video_index.cpu())
    return {"scores": torch.cat(scores), "labels": torch.cat(labels),
            "video_index": torch.cat(index)}


def report(sc: dict[str, torch.Tensor], classes: list[str],
           groups: dict[str, str] | None) -> dict[str, Any]:
    """The evaluation report (vidconv.train.metrics; per video = mean of clip softmax)."""
    from vidconv.baselines import report_from_scores
    from vidconv.train.metrics import video_scores

    means, present = video_scores(sc["scores"], sc["video_index"])
    video_labels = torch.zeros(len(present), dtype=torch.int64)
    video_labels[sc["video_index"]] = sc["labels"]
    return report_from_scores(sc["scores"], sc["labels"], means[present].float(),
                              video_labels[present], classes, groups or None)


def net_clips_per_s(net: torch.nn.Module, s: Settings, batch: int) -> float:
    """Inference throughput of the network on random inputs of its own clip shape."""
    spec = net.spec
    net.eval()
    shape = (batch, 3, spec.frames, spec.size, spec.size)
    if spec.multires and spec.stream == "both":
        x: Any = (torch.randn(shape, device=s.device), torch.randn(shape, device=s.device))
    else:
        x = torch.randn(shape, device=s.device)
    with torch.inference_mode():
        t = time_fn(lambda: net(x), s.device, warmup=2, repeats=5)
    return batch / (t["median_ms"] * 1e-3)


def ensemble(all_scores: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Average the clip scores of several networks: clips are matched by video and by their
    position among that video's evaluation clips (each network's clips are evenly spaced over
    the same video, so the k-th clip of a video is at about the same place for all)."""
    def keyed(sc: dict[str, torch.Tensor]) -> dict[tuple[int, int], int]:
        seen: dict[int, int] = {}
        keys = {}
        for i, v in enumerate(sc["video_index"].tolist()):
            k = seen.get(v, 0)
            seen[v] = k + 1
            keys[(v, k)] = i
        return keys

    maps = [keyed(sc) for sc in all_scores]
    common = sorted(set.intersection(*(set(m) for m in maps)))
    if not common:
        raise ValueError("the networks' evaluation clips share no (video, clip) positions")
    idx = [torch.tensor([m[k] for k in common]) for m in maps]
    probs = torch.stack([sc["scores"][i] for sc, i in zip(all_scores, idx, strict=True)]).mean(0)
    first = all_scores[0]
    return {"scores": probs, "labels": first["labels"][idx[0]],
            "video_index": first["video_index"][idx[0]]}


# --------------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------------

def _hits(rep: dict[str, Any]) -> dict[str, float | None]:
    # video_hit5 is None with 5 classes or fewer (it could not be below 1 there)
    return {k: None if rep[k] is None else float(rep[k])
            for k in ("clip_hit1", "video_hit1", "video_hit5")}


def run_baseline(train: Split, test: Split, s: Settings,
                 groups: dict[str, str] | None) -> dict[str, Any]:
    from vidconv.baselines import BaselineConfig, evaluate_baseline, train_baseline

    t0 = time.perf_counter()
    model = train_baseline(train.source, BaselineConfig(words=s.scale.words, seed=s.seed),
                           clips_per_video=s.scale.train_clips_per_video, seed=s.seed,
                           progress=s.progress)
    seconds = time.perf_counter() - t0
    rep = evaluate_baseline(model, test.source, clips_per_video=s.scale.eval_clips_per_video,
                            groups=groups or None, progress=s.progress)
    return {**rep, "train_seconds": seconds, "device": "cpu"}


def run_table1(data: Data, s: Settings, timing_batch: int
               ) -> tuple[list[dict[str, Any]], dict[str, str], dict[str, dict[str, Any]]]:
    """Every Table 1 row; returns the rows, the networks' checkpoints and the per-row
    reports."""
    classes = list(data.pretrain_train.classes)
    rows: list[dict[str, Any]] = []
    reports: dict[str, dict[str, Any]] = {}
    scores: dict[str, dict[str, torch.Tensor]] = {}
    checkpoints: dict[str, str] = {}
    bar = progress(TABLE1_ROWS, desc="Table 1", unit="model")
    for row in bar:
        bar.set_postfix_str(row.key)
        out: dict[str, Any] = {"key": row.key, "label": row.label}
        if row.key == "baseline":
            rep = run_baseline(data.pretrain_train, data.pretrain_test, s, data.pretrain_groups)
            out.update({**_hits(rep), "clips_per_s": rep["clips_per_s"],
                        "train_seconds": rep["train_seconds"]})
            reports[row.key] = rep
        elif row.key == "average":
            sc = ensemble([scores[k] for k in AVERAGED])
            rep = report(sc, classes, data.pretrain_groups)
            # All four networks run on every clip: their times add up.
            cps = 1.0 / sum(1.0 / next(r["clips_per_s"] for r in rows if r["key"] == k)
                            for k in AVERAGED)
            out.update({**_hits(rep), "clips_per_s": cps, "train_seconds": None})
            reports[row.key] = rep
        else:
            net, ckpt, seconds = train_net(row, data.pretrain_train, s)
            checkpoints[row.key] = ckpt
            sc = clip_scores(net, data.pretrain_test, s)
            rep = report(sc, classes, data.pretrain_groups)
            out.update({**_hits(rep), "clips_per_s": net_clips_per_s(net, s, timing_batch),
                        "train_seconds": seconds,
                        "params": net.complexity()["params"], "macs": net.complexity()["macs"]})
            scores[row.key], reports[row.key] = sc, rep
        rows.append(out)
    return rows, checkpoints, reports


def run_transfer(data: Data, checkpoint: str, s: Settings) -> list[dict[str, Any]]:
    """Slow fusion on the transfer set: from scratch (same architecture, random init), and
    fine-tuned from the pretrain-set checkpoint."""
    assert data.transfer_train is not None and data.transfer_test is not None
    classes = data.transfer_train.classes
    groups = data.groups or None
    rows: list[dict[str, Any]] = []
    bar = progress(TRANSFER_ROWS, desc="Transfer", unit="setting")
    for key, label in bar:
        bar.set_postfix_str(key)
        if key == "baseline":
            rep = run_baseline(data.transfer_train, data.transfer_test, s, groups)
            seconds = rep["train_seconds"]
        else:
            net, seconds = finetune_net(checkpoint, key, data.transfer_train, s)
            rep = report(clip_scores(net, data.transfer_test, s), classes, groups)
        rows.append({"key": key, "label": label, **_hits(rep), "mean_ap": rep["mean_ap"],
                     "groups": {**(rep.get("groups") or {}), "all": rep["video_hit1"]},
                     "groups_ap": {**(rep.get("groups_ap") or {}), "all": rep["mean_ap"]},
                     "train_seconds": seconds})
    return rows


def motion_contribution(data: Data, reports: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per-class average precision (the paper's measure) and video accuracy of slow fusion minus
    single frame, and their means per class kind."""
    classes = data.pretrain_train.classes
    single, slow = reports["single"], reports["slow"]
    per_class = []
    for i, c in enumerate(classes):
        per_class.append({
            "class": c, "kind": data.kinds.get(c, "-"),
            "single": float(single["per_class_ap"][i]), "slow": float(slow["per_class_ap"][i]),
            "gain": float(slow["per_class_ap"][i]) - float(single["per_class_ap"][i]),
            "acc_gain": float(slow["per_class"][i]) - float(single["per_class"][i]),
        })
    by_kind: dict[str, dict[str, Any]] = {}
    for kind in sorted({c["kind"] for c in per_class}):
        cs = [c for c in per_class if c["kind"] == kind]
        by_kind[kind] = {key: sum(c[key] for c in cs) / len(cs)
                         for key in ("single", "slow", "gain", "acc_gain")}
        by_kind[kind]["classes"] = len(cs)
    return {"per_class": per_class, "by_kind": by_kind}


def observations(results: dict[str, Any]) -> list[str]:
    """Plain statements of where the measured ordering agrees or disagrees with the paper."""
    t1 = {r["key"]: r for r in results["table1"]}
    obs = []

    def cmp(a: str, b: str, what: str, paper_says: bool) -> None:
        ours = t1[a]["video_hit1"] > t1[b]["video_hit1"]
        tie = abs(t1[a]["video_hit1"] - t1[b]["video_hit1"]) < 1e-9
        verdict = "tie" if tie else ("agrees" if ours == paper_says else "DIFFERS")
        obs.append(f"{what}: {t1[a]['label']} {_pct(t1[a]['video_hit1'])} vs {t1[b]['label']} "
                   f"{_pct(t1[b]['video_hit1'])} video hit@1 (paper: "
                   f"{PAPER_TABLE1[a][1]} vs {PAPER_TABLE1[b][1]}) -> {verdict}")

    cmp("slow", "single", "slow fusion vs single frame", True)
    cmp("slow", "early", "slow vs early fusion", True)
    cmp("slow", "late", "slow vs late fusion", True)
    cmp("single_multires", "single", "multires vs full resolution", True)
    cmp("context", "fovea", "context vs fovea stream", True)
    # the paper's average beats each of its four networks: compare with our best one
    best = max(("single", "early", "late", "slow"), key=lambda k: t1[k]["video_hit1"])
    cmp("average", best, "CNN average vs best single network", True)
    cmp("single", "baseline", "single-frame CNN vs feature histograms", True)
    m = results.get("motion")
    if m and "motion" in m["by_kind"]:
        k = m["by_kind"]
        others = [v["gain"] for kind, v in k.items() if kind != "motion"]
        rest = ", ".join(f"{kind} {v['gain']:+.2f}" for kind, v in k.items()
                         if kind != "motion")
        verdict = (" -> motion classes gain most, as in the paper"
                   if others and k["motion"]["gain"] > max(others)
                   else " -> not the largest gain: DIFFERS")
        obs.append(f"motion-only classes: slow fusion changes per-class AP by "
                   f"{k['motion']['gain']:+.2f} over single frame (other classes: {rest})"
                   f"{verdict}")
    tr = {r["key"]: r for r in results.get("transfer") or []}
    if tr:
        best_ft = max(("top", "top3", "all"), key=lambda k: tr[k]["video_hit1"])
        ft, sc = tr[best_ft]["video_hit1"], tr["scratch"]["video_hit1"]
        verdict = (" -> pretraining helps, as in the paper" if ft > sc
                   else " -> pretraining does not help here: DIFFERS")
        obs.append(f"transfer: best fine-tuning is '{best_ft}' (paper: top 3 layers); "
                   f"fine-tuned {_pct(ft)} vs scratch {_pct(sc)}{verdict}")
    return obs


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Outputs: <out-dir>/paper_tables-<mode>-<device>.{md,json} and PNG plots.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--tiny", action="store_true",
                      help="smoke run: smallest synthetic set, ~2 min on 2 CPU cores")
    mode.add_argument("--quick", action="store_true",
                      help="the test suite's and CI's run: small synthetic set, ~6 min on "
                           "2 CPU cores")
    p.add_argument("--dataset", choices=("synthetic", "ucf101", "list"), default="synthetic")
    p.add_argument("--root", default=None, help="video root (ucf101 / list datasets)")
    p.add_argument("--splits", default=None,
                   help="ucf101: folder with trainlist0N.txt, testlist0N.txt, classInd.txt")
    p.add_argument("--fold", type=int, default=1, choices=(1, 2, 3), help="ucf101 split")
    p.add_argument("--train-list", default=None, help="list dataset: training list file")
    p.add_argument("--test-list", default=None, help="list dataset: test list file")
    p.add_argument("--pretrained", default=None,
                   help="real data: a slow-fusion checkpoint (e.g. from a Sports-1M-style run) "
                        "to fine-tune for the transfer table")
    p.add_argument("--width", type=float, default=None, help="network width (overrides mode)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (overrides mode)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default=None,
                   help="where synthetic videos and checkpoints go (default: a temp folder)")
    p.add_argument("--out-dir", default=str(RESULTS_DIR), help="report, JSON and plots")
    p.add_argument("--timing-batch", type=int, default=None,
                   help="batch for the clips/s figures (default 8 on CPU, 64 on GPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's); on a small shared CPU, 1 "
                        "is often faster for these narrow networks")
    p.add_argument("--no-progress", action="store_true", help="no inner progress bars")
    args = p.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    return args


def load_data(args: argparse.Namespace, scale: Scale, work_dir: Path) -> Data:
    if args.dataset == "synthetic":
        return synthetic_data(work_dir / "synthetic", scale, args.seed)
    if args.dataset == "ucf101":
        if not args.root or not args.splits:
            raise SystemExit("--dataset ucf101 needs --root (videos) and --splits (split files)")
        return ucf101_data(args.root, args.splits, args.fold)
    if not args.train_list or not args.test_list:
        raise SystemExit("--dataset list needs --train-list and --test-list (and usually --root)")
    return list_data(args.train_list, args.test_list, args.root, "list")


def run(args: argparse.Namespace) -> dict[str, Any]:
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    scale = SCALES[mode]
    if args.width is not None:
        scale.width = args.width
    if args.epochs is not None:
        scale.epochs = scale.transfer_epochs = args.epochs
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    timing_batch = args.timing_batch or (64 if device.type == "cuda" else 8)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vidconv-paper-") as tmp:
        work_dir = Path(args.work_dir) if args.work_dir else Path(tmp)
        s = Settings(scale, device, args.seed, work_dir, not args.no_progress)
        data = load_data(args, scale, work_dir)
        n_pre = len(data.pretrain_train.classes)
        table1, checkpoints, reports = run_table1(data, s, timing_batch)
        results: dict[str, Any] = {
            "table1": table1,
            "chance": {"pretrain": 1.0 / n_pre, "pretrain_classes": n_pre},
            "timing": {"batch": timing_batch, "device": device_name(device)},
        }
        if data.kinds:
            results["motion"] = motion_contribution(data, reports)
        transfer_data = data
        pretrained = checkpoints["slow"]
        if data.transfer_train is None and args.pretrained:
            # Real data: the list/UCF-101 set is the transfer target of a given checkpoint.
            transfer_data = Data(data.pretrain_train, data.pretrain_test, data.pretrain_train,
                                 data.pretrain_test, {}, dict(data.pretrain_groups), {},
                                 data.summary)
            pretrained = args.pretrained
        if transfer_data.transfer_train is not None:
            results["transfer"] = run_transfer(transfer_data, pretrained, s)
            results["transfer_groups"] = list(dict.fromkeys(
                [*sorted(set(transfer_data.groups.values())), "all"]))
            results["chance"]["transfer"] = 1.0 / len(transfer_data.transfer_train.classes)
        results["setup"] = {"mode": mode, **asdict(scale), "device": str(device),
                            "seed": args.seed, "dataset": args.dataset,
                            "dataset_summary": data.summary,
                            "wall_seconds": round(time.perf_counter() - t0, 1)}
    results["device_info"] = device_info(device)
    results["observations"] = observations(results)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = run(args)
    mode = results["setup"]["mode"]
    device = torch.device(results["setup"]["device"])
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"paper_tables-{mode}-{device_slug(device)}"
    plots = write_plots(results, out_dir, stem)
    results["plots"] = plots
    (out_dir / f"{stem}.md").write_text(markdown_report(results, plots))
    payload = {k: v for k, v in results.items() if k != "device_info"}
    write_json(f"paper_tables-{mode}", payload, path=out_dir / f"{stem}.json", device=device)
    for o in results["observations"]:
        print(o)
    print(f"report: {out_dir / (stem + '.md')}")
    print_table([{k: r.get(k) for k in ("label", "clip_hit1", "video_hit1", "video_hit5",
                                         "clips_per_s")} for r in results["table1"]],
                title=f"Table 1 analogue ({mode}, {device_name(device)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
