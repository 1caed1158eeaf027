"""Batched DALI decoding: several files per pipeline run, runs queued ahead, several pipelines
at once, with the same frames and the same bad-file handling as one file per run."""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from test_dali_isolation import FRAMES, HEIGHT, WIDTH, kill_when_read, write_video

from vidconv.data.dali import dali_available

pytestmark = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")

LENGTHS = (10, 6, 14, 8, 12, 7, 9)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """VP9 and MJPEG files of different lengths (so that runs hold unequal samples)."""
    root = tmp_path_factory.mktemp("dali-batched")
    out = []
    for k, n in enumerate(LENGTHS):
        codec, ext = ("vp9", "webm") if k % 2 == 0 else ("mjpeg", "avi")
        out.append(write_video(root / f"f{k}.{ext}", codec, frames=n))
    return out


def one_at_a_time(device: str = "cpu", **kwargs):
    """The reference: one file per synchronous run, one pipeline."""
    from vidconv.data.dali import DaliDecoder

    return DaliDecoder(device, batch_size=1, pipelines=1, prefetch=1, **kwargs)


def requests_for(files: list[Path]) -> list[tuple[Path, list[int] | None]]:
    """Whole files and chosen frames (any order, repeats) mixed in one request."""
    out: list[tuple[Path, list[int] | None]] = []
    for k, path in enumerate(files):
        n = LENGTHS[k]
        out.append((path, None if k % 3 == 0 else [n - 1, 0, 2, 2]))
    return out


@pytest.mark.parametrize("batch_size,prefetch,pipelines", [(3, 2, 1), (2, 1, 1), (2, 2, 2)])
def test_batches_give_the_frames_of_one_file_per_run(files: list[Path], batch_size: int,
                                                     prefetch: int, pipelines: int) -> None:
    from vidconv.data.dali import DaliDecoder

    reqs = requests_for(files)
    ref = one_at_a_time()
    expected = [ref.decode(p, ix) for p, ix in reqs]
    ref.close()
    dec = DaliDecoder("cpu", batch_size=batch_size, prefetch=prefetch, pipelines=pipelines)
    got = dec.decode_batch(reqs)
    assert len(got) == len(reqs)
    for (path, indices), g, e in zip(reqs, got, expected, strict=True):
        assert isinstance(g, torch.Tensor), g
        n = LENGTHS[files.index(path)]
        assert g.shape == (n if indices is None else 4, HEIGHT, WIDTH, 3)
        assert torch.equal(g, e), path.name
    # A second request through the same (prefetching) pipelines: nothing left over from the
    # first one.
    again = dec.decode_batch(list(reversed(reqs)))
    for g, e in zip(again, reversed(expected), strict=True):
        assert torch.equal(g, e)
    dec.close()


def test_runner_batches_and_queues_runs_ahead(files: list[Path], monkeypatch) -> None:
    from vidconv.data._dali_worker import BatchRunner, read_encoded

    runner = BatchRunner("cpu", None, 1, batch_size=3, prefetch=2)
    fed: list[int] = []
    real_feed = BatchRunner._feed

    def counting_feed(self, pipe, chunk, with_frames):
        fed.append(len(chunk))
        return real_feed(self, pipe, chunk, with_frames)

    monkeypatch.setattr(BatchRunner, "_feed", counting_feed)
    items = [(k, read_encoded(str(p))[0], [1, 0]) for k, p in enumerate(files)]
    got: dict[int, tuple] = {}
    runner.run(items, lambda k, s, e: got.__setitem__(k, (np.asarray(s).copy(), e)))
    assert fed == [3, 3, 1]  # 7 files, 3 per run
    assert (True, True) in runner._pipes  # the prefetching pipeline ran them
    assert sorted(got) == list(range(len(files)))
    assert all(e is None and s.shape == (2, HEIGHT, WIDTH, 3) for s, e in got.values())


