"""DALI decoding cannot take the process down: a decoder that crashes or hangs on a file makes
that file a skipped, reported one; damaged VP8, VP9 and MJPEG files never kill the loader."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest

from vidconv.data.dali import dali_available

pytestmark = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")

REPO = Path(__file__).resolve().parents[1]
FRAMES, HEIGHT, WIDTH = 10, 48, 64
# codec name -> (PyAV encoder, extension, pixel format)
CODECS = {"vp8": ("libvpx", "webm", "yuv420p"), "vp9": ("libvpx-vp9", "webm", "yuv420p"),
          "mjpeg": ("mjpeg", "avi", "yuvj420p")}


def write_video(path: Path, codec: str, frames: int = FRAMES) -> Path:
    encoder, _, pix_fmt = CODECS[codec]
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    container = av.open(str(path), "w")
    stream = container.add_stream(encoder, rate=25)
    stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, pix_fmt
    for i in range(frames):
        img = np.stack([xx * 3 + i * 5, yy * 4 + i * 3, (xx * yy + 7 * i) % 256], -1)
        frame = av.VideoFrame.from_ndarray(img.clip(0, 255).astype(np.uint8), format="rgb24")
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


def damaged_variants(data: bytes, seed: int) -> dict[str, bytes]:
    """Truncations, byte flips and zeroed blocks of an encoded file (two of each)."""
    rng = np.random.default_rng(seed)
    n = len(data)
    out = {"trunc40": data[: n * 2 // 5], "trunc85": data[: n * 17 // 20]}
    for k in range(2):
        flipped = bytearray(data)
        for pos in rng.integers(n // 8, n, size=24):
            flipped[pos] ^= 1 << int(rng.integers(8))
        out[f"flip{k}"] = bytes(flipped)
    for k, (start, size) in enumerate(((n // 3, 512), (n // 5, n // 2))):
        zeroed = bytearray(data)
        zeroed[start:start + size] = bytes(len(zeroed[start:start + size]))
        out[f"zero{k}"] = bytes(zeroed)
    return out


def kill_when_read(fifo: Path, pid_of, sig: int = signal.SIGSEGV,
                   times: int = 1) -> threading.Thread:
    """Kill the process reading ``fifo`` with ``sig`` once it has opened it, ``times`` times
    (a file that crashes the decoder does so at every try): the reader is then blocked inside
    a decode, so the kill lands mid-decode, deterministically."""

    def run() -> None:
        deadline = time.monotonic() + 60
        left = times
        while left and time.monotonic() < deadline:
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # no reader yet
                time.sleep(0.01)
                continue
            os.kill(pid_of(), sig)
            time.sleep(0.5)  # the reader dies before it could see the end of the file
            os.close(fd)
            left -= 1

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_decoder_crash_is_a_decode_error_and_the_next_file_decodes(tmp_path: Path) -> None:
    from vidconv.data.dali import DaliDecoder
    from vidconv.data.decode import DecodeError

    good = write_video(tmp_path / "good.avi", "mjpeg")
    fifo = tmp_path / "crashes.avi"
    os.mkfifo(fifo)
    dec = DaliDecoder("cpu")
    assert dec.decode(good).shape == (FRAMES, HEIGHT, WIDTH, 3)
    first = dec.worker_pid
    assert first is not None and first != os.getpid()
    watcher = kill_when_read(fifo, lambda: dec.worker_pid)
    with pytest.raises(DecodeError, match=r"crashes\.avi: .*died decoding it \(SIGSEGV\)"):
        dec.decode(fifo)
    watcher.join(5)
    assert dec.worker_pid is None  # the dead worker is dropped ...
    assert dec.decode(good, [3, 1]).shape == (2, HEIGHT, WIDTH, 3)  # ... and a new one started
    assert dec.worker_pid not in (None, first)
    dec.close()


def test_failure_mid_exchange_never_hands_the_next_file_stale_frames(tmp_path: Path,
                                                                     monkeypatch) -> None:
    # An error between the worker's header and its frame bytes (here: the frame buffer cannot be
    # allocated) must not leave bytes in the pipe for the next file to read as its own.
    import torch

    from vidconv.data import dali as dali_module
    from vidconv.data.dali import DaliDecoder

    short = write_video(tmp_path / "short.avi", "mjpeg", frames=4)
    long = write_video(tmp_path / "long.avi", "mjpeg", frames=FRAMES)
    dec = DaliDecoder("cpu")
    real_empty = torch.empty
    calls = {"n": 0}

    def failing_empty(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise MemoryError("simulated")
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(dali_module.torch, "empty", failing_empty)
    with pytest.raises(MemoryError):
        dec.decode(short)
    monkeypatch.setattr(dali_module.torch, "empty", real_empty)
    assert dec.decode(long).shape == (FRAMES, HEIGHT, WIDTH, 3)  # its own frames, not short's
    assert dec.decode(short).shape == (4, HEIGHT, WIDTH, 3)
    dec.close()


def test_decoder_hang_is_stopped_after_the_timeout(tmp_path: Path) -> None:
    from vidconv.data.dali import DaliDecoder
    from vidconv.data.decode import DecodeError

    fifo = tmp_path / "hangs.webm"
    os.mkfifo(fifo)  # opening it blocks: no writer ever comes
    dec = DaliDecoder("cpu", timeout=1.5)
    with pytest.raises(DecodeError, match=r"hangs\.webm: .*did not finish within 1.5 s"):
        dec.decode(fifo)
    assert dec.worker_pid is None
    with pytest.raises(ValueError, match="timeout must be > 0"):
        DaliDecoder("cpu", timeout=0)


def test_loader_skips_and_reports_a_file_the_decoder_crashed_on(tmp_path: Path) -> None:
    from vidconv.clip import ClipSpec
    from vidconv.data import BadVideoWarning, ClipLoader

    root = tmp_path / "d"
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for k in range(2):
            write_video(root / label / f"{label}{k}.avi", "mjpeg")
    spec = ClipSpec(frame_offsets=(0, 2), size=40, frame_size=48)
    loader = ClipLoader(root, spec, batch_size=2, train=False, clips_per_video=1,
                        backend="dali", cache_bytes=0)
    assert loader.report.backends == {"dali-cpu": 4}
    # Probed fine; the file then turns into one the decoder crashes on.
    victim = root / "a" / "a1.avi"
    victim.unlink()
    os.mkfifo(victim)
    # Twice: the batch [a0, a1] it crashes, then a1 alone (a0 alone decodes).
    watcher = kill_when_read(victim, lambda: loader._decoder("dali-cpu").worker_pid, times=2)
    with pytest.warns(BadVideoWarning, match=r"a1\.avi: .*died decoding it \(SIGSEGV\)"):
        seen = [v for b in loader for v in b.video_index.tolist()]
    watcher.join(5)
    assert seen == [0, 2, 3]
    report = loader.report
    assert [(s.index, s.stage) for s in report.skipped] == [(1, "decode")]
    assert report.num_usable == 3 and report.videos_per_class == {"a": 1, "b": 2}


CHILD = r"""
import json, sys, warnings
from pathlib import Path
from vidconv.clip import ClipSpec
from vidconv.data import ClipLoader, DecodeError
from vidconv.data.dali import DaliDecoder

