"""Worker processes of the loader (vidconv.data.workers): the same batches as threads, bad
videos and errors reported by the loader, dead workers named instead of a hang, shared slots
never overwritten while held."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
import warnings
from pathlib import Path

import pytest
import torch

from vidconv.clip import ClipSpec
from vidconv.data import ClipLoader, DecodeError
from vidconv.data.prepare import prepare
from vidconv.data.workers import WorkerError

pytestmark = pytest.mark.usefixtures("one_torch_thread")
synthetic = pytest.importorskip("vidconv.data.synthetic")

SPEC = ClipSpec(tuple(range(10)), 170)
MULTIRES = ClipSpec(tuple(range(4)), 89, multires=True, frame_size=178)


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("worker_videos") / "videos"
    synthetic.write_dataset(root, classes=2, videos_per_class=4, frames=24, size=64, seed=3,
                            workers=1)
    return root


@pytest.fixture(scope="module")
def prepared(videos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("worker_prep") / "prep"
    prepare(videos, out, workers=1, quality=90, shard_bytes=200_000)
    return out


def _same(a: list, b: list) -> None:
    assert len(a) == len(b) and len(a) > 0
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.labels, y.labels) and torch.equal(x.video_index, y.video_index)
        xs = x.inputs if isinstance(x.inputs, tuple) else (x.inputs,)
        ys = y.inputs if isinstance(y.inputs, tuple) else (y.inputs,)
        for u, v in zip(xs, ys, strict=True):
            assert u.shape == v.shape and torch.equal(u, v)


@pytest.mark.parametrize("kind", ["prepared", "videos multires"])
@pytest.mark.parametrize("train", [True, False])
def test_processes_give_the_threads_batches(prepared: Path, videos: Path, kind: str,
                                            train: bool) -> None:
    source, spec = (prepared, SPEC) if kind == "prepared" else (videos, MULTIRES)
    kw = dict(batch_size=3, train=train, clips_per_video=2, views=2, seed=4, cache_bytes=0)
    threads = ClipLoader(source, spec, num_workers=2, **kw)
    with ClipLoader(source, spec, num_workers=2, worker_type="process", **kw) as procs:
        assert procs.worker_pids == []
        for epoch in (0, 1):
            threads.set_epoch(epoch)
            procs.set_epoch(epoch)
            # Every batch is kept while the next ones are made: no slot may be overwritten.
            _same(list(threads), list(procs))
        assert len(procs.worker_pids) == 2
        _same(list(threads.iter_from(2)), list(procs.iter_from(2)))
    assert procs.worker_pids == []


def test_video_files_and_the_whole_video_cache(videos: Path) -> None:
    kw = dict(batch_size=2, seed=1, backend="pyav")
    for cache in (0, None):
        threads = ClipLoader(videos, SPEC, cache_bytes=cache, **kw)
        with ClipLoader(videos, SPEC, cache_bytes=cache, num_workers=3, worker_type="process",
                        **kw) as procs:
            assert procs.report.cached == (cache is None)
            _same(list(threads), list(procs))


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_every_start_method(prepared: Path, start_method: str) -> None:
    kw = dict(batch_size=4, seed=2, cache_bytes=0)
    with warnings.catch_warnings():
        # Python 3.12+ warns about fork in a process with threads; forking is what is tested.
        warnings.simplefilter("ignore", DeprecationWarning)
        with ClipLoader(prepared, SPEC, num_workers=2, worker_type="process",
                        start_method=start_method, **kw) as procs:
            _same(list(ClipLoader(prepared, SPEC, **kw)), list(procs))


def _damage(prepared: Path, out: Path, sample: int, frames: tuple[int, ...] = (9, 14)) -> None:
    """Corrupts frames of a sample; the default two make every 10-frame clip of it fail."""
    shutil.copytree(prepared, out)
    index = json.loads((out / "index.json").read_text())
    s = index["samples"][sample]
    shard = index["shards"][s["shard"]]
    table = json.loads((out / shard["table"]).read_text())
    where = next(t["frames"] for t in table["samples"] if t["key"] == s["key"])
    with open(out / shard["name"], "r+b") as f:
        for i in frames:
            offset, size, _ = where[i]
            f.seek(offset + size // 2)
            f.write(b"\x00\x13\x37\x00")


def test_a_bad_video_found_by_a_worker_is_reported_by_the_loader(prepared: Path,
                                                                 tmp_path: Path) -> None:
    out = tmp_path / "damaged"
    _damage(prepared, out, sample=2)
    kw = dict(batch_size=3, seed=5, cache_bytes=0)
    with pytest.warns(Warning, match="does not match its CRC-32"):
        threads = ClipLoader(out, SPEC, **kw)
        expected = list(threads)
    with ClipLoader(out, SPEC, num_workers=2, worker_type="process", **kw) as procs:
        with pytest.warns(Warning, match="does not match its CRC-32") as caught:
            got = list(procs)
        _same(expected, got)
        assert [s.index for s in procs.report.skipped] == [2]
        assert procs.report.num_usable == procs.report.num_videos - 1
        assert sum("CRC-32" in str(w.message) for w in caught) == 1
        # Known bad now: the next epoch's workers do not try it again, nor warn.
        procs.set_epoch(1)
        threads.set_epoch(1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _same(list(threads), list(procs))
    with ClipLoader(out, SPEC, num_workers=2, worker_type="process", strict=True,
                    **kw) as strict:
        with pytest.raises(DecodeError, match="CRC-32") as raised:
            list(strict)
        assert raised.value.path.endswith(str(Path(threads.source.videos[2].path).name))
        # The loader is still usable after the error.
        with pytest.raises(DecodeError):
            list(strict)


def test_an_exception_that_cannot_be_pickled_arrives_with_its_traceback(
        prepared: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vidconv.data.shards import PreparedSource

    class Unpicklable(Exception):  # a local class: pickling it fails
        pass

    def broken(self, *args, **kwargs):
        raise Unpicklable("the decoder blew up")

    monkeypatch.setattr(PreparedSource, "decode_video", broken)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with ClipLoader(prepared, SPEC, batch_size=4, cache_bytes=0, num_workers=1,
                        worker_type="process", start_method="fork") as procs:
            with pytest.raises(WorkerError, match="raised Unpicklable: the decoder blew up") \
                    as raised:
                list(procs)
    cause = raised.value.__cause__
    assert isinstance(cause, WorkerError) and "Traceback" in str(cause) \
        and "in broken" in str(cause)


def test_a_killed_worker_is_an_error_naming_it_not_a_hang(prepared: Path) -> None:
    kw = dict(batch_size=1, seed=6, cache_bytes=0)
    expected = list(ClipLoader(prepared, SPEC, **kw))
    with ClipLoader(prepared, SPEC, num_workers=2, worker_type="process", **kw) as procs:
        it = iter(procs)
        next(it)
        victim = procs.worker_pids[0]
        os.kill(victim, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(WorkerError, match=rf"pid {victim}\) was killed by signal 9"):
            for _ in it:
                pass
        assert time.monotonic() - t0 < 30
        # New workers on the next iteration.
        _same(expected, list(procs))
        assert victim not in procs.worker_pids


def test_an_abandoned_iteration_leaves_nothing_behind(prepared: Path) -> None:
    kw = dict(batch_size=1, seed=7, cache_bytes=0)
    expected = list(ClipLoader(prepared, SPEC, **kw))
    with ClipLoader(prepared, SPEC, num_workers=2, worker_type="process", **kw) as procs:
        for _ in range(3):
            for k, _batch in enumerate(procs):
                if k == 1:
                    break
        _same(expected, list(procs))
        # Batches let go of are written again: a steady epoch allocates no new slots.
        before = len(procs._workers._slots)
        for _ in procs:
            pass
        assert len(procs._workers._slots) == before


def test_bad_worker_arguments_are_named(prepared: Path) -> None:
    with pytest.raises(ValueError, match="worker_type must be one of"):
        ClipLoader(prepared, SPEC, num_workers=1, worker_type="greenlet")
    with pytest.raises(ValueError, match="worker_type='process' needs num_workers >= 1, got 0"):
        ClipLoader(prepared, SPEC, worker_type="process")
    with pytest.raises(ValueError, match="start_method must be one of"):
        ClipLoader(prepared, SPEC, num_workers=1, worker_type="process", start_method="thread")


@pytest.mark.cuda
def test_a_cuda_loader_preprocesses_worker_clips_on_the_gpu(prepared: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    kw = dict(batch_size=3, seed=8, cache_bytes=0, device="cuda", backend="pyav")
    threads = ClipLoader(prepared, SPEC, num_workers=2, **kw)
    with ClipLoader(prepared, SPEC, num_workers=2, worker_type="process", **kw) as procs:
        got = list(procs)
        assert all(b.inputs.device.type == "cuda" for b in got)
        _same(list(threads), got)


def test_gpu_decoding_backends_need_threads(videos: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ClipLoader, "_choose_backend", lambda self, codec, dali_ok: "dali-gpu")
    with pytest.raises(ValueError, match="worker_type='process' decodes on the CPU, but this "
                       "source's videos use dali-gpu"):
        ClipLoader(videos, SPEC, num_workers=1, worker_type="process")
    ClipLoader(videos, SPEC, num_workers=1)  # threads take it


def test_train_and_evaluate_with_worker_processes(prepared: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from vidconv.cli import main
    from vidconv.data.loader import WORKER_TYPES
    from vidconv.train.config import WORKER_TYPES as CONFIG_WORKER_TYPES

    assert CONFIG_WORKER_TYPES == WORKER_TYPES
    run = tmp_path / "run"
    assert main(["train", str(prepared), "--out", str(run), "--steps", "2", "--batch-size", "3",
                 "--width", "0.05", "--no-progress", "--workers", "2",
                 "--worker-type", "process"]) == 0
    assert "done: 2/2 steps" in capsys.readouterr().out
    assert main(["evaluate", str(run), str(prepared), "--clips", "1", "--views", "1",
                 "--no-progress", "--no-plots", "--workers", "1",
                 "--worker-type", "process"]) == 0
    assert json.loads((run / "eval" / "report.json").read_text())["num_clips"] == 8
    with pytest.raises(SystemExit) as exited:
        main(["train", str(prepared), "--out", str(tmp_path / "r2"), "--worker-type", "x"])
    assert exited.value.code == 2
    assert "invalid choice: 'x'" in capsys.readouterr().err


def test_one_iteration_at_a_time_and_kept_batches_in_ordinary_memory(prepared: Path) -> None:
    kw = dict(batch_size=1, seed=9, cache_bytes=0)
    expected = list(ClipLoader(prepared, SPEC, **kw))
    with ClipLoader(prepared, SPEC, num_workers=2, worker_type="process", **kw) as procs:
        first = iter(procs)
        next(first)
        _same(expected, list(procs))  # a second iteration supersedes the first
        with pytest.raises(RuntimeError, match="serves one iteration at a time"):
            next(first)
        kept = list(procs)
        _same(expected, kept)
        capacity = 2 * 2 + 2
        # Batches beyond the kept slots were copied out of shared memory.
        assert sum(b.inputs.is_shared() for b in kept) <= capacity < len(kept)
    with ClipLoader(prepared, SPEC, num_workers=2, worker_type="process", reuse_buffers=False,
                    **kw) as fresh:
        got = list(fresh)
        _same(expected, got)
        assert not any(b.inputs.is_shared() for b in got)


def test_bad_videos_are_reported_and_left_out_as_one_after_another(prepared: Path,
                                                                  tmp_path: Path) -> None:
    out = tmp_path / "damaged"
    _damage(prepared, out, sample=1, frames=(9,))
    # Eval, one clip per batch: the clips of video 1 start at frames 0, 7 and 14, so the first
    # two fail and the last decodes. Made one after another, the first failure leaves the
    # video out from then on; with three workers the last clip is decoded by a worker that
    # has not heard of it yet, and must still be left out.
    kw = dict(batch_size=1, train=False, clips_per_video=3, views=1, seed=1, cache_bytes=0)
    with pytest.warns(Warning, match="CRC-32"):
        expected = list(ClipLoader(out, SPEC, **kw))
    assert sum(int(b.video_index) == 1 for b in expected) == 0
    with ClipLoader(out, SPEC, num_workers=3, worker_type="process", **kw) as procs:
        with pytest.warns(Warning, match="CRC-32"):
            _same(expected, list(procs))
    # Found in a batch that is never yielded (the iteration is dropped first): still reported.
    with ClipLoader(out, SPEC, num_workers=1, worker_type="process", **kw) as procs:
        with pytest.warns(Warning, match="CRC-32"):
            it = iter(procs)
            next(it)
            next(it)
            time.sleep(1.0)  # let the worker reach the damaged clips
            it.close()
            list(procs)
        assert [s.index for s in procs.report.skipped] == [1]
        assert procs.report.num_usable == procs.report.num_videos - 1
