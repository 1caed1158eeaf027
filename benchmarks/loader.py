"""Loader throughput: clips/s for decode + preprocess of 10-frame clips.

The script writes its own videos with PyAV (H.264 mp4 and VP9 webm at 320x240, 640x360 and
1280x720), then times `vidconv.data.ClipLoader` in training mode on them: one random 10-frame
clip per video per epoch (slow fusion's input: frames resized to 200x200, random 170x170 crop
and flip, normalised), with the whole-video cache off so every clip is decoded. Rows:

  pyav       PyAV in the iterating thread (FFmpeg may add its own decoder threads for
             frames of 640x360 and up)
  pyav xN    PyAV with N worker threads (N = the CPU cores available)
  dali-cpu   DALI's CPU decoder (VP8/VP9/MJPEG only), when DALI is installed
  dali-gpu   NVDEC through DALI, output and preprocessing on the GPU, when CUDA and DALI are

"cores busy" is process CPU time over wall time while a row ran: the CPU cores that row kept
busy. "vs pyav" is clips/s over the single-thread PyAV row of the same source (the baseline).
Times are wall-clock over whole epochs after one warm-up epoch, on the device named in the
JSON; CPU rows are never GPU numbers.

    python benchmarks/loader.py --quick           # small files, few clips (about a minute)
    python benchmarks/loader.py --videos 8 --frames 150 --epochs 4
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
from vidconv.data import ClipLoader, VideoFolder  # noqa: E402
from vidconv.data.dali import CPU_CODECS, dali_available  # noqa: E402

SIZES = {"320x240": (320, 240), "640x360": (640, 360), "1280x720": (1280, 720)}
CODECS = {"h264": ("libx264", "mp4", {"preset": "ultrafast"}),
          "vp9": ("libvpx-vp9", "webm", {"deadline": "realtime", "cpu-used": "8"})}
SPEC = ClipSpec(frame_offsets=tuple(range(10)), size=170, frame_size=200)


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


def run_row(folder: Path, device: torch.device, backend: str, workers: int, batch: int,
            epochs: int) -> dict[str, Any]:
    """clips/s and cores busy for one loader configuration (first epoch is a warm-up)."""
    loader = ClipLoader(VideoFolder(folder), SPEC, batch_size=batch, train=True, device=device,
                        backend=backend, num_workers=workers, cache_bytes=0)
    for _ in loader:  # warm-up: DALI pipeline build, file cache, first allocations
        pass
    clips = 0
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    for epoch in range(1, epochs + 1):
        loader.set_epoch(epoch)
        for b in loader:
            clips += b.labels.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    return {"clips": clips, "clips_per_s": clips / wall, "cores_busy": cpu / wall,
            "skipped": loader.report.num_skipped}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3 videos of 40 frames, 3 epochs")
    p.add_argument("--videos", type=int, default=6, help="videos per source (default 6)")
    p.add_argument("--frames", type=int, default=90, help="frames per video (default 90)")
    p.add_argument("--epochs", type=int, default=4, help="timed epochs (one clip per video)")
    p.add_argument("--batch", type=int, default=8, help="clips per batch (default 8)")
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--codecs", nargs="+", default=list(CODECS), choices=list(CODECS))
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    p.add_argument("--workers", type=int, default=None,
                   help="threads of the multi-threaded PyAV row (default: CPU cores)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/)")
    args = p.parse_args(argv)
    if args.quick:
        args.videos, args.frames, args.epochs = 3, 40, 3
    device = _common.resolve_device(args.device)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = args.workers or cores or 1
    has_dali = dali_available()

    configs = []
    for size in args.sizes:
        for codec in args.codecs:
            rows = [("pyav", "pyav", 0), (f"pyav x{workers}", "pyav", workers)]
            if has_dali and codec in CPU_CODECS:
                rows.append(("dali-cpu", "dali", 0))
            if has_dali and device.type == "cuda":
                rows.append(("dali-gpu", "dali", 0))
            configs += [(size, codec, *r) for r in rows]

    results: list[dict[str, Any]] = []
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    with tempfile.TemporaryDirectory(prefix="vidconv-loader-bench-") as tmp:
        folders = {}
        for size in _common.progress(args.sizes, desc="writing videos"):
            for codec in args.codecs:
                folders[size, codec] = make_dataset(Path(tmp), codec, size, args.videos,
                                                    args.frames)
        base: dict[tuple[str, str], float] = {}
        for size, codec, name, backend, nw in _common.progress(configs, desc="timing"):
            dev = device if name == "dali-gpu" else torch.device("cpu")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # DALI's own notices
                row = run_row(folders[size, codec], dev, backend, nw, args.batch, args.epochs)
            if name == "pyav":
                base[size, codec] = row["clips_per_s"]
            results.append({"source": size, "codec": codec, "backend": name, "device": str(dev),
                            "workers": nw, **row,
                            "vs_pyav": row["clips_per_s"] / base[size, codec]})
    payload = {"spec": {"frames": SPEC.frames, "size": SPEC.size, "frame_size": SPEC.frame_size},
               "videos": args.videos, "frames_per_video": args.frames, "epochs": args.epochs,
               "batch": args.batch, "cores_available": cores, "dali": has_dali,
               "cache": "off (every clip decoded)",
               # Other processes compete for the cores on a shared machine; say how busy it was.
               "load_average_before": load_before,
               "load_average_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
               "rows": results}
    path = _common.write_json("loader", payload, path=args.out, device=device)
    print(f"wrote {path}")
    _common.print_table(
        [{"source": r["source"], "codec": r["codec"], "backend": r["backend"],
          "device": r["device"], "clips/s": r["clips_per_s"], "cores busy": r["cores_busy"],
          "vs pyav": r["vs_pyav"]} for r in results],
        title=f"10-frame clips, decode + preprocess ({_common.device_name(device)}, "
              f"{cores} cores available)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
