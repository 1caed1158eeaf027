"""vidconv.data.torchcodec_decode: the PyAV backend's decode tests, run against torchcodec.

Each test decodes the same file with PyAV (vidconv.data.decode, the reference) and torchcodec
and compares: frame counts, frame order, rotation, the resized centre square, bad files. Both
decode through FFmpeg's decoders and swscale, but PyAV's wheel bundles its own FFmpeg build and
torchcodec uses the system's: unresized frames came out identical on every file tried (a
tolerance of 2 grey levels leaves room for another FFmpeg version's rounding); the two resize
paths round differently, about a grey level on average, up to ~20 at sharp edges of real
footage, while a one-pixel shift of the square (what the tolerances must catch) costs 7-15 on
average.

torchcodec's wheels need a CUDA build of torch (they link libtorch_cuda), so in the main
CPU-torch environment these tests skip with that reason; .ci/run runs them in a second venv
with a CUDA torch (on the CPU). The tests at the end run without torchcodec: they check the
clear error the loader gives when it is asked for and cannot import.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vidconv.clip import ClipSpec
from vidconv.data import BadVideoWarning, ClipLoader, DecodeError
from vidconv.data import decode as pyav
from vidconv.data.loader import BACKENDS
from vidconv.data.synthetic import write_video
from vidconv.data.torchcodec_decode import torchcodec_problem

PROBLEM = torchcodec_problem()
needs_torchcodec = pytest.mark.skipif(PROBLEM is not None, reason=f"{PROBLEM}")
if PROBLEM is None:
    from vidconv.data import torchcodec_decode as tc

ROOT = Path(__file__).resolve().parents[1]
# (max, mean) grey-level difference from PyAV: unresized frames, resized ones.
DECODED, RESIZED = (2, 0.25), (24, 2.5)


def _images(frames: int = 12, height: int = 48, width: int = 64) -> np.ndarray:
    """Smooth frames that change from frame to frame, so a wrong frame or a shifted crop shows."""
    yy, xx = np.mgrid[0:height, 0:width]
    return np.stack([np.stack([xx * 3 + i * 9, yy * 4 + i * 5, np.full_like(xx, 40 + 15 * i)],
                              -1) for i in range(frames)]).clip(0, 255).astype(np.uint8)


def _close(got: np.ndarray, ref: np.ndarray, tolerance: tuple[float, float] = DECODED) -> None:
    assert got.shape == ref.shape and got.dtype == np.uint8
    diff = np.abs(got.astype(int) - ref.astype(int))
    assert diff.max() <= tolerance[0] and diff.mean() < tolerance[1], (diff.max(), diff.mean())


def _stripes(frames: int = 4, height: int = 48, width: int = 64) -> np.ndarray:
    """Grey vertical and horizontal bars 5 px wide, moving: a square one pixel off changes many
    pixels. Grey, because the two scale paths handle subsampled chroma differently: sharp colour
    edges differ by ~10 levels on average where grey ones differ by at most 1."""
    yy, xx = np.mgrid[0:height, 0:width]
    bars = ((xx // 5) % 2 * 160 + (yy // 5) % 2 * 60 + 20).astype(np.uint8)
    return np.stack([np.repeat(np.roll(bars, i, 1)[..., None], 3, -1) for i in range(frames)])


@pytest.fixture(scope="module", params=["h264", "vp9"])
def coded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    ext = "mp4" if request.param == "h264" else "webm"
    return write_video(tmp_path_factory.mktemp("tc") / f"smooth.{ext}", _images(),
                       codec=request.param)


# ------------------------------------------------------------------- the same pixels as PyAV


@needs_torchcodec
@pytest.mark.parametrize("frame_size", [None, 32, 48])
def test_frames_equal_pyav(coded: Path, frame_size: int | None) -> None:
    ref = pyav.decode_frames(coded, frame_size=frame_size)
    got = tc.decode_frames(coded, frame_size=frame_size)
    assert got.shape == ref.shape == ((12, 48, 64, 3) if frame_size is None
                                      else (12, frame_size, frame_size, 3))
    _close(got, ref, DECODED if frame_size is None else RESIZED)
    # Frame i is frame i: each decoded frame is closest to PyAV's frame of the same index.
    dist = np.abs(got[:, None].astype(int) - ref[None].astype(int)).mean(axis=(2, 3, 4))
    assert np.array_equal(dist.argmin(axis=1), np.arange(12))


@needs_torchcodec
@pytest.mark.parametrize("frame_size", [31, 32])
def test_centre_square_is_pyavs(tmp_path: Path, frame_size: int) -> None:
    """64x48 resized to 43x32 (31: 42x31) then cut to a square: an odd margin (11) whose offset
    PyAV rounds down; a square one pixel off differs on most pixels of the bars."""
    path = write_video(tmp_path / "bars.mp4", _stripes(), codec="h264")
    ref = pyav.decode_frames(path, frame_size=frame_size)
    got = tc.decode_frames(path, frame_size=frame_size)
    _close(got, ref, RESIZED)
    shifted = np.abs(np.roll(got, 1, axis=2)[:, :, 1:].astype(int)
                     - ref[:, :, 1:].astype(int)).mean()
    assert shifted > 2 * RESIZED[1]  # the tolerance does tell a shifted square


@needs_torchcodec
def test_picked_frames_any_order_with_repeats(coded: Path) -> None:
    whole = tc.decode_frames(coded, frame_size=32)
    picks = [7, 2, 2, 11, 0]
    assert np.array_equal(tc.decode_frames(coded, picks, frame_size=32), whole[picks])
    assert tc.decode_frames(coded, [], frame_size=32).shape == (0, 32, 32, 3)


@needs_torchcodec
def test_probe_agrees_with_pyav(coded: Path) -> None:
    ref, got = pyav.probe(coded), tc.probe(coded)
    assert (got.num_frames, got.width, got.height, got.codec, got.rotation) == (
        ref.num_frames, ref.width, ref.height, ref.codec, ref.rotation)
    assert got.pts is None  # torchcodec keeps its own timestamp order


@needs_torchcodec
def test_index_past_the_end_and_bad_arguments(coded: Path) -> None:
    with pytest.raises(DecodeError, match=r"smooth\.\w+: has no frame 12 \(torchcodec found "
                                          r"12 frames, probe said 12\)"):
        tc.decode_frames(coded, [3, 12], info=pyav.probe(coded))
    with pytest.raises(ValueError, match="indices must be >= 0, got -1"):
        tc.decode_frames(coded, [-1, 2])
    with pytest.raises(ValueError, match="frame_size must be a positive int or None, got 0"):
        tc.decode_frames(coded, [0], frame_size=0)
    with pytest.raises(ValueError, match="device must be 'cpu' or a CUDA device, got 'meta'"):
        tc.decode_frames(coded, [0], device="meta")


# ------------------------------------------------------------------------ real-world videos


@needs_torchcodec
def test_real_h264_footage(shared_videos: Path) -> None:
    path = shared_videos / "flipping_a_pancake.mkv"
    info = tc.probe(path)
    assert (info.num_frames, info.width, info.height, info.codec) == (310, 426, 240, "h264")
    full = tc.decode_frames(path)
    assert full.shape == (310, 240, 426, 3)
    picks = [0, 100, 101, 309]
    assert np.array_equal(tc.decode_frames(path, picks), full[picks])  # seeks land right
    _close(full[picks], pyav.decode_frames(path, picks))
    # The non-square source: centre square and resize as PyAV's swscale does it.
    for size in (64, 200):
        _close(tc.decode_frames(path, picks, frame_size=size),
               pyav.decode_frames(path, picks, frame_size=size), RESIZED)


@needs_torchcodec
def test_unordered_timestamps_and_short_video(shared_videos: Path) -> None:
    """unordered.mov stores its 4 frames out of presentation order."""
    path = shared_videos / "unordered.mov"
    assert tc.probe(path).num_frames == 4
    got = tc.decode_frames(path)
    _close(got, pyav.decode_frames(path))  # PyAV's frames are in timestamp order
    assert np.array_equal(tc.decode_frames(path, [3, 0]), got[[3, 0]])


@needs_torchcodec
@pytest.mark.parametrize("degrees", [0, 90, 180, 270])
def test_rotation_metadata_is_honoured(shared_videos: Path, degrees: int) -> None:
    """Phone clips stored 568x320 with display matrices: torchcodec turns them itself, and the
    frames are PyAV's upright ones (portrait for 90 and 270)."""
    path = shared_videos / f"video_{degrees}.mov"
    info, ref_info = tc.probe(path), pyav.probe(path)
    assert info.rotation == ref_info.rotation == (-degrees) % 360
    assert (info.width, info.height) == (568, 320)  # stored size, as PyAV reports it
    shown = tc.decode_frames(path, [0, 2])
    assert shown.shape[1:3] == ((568, 320) if degrees in (90, 270) else (320, 568))
    _close(shown, pyav.decode_frames(path, [0, 2]))
    _close(tc.decode_frames(path, [1], frame_size=40),
           pyav.decode_frames(path, [1], frame_size=40), RESIZED)


