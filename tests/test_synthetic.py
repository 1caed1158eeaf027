"""vidconv.data.synthetic: deterministic renders and files, real decodable videos, the layout and
manifest, and classes that are what they claim (motion-only pairs look the same frame by frame
but move differently; appearance-only pairs look different)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av")
from vidconv.data import synthetic as S  # noqa: E402

FRAMES, SIZE = 24, 64


def decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def videos(name: str, k: int = 4, frames: int = FRAMES, **kw) -> list[np.ndarray]:
    """Videos 0..k-1 of one class; the same scenes for every class (matched by index)."""
    return [S.render(name, frames=frames, size=SIZE, seed=11, index=i, **kw) for i in range(k)]


def colour_hist(vs: list[np.ndarray], bins: int = 8) -> np.ndarray:
    """Per-frame colour histogram (bins per channel), averaged over frames and videos."""
    h = [np.stack([np.bincount(f[..., c].ravel() // (256 // bins), minlength=bins)
                   for c in range(3)]) for v in vs for f in v]
    return np.mean(h, 0) / (SIZE * SIZE)


def hist_distance(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return float(np.abs(colour_hist(a) - colour_hist(b)).sum() / 3)  # in [0, 2]


def edge_orientations(vs: list[np.ndarray], bins: int = 8) -> np.ndarray:
    """Histogram of strong-edge orientations (mod 180 degrees), weighted by gradient size."""
    out = []
    for v in vs:
        # The strongest channel per pixel: a lime object on grey barely shows in luminance.
        gy, gx = np.gradient(v.astype(np.float32), axis=(1, 2))
        mag = np.hypot(gx, gy)
        pick = mag.argmax(-1)[..., None]
        gx, gy, mag = (np.take_along_axis(x, pick, -1)[..., 0] for x in (gx, gy, mag))
        b = np.minimum((np.arctan2(gy, gx) % np.pi / np.pi * bins).astype(int), bins - 1)
        w = mag * (mag > 30)
        out.append(np.bincount(b.ravel(), weights=w.ravel(), minlength=bins) / w.sum())
    return np.mean(out, 0)


def global_flow(v: np.ndarray) -> np.ndarray:
    """Least-squares translation (vx, vy) per frame pair, from brightness constancy on the
    pixels that change: (T - 1, 2) pixels per frame."""
    g = v.astype(np.float64).mean(-1)
    it, mid = g[1:] - g[:-1], (g[1:] + g[:-1]) / 2
    iy, ix = np.gradient(mid, axis=(1, 2))
    w = np.abs(it) > 2
    out = []
    for t in range(len(it)):
        a = np.array([[np.sum(w[t] * ix[t] ** 2), np.sum(w[t] * ix[t] * iy[t])],
                      [np.sum(w[t] * ix[t] * iy[t]), np.sum(w[t] * iy[t] ** 2)]])
        rhs = -np.array([np.sum(w[t] * ix[t] * it[t]), np.sum(w[t] * iy[t] * it[t])])
        out.append(np.linalg.lstsq(a, rhs, rcond=None)[0])
    return np.array(out)


def motion_stats(name: str) -> dict[str, float]:
    """Motion of the object alone (no camera motion, clutter or noise)."""
    vs = videos(name, frames=32, camera=0.0, clutter=0, noise=0.0)  # two circle periods
    flows = [global_flow(v) for v in vs]
    speed = [np.linalg.norm(f, axis=1).mean() for f in flows]
    return {
        "diff": float(np.mean([np.abs(np.diff(v.astype(float), axis=0)).mean() for v in vs])),
        "vy": float(np.mean([f[:, 1].mean() for f in flows])),
        # |mean velocity| / mean |velocity|: 1 for a straight path, ~0 for a closed loop
        "straightness": float(np.mean([np.linalg.norm(f.mean(0)) / max(s, 1e-9)
                                       for f, s in zip(flows, speed, strict=True)])),
    }


# ------------------------------------------------------------------------------ rendering


def test_render_is_deterministic_and_seeded() -> None:
    a = S.render("orange_disk_up", frames=8, size=32, seed=3, index=1)
    assert a.shape == (8, 32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, S.render("orange_disk_up", frames=8, size=32, seed=3,
                                              index=1))
    for other in (S.render("orange_disk_up", frames=8, size=32, seed=4, index=1),
                  S.render("orange_disk_up", frames=8, size=32, seed=3, index=2),
                  S.render("orange_disk_down", frames=8, size=32, seed=3, index=1)):
        assert np.abs(other.astype(int) - a).mean() > 1.0


def test_camera_motion_moves_the_whole_scene() -> None:
    still = dict(frames=12, size=SIZE, seed=0, clutter=0, noise=0.0)
    fixed = [S.render("orange_disk_still", camera=0.0, index=i, **still) for i in range(4)]
    moving = [S.render("orange_disk_still", camera=1.0, index=i, **still) for i in range(4)]
    for v in fixed:
        assert np.abs(np.diff(v.astype(int), axis=0)).max() == 0
    for v in moving:  # background texture and object shift together
        assert np.abs(np.diff(v.astype(int), axis=0)).mean() > 0.5


# ------------------------------------------------------------- classes are what they claim


def families(kind: str) -> list[list[str]]:
    groups: dict[tuple[str, bool], list[str]] = {}
    for s in (*S.PRETRAIN_CLASSES, *S.TRANSFER_CLASSES):
        if s.kind == kind:
            groups.setdefault((s.group, s in S.TRANSFER_CLASSES), []).append(s.name)
    return list(groups.values())


def test_catalogue_families_share_what_their_kind_says() -> None:
    for fam in families("motion"):
        specs = [S.CATALOGUE[n] for n in fam]
        assert len({s.appearance for s in specs}) == 1, fam
        assert len({s.motion for s in specs}) == len(specs), fam
        assert all(s.motion.spin == 0 for s in specs), fam  # rotation shows in one frame
    for fam in families("appearance"):
        specs = [S.CATALOGUE[n] for n in fam]
        assert len({s.motion for s in specs}) == 1, fam
        assert len({s.appearance for s in specs}) == len(specs), fam
    for fam in families("both"):
        specs = [S.CATALOGUE[n] for n in fam]
        assert len({s.appearance for s in specs}) == len({s.motion for s in specs}) == len(fam)
    assert [S.CATALOGUE[n].kind for n in S.DEFAULT_ORDER[:8]] == ["both"] * 8


def test_motion_only_pairs_have_equal_frame_appearance() -> None:
    """Per-frame colour histograms and mean intensities of every motion-only family agree,
    while an appearance-only pair's do not."""
    worst_hist, worst_mean = 0.0, 0.0
    for fam in families("motion"):
        vs = {n: videos(n) for n in fam}
        ref = fam[0]
        for n in fam[1:]:
            worst_hist = max(worst_hist, hist_distance(vs[ref], vs[n]))
            means = [np.mean([v.mean(axis=(1, 2, 3)) for v in vs[m]]) for m in (ref, n)]
            worst_mean = max(worst_mean, abs(means[0] - means[1]))
    # What remains is which background pixels and clutter the object hides (measured ~0.02).
    assert worst_hist < 0.03 and worst_mean < 1.0, (worst_hist, worst_mean)
    colour_pair = hist_distance(videos("pink_disk_plain"), videos("teal_disk_plain"))
    texture_pair = hist_distance(videos("pink_disk_plain"), videos("pink_disk_striped"))
    assert colour_pair > 3 * worst_hist and texture_pair > 3 * worst_hist, (
        colour_pair, texture_pair, worst_hist)


