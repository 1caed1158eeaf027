"""Clips ready for the models: sampling, decoding, preprocessing, sharding, bad-file handling.

:class:`ClipLoader` turns a source (:func:`vidconv.data.open_source`) and a model's
:class:`~vidconv.clip.ClipSpec` into batches of normalised model input.

Sampling rules
    - Train (``train=True``): an epoch visits every usable video of this shard exactly once,
      in an order shuffled per epoch, one clip per video (``clips_per_video`` and ``views`` are
      for evaluation only). Each clip has a uniformly random start in ``[0, frames - span]``,
      a random ``size`` x ``size`` crop offset and a left-right flip with p = 0.5, the same for
      all its frames. For multiresolution specs the fovea stays centred (the paper's fovea is
      the frame's centre) and only the flip is random.
    - Eval (``train=False``): ``clips_per_video`` clips per video whose starts are evenly
      spaced over ``[0, frames - span]`` (both ends included; one clip sits in the middle),
      each expanded into ``views`` views taken in this order from :data:`VIEWS`: centre,
      centre flipped, top-left, bottom-right flipped, top-right, bottom-left flipped, then the
      same four corners with the other flip (1 to 10 views; 4 = centre, centre flipped and two
      opposite corners of opposite flips). Multires specs keep the fovea centred, so their
      views differ by flip only. Videos come in source order, each video's clips and views
      together (clip-major, then view).
    - Randomness comes only from ``(seed, epoch, shard)``: a NumPy generator seeded with
      ``(seed, epoch)`` draws every video's clip parameters before sharding, so iteration is
      independent of the global torch / NumPy RNG, and re-iterating an epoch repeats it.
    - Sharding: train shards split each epoch's shuffled order round-robin
      (``order[shard_id::num_shards]``), eval shards split the videos the same way (all clips
      of a video in one shard); the parts are disjoint and cover every usable video.
      ``shard_id`` / ``num_shards`` default to torch.distributed's rank and world size when a
      process group is initialised.
    - Batches hold ``batch_size`` clips, the last one of an epoch fewer (nothing is dropped).

Bad files
    Every file is probed at construction (container, stream, frame timestamps, first frame).
    A file that cannot be read, or has fewer frames than the clip spans, is skipped with one
    :class:`BadVideoWarning` naming it and recorded in :attr:`ClipLoader.report`; a file that
    fails later while decoding (a stream damaged past its first frame) is skipped from then on
    the same way, and its clips are left out of their batch (that batch is smaller; a batch
    left with no clip is not yielded). Without the cache only the frames a clip needs are
    decoded, so a clip in the undamaged part of such a file still loads. A folder or a broken
    symbolic link named like a video, and a listed file that does not exist, are skipped the
    same way, each with its reason. DALI's CPU decoder runs in a worker process
    (:mod:`vidconv.data.dali`): a file it crashes or hangs on is skipped like any bad one and
    the run goes on. With ``strict=True`` the first bad file raises
    :class:`~vidconv.data.decode.DecodeError` naming it instead. A source of which no video at
    all is usable raises ``ValueError`` at construction, saying why (the commonest reasons,
    with an example file each).

Report
    :attr:`ClipLoader.report` (:class:`LoaderReport`) keeps its counts consistent while
    iterating: a video skipped while decoding comes off ``num_usable`` and its class's
    ``videos_per_class``; a class with no usable video left is listed in ``empty_classes`` and
    warned about once.

Decoding and caching
    Frames are decoded, turned to display orientation, centre-cropped to a square and resized
    to ``spec.frame_size`` (200 full-res, 178 multires), then cropped / normalised by
    :func:`vidconv.ops.crop_normalize` or :func:`vidconv.ops.fovea_context` on ``device``.
    When every usable video of this loader fits in ``cache_bytes`` as resized uint8 frames,
    each video is decoded once, whole, and kept in memory for the loader's life (small
    datasets train for many epochs); otherwise only the frames a batch needs are decoded
    (from the start, or after a seek to the keyframe before the first needed frame when that
    frame is 96 or more frames in). Frames are indexed in presentation (timestamp) order.

Backends
    "auto" chooses per file from the probed codec and logs the count per backend once (in
    the start-up summary, logger ``vidconv.data``); :attr:`LoaderReport.backends` has it too.
    DALI (:mod:`vidconv.data.dali`) and PyAV decode the same YUV but convert to RGB and
    resize with different rounding: a few grey levels apart. torchcodec
    (:mod:`vidconv.data.torchcodec_decode`; FFmpeg on the CPU, NVDEC on CUDA) is used only when
    asked for (``backend="torchcodec"``, reported as "torchcodec-cpu" / "torchcodec-gpu"):
    "auto" never picks it: on the CPU it decoded and resized the loader's clips and whole
    videos slower than PyAV in 29 of 32 timed cases, at 0.4-1.3x PyAV's speed
    (``benchmarks/decode_backends.py``, 2 cores), and its NVDEC path has not been measured on
    a GPU. Its unresized frames equal PyAV's; resized ones
    are about a grey level apart.

Prepared data
    A source made by ``vidconv prepare`` (:class:`vidconv.data.shards.PreparedSource`) holds
    every video's frames already upright, cropped and resized, as JPEG: the rules above apply
    unchanged (its videos are the source's usable ones, in the same order, with their decoded
    frame counts), and only the frames a clip needs are read and decoded. Backends: "jpeg"
    (CPU, simplejpeg or Pillow) for "auto" and "pyav" on the CPU; "dali-jpeg" (DALI's
    ``fn.decoders.image``: nvJPEG on CUDA, DALI's CPU decoder for ``backend="dali"`` on the
    CPU) when DALI imports and the device is CUDA or DALI is asked for. The spec's
    ``frame_size`` must be the one the data was prepared with. Prepared data split per node
    (``VIDCONV_SHARDS_PER_NODE=1``) holds only this node's shards, which are split among the
    node's ranks (its ``rank_split``) in place of ``shard_id`` / ``num_shards``.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import warnings
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vidconv.clip import ClipSpec
from vidconv.data.buffers import BufferPool
from vidconv.data.decode import DecodeError, VideoInfo, decode_frames, probe
from vidconv.data.shards import PREPARED_CODEC
from vidconv.data.sources import open_source
from vidconv.data.workers import START_METHODS, ProcessWorkers

log = logging.getLogger("vidconv.data")

BACKENDS = ("auto", "pyav", "dali", "torchcodec")
WORKER_TYPES = ("thread", "process")
# Per-file backends that decode on the GPU (worker processes decode on the CPU).
GPU_BACKENDS = ("dali-gpu", "torchcodec-gpu")
DEFAULT_CACHE_BYTES = 1 << 30

# (corner, flip) per eval view; see the module docstring.
VIEWS: tuple[tuple[str, bool], ...] = (
    ("centre", False), ("centre", True), ("top-left", False), ("bottom-right", True),
    ("top-right", False), ("bottom-left", True), ("top-left", True), ("bottom-right", False),
    ("top-right", True), ("bottom-left", False),
)


class BadVideoWarning(UserWarning):
    """A video file was skipped (unreadable, damaged, or shorter than the clip)."""


@dataclass
class SkippedVideo:
    """One skipped file: its index in ``source.videos``, its path, why, and when it was found
    ("probe" at construction or "decode" while iterating)."""

    index: int
    path: str
    reason: str
    stage: str


@dataclass
class LoaderReport:
    """What the loader found: dataset size per class, skipped files and decoding backends.

    The counts always add up: ``num_videos == num_usable + num_skipped`` and
    ``sum(videos_per_class.values()) == num_usable``; a video skipped while decoding is taken
    off both. ``videos_per_class`` counts usable videos (``found_per_class`` every listed one),
    and ``empty_classes`` names the classes left with no usable video (flagged with a
    :class:`BadVideoWarning` too).
    """

    num_videos: int = 0
    num_usable: int = 0
    num_skipped: int = 0
    skipped: list[SkippedVideo] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    videos_per_class: dict[str, int] = field(default_factory=dict)
    found_per_class: dict[str, int] = field(default_factory=dict)
    empty_classes: list[str] = field(default_factory=list)
    backends: dict[str, int] = field(default_factory=dict)
    cached: bool = False

    def summary(self) -> str:
        """A few lines for logs: sizes, classes, backends and every skipped file."""
        lines = [f"{self.num_videos} videos in {len(self.classes)} classes, {self.num_usable} "
                 f"usable, {self.num_skipped} skipped; backends "
                 + ", ".join(f"{k}: {v}" for k, v in sorted(self.backends.items()))]
        per_class = ", ".join(f"{k}: {v}" for k, v in self.videos_per_class.items())
        lines.append(f"usable videos per class: {per_class}")
        if self.empty_classes:
            lines.append("classes with no usable video: " + ", ".join(self.empty_classes))
        lines += [f"skipped {s.path}: {s.reason}" for s in self.skipped]
        return "\n".join(lines)


@dataclass
class Batch:
    """Model input, labels (int64 (N,)) and each clip's index into ``source.videos``."""

    inputs: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
    labels: torch.Tensor
    video_index: torch.Tensor


