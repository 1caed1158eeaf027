"""NVIDIA DALI decoding: NVDEC on the GPU ("dali-gpu") and DALI's CPU decoder ("dali-cpu").

DALI (pip package ``nvidia-dali-cuda130`` for CUDA 13) is optional; :func:`dali_available`
says whether it imports. Its CPU decoder reads VP8, VP9 and MJPEG only; the GPU ("mixed")
decoder also H.264, HEVC, AV1 and MPEG-4. Frames come back as torch uint8 ``(F, H, W, 3)`` on
the decoding device (GPU frames are copied device to device into a torch tensor, never through
the host), are turned for rotation metadata and centre-cropped / resized with torch on that
device (:func:`resize_square`), and go to vidconv's preprocessing ops on the same device.

Frame indices are the decoder's presentation order, as for PyAV. DALI does not apply rotation
metadata itself; the loader passes the rotation its probe read. An index past the last frame
DALI decodes is an error (DALI's default would pad with black frames).

Batches and pipelines
    :meth:`DaliDecoder.decode_batch` takes many files at once (the loader hands it every DALI
    file of a batch of clips). They are split over ``pipelines`` DALI pipelines that run
    concurrently, each decoding ``batch_size`` files per run with ``prefetch`` runs queued
    ahead, so that while one run's frames are copied out the next one decodes. On CUDA the
    default is one pipeline per NVDEC engine of the GPU (:func:`nvdec_engines`; an H100 or
    H200 has 7): one synchronous pipeline keeps only one engine busy. On the CPU the default
    is one pipeline (DALI's threads already decode the files of a run in parallel). Knobs:
    ``VIDCONV_DALI_BATCH`` (default 8), ``VIDCONV_DALI_PIPELINES``, ``VIDCONV_DALI_PREFETCH``
    (default 2; 1 = synchronous runs). Files decoded whole (the loader's cache fill, once per
    video) go one per run without queueing, since their full-resolution frames can take
    gigabytes; they still spread over the pipelines. Results do not depend on any of this:
    every file's frames are its own, decoded with the same operator and arguments as one file
    per run.

Bad files in a batch
    DALI fails a run as a whole without naming the sample, and the failed pipeline cannot be
    used again. The files of a failed run are therefore decoded again one per run on a fresh
    pipeline: the bad file gets its own :class:`~vidconv.data.decode.DecodeError` naming it,
    the others of its batch still decode, and the runs after it go on as batches
    (:class:`vidconv.data._dali_worker.BatchRunner`).

Crash isolation
    DALI's decoders are native code: a damaged file can crash them (a segmentation fault)
    rather than raise, and a crash inside the training process would end the run, naming no
    file. The CPU decoder therefore runs in a persistent worker process per pipeline
    (:mod:`vidconv.data._dali_worker`, started at the first decode, importing only NumPy and
    DALI, and running the same batching code as the GPU path) that gets a list of files per
    request over a pipe and sends each file's frames back as its run finishes. When the worker
    dies (or does not answer within ``VIDCONV_DALI_TIMEOUT`` seconds, default 600, per file of
    the request still to come), the files it had not answered are decoded again one per request
    in a fresh worker, so only the file that crashes it alone raises a
    :class:`~vidconv.data.decode.DecodeError` naming it and the signal; the loader skips and
    reports it like any bad file. A persistent worker rather than a checked first pass per
    file: one process start per loader instead of one per file, and every decode is protected,
    not only the first. The cost is one copy of the decoded frames through the pipe (a few ms
    for a short clip, small beside the decode itself). NVDEC frames stay in the training
    process (they live on the GPU and must not go through the host), so the "mixed" backend is
    not isolated.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path

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
START_TIMEOUT_S = 120.0
DEFAULT_BATCH = 8
DEFAULT_PREFETCH = 2
# NVDEC engines per GPU, by a part of the device name (first match wins; "L40" before "L4"),
# from NVIDIA's data sheets. Other GPUs get DEFAULT_ENGINES.
NVDEC_ENGINES: tuple[tuple[str, int], ...] = (
    ("H200", 7), ("H100", 7), ("H800", 7), ("A100", 5), ("A800", 5), ("L40", 3), ("L4", 4))
DEFAULT_ENGINES = 2

# A request: a file and the frame indices wanted from it (None: every frame).
Request = tuple["str | Path", "Sequence[int] | None"]


def nvdec_engines(device: str | torch.device) -> int:
    """The number of NVDEC engines of a CUDA device, from its name (:data:`NVDEC_ENGINES`;
    ``DEFAULT_ENGINES`` for a GPU not listed there)."""
    name = torch.cuda.get_device_name(torch.device(device))
    for part, engines in NVDEC_ENGINES:
        if part in name:
            return engines
    return DEFAULT_ENGINES


def gpu_threads(threads: int, batch_size: int, pipelines: int, cores: int | None = None) -> int:
    """DALI CPU threads of each CUDA pipeline: ``threads``, or more, up to a run's files, when
    the CPU cores shared out over the pipelines allow (the "mixed" decoder parses and decodes
    the files of a run in parallel on these threads)."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1)
    return max(threads, min(batch_size, cores // pipelines))


def _signal_name(returncode: int | None) -> str:
    if returncode is None or returncode >= 0:
        return f"exit status {returncode}"
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def _setting(name: str, value: int | None, env: str, default: int) -> int:
    """A positive int argument, else the environment variable ``env``, else ``default``."""
    source = name
    if value is None:
        raw = os.environ.get(env)
        if raw is None:
            return default
        source = env
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"{env} must be an int >= 1, got {raw!r}") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{source} must be an int >= 1, got {value!r}")
    return value


class _Worker:
    """One DALI CPU decoding process and the two pipes to it."""

    def __init__(self, threads: int, batch_size: int, prefetch: int) -> None:
        req_r, req_w = os.pipe()
        ans_r, ans_w = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, str(_WORKER_SCRIPT), str(req_r), str(ans_w), str(threads),
                 str(batch_size), str(prefetch)],
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


