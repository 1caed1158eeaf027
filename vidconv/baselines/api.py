"""Train and evaluate the feature-histogram baseline on a video source.

Same protocol and report as the CNNs (`vidconv.train.evaluate`): training clips sampled at random
positions, evaluation on `clips_per_video` evenly spaced clips per video; clip hit@1 scores each
clip on its own; video hit@1 / hit@5 classify the video-level histogram (word counts of all the
video's clips pooled, as in the paper), or average clip scores with ``video_pooling="scores"``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch

from vidconv.baselines.data import ClipSet, baseline_spec, load_clips
from vidconv.baselines.histogram import BaselineConfig, FeatureHistogramBaseline
from vidconv.clip import ClipSpec

VIDEO_POOLING = ("histogram", "scores")


def _video_rows(values: torch.Tensor, video_index: torch.Tensor,
                reduce: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum or mean `values` over the clips of each video; returns (videos, per-video rows)."""
    videos, inverse = torch.unique(video_index, return_inverse=True)
    out = torch.zeros(len(videos), values.shape[1], dtype=values.dtype)
    out.index_add_(0, inverse, values)
    if reduce == "mean":
        out /= torch.bincount(inverse, minlength=len(videos)).unsqueeze(1).to(values.dtype)
    return videos, out


def baseline_scores(model: FeatureHistogramBaseline, clips: ClipSet, *,
                    video_pooling: str = "histogram", counts: torch.Tensor | None = None,
                    ) -> dict[str, torch.Tensor]:
    """Clip and video class scores of the clips in `clips`.

    Returns clip_scores (N, C), video_scores (V, C), video_labels (V,), videos (V,) (indices
    into the source's videos, ascending).
    """
    if video_pooling not in VIDEO_POOLING:
        raise ValueError(f"video_pooling must be one of {VIDEO_POOLING}, got {video_pooling!r}")
    if counts is None:
        counts = model.counts(clips.clips)
    clip_scores = model.decision_function(counts)
    if video_pooling == "histogram":
        videos, video_counts = _video_rows(counts, clips.video_index, "sum")
        video_scores = model.decision_function(video_counts)
    else:
        finite = torch.where(clip_scores.isfinite(), clip_scores, torch.zeros(()))
        videos, video_scores = _video_rows(finite, clips.video_index, "mean")
        video_scores[:, ~clip_scores.isfinite().all(0)] = float("-inf")
    first: dict[int, int] = {}
    for v, lbl in zip(clips.video_index.tolist(), clips.labels.tolist(), strict=True):
        first.setdefault(v, lbl)
    video_labels = torch.tensor([first[int(v)] for v in videos.tolist()], dtype=torch.int64)
    return {"clip_scores": clip_scores, "video_scores": video_scores,
            "video_labels": video_labels, "videos": videos}


def report_from_scores(clip_scores: torch.Tensor, clip_labels: torch.Tensor,
                       video_scores: torch.Tensor, video_labels: torch.Tensor,
                       classes: list[str], groups: Mapping[str, str] | None = None
                       ) -> dict[str, Any]:
    """The evaluation report of `vidconv.train.evaluate` (same keys: clip_hit1, video_hit1,
    video_hit5 (None with 5 classes or fewer, the reason under not_applicable), mean_ap,
    per_class, per_class_ap, confusion, groups, groups_ap, classes), built with
    vidconv.train.metrics from clip scores and video scores.

    groups: class name -> group name (as for `vidconv.train.evaluate`).
    """
    from vidconv.train import metrics as M
    from vidconv.train.evaluation import hit5_fields

    num_classes = len(classes) if classes else video_scores.shape[1]
    pred = video_scores.argmax(1)
    confusion = M.confusion_matrix(pred, video_labels, num_classes)
    per_class_ap = M.average_precision(video_scores, video_labels)
    report: dict[str, Any] = {
        "classes": list(classes),
        "num_videos": int(video_labels.shape[0]),
        "num_clips": int(clip_labels.shape[0]),
        "clip_hit1": M.hit_at_k(clip_scores, clip_labels, 1),
        "video_hit1": M.hit_at_k(video_scores, video_labels, 1),
        **hit5_fields(video_scores, video_labels),
        "mean_ap": M.nanmean(per_class_ap),
        "per_class": M.per_class_accuracy(confusion),
        "per_class_ap": per_class_ap,
        "confusion": confusion.tolist(),
    }
    if groups:
        report["groups"] = M.video_group_accuracy(pred, video_labels, classes, groups)
        report["groups_ap"] = M.group_means(per_class_ap, classes, groups)
    return report


def train_baseline(source: Any, config: BaselineConfig | None = None, *,
                   spec: ClipSpec | None = None, clips_per_video: int = 4, seed: int = 0,
                   progress: bool = False) -> FeatureHistogramBaseline:
    """Fit vocabulary and classifier on `clips_per_video` random clips of every video."""
    config = config or BaselineConfig(seed=seed)
    spec = spec or baseline_spec()
    t0 = time.perf_counter()
    data = load_clips(source, spec, train=True, clips_per_video=clips_per_video, seed=seed,
                      progress=progress, desc="baseline train clips")
    model = FeatureHistogramBaseline(config)
    model.fit(data.clips, data.labels, num_classes=len(data.classes))
    model.extra = {"classes": data.classes, "spec": spec, "train_clips": len(data.labels),
                   "train_seconds": time.perf_counter() - t0}
    return model


def evaluate_baseline(model: FeatureHistogramBaseline, source: Any, *,
                      spec: ClipSpec | None = None, clips_per_video: int = 20,
                      groups: Mapping[str, str] | None = None,
                      video_pooling: str = "histogram", progress: bool = False
                      ) -> dict[str, Any]:
    """The evaluation report of `model` on `source`, plus clips_per_s (feature extraction and
    classification, not decoding: the CNN figure likewise times the model on ready inputs)."""
    spec = spec or getattr(model, "extra", {}).get("spec") or baseline_spec()
    data = load_clips(source, spec, train=False, clips_per_video=clips_per_video,
                      progress=progress, desc="baseline eval clips")
    model_classes = getattr(model, "extra", {}).get("classes")
    if model_classes is not None and list(model_classes) != data.classes:
        # Score in the model's class order; a class it never saw is an error, not a silent
        # relabelling (the same rule as vidconv.train.evaluate).
        from vidconv.train.evaluation import label_map

        mapping = torch.tensor(label_map(data.classes, model_classes), dtype=torch.int64)
        data = ClipSet(data.clips, mapping[data.labels], data.video_index, list(model_classes),
                       data.loader_report)
    t0 = time.perf_counter()
    counts = model.counts(data.clips)
    scores = baseline_scores(model, data, video_pooling=video_pooling, counts=counts)
    seconds = time.perf_counter() - t0
    report = report_from_scores(scores["clip_scores"], data.labels, scores["video_scores"],
                                scores["video_labels"], data.classes, groups)
    from vidconv.train.data import skipped_count
    from vidconv.train.metrics import to_json_safe

    report["clips_per_s"] = len(data.labels) / seconds
    # the same keys, meaning the same, as vidconv.train.evaluate's report
    report["clips"] = clips_per_video
    report["views"] = 1
    report["skipped_videos"] = skipped_count(data.loader_report)
    report["loader_report"] = data.loader_report
    return to_json_safe(report)  # NaN (a class with no test video) -> null, as there
