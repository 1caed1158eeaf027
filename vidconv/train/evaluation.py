"""Video-level evaluation with the paper's protocol, and the motion-contribution comparison.

Protocol (Sec. 4.1): 20 clips per video, each seen in 4 views (crops and flips), the softmax
scores of all clips and views averaged per video; clip hit@1 counts every (clip, view) on its
own, video hit@1 / hit@5 use the averaged scores.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vidconv.train import data as train_data
from vidconv.train import metrics
from vidconv.train.checkpoint import load_model, model_info
from vidconv.train.data import loader_report, skipped_count, to_device
from vidconv.train.device import resolve_device
from vidconv.train.log import Progress
from vidconv.train.metrics import to_json_safe


def load_groups(groups: Mapping[str, str] | str | Path | None) -> dict[str, str] | None:
    """A class -> group mapping from a dict or a JSON file. The file may also map
    group -> [classes]; both forms are accepted."""
    if groups is None:
        return None
    if isinstance(groups, str | Path):
        path = Path(groups)
        if not path.is_file():
            raise FileNotFoundError(f"groups file not found: {path}")
        try:
            groups = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"groups file {path} is not valid JSON: {exc}") from exc
    if not isinstance(groups, Mapping):
        raise ValueError(f"groups must map class -> group, got {type(groups).__name__}")
    out: dict[str, str] = {}
    for key, value in groups.items():
        if isinstance(value, list):
            for cls in value:
                out[str(cls)] = str(key)
        else:
            out[str(key)] = str(value)
    return out


def label_map(dataset_classes: Sequence[str], model_classes: Sequence[str]) -> list[int]:
    """For each dataset class, its index among the model's classes.

    Raises:
        ValueError: naming the dataset classes the model does not know.
    """
    index = {c: i for i, c in enumerate(model_classes)}
    unknown = [c for c in dataset_classes if c not in index]
    if unknown:
        raise ValueError(
            f"the dataset has {len(unknown)} class(es) the model does not know: {unknown[:10]}"
            f"{' ...' if len(unknown) > 10 else ''}; the checkpoint's {len(model_classes)} "
            f"classes are {list(model_classes)[:10]}{' ...' if len(model_classes) > 10 else ''}"
        )
    return [index[c] for c in dataset_classes]


def video_hit5(vscores: torch.Tensor, vlabels: torch.Tensor) -> tuple[float | None, str | None]:
    """Video hit@5, or None and the reason when it cannot fail: with 5 classes or fewer every
    label is among the top 5, so the figure would be 1.0 whatever the model."""
    num_classes = vscores.shape[1]
    if num_classes <= 5:
        return None, f"{num_classes} classes: every label is in the top 5"
    return metrics.hit_at_k(vscores, vlabels, 5), None


def hit5_fields(vscores: torch.Tensor, vlabels: torch.Tensor) -> dict[str, Any]:
    """``video_hit5`` for a report, and ``not_applicable`` {metric: reason} when it is None."""
    value, why = video_hit5(vscores, vlabels)
    fields: dict[str, Any] = {"video_hit5": value}
    if why is not None:
        fields["not_applicable"] = {"video_hit5": why}
    return fields


@torch.no_grad()
def evaluate(
    model_or_ckpt: nn.Module | str | Path,
    data: str | Path | Any,
    *,
    root: str | Path | None = None,
    clips: int = 20,
    views: int = 4,
    batch_size: int = 32,
    device: str = "auto",
    groups: Mapping[str, str] | str | Path | None = None,
    classes: Sequence[str] | None = None,
    out: str | Path | None = None,
    plots: bool = True,
    progress: bool = True,
    backend: str = "auto",
    workers: int = 0,
    worker_type: str = "thread",
) -> dict[str, Any]:
    """Evaluate a model (or a checkpoint path) on a dataset with the paper's protocol: `clips`
    evenly spaced clips per video, each in `views` crops/flips, class scores averaged per video.

    Returns the report (also written to `out`/report.json, with PNG plots, if `out` is given):
    ``num_videos``, ``num_clips``, ``clips``, ``views``, ``clip_hit1``, ``video_hit1``,
    ``video_hit5``, ``mean_ap``, ``per_class`` (video accuracy), ``per_class_ap``,
    ``confusion`` (rows: true class), ``groups`` / ``groups_ap`` (with `groups`),
    ``skipped_videos`` and ``loader_report``; numbers that do not exist (a class with no
    test video) are None. ``video_hit5`` is None with 5 classes or fewer (it could not be
    below 1), and ``not_applicable`` then maps it to that reason.

    Raises:
        ValueError: the dataset has classes the model does not know, or a bare model's class
            count differs from the dataset's and `classes` is not given.
    """
    for name, value in (("clips", clips), ("views", views), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    dev = resolve_device(device)
    # The checkpoint first: a missing or incompatible checkpoint is the error to report even
    # when the dataset is also wrong, and reading it is cheaper than probing every video.
    from_checkpoint = isinstance(model_or_ckpt, str | Path)
    if from_checkpoint:
        model, model_classes, _ = load_model(model_or_ckpt, dev)
    else:
        model = model_or_ckpt.to(dev)
    if hasattr(data, "videos"):
        source = data
    else:
        source = train_data.open_data(str(data), None if root is None else str(root))
    if not from_checkpoint:
        if classes is None:
            if model.num_classes != len(source.classes):
                raise ValueError(f"the model has {model.num_classes} classes but the dataset "
                                 f"{len(source.classes)}; pass classes= (the model's class names)")
            classes = source.classes
        model_classes = list(classes)
    was_training = model.training
    model.eval()
    mapping = torch.tensor(label_map(source.classes, model_classes), dtype=torch.long)
    group_map = load_groups(groups)

    loader = train_data.make_loader(source, model.spec, batch_size=batch_size, train=False,
                                    device=dev, backend=backend, clips_per_video=clips,
                                    views=views, workers=workers,
                                    worker_type=worker_type)
    channels_last = dev.type == "cuda"
    if channels_last:
        model.to(memory_format=torch.channels_last_3d)
    all_scores, all_labels, all_videos = [], [], []
    # without the bar, a line at every tenth of the batches
    shown = Progress(total=len(loader), initial=0, desc=f"eval {model.variant}", bar=progress,
                     enabled=True, unit="batch")
    every = max(1, len(loader) // 10)
    for done, batch in enumerate(loader, 1):
        shown.update(1)
        if not progress and (done % every == 0 or done == len(loader)):
            shown.report(done)
        inputs = to_device(batch.inputs, dev, channels_last)
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16,
                            enabled=dev.type == "cuda"):
            logits = model(inputs)
        all_scores.append(logits.float().softmax(1).cpu())
        all_labels.append(mapping[batch.labels.cpu()])
        all_videos.append(batch.video_index.cpu())
    shown.close()
    if was_training:
        model.train()
    num_classes = len(model_classes)
    if not all_scores:
        raise ValueError("no clip could be read from the dataset (see the loader report: "
                         f"{loader_report(loader)})")
    scores = torch.cat(all_scores)
    labels = torch.cat(all_labels)
    videos = torch.cat(all_videos)

    num_videos = len(source.videos)
    vscores, present = metrics.video_scores(scores, videos, num_videos)
    vlabels = mapping[torch.tensor([v.label for v in source.videos], dtype=torch.long)]
    vscores, vlabels = vscores[present], vlabels[present]
    vpred = vscores.argmax(1)
    confusion = metrics.confusion_matrix(vpred, vlabels, num_classes)
    per_class = metrics.per_class_accuracy(confusion)
    per_class_ap = metrics.average_precision(vscores, vlabels)
    report: dict[str, Any] = {
        "model": model_info(model),
        "classes": list(model_classes),
        "num_videos": int(present.sum()),
        "num_clips": int(scores.shape[0]),
        "clips": clips,
        "views": views,
        "clip_hit1": metrics.hit_at_k(scores, labels, 1),
        "video_hit1": metrics.hit_at_k(vscores, vlabels, 1),
        **hit5_fields(vscores, vlabels),
        "mean_ap": metrics.nanmean(per_class_ap),
        "per_class": per_class,
        "per_class_ap": per_class_ap,
        "confusion": confusion.tolist(),
    }
    if group_map is not None:
        report["groups"] = metrics.video_group_accuracy(vpred, vlabels, model_classes, group_map)
        report["groups_ap"] = metrics.group_means(per_class_ap, model_classes, group_map)
    lrep = loader_report(loader)
    report["skipped_videos"] = skipped_count(lrep)
    report["loader_report"] = lrep
    report = to_json_safe(report)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=2))
        if plots:
            try:
                from vidconv.train.plots import plot_confusion, plot_per_class

                plot_per_class(report, out / "per_class.png")
                plot_confusion(report, out / "confusion.png")
            except ImportError as exc:
                warnings.warn(f"no plots written: {exc}", stacklevel=2)
    return report


def _read_report(report: Mapping[str, Any] | str | Path, which: str) -> dict[str, Any]:
    if isinstance(report, str | Path):
        path = Path(report)
        if path.is_dir():
            path = path / "report.json"
        if not path.is_file():
            raise FileNotFoundError(f"{which}: report not found: {path}")
        report = json.loads(path.read_text())
    for key in ("classes", "per_class"):
        if key not in report:
            raise ValueError(f"{which}: not an evaluation report (no {key!r})")
    return dict(report)


def compare(
    a: Mapping[str, Any] | str | Path,
    b: Mapping[str, Any] | str | Path,
    *,
    names: tuple[str, str] = ("A", "B"),
    out: str | Path | None = None,
    top: int = 10,
    metric: str = "auto",
) -> dict[str, Any]:
    """Per-class difference B - A (the paper's motion-contribution analysis: A = single frame,
    B = a multi-frame model). `metric`: "ap" (per-class average precision, as the paper),
    "accuracy", or "auto" (AP when both reports have it).
    """
    names = tuple(names)
    if len(names) != 2 or names[0] == names[1] or {"class", "diff"} & set(names):
        raise ValueError(f"names must be two different labels other than 'class' and 'diff', "
                         f"got {names!r}")
    ra, rb = _read_report(a, names[0]), _read_report(b, names[1])
    if list(ra["classes"]) != list(rb["classes"]):
        only_a = sorted(set(ra["classes"]) - set(rb["classes"]))
        only_b = sorted(set(rb["classes"]) - set(ra["classes"]))
        raise ValueError(f"the two reports have different classes (only in {names[0]}: "
                         f"{only_a[:10]}, only in {names[1]}: {only_b[:10]}"
                         f"{', same set in another order' if not only_a and not only_b else ''})")
    if metric not in ("auto", "ap", "accuracy"):
        raise ValueError(f"metric must be 'auto', 'ap' or 'accuracy', got {metric!r}")
    if metric == "auto":
        metric = "ap" if ra.get("per_class_ap") and rb.get("per_class_ap") else "accuracy"
    key = "per_class_ap" if metric == "ap" else "per_class"
    va, vb = ra.get(key), rb.get(key)
    if va is None or vb is None:
        raise ValueError(f"metric={metric!r} needs {key!r} in both reports")
    classes = list(ra["classes"])
    rows = []
    for cls, x, y in zip(classes, va, vb, strict=True):
        # a class with no test video has no score (None, or NaN in older/other reports)
        known = x is not None and y is not None and math.isfinite(x) and math.isfinite(y)
        diff = y - x if known else None
        rows.append({"class": cls, names[0]: x, names[1]: y, "diff": diff})
    valid = [r for r in rows if r["diff"] is not None]
    gains = sorted(valid, key=lambda r: (-r["diff"], r["class"]))[:top]
    losses = sorted(valid, key=lambda r: (r["diff"], r["class"]))[:top]
    result = {
        "names": list(names),
        "metric": metric,
        "classes": classes,
        "diff": [r["diff"] for r in rows],
        "rows": rows,
        "gains": [r for r in gains if r["diff"] > 0],
        "losses": [r for r in losses if r["diff"] < 0],
        "mean_a": metrics.nanmean([v for v in va if v is not None]),
        "mean_b": metrics.nanmean([v for v in vb if v is not None]),
    }
    result = to_json_safe(result)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.json").write_text(json.dumps(result, indent=2))
        from vidconv.train.plots import plot_compare

        plot_compare(result, out / "compare.png", top=top)
    return result