def test_appearance_only_shapes_differ_in_edges_not_colour() -> None:
    square, diamond = videos("lime_square"), videos("lime_diamond")
    same_object = (videos("orange_disk_up"), videos("orange_disk_circle"))
    shape_gap = np.abs(edge_orientations(square) - edge_orientations(diamond)).sum()
    motion_gap = np.abs(edge_orientations(same_object[0])
                        - edge_orientations(same_object[1])).sum()
    assert shape_gap > 4 * motion_gap, (shape_gap, motion_gap)


def test_motion_only_pairs_differ_in_motion() -> None:
    st = {n: motion_stats(n) for n in (
        "orange_disk_up", "orange_disk_down", "orange_disk_still", "orange_disk_circle",
        "orange_disk_sideways", "purple_square_slow_bob", "purple_square_fast_bob",
        "purple_square_slow_drift", "purple_square_fast_drift")}
    speed = 0.03 * SIZE  # px per frame of up / down
    assert st["orange_disk_up"]["vy"] < -0.7 * speed and st["orange_disk_down"]["vy"] > 0.7 * speed
    assert st["orange_disk_still"]["diff"] == 0 and st["orange_disk_up"]["diff"] > 1.0
    assert st["orange_disk_sideways"]["straightness"] > 0.9
    assert st["orange_disk_circle"]["straightness"] < 0.2
    assert st["purple_square_fast_bob"]["diff"] > 1.5 * st["purple_square_slow_bob"]["diff"]
    assert st["purple_square_fast_drift"]["diff"] > 2 * st["purple_square_slow_drift"]["diff"]