# -------------------------------------------------------------------------------- bad files


def _bad_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, what the DecodeError must say)."""
    folder.mkdir(parents=True, exist_ok=True)
    good = write_video(folder / "good.mp4", _images(), codec="h264").read_bytes()
    files = {"empty": (b"", "cannot open"), "text": (b"not a video\n", "cannot open"),
             "garbage": (np.random.default_rng(0).integers(0, 256, 4000, np.uint8).tobytes(),
                         "cannot open"),
             "header only": (good[:200], "cannot open")}
    out = {}
    for name, (data, says) in files.items():
        path = folder / f"{name.replace(' ', '_')}.mp4"
        path.write_bytes(data)
        out[name] = (path, says)
    (folder / "folder.mp4").mkdir(exist_ok=True)
    out["folder"] = (folder / "folder.mp4", "is a folder, not a video file")
    out["missing"] = (folder / "missing.mp4", "cannot open")
    import av

    audio = folder / "audio.m4a"
    with av.open(str(audio), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp",
                                           layout="mono")
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    out["audio only"] = (audio, "has no video stream")
    return out


@needs_torchcodec
def test_bad_files_raise_decode_error_naming_them(tmp_path: Path) -> None:
    for name, (path, says) in _bad_files(tmp_path / "bad").items():
        for call in (tc.probe, lambda p: tc.decode_frames(p, [0], frame_size=32),
                     lambda p: tc.decode_frames(p)):
            with pytest.raises(DecodeError) as err:
                call(path)
            assert err.value.path == str(path), name
            assert str(path) in str(err.value) and says in err.value.reason, (name, err.value)
            assert ".cpp:" not in err.value.reason  # torchcodec's source location is dropped


@needs_torchcodec
def test_damaged_and_truncated_real_files(shared_videos: Path, tmp_path: Path) -> None:
    """corrupted.mp4 opens and its first frame decodes; the damage shows later. A cut-off
    file decodes up to the cut, with the frame count PyAV's probe sees."""
    damaged = shared_videos / "corrupted.mp4"
    assert tc.probe(damaged).num_frames == pyav.probe(damaged).num_frames == 50
    with pytest.raises(DecodeError, match=r"corrupted\.mp4: decoding failed \(RuntimeError: "
                                          r".*Invalid data"):
        tc.decode_frames(damaged)
    cut = tmp_path / "cut.mkv"
    cut.write_bytes((shared_videos / "flipping_a_pancake.mkv").read_bytes()[:200_000])
    n = pyav.probe(cut).num_frames
    assert 0 < n < 310 and tc.probe(cut).num_frames == n
    _close(tc.decode_frames(cut, [0, n - 1]), pyav.decode_frames(cut, [0, n - 1]))


