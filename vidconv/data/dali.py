"""NVIDIA DALI decoding: NVDEC on the GPU ("dali-gpu") and DALI's CPU decoder ("dali-cpu").

DALI (pip package ``nvidia-dali-cuda130`` for CUDA 13) is optional; :func:`dali_available`
says whether it imports. Its CPU decoder reads VP8, VP9 and MJPEG only; the GPU ("mixed")
decoder also H.264, HEVC, AV1 and MPEG-4. Frames come back as torch uint8 ``(F, H, W, 3)`` on
the decoding device (GPU frames are copied device to device into a torch tensor, never through
the host), are turned for rotation metadata and centre-cropped / resized with torch on that
device (:func:`resize_square`), and go to vidconv's preprocessing ops on the same device.

Frame indices are the decoder's presentation order, as for PyAV. DALI does not apply rotation
metadata itself; the loader passes the rotation its probe read.

Crash isolation
    DALI's decoders are native code: a damaged file can crash them (a segmentation fault)
    rather than raise, and a crash inside the training process would end the run, naming no
    file. The CPU decoder therefore runs in a persistent worker process
    (:mod:`vidconv.data._dali_worker`, started at the first decode, importing only NumPy and
    DALI) that gets one file per request over a pipe and sends the frames back. When the worker
    dies while decoding a file (or does not answer within ``VIDCONV_DALI_TIMEOUT`` seconds,
    default 600), that file raises :class:`~vidconv.data.decode.DecodeError` naming it and the
    signal, so the loader skips and reports it like any bad file, and the next call starts a
    fresh worker. A persistent worker rather than a checked first pass per file: one process
    start per loader instead of one per file, and every decode is protected, not only the first.
    The cost is one copy of the decoded frames through the pipe (a few ms for a short clip,
    small beside the decode itself). NVDEC frames stay in the training process (they live on
    the GPU and must not go through the host), so the "mixed" backend is not isolated.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vidconv.data.decode import DecodeError

CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
GPU_CODECS = frozenset({"vp8", "vp9", "mjpeg", "h264", "hevc", "av1", "mpeg4"})


def dali_available() -> bool:
    """Whether NVIDIA DALI imports in this environment."""
    try:
        import nvidia.dali  # noqa: F401
    except Exception:  # an install without its CUDA libraries raises other errors too
        return False
    return True


def resize_square(frames: torch.Tensor, frame_size: int, rotation: int = 0) -> torch.Tensor:
    """Display orientation, centre square crop and resize to ``frame_size``, on the frames'
    device: uint8 ``(F, H, W, 3)`` in, uint8 ``(F, S, S, 3)`` out (bilinear with antialiasing,
    the torch counterpart of the PyAV backend's swscale resize)."""
    if rotation:
        frames = torch.rot90(frames, rotation // 90, dims=(1, 2))
    _, h, w, _ = frames.shape
    short = min(h, w)
    y, x = (h - short) // 2, (w - short) // 2
    square = frames[:, y:y + short, x:x + short]
    if short == frame_size:
        return square.contiguous()
    x = square.permute(0, 3, 1, 2)  # NCHW view with channels-last strides
    size = (frame_size, frame_size)
    if x.device.type == "cpu":
        # ATen's uint8 channels-last kernel: several times faster than going through float.
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        return x.permute(0, 2, 3, 1).contiguous()
    x = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False,
                      antialias=True)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


_WORKER_SCRIPT = Path(__file__).with_name("_dali_worker.py")
DEFAULT_TIMEOUT_S = 600.0


def _signal_name(returncode: int | None) -> str:
    if returncode is None or returncode >= 0:
        return f"exit status {returncode}"
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


class _Worker:
    """One DALI CPU decoding process and the two pipes to it."""

    def __init__(self, threads: int) -> None:
        req_r, req_w = os.pipe()
        ans_r, ans_w = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, str(_WORKER_SCRIPT), str(req_r), str(ans_w), str(threads)],
                pass_fds=(req_r, ans_w), stdin=subprocess.DEVNULL, close_fds=True)
        except BaseException:
            os.close(req_w)
            os.close(ans_r)
            raise
        finally:
            os.close(req_r)
            os.close(ans_w)
        self.requests = Connection(req_w, readable=False, writable=True)
        self.answers = Connection(ans_r, readable=True, writable=False)

    def close(self) -> None:
        for conn in (self.requests, self.answers):
            try:
                conn.close()
            except OSError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class DaliDecoder:
    """Decodes whole files or chosen frames with DALI, one file per call.

    Args:
        device: "cpu" (DALI's CPU decoder, in a worker process; see the module docstring) or
            a CUDA device (NVDEC through DALI's "mixed" backend; the output stays on that GPU).
        threads: DALI CPU worker threads.
        timeout: seconds a CPU decode may take before the worker is killed and the file
            reported (default: ``VIDCONV_DALI_TIMEOUT`` or 600).
    """

    def __init__(self, device: str | torch.device = "cpu", threads: int = 1,
                 timeout: float | None = None) -> None:
        if not dali_available():
            raise ImportError("backend 'dali' needs NVIDIA DALI: pip install nvidia-dali-cuda130 "
                              "(the wheel matching torch's CUDA version)")
        self.device = torch.device(device)
        self.threads = max(1, threads)
        if timeout is None:
            timeout = float(os.environ.get("VIDCONV_DALI_TIMEOUT", DEFAULT_TIMEOUT_S))
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        self.timeout = timeout
        self._pipes: dict[bool, object] = {}
        self._worker: _Worker | None = None
        self._lock = threading.Lock()

    @property
    def codecs(self) -> frozenset[str]:
        return GPU_CODECS if self.device.type == "cuda" else CPU_CODECS

    @property
    def worker_pid(self) -> int | None:
        """The CPU decoding process's id (None before the first decode or after a crash)."""
        return None if self._worker is None else self._worker.proc.pid

    def close(self) -> None:
        """Stop the worker process (a later decode starts a new one)."""
        with self._lock:
            if self._worker is not None:
                self._worker.close()
                self._worker = None

    def __del__(self) -> None:
        worker = getattr(self, "_worker", None)
        if worker is not None:
            try:
                worker.close()
            except Exception:  # interpreter shutdown: the pipes close with the process anyway
                pass

    def _pipe(self, with_frames: bool):
        pipe = self._pipes.get(with_frames)
        if pipe is not None:
            return pipe
        from nvidia.dali import fn, pipeline_def, types

        @pipeline_def(batch_size=1, num_threads=self.threads,
                      device_id=self.device.index or 0,
                      exec_pipelined=False, exec_async=False, prefetch_queue_depth=1)
        def video_pipe():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            kwargs = {}
            if with_frames:
                kwargs["frames"] = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
            return fn.decoders.video(encoded, device="mixed", **kwargs)

        pipe = video_pipe()
        pipe.build()
        self._pipes[with_frames] = pipe
        return pipe

    def decode(self, path: str | Path, indices: Sequence[int] | None = None) -> torch.Tensor:
        """Frames ``indices`` (presentation order; None = all) of ``path`` as uint8
        ``(F, H, W, 3)`` on this decoder's device, in stored orientation.

        Raises:
            DecodeError: DALI cannot read the file, an index is past its end, or the decoder
                crashed or hung on it.
        """
        path = Path(path)
        wanted = None if indices is None else [int(i) for i in indices]
        with self._lock:
            if self.device.type != "cuda":
                return self._decode_in_worker(path, wanted)
            try:
                data = np.fromfile(path, dtype=np.uint8)
            except OSError as exc:
                raise DecodeError(path, f"cannot read ({exc})") from exc
            if data.size == 0:
                raise DecodeError(path, "is empty")
            try:
                pipe = self._pipe(wanted is not None)
                pipe.feed_input("encoded", [data])
                if wanted is not None:
                    pipe.feed_input("frames", [np.asarray(wanted, dtype=np.int32)])
                (out,) = pipe.run()
                return self._to_torch(out)
            except Exception as exc:  # DALI raises RuntimeError subclasses with C++ messages
                # A failed run leaves the pipeline unusable; build a fresh one next time.
                self._pipes.clear()
                lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
                detail = " ".join(lines)[:300]
                raise DecodeError(path, f"DALI could not decode it ({type(exc).__name__}: "
                                  f"{detail})") from exc

    def _decode_in_worker(self, path: Path, wanted: list[int] | None) -> torch.Tensor:
        if self._worker is None:
            try:
                self._worker = _Worker(self.threads)
            except OSError as exc:
                raise DecodeError(path, f"cannot start DALI's decoder process ({exc})") from exc
        worker = self._worker
        try:
            worker.requests.send((str(path), wanted))
            if not worker.answers.poll(self.timeout):
                worker.close()
                self._worker = None
                raise DecodeError(path, f"DALI's decoder did not finish within {self.timeout:g} "
                                  "s (VIDCONV_DALI_TIMEOUT); its worker was stopped")
            kind, value = worker.answers.recv()
            if kind == "error":
                raise DecodeError(path, value)
            frames = torch.empty(tuple(value), dtype=torch.uint8)
            # Straight from the pipe into the tensor: one copy.
            worker.answers.recv_bytes_into(memoryview(frames.numpy()).cast("B"))
        except DecodeError:
            raise
        except (EOFError, OSError, BrokenPipeError) as exc:
            worker.close()
            self._worker = None
            how = _signal_name(worker.proc.returncode)
            raise DecodeError(path, f"DALI's decoder process died decoding it ({how})"
                              ) from exc
        except BaseException:
            # Anything else mid-exchange (an allocation failure, Ctrl-C) leaves unread bytes in
            # the pipe, and the next file would get this one's answer: start a fresh worker.
            worker.close()
            self._worker = None
            raise
        return frames

    def _to_torch(self, out) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        tensor = out.as_tensor()
        result = torch.empty(tuple(tensor.shape())[1:], dtype=torch.uint8, device=self.device)
        # The copy runs on torch's current stream, so later torch ops see the frames.
        feed_ndarray(tensor, result.unsqueeze(0),
                     cuda_stream=torch.cuda.current_stream(self.device))
        return result