def test_a_bad_file_fails_alone_and_its_batch_still_decodes(files: list[Path], tmp_path: Path,
                                                            monkeypatch) -> None:
    from vidconv.data._dali_worker import BatchRunner
    from vidconv.data.dali import DaliDecoder
    from vidconv.data.decode import DecodeError

    broken = tmp_path / "broken.webm"
    broken.write_bytes(files[0].read_bytes()[:300])  # the header, no frame
    empty = tmp_path / "empty.webm"
    empty.touch()
    missing = tmp_path / "missing.webm"
    short = files[1]  # 6 frames
    reqs: list[tuple[Path, list[int] | None]] = [
        (files[0], [0, 1]), (broken, [0, 1]), (files[2], [3]), (missing, [0]),
        (short, [5, 6]), (files[3], [2]), (empty, None), (files[4], [1, 1]), (files[5], None)]
    ref = one_at_a_time()
    dec = DaliDecoder("cpu", batch_size=3, prefetch=2)
    got = dec.decode_batch(reqs)
    errors = {p.name: r for (p, _), r in zip(reqs, got, strict=True)
              if isinstance(r, DecodeError)}
    assert sorted(errors) == ["broken.webm", "empty.webm", "f1.avi", "missing.webm"]
    assert errors["broken.webm"].path == str(broken)
    assert "DALI could not decode it" in errors["broken.webm"].reason
    assert "DALI could not decode it" in errors["f1.avi"].reason  # frame 6 of 6: past the end
    assert errors["empty.webm"].reason == "is empty"
    assert errors["missing.webm"].reason.startswith("cannot read")
    for (path, indices), r in zip(reqs, got, strict=True):
        if path.name not in errors:
            assert torch.equal(r, ref.decode(path, indices)), path.name

    # In the worker the same runner retried the failed runs' files one per run: run it here
    # to count.
    runs: list[int] = []
    real_feed = BatchRunner._feed

    def counting_feed(self, pipe, chunk, with_frames):
        runs.append(len(chunk))
        return real_feed(self, pipe, chunk, with_frames)

    monkeypatch.setattr(BatchRunner, "_feed", counting_feed)
    from vidconv.data._dali_worker import read_encoded

    readable = [(k, read_encoded(str(p))[0], ix) for k, (p, ix) in enumerate(reqs)
                if read_encoded(str(p))[1] is None and ix is not None]
    results: dict[int, str | None] = {}
    BatchRunner("cpu", None, 1, 3, 2).run(readable, lambda k, s, e: results.__setitem__(k, e))
    # [f0 broken f2] and [f1 f3 f4] queued; the first fails: each of its files again alone,
    # then the second again as a batch, which fails too (f1's frame 6): each alone.
    assert runs == [3, 3, 1, 1, 1, 3, 1, 1, 1]
    assert [k for k, e in sorted(results.items()) if e is not None] == [1, 4]
    ref.close()
    dec.close()


def test_an_index_past_the_end_is_an_error_not_a_black_frame(files: list[Path]) -> None:
    from vidconv.data.dali import DaliDecoder
    from vidconv.data.decode import DecodeError

    dec = DaliDecoder("cpu")
    assert dec.decode(files[1], [5]).shape == (1, HEIGHT, WIDTH, 3)
    with pytest.raises(DecodeError, match=r"f1\.avi: DALI could not decode it"):
        dec.decode(files[1], [6])
    dec.close()


def test_a_crash_mid_batch_costs_only_the_crashing_file(files: list[Path],
                                                        tmp_path: Path) -> None:
    from vidconv.data.dali import DaliDecoder
    from vidconv.data.decode import DecodeError

    fifo = tmp_path / "crashes.avi"
    os.mkfifo(fifo)
    dec = DaliDecoder("cpu", batch_size=4)
    ref = one_at_a_time()
    assert dec.decode(files[0]).shape[0] == LENGTHS[0]  # the worker is up
    # The whole request, then the crashing file alone.
    watcher = kill_when_read(fifo, lambda: dec.worker_pid, times=2)
    reqs = [(files[0], [1]), (fifo, [0]), (files[1], None), (files[2], [4, 3])]
    got = dec.decode_batch(reqs)
    watcher.join(5)
    assert isinstance(got[1], DecodeError)
    assert got[1].path == str(fifo) and "died decoding it (SIGSEGV)" in got[1].reason
    for k in (0, 2, 3):
        assert torch.equal(got[k], ref.decode(*reqs[k]))
    dec.close()
    ref.close()