# ----------------------------------------------------------------------------- the loader


def _dataset(root: Path) -> Path:
    for label in range(2):
        (root / f"c{label}").mkdir(parents=True)
        for number, codec in enumerate(("h264", "vp9")):
            ext = "mp4" if codec == "h264" else "webm"
            frames = _images(12, 48, 64)
            frames[..., 1] = np.clip(frames[..., 1].astype(int) + 60 * label, 0, 255)
            write_video(root / f"c{label}" / f"v{number}.{ext}", frames, codec=codec)
    (root / "c0" / "broken.mp4").write_bytes(b"not a video")
    return root


SPEC = ClipSpec(frame_offsets=(0, 2, 4), size=40, frame_size=48)


@needs_torchcodec
def test_loader_backend_matches_pyav(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "d")
    kwargs = dict(batch_size=4, train=False, clips_per_video=2, cache_bytes=0)
    with pytest.warns(BadVideoWarning, match="broken.mp4"):
        loader = ClipLoader(root, SPEC, backend="torchcodec", **kwargs)
    assert loader.report.backends == {"torchcodec-cpu": 4}
    with pytest.warns(BadVideoWarning, match="broken.mp4"):
        ref = ClipLoader(root, SPEC, backend="pyav", **kwargs)
    for got, want in zip(loader, ref, strict=True):
        assert torch.equal(got.video_index, want.video_index)
        diff = (got.inputs - want.inputs).abs() * 64  # normalised input back to grey levels
        assert diff.max() <= RESIZED[0] and diff.mean() < RESIZED[1]