# ------------------------------------------------------------------------------- datasets


@pytest.mark.parametrize(("codec", "ext", "decoder"), [("vp9", "webm", "vp9"),
                                                        ("h264", "mp4", "h264")])
def test_write_dataset_layout_manifest_decode_and_reuse(tmp_path: Path, codec: str, ext: str,
                                                        decoder: str) -> None:
    root = tmp_path / "ds"
    info = S.write_dataset(root, classes=3, videos_per_class=2, frames=12, size=32,
                           codec=codec, seed=5)
    assert not info["reused"]
    names = sorted(S.DEFAULT_ORDER[:3])
    assert info["classes"] == names == sorted(p.name for p in root.iterdir() if p.is_dir())
    assert set(info["kinds"]) == set(info["groups"]) == set(names)
    assert [v["label"] for v in info["videos"]] == [0, 0, 1, 1, 2, 2]
    for n in names:
        files = sorted((root / n).iterdir())
        assert [f.name for f in files] == [f"{n}_000.{ext}", f"{n}_001.{ext}"]
        assert files == info["paths"][n]
    manifest = json.loads((root / S.MANIFEST).read_text())
    assert manifest["params"]["codec"] == codec and manifest["params"]["frames"] == 12
    assert len(manifest["files"]) == 6 and not list(root.rglob("*.part"))

    path = info["paths"][names[1]][1]
    with av.open(str(path)) as c:
        assert c.streams.video[0].codec_context.name == decoder
    frames = decode(path)
    assert frames.shape == (12, 32, 32, 3)
    rendered = S.render(names[1], frames=12, size=32, seed=5, index=1, camera=0.2, clutter=2,
                        noise=3.0)
    assert np.abs(frames.astype(int) - rendered).mean() < 8.0  # codec + yuv420p rounding

    mtime = path.stat().st_mtime_ns
    again = S.write_dataset(root, classes=3, videos_per_class=2, frames=12, size=32,
                            codec=codec, seed=5)
    assert again["reused"] and path.stat().st_mtime_ns == mtime
    # Other parameters: rewritten, and files the old manifest listed but the new one lacks go.
    fewer = S.write_dataset(root, classes=2, videos_per_class=2, frames=12, size=32,
                            codec=codec, seed=5)
    assert not fewer["reused"]
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == fewer["classes"]