_NO_ANSWER = "DALI's decoder process gave no answer for it"


class _WorkerPipeline:
    """One CPU pipeline: a worker process running DALI's CPU decoder on lists of files."""

    def __init__(self, decoder: DaliDecoder) -> None:
        self.decoder = decoder
        self.worker: _Worker | None = None
        self.lock = threading.Lock()

    def close(self) -> None:
        with self.lock:
            self._drop()

    def _drop(self) -> None:
        if self.worker is not None:
            self.worker.close()
            self.worker = None

    def decode(self, requests: list[tuple[Path, list[int] | None]]
               ) -> list[torch.Tensor | DecodeError]:
        with self.lock:
            results: list[torch.Tensor | DecodeError | None] = [None] * len(requests)
            failure = self._exchange(requests, results)
            left = [k for k, r in enumerate(results) if r is None]
            if len(requests) > 1:
                # The worker died or hung on one of the files it had not answered yet: each
                # of them alone, in a fresh worker, tells which.
                for k in left:
                    one: list[torch.Tensor | DecodeError | None] = [None]
                    failure = self._exchange([requests[k]], one)
                    results[k] = one[0]
                    if results[k] is None:
                        results[k] = DecodeError(requests[k][0], failure or _NO_ANSWER)
            elif left:
                results[0] = DecodeError(requests[0][0], failure or _NO_ANSWER)
            return results  # type: ignore[return-value]

    def _exchange(self, requests: list[tuple[Path, list[int] | None]],
                  results: list[torch.Tensor | DecodeError | None]) -> str | None:
        """Send one request and fill ``results`` with the answers; the reason when the
        worker died or hung before answering every file (the worker is then stopped)."""
        dec = self.decoder
        if self.worker is None:
            try:
                self.worker = _Worker(dec.threads, dec.batch_size, dec.prefetch)
            except OSError as exc:
                return f"cannot start DALI's decoder process ({exc})"
            fresh = True
        else:
            fresh = False
        worker = self.worker
        try:
            # Importing DALI takes seconds on a busy machine: not a file's decode time.
            if fresh and not (worker.answers.poll(max(dec.timeout, START_TIMEOUT_S))
                              and worker.answers.recv() == ("ready",)):
                self._drop()
                return (f"DALI's decoder process did not start within "
                        f"{max(dec.timeout, START_TIMEOUT_S):g} s")
            worker.requests.send([(str(p), ix) for p, ix in requests])
            while True:
                waiting = sum(r is None for r in results)
                if not worker.answers.poll(dec.timeout * max(1, waiting)):
                    self._drop()
                    return (f"DALI's decoder did not finish within {dec.timeout:g} s per file "
                            "(VIDCONV_DALI_TIMEOUT); its worker was stopped")
                answer = worker.answers.recv()
                if answer[0] == "done":
                    return None
                kind, k, value = answer
                if kind == "error":
                    results[k] = DecodeError(requests[k][0], value)
                    continue
                frames = torch.empty(tuple(value), dtype=torch.uint8)
                # Straight from the pipe into the tensor: one copy.
                worker.answers.recv_bytes_into(memoryview(frames.numpy()).cast("B"))
                results[k] = frames
        except (EOFError, OSError):
            self._drop()
            how = _signal_name(worker.proc.returncode)
            return f"DALI's decoder process died decoding it ({how})"
        except BaseException:
            # Anything else mid-exchange (an allocation failure, Ctrl-C) leaves unread bytes in
            # the pipe, and the next file would get this one's answer: start a fresh worker.
            self._drop()
            raise


