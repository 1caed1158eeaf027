"""``vidconv prepare``: decode every video of a source once into JPEG-frame tar shards.

Each video is decoded whole with PyAV in a worker process, turned upright, centre-cropped and
resized to ``frame_size`` exactly as :class:`vidconv.data.ClipLoader` does it for video files
(the same code: :mod:`vidconv.data.decode`), optionally thinned to ``fps`` frames per second,
encoded as JPEG and written as one WebDataset sample (see :mod:`vidconv.data.shards` for the
layout). Frames are in presentation order; a video's frame count is the number of frames that
decoded.

Resuming: shards are written under temporary names and renamed once fsync'd, each followed by
its frame table; videos found unusable are appended to ``skipped.jsonl`` at once. A prepare
that is killed and run again with the same source and options keeps every finished shard,
drops the unfinished one and carries on with the videos not yet in a finished shard or the
skip list. ``index.json`` is written last, so a reader never takes an unfinished output for a
dataset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vidconv.data.decode import DecodeError, _convert, _open, _rotation_of, reformatter
from vidconv.data.shards import (
    FORMAT,
    FORMAT_VERSION,
    INDEX_NAME,
    REPORT_NAME,
    SKIPPED_NAME,
    PreparedSource,
    ShardWriter,
    encode_jpeg,
    jpeg_library,
    sample_key,
    shard_name,
    table_name,
    write_atomic,
)
from vidconv.data.sources import open_source

log = logging.getLogger("vidconv.data")

FRAME_SIZES = (200, 178)
DEFAULT_SHARD_BYTES = 1 << 30
DEFAULT_QUALITY = 90


@dataclass
class PrepareReport:
    """What a prepare run did. ``skipped``: ``{"index", "source", "reason"}`` per unusable
    video (from earlier runs of a resumed prepare too); ``seconds`` and ``video_seconds``
    cover this run only."""

    out: str
    num_videos: int = 0
    num_prepared: int = 0
    num_skipped: int = 0
    num_shards: int = 0
    resumed_videos: int = 0
    frames: int = 0
    bytes: int = 0
    seconds: float = 0.0
    video_seconds: float = 0.0
    jpeg: str = ""
    skipped: list[dict[str, Any]] = field(default_factory=list)

    @property
    def realtime_factor(self) -> float:
        """Seconds of video prepared per second of this run."""
        return self.video_seconds / self.seconds if self.seconds > 0 else 0.0


def _fps_of(stream) -> float | None:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else None


def prepare_video(path: str | Path, frame_size: int, quality: int, fps: float | None = None
                  ) -> tuple[list[bytes], float | None]:
    """One video's frames as JPEG bytes (presentation order, upright, centre square resized
    to ``frame_size``, thinned to about ``fps`` per second when the video has more), and the
    frame rate of what is returned.

    Raises:
        DecodeError: the file cannot be opened or decoded, or has no frame.
    """
    import av

    path = Path(path)
    container = _open(path)
    decoded: list[tuple[int, int, bytes]] = []
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = 1
        source_fps = _fps_of(stream)
        rotation = None
        converter = reformatter()
        try:
            for counter, frame in enumerate(container.decode(stream)):
                if rotation is None:
                    rotation = _rotation_of(frame)
                rgb = _convert(frame, rotation, frame_size, converter)
                key = frame.pts if frame.pts is not None else counter
                decoded.append((key, counter, encode_jpeg(rgb, quality)))
        except (av.error.FFmpegError, OSError) as exc:
            raise DecodeError(path, f"decoding failed after {len(decoded)} frame(s) "
                              f"({type(exc).__name__}: {exc})") from exc
    finally:
        container.close()
    if not decoded:
        raise DecodeError(path, "decoded no frames")
    decoded.sort(key=lambda item: (item[0], item[1]))
    frames = [data for _, _, data in decoded]
    if fps is not None and source_fps is not None and source_fps > fps:
        step = source_fps / fps
        keep = sorted({int(k * step) for k in range(int(len(frames) / step) + 1)
                       if int(k * step) < len(frames)})
        frames = [frames[i] for i in keep]
        return frames, fps
    return frames, source_fps


def _job(args: tuple[int, str, int, int, float | None]) -> dict[str, Any]:
    index, path, frame_size, quality, fps = args
    try:
        frames, rate = prepare_video(path, frame_size, quality, fps)
    except DecodeError as exc:
        return {"index": index, "reason": exc.reason}
    except MemoryError:
        return {"index": index, "reason": "ran out of memory decoding it"}
    except Exception as exc:  # a decoder bug on one file must not stop a day-long prepare
        return {"index": index, "reason": f"{type(exc).__name__}: {exc}"}
    return {"index": index, "frames": frames, "fps": rate}


def _ours(name: str) -> bool:
    """Whether a file name in OUT is one prepare writes (so resuming never writes into, or
    deletes from, a folder of something else, such as the videos with SRC and OUT swapped)."""
    if name.startswith("."):
        return name.endswith(".tmp") or name.startswith(".nfs")
    return (name in (INDEX_NAME, SKIPPED_NAME, REPORT_NAME)
            or (name.startswith("shard-") and name.endswith((".tar", ".json"))))


def _fingerprint(paths: Sequence[str]) -> str:
    return hashlib.sha1("\n".join(paths).encode()).hexdigest()


def _check_options(frame_size: int, fps: float | None, quality: int, workers: int | None,
                   shard_bytes: int) -> None:
    if frame_size not in FRAME_SIZES:
        raise ValueError(f"frame_size must be one of {FRAME_SIZES} (full-res 200, multires "
                         f"178), got {frame_size!r}")
    if fps is not None and not (isinstance(fps, int | float) and fps > 0):
        raise ValueError(f"fps must be a positive number or None, got {fps!r}")
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ValueError(f"quality must be an int in 1..100, got {quality!r}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int)
                                or workers < 1):
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    if isinstance(shard_bytes, bool) or not isinstance(shard_bytes, int) or shard_bytes < 1:
        raise ValueError(f"shard_bytes must be a positive int, got {shard_bytes!r}")


def _finished_shards(out: Path, options: dict[str, Any]) -> tuple[list[dict[str, Any]], int]:
    """Frame tables of the shards a previous run finished (shard renamed, table written and
    both agreeing), and the next shard number. Unfinished leftovers are removed."""
    for tmp in out.glob(".*.tmp"):
        tmp.unlink()
    tables = []
    numbers = []
    for table_path in sorted(out.glob("shard-*.json")):
        try:
            table = json.loads(table_path.read_text())
        except ValueError:
            table = None
        shard = out / str((table or {}).get("shard", ""))
        ok = (table is not None and shard.is_file()
              and shard.stat().st_size == table.get("bytes"))
        if not ok:
            table_path.unlink()
            continue
        if table["options"].get("source") != options["source"]:
            raise ValueError(f"{out} was started from another source (its list of videos "
                             "differs); use the same source to resume or another OUT")
        if table["options"] != options:
            changed = [k for k in options if table["options"].get(k) != options[k]]
            raise ValueError(f"{out} was started with other options ("
                             + ", ".join(f"{k}: {table['options'].get(k)!r}, now {options[k]!r}"
                                         for k in changed)
                             + "); use the same options to resume or another OUT")
        tables.append(table)
        numbers.append(int(table["number"]))
    named = {t["shard"] for t in tables}
    for shard in out.glob("shard-*.tar"):
        if shard.name not in named:  # renamed but killed before its table was written
            shard.unlink()
    return tables, (max(numbers) + 1 if numbers else 0)


def _read_skipped(out: Path) -> list[dict[str, Any]]:
    path = out / SKIPPED_NAME
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # the last line of a killed run may be cut
            continue
    return rows


def _results(todo: list[tuple[int, str, int, int, float | None]], workers: int
             ) -> Iterator[dict[str, Any]]:
    """Job results in submission order, at most a few jobs per worker ahead (decoded
    frames wait in memory until written)."""
    if workers == 1:
        for job in todo:
            yield _job(job)
        return
    done = 0
    while done < len(todo):
        try:
            with ProcessPoolExecutor(workers) as pool:
                pending: deque[Future] = deque()
                jobs = iter(todo[done:])
                for job in jobs:
                    pending.append(pool.submit(_job, job))
                    if len(pending) >= 3 * workers:
                        break
                while pending:
                    result = pending.popleft().result()
                    nxt = next(jobs, None)
                    if nxt is not None:
                        pending.append(pool.submit(_job, nxt))
                    done += 1
                    yield result
        except BrokenProcessPool:
            # A decoder crashed its process (FFmpeg on a hostile file). Which of the jobs in
            # flight did it is unknown: run the oldest alone; if it crashes again it is the
            # culprit and is skipped, else the pool restarts after it.
            yield _isolated(todo[done])
            done += 1


def _isolated(job: tuple[int, str, int, int, float | None]) -> dict[str, Any]:
    try:
        with ProcessPoolExecutor(1) as pool:
            return pool.submit(_job, job).result()
    except BrokenProcessPool:
        return {"index": job[0], "reason": "the decoder crashed its process on this file"}


def prepare(source: Any, out: str | Path, *, frame_size: int = 200, fps: float | None = None,
            quality: int = DEFAULT_QUALITY, workers: int | None = None,
            shard_bytes: int = DEFAULT_SHARD_BYTES, root: str | Path | None = None,
            progress: bool = False,
            on_shard: Callable[[Path], None] | None = None) -> PrepareReport:
    """Decode a video source (folder or list file, see :func:`vidconv.data.open_source`) into
    a prepared dataset at ``out``; resumes an unfinished one (see the module docstring).

    Args:
        frame_size: 200 (full-resolution models) or 178 (multiresolution models).
        fps: keep about this many frames per second (None: every frame).
        quality: JPEG quality, 1-100.
        workers: decoding processes (default: the CPU count).
        shard_bytes: a shard is closed once it holds this many bytes (~1 GiB by default).
        progress: show a progress bar (tqdm).
        on_shard: called with each finished shard's path.

    Returns:
        the run's :class:`PrepareReport` (also written to ``out/report.json``).

    Raises:
        ValueError: a bad option, ``out`` started with other options or another source, or
            ``source`` is itself prepared data; FileNotFoundError: a missing source.
    """
    _check_options(frame_size, fps, quality, workers, shard_bytes)
    src = open_source(source, root)
    if isinstance(src, PreparedSource):
        raise ValueError(f"source {source!r} is already prepared data; give the videos")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"OUT {str(out)!r} exists and is not a folder")
    if out.is_dir():
        strangers = [p.name for p in out.iterdir() if not _ours(p.name)]
        if strangers:
            raise ValueError(f"OUT {str(out)!r} holds files that are not vidconv prepare "
                             f"output (e.g. {strangers[0]!r}); give an empty or new folder")
    out.mkdir(parents=True, exist_ok=True)
    workers = workers or max(1, os.cpu_count() or 1)
    paths = [str(v.path) for v in src.videos]
    options = {"frame_size": frame_size, "fps": fps, "quality": quality,
               "source": _fingerprint(paths)}
    started = time.perf_counter()
    index_path = out / INDEX_NAME
    if index_path.is_file():
        old = json.loads(index_path.read_text())
        if old.get("options") != options:
            raise ValueError(f"{out} already holds prepared data made from another source or "
                             f"with other options ({old.get('options')}); choose another OUT")
        index_path.unlink()  # rewritten below from the shards, which are all finished

    tables, number = _finished_shards(out, options)
    skipped = _read_skipped(out)
    done = {int(s["index"]) for t in tables for s in t["samples"]}
    done |= {int(r["index"]) for r in skipped}
    todo = [(i, p, frame_size, quality, fps) for i, p in enumerate(paths) if i not in done]
    report = PrepareReport(out=str(out), num_videos=len(paths), resumed_videos=len(done),
                           jpeg=jpeg_library())
    if done:
        log.info("vidconv prepare: resuming %s: %d of %d videos done", out, len(done),
                 len(paths))

    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(paths), initial=len(done), unit="video", desc="prepare")
    writer: ShardWriter | None = None
    skip_log = open(out / SKIPPED_NAME, "a")
    videos = src.videos

    def close_shard() -> None:
        nonlocal writer, number
        assert writer is not None
        size = writer.close()
        table = {"shard": writer.path.name, "number": number, "bytes": size,
                 "options": options, "samples": writer.samples}
        write_atomic(out / table_name(number), json.dumps(table).encode())
        tables.append(table)
        report.bytes += size
        if on_shard is not None:
            on_shard(writer.path)
        writer, number = None, number + 1

    try:
        for result in _results(todo, workers):
            i = result["index"]
            if "reason" in result:
                row = {"index": i, "source": paths[i], "reason": result["reason"]}
                skip_log.write(json.dumps(row) + "\n")
                skip_log.flush()
                os.fsync(skip_log.fileno())
                skipped.append(row)
                log.warning("vidconv prepare: skipping %s: %s", paths[i], result["reason"])
            else:
                if writer is None:
                    writer = ShardWriter(out / shard_name(number))
                frames = result["frames"]
                label = videos[i].label
                meta = {"index": i, "label": label, "class": src.classes[label],
                        "fps": result["fps"], "num_frames": len(frames), "source": paths[i],
                        "frame_size": frame_size}
                writer.add(sample_key(i), frames, meta)
                report.frames += len(frames)
                if result["fps"]:
                    report.video_seconds += len(frames) / result["fps"]
                if writer.bytes >= shard_bytes:
                    close_shard()
            if bar is not None:
                bar.update(1)
        if writer is not None:
            close_shard()
    except BaseException:
        if writer is not None:
            writer.abandon()
        raise
    finally:
        skip_log.close()
        if bar is not None:
            bar.close()

    tables.sort(key=lambda t: t["number"])
    shards, samples = [], []
    for k, table in enumerate(tables):
        shards.append({"name": table["shard"], "table": table_name(table["number"]),
                       "bytes": table["bytes"], "samples": len(table["samples"])})
        for s in table["samples"]:
            samples.append({key: s[key] for key in ("index", "key", "label", "num_frames",
                                                    "fps", "source", "start", "end")}
                           | {"shard": k})
    samples.sort(key=lambda s: s["index"])
    skipped.sort(key=lambda r: r["index"])
    index = {"format": FORMAT, "version": FORMAT_VERSION, "frame_size": frame_size,
             "fps": fps, "quality": quality, "options": options, "classes": list(src.classes),
             "source": str(getattr(src, "location", source)), "shards": shards,
             "samples": samples, "skipped": skipped}
    report.num_prepared = len(samples)
    report.num_skipped = len(skipped)
    report.num_shards = len(shards)
    report.skipped = skipped
    report.seconds = time.perf_counter() - started
    write_atomic(out / REPORT_NAME, json.dumps(asdict(report) | {
        "realtime_factor": report.realtime_factor}, indent=1).encode())
    write_atomic(index_path, json.dumps(index).encode())
    return report
