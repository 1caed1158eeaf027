"""Loader throughput: clips/s for decode + preprocess of 10-frame clips, from videos and from
prepared shards, and what preparing costs.

The script writes its own videos with PyAV (H.264 mp4 and VP9 webm at 320x240, 640x360 and
1280x720), then times `vidconv.data.ClipLoader` in training mode on them: one random 10-frame
clip per video per epoch (slow fusion's input: frames resized to 200x200, random 170x170 crop
and flip, normalised), with the whole-video cache off so every clip is decoded. Rows:

  pyav            PyAV in the iterating thread (FFmpeg may add its own decoder threads for
                  frames of 640x360 and up)
  pyav xN         PyAV with N worker threads (N = the CPU cores available), in batches of
                  --videos / N clips, so that every worker has one (an epoch has --videos clips)
  dali-cpu        DALI's CPU decoder (VP8/VP9/MJPEG only), when DALI is installed
  dali-gpu        NVDEC through DALI, output and preprocessing on the GPU, when CUDA and DALI are
  shards          the same videos after `vidconv prepare` (JPEG frames in tar shards), JPEG
                  decoded on the CPU in the iterating thread (simplejpeg, else Pillow)
  shards xN       the same with N worker threads
  shards xN proc  the same with N worker processes (``worker_type="process"``)
  shards xN proc cuda  N worker processes decoding, crop and normalisation on the GPU, when
                  CUDA is there (the CPU's share of feeding a GPU)
  shards dali-gpu JPEG decoded by DALI (nvJPEG) on the GPU, when CUDA and DALI are
  shards jpeg only  reading, CRC-checking and decoding the clips' JPEG frames alone (no
                  batching, no preprocessing): the shards' share of the "shards" row

A separate table times DALI's decoder alone, batched against one file per run: each timed
epoch asks for one random 10-frame clip of every video, handed over ``--batch`` files at a time
(as the loader does per batch of clips); "one at a time" decodes them one file per synchronous
pipeline run (batch 1, one pipeline, no prefetch), "batched" with DaliDecoder's defaults
(several files per run, runs queued ahead, one pipeline per NVDEC engine on CUDA). VP8/VP9
sources on the CPU, every source on CUDA. Its "cores busy" counts the CPU decoder's worker
process over its whole life (start-up and warm-up included).

Content: the synthetic texture (random 8x8 blocks, scrolling) is far harder to compress than
footage, so its JPEG frames are ~3x larger and slower to decode than a real video's. When the
project's real-world test videos are present (``../shared/testdata/videos`` beside the project,
or ``--real-footage DIR``), the usable ones (readable, at least 60 frames) are prepared once too
and timed as source "real footage" (pyav, shards, shards jpeg only), each video repeated to
``--videos`` files so that an epoch has as many clips as a synthetic source's. Every row and
every target says which content it was measured on.

"cores busy" is the CPU time of this process and the processes under it (loader workers,
DALI's CPU decoder) over wall time while a row ran: the CPU cores that row kept busy;
"clips/s/core" is clips/s over cores busy. "vs pyav" is clips/s over the single-thread PyAV row
of the same source (the baseline). Times are wall-clock over whole epochs after one warm-up
epoch, on the device named in the JSON; CPU rows are never GPU numbers.

Preparing is timed too (one worker process per source, so per core): seconds of video prepared
per CPU second ("x real time / core") and the shards' size per hour of video. The last table
checks the targets: shards >= 10x the per-core clips/s of decoding 640x360 H.264 (synthetic
texture: the same videos both ways), >= 300 clips/s per core end to end (on the synthetic
texture, best source, and on real footage when present), prepare >= 10x real time per core on
640x360.

    python benchmarks/loader.py --quick           # small files, few clips (about a minute)
    python benchmarks/loader.py --videos 8 --frames 150 --epochs 4
    python benchmarks/loader.py --sources shards --sizes 640x360 --codecs h264
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from vidconv.clip import ClipSpec  # noqa: E402
from vidconv.data import ClipLoader, open_source  # noqa: E402
from vidconv.data.dali import CPU_CODECS, dali_available  # noqa: E402
from vidconv.data.prepare import prepare  # noqa: E402
from vidconv.data.shards import jpeg_library  # noqa: E402

SIZES = {"320x240": (320, 240), "640x360": (640, 360), "1280x720": (1280, 720)}
CODECS = {"h264": ("libx264", "mp4", {"preset": "ultrafast"}),
          "vp9": ("libvpx-vp9", "webm", {"deadline": "realtime", "cpu-used": "8"})}
SPEC = ClipSpec(frame_offsets=tuple(range(10)), size=170, frame_size=200)
REAL_FOOTAGE = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "videos"
REAL = "real footage"
SYNTHETIC = "synthetic texture"
VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".webm", ".avi")


def write_video(path: Path, codec: str, size: tuple[int, int], frames: int, seed: int) -> None:
    """Moving textured content (so the encoder has real work), `frames` frames at 30 fps."""
    import av

    name, _, options = CODECS[codec]
    w, h = size
    rng = np.random.default_rng(seed)
    texture = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    texture = texture.repeat(8, 0).repeat(8, 1)
    container = av.open(str(path), "w")
    stream = container.add_stream(name, rate=30, options=options)
    stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
    stream.gop_size = 30
    for i in range(frames):
        img = np.roll(texture, (i * 2, i * 3), axis=(0, 1))[:h, :w]
        for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img),
                                                              format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()


def make_dataset(root: Path, codec: str, size: str, videos: int, frames: int) -> Path:
    folder = root / f"{codec}-{size}"
    (folder / "x").mkdir(parents=True, exist_ok=True)
    ext = CODECS[codec][1]
    for v in range(videos):
        write_video(folder / "x" / f"v{v}.{ext}", codec, SIZES[size], frames, seed=v)
    return folder


def real_footage(folder: Path, copies: int, root: Path) -> tuple[Path, list[str]]:
    """A source of the usable real videos of ``folder`` (readable, >= 60 frames), each linked
    ``copies`` times, and their names; no usable video gives an empty list."""
    from vidconv.data.decode import DecodeError, probe

    usable = []
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if path.suffix.lower() not in VIDEO_SUFFIXES:
            continue
        try:
            info = probe(path)
        except DecodeError:
            continue
        if info.num_frames >= 60:
            usable.append(path)
    out = root / "real-footage"
    (out / "x").mkdir(parents=True, exist_ok=True)
    for path in usable:
        for k in range(copies):
            (out / "x" / f"{path.stem}-{k}{path.suffix}").symlink_to(path)
    return out, [p.name for p in usable]


def run_row(folder: Path, device: torch.device, backend: str, workers: int, batch: int,
            epochs: int, min_seconds: float = 0.0, worker_type: str = "thread"
            ) -> dict[str, Any]:
    """clips/s and cores busy (this process and its worker / decoder processes) for one loader
    configuration (the first epoch is a warm-up)."""
    loader = ClipLoader(open_source(folder), SPEC, batch_size=batch, train=True, device=device,
                        backend=backend, num_workers=workers, cache_bytes=0,
                        worker_type=worker_type)
    for _ in loader:  # warm-up: worker start, DALI pipeline build, file cache, allocations
        pass
    clips = 0
    cpu0 = _common.cpu_seconds()
    t0 = time.perf_counter()
    epoch = 0
    while epoch < epochs or time.perf_counter() - t0 < min_seconds:
        epoch += 1
        loader.set_epoch(epoch)
        for b in loader:
            clips += b.labels.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0
    cpu = _common.cpu_seconds() - cpu0
    loader.close()
    return {"clips": clips, "clips_per_s": clips / wall, "cores_busy": cpu / wall,
            "clips_per_s_per_core": clips / cpu if cpu > 0 else None,
            "skipped": loader.report.num_skipped}


def time_dali_batched(folder: Path, device: torch.device, epochs: int, batch: int
                      ) -> list[dict[str, Any]]:
    """DALI decode alone, one file per run against batched (see the module docstring): the same
    clip requests, files/s and the CPU cores each way kept busy."""
    from vidconv.data.dali import DaliDecoder
    from vidconv.data.decode import probe

    lengths = {p: probe(p).num_frames for p in sorted((folder / "x").iterdir())}
    rng = np.random.default_rng(0)
    requests = [(path, list(range(s, s + SPEC.frames)))
                for _ in range(epochs) for path, n in lengths.items() if n >= SPEC.frames
                for s in [int(rng.integers(0, n - SPEC.frames + 1))]]
    groups = [requests[i:i + batch] for i in range(0, len(requests), batch)]
    rows = []
    for mode, kwargs in (("one at a time", {"batch_size": 1, "pipelines": 1, "prefetch": 1}),
                         ("batched", {})):
        dec = DaliDecoder(device, **kwargs)
        dec.decode_batch(groups[0])  # warm-up: worker start, pipeline build
        usage0 = resource.getrusage(resource.RUSAGE_SELF)
        children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        bad = sum(isinstance(r, Exception) for g in groups for r in dec.decode_batch(g))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0
        dec.close()  # the CPU worker's time counts once it has exited
        usage1 = resource.getrusage(resource.RUSAGE_SELF)
        children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = sum(getattr(b, f) - getattr(a, f) for a, b in ((usage0, usage1),
                                                             (children0, children1))
                  for f in ("ru_utime", "ru_stime"))
        rows.append({"mode": mode, "batch_size": dec.batch_size, "pipelines": dec.pipelines,
                     "prefetch": dec.prefetch, "files": len(requests), "failed": bad,
                     "files_per_s": len(requests) / wall, "cores_busy": cpu / wall,
                     "vs_one_at_a_time": None})
    rows[1]["vs_one_at_a_time"] = rows[1]["files_per_s"] / rows[0]["files_per_s"]
    return rows


def time_jpeg_only(prepared: Path, epochs: int, min_seconds: float = 0.0) -> dict[str, Any]:
    """The shards' share of a clip: reading, checking and decoding its 10 JPEG frames (the
    training clips of ``epochs`` epochs, or more until ``min_seconds`` have passed), without
    batching or preprocessing."""
    loader = ClipLoader(open_source(prepared), SPEC, batch_size=1, train=True, cache_bytes=0)
    source, offsets = loader.source, SPEC.frame_offsets
    clips = 0
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    epoch = 0
    while epoch < epochs or time.perf_counter() - t0 < min_seconds:
        epoch += 1
        loader.set_epoch(epoch)
        for item in loader.items():
            source.decode_video(item.video, [item.start + o for o in offsets])
            clips += 1
    wall = time.perf_counter() - t0
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    return {"clips": clips, "clips_per_s": clips / wall, "cores_busy": cpu / wall,
            "clips_per_s_per_core": clips / cpu if cpu > 0 else None, "skipped": 0}


def time_prepare(folder: Path, out: Path, quality: int) -> dict[str, Any]:
    """Prepare a source with one worker (in this process, so its CPU time is measured)."""
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    report = prepare(folder, out, workers=1, quality=quality)
    wall = time.perf_counter() - t0
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    return {"videos": report.num_prepared, "video_seconds": report.video_seconds,
            "wall_s": wall, "cpu_s": cpu, "realtime": report.video_seconds / wall,
            "realtime_per_core": report.video_seconds / cpu if cpu > 0 else None,
            "bytes": size, "gb_per_hour": size / 1e9 * 3600 / report.video_seconds,
            "jpeg": report.jpeg, "quality": quality}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3 videos of 40 frames, 3 epochs")
    p.add_argument("--videos", type=int, default=6, help="videos per source (default 6)")
    p.add_argument("--frames", type=int, default=90, help="frames per video (default 90)")
    p.add_argument("--epochs", type=int, default=4, help="timed epochs (one clip per video)")
    p.add_argument("--batch", type=int, default=8, help="clips per batch (default 8)")
    p.add_argument("--min-seconds", type=float, default=2.0,
                   help="a timed row runs more epochs than --epochs until it has taken this "
                        "long (default 2; fast rows of a few clips are otherwise mostly noise)")
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--codecs", nargs="+", default=list(CODECS), choices=list(CODECS))
    p.add_argument("--sources", nargs="+", default=["videos", "shards"],
                   choices=["videos", "shards"], help="read the videos, prepared shards, or both")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of the shards")
    p.add_argument("--dataset", default=None,
                   help="also time a real dataset (folder DATA/<class>/<video>): the synthetic "
                        "texture is a worst case for JPEG and H.264 alike")
    p.add_argument("--real-footage", default=str(REAL_FOOTAGE),
                   help="folder of real videos timed as source 'real footage' when present "
                        "(default: the project's real-world test videos)")
    p.add_argument("--no-real-footage", action="store_true", help="skip the real-footage rows")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="intra-op threads for preprocessing (default 1: per-core figures; "
                        "the loader's worker threads are the parallelism)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    p.add_argument("--workers", type=int, default=None,
                   help="threads of the multi-threaded PyAV row (default: CPU cores)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/)")
    _common.add_huge_pages_flag(p)
    args = p.parse_args(argv)
    huge_pages = _common.huge_pages(not args.no_huge_pages)  # before any CPU tensor
    if args.quick:
        args.videos, args.frames, args.epochs, args.min_seconds = 3, 40, 3, 0.0
    if not args.min_seconds >= 0:
        p.error(f"--min-seconds must be >= 0, got {args.min_seconds}")
    device = _common.resolve_device(args.device)
    torch.set_num_threads(max(1, args.torch_threads))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = args.workers or cores or 1
    has_dali = dali_available()

    configs = []
    keys = [(size, codec) for size in args.sizes for codec in args.codecs]
    if args.dataset:
        keys.append((Path(args.dataset).name, "as found"))
    real_folder = Path(args.real_footage)
    use_real = not args.no_real_footage and real_folder.is_dir()
    if use_real:
        keys.append((REAL, "as found"))
    for size, codec in keys:
        if size == REAL:
            configs += [(size, codec, "pyav", "pyav", 0)] * ("videos" in args.sources)
            if "shards" in args.sources:
                configs += [(size, codec, "shards", "auto", 0),
                            (size, codec, f"shards x{workers} proc", "auto", workers),
                            (size, codec, "shards jpeg only", "jpeg-only", 0)]
            continue
        if True:
            rows = []
            if "videos" in args.sources:
                rows += [("pyav", "pyav", 0), (f"pyav x{workers}", "pyav", workers)]
                if has_dali and codec in CPU_CODECS:  # a --dataset may hold any codec
                    rows.append(("dali-cpu", "dali", 0))
                if has_dali and device.type == "cuda":
                    rows.append(("dali-gpu", "dali", 0))
            if "shards" in args.sources:
                rows += [("shards", "auto", 0), (f"shards x{workers}", "auto", workers),
                         (f"shards x{workers} proc", "auto", workers),
                         ("shards jpeg only", "jpeg-only", 0)]
                if device.type == "cuda":
                    rows.append((f"shards x{workers} proc cuda", "auto", workers))
                if has_dali and device.type == "cuda":
                    rows.append(("shards dali-gpu", "auto", 0))
            configs += [(size, codec, *r) for r in rows]

    results: list[dict[str, Any]] = []
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    with tempfile.TemporaryDirectory(prefix="vidconv-loader-bench-") as tmp:
        folders = {}
        for size in _common.progress(args.sizes, desc="writing videos"):
            for codec in args.codecs:
                folders[size, codec] = make_dataset(Path(tmp), codec, size, args.videos,
                                                    args.frames)
        if args.dataset:
            folders[Path(args.dataset).name, "as found"] = Path(args.dataset)
        real_names: list[str] = []
        if use_real:
            folders[REAL, "as found"], real_names = real_footage(real_folder, args.videos,
                                                                 Path(tmp))
            if not real_names:
                configs = [c for c in configs if c[0] != REAL]
                keys.remove((REAL, "as found"))
        preps: dict[tuple[str, str], dict[str, Any]] = {}
        real_prep: dict[str, Any] | None = None
        if "shards" in args.sources:
            for size, codec in _common.progress(keys, desc="preparing"):
                out = Path(tmp) / f"{codec}-{size}-prepared"
                row = time_prepare(folders[size, codec], out, args.quality)
                if size == REAL:  # not a prepare target: kept apart from the synthetic rows
                    real_prep = row
                else:
                    preps[size, codec] = row
        base: dict[tuple[str, str], float] = {}
        for size, codec, name, backend, nw in _common.progress(configs, desc="timing"):
            dev = device if name.endswith(("dali-gpu", " cuda")) else torch.device("cpu")
            folder = folders[size, codec]
            if name.startswith("shards"):
                folder = Path(tmp) / f"{codec}-{size}-prepared"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # DALI's own notices
                if backend == "jpeg-only":
                    row = time_jpeg_only(folder, args.epochs, args.min_seconds)
                else:
                    # Threaded rows need a batch on every worker: an epoch has only --videos
                    # clips, one batch per worker.
                    batch = args.batch if nw == 0 else max(1, min(args.batch,
                                                                  args.videos // nw))
                    row = run_row(folder, dev, backend, nw, batch, args.epochs,
                                  args.min_seconds,
                                  "process" if " proc" in name else "thread")
                    row["batch"] = batch
            if name == "pyav":
                base[size, codec] = row["clips_per_s"]
            ref = base.get((size, codec))
            content = SYNTHETIC if (size, codec) in [(z, c) for z in SIZES for c in CODECS] \
                else ", ".join(real_names) if size == REAL else "as found"
            results.append({"source": size, "codec": codec, "content": content,
                            "backend": name, "device": str(dev), "workers": nw, **row,
                            "vs_pyav": row["clips_per_s"] / ref if ref else None})
        dali_batched = []
        for (size, codec), folder in folders.items() if has_dali else ():
            if codec in CODECS and (codec in CPU_CODECS or device.type == "cuda"):
                dali_batched += [{"source": size, "codec": codec, "device": str(device), **r}
                                 for r in time_dali_batched(folder, device, args.epochs,
                                                            args.batch)]
    payload = {"spec": {"frames": SPEC.frames, "size": SPEC.size, "frame_size": SPEC.frame_size},
               "videos": args.videos, "frames_per_video": args.frames, "epochs": args.epochs,
               "min_seconds": args.min_seconds,
               "batch": args.batch, "cores_available": cores, "dali": has_dali,
               "cache": "off (every clip decoded)", "huge_pages": huge_pages,
               # Other processes compete for the cores on a shared machine; say how busy it was.
               "load_average_before": load_before,
               "load_average_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
               "rows": results, "dali_batched": dali_batched, "jpeg": jpeg_library(),
               "prepare": [{"source": k[0], "codec": k[1], **v} for k, v in preps.items()],
               "real_footage": {"folder": str(real_folder), "videos": real_names,
                                "copies": args.videos, "prepare": real_prep}
               if real_names else None,
               "targets": targets(results, preps)}
    path = _common.write_json("loader", payload, path=args.out, device=device)
    print(f"wrote {path}")
    if preps:
        _common.print_table(
            [{"source": k[0], "codec": k[1], "videos": v["videos"],
              "video s": v["video_seconds"], "x real time": v["realtime"],
              "x real time / core": v["realtime_per_core"], "GB / hour": v["gb_per_hour"]}
             for k, v in preps.items()],
            title=f"vidconv prepare, one worker, JPEG q{args.quality} by {jpeg_library()}")
    if dali_batched:
        _common.print_table(
            [{"source": r["source"], "codec": r["codec"], "device": r["device"],
              "mode": r["mode"], "files/run": r["batch_size"], "pipelines": r["pipelines"],
              "files/s": r["files_per_s"], "cores busy": r["cores_busy"],
              "vs one at a time": r["vs_one_at_a_time"]} for r in dali_batched],
            title="DALI decode alone, 10-frame clips: batched vs one file per run")
    _common.print_table(
        [{"source": r["source"], "codec": r["codec"],
          "content": "synthetic" if r["content"] == SYNTHETIC else r["content"],
          "backend": r["backend"],
          "device": r["device"], "clips/s": r["clips_per_s"], "cores busy": r["cores_busy"],
          "clips/s/core": r["clips_per_s_per_core"], "vs pyav": r["vs_pyav"]}
         for r in results],
        title=f"10-frame clips, decode + preprocess ({_common.device_name(device)}, "
              f"{cores} cores available)")
    if payload["targets"]:
        _common.print_table(payload["targets"], title="targets (CPU, per core)")
    return 0


def targets(results: list[dict[str, Any]], preps: dict[tuple[str, str], dict[str, Any]]
            ) -> list[dict[str, Any]]:
    """The issue's per-core targets, measured where this run has the rows for them."""
    def per_core(source: str, codec: str, backend: str) -> float | None:
        for r in results:
            if (r["source"], r["codec"], r["backend"], r["device"]) == (source, codec, backend,
                                                                        "cpu"):
                return r["clips_per_s_per_core"]
        return None

    out = []
    video = per_core("640x360", "h264", "pyav")
    same = per_core("640x360", "h264", "shards")
    shards = [r["clips_per_s_per_core"] for r in results if r["backend"] == "shards"
              and r["content"] == SYNTHETIC and r["clips_per_s_per_core"]]
    best = max(shards) if shards else None
    if video and same:
        out.append({"target": "shards / 640x360 H.264 clips/s per core >= 10 (same videos)",
                    "content": SYNTHETIC, "measured": same / video, "met": same / video >= 10})
    if best:
        out.append({"target": "shards clips/s per core >= 300", "content": SYNTHETIC
                    + " (best source)", "measured": best, "met": best >= 300})
    real = [r for r in results if r["source"] == REAL and r["backend"] == "shards"
            and r["clips_per_s_per_core"]]
    if real:
        out.append({"target": "shards clips/s per core >= 300",
                    "content": f"{REAL}: {real[0]['content']}",
                    "measured": real[0]["clips_per_s_per_core"],
                    "met": real[0]["clips_per_s_per_core"] >= 300})
    prep = preps.get(("640x360", "h264"))
    if prep and prep["realtime_per_core"]:
        out.append({"target": "prepare 640x360 H.264 x real time per core >= 10",
                    "content": SYNTHETIC, "measured": prep["realtime_per_core"],
                    "met": prep["realtime_per_core"] >= 10})
    return out


if __name__ == "__main__":
    sys.exit(main())