class _GpuPipeline:
    """One CUDA pipeline in this process: DALI's "mixed" decoder (NVDEC) on lists of files."""

    def __init__(self, decoder: DaliDecoder) -> None:
        from vidconv.data._dali_worker import BatchRunner

        self.decoder = decoder
        self.runner = BatchRunner("mixed", decoder.device.index or 0, decoder.threads,
                                  decoder.batch_size, decoder.prefetch)
        self.lock = threading.Lock()

    def close(self) -> None:
        with self.lock:
            self.runner.close()

    def decode(self, requests: list[tuple[Path, list[int] | None]]
               ) -> list[torch.Tensor | DecodeError]:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        from vidconv.data._dali_worker import read_encoded

        device = self.decoder.device
        results: list[torch.Tensor | DecodeError | None] = [None] * len(requests)
        items = []
        for k, (path, indices) in enumerate(requests):
            data, error = read_encoded(str(path))
            if error is not None:
                results[k] = DecodeError(path, error)
            else:
                items.append((k, data, indices))
        stream = torch.cuda.current_stream(device)

        def deliver(k: int, sample, error: str | None) -> None:
            if error is not None:
                results[k] = DecodeError(requests[k][0], error)
                return
            frames = torch.empty(tuple(sample.shape()), dtype=torch.uint8, device=device)
            feed_ndarray(sample, frames, cuda_stream=stream)
            # DALI reuses the run's buffers once the next run's output is read: the copy must
            # be done by then.
            stream.synchronize()
            results[k] = frames

        with self.lock, torch.cuda.device(device):
            self.runner.run(items, deliver)
        return results  # type: ignore[return-value]