root = Path(sys.argv[1])
warnings.simplefilter("ignore")
dec = DaliDecoder("cpu")
direct = {}
for path in sorted(root.rglob("*.*")):
    print("decoding", path.name, file=sys.stderr, flush=True)
    try:
        direct[path.name] = list(dec.decode(path).shape)
    except DecodeError as exc:
        direct[path.name] = str(exc)
spec = ClipSpec(frame_offsets=(0, 2), size=40, frame_size=48)
out = {"direct": direct}
for cache in (None, 0):
    try:
        loader = ClipLoader(root, spec, batch_size=4, train=False, clips_per_video=2,
                            backend="dali", cache_bytes=cache)
    except ValueError as exc:  # every file unusable
        out[str(cache)] = {"error": str(exc)}
        continue
    seen = sorted({v for b in loader for v in b.video_index.tolist()})
    r = loader.report
    out[str(cache)] = {"seen": [loader.source.videos[i].path.name for i in seen],
                       "skipped": [Path(s.path).name for s in r.skipped],
                       "num_videos": r.num_videos, "num_usable": r.num_usable,
                       "per_class": sum(r.videos_per_class.values())}
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.parametrize("codec", sorted(CODECS))
def test_damaged_files_never_kill_the_loader(tmp_path: Path, codec: str) -> None:
    """Damaged files of every codec DALI's CPU decoder takes, all loaded in one child process
    (a crash there fails this test instead of killing pytest)."""
    ext = CODECS[codec][1]
    data = write_video(tmp_path / f"good.{ext}", codec).read_bytes()
    root = tmp_path / "d" / "x"
    root.mkdir(parents=True)
    (root / f"good.{ext}").write_bytes(data)
    variants = damaged_variants(data, seed=len(codec))
    for name, damaged in variants.items():
        (root / f"{name}.{ext}").write_bytes(damaged)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "d")], env=env,
                          capture_output=True, text=True, timeout=300)
    last = [ln for ln in proc.stderr.splitlines() if ln.startswith("decoding")][-1:]
    assert proc.returncode == 0, f"child died ({proc.returncode}) at {last}: {proc.stderr[-2000:]}"
    out = json.loads(proc.stdout.splitlines()[-1])
    if os.environ.get("VIDCONV_SHOW_FUZZ"):
        print(json.dumps(out, indent=1))
    assert out["direct"][f"good.{ext}"] == [FRAMES, HEIGHT, WIDTH, 3]
    for name, result in out["direct"].items():
        assert isinstance(result, list) or name in result  # frames, or an error naming it
    for cache in ("None", "0"):
        run = out[cache]
        names = {f"{n}.{ext}" for n in variants} | {f"good.{ext}"}
        assert f"good.{ext}" in run["seen"]
        # Every file either gave clips or was reported, and the counts add up.
        assert set(run["seen"]) | set(run["skipped"]) == names
        assert len(set(run["skipped"])) == len(run["skipped"])  # reported once each
        if cache == "None":  # whole-video decodes: a video gives clips or is skipped
            assert not set(run["seen"]) & set(run["skipped"])
        assert run["num_usable"] == run["num_videos"] - len(run["skipped"]) == run["per_class"]
