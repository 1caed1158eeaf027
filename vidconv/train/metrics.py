"""Clip- and video-level metrics of the paper: hit@k, per-video score averaging, per-class
accuracy and average precision, confusion matrices, accuracy per class group.

All functions take plain tensors (scores ``(N, C)``, integer labels ``(N,)``) so the baselines and
the CNN report with the same code.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch


def _check_scores(scores: torch.Tensor, labels: torch.Tensor) -> None:
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        raise ValueError(f"scores must be a (N, C) tensor, got "
                         f"{tuple(scores.shape) if isinstance(scores, torch.Tensor) else scores!r}")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
        raise ValueError("labels must be a 1-D integer tensor")
    if labels.shape[0] != scores.shape[0]:
        raise ValueError(f"scores has {scores.shape[0]} rows but labels has {labels.shape[0]}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= scores.shape[1]):
        raise ValueError(f"labels must lie in [0, {scores.shape[1]}), got range "
                         f"[{int(labels.min())}, {int(labels.max())}]")


def hit_at_k(scores: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Fraction of rows whose true label is among the `k` highest scores (paper's hit@k).

    Ties are broken towards the lower class index (torch.topk order); k >= C counts every row.
    """
    _check_scores(scores, labels)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if scores.shape[0] == 0:
        return float("nan")
    k = min(k, scores.shape[1])
    top = scores.topk(k, dim=1).indices
    return (top == labels[:, None]).any(dim=1).float().mean().item()


def video_scores(
    scores: torch.Tensor, video_index: torch.Tensor, num_videos: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Average the clip scores of each video: ``(V, C)`` means and a ``(V,)`` mask of videos
    that had at least one clip (videos the loader skipped have none)."""
    if scores.dim() != 2 or video_index.dim() != 1 or video_index.shape[0] != scores.shape[0]:
        raise ValueError(f"scores (N, C) and video_index (N,) must match, got "
                         f"{tuple(scores.shape)} and {tuple(video_index.shape)}")
    if num_videos is None:
        num_videos = int(video_index.max()) + 1 if video_index.numel() else 0
    sums = torch.zeros(num_videos, scores.shape[1], dtype=torch.float64)
    sums.index_add_(0, video_index.long(), scores.double())
    counts = torch.bincount(video_index.long(), minlength=num_videos).double()
    present = counts > 0
    means = sums / counts.clamp(min=1)[:, None]
    return means, present


def confusion_matrix(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(C, C)`` counts; row = true class, column = predicted class."""
    idx = labels.long() * num_classes + pred.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes,
                                                                           num_classes)


def per_class_accuracy(confusion: torch.Tensor) -> list[float]:
    """Recall of each class from a confusion matrix; NaN for classes without samples."""
    totals = confusion.sum(dim=1).double()
    correct = confusion.diagonal().double()
    return [float(c / t) if t > 0 else float("nan") for c, t in zip(correct, totals, strict=True)]


def average_precision(scores: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """One-vs-rest average precision of each class (the paper's per-class AP / mAP); NaN for a
    class without positives. Ties are ordered by index (stable sort)."""
    _check_scores(scores, labels)
    aps: list[float] = []
    for c in range(scores.shape[1]):
        positive = labels == c
        n_pos = int(positive.sum())
        if n_pos == 0:
            aps.append(float("nan"))
            continue
        order = torch.sort(scores[:, c], descending=True, stable=True).indices
        hits = positive[order].double()
        precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1, dtype=torch.float64)
        aps.append(float((precision * hits).sum() / n_pos))
    return aps


def nanmean(values: Sequence[float]) -> float:
    """Mean of the non-NaN values (NaN if none)."""
    kept = [v for v in values if v == v]
    return sum(kept) / len(kept) if kept else float("nan")


def group_means(
    per_class: Sequence[float], classes: Sequence[str], groups: Mapping[str, str]
) -> dict[str, float]:
    """Mean of a per-class metric over each group of a class -> group mapping.

    Raises:
        ValueError: a class of the mapping is not one of `classes` (likely a typo or the wrong
            dataset); classes missing from the mapping land in group "(none)".
    """
    unknown = sorted(set(groups) - set(classes))
    if unknown:
        raise ValueError(f"groups names classes that are not in the dataset: {unknown[:10]}"
                         f"{' ...' if len(unknown) > 10 else ''}; dataset classes: "
                         f"{list(classes)[:10]}")
    members: dict[str, list[float]] = {}
    for name, value in zip(classes, per_class, strict=True):
        members.setdefault(groups.get(name, "(none)"), []).append(value)
    return {g: nanmean(v) for g, v in sorted(members.items())}


def video_group_accuracy(
    pred: torch.Tensor, labels: torch.Tensor, classes: Sequence[str], groups: Mapping[str, str]
) -> dict[str, float]:
    """Video accuracy over the videos of each group's classes (every video weighs the same)."""
    group_of = [groups.get(c, "(none)") for c in classes]
    out: dict[str, list[int]] = {}
    for p, y in zip(pred.tolist(), labels.tolist(), strict=True):
        out.setdefault(group_of[y], []).append(int(p == y))
    return {g: sum(v) / len(v) for g, v in sorted(out.items())}


def to_json_safe(value: Any) -> Any:
    """NaN / inf -> None (standard JSON), tuples -> lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: to_json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json_safe(v) for v in value]
    return value
