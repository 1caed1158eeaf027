"""vidconv.data: sources, clip sampling, preprocessing, sharding, bad files, DALI vs PyAV.

The tests write their own small videos with PyAV (VP9 webm and H.264 mp4, 48x64, 20 frames).
Every frame is one flat colour that encodes where it comes from: red = 10 * frame index + 8,
green = 60 + 100 * label, blue = 40 + 40 * (video number within its class), so a clip's frame
indices and its video can be read back from the model input.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from vidconv.clip import ClipSpec
from vidconv.data import (
    VIEWS,
    BadVideoWarning,
    ClipLoader,
    DecodeError,
    VideoFolder,
    VideoItem,
    VideoList,
    decode_frames,
    open_source,
    probe,
)
from vidconv.data.dali import dali_available, resize_square
from vidconv.ops import crop_normalize

FRAMES, HEIGHT, WIDTH = 20, 48, 64
CLASSES, PER_CLASS = 2, 3
MEAN, STD = 117.0, 64.0
HAS_DALI = dali_available()
needs_dali = pytest.mark.skipif(not HAS_DALI, reason="NVIDIA DALI is not installed")


def write_video(path: Path, codec: str, colours: list[tuple[int, int, int]] | None = None, *,
                frames: int = FRAMES, height: int = HEIGHT, width: int = WIDTH,
                images: list[np.ndarray] | None = None, pix_fmt: str = "yuv420p") -> Path:
    """Encode flat-colour frames (or ``images``) with PyAV."""
    container = av.open(str(path), "w")
    stream = container.add_stream(codec, rate=25)
    stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
    if images is None:
        images = [np.full((height, width, 3), c, np.uint8) for c in colours[:frames]]
    for img in images:
        for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


def colours(label: int, number: int, frames: int = FRAMES) -> list[tuple[int, int, int]]:
    return [(10 * i + 8, 60 + 100 * label, 40 + 40 * number) for i in range(frames)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """root/<class>/<video>: 2 classes x 3 videos, VP9 webm and H.264 mp4 alternating."""
    root = tmp_path_factory.mktemp("videos")
    for label in range(CLASSES):
        folder = root / f"class{label}"
        folder.mkdir()
        for number in range(PER_CLASS):
            codec, ext = ("libvpx-vp9", "webm") if number % 2 == 0 else ("h264", "mp4")
            write_video(folder / f"v{number}.{ext}", codec, colours(label, number))
    (root / "class0" / "notes.txt").write_text("not a video")
    return root


def pixels(x: torch.Tensor) -> torch.Tensor:
    """Normalised model input back to grey levels."""
    return x.float() * STD + MEAN


def read_back(inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(frame index (N, T), label (N,), video number (N,)) from flat-colour clips."""
    mean = pixels(inputs).mean(dim=(3, 4))  # (N, 3, T)
    frame = ((mean[:, 0] - 8) / 10).round().long()
    label = ((mean[:, 1, 0] - 60) / 100).round().long()
    number = ((mean[:, 2, 0] - 40) / 40).round().long()
    return frame, label, number


def video_number(path: Path) -> int:
    return int(path.stem[1:])


SMALL = ClipSpec(frame_offsets=(0, 2, 4), size=40, frame_size=48)


def collect(loader: ClipLoader) -> list:
    return [(b.inputs, b.labels, b.video_index) for b in loader]


# ---------------------------------------------------------------------------------- sources


