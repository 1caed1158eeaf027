"""Decoding speed of torchcodec against PyAV on the CPU, as the loader calls them.

Both backends decode through FFmpeg here; the table says which is faster for the loader's two
kinds of call, and ``ClipLoader(backend="auto")`` is chosen from it:

  clip    10 consecutive frames from the middle of the video, resized to 200x200 (the centre
          square; one training clip with the whole-video cache off)
  all     every frame, resized to 200x200 (what the whole-video cache decodes once)

Sources: videos the script writes (H.264 mp4 and VP9 webm, moving smooth patterns, at each
``--sizes``) and the real test videos in ``../shared/testdata/videos`` when present
(flipping_a_pancake.mkv: H.264 426x240, 310 frames; video_90.mov: H.264 568x320 with a
rotation matrix, 3 frames). Each call gets the file's PyAV probe, as in the loader; torchcodec
scans the file on each call anyway (its exact seek mode). Both use one FFmpeg thread (the
loader's choice below 640x360 and with worker threads).

The two backends run alternately, one call each per repeat, so load from other processes falls
on both alike; "tc speed-up" is PyAV's median time over torchcodec's (above 1: torchcodec
faster), "min ratio" the same from the fastest calls. Without torchcodec (it needs a CUDA build
of torch) its columns say why, and only PyAV is timed. CPU numbers only; NVDEC is not timed.

    python benchmarks/decode_backends.py --quick
    python benchmarks/decode_backends.py --sizes 320x240,640x360,1280x720 --repeats 9
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from vidconv.data import decode as pyav  # noqa: E402
from vidconv.data import torchcodec_decode  # noqa: E402
from vidconv.data.synthetic import write_video  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "videos"
FRAME_SIZE, CLIP = 200, 10


def _pattern(frames: int, height: int, width: int) -> np.ndarray:
    """Moving smooth gradients with some texture: enough motion that inter frames cost work."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    out = np.empty((frames, height, width, 3), np.uint8)
    for t in range(frames):
        r = 127 + 100 * np.sin((xx + 3 * t) / 23.0) * np.cos(yy / 31.0)
        g = 127 + 100 * np.sin((yy - 2 * t) / 17.0)
        b = 127 + 60 * np.cos((xx + yy + 5 * t) / 41.0) + 20 * np.sin(xx * yy / 900.0)
        out[t] = np.stack([r, g, b], -1).clip(0, 255).astype(np.uint8)
    return out


def _sources(work: Path, sizes: list[tuple[int, int]], codecs: list[str], frames: int
             ) -> list[tuple[str, Path]]:
    out = []
    for width, height in sizes:
        clip = _pattern(frames, height, width)
        for codec in codecs:
            ext = "mp4" if codec == "h264" else "webm"
            path = write_video(work / f"{codec}_{width}x{height}.{ext}", clip, codec=codec)
            out.append((f"{codec} {width}x{height}", path))
    for name in ("flipping_a_pancake.mkv", "video_90.mov"):
        if (SHARED / name).is_file():
            out.append((f"real {name}", SHARED / name))
    return out