@needs_torchcodec
def test_loader_skips_a_file_damaged_past_its_first_frame(shared_videos: Path,
                                                          tmp_path: Path) -> None:
    root = tmp_path / "d" / "x"
    root.mkdir(parents=True)
    shutil.copy(shared_videos / "corrupted.mp4", root)
    shutil.copy(shared_videos / "video_90.mov", root)
    spec = ClipSpec(frame_offsets=(0,), size=40, frame_size=48)
    loader = ClipLoader(root.parent, spec, batch_size=8, train=False, clips_per_video=2,
                        backend="torchcodec")
    with pytest.warns(BadVideoWarning, match="corrupted.mp4"):
        batches = [b.video_index.tolist() for b in loader]
    assert batches == [[1, 1]]
    assert [s.stage for s in loader.report.skipped] == ["decode"]
    assert "Invalid data" in loader.report.skipped[0].reason


@needs_torchcodec
@pytest.mark.cuda
def test_nvdec_frames_match_the_cpu(coded: Path, shared_videos: Path) -> None:
    """NVDEC through torchcodec: frames on the GPU, resized there, close to the CPU path."""
    gpu = tc.decode_frames(coded, [5, 1, 1], frame_size=32, device="cuda")
    assert gpu.device.type == "cuda" and gpu.shape == (3, 32, 32, 3)
    # torch's antialiased resize on the GPU vs swscale on the CPU
    _close(gpu.cpu().numpy(), tc.decode_frames(coded, [5, 1, 1], frame_size=32), RESIZED)
    turned = tc.decode_frames(shared_videos / "video_90.mov", [0], device="cuda")
    _close(turned.cpu().numpy(), pyav.decode_frames(shared_videos / "video_90.mov", [0]))
    with pytest.raises(DecodeError, match="corrupted.mp4: decoding failed"):
        tc.decode_frames(shared_videos / "corrupted.mp4", device="cuda")


@needs_torchcodec
@pytest.mark.cuda
def test_nvdec_loader(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "d")
    (root / "c0" / "broken.mp4").unlink()
    kwargs = dict(batch_size=4, train=False, clips_per_video=2, cache_bytes=0)
    gpu = ClipLoader(root, SPEC, backend="torchcodec", device="cuda", **kwargs)
    assert gpu.report.backends == {"torchcodec-gpu": 4}
    for got, want in zip(gpu, ClipLoader(root, SPEC, backend="pyav", **kwargs), strict=True):
        assert got.inputs.device.type == "cuda"
        assert ((got.inputs.cpu() - want.inputs).abs() * 64).max() <= RESIZED[0]


# ------------------------------------------------------------------- without torchcodec


@pytest.mark.skipif(PROBLEM is None, reason="torchcodec imports here")
def test_loader_says_why_torchcodec_cannot_be_used(tmp_path: Path) -> None:
    root = tmp_path / "d" / "x"
    root.mkdir(parents=True)
    write_video(root / "v.mp4", _images(), codec="h264")
    with pytest.raises(ImportError, match=r"backend='torchcodec': torchcodec (is not installed|"
                                          r"does not import with torch).*CUDA build of torch"):
        ClipLoader(root.parent, SPEC, backend="torchcodec")
    from vidconv.data.torchcodec_decode import decode_frames

    with pytest.raises(ImportError, match=r"torchcodec (is not installed|does not import)"):
        decode_frames(root / "v.mp4", [0])


def test_cli_offers_every_loader_backend(tmp_path: Path) -> None:
    from vidconv.cli import BACKEND_CHOICES

    assert BACKEND_CHOICES == BACKENDS and "torchcodec" in BACKENDS
    res = subprocess.run([sys.executable, "-m", "vidconv", "train", "x", "--backend", "nvdec"],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "invalid choice: 'nvdec'" in res.stderr and "torchcodec" in res.stderr


def test_benchmark_runs_and_writes_its_json(tmp_path: Path) -> None:
    out = tmp_path / "d.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "decode_backends.py"),
                          "--quick", "--sizes", "64x48", "--codecs", "h264", "--repeats", "1",
                          "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    import json

    data = json.loads(out.read_text())
    tasks = {(r["video"], r["task"]) for r in data["rows"]}
    assert ("h264 64x48", "clip") in tasks and ("h264 64x48", "all") in tasks
    assert all(r["pyav ms"] > 0 for r in data["rows"])
    timed = PROBLEM is None
    assert all((r["torchcodec ms"] != "n/a") == timed for r in data["rows"])
    assert res.stdout.rstrip().splitlines()[-1].split()[0] in ("h264", "real")  # table last