def test_folder_source(dataset: Path, tmp_path: Path) -> None:
    src = open_source(dataset)
    assert isinstance(src, VideoFolder)
    assert src.classes == ["class0", "class1"]
    assert len(src.videos) == CLASSES * PER_CLASS  # notes.txt is not a video
    for item in src.videos:
        assert item.label == int(item.path.parent.name[-1])
    assert src.videos_per_class() == {"class0": 3, "class1": 3}
    with pytest.raises(FileNotFoundError, match="nowhere"):
        open_source(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no class folders"):
        VideoFolder(tmp_path)
    (tmp_path / "a").mkdir()
    with pytest.raises(ValueError, match="no video files"):
        VideoFolder(tmp_path)
    with pytest.raises(ValueError, match="root is only for list files"):
        open_source(dataset, root=tmp_path)


def test_list_source_with_and_without_class_index(dataset: Path, tmp_path: Path) -> None:
    (tmp_path / "classInd.txt").write_text("1 class0\n2 class1\n")
    (tmp_path / "trainlist01.txt").write_text("class1/v0.webm 2\nclass0/v1.mp4 1\n\n")
    (tmp_path / "testlist01.txt").write_text("class1/v2.webm\nclass0/v0.webm\n")
    train = open_source(tmp_path / "trainlist01.txt", root=dataset)
    assert isinstance(train, VideoList) and train.classes == ["class0", "class1"]
    assert [(v.path, v.label) for v in train.videos] == [
        (dataset / "class1/v0.webm", 1), (dataset / "class0/v1.mp4", 0)]
    test = VideoList(tmp_path / "testlist01.txt", dataset)
    assert [v.label for v in test.videos] == [1, 0]

    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "list.txt").write_text("class1/v0.webm 1\nclass0/v1.mp4 0\n")
    src = VideoList(bare / "list.txt", dataset)
    assert src.classes == ["0", "1"] and [v.label for v in src.videos] == [1, 0]
    (bare / "nolabels.txt").write_text("class1/v0.webm\nclass0/v1.mp4\n")
    assert VideoList(bare / "nolabels.txt", dataset).classes == ["class0", "class1"]
    (bare / "mixed.txt").write_text("class1/v0.webm 1\nclass0/v1.mp4\n")
    with pytest.raises(ValueError, match="mixes lines"):
        VideoList(bare / "mixed.txt", dataset)
    (tmp_path / "bad.txt").write_text("class1/v0.webm 7\n")
    with pytest.raises(ValueError, match="label 7 is not a class id"):
        VideoList(tmp_path / "bad.txt", dataset)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        open_source(tmp_path / "missing.txt")

    loader = ClipLoader(train, SMALL, batch_size=4, train=False, clips_per_video=1)
    batch = next(iter(loader))
    _, label, number = read_back(batch.inputs)
    assert label.tolist() == [1, 0] and number.tolist() == [0, 1]
    assert batch.labels.tolist() == [1, 0]


# --------------------------------------------------------------------------------- sampling


def test_train_epoch_visits_every_video_once_with_valid_clips(dataset: Path) -> None:
    src = open_source(dataset)
    loader = ClipLoader(src, SMALL, batch_size=4, train=True, seed=3)
    assert len(loader) == 2  # 6 videos, batches of 4 and 2
    orders, starts = [], []
    for epoch in range(3):
        loader.set_epoch(epoch)
        seen = []
        for batch in loader:
            frame, label, number = read_back(batch.inputs)
            assert batch.labels.dtype == torch.int64 and batch.video_index.dtype == torch.int64
            for f, lab, num, vi, bl in zip(frame, label, number, batch.video_index,
                                           batch.labels, strict=True):
                item = src.videos[int(vi)]
                assert int(bl) == item.label == int(lab)
                assert int(num) == video_number(item.path)
                start = int(f[0])
                assert f.tolist() == [start, start + 2, start + 4]
                assert 0 <= start <= FRAMES - SMALL.span
                starts.append(start)
            seen += batch.video_index.tolist()
        assert sorted(seen) == list(range(6))
        orders.append(seen)
    assert orders[0] != orders[1] or orders[1] != orders[2]  # reshuffled per epoch
    assert len(set(starts)) > 3  # random positions, not one fixed start


def test_iteration_depends_only_on_seed_epoch_and_shard(dataset: Path) -> None:
    def run(seed: int, epoch: int) -> list:
        loader = ClipLoader(dataset, SMALL, batch_size=4, seed=seed, backend="pyav")
        loader.set_epoch(epoch)
        return collect(loader)

    torch.manual_seed(0)
    np.random.seed(0)
    a = run(7, 1)
    torch.manual_seed(123)
    np.random.seed(99)
    torch.rand(10)
    b = run(7, 1)
    for (xa, la, ia), (xb, lb, ib) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(la, lb) and torch.equal(ia, ib)
    c = run(8, 1)
    assert not all(torch.equal(x[0], y[0]) for x, y in zip(a, c, strict=True))
    d = run(7, 2)
    assert not all(torch.equal(x[0], y[0]) for x, y in zip(a, d, strict=True))


