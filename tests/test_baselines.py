"""The feature-histogram baseline: descriptors, vocabulary, classifier, loader path and CLI."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vidconv.baselines import (
    BaselineConfig,
    FeatureConfig,
    FeatureHistogramBaseline,
    baseline_scores,
    clip_descriptors,
    to_uint8,
)
from vidconv.baselines.data import ClipSet

pytest.importorskip("sklearn")


# These small networks share CI's 2 cores with the loader's decoding threads.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def toy_clips(n: int, seed: int, frames: int = 8, size: int = 72) -> tuple[torch.Tensor,
                                                                          torch.Tensor]:
    """Four classes: a red or blue square (appearance) moving up or down (motion), on noise,
    starting anywhere; class = 2 * colour + direction."""
    g = torch.Generator().manual_seed(seed)
    clips = torch.randint(60, 100, (n, frames, size, size, 3), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % 4
    for i in range(n):
        c = int(labels[i])
        colour = torch.tensor([210, 40, 40] if c < 2 else [40, 40, 210], dtype=torch.uint8)
        step = 2 if c % 2 == 0 else -2
        y0, x0 = (int(v) for v in torch.randint(18, size - 30, (2,), generator=g))
        for t in range(frames):
            y = y0 + step * (t - frames // 2)
            clips[i, t, y:y + 12, x0:x0 + 12] = colour
    return clips, labels


def test_descriptor_shapes_and_ranges() -> None:
    cfg = FeatureConfig(frame_size=48, cell=8)
    clips, _ = toy_clips(2, 0, frames=5)
    d = clip_descriptors(clips, cfg)
    g2 = cfg.grid**2
    assert cfg.grid == 5
    dims = cfg.dims()
    assert d["hog"].shape == (2, 5 * g2, dims["hog"])
    assert d["colour"].shape == (2, 5 * g2, dims["colour"])
    assert d["motion"].shape == (2, 4 * g2, dims["motion"])
    # HOG blocks are unit length (or zero on flat patches); colour histograms sum to 1 before the
    # square root; motion histograms to at most 1.
    norms = d["hog"].norm(dim=-1)
    assert torch.all(((norms - 1).abs() < 1e-4) | (norms < 1))
    torch.testing.assert_close(d["colour"].pow(2).sum(-1), torch.ones(2, 5 * g2))
    assert float(d["motion"].pow(2).sum(-1).max()) <= 1.0 + 1e-5


def test_motion_descriptor_sees_direction_and_appearance_ignores_it() -> None:
    """A pattern moving right and its time-reversed copy (moving left) have the same frames, so
    identical HOG/colour bags, but different motion descriptors."""
    clips, _ = toy_clips(1, 3, frames=6)
    x = torch.arange(72).float()
    stripes = (127 + 100 * torch.sin(x[None, :] / 3 + 0.0 * x[:, None])).to(torch.uint8)
    frames = torch.stack([torch.roll(stripes, 2 * t, dims=1) for t in range(6)])
    right = frames[..., None].expand(6, 72, 72, 3).contiguous()
    left = right.flip(0)
    dr, dl = clip_descriptors(right), clip_descriptors(left)
    for name in ("hog", "colour"):  # same frames, different order: same multiset
        a = dr[name][0].sort(0).values
        b = dl[name][0].sort(0).values
        torch.testing.assert_close(a, b)
    gap = (dr["motion"][0].mean(0) - dl["motion"][0].mean(0)).abs().sum()
    assert gap > 0.5
    del clips


def test_clip_descriptors_rejects_bad_input() -> None:
    with pytest.raises(TypeError, match="uint8"):
        clip_descriptors(torch.zeros(2, 4, 32, 32, 3))
    with pytest.raises(ValueError, match="RGB"):
        clip_descriptors(torch.zeros(2, 4, 32, 32, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="at least 2 frames"):
        clip_descriptors(torch.zeros(2, 1, 64, 64, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="features"):
        clip_descriptors(torch.zeros(1, 2, 64, 64, 3, dtype=torch.uint8), features=("sift",))
    with pytest.raises(ValueError, match="classifier"):
        BaselineConfig(classifier="svm-rbf")


@pytest.mark.parametrize("classifier", ["linear", "mlp"])
def test_baseline_beats_chance_on_appearance_and_motion(classifier: str) -> None:
    train, ytrain = toy_clips(48, 1)
    test, ytest = toy_clips(24, 2)
    model = FeatureHistogramBaseline(BaselineConfig(words=24, classifier=classifier, hidden=64))
    model.fit(train, ytrain)
    pred = model.decision_function(model.counts(test)).argmax(1)
    colour_acc = ((pred // 2) == (ytest // 2)).float().mean().item()
    acc = (pred == ytest).float().mean().item()
    assert colour_acc >= 0.9  # appearance classes: nearly perfect
    assert acc >= 0.75  # chance is 0.25


def test_motion_features_alone_separate_directions() -> None:
    train, ytrain = toy_clips(40, 4)
    test, ytest = toy_clips(24, 5)
    model = FeatureHistogramBaseline(BaselineConfig(words=16, features=("motion",)))
    model.fit(train, ytrain % 2)
    pred = model.decision_function(model.counts(test)).argmax(1)
    assert (pred == ytest % 2).float().mean().item() >= 0.9


def test_deterministic_and_save_load_roundtrip(tmp_path) -> None:
    train, ytrain = toy_clips(24, 6)
    test, _ = toy_clips(8, 7)
    cfg = BaselineConfig(words=12, seed=3)
    a, b = FeatureHistogramBaseline(cfg), FeatureHistogramBaseline(cfg)
    a.fit(train, ytrain)
    b.fit(train, ytrain)
    sa = a.decision_function(a.counts(test))
    torch.testing.assert_close(sa, b.decision_function(b.counts(test)))
    c = FeatureHistogramBaseline.load(a.save(tmp_path / "b.pkl"))
    assert c.config == a.config
    torch.testing.assert_close(c.decision_function(c.counts(test)), sa)


def test_unseen_classes_score_minus_inf_and_video_pooling() -> None:
    train, ytrain = toy_clips(24, 8)
    model = FeatureHistogramBaseline(BaselineConfig(words=12))
    model.fit(train, ytrain, num_classes=6)  # classes 4, 5 have no training clips
    videos = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    clips = ClipSet(train[:8], videos.clone(), videos, [])
    for pooling in ("histogram", "scores"):
        s = baseline_scores(model, clips, video_pooling=pooling)
        assert s["clip_scores"].shape == (8, 6) and s["video_scores"].shape == (4, 6)
        assert torch.isinf(s["clip_scores"][:, 4:]).all()
        assert torch.isinf(s["video_scores"][:, 4:]).all()
        assert torch.isfinite(s["video_scores"][:, :4]).all()
        torch.testing.assert_close(s["video_labels"], torch.arange(4))
    # A video's histogram is the sum of its clips' word counts.
    counts = model.counts(clips.clips)
    torch.testing.assert_close(model.decision_function(counts[0:2].sum(0, keepdim=True)),
                               baseline_scores(model, clips)["video_scores"][:1])


def test_to_uint8_inverts_loader_normalisation() -> None:
    from vidconv.ops import crop_normalize

    g = torch.Generator().manual_seed(0)
    clips = torch.randint(0, 256, (2, 3, 40, 40, 3), generator=g, dtype=torch.uint8)
    x = crop_normalize(clips, 32, offsets=(4, 4), flip=False)
    back = to_uint8(x)
    torch.testing.assert_close(back, clips[:, :, 4:36, 4:36])
    with pytest.raises(ValueError, match="inputs"):
        to_uint8(torch.zeros(2, 3, 4, 4))


def test_pyramid_regions_cover_quadrants() -> None:
    from vidconv.baselines.features import patch_regions

    cfg = FeatureConfig()
    r = patch_regions(cfg, 2).view(cfg.grid, cfg.grid)
    assert r[0, 0] == 0 and r[0, -1] == 1 and r[-1, 0] == 2 and r[-1, -1] == 3
    counts = np.bincount(r.flatten().numpy())
    assert len(counts) == 4 and counts.min() >= math.floor(cfg.grid / 2) ** 2


def test_report_has_the_cnn_report_keys() -> None:
    pytest.importorskip("vidconv.train.metrics")
    from vidconv.baselines import report_from_scores

    clip_scores = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0], [0.0, 2.0, 1.0],
                                [1.0, 2.0, 0.0]])
    clip_labels = torch.tensor([0, 0, 1, 2])
    video_scores = torch.tensor([[1.0, 1.0, 1.5], [0.0, 2.0, 1.0], [1.0, 2.0, 0.0]])
    video_labels = torch.tensor([0, 1, 2])
    rep = report_from_scores(clip_scores, clip_labels, video_scores, video_labels,
                             ["a", "b", "c"], {"a": "g1", "b": "g1", "c": "g2"})
    assert rep["clip_hit1"] == pytest.approx(0.5)
    assert rep["video_hit1"] == pytest.approx(1 / 3)
    assert rep["video_hit5"] is None  # 3 classes: every label is in the top 5
    assert "3 classes" in rep["not_applicable"]["video_hit5"]
    assert rep["per_class"] == [0.0, 1.0, 0.0]
    assert rep["confusion"] == [[0, 0, 1], [0, 1, 0], [0, 1, 0]]
    assert rep["groups"] == {"g1": 0.5, "g2": 0.0}
    assert set(rep["groups_ap"]) == {"g1", "g2"} and 0 <= rep["mean_ap"] <= 1


def test_report_hit5_with_six_classes() -> None:
    pytest.importorskip("vidconv.train.metrics")
    from vidconv.baselines import report_from_scores

    scores = torch.eye(6)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])  # the last video's true class scored lowest
    scores[5] = torch.tensor([0.0, 5.0, 4.0, 3.0, 2.0, 1.0])
    rep = report_from_scores(scores, labels, scores, labels, list("abcdef"))
    assert rep["video_hit5"] == pytest.approx(5 / 6) and "not_applicable" not in rep


def test_baseline_prints_fractions_like_evaluate(capsys: pytest.CaptureFixture[str]) -> None:
    from vidconv.baselines.cli import _print_report

    _print_report({"num_videos": 4, "num_clips": 8, "clip_hit1": 0.625, "video_hit1": 0.75,
                   "video_hit5": None, "mean_ap": 0.8125, "clips_per_s": 120.0,
                   "not_applicable": {"video_hit5": "4 classes: every label is in the top 5"},
                   "groups": {"g1": 0.5}})
    out = capsys.readouterr().out
    assert "%" not in out
    assert "clip hit@1 0.625  video hit@1 0.750  video hit@5 -  mAP 0.812" in out
    assert "video_hit5: not applicable (4 classes" in out and "group g1: video hit@1 0.500" in out