def test_files_are_deterministic(tmp_path: Path) -> None:
    kw = dict(classes=["orange_disk_up", "lime_disk"], videos_per_class=1, frames=8, size=32)
    a = S.write_dataset(tmp_path / "a", seed=1, **kw)
    b = S.write_dataset(tmp_path / "b", seed=1, **kw)
    c = S.write_dataset(tmp_path / "c", seed=2, **kw)
    d = S.write_dataset(tmp_path / "d", seed=1, workers=2, **kw)  # forked writers
    for va, vb, vc, vd in zip(a["videos"], b["videos"], c["videos"], d["videos"], strict=True):
        assert va["path"].read_bytes() == vb["path"].read_bytes() == vd["path"].read_bytes()
        assert va["path"].read_bytes() != vc["path"].read_bytes()
        np.testing.assert_array_equal(decode(va["path"]), decode(vb["path"]))


def test_bad_arguments_name_the_argument(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="codec must be one of 'vp9', 'h264', got 'av1'"):
        S.write_dataset(tmp_path, classes=2, codec="av1")
    with pytest.raises(ValueError, match="classes must be between 1 and"):
        S.write_dataset(tmp_path, classes=0)
    with pytest.raises(ValueError, match="unknown class 'juggling'"):
        S.write_dataset(tmp_path, classes=["juggling"])
    with pytest.raises(ValueError, match="size must be even"):
        S.write_dataset(tmp_path, classes=2, size=33)
    with pytest.raises(ValueError, match="scale must be one of"):
        S.write_benchmark(tmp_path, scale="huge")
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------ benchmark


def test_scales_fit_the_models_clips() -> None:
    for name, s in S.SCALES.items():
        assert s.frames >= 26, name  # two frames 15 apart / 10-frame clips, random positions
        pre, tra = S._benchmark_classes(name)
        assert {c.kind for c in pre} == set(S.KINDS), name
        assert len(pre) > len(tra) >= 4 and s.pretrain_videos[0] > s.transfer_videos[0], name


def test_write_benchmark_two_disjoint_label_sets(tmp_path: Path) -> None:
    bench = S.write_benchmark(tmp_path, seed=0, scale="tiny")
    pre, tra = bench["pretrain"], bench["transfer"]
    assert not set(pre["classes"]) & set(tra["classes"])
    for entry in (pre, tra):
        for split in ("train", "test"):
            folder_classes = sorted(p.name for p in Path(entry[split]).iterdir() if p.is_dir())
            assert folder_classes == entry["classes"]
        assert set(entry["kinds"]) == set(entry["groups"]) == set(entry["classes"])
        assert set(entry["kinds"].values()) <= set(S.KINDS)
        assert len(set(entry["groups"].values())) >= 2
        # Each class's kind holds within its own set: a motion-only class has a sibling that
        # looks the same, an appearance-only class one that moves the same.
        specs = [S.CATALOGUE[c] for c in entry["classes"]]
        for s in specs:
            if s.kind == "motion":
                assert any(o.appearance == s.appearance for o in specs if o is not s), s.name
            if s.kind == "appearance":
                assert any(o.motion == s.motion for o in specs if o is not s), s.name
    assert {"motion", "appearance", "both"} == set(pre["kinds"].values())
    n_pre = S.SCALES["tiny"].pretrain_videos
    assert len(list(Path(pre["train"]).rglob("*.webm"))) == n_pre[0] * len(pre["classes"])
    assert len(list(Path(pre["test"]).rglob("*.webm"))) == n_pre[1] * len(pre["classes"])
    # Train and test come from different seed streams.
    c = pre["classes"][0]
    train0 = decode(Path(pre["train"]) / c / f"{c}_000.webm")
    test0 = decode(Path(pre["test"]) / c / f"{c}_000.webm")
    assert np.abs(train0.astype(int) - test0).mean() > 5
    again = S.write_benchmark(tmp_path, seed=0, scale="tiny")
    assert again["pretrain"]["train"] == pre["train"] and again["transfer"]["groups"] == tra[
        "groups"]