def test_a_hang_mid_batch_costs_only_the_hanging_file(files: list[Path], tmp_path: Path) -> None:
    from vidconv.data.dali import DaliDecoder
    from vidconv.data.decode import DecodeError

    fifo = tmp_path / "hangs.webm"
    os.mkfifo(fifo)  # opening it blocks: no writer ever comes
    dec = DaliDecoder("cpu", timeout=1.5, batch_size=4)
    got = dec.decode_batch([(files[0], [0]), (fifo, [0]), (files[2], [2])])
    assert isinstance(got[1], DecodeError) and "did not finish within 1.5 s" in got[1].reason
    assert got[0].shape == got[2].shape == (1, HEIGHT, WIDTH, 3)
    dec.close()


def test_settings_are_checked_and_default_to_the_engines(monkeypatch) -> None:
    from vidconv.data import dali as dali_module
    from vidconv.data.dali import DaliDecoder

    for name in ("batch_size", "pipelines", "prefetch"):
        with pytest.raises(ValueError, match=f"{name} must be an int >= 1, got 0"):
            DaliDecoder("cpu", **{name: 0})
    monkeypatch.setenv("VIDCONV_DALI_BATCH", "many")
    with pytest.raises(ValueError, match="VIDCONV_DALI_BATCH must be an int >= 1, got 'many'"):
        DaliDecoder("cpu")
    monkeypatch.setenv("VIDCONV_DALI_BATCH", "5")
    monkeypatch.setenv("VIDCONV_DALI_PIPELINES", "3")
    dec = DaliDecoder("cpu")
    assert (dec.batch_size, dec.pipelines, dec.prefetch) == (5, 3, 2)
    monkeypatch.delenv("VIDCONV_DALI_PIPELINES")
    assert DaliDecoder("cpu").pipelines == 1
    names = {"NVIDIA H200": 7, "NVIDIA H100 80GB HBM3": 7, "NVIDIA A100-SXM4-40GB": 5,
             "NVIDIA L40S": 3, "NVIDIA L4": 4, "Tesla T4": dali_module.DEFAULT_ENGINES}
    for name, engines in names.items():
        monkeypatch.setattr(dali_module.torch.cuda, "get_device_name", lambda d, n=name: n)
        assert dali_module.nvdec_engines("cuda:0") == engines, name
    # The H200 machine: 16 cores over 7 pipelines; never fewer threads than asked for.
    assert dali_module.gpu_threads(1, 8, 7, cores=16) == 2
    assert dali_module.gpu_threads(1, 3, 1, cores=16) == 3
    assert dali_module.gpu_threads(4, 8, 7, cores=2) == 4


# ---------------------------------------------------------------------------------- loader


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    root = tmp_path / "d"
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for k in range(4):
            codec, ext = ("vp9", "webm") if k % 2 == 0 else ("mjpeg", "avi")
            write_video(root / label / f"{label}{k}.{ext}", codec, frames=FRAMES + 2 * k)
    return root


def loaders(root: Path, monkeypatch, **kwargs):
    """The same loader decoding one file per DALI run and in batches (3 per run, 2 queued,
    2 worker processes), with one video tagged as rotated in both."""
    from vidconv.clip import ClipSpec
    from vidconv.data import ClipLoader

    spec = ClipSpec(frame_offsets=(0, 2, 3), size=40, frame_size=44)
    made = []
    for batch, prefetch, pipelines in (("1", "1", "1"), ("3", "2", "2")):
        monkeypatch.setenv("VIDCONV_DALI_BATCH", batch)
        monkeypatch.setenv("VIDCONV_DALI_PREFETCH", prefetch)
        monkeypatch.setenv("VIDCONV_DALI_PIPELINES", pipelines)
        loader = ClipLoader(root, spec, backend="dali", **kwargs)
        assert loader.report.backends == {"dali-cpu": 8}
        loader._infos[5] = dataclasses.replace(loader._infos[5], rotation=90)
        loader._decoder("dali-cpu")  # made now, under these settings
        made.append(loader)
    single, batched = made
    assert single._decoder("dali-cpu").batch_size == 1
    assert batched._decoder("dali-cpu").batch_size == 3
    return single, batched


