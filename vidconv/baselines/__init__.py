"""The paper's non-CNN baseline: local feature histograms with a classifier on top.

Karpathy et al. 2014 compare their CNNs with "feature histograms + neural net" (Table 1: 55.3%
video hit@1 on Sports-1M; 59.0% on UCF-101). `FeatureHistogramBaseline` is our small-scale
version: HOG-like, colour and frame-difference motion descriptors per frame
(`vidconv.baselines.features`), MiniBatchKMeans vocabularies and pyramid histograms with a linear
SVM or MLP (`vidconv.baselines.histogram`), trained and evaluated on a video source with the same
clip protocol and report as the CNNs (`vidconv.baselines.api`); `vidconv baseline train|evaluate`
on the command line (`vidconv.baselines.cli`). scikit-learn is needed to fit and predict.
"""

from vidconv.baselines.api import (
    baseline_scores,
    evaluate_baseline,
    report_from_scores,
    train_baseline,
)
from vidconv.baselines.data import ClipSet, baseline_spec, load_clips, to_uint8
from vidconv.baselines.features import FEATURE_TYPES, FeatureConfig, clip_descriptors
from vidconv.baselines.histogram import BaselineConfig, FeatureHistogramBaseline

__all__ = [
    "FEATURE_TYPES",
    "BaselineConfig",
    "ClipSet",
    "FeatureConfig",
    "FeatureHistogramBaseline",
    "baseline_scores",
    "baseline_spec",
    "clip_descriptors",
    "evaluate_baseline",
    "load_clips",
    "report_from_scores",
    "to_uint8",
    "train_baseline",
]