class DaliDecoder:
    """Decodes files, whole or chosen frames, with DALI: several files per pipeline run and
    several pipelines at once (see the module docstring).

    Args:
        device: "cpu" (DALI's CPU decoder, in worker processes; see the module docstring) or
            a CUDA device (NVDEC through DALI's "mixed" backend; the output stays on that GPU).
        threads: DALI CPU threads per pipeline (on CUDA at least the CPU cores shared out
            over the pipelines, up to ``batch_size``: :func:`gpu_threads`).
        timeout: seconds a CPU decode may take per file before the worker is killed and the
            file reported (default: ``VIDCONV_DALI_TIMEOUT`` or 600).
        batch_size: files per pipeline run (default: ``VIDCONV_DALI_BATCH`` or 8).
        pipelines: pipelines decoding at once (default: ``VIDCONV_DALI_PIPELINES``, else the
            GPU's NVDEC engines on CUDA and 1 on the CPU).
        prefetch: runs queued ahead per pipeline (default: ``VIDCONV_DALI_PREFETCH`` or 2; 1
            runs each batch synchronously).
    """

    def __init__(self, device: str | torch.device = "cpu", threads: int = 1,
                 timeout: float | None = None, *, batch_size: int | None = None,
                 pipelines: int | None = None, prefetch: int | None = None) -> None:
        if not dali_available():
            raise ImportError("backend 'dali' needs NVIDIA DALI: pip install nvidia-dali-cuda130 "
                              "(the wheel matching torch's CUDA version)")
        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or a CUDA device, got {str(device)!r}")
        self.threads = max(1, threads)
        if timeout is None:
            timeout = float(os.environ.get("VIDCONV_DALI_TIMEOUT", DEFAULT_TIMEOUT_S))
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        self.timeout = timeout
        self.batch_size = _setting("batch_size", batch_size, "VIDCONV_DALI_BATCH", DEFAULT_BATCH)
        self.prefetch = _setting("prefetch", prefetch, "VIDCONV_DALI_PREFETCH", DEFAULT_PREFETCH)
        on_gpu = self.device.type == "cuda"
        self.pipelines = _setting("pipelines", pipelines, "VIDCONV_DALI_PIPELINES",
                                  nvdec_engines(self.device) if on_gpu else 1)
        if on_gpu:
            self.threads = gpu_threads(self.threads, self.batch_size, self.pipelines)
        kind = _GpuPipeline if on_gpu else _WorkerPipeline
        self._slots: list[_WorkerPipeline | _GpuPipeline] = [
            kind(self) for _ in range(self.pipelines)]
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for slot in self._slots:
            self._free.put(slot)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    @property
    def codecs(self) -> frozenset[str]:
        return GPU_CODECS if self.device.type == "cuda" else CPU_CODECS

    @property
    def worker_pid(self) -> int | None:
        """The first CPU pipeline's process id (None before its first decode, after a crash,
        and on CUDA)."""
        slot = self._slots[0]
        worker = getattr(slot, "worker", None)
        return None if worker is None else worker.proc.pid

    def close(self) -> None:
        """Stop the worker processes and drop the pipelines (a later decode starts anew)."""
        for slot in self._slots:
            slot.close()
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    def __del__(self) -> None:
        for slot in getattr(self, "_slots", ()):
            worker = getattr(slot, "worker", None)
            if worker is not None:
                try:
                    worker.close()
                except Exception:  # interpreter shutdown: the pipes close with the process
                    pass

    def decode(self, path: str | Path, indices: Sequence[int] | None = None) -> torch.Tensor:
        """Frames ``indices`` (presentation order; None = all) of ``path`` as uint8
        ``(F, H, W, 3)`` on this decoder's device, in stored orientation.

        Raises:
            DecodeError: DALI cannot read the file, an index is past its end, or the decoder
                crashed or hung on it.
        """
        (result,) = self.decode_batch([(path, indices)])
        if isinstance(result, DecodeError):
            raise result
        return result

    def decode_batch(self, requests: Sequence[Request]) -> list[torch.Tensor | DecodeError]:
        """Decode many files at once: for each ``(path, indices or None)``, in order, the
        frames :meth:`decode` would give, or the :class:`~vidconv.data.decode.DecodeError` it
        would raise. One bad file costs only itself."""
        todo = [(Path(p), None if ix is None else [int(i) for i in ix]) for p, ix in requests]
        if not todo:
            return []
        # Contiguous parts, one per pipeline: on a GPU, engines kept busy matter more than
        # files per run.
        parts = min(self.pipelines, len(todo))
        step = -(-len(todo) // parts)
        chunks = [todo[i:i + step] for i in range(0, len(todo), step)]
        if len(chunks) == 1:
            return self._on_free_slot(chunks[0])
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.pipelines, thread_name_prefix="vidconv-dali")
            pool = self._pool
        futures = [pool.submit(self._on_free_slot, chunk) for chunk in chunks]
        return [r for f in futures for r in f.result()]

    def _on_free_slot(self, requests: list[tuple[Path, list[int] | None]]
                      ) -> list[torch.Tensor | DecodeError]:
        slot = self._free.get()
        try:
            return slot.decode(requests)
        finally:
            self._free.put(slot)