def batches(loader, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    return [(b.inputs, b.labels, b.video_index) for b in loader.iter_from(start)]


def assert_same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for u, v in zip(x, y, strict=True):
            assert torch.equal(u, v)


@pytest.mark.parametrize("cache", [None, 0])
def test_loader_clips_are_the_same_batched(dataset: Path, monkeypatch, cache: int | None) -> None:
    for kwargs in ({"train": True, "batch_size": 3, "seed": 5},
                   {"train": False, "batch_size": 5, "clips_per_video": 2, "views": 4},
                   {"train": True, "batch_size": 4, "num_workers": 2}):
        single, batched = loaders(dataset, monkeypatch, cache_bytes=cache, **kwargs)
        requests: list[int] = []
        dec = batched._decoder("dali-cpu")
        real = dec.decode_batch
        dec.decode_batch = lambda reqs, seen=requests, real=real: (
            seen.append(len(reqs)) or real(reqs))
        for epoch in (0, 1):
            single.set_epoch(epoch)
            batched.set_epoch(epoch)
            assert_same(batches(single), batches(batched))
        assert_same(batches(single, 1), batches(batched, 1))
        if kwargs["train"] or cache == 0:  # (cached eval: each video comes once, alone)
            assert max(requests) > 1  # the loader handed the decoder several files at once
        if cache is None:
            assert batched.report.cached and len(batched._cache) == 8
        for loader in (single, batched):
            assert loader.report.num_skipped == 0


def test_rotation_reaches_batched_clips(dataset: Path, monkeypatch) -> None:
    single, batched = loaders(dataset, monkeypatch, train=False, batch_size=8,
                              clips_per_video=1, cache_bytes=0)
    plain = loaders(dataset, monkeypatch, train=False, batch_size=8, clips_per_video=1,
                    cache_bytes=0)[1]
    plain._infos[5] = dataclasses.replace(plain._infos[5], rotation=0)
    (x,), (y,) = ([b.inputs for b in loader] for loader in (batched, plain))
    assert torch.equal(x[:5], y[:5]) and not torch.equal(x[5], y[5])
    assert_same(batches(single), batches(batched))


def test_loader_skips_a_bad_file_of_a_batch_and_keeps_the_others(dataset: Path,
                                                                 monkeypatch) -> None:
    from vidconv.data import BadVideoWarning

    single, batched = loaders(dataset, monkeypatch, train=False, batch_size=8,
                              clips_per_video=1, cache_bytes=0)
    expected = batches(single)
    victim = dataset / "a" / "a2.webm"
    victim.write_bytes(victim.read_bytes()[:300])  # probed fine; damaged since
    with pytest.warns(BadVideoWarning, match=r"skipping .*a2\.webm: DALI could not decode it"):
        got = batches(batched)
    (inputs, labels, index), = got
    assert index.tolist() == [0, 1, 3, 4, 5, 6, 7]
    assert torch.equal(inputs, expected[0][0][[0, 1, 3, 4, 5, 6, 7]])
    report = batched.report
    assert [(Path(s.path).name, s.stage) for s in report.skipped] == [("a2.webm", "decode")]
    assert report.num_usable == 7 and report.videos_per_class == {"a": 3, "b": 4}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once, then left out quietly
        assert batches(batched)[0][2].tolist() == [0, 1, 3, 4, 5, 6, 7]


# ------------------------------------------------------------------------------------ CUDA
# NVDEC has minimum frame sizes (VP9: 128 x 128), so these files are larger.
GPU_HEIGHT, GPU_WIDTH = 160, 192


def write_gpu_video(path: Path, encoder: str, frames: int) -> Path:
    import av

    yy, xx = np.mgrid[0:GPU_HEIGHT, 0:GPU_WIDTH]
    container = av.open(str(path), "w")
    stream = container.add_stream(encoder, rate=25)
    stream.width, stream.height, stream.pix_fmt = GPU_WIDTH, GPU_HEIGHT, "yuv420p"
    for i in range(frames):
        img = np.stack([xx + i * 5, yy + i * 3, (xx // 4 + yy // 4 + 7 * i) % 256], -1)
        frame = av.VideoFrame.from_ndarray(img.clip(0, 255).astype(np.uint8), format="rgb24")
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


@pytest.fixture(scope="module")
def gpu_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """H.264 and VP9 files of the lengths in LENGTHS, NVDEC-sized."""
    root = tmp_path_factory.mktemp("dali-batched-gpu")
    out = []
    for k, n in enumerate(LENGTHS):
        encoder, ext = ("libvpx-vp9", "webm") if k % 2 == 0 else ("libx264", "mp4")
        out.append(write_gpu_video(root / f"g{k}.{ext}", encoder, n))
    return out


@pytest.mark.cuda
def test_gpu_batches_give_the_frames_of_one_file_per_run(gpu_files: list[Path]) -> None:
    from vidconv.data.dali import DaliDecoder, nvdec_engines

    dec = DaliDecoder("cuda", batch_size=3)
    assert dec.pipelines == nvdec_engines("cuda")
    ref = one_at_a_time("cuda")
    reqs = requests_for(gpu_files) * 3  # more files than pipelines
    got = dec.decode_batch(reqs)
    for (path, indices), g in zip(reqs, got, strict=True):
        assert isinstance(g, torch.Tensor) and g.device.type == "cuda", g
        n = LENGTHS[gpu_files.index(path)]
        assert g.shape == (n if indices is None else 4, GPU_HEIGHT, GPU_WIDTH, 3)
        assert torch.equal(g, ref.decode(path, indices)), path.name
    dec.close()


@pytest.mark.cuda
def test_gpu_bad_file_fails_alone(gpu_files: list[Path], tmp_path: Path) -> None:
    from vidconv.data.dali import DaliDecoder
    from vidconv.data.decode import DecodeError

    broken = tmp_path / "broken.webm"
    broken.write_bytes(gpu_files[0].read_bytes()[:300])
    dec = DaliDecoder("cuda", batch_size=4, pipelines=2)
    ref = one_at_a_time("cuda")
    reqs = [(gpu_files[0], [0, 1]), (broken, [0]), (gpu_files[2], [3]), (gpu_files[1], [6]),
            (gpu_files[3], None), (gpu_files[4], [2]), (gpu_files[5], [1, 0])]
    got = dec.decode_batch(reqs)
    bad = [p.name for (p, _), r in zip(reqs, got, strict=True) if isinstance(r, DecodeError)]
    assert bad == ["broken.webm", "g1.mp4"]  # g1 has 6 frames: 6 is past its end
    for (path, indices), r in zip(reqs, got, strict=True):
        if path.name not in bad:
            assert torch.equal(r, ref.decode(path, indices)), path.name


@pytest.mark.cuda
def test_gpu_loader_clips_are_the_same_batched(gpu_files: list[Path], tmp_path: Path,
                                               monkeypatch) -> None:
    from vidconv.clip import ClipSpec
    from vidconv.data import ClipLoader

    root = tmp_path / "d"
    for k, path in enumerate(gpu_files):
        (root / "ab"[k % 2]).mkdir(parents=True, exist_ok=True)
        (root / "ab"[k % 2] / path.name).write_bytes(path.read_bytes())
    spec = ClipSpec(frame_offsets=(0, 2, 3), size=120, frame_size=144)
    for kwargs in ({"train": True, "batch_size": 3, "seed": 5, "cache_bytes": 0},
                   {"train": False, "batch_size": 5, "clips_per_video": 2, "views": 4}):
        runs = []
        for batch, prefetch, pipelines in (("1", "1", "1"), ("3", "2", "4")):
            monkeypatch.setenv("VIDCONV_DALI_BATCH", batch)
            monkeypatch.setenv("VIDCONV_DALI_PREFETCH", prefetch)
            monkeypatch.setenv("VIDCONV_DALI_PIPELINES", pipelines)
            loader = ClipLoader(root, spec, backend="dali", device="cuda", **kwargs)
            assert loader.report.backends == {"dali-gpu": len(gpu_files)}
            assert loader._decoder("dali-gpu").pipelines == int(pipelines)
            runs.append(batches(loader))
        assert_same(*runs)
        assert runs[0][0][0].device.type == "cuda"