@dataclass(frozen=True)
class _Item:
    video: int
    start: int
    flip: bool
    offset: tuple[int, int]


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _shards(shard_id: int | None, num_shards: int | None) -> tuple[int, int]:
    if shard_id is None and num_shards is None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1
    if shard_id is None or num_shards is None:
        raise ValueError(f"shard_id and num_shards go together, got shard_id={shard_id!r}, "
                         f"num_shards={num_shards!r}")
    _positive_int("num_shards", num_shards)
    if isinstance(shard_id, bool) or not isinstance(shard_id, int) \
            or not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id must be an int in [0, {num_shards}), got {shard_id!r}")
    return shard_id, num_shards


def _view_offset(corner: str, free: int) -> tuple[int, int]:
    centre = free // 2
    return {"centre": (centre, centre), "top-left": (0, 0), "top-right": (0, free),
            "bottom-left": (free, 0), "bottom-right": (free, free)}[corner]


class ClipLoader:
    """Batches of clips from a video source, ready for a model with clip spec ``spec``.

    Args:
        source: a source from :func:`vidconv.data.open_source` (or a path it accepts).
        spec: the model's clip spec (frame offsets, input size, multires, stream, frame size).
        batch_size: clips per batch.
        train: random clips, crops and flips (True) or evenly spaced clips and fixed views.
        clips_per_video: eval clips per video (the paper: 20).
        views: eval views per clip, 1 to 10 (see :data:`VIEWS`; the paper: 4).
        device: where batches are made (decoded frames go there, preprocessing runs there).
        backend: "auto" (per file: DALI NVDEC on CUDA, DALI CPU for VP8/VP9/MJPEG on the CPU,
            when DALI imports; PyAV otherwise; never torchcodec, see Backends above), "pyav",
            "dali" (DALI for every file; on the CPU a codec DALI cannot decode makes that file a
            skipped one) or "torchcodec" (every file, on ``device``).
        seed: non-negative int; with the epoch and shard, all the randomness of an epoch.
        shard_id, num_shards: this process's part (default: torch.distributed rank / world).
        strict: raise on the first bad file instead of skipping it.
        num_workers: threads or processes making batches ahead (0: in the iterating thread).
        worker_type: "thread" (default) or "process": ``num_workers`` worker processes
            (:mod:`vidconv.data.workers`), started at the first iteration and kept for the
            loader's life (:meth:`close` stops them), which scale with the cores where threads
            stop at the loader's Python. They decode on the CPU: backends that decode on the
            GPU (DALI's NVDEC and nvJPEG paths, torchcodec on CUDA) need threads. For a CUDA
            ``device`` the workers hand over uint8 clips and the crop and normalisation run on
            the GPU. Each worker keeps its own whole-video cache (up to ``cache_bytes`` each)
            when the cache is used. The batches are those of ``num_workers=0``, bad videos
            included (a video found bad is left out of every later batch). Batches live in
            shared memory that is written again once nothing refers to it (``reuse_buffers``):
            clone a batch before sending it on to another process. One iteration at a time
            per loader: starting a second one makes the first raise if resumed.
        start_method: how worker processes start: "forkserver" (default), "spawn" or "fork"
            (see :class:`vidconv.data.workers.ProcessWorkers`).
        cache_bytes: memory for whole decoded videos (default: ``VIDCONV_CACHE_BYTES`` or
            1 GiB); used only when all of this loader's videos fit.
        reuse_buffers: on the CPU, write a batch's inputs into the memory of an earlier batch
            that nothing refers to any more (no tensor, view or array of it is alive; see
            :mod:`vidconv.data.buffers`) instead of fresh memory, whose pages the kernel would
            fault in and zero first. A batch you keep stays as it is. The loader holds up
            to ``num_workers + 3`` batches' inputs (twice that for multires) for its lifetime;
            worker processes ``2 * num_workers + 2`` shared-memory batches. False: fresh
            tensors.

    Raises:
        ValueError / TypeError: a bad argument (named); FileNotFoundError: a missing source.
        DecodeError: ``strict`` and a file cannot be used.
        ValueError: no video of the source is usable (the message says why), or ``device`` is
            a CUDA device and CUDA is not available.
        ImportError: ``backend="dali"`` without DALI installed, ``backend="torchcodec"``
            where torchcodec does not import (the message says why).
    """

    def __init__(self, source: Any, spec: ClipSpec, *, batch_size: int = 32, train: bool = True,
                 clips_per_video: int = 20, views: int = 1, device: str | torch.device = "cpu",
                 backend: str = "auto", seed: int = 0, shard_id: int | None = None,
                 num_shards: int | None = None, strict: bool = False, num_workers: int = 0,
                 cache_bytes: int | None = None, reuse_buffers: bool = True,
                 worker_type: str = "thread", start_method: str = "forkserver") -> None:
        if not isinstance(spec, ClipSpec):
            raise TypeError(f"spec must be a vidconv.clip.ClipSpec, got {type(spec).__name__}")
        if spec.size > spec.frame_size:
            raise ValueError(f"spec.size ({spec.size}) must be <= spec.frame_size "
                             f"({spec.frame_size})")
        if spec.stream not in ("both", "fovea", "context"):
            raise ValueError(f"spec.stream must be 'both', 'fovea' or 'context', got "
                             f"{spec.stream!r}")
        self.batch_size = _positive_int("batch_size", batch_size)
        self.clips_per_video = _positive_int("clips_per_video", clips_per_video)
        self.views = _positive_int("views", views)
        if self.views > len(VIEWS):
            raise ValueError(f"views must be 1..{len(VIEWS)}, got {views}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "torchcodec":
            from vidconv.data.torchcodec_decode import torchcodec_problem

            if torchcodec_problem() is not None:
                raise ImportError(f"backend='torchcodec': {torchcodec_problem()}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        device = torch.device(device)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"device is {str(device)!r} but CUDA is not available "
                                 "(torch.cuda.is_available() is False); use device='cpu'")
            if device.index is not None and device.index >= torch.cuda.device_count():
                raise ValueError(f"device is {str(device)!r} but only "
                                 f"{torch.cuda.device_count()} CUDA device(s) are visible")
        elif device.type != "cpu":
            raise ValueError(f"device must be 'cpu' or a CUDA device, got {str(device)!r}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
        if worker_type not in WORKER_TYPES:
            raise ValueError(f"worker_type must be one of {WORKER_TYPES}, got {worker_type!r}")
        if worker_type == "process" and num_workers == 0:
            raise ValueError("worker_type='process' needs num_workers >= 1, got 0")
        if start_method not in START_METHODS:
            raise ValueError(f"start_method must be one of {START_METHODS}, got "
                             f"{start_method!r}")
        if cache_bytes is None:
            cache_bytes = int(os.environ.get("VIDCONV_CACHE_BYTES", DEFAULT_CACHE_BYTES))
        if cache_bytes < 0:
            raise ValueError(f"cache_bytes must be >= 0, got {cache_bytes}")
        self.source = open_source(source)
        self.spec = spec
        self.train = bool(train)
        self.device = device
        self.backend = backend
        self.seed = seed
        self.strict = bool(strict)
        self.num_workers = num_workers
        self.worker_type = worker_type
        self._reuse_buffers = bool(reuse_buffers)
        self.start_method = start_method
        self._workers: ProcessWorkers | None = None
        # In a worker process: the bad videos it found, for the loader to report.
        self._found_bad: list[tuple[int, str, str]] | None = None
        self._buffers = self._new_buffer_pool()
        self.shard_id, self.num_shards = _shards(shard_id, num_shards)
        node_part = getattr(self.source, "rank_split", None)
        if node_part is not None:
            # Prepared data split per node holds this node's videos only: split them among
            # the node's ranks, not among all ranks.
            self.shard_id, self.num_shards = node_part
        self.epoch = 0
        self._lock = threading.Lock()
        self._dali: dict[str, Any] = {}

        videos = self.source.videos
        found = _per_class(self.source)
        self.report = LoaderReport(num_videos=len(videos), classes=list(self.source.classes),
                                   num_usable=len(videos), videos_per_class=dict(found),
                                   found_per_class=found)
        for name, n in found.items():
            if n == 0:
                self.report.empty_classes.append(name)
                warnings.warn(f"vidconv.data: class {name!r} has no video", BadVideoWarning,
                              stacklevel=2)
        self._infos: dict[int, VideoInfo] = {}
        self._backend_of: dict[int, str] = {}
        self._bad: set[int] = set()
        self._probe_all()
        self._usable = np.array(sorted(self._infos), dtype=np.int64)
        self.report.backends = dict(Counter(self._backend_of.values()))
        if not len(self._usable):
            raise ValueError(_nothing_usable(self.source, self.report))
        if worker_type == "process":
            on_gpu = [b for b in self.report.backends if b in GPU_BACKENDS
                      or (b == "dali-jpeg" and self.device.type == "cuda")]
            if on_gpu:
                raise ValueError(f"worker_type='process' decodes on the CPU, but this source's "
                                 f"videos use {', '.join(on_gpu)}, which decode on the GPU: "
                                 "use worker_type='thread', or a CPU backend (backend='pyav')")
        self._cache: dict[int, torch.Tensor] | None = None
        frame_bytes = spec.frame_size * spec.frame_size * 3
        mine = self._usable if self.train else self._usable[self.shard_id::self.num_shards]
        need = sum(self._infos[int(i)].num_frames for i in mine) * frame_bytes
        if need <= cache_bytes:
            self._cache = {}
            self.report.cached = True
        log.info("vidconv.data: %s", self.report.summary())

    # ---------------------------------------------------------------------------- probing

    def _probe_all(self) -> None:
        videos = self.source.videos
        threads = max(1, min(8, os.cpu_count() or 1, len(videos)))
        prepared = getattr(self.source, "probe_video", None)  # vidconv prepare output
        if prepared is not None:
            if self.source.frame_size != self.spec.frame_size:
                raise ValueError(f"prepared data {self.source.location} has "
                                 f"{self.source.frame_size}px frames, the clip spec needs "
                                 f"frame_size "
                                 f"{self.spec.frame_size}; run vidconv prepare --frame-size "
                                 f"{self.spec.frame_size}")
            results = [prepared(i) for i in range(len(videos))]
        elif threads > 1:
            with ThreadPoolExecutor(threads) as pool:
                results = list(pool.map(_try_probe, [v.path for v in videos]))
        else:
            results = [_try_probe(v.path) for v in videos]
        dali_ok = None
        for index, result in enumerate(results):
            if isinstance(result, DecodeError):
                self._skip(index, result.reason, "probe")
                continue
            if result.num_frames < self.spec.span:
                self._skip(index, f"has {result.num_frames} frame(s), fewer than the clip "
                           f"spans ({self.spec.span})", "probe")
                continue
            if dali_ok is None:
                dali_ok = self.backend not in ("pyav", "torchcodec") and _dali_importable()
                if self.backend == "dali" and not dali_ok:
                    raise ImportError("backend='dali' needs NVIDIA DALI: pip install "
                                      "nvidia-dali-cuda130 (the wheel for torch's CUDA)")
            chosen = self._choose_backend(result.codec, bool(dali_ok))
            if chosen is None:
                self._skip(index, f"codec {result.codec} is not supported by DALI on "
                           f"{self.device.type} (backend='dali')", "probe")
                continue
            self._infos[index] = result
            self._backend_of[index] = chosen

    def _choose_backend(self, codec: str, dali_ok: bool) -> str | None:
        if codec == PREPARED_CODEC:
            # JPEG frames: DALI's nvJPEG on CUDA, or DALI's CPU decoder when asked for.
            use_dali = dali_ok and (self.device.type == "cuda" or self.backend == "dali")
            return "dali-jpeg" if use_dali else "jpeg"
        if self.backend == "torchcodec":
            return "torchcodec-gpu" if self.device.type == "cuda" else "torchcodec-cpu"
        if self.backend == "pyav" or not dali_ok:
            return "pyav"
        from vidconv.data.dali import CPU_CODECS, GPU_CODECS

        gpu = self.device.type == "cuda"
        codecs = GPU_CODECS if gpu else CPU_CODECS
        if codec in codecs:
            return "dali-gpu" if gpu else "dali-cpu"
        return None if self.backend == "dali" else "pyav"

    def _skip(self, index: int, reason: str, stage: str) -> None:
        path = str(self.source.videos[index].path)
        if self.strict:
            raise DecodeError(path, reason)
        if self._found_bad is not None:
            # A worker process: the loader reports it (warning, report) when the batch comes.
            if index not in self._bad:
                self._bad.add(index)
                self._found_bad.append((index, reason, stage))
            return
        report = self.report
        with self._lock:
            if index in self._bad:
                return
            self._bad.add(index)
            report.skipped.append(SkippedVideo(index, path, reason, stage))
            report.num_skipped = len(report.skipped)
            report.num_usable = report.num_videos - report.num_skipped
            label = self.source.videos[index].label
            name = report.classes[label] if 0 <= label < len(report.classes) else None
            emptied = False
            if name in report.videos_per_class:
                report.videos_per_class[name] -= 1
                emptied = report.videos_per_class[name] == 0
                if emptied:
                    report.empty_classes.append(name)
        warnings.warn(f"vidconv.data: skipping {path}: {reason}", BadVideoWarning, stacklevel=3)
        if emptied:
            warnings.warn(f"vidconv.data: class {name!r} has no usable video left (all "
                          f"{report.found_per_class[name]} skipped)", BadVideoWarning,
                          stacklevel=3)

    # --------------------------------------------------------------------------- sampling

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose clip order and random clip parameters iteration gives."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self.epoch = epoch

    def _free(self) -> int:
        return self.spec.frame_size - self.spec.size

    def items(self) -> list[_Item]:
        """This shard's clips for the current epoch, in iteration order."""
        usable, span = self._usable, self.spec.span
        frames = np.array([self._infos[int(i)].num_frames for i in usable], dtype=np.int64)
        free = self._free()
        if self.train:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(
                [self.seed, self.epoch])))
            perm = rng.permutation(len(usable))
            starts = np.floor(rng.random(len(usable)) * (frames - span + 1)).astype(np.int64)
            flips = rng.random(len(usable)) < 0.5
            offs = rng.integers(0, free + 1, size=(len(usable), 2))
            if self.spec.multires:
                offs[:] = free // 2
            return [_Item(int(usable[j]), int(starts[j]), bool(flips[j]),
                          (int(offs[j, 0]), int(offs[j, 1])))
                    for j in perm[self.shard_id::self.num_shards]]
        out = []
        views = VIEWS[:self.views]
        for j in range(self.shard_id, len(usable), self.num_shards):
            last = int(frames[j]) - span
            for k in range(self.clips_per_video):
                if self.clips_per_video == 1:
                    start = last // 2
                else:
                    start = int(round(k * last / (self.clips_per_video - 1)))
                for corner, flip in views:
                    off = _view_offset("centre" if self.spec.multires else corner, free)
                    out.append(_Item(int(usable[j]), start, flip, off))
        return out

    def _num_items(self) -> int:
        n = len(range(self.shard_id, len(self._usable), self.num_shards))
        return n if self.train else n * self.clips_per_video * self.views

    def __len__(self) -> int:
        """Batches per epoch on this shard (the last one may hold fewer clips)."""
        return math.ceil(self._num_items() / self.batch_size)

    # --------------------------------------------------------------------------- decoding

    def _decoder(self, backend: str):
        dec = self._dali.get(backend)
        if dec is None:
            from vidconv.data.dali import DaliDecoder

            dev = self.device if backend == "dali-gpu" else torch.device("cpu")
            # In a worker process the worker count is the parallelism: one thread each.
            threads = 1 if self._found_bad is not None else max(1, self.num_workers)
            dec = DaliDecoder(dev, threads=threads)
            self._dali[backend] = dec
        return dec

    def _decode(self, index: int, frames: list[int] | None) -> np.ndarray | torch.Tensor:
        """Resized uint8 frames (K, S, S, 3) of video ``index`` (all when ``frames`` is None):
        a NumPy array on the CPU, a tensor on the device for DALI GPU."""
        info = self._infos[index]
        path = self.source.videos[index].path
        backend = self._backend_of[index]
        if backend in ("jpeg", "dali-jpeg"):
            out = self.source.decode_video(index, frames, device=None if backend == "jpeg"
                                           else self.device)
            return out.numpy() if isinstance(out, torch.Tensor) and out.device.type == "cpu" \
                else out
        if backend == "pyav":
            threads = 1 if self.num_workers > 1 or info.width * info.height < 640 * 360 else 0
            return decode_frames(path, frames, frame_size=self.spec.frame_size, info=info,
                                 threads=threads)
        if backend in ("torchcodec-cpu", "torchcodec-gpu"):
            from vidconv.data import torchcodec_decode

            threads = 1 if self.num_workers > 1 or info.width * info.height < 640 * 360 else 0
            return torchcodec_decode.decode_frames(
                path, frames, frame_size=self.spec.frame_size, info=info, threads=threads,
                device=self.device if backend == "torchcodec-gpu" else "cpu")
        from vidconv.data.dali import resize_square

        raw = self._decoder(backend).decode(path, frames)
        out = resize_square(raw, self.spec.frame_size, info.rotation)
        return out.numpy() if out.device.type == "cpu" else out

    def _video_frames(self, index: int, needed: list[int]
                      ) -> tuple[np.ndarray | torch.Tensor, dict[int, int]]:
        """Frames ``needed`` of a video and where each index sits in the returned tensor;
        uses (and fills) the whole-video cache when there is one."""
        if self._cache is not None:
            with self._lock:
                whole = self._cache.get(index)
            if whole is None:
                whole = self._decode(index, None)
                with self._lock:
                    self._cache[index] = whole
            return whole, {i: i for i in range(whole.shape[0])}
        unique = sorted(set(needed))
        got = self._decode(index, unique)
        return got, {i: k for k, i in enumerate(unique)}

    def _dali_batch(self, by_video: dict[int, list[int]]
                    ) -> dict[int, tuple[np.ndarray | torch.Tensor, dict[int, int]]]:
        """:meth:`_video_frames` for every DALI file of a batch in one
        :meth:`~vidconv.data.dali.DaliDecoder.decode_batch` call (several files per DALI run,
        several pipelines at once); a file that fails is skipped and reported, the others
        decode."""
        todo: dict[str, list[int]] = {}
        for index in by_video:
            backend = self._backend_of[index]
            if backend in ("dali-cpu", "dali-gpu") and (self._cache is None
                                                        or index not in self._cache):
                todo.setdefault(backend, []).append(index)
        from vidconv.data.dali import resize_square

        out: dict[int, tuple[np.ndarray | torch.Tensor, dict[int, int]]] = {}
        for backend, indices in todo.items():
            wanted = [None if self._cache is not None else sorted(set(by_video[i]))
                      for i in indices]
            results = self._decoder(backend).decode_batch(
                [(self.source.videos[i].path, w) for i, w in zip(indices, wanted, strict=True)])
            for index, frames, raw in zip(indices, wanted, results, strict=True):
                if isinstance(raw, DecodeError):
                    self._skip(index, raw.reason, "decode")
                    continue
                got = resize_square(raw, self.spec.frame_size, self._infos[index].rotation)
                got = got.numpy() if got.device.type == "cpu" else got
                if frames is None:
                    with self._lock:
                        self._cache[index] = got  # type: ignore[index]
                    out[index] = got, {i: i for i in range(got.shape[0])}
                else:
                    out[index] = got, {i: k for k, i in enumerate(frames)}
        return out

    def _new_buffer_pool(self) -> BufferPool | None:
        """The pool of CPU batch memory (None without reuse_buffers, or on CUDA): enough for
        the batches in flight (one per worker, plus the one being made), the one the caller
        holds and the one it has just let go of, two each for multires, plus the uint8 clips
        of each batch being decoded."""
        if not self._reuse_buffers or self.device.type != "cpu":
            return None
        return BufferPool((self.num_workers + 3) * (2 if self.spec.multires else 1)
                          + self.num_workers + 1)

    def _load(self, items: list[_Item]) -> Batch | None:
        gathered = self._gather(items)
        if gathered is None:
            return None
        clips_u8, kept = gathered
        return self._batch(self._inputs(clips_u8, kept), kept)

    def _gather(self, items: list[_Item], out: np.ndarray | None = None
                ) -> tuple[torch.Tensor, list[_Item]] | None:
        """The decoding half of a batch: the uint8 clips ``(n, T, F, F, 3)`` of the usable
        items and those items (None when no clip is left). ``out`` (at least ``len(items)``
        clips, C-contiguous) is written instead of fresh memory when every clip is decoded on
        the CPU; the clips come back as its leading part."""
        offsets = self.spec.frame_offsets
        by_video: dict[int, list[int]] = {}
        for item in items:
            if item.video not in self._bad:
                by_video.setdefault(item.video, []).extend(item.start + o for o in offsets)
        # Clips are gathered into one uint8 batch in NumPy (small torch copies go through the
        # intra-op thread pool, which costs milliseconds each on a busy machine), unless a
        # decoder hands out tensors on the GPU.
        backend_of = self._backend_of
        on_gpu = self.device.type == "cuda"
        batch: np.ndarray | None = None
        if not any(backend_of.get(it.video) == "dali-gpu"
                   or (on_gpu and backend_of.get(it.video) == "dali-jpeg") for it in items):
            size = self.spec.frame_size
            shape = (len(items), len(offsets), size, size, 3)
            if out is not None:
                batch = out[:len(items)]
            elif self._buffers is not None:
                # Decoded straight into memory an earlier batch used: fresh memory would be
                # faulted in page by page while the JPEG decoder writes it.
                batch = self._buffers.take(shape, torch.uint8).numpy()
            else:
                batch = np.empty(shape, dtype=np.uint8)
        # A prepared video with one clip in the batch is decoded straight into its slot.
        slot_of: dict[int, int] = {}
        if batch is not None and self._cache is None:
            for k, item in enumerate(items):
                slot_of[item.video] = -1 if item.video in slot_of else k
        filled: set[int] = set()
        decoded: dict[int, tuple[np.ndarray | torch.Tensor, dict[int, int]]] = \
            self._dali_batch(by_video)
        for index, needed in by_video.items():
            if index in decoded or index in self._bad:
                continue
            try:
                slot = slot_of.get(index, -1)
                if slot >= 0 and backend_of[index] == "jpeg":
                    self.source.decode_video(index, needed, out=batch[slot])
                    filled.add(slot)
                else:
                    decoded[index] = self._video_frames(index, needed)
            except DecodeError as exc:
                self._skip(index, exc.reason, "decode")
        clips: list[np.ndarray | torch.Tensor] = []
        kept, slots = [], []
        for k, item in enumerate(items):
            if k in filled:
                clips.append(batch[k])
                kept.append(item)
                slots.append(k)
                continue
            if item.video not in decoded:
                continue
            frames, where = decoded[item.video]
            start = item.start
            if start + self.spec.span > frames.shape[0] and self._cache is not None:
                # The probe counted packets; fewer frames decoded (a damaged tail): shift
                # the clip back so it ends at the last decoded frame.
                start = frames.shape[0] - self.spec.span
                if start < 0:
                    self._skip(item.video, f"decoded {frames.shape[0]} frame(s), fewer than "
                               f"the clip spans ({self.spec.span})", "decode")
                    continue
            rows = [where[start + o] for o in offsets]
            first = rows[0]
            # Consecutive rows (every clip of a dense spec) are a slice: no index array.
            picked = slice(first, first + len(rows)) \
                if rows == list(range(first, first + len(rows))) else rows
            if batch is not None and isinstance(frames, np.ndarray):
                batch[k] = frames[picked]
                clips.append(batch[k])
                slots.append(k)
            else:
                clips.append(frames[picked])
            kept.append(item)
        if not kept:
            return None
        if batch is not None and len(slots) == len(clips):
            # Close the gaps left by skipped clips in place (slots only grow), so the batch
            # is the leading part of `batch` (of `out`, when given).
            for k, slot in enumerate(slots):
                if slot != k:
                    batch[k] = batch[slot]
            return torch.from_numpy(batch[:len(slots)]), kept
        return torch.stack([torch.as_tensor(c).to(self.device) for c in clips]), kept

    def _inputs(self, clips_u8: torch.Tensor, kept: list[_Item],
                out: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None) -> Any:
        """The device half of a batch: ``clips_u8`` (moved to the device) cropped and
        normalised into ``out`` (the model input's tensors; default: pooled or fresh ones);
        returns the model input."""
        clips_u8 = clips_u8.to(self.device)
        off = torch.tensor([it.offset for it in kept], dtype=torch.int64, device=self.device)
        flip = torch.tensor([it.flip for it in kept], dtype=torch.bool, device=self.device)
        from vidconv.ops import crop_normalize, fovea_context

        size = self.spec.size
        shape = self.input_shape(clips_u8.shape[0])
        pool = self._buffers
        if self.spec.multires:
            if out is None and pool is not None:
                out = (pool.take(shape, torch.float32), pool.take(shape, torch.float32))
            return self._stream(*fovea_context(clips_u8, size, offsets=off, flip=flip,
                                               out=out))
        if out is None and pool is not None:
            out = pool.take(shape, torch.float32)
        return crop_normalize(clips_u8, size, offsets=off, flip=flip, out=out)

    def _stream(self, fovea: torch.Tensor, context: torch.Tensor) -> Any:
        """A multires spec's model input from its two streams."""
        return {"both": (fovea, context), "fovea": fovea, "context": context}[self.spec.stream]

    def _batch(self, inputs: Any, kept: list[_Item]) -> Batch:
        videos = self.source.videos
        labels = torch.tensor([videos[it.video].label for it in kept], dtype=torch.int64,
                              device=self.device)
        index = torch.tensor([it.video for it in kept], dtype=torch.int64, device=self.device)
        return Batch(inputs, labels, index)

    def input_shape(self, clips: int) -> tuple[int, int, int, int, int]:
        """The shape of one input tensor of a batch of ``clips`` clips: (N, 3, T, S, S)."""
        size = self.spec.size
        return (clips, 3, len(self.spec.frame_offsets), size, size)

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_from(0)

    def iter_from(self, start_batch: int) -> Iterator[Batch]:
        """The epoch's batches from `start_batch` on, the earlier ones not decoded: a run
        resumed mid-epoch continues with the clips it would have seen (clip order and
        augmentation depend only on seed and epoch). One caveat: a batch made only of videos
        that turn out undecodable yields nothing, so past one the count is off by one."""
        if isinstance(start_batch, bool) or not isinstance(start_batch, int) or start_batch < 0:
            raise ValueError(f"start_batch must be an int >= 0, got {start_batch!r}")
        items = self.items()
        chunks = [items[i:i + self.batch_size] for i in range(0, len(items), self.batch_size)]
        chunks = chunks[start_batch:]
        if self.worker_type == "process":
            yield from self._iter_processes(chunks)
            return
        if self.num_workers == 0:
            for chunk in chunks:
                batch = self._load(chunk)
                if batch is not None:
                    yield batch
            return
        # Batches are decoded ahead on worker threads (PyAV and DALI release the GIL while
        # decoding) and handed out in order, so the result does not depend on timing.
        with ThreadPoolExecutor(self.num_workers, thread_name_prefix="vidconv-data") as pool:
            pending: deque[Future] = deque()
            todo = iter(chunks)
            for chunk in todo:
                pending.append(pool.submit(self._load, chunk))
                if len(pending) > self.num_workers:
                    break
            while pending:
                batch = pending.popleft().result()
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append(pool.submit(self._load, nxt))
                if batch is not None:
                    yield batch

    def _iter_processes(self, chunks: list[list[_Item]]) -> Iterator[Batch]:
        if self._workers is None or not self._workers.alive():
            if self._workers is not None:
                self._workers.close()
            cuda = self.device.type == "cuda"
            size, frames = self.spec.frame_size, len(self.spec.frame_offsets)
            # Per batch in flight: uint8 clips for a CUDA loader, else the model input.
            key = ((((self.batch_size, frames, size, size, 3),), torch.uint8) if cuda else
                   ((self.input_shape(self.batch_size),) * (2 if self.spec.multires else 1),
                    torch.float32))
            self._workers = ProcessWorkers(self, self.num_workers, self.start_method, key,
                                           _make_in_worker, reuse=self._reuse_buffers)

        def report(result: tuple) -> None:
            for index, reason, stage in result[1]:
                self._skip(index, reason, stage)

        for result, tensors in self._workers.run(chunks, bad=lambda: sorted(self._bad),
                                                 unseen=report):
            report(result)
            kept = result[0]
            if kept is None:
                continue
            # A video found bad in an earlier batch by another worker: its clips here are
            # left out too, as they would be had the batches been made one after another.
            keep = [k for k, it in enumerate(kept) if it.video not in self._bad]
            if not keep:
                continue
            if len(keep) < len(kept):
                for k, j in enumerate(keep):
                    for t in tensors:
                        t[k] = t[j]
                kept = [kept[j] for j in keep]
            n = len(kept)
            if self.device.type == "cuda":
                inputs = self._inputs(tensors[0][:n], kept)
            elif self.spec.multires:
                inputs = self._stream(tensors[0][:n], tensors[1][:n])
            else:
                inputs = tensors[0][:n]
            yield self._batch(inputs, kept)

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the running worker processes (none before the first iteration, with
        threads, or after :meth:`close`)."""
        return [] if self._workers is None else self._workers.pids()

    def close(self) -> None:
        """Stop the worker processes, if any (a later iteration starts new ones)."""
        if self._workers is not None:
            self._workers.close()
            self._workers = None

    def __enter__(self) -> ClipLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        # What a worker process gets: no lock, decoders, buffers or workers of this process.
        state = self.__dict__.copy()
        for name in ("_lock", "_workers", "_buffers"):
            state[name] = None
        state["_dali"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._buffers = self._new_buffer_pool()

    def __repr__(self) -> str:
        mode = "train" if self.train else (f"eval, {self.clips_per_video} clips x "
                                           f"{self.views} views")
        return (f"ClipLoader({self.source!r}, {mode}, batch_size={self.batch_size}, "
                f"shard {self.shard_id}/{self.num_shards}, {len(self)} batches)")


def _make_in_worker(loader: ClipLoader, items: list[_Item], out: tuple[torch.Tensor, ...],
                    bad: Sequence[int]) -> tuple[list[_Item] | None, list[tuple[int, str, str]]]:
    """One batch in a worker process (:class:`vidconv.data.workers.ProcessWorkers`): the
    clips into ``out`` (a CUDA loader's uint8 slot) or the model input into ``out`` (CPU);
    returns the items kept and the bad videos found."""
    loader._bad.update(bad)
    loader._found_bad = found = []
    cuda = loader.device.type == "cuda"
    # A CUDA loader's clips go straight into the slot; otherwise into the worker's own pooled
    # uint8 memory, and the model input into the slot.
    gathered = loader._gather(items, out=out[0].numpy() if cuda else None)
    if gathered is None:
        return None, found
    clips_u8, kept = gathered
    if not cuda:
        n = len(kept)
        loader._inputs(clips_u8, kept, out=tuple(t[:n] for t in out) if loader.spec.multires
                       else out[0][:n])
    return kept, found


def _per_class(source: Any) -> dict[str, int]:
    counts = Counter(v.label for v in source.videos)
    return {name: counts.get(i, 0) for i, name in enumerate(source.classes)}


def _try_probe(path: Path) -> VideoInfo | DecodeError:
    if path.is_dir():
        return DecodeError(path, "is a folder, not a video file")
    if not path.exists():
        if path.is_symlink():
            return DecodeError(path, f"is a broken symbolic link (to {os.readlink(path)!r})")
        return DecodeError(path, "does not exist")
    try:
        return probe(path)
    except DecodeError as exc:
        return exc


def _reason_kind(reason: str) -> str:
    """A skip reason without its decoder's details ("cannot open (InvalidDataError: ...)" ->
    "cannot open"), so that files failing the same way count together."""
    cut = reason.find(" (")
    return reason[:cut] if cut >= 0 and ":" in reason[cut:] else reason


def _nothing_usable(source: Any, report: LoaderReport) -> str:
    """Why no video of ``source`` could be read: the reasons, most common first, with an
    example file each, and the likely cause when every listed file is missing."""
    kinds = Counter(_reason_kind(s.reason) for s in report.skipped)
    example = {}
    for s in report.skipped:
        example.setdefault(_reason_kind(s.reason), s.path)
    why = "; ".join(f"{reason} ({n}, e.g. {example[reason]})" for reason, n in
                    kinds.most_common(3))
    if len(kinds) > 3:
        why += f"; {len(kinds) - 3} other reason(s)"
    where = getattr(source, "location", None)
    what = "dataset" if where is None else f"dataset {str(where)!r}"
    message = (f"no video of {what} could be read: all "
               f"{report.num_videos} were skipped: {why}")
    root, listed = getattr(source, "root", None), getattr(source, "list_file", None)
    if listed is not None and set(kinds) == {"does not exist"}:
        message += (f". The list file's paths are taken relative to the video root {str(root)!r}"
                    " (default: the list file's folder); give the folder the paths start from"
                    " as the video root (root=..., --root)")
    return message


_DALI_IMPORTABLE: bool | None = None


def _dali_importable() -> bool:
    global _DALI_IMPORTABLE
    if _DALI_IMPORTABLE is None:
        from vidconv.data.dali import dali_available

        _DALI_IMPORTABLE = dali_available()
    return _DALI_IMPORTABLE
