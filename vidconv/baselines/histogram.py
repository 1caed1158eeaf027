"""Visual vocabularies, bag-of-words histograms and the classifier on top.

Paper (Sec. 4.1): every local feature type is quantised with k-means into a vocabulary, words are
accumulated into histograms over spatial pyramid cells, and a classifier is trained on the
concatenated histograms ("feature histograms + neural net": 55.3% video hit@1 on Sports-1M,
59.0% on UCF-101). Ours: one MiniBatchKMeans vocabulary per feature type, a 1x1 + 2x2 spatial
pyramid, each type's histogram L1-normalised and square-rooted (the Hellinger map, which lets a
linear classifier compare histograms sensibly), then a linear SVM or a one-hidden-layer MLP.

A *clip histogram* pools the words of one clip; a *video histogram* pools the word counts of all
of a video's clips (the paper classifies video-level histograms).
"""

from __future__ import annotations

import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vidconv.baselines.features import FEATURE_TYPES, FeatureConfig, clip_descriptors, patch_regions

CLASSIFIERS = ("linear", "mlp")


@dataclass(frozen=True)
class BaselineConfig:
    """Everything that defines a feature-histogram baseline.

    words: vocabulary size per feature type (the paper used 1,000 per type on Sports-1M; small
        synthetic sets need far fewer).
    pyramid: spatial pyramid levels (1 = whole frame, 2 = quadrants).
    classifier: "linear" (linear SVM, one-vs-rest) or "mlp" (one hidden layer of `hidden`).
    max_descriptors: descriptors per type sampled to fit each vocabulary.
    """

    features: tuple[str, ...] = FEATURE_TYPES
    words: int = 128
    pyramid: tuple[int, ...] = (1, 2)
    classifier: str = "linear"
    C: float = 1.0
    hidden: int = 256
    max_descriptors: int = 40_000
    seed: int = 0
    feature: FeatureConfig = field(default_factory=FeatureConfig)

    def __post_init__(self) -> None:
        if self.classifier not in CLASSIFIERS:
            raise ValueError(f"classifier must be one of {CLASSIFIERS}, got {self.classifier!r}")
        bad = [f for f in self.features if f not in FEATURE_TYPES]
        if bad or not self.features:
            raise ValueError(
                f"features must be a non-empty subset of {FEATURE_TYPES}, got {self.features}"
            )
        if self.words < 2:
            raise ValueError(f"words must be >= 2, got {self.words}")
        if not self.pyramid or min(self.pyramid) < 1:
            raise ValueError(f"pyramid levels must be >= 1, got {self.pyramid}")


