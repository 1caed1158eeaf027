"""Prepared data (vidconv prepare + PreparedSource): the loader's rules both ways, resuming,
damage, streaming and remote shards, JPEG libraries, the CLI."""

from __future__ import annotations

import json
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from vidconv.clip import ClipSpec
from vidconv.data import ClipLoader, DecodeError, decode_frames, open_source
from vidconv.data.prepare import prepare
from vidconv.data.shards import (
    PreparedSource,
    decode_jpeg,
    encode_jpeg,
    expand_shards,
    iter_samples,
    split_shards,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
synthetic = pytest.importorskip("vidconv.data.synthetic")

SPEC = ClipSpec(tuple(range(10)), 170)
QUALITY = 95


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shard_videos") / "videos"
    synthetic.write_dataset(root, classes=2, videos_per_class=3, frames=24, size=64, seed=5,
                            workers=1)
    return root


@pytest.fixture(scope="module")
def prepared(videos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shard_prep") / "prep"
    # ~2 videos per shard, so that sharding, several tables and damage per shard are covered
    prepare(videos, out, workers=1, quality=QUALITY, shard_bytes=150_000)
    return out


def _params(loader: ClipLoader) -> list[tuple[int, bool, tuple[int, int], int]]:
    labels = [v.label for v in loader.source.videos]
    return [(it.start, it.flip, it.offset, labels[it.video]) for it in loader.items()]


def test_open_source_recognises_prepared_data(videos: Path, prepared: Path) -> None:
    src = open_source(prepared)
    assert isinstance(src, PreparedSource)
    assert isinstance(open_source(prepared / "index.json"), PreparedSource)
    assert len(src) == 6 and src.classes == open_source(videos).classes
    assert src.frame_size == 200 and len(src.index["shards"]) >= 2
    with pytest.raises(ValueError, match="root is only for list files"):
        open_source(prepared, root=prepared)


@pytest.mark.parametrize("train", [True, False])
def test_same_clips_and_pixels_as_the_videos(videos: Path, prepared: Path, train: bool) -> None:
    kw = dict(batch_size=4, train=train, clips_per_video=2, views=4, seed=7, cache_bytes=0)
    by_video = ClipLoader(videos, SPEC, backend="pyav", **kw)
    by_shard = ClipLoader(prepared, SPEC, **kw)
    assert by_shard.report.backends == {"jpeg": 6}
    assert _params(by_video) == _params(by_shard)
    assert [v.label for v in by_video.source.videos] == [v.label for v in by_shard.source.videos]
    diffs = []
    for a, b in zip(by_video, by_shard, strict=True):
        assert torch.equal(a.labels, b.labels)
        diffs.append((a.inputs - b.inputs).abs().mean().item())
        # A different clip of the same batch is far from this one: the bound below is tight.
        assert (a.inputs - b.inputs.roll(1, 0)).abs().mean().item() > 5 * diffs[-1]
    assert max(diffs) < 0.03  # JPEG q95 error, in normalised units (std ~0.5)


def test_frames_within_jpeg_error(videos: Path, prepared: Path) -> None:
    src = open_source(prepared)
    path = open_source(videos).videos[4].path
    assert src.index["samples"][4]["source"] == str(path)
    frames = [0, 3, 23]
    ref = decode_frames(path, frames, frame_size=200).astype(np.int16)
    got = src.decode_video(4, frames).astype(np.int16)
    err = np.abs(ref - got)
    assert got.shape == (3, 200, 200, 3)
    assert err.mean() < 1.5 and np.percentile(err, 99) < 10


def test_sharding_seeds_and_exact_resume(videos: Path, prepared: Path) -> None:
    for shard in range(2):
        kw = dict(batch_size=2, seed=11, shard_id=shard, num_shards=2, cache_bytes=0)
        a = ClipLoader(videos, SPEC, backend="pyav", **kw)
        b = ClipLoader(prepared, SPEC, **kw)
        a.set_epoch(3)
        b.set_epoch(3)
        assert _params(a) == _params(b)
        whole = list(b)
        resumed = list(b.iter_from(1))
        assert len(resumed) == len(whole) - 1
        for x, y in zip(whole[1:], resumed, strict=True):
            assert torch.equal(x.inputs, y.inputs) and torch.equal(x.labels, y.labels)


def test_cached_and_threaded_loaders_give_the_same_batches(prepared: Path) -> None:
    plain = list(ClipLoader(prepared, SPEC, batch_size=4, seed=2, cache_bytes=0))
    cached = ClipLoader(prepared, SPEC, batch_size=4, seed=2, num_workers=2)
    assert cached.report.cached
    for x, y in zip(plain, cached, strict=True):
        assert torch.equal(x.inputs, y.inputs)


def test_frame_size_mismatch_is_a_clear_error(prepared: Path) -> None:
    multires = ClipSpec(tuple(range(10)), 89, multires=True, frame_size=178)
    with pytest.raises(ValueError, match=r"200px frames.*frame_size 178.*--frame-size 178"):
        ClipLoader(prepared, multires)


def test_prepare_skips_and_reports_bad_videos(videos: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(videos, src)
    cls = sorted(p for p in src.iterdir() if p.is_dir())[0]
    (cls / "empty.mp4").write_bytes(b"")
    (cls / "text.mp4").write_text("not a video at all\n" * 20)
    good = sorted(cls.glob("*.webm"))[0].read_bytes()
    (cls / "zz_truncated.webm").write_bytes(good[:300])
    out = tmp_path / "out"
    report = prepare(src, out, workers=2, quality=QUALITY)
    reasons = {Path(r["source"]).name: r["reason"] for r in report.skipped}
    assert {"empty.mp4", "text.mp4"} <= set(reasons)
    assert report.num_prepared + report.num_skipped == report.num_videos == 9
    assert report.num_prepared >= 6
    on_disk = json.loads((out / "report.json").read_text())
    assert {Path(r["source"]).name for r in on_disk["skipped"]} == set(reasons)
    assert len(open_source(out)) == report.num_prepared
    assert [Path(r["source"]).name for r in open_source(out).skipped_at_prepare] \
        == [Path(r["source"]).name for r in report.skipped]


def test_killed_prepare_resumes_and_never_looks_whole(videos: Path, prepared: Path,
                                                      tmp_path: Path) -> None:
    out = tmp_path / "out"
    shards_seen: list[Path] = []

    def stop_after_two(path: Path) -> None:
        shards_seen.append(path)
        if len(shards_seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare(videos, out, workers=1, quality=QUALITY, shard_bytes=150_000,
                on_shard=stop_after_two)
    assert not (out / "index.json").exists()
    with pytest.raises(ValueError, match="unfinished vidconv prepare output"):
        open_source(out)
    # What a SIGKILL leaves: a half-written shard and a renamed shard without its table.
    (out / ".shard-000002.tar.tmp").write_bytes(b"half a shard")
    (out / "shard-000007.tar").write_bytes(b"\0" * 1024)
    with pytest.raises(ValueError, match=r"other options \(quality: 95, now 80\)"):
        prepare(videos, out, workers=1, quality=80, shard_bytes=150_000)
    report = prepare(videos, out, workers=1, quality=QUALITY, shard_bytes=150_000)
    assert report.resumed_videos == sum(
        json.loads(p.with_suffix(".json").read_text())["samples"].__len__() for p in shards_seen)
    assert 0 < report.resumed_videos < 6
    assert not list(out.glob(".*.tmp")) and not (out / "shard-000007.tar").exists()
    resumed, straight = open_source(out), open_source(prepared)
    assert [s["source"] for s in resumed.index["samples"]] == \
        [s["source"] for s in straight.index["samples"]]
    for i in range(6):
        assert resumed.read_frames(i) == straight.read_frames(i)
    again = prepare(videos, out, workers=1, quality=QUALITY, shard_bytes=150_000)
    assert again.resumed_videos == 6 and again.num_prepared == 6


def test_truncated_and_corrupted_shards_are_skipped_by_name(prepared: Path,
                                                             tmp_path: Path) -> None:
    out = tmp_path / "damaged"
    shutil.copytree(prepared, out)
    index = json.loads((out / "index.json").read_text())
    first, last = index["shards"][0]["name"], index["shards"][-1]["name"]
    in_last = [s for s in index["samples"] if s["shard"] == len(index["shards"]) - 1]
    cut = in_last[-1]["start"] + 2000  # inside the last sample of the last shard
    with open(out / last, "r+b") as f:
        f.truncate(cut)
    table = json.loads((out / index["shards"][0]["table"]).read_text())
    offset, size, _ = table["samples"][0]["frames"][5]
    with open(out / first, "r+b") as f:
        f.seek(offset + size // 2)
        f.write(b"\xff\x00\x13\x37")
    with pytest.warns(Warning) as caught:
        loader = ClipLoader(out, ClipSpec((0,), 170), batch_size=32, train=False,
                            clips_per_video=24, views=1, cache_bytes=0)
        batches = list(loader)
    reasons = {s.reason for s in loader.report.skipped}
    assert any(f"shard {out / last} is truncated" in r for r in reasons)
    assert any("frame 5 of sample" in r and first in r and "CRC-32" in r for r in reasons)
    assert loader.report.num_skipped == 2 and len(caught) >= 2
    assert sum(b.labels.numel() for b in batches) == 4 * 24
    middle = index["shards"][1]
    (out / middle["table"]).write_text('{"samples": [{"key": ')
    with pytest.warns(Warning):
        loader = ClipLoader(out, ClipSpec((0,), 170), batch_size=32, train=False,
                            clips_per_video=2, views=1, cache_bytes=0)
        list(loader)
    damaged_table = [s for s in loader.report.skipped if "frame table is damaged" in s.reason]
    assert len(damaged_table) == middle["samples"]
    assert all(middle["table"] in s.reason for s in damaged_table)
    (out / first).unlink()
    with pytest.raises(FileNotFoundError, match=f"shard .*{first}.* does not exist"):
        open_source(out)


def test_streaming_reader_stops_at_damage_and_pipe_urls_work(prepared: Path,
                                                             tmp_path: Path) -> None:
    shards = sorted(str(p) for p in prepared.glob("shard-*.tar"))
    samples = list(iter_samples(shards))
    assert [s["__key__"] for s in samples] == [s["key"] for s in
                                               open_source(prepared).index["samples"]]
    meta = json.loads(samples[0]["json"])
    assert meta["num_frames"] == 24 and sum(k.endswith(".jpg") for k in samples[0]) == 24
    assert decode_jpeg(samples[0]["000000.jpg"]).shape == (200, 200, 3)

    cut = tmp_path / "cut.tar"
    cut.write_bytes(Path(shards[0]).read_bytes()[:-30_000])
    damaged: list = []
    got = list(iter_samples([str(cut), f"pipe:cat {shards[1]}"], damaged))
    assert len(damaged) == 1 and damaged[0].location == str(cut)
    per_shard = [s["samples"] for s in open_source(prepared).index["shards"]]
    assert len(got) == per_shard[0] - 1 + per_shard[1]
    with pytest.raises(FileNotFoundError, match="missing.tar"):
        list(iter_samples([str(tmp_path / "missing.tar")]))
    with pytest.raises(FileNotFoundError, match="exited with status"):
        list(iter_samples([f"pipe:cat {tmp_path / 'missing.tar'}"]))


def test_remote_shards_are_fetched_once_into_the_cache(prepared: Path, tmp_path: Path) -> None:
    names = [s["name"] for s in open_source(prepared).index["shards"]]
    urls = [f"pipe:cat {prepared / n}" if k % 2 else (prepared / n).as_uri()
            for k, n in enumerate(names)]
    remote = PreparedSource(prepared, shards=urls, cache_dir=tmp_path / "cache")
    local = open_source(prepared)
    for i in range(len(local)):
        assert np.array_equal(remote.decode_video(i, [1, 7]), local.decode_video(i, [1, 7]))
    assert len(list((tmp_path / "cache").iterdir())) == len(names)
    gone = PreparedSource(prepared, shards=[f"pipe:cat {tmp_path}/none-{k}.tar"
                                            for k in range(len(names))],
                          cache_dir=tmp_path / "cache2")
    with pytest.raises(FileNotFoundError, match=r"exited with status 1: .*none-\d\.(tar|json)"):
        list(ClipLoader(gone, SPEC, batch_size=2, cache_bytes=0))
    short = tmp_path / "short.tar"
    short.write_bytes((prepared / names[0]).read_bytes()[:5000])
    shutil.copy(prepared / names[0].replace(".tar", ".json"), tmp_path / "short.json")
    cut = PreparedSource(prepared, shards=[short.as_uri()] + urls[1:], cache_dir=tmp_path / "c3")
    with pytest.raises(DecodeError, match="arrived with 5000 bytes"):
        cut.read_frames(0)
    assert not list((tmp_path / "c3").iterdir())  # the bad copy is not kept
    with pytest.raises(ValueError, match="shards lists 1 location"):
        PreparedSource(prepared, shards=urls[:1])


def test_shard_lists_expand_and_split_per_rank() -> None:
    urls = expand_shards("s3/a-{000..005}.tar")
    assert urls == [f"s3/a-{i:03d}.tar" for i in range(6)]
    assert expand_shards("x{1..2}-{0..1} y") == ["x1-0", "x1-1", "x2-0", "x2-1", "y"]
    parts = [split_shards(urls, r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == urls and parts[1] == [urls[1], urls[4]]
    with pytest.raises(ValueError, match="cannot be split over 8"):
        split_shards(urls, 0, 8)


def test_fps_option_thins_frames(videos: Path, prepared: Path, tmp_path: Path) -> None:
    half = prepare(videos, tmp_path / "half", workers=1, quality=QUALITY, fps=12.5)
    assert half.frames == 6 * 12
    thin, full = open_source(tmp_path / "half"), open_source(prepared)
    assert thin.index["samples"][0]["fps"] == 12.5
    assert thin.read_frames(0) == full.read_frames(0, list(range(0, 24, 2)))


def test_pillow_and_simplejpeg_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("simplejpeg")
    rgb = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    data = encode_jpeg(rgb, 90)
    fast = decode_jpeg(data)
    monkeypatch.setenv("VIDCONV_JPEG", "pillow")
    assert np.array_equal(decode_jpeg(data), fast)
    # The encoders differ in detail (DCT, chroma downsampling), not in quality.
    err_fast = np.abs(fast.astype(int) - rgb).mean()
    err_pillow = np.abs(decode_jpeg(encode_jpeg(rgb, 90)).astype(int) - rgb).mean()
    assert 0.8 < err_pillow / err_fast < 1.25
    with pytest.raises(ValueError, match="not a decodable JPEG"):
        decode_jpeg(b"\xff\xd8 definitely not")
    for library in ("pillow", "simplejpeg"):
        monkeypatch.setenv("VIDCONV_JPEG", library)
        into = np.zeros((48, 64, 3), dtype=np.uint8)
        assert decode_jpeg(data, into) is not None and np.array_equal(into, fast)
        with pytest.raises(ValueError, match="48x64"):
            decode_jpeg(data, np.zeros((64, 48, 3), dtype=np.uint8))


def _dali_or_skip() -> None:
    from vidconv.data.dali import dali_available

    if not dali_available():
        pytest.skip("NVIDIA DALI is not installed")


def test_dali_cpu_jpeg_decoder_matches(prepared: Path) -> None:
    _dali_or_skip()
    loader = ClipLoader(prepared, SPEC, batch_size=3, backend="dali", cache_bytes=0)
    assert loader.report.backends == {"dali-jpeg": 6}
    reference = ClipLoader(prepared, SPEC, batch_size=3, cache_bytes=0)
    for a, b in zip(loader, reference, strict=True):
        assert (a.inputs - b.inputs).abs().mean().item() < 0.01


@pytest.mark.cuda
def test_dali_gpu_jpeg_decoder_matches(prepared: Path) -> None:
    _dali_or_skip()
    loader = ClipLoader(prepared, SPEC, batch_size=3, device="cuda", cache_bytes=0)
    assert loader.report.backends == {"dali-jpeg": 6}
    reference = ClipLoader(prepared, SPEC, batch_size=3, cache_bytes=0)
    for a, b in zip(loader, reference, strict=True):
        assert a.inputs.device.type == "cuda"
        # nvJPEG's IDCT and upsampling differ from libjpeg-turbo's by a grey level or two.
        assert (a.inputs.cpu() - b.inputs).abs().mean().item() < 0.02


def test_cli_prepare_then_train(videos: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    from vidconv.cli import main

    with pytest.raises(SystemExit) as done:
        main(["prepare", "--help"])
    assert done.value.code == 0 and "--frame-size" in capsys.readouterr().out
    assert main(["prepare", str(tmp_path / "nothing"), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vidconv: error:") and "nothing" in err and err.count("\n") == 1
    assert main(["prepare", str(videos), str(tmp_path / "o"), "--quality", "0"]) == 2
    assert "quality must be an int in 1..100, got 0" in capsys.readouterr().err
    out = tmp_path / "prep"
    assert main(["prepare", str(videos), str(out), "--workers", "1", "--no-progress",
                 "--shard-size", "0.2"]) == 0
    assert "prepared 6 of 6 videos" in capsys.readouterr().out
    assert main(["prepare", str(videos), str(videos)]) == 2  # OUT would be the videos
    assert "holds files that are not vidconv prepare output" in capsys.readouterr().err
    assert main(["prepare", str(out), str(tmp_path / "again")]) == 2
    assert "is already prepared data; give the videos" in capsys.readouterr().err
    assert main(["prepare", str(videos), str(tmp_path / "o"), "--fps", "-1"]) == 2
    assert "fps must be a positive number or None, got -1.0" in capsys.readouterr().err
    run = tmp_path / "run"
    assert main(["train", str(out), "--out", str(run), "--steps", "2", "--batch-size", "3",
                 "--width", "0.05", "--no-progress"]) == 0
    assert "done: 2/2 steps" in capsys.readouterr().out
    assert main(["evaluate", str(run), str(out), "--clips", "1", "--views", "1",
                 "--no-progress", "--no-plots"]) == 0
    report = json.loads((run / "eval" / "report.json").read_text())
    assert report["num_videos"] == 6 and report["num_clips"] == 6
    assert main(["finetune", str(run / "checkpoint.pt"), str(out), "--out", str(tmp_path / "ft"),
                 "--steps", "1", "--batch-size", "3", "--no-progress"]) == 0
    assert "done: 1/1 steps" in capsys.readouterr().out


def test_prepare_in_a_subprocess_killed_leaves_no_index(videos: Path, tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import time

    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, "-m", "vidconv", "prepare", str(videos), str(out),
                             "--workers", "1", "--no-progress", "--shard-size", "0.1"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None \
            and not list(out.glob("shard-*.json")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if not (out / "index.json").exists():
            with pytest.raises(ValueError, match="unfinished"):
                open_source(out)
    report = prepare(videos, out, workers=1, shard_bytes=100_000)
    assert report.num_prepared == 6 and len(open_source(out)) == 6


def test_real_world_videos_prepare_upright_and_in_order(shared_videos: Path,
                                                        tmp_path: Path) -> None:
    src = tmp_path / "videos" / "all"
    src.mkdir(parents=True)
    for p in sorted(shared_videos.iterdir()):
        if p.suffix != ".md":
            (src / p.name).symlink_to(p)
    report = prepare(src.parent, tmp_path / "prep", workers=2, quality=QUALITY)
    assert [Path(r["source"]).name for r in report.skipped] == ["corrupted.mp4"]
    prepared = open_source(tmp_path / "prep")
    assert len(prepared) == 6
    for i, sample in enumerate(prepared.index["samples"]):
        ref = decode_frames(sample["source"], None, frame_size=200).astype(np.int16)
        got = prepared.decode_video(i).astype(np.int16)
        assert got.shape == ref.shape, sample["source"]
        assert np.abs(ref - got).mean() < 2.0, sample["source"]


def test_a_decoder_crash_skips_that_video_only(videos: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import multiprocessing
    import os

    from vidconv.data import prepare as prepare_module

    if multiprocessing.get_start_method() != "fork":
        pytest.skip("the crashing decoder is patched in through fork")
    real = prepare_module.prepare_video
    victim = sorted(open_source(videos).videos, key=lambda v: v.path)[2].path

    def crashing(path, *args, **kwargs):
        if Path(path) == victim:
            os._exit(11)  # what a segfaulting decoder looks like to the pool
        return real(path, *args, **kwargs)

    monkeypatch.setattr(prepare_module, "prepare_video", crashing)
    report = prepare(videos, tmp_path / "out", workers=2)
    assert [(r["source"], r["reason"]) for r in report.skipped] == [
        (str(victim), "the decoder crashed its process on this file")]
    assert report.num_prepared == 5


def test_resume_from_another_source_is_refused(videos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        prepare(videos, out, workers=1, on_shard=lambda p: (_ for _ in ()).throw(
            KeyboardInterrupt), shard_bytes=1)
    other = tmp_path / "other"
    shutil.copytree(videos, other)
    next(p for p in other.rglob("*.webm")).unlink()
    with pytest.raises(ValueError, match="started from another source"):
        prepare(other, out, workers=1)


def test_shards_split_per_node_then_per_rank(prepared: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    index = open_source(prepared).index
    names = [s["name"] for s in index["shards"]]
    urls = [(prepared / n).as_uri() for n in names]
    seen: dict[str, int] = {}
    for rank in range(4):  # 2 nodes x 2 ranks, as torchrun numbers them
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "4")
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        monkeypatch.setenv("LOCAL_RANK", str(rank % 2))
        monkeypatch.setenv("GROUP_RANK", str(rank // 2))
        monkeypatch.setenv("VIDCONV_SHARDS_PER_NODE", "1")
        node_cache = tmp_path / f"node{rank // 2}"
        src = PreparedSource(prepared, shards=urls, cache_dir=node_cache)
        assert src.rank_split == (rank % 2, 2)
        loader = ClipLoader(src, SPEC, batch_size=2, shard_id=rank, num_shards=4,
                            cache_bytes=0)
        assert (loader.shard_id, loader.num_shards) == (rank % 2, 2)
        for batch in loader:
            for i in batch.video_index.tolist():
                key = str(src.videos[i].path)
                seen[key] = seen.get(key, 0) + 1
        cached = {p.name.split("-", 1)[1] for p in node_cache.iterdir()}
        assert cached <= set(names[rank // 2::2])
    assert sorted(seen.values()) == [1] * 6  # every video once per epoch, over all ranks
    monkeypatch.setenv("WORLD_SIZE", "40")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    with pytest.raises(ValueError, match="cannot be split over 40 nodes"):
        PreparedSource(prepared)


def test_prepare_a_list_file_source(videos: Path, tmp_path: Path) -> None:
    files = sorted(p.relative_to(videos) for p in videos.rglob("*.webm"))[:3]
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{f} {k % 2}\n" for k, f in enumerate(files)))
    report = prepare(listing, tmp_path / "out", root=videos, workers=1)
    src = open_source(tmp_path / "out")
    assert report.num_prepared == 3 and src.classes == ["0", "1"]
    assert [v.label for v in src.videos] == [0, 1, 0]


def test_the_webdataset_package_reads_the_shards(prepared: Path) -> None:
    wds = pytest.importorskip("webdataset")
    urls = sorted(str(p) for p in prepared.glob("shard-*.tar"))
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("rgb8"))
    index = open_source(prepared).index["samples"]
    assert [s["__key__"] for s in samples] == [s["key"] for s in index]
    first = samples[0]
    assert first["json"]["num_frames"] == 24 and first["json"]["class"]
    frames = sorted(k for k in first if k.endswith(".jpg"))
    assert len(frames) == 24 and first[frames[0]].shape == (200, 200, 3)


def _frame_by_frame(source: PreparedSource, items: list, spec: ClipSpec) -> torch.Tensor:
    """A batch made the slow, obvious way: every frame of every clip read and decoded alone,
    then stacked and preprocessed."""
    from vidconv.ops import crop_normalize

    clips = [np.stack([decode_jpeg(source.read_frames(it.video, [it.start + o])[0])
                       for o in spec.frame_offsets]) for it in items]
    offsets = torch.tensor([it.offset for it in items], dtype=torch.int64)
    flips = torch.tensor([it.flip for it in items], dtype=torch.bool)
    return crop_normalize(torch.from_numpy(np.stack(clips)), spec.size, offsets=offsets,
                          flip=flips)


@pytest.mark.parametrize("mode", ["train", "eval", "cached", "threads", "sparse"])
def test_batches_equal_frame_by_frame_decoding(prepared: Path, mode: str) -> None:
    # train: each clip decoded straight into its batch slot; eval: several clips of a video
    # per batch, gathered from one decode; cached: gathered from whole videos; sparse: frame
    # offsets that are not a slice.
    spec = ClipSpec((0, 3, 4, 14), 170) if mode == "sparse" else SPEC
    kw: dict = dict(batch_size=4, seed=3, cache_bytes=0)
    if mode == "eval":
        kw.update(train=False, clips_per_video=3, views=2)
    elif mode == "cached":
        del kw["cache_bytes"]
    elif mode == "threads":
        kw["num_workers"] = 2
    loader = ClipLoader(prepared, spec, **kw)
    assert loader.report.cached == (mode == "cached")
    loader.set_epoch(2)
    items = loader.items()
    batches = list(loader)
    assert len(batches) == len(loader) == -(-len(items) // 4)
    for k, batch in enumerate(batches):
        chunk = items[4 * k:4 * k + 4]
        assert batch.video_index.tolist() == [it.video for it in chunk]
        assert torch.equal(batch.inputs, _frame_by_frame(loader.source, chunk, spec))
    resumed = list(loader.iter_from(1))
    assert len(resumed) == len(batches) - 1
    for x, y in zip(batches[1:], resumed, strict=True):
        assert torch.equal(x.inputs, y.inputs) and torch.equal(x.labels, y.labels)


def test_a_damaged_clip_leaves_its_batch_slot_out(prepared: Path, tmp_path: Path) -> None:
    out = tmp_path / "damaged"
    shutil.copytree(prepared, out)
    index = json.loads((out / "index.json").read_text())
    sample = index["samples"][0]
    table = json.loads((out / index["shards"][0]["table"]).read_text())
    frames = next(s["frames"] for s in table["samples"] if s["key"] == sample["key"])
    # Every 10-frame clip of a 24-frame video holds frame 9 or frame 14.
    with open(out / index["shards"][0]["name"], "r+b") as f:
        for i in (9, 14):
            offset, size, _ = frames[i]
            f.seek(offset + size // 2)
            f.write(b"\x00\x13\x37\x00")
    loader = ClipLoader(out, SPEC, batch_size=4, seed=1, cache_bytes=0)
    items = loader.items()
    with pytest.warns(Warning, match="does not match its CRC-32"):
        batches = list(loader)
    assert [s.index for s in loader.report.skipped] == [0]
    assert sum(b.labels.numel() for b in batches) == 5
    good = [it for it in items if it.video != 0]
    got = torch.cat([b.inputs for b in batches])
    assert torch.equal(got, _frame_by_frame(loader.source, good, SPEC))


def test_frame_reads_return_the_tar_members(prepared: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import tarfile

    from vidconv.data import shards

    src = open_source(prepared)
    sample = src.index["samples"][3]
    with tarfile.open(prepared / src.index["shards"][sample["shard"]]["name"]) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    member = [members[f"{sample['key']}.{i:06d}.jpg"] for i in range(24)]
    frames = [23, 0, 5, 5, 6, 7, 1, 22]
    # One read for everything, one read per frame, and the default's runs.
    for gap in (1 << 40, -1, shards._READ_GAP):
        monkeypatch.setattr(shards, "_READ_GAP", gap)
        assert src.read_frames(3, frames) == [member[i] for i in frames]
        assert src.read_frames(3) == member
    into = np.zeros((len(frames), 200, 200, 3), dtype=np.uint8)
    assert src.decode_video(3, frames, out=into) is into
    assert np.array_equal(into, np.stack([decode_jpeg(member[i]) for i in frames]))
    assert np.array_equal(src.decode_video(3, frames), into)
    with pytest.raises(ValueError, match=r"out must be .* shape \(8, 200, 200, 3\), got uint8 "
                                         r"\(8, 200, 199, 3\)"):
        src.decode_video(3, frames, out=np.zeros((8, 200, 199, 3), dtype=np.uint8))
    with pytest.raises(DecodeError, match=r"has no frame 24 \(24 frames\)"):
        src.read_frames(3, [0, 24])