def _alternate(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    for fn in fns.values():  # warm-up: imports, FFmpeg's first-use setup, file cache
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu"],
                   help="cpu only: both backends decode on the CPU here")
    p.add_argument("--sizes", default=None,
                   help="WxH list of written videos (default 320x240,640x360)")
    p.add_argument("--codecs", default="h264,vp9", help="codecs of written videos")
    p.add_argument("--frames", type=int, default=None, help="frames per written video "
                   "(default 60)")
    p.add_argument("--repeats", type=int, default=None, help="default 7")
    p.add_argument("--threads", type=int, default=1, help="FFmpeg decoder threads")
    p.add_argument("--quick", action="store_true",
                   help="defaults of 320x240 only, 30 frames, 3 repeats")
    p.add_argument("--json", default=None, help="output path (default benchmarks/results/)")
    args = p.parse_args(argv)
    defaults = ("320x240", 30, 3) if args.quick else ("320x240,640x360", 60, 7)
    args.sizes = args.sizes if args.sizes is not None else defaults[0]
    args.frames = args.frames if args.frames is not None else defaults[1]
    args.repeats = args.repeats if args.repeats is not None else defaults[2]
    try:
        sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
        assert all(len(s) == 2 and s[0] > 0 and s[1] > 0 for s in sizes)
    except (ValueError, AssertionError):
        p.error(f"--sizes must be WxH[,WxH...], got {args.sizes!r}")
    codecs = [c for c in args.codecs.split(",") if c]
    if not codecs or any(c not in ("h264", "vp9") for c in codecs):
        p.error(f"--codecs must be a list of h264, vp9; got {args.codecs!r}")
    if args.frames < CLIP or args.repeats < 1:
        p.error(f"--frames must be >= {CLIP} and --repeats >= 1, got {args.frames}, "
                f"{args.repeats}")
    problem = torchcodec_decode.torchcodec_problem()
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="vidconv-decode-bench-") as tmp:
        for name, path in _sources(Path(tmp), sizes, codecs, args.frames):
            info = pyav.probe(path)
            start = max(0, (info.num_frames - CLIP) // 2)
            picks = {"clip": list(range(start, min(info.num_frames, start + CLIP))),
                     "all": None}
            for task, indices in picks.items():
                def run_pyav(indices=indices, path=path, info=info):
                    return pyav.decode_frames(path, indices, frame_size=FRAME_SIZE, info=info,
                                              threads=args.threads)

                def run_tc(indices=indices, path=path, info=info):
                    return torchcodec_decode.decode_frames(path, indices, frame_size=FRAME_SIZE,
                                                           info=info, threads=args.threads)

                fns = {"pyav": run_pyav} if problem else {"pyav": run_pyav, "tc": run_tc}
                times = _alternate(fns, args.repeats)
                n = info.num_frames if indices is None else len(indices)
                row: dict[str, Any] = {"video": name, "task": task, "frames": n,
                                       "pyav ms": round(statistics.median(times["pyav"]), 2)}
                if problem:
                    row.update({"torchcodec ms": "n/a", "tc speed-up": "n/a",
                                "min ratio": "n/a"})
                else:
                    row["torchcodec ms"] = round(statistics.median(times["tc"]), 2)
                    row["tc speed-up"] = round(statistics.median(times["pyav"])
                                               / statistics.median(times["tc"]), 2)
                    row["min ratio"] = round(min(times["pyav"]) / min(times["tc"]), 2)
                row["raw_ms"] = times
                rows.append(row)
    settings = {"frame_size": FRAME_SIZE, "clip": CLIP, "frames": args.frames,
                "repeats": args.repeats, "threads": args.threads, "sizes": args.sizes,
                "codecs": codecs, "torchcodec": _torchcodec_version(), "torchcodec_problem":
                problem, "torch": torch.__version__,
                # other processes share these cores: the 1-minute load average around the run
                "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    out = _common.write_json("decode_backends", {"settings": settings, "rows": rows}, args.json,
                             device="cpu")
    print(f"wrote {out}", file=sys.stderr)
    if problem:
        print(f"torchcodec not timed: {problem}")
    columns = ["video", "task", "frames", "pyav ms", "torchcodec ms", "tc speed-up", "min ratio"]
    _common.print_table(rows, columns, title=f"decode to {FRAME_SIZE}x{FRAME_SIZE} on the CPU, "
                        f"{args.threads} FFmpeg thread(s), median of {args.repeats}")
    return 0


def _torchcodec_version() -> str | None:
    if not torchcodec_decode.torchcodec_available():
        return None
    import torchcodec

    return getattr(torchcodec, "__version__", "unknown")


if __name__ == "__main__":
    sys.exit(main())