def test_eval_clips_evenly_spaced_and_views(dataset: Path) -> None:
    src = open_source(dataset)
    clips, views = 3, 4
    loader = ClipLoader(src, SMALL, batch_size=5, train=False, clips_per_video=clips,
                        views=views, backend="pyav")
    assert len(loader) == -(-6 * clips * views // 5)
    inputs, labels, index = zip(*collect(loader), strict=True)
    x, labels, index = torch.cat(inputs), torch.cat(labels), torch.cat(index)
    assert index.tolist() == [v for v in range(6) for _ in range(clips * views)]
    frame, label, _ = read_back(x)
    last = FRAMES - SMALL.span
    expected = [round(k * last / (clips - 1)) for k in range(clips)]
    assert expected == [0, 8, 15]
    starts = frame[:, 0].view(6, clips, views)
    assert (starts == torch.tensor(expected).view(1, clips, 1)).all()
    assert torch.equal(label, labels)
    # Views: the crops and flips of VIEWS on the decoded frames.
    item = src.videos[0]
    frames = torch.from_numpy(decode_frames(item.path, [0, 2, 4], frame_size=48))
    free = SMALL.frame_size - SMALL.size
    corners = {"centre": (free // 2,) * 2, "top-left": (0, 0), "bottom-right": (free, free)}
    for v, (corner, flip) in enumerate(VIEWS[:views]):
        ref = crop_normalize(frames[None], SMALL.size, offsets=corners[corner], flip=flip)
        torch.testing.assert_close(x[v:v + 1], ref)


def test_batches_equal_reference_preprocessing(dataset: Path) -> None:
    """Crop offsets and flips of a train epoch, against numpy on the decoded frames."""
    src = open_source(dataset)
    loader = ClipLoader(src, SMALL, batch_size=6, train=True, seed=1, backend="pyav")
    loader.set_epoch(4)
    items = loader.items()
    batch = next(iter(loader))
    assert {i.flip for i in items} == {True, False}
    for n, item in enumerate(items):
        frames = decode_frames(src.videos[item.video].path,
                               [item.start + o for o in SMALL.frame_offsets], frame_size=48)
        y, x = item.offset
        crop = frames[:, y:y + SMALL.size, x:x + SMALL.size].astype(np.float32)
        if item.flip:
            crop = crop[:, :, ::-1]
        ref = torch.from_numpy((crop - MEAN) / STD).permute(3, 0, 1, 2)
        torch.testing.assert_close(batch.inputs[n], ref)
        assert int(batch.video_index[n]) == item.video


@pytest.mark.parametrize("size", [170, 16, 17, 24, 31, 32, 47])
def test_loader_preprocessing_bits_on_both_cpu_paths(size: int,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The loader's crop_normalize on the CPU (float32, 16-pixel vector rows where the CPU has
    AVX2, else the per-element table) gives exactly the documented float32 arithmetic,
    (x - mean) * (1 / std), with VIDCONV_CPU_SIMD=0 (the table) too: a vector tail, a flip
    or a deinterleaving mistake would change bits."""
    from vidconv.ops import fovea_context

    g = torch.Generator().manual_seed(size)
    n, t, h, w = 4, 3, size + 13, size + 30
    clips = torch.randint(0, 256, (n, t, h, w, 3), dtype=torch.uint8, generator=g)
    offsets = torch.stack([torch.randint(0, h - size + 1, (n,), generator=g),
                           torch.randint(0, w - size + 1, (n,), generator=g)], dim=1)
    flips = torch.tensor([False, True, True, False])
    mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1, 1)
    inv = (1.0 / torch.tensor(std, dtype=torch.float32)).view(3, 1, 1, 1)
    expected = []
    for k in range(n):
        y, x = offsets[k].tolist()
        crop = clips[k, :, y:y + size, x:x + size]
        crop = crop.flip(2) if flips[k] else crop
        expected.append((crop.permute(3, 0, 1, 2).float() - m) * inv)
    expected = torch.stack(expected)
    for simd in ("1", "0"):
        monkeypatch.setenv("VIDCONV_CPU_SIMD", simd)
        out = crop_normalize(clips, size, offsets=offsets, flip=flips, mean=mean, std=std)
        fovea, _ = fovea_context(clips, size, offsets=offsets, flip=flips, mean=mean, std=std)
        assert torch.equal(out, expected), f"VIDCONV_CPU_SIMD={simd}"
        assert torch.equal(fovea, expected), f"VIDCONV_CPU_SIMD={simd}"
        # Into memory starting off 32-byte alignment by every float offset: the vector steps
        # choose their aligned run per row, and must still write each value once, right.
        for shift in range(8):
            flat = torch.full((expected.numel() + 8,), float("nan"))
            into = flat[shift:shift + expected.numel()].view(expected.shape)
            crop_normalize(clips, size, offsets=offsets, flip=flips, mean=mean, std=std,
                           out=into)
            assert torch.equal(into, expected), f"VIDCONV_CPU_SIMD={simd}, shift {shift}"


def test_flip_and_crop_move_content(tmp_path: Path) -> None:
    """A frame with a bright left edge: flipped clips have it on the right."""
    root = tmp_path / "d"
    (root / "a").mkdir(parents=True)
    img = np.full((48, 48, 3), 30, np.uint8)
    img[:, :16] = 220
    write_video(root / "a" / "edge.webm", "libvpx-vp9", images=[img] * 6, height=48, width=48)
    spec = ClipSpec(frame_offsets=(0,), size=40, frame_size=48)
    loader = ClipLoader(root, spec, batch_size=10, train=False, clips_per_video=1, views=4)
    x = pixels(next(iter(loader)).inputs)[:, 0, 0]  # (views, S, S) red channel
    left, right = x[:, :, :4].mean((1, 2)), x[:, :, -4:].mean((1, 2))
    flips = torch.tensor([f for _, f in VIEWS[:4]])
    assert ((left > right) == ~flips).all()
    # top-left keeps 16 bright columns, bottom-right (flipped) 16 - 8 = 8 on its right side
    assert (x[2, :, :16] > 150).all() and (x[2, :, 16:] < 100).all()
    assert (x[3, :, -8:] > 150).all() and (x[3, :, :-8] < 100).all()


def test_sharding_is_disjoint_and_covering(dataset: Path) -> None:
    for train in (True, False):
        parts = []
        for shard in range(4):
            loader = ClipLoader(dataset, SMALL, batch_size=2, train=train, clips_per_video=2,
                                shard_id=shard, num_shards=4, seed=5)
            loader.set_epoch(2)
            got = [v for b in loader for v in b.video_index.tolist()]
            assert len(got) == len(loader.items()) and len(loader) == -(-len(got) // 2)
            parts.append(set(got))
        assert set().union(*parts) == set(range(6))
        assert sum(len(p) for p in parts) == 6
    with pytest.raises(ValueError, match="shard_id and num_shards go together"):
        ClipLoader(dataset, SMALL, shard_id=1)
    with pytest.raises(ValueError, match="shard_id must be an int in \\[0, 2\\)"):
        ClipLoader(dataset, SMALL, shard_id=2, num_shards=2)


def test_shards_default_to_the_process_group(dataset: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 3)
    loader = ClipLoader(dataset, SMALL, batch_size=8, train=False, clips_per_video=1)
    assert (loader.shard_id, loader.num_shards) == (1, 3)
    assert [b.video_index.tolist() for b in loader] == [[1, 4]]


def test_multires_pair_and_single_stream(dataset: Path) -> None:
    spec = ClipSpec(frame_offsets=tuple(range(10)), size=89, multires=True, frame_size=178)
    loader = ClipLoader(dataset, spec, batch_size=4, train=True)
    batch = next(iter(loader))
    fovea, context = batch.inputs
    assert fovea.shape == context.shape == (4, 3, 10, 89, 89)
    frame, _, _ = read_back(fovea)
    assert (frame[:, 1:] - frame[:, :-1] == 1).all()
    fovea_only = ClipSpec(frame_offsets=(0,), size=89, multires=True, stream="fovea",
                          frame_size=178)
    x = next(iter(ClipLoader(dataset, fovea_only, batch_size=3, train=False,
                             clips_per_video=1))).inputs
    assert isinstance(x, torch.Tensor) and x.shape == (3, 3, 1, 89, 89)


def test_workers_and_cache_give_the_same_batches(dataset: Path) -> None:
    spec = ClipSpec(frame_offsets=(0, 15), size=40, frame_size=48)
    base = collect(ClipLoader(dataset, spec, batch_size=4, seed=2, backend="pyav"))
    for kwargs in ({"num_workers": 2}, {"cache_bytes": 0}):
        loader = ClipLoader(dataset, spec, batch_size=4, seed=2, backend="pyav", **kwargs)
        assert loader.report.cached == ("cache_bytes" not in kwargs)
        other = collect(loader)
        for (xa, la, ia), (xb, lb, ib) in zip(base, other, strict=True):
            assert torch.equal(xa, xb) and torch.equal(la, lb) and torch.equal(ia, ib)


def test_arguments_are_checked(dataset: Path) -> None:
    cases = [({"batch_size": 0}, "batch_size must be a positive int"),
             ({"views": 11}, "views must be 1..10"),
             ({"backend": "ffmpeg"}, "backend must be one of"),
             ({"seed": -1}, "seed must be a non-negative int"),
             ({"num_workers": -2}, "num_workers must be an int >= 0")]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            ClipLoader(dataset, SMALL, **kwargs)
    with pytest.raises(ValueError, match="spec.size \\(60\\) must be <= spec.frame_size"):
        ClipLoader(dataset, ClipSpec((0,), 60, frame_size=48))
    with pytest.raises(TypeError, match="spec must be a vidconv.clip.ClipSpec"):
        ClipLoader(dataset, (0,))
    loader = ClipLoader(dataset, SMALL)
    with pytest.raises(ValueError, match="epoch must be an int >= 0"):
        loader.set_epoch(-1)


# -------------------------------------------------------------------------------- bad files


def test_bad_files_are_skipped_once_and_reported(dataset: Path, tmp_path: Path) -> None:
    root = tmp_path / "bad"
    shutil.copytree(dataset, root)
    good = root / "class0" / "v1.mp4"
    data = good.read_bytes()
    (root / "class0" / "empty.mp4").write_bytes(b"")
    (root / "class0" / "garbage.webm").write_bytes(b"\x1aE\xdf\xa3 not a video at all")
    (root / "class1" / "truncated.mp4").write_bytes(data[: len(data) // 3])
    write_video(root / "class1" / "short.webm", "libvpx-vp9", colours(1, 0, 3), frames=3)
    bad = {"empty.mp4", "garbage.webm", "truncated.mp4", "short.webm"}

    with pytest.warns(BadVideoWarning) as caught:
        loader = ClipLoader(root, SMALL, batch_size=4, train=True)
    named = [Path(str(w.message).split("skipping ")[1].split(":")[0]).name for w in caught
             if issubclass(w.category, BadVideoWarning)]
    assert sorted(named) == sorted(bad)  # one warning per bad file
    report = loader.report
    assert report.num_skipped == len(bad) and report.num_videos == 10
    assert report.num_usable == 6
    assert {Path(s.path).name for s in report.skipped} == bad
    reasons = {Path(s.path).name: s.reason for s in report.skipped}
    assert "fewer than the clip spans (5)" in reasons["short.webm"]
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", BadVideoWarning)  # no second warning while iterating
        for batch in loader:
            seen += batch.video_index.tolist()
    names = {loader.source.videos[i].path.name for i in seen}
    assert len(seen) == 6 and not names & bad
    assert "4 skipped" in report.summary() and "class0: 3, class1: 3" in report.summary()
    assert report.videos_per_class == {"class0": 3, "class1": 3}  # usable ones
    assert report.found_per_class == {"class0": 5, "class1": 5}
    assert report.empty_classes == []

    with pytest.raises(DecodeError, match="empty.mp4"):
        ClipLoader(root, SMALL, strict=True)


def test_report_counts_add_up_and_name_every_unusable_entry(dataset: Path,
                                                          tmp_path: Path) -> None:
    """Folders named like videos and broken links are reported, not ignored; a class left
    with no usable video is flagged; usable + skipped = listed, per class too."""
    root = tmp_path / "r"
    shutil.copytree(dataset, root)
    (root / "class0" / "folder.mp4").mkdir()
    (root / "class1" / "gone.webm").symlink_to(tmp_path / "nowhere.webm")
    (root / "class2").mkdir()
    (root / "class2" / "only.mp4").write_bytes(b"not a video")
    (root / "class3").mkdir()
    with pytest.warns(BadVideoWarning) as caught:
        loader = ClipLoader(root, SMALL, batch_size=4, train=True, backend="pyav")
    messages = [str(w.message) for w in caught if issubclass(w.category, BadVideoWarning)]
    report = loader.report
    reasons = {Path(s.path).name: s.reason for s in report.skipped}
    assert reasons["folder.mp4"] == "is a folder, not a video file"
    assert reasons["gone.webm"].startswith("is a broken symbolic link (to ")
    assert "nowhere.webm" in reasons["gone.webm"]
    assert report.num_videos == 9 and report.num_skipped == 3 and report.num_usable == 6
    assert report.videos_per_class == {"class0": 3, "class1": 3, "class2": 0, "class3": 0}
    assert report.found_per_class == {"class0": 4, "class1": 4, "class2": 1, "class3": 0}
    assert sorted(report.empty_classes) == ["class2", "class3"]
    assert any("class 'class2' has no usable video left" in m for m in messages)
    assert any("class 'class3' has no video" in m for m in messages)
    assert "classes with no usable video: " in report.summary()

    # A video skipped while decoding comes off num_usable and its class's count.
    (root / "class1" / "v0.webm").write_bytes(b"gone bad after probing")
    with pytest.warns(BadVideoWarning, match="v0.webm"):
        list(loader)
    assert report.num_usable == 5 and report.num_skipped == 4
    assert report.videos_per_class["class1"] == 2
    assert report.num_usable + report.num_skipped == report.num_videos
    assert sum(report.videos_per_class.values()) == report.num_usable


def test_no_usable_video_says_why(dataset: Path, tmp_path: Path) -> None:
    """A list file whose paths do not resolve: the error says no video could be read, why,
    and what the paths are taken relative to."""
    lists = tmp_path / "lists"
    lists.mkdir()
    listing = lists / "train.txt"
    listing.write_text("".join(f"{p.parent.name}/{p.name}\n"
                               for p in sorted(dataset.glob("*/v*"))))
    with pytest.warns(BadVideoWarning), pytest.raises(ValueError) as err:
        ClipLoader(listing, SMALL, batch_size=4)
    message = str(err.value)
    assert "no video of dataset" in message and "could be read: all 6 were skipped" in message
    assert "does not exist (6, e.g. " in message and "relative to the video root" in message
    ok = ClipLoader(VideoList(listing, root=dataset), SMALL, batch_size=4)
    assert ok.report.num_usable == 6


def test_cuda_device_without_cuda_is_refused(dataset: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ValueError, match="device is 'cuda' but CUDA is not available"):
        ClipLoader(dataset, SMALL, device="cuda")
    with pytest.raises(ValueError, match="device must be 'cpu' or a CUDA device, got 'meta'"):
        ClipLoader(dataset, SMALL, device="meta")


def test_damaged_stream_found_while_decoding(shared_videos: Path, tmp_path: Path) -> None:
    """corrupted.mp4 opens and its first frames decode; the damage shows later. With the
    cache (whole-video decode) it is skipped at its first batch, reported once, never fatal."""
    root = tmp_path / "d"
    (root / "x").mkdir(parents=True)
    shutil.copy(shared_videos / "corrupted.mp4", root / "x")
    shutil.copy(shared_videos / "unordered.mov", root / "x")
    spec = ClipSpec(frame_offsets=(0,), size=40, frame_size=48)
    loader = ClipLoader(root, spec, batch_size=8, train=False, clips_per_video=2)
    assert loader.report.num_skipped == 0
    with pytest.warns(BadVideoWarning, match="corrupted.mp4"):
        batches = list(loader)
    assert [b.video_index.tolist() for b in batches] == [[1, 1]]
    assert loader.report.num_skipped == 1
    assert loader.report.skipped[0].stage == "decode"
    assert "InvalidDataError" in loader.report.skipped[0].reason
    again = [b.video_index.tolist() for b in loader]
    assert again == [[1, 1]]
    with pytest.raises(DecodeError, match="corrupted.mp4"):
        list(ClipLoader(root, spec, batch_size=8, train=False, clips_per_video=2, strict=True))


# ------------------------------------------------------------------------ real-world videos


def test_real_h264_footage(shared_videos: Path) -> None:
    path = shared_videos / "flipping_a_pancake.mkv"
    info = probe(path)
    assert (info.num_frames, info.width, info.height, info.codec) == (310, 426, 240, "h264")
    picks = [0, 100, 101, 309]
    full = decode_frames(path, frame_size=None)
    assert full.shape == (310, 240, 426, 3)
    some = decode_frames(path, picks, frame_size=None, info=info)
    assert np.array_equal(some, full[picks])  # seeking lands on the same frames
    resized = decode_frames(path, picks, frame_size=64, info=info)
    assert resized.shape == (4, 64, 64, 3)
    # Centre square of the 426x240 frame, resized: close to torch's antialiased resize.
    ref = resize_square(torch.from_numpy(full[picks]), 64).numpy().astype(int)
    assert np.abs(resized.astype(int) - ref).mean() < 3

    spec = ClipSpec(frame_offsets=tuple(range(10)), size=40, frame_size=48)
    one = _single_video_source(path)
    loader = ClipLoader(one, spec, batch_size=20, train=False, clips_per_video=20,
                        cache_bytes=0)
    batch = next(iter(loader))
    assert batch.inputs.shape == (20, 3, 10, 40, 40)
    starts = [round(k * 300 / 19) for k in range(20)]
    want = decode_frames(path, [s + 5 for s in starts], frame_size=48, info=info)
    got = pixels(batch.inputs[:, :, 5]).permute(0, 2, 3, 1)
    ref = torch.from_numpy(want[:, 4:44, 4:44].astype(np.float32))
    torch.testing.assert_close(got, ref, atol=1e-3, rtol=0)


class _OneVideo:
    """A source holding one file (a list file would need the file beside a writable dir)."""

    def __init__(self, path: Path) -> None:
        self.videos = [VideoItem(path, 0)]
        self.classes = ["only"]


def _single_video_source(path: Path) -> _OneVideo:
    return _OneVideo(path)


def test_unordered_timestamps_and_short_video(shared_videos: Path) -> None:
    path = shared_videos / "unordered.mov"
    info = probe(path)
    assert info.num_frames == 4 and list(info.pts) == sorted(info.pts)
    frames = decode_frames(path, frame_size=None)
    # Reference: decode and order by pts by hand.
    container = av.open(str(path))
    got = sorted((f.pts, f.to_ndarray(format="rgb24")) for f in container.decode(video=0))
    container.close()
    assert np.array_equal(frames, np.stack([f for _, f in got]))
    assert np.array_equal(decode_frames(path, [3, 0], frame_size=None, info=info),
                          frames[[3, 0]])
    single = ClipSpec(frame_offsets=(0,), size=40, frame_size=48)
    loader = ClipLoader(_single_video_source(path), single, batch_size=8, train=False,
                        clips_per_video=4)
    assert next(iter(loader)).inputs.shape == (4, 3, 1, 40, 40)
    with pytest.warns(BadVideoWarning, match="unordered.mov: has 4 frame"), \
            pytest.raises(ValueError, match=r"could be read: all 1 were skipped: has 4 "
                          r"frame\(s\), fewer than the clip spans \(5\) \(1, e.g. .*unordered"):
        ClipLoader(_single_video_source(path), SMALL, batch_size=8)


def test_rotation_metadata_is_honoured(shared_videos: Path) -> None:
    """Phone clips stored 568x320 with 0/90/180/270 degree display matrices: frames come out
    as a player shows them (portrait for 90 and 270)."""
    for degrees, turns in ((0, 0), (90, -1), (180, 2), (270, 1)):
        path = shared_videos / f"video_{degrees}.mov"
        info = probe(path)
        assert info.rotation == (-degrees) % 360
        shown = decode_frames(path, [0], frame_size=None, info=info)[0]
        container = av.open(str(path))
        stored = next(container.decode(video=0)).to_ndarray(format="rgb24")
        container.close()
        assert np.array_equal(shown, np.rot90(stored, turns))
        assert shown.shape[:2] == ((568, 320) if degrees in (90, 270) else (320, 568))


def test_one_frame_converter_per_video_gives_the_same_bits(shared_videos: Path) -> None:
    """decode_frames and prepare share one PyAV converter over a video's frames (built once,
    not per frame): every frame, resized or not, upright or turned, equals the per-frame
    conversion."""
    from vidconv.data.decode import _convert, reformatter

    for name in ("flipping_a_pancake.mkv", "video_90.mov", "video_270.mov"):
        path = shared_videos / name
        rotation = probe(path).rotation
        converter = reformatter()
        container = av.open(str(path))
        try:
            for number, frame in enumerate(container.decode(video=0)):
                for size in (None, 178, 200):
                    shared = _convert(frame, rotation, size, converter)
                    alone = _convert(frame, rotation, size)
                    assert shared.shape == alone.shape and np.array_equal(shared, alone), \
                        (name, number, size)
                if number == 11:
                    break
        finally:
            container.close()


def test_every_shared_file_goes_through_the_loader(shared_videos: Path, tmp_path: Path) -> None:
    root = tmp_path / "all"
    (root / "real").mkdir(parents=True)
    for f in shared_videos.iterdir():
        if f.suffix.lower() in (".mp4", ".mkv", ".mov"):
            shutil.copy(f, root / "real")
    spec = ClipSpec(frame_offsets=(0,), size=40, frame_size=48)
    loader = ClipLoader(root, spec, batch_size=64, train=False, clips_per_video=3,
                        backend="pyav")
    with pytest.warns(BadVideoWarning, match="corrupted.mp4"):
        seen = [v for b in loader for v in b.video_index.tolist()]
    names = [loader.source.videos[i].path.name for i in sorted(set(seen))]
    assert names == ["flipping_a_pancake.mkv", "unordered.mov", "video_0.mov",
                     "video_180.mov", "video_270.mov", "video_90.mov"]
    assert [Path(s.path).name for s in loader.report.skipped] == ["corrupted.mp4"]


# ------------------------------------------------------------------------------------ DALI


def smooth_images(frames: int = 12, height: int = 48, width: int = 64) -> list[np.ndarray]:
    yy, xx = np.mgrid[0:height, 0:width]
    return [np.stack([xx * 3 + i * 5, yy * 4 + i * 3, np.full_like(xx, 60 + 8 * i)], -1)
            .clip(0, 255).astype(np.uint8) for i in range(frames)]


@needs_dali
@pytest.mark.parametrize("codec", ["libvpx-vp9", "libvpx", "mjpeg"])
def test_dali_cpu_frames_equal_pyav(tmp_path: Path, codec: str) -> None:
    from vidconv.data.dali import DaliDecoder

    ext, fmt = {"libvpx-vp9": ("webm", "yuv420p"), "libvpx": ("webm", "yuv420p"),
                "mjpeg": ("avi", "yuvj420p")}[codec]
    path = write_video(tmp_path / f"s.{ext}", codec, images=smooth_images(), pix_fmt=fmt)
    ref = decode_frames(path, frame_size=None).astype(int)
    dali = DaliDecoder("cpu")
    got = dali.decode(path).numpy().astype(int)
    assert got.shape == ref.shape == (12, 48, 64, 3)
    # Same decoded YUV; the YUV -> RGB conversions (chroma upsampling, fixed-point
    # coefficients) round differently: a few grey levels.
    diff = np.abs(got - ref)
    assert diff.max() <= 12 and diff.mean() < 2.5
    picked = dali.decode(path, [7, 2, 2]).numpy().astype(int)
    assert np.array_equal(picked, got[[7, 2, 2]])


@needs_dali
def test_dali_backend_in_the_loader(dataset: Path) -> None:
    auto = ClipLoader(dataset, SMALL, batch_size=6, train=False, clips_per_video=2)
    assert auto.report.backends == {"dali-cpu": 4, "pyav": 2}
    with pytest.warns(BadVideoWarning, match="codec h264 is not supported by DALI"):
        dali = ClipLoader(dataset, SMALL, batch_size=6, train=False, clips_per_video=2,
                          backend="dali")
    assert dali.report.num_skipped == 2 and dali.report.backends == {"dali-cpu": 4}
    pyav = ClipLoader(dataset, SMALL, batch_size=6, train=False, clips_per_video=2,
                      backend="pyav")

    def clips(loader: ClipLoader) -> dict[tuple[int, int], torch.Tensor]:
        """(video, clip number) -> clip."""
        out: dict[tuple[int, int], torch.Tensor] = {}
        for b in loader:
            for v, x in zip(b.video_index.tolist(), b.inputs, strict=True):
                out[v, sum(key[0] == v for key in out)] = x
        return out

    a, p, d = clips(auto), clips(pyav), clips(dali)
    assert sorted({v for v, _ in d}) == [0, 2, 3, 5]  # the webm files
    for key, x in d.items():
        # Flat frames: both resizes keep the colour; decoders differ by rounding only.
        assert (pixels(x) - pixels(p[key])).abs().max() <= 6
        assert torch.equal(x, a[key])


@pytest.mark.cuda
def test_dali_gpu_loader_matches_pyav(dataset: Path) -> None:
    pytest.importorskip("nvidia.dali")
    gpu = ClipLoader(dataset, SMALL, batch_size=6, train=False, clips_per_video=2,
                     device="cuda", backend="dali")
    cpu = ClipLoader(dataset, SMALL, batch_size=6, train=False, clips_per_video=2,
                     backend="pyav")
    assert gpu.report.backends == {"dali-gpu": 6}
    for bg, bc in zip(gpu, cpu, strict=True):
        assert bg.inputs.device.type == "cuda"
        assert torch.equal(bg.video_index.cpu(), bc.video_index)
        assert (pixels(bg.inputs.cpu()) - pixels(bc.inputs)).abs().max() <= 6