class FeatureHistogramBaseline:
    """Local features -> k-means words -> pyramid histograms -> linear SVM / MLP.

    Typical use::

        model = FeatureHistogramBaseline(BaselineConfig(words=64))
        counts = model.fit(train_clips_u8, train_labels)          # clips: (N, T, H, W, 3) uint8
        scores = model.decision_function(model.counts(test_clips_u8))
    """

    def __init__(self, config: BaselineConfig | None = None) -> None:
        self.config = config or BaselineConfig()
        self.centers: dict[str, torch.Tensor] = {}
        self.classifier: Any = None
        self.num_classes: int | None = None
        self._regions = self._region_index()

    # -- words -------------------------------------------------------------------------------
    def _region_index(self) -> torch.Tensor:
        """(levels, G*G) pyramid-cell index of every patch, offset so that cells of all levels
        share one index space."""
        cfg = self.config
        rows, offset = [], 0
        for level in cfg.pyramid:
            rows.append(patch_regions(cfg.feature, level) + offset)
            offset += level * level
        self._num_regions = offset
        return torch.stack(rows)

    def fit_vocabulary(self, descriptors: dict[str, torch.Tensor]) -> None:
        """Fit one MiniBatchKMeans vocabulary per feature type on a random sample."""
        from sklearn.cluster import MiniBatchKMeans

        cfg = self.config
        gen = torch.Generator().manual_seed(cfg.seed)
        for name in cfg.features:
            d = descriptors[name].reshape(-1, descriptors[name].shape[-1])
            if d.shape[0] > cfg.max_descriptors:
                d = d[torch.randperm(d.shape[0], generator=gen)[: cfg.max_descriptors]]
            if d.shape[0] < cfg.words:
                raise ValueError(
                    f"need at least words={cfg.words} descriptors of type {name!r} to fit the "
                    f"vocabulary, got {d.shape[0]}"
                )
            km = MiniBatchKMeans(n_clusters=cfg.words, random_state=cfg.seed, n_init=3,
                                 batch_size=2048)
            km.fit(d.numpy())
            self.centers[name] = torch.from_numpy(km.cluster_centers_).float()

    def counts_from_descriptors(self, descriptors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Raw word counts (N, types * regions * words) of every clip (before normalisation,
        so that clip counts can be summed into video counts)."""
        if not self.centers:
            raise RuntimeError("the vocabulary is not fitted: call fit() or fit_vocabulary()")
        cfg = self.config
        g2 = cfg.feature.grid**2
        parts = []
        for name in cfg.features:
            d = descriptors[name]
            n, m, _ = d.shape
            words = torch.cdist(d.reshape(-1, d.shape[-1]), self.centers[name]).argmin(1)
            words = words.view(n, m)
            # The patch index within its frame decides the pyramid cell.
            patch = torch.arange(m) % g2
            hist = torch.zeros(n, self._num_regions * cfg.words)
            for level_regions in self._regions:
                index = level_regions[patch][None, :] * cfg.words + words
                hist.scatter_add_(1, index, torch.ones_like(index, dtype=hist.dtype))
            parts.append(hist)
        return torch.cat(parts, dim=1)

    def counts(self, clips: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Word counts of uint8 clips (N, T, H, W, 3)."""
        return self.counts_from_descriptors(
            clip_descriptors(clips, self.config.feature, self.config.features)
        )

    def normalize(self, counts: torch.Tensor) -> np.ndarray:
        """Per feature type and pyramid level: L1 normalise, then square root (Hellinger)."""
        cfg = self.config
        blocks = []
        per_type = self._num_regions * cfg.words
        for i in range(len(cfg.features)):
            h = counts[:, i * per_type:(i + 1) * per_type]
            start = 0
            for level in cfg.pyramid:
                width = level * level * cfg.words
                b = h[:, start:start + width]
                blocks.append((b / b.sum(1, keepdim=True).clamp_min(1.0)).sqrt())
                start += width
        return torch.cat(blocks, dim=1).numpy()

    # -- classifier --------------------------------------------------------------------------
    def fit(self, clips: torch.Tensor | np.ndarray | None, labels: torch.Tensor | np.ndarray,
            *, counts: torch.Tensor | None = None,
            descriptors: dict[str, torch.Tensor] | None = None,
            num_classes: int | None = None) -> torch.Tensor:
        """Fit vocabulary and classifier on training clips; returns their word counts.

        Pass `clips` (uint8), or precomputed `descriptors` (from `clip_descriptors`).
        `counts` may be given with an already fitted vocabulary to refit only the classifier.
        """
        labels_np = np.asarray(torch.as_tensor(labels).cpu(), dtype=np.int64)
        if counts is None:
            if descriptors is None:
                if clips is None:
                    raise ValueError("fit needs clips, descriptors or counts, got none")
                descriptors = clip_descriptors(clips, self.config.feature, self.config.features)
            self.fit_vocabulary(descriptors)
            counts = self.counts_from_descriptors(descriptors)
        if counts.shape[0] != labels_np.shape[0]:
            raise ValueError(
                f"labels must have one entry per clip ({counts.shape[0]}), got {labels_np.shape[0]}"
            )
        self.num_classes = int(num_classes or labels_np.max() + 1)
        self.classifier = self._make_classifier()
        self.classifier.fit(self.normalize(counts), labels_np)
        return counts

    def _make_classifier(self) -> Any:
        cfg = self.config
        if cfg.classifier == "linear":
            from sklearn.svm import LinearSVC

            return LinearSVC(C=cfg.C, random_state=cfg.seed, max_iter=5000)
        from sklearn.neural_network import MLPClassifier

        return MLPClassifier(hidden_layer_sizes=(cfg.hidden,), alpha=1e-3, max_iter=400,
                             random_state=cfg.seed)

    def decision_function(self, counts: torch.Tensor) -> torch.Tensor:
        """Class scores (N, num_classes) of word counts; classes absent from training score
        -inf, so a hit@k never picks them."""
        if self.classifier is None or self.num_classes is None:
            raise RuntimeError("the classifier is not fitted: call fit() first")
        x = self.normalize(counts)
        if self.config.classifier == "linear":
            raw = self.classifier.decision_function(x)
        else:
            raw = np.log(np.clip(self.classifier.predict_proba(x), 1e-12, None))
        known = self.classifier.classes_
        if raw.ndim == 1:  # binary problem: sklearn gives the positive-class margin only
            raw = np.stack([-raw, raw], axis=1)
        scores = torch.full((x.shape[0], self.num_classes), float("-inf"))
        scores[:, torch.as_tensor(known)] = torch.from_numpy(np.asarray(raw, dtype=np.float32))
        return scores

    # -- persistence -------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Pickle the fitted baseline (config, vocabularies, classifier)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"config": asdict(self.config), "centers": self.centers,
                 "classifier": self.classifier, "num_classes": self.num_classes,
                 "extra": getattr(self, "extra", {})}
        with open(path, "wb") as f:
            pickle.dump(state, f)
        return path

    @classmethod
    def load(cls, path: str | Path) -> FeatureHistogramBaseline:
        """Load a baseline written by `save` (a pickle: load only files you trust)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"baseline not found: {path}")
        try:
            with open(path, "rb") as f:
                state = pickle.load(f)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure: not a baseline
            raise ValueError(f"{path} is not a readable vidconv baseline: {exc}") from exc
        if not isinstance(state, dict) or not {"config", "centers", "classifier"} <= set(state):
            raise ValueError(f"{path} is not a vidconv baseline (written by "
                             "`vidconv baseline train`)")
        cfg = dict(state["config"])
        fdict = dict(cfg.pop("feature"))
        fdict["speed_thresholds"] = tuple(fdict["speed_thresholds"])
        feature = FeatureConfig(**fdict)
        cfg["features"] = tuple(cfg["features"])
        cfg["pyramid"] = tuple(cfg["pyramid"])
        model = cls(BaselineConfig(**cfg, feature=feature))
        model.centers = state["centers"]
        model.classifier = state["classifier"]
        model.num_classes = state["num_classes"]
        model.extra = state.get("extra", {})
        return model
