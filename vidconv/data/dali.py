"""NVIDIA DALI decoding: NVDEC on the GPU ("dali-gpu") and DALI's CPU decoder ("dali-cpu").

DALI (pip package ``nvidia-dali-cuda130`` for CUDA 13) is optional; :func:`dali_available`
says whether it imports. Its CPU decoder reads VP8, VP9 and MJPEG only; the GPU ("mixed")
decoder also H.264, HEVC, AV1 and MPEG-4. Frames come back as torch uint8 ``(F, H, W, 3)`` on
the decoding device (GPU frames are copied device to device into a torch tensor, never through
the host), are turned for rotation metadata and centre-cropped / resized with torch on that
device (:func:`resize_square`), and go to vidconv's preprocessing ops on the same device.

Frame indices are the decoder's presentation order, as for PyAV. DALI does not apply rotation
metadata itself; the loader passes the rotation its probe read.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
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


class DaliDecoder:
    """Decodes whole files or chosen frames with DALI, one file per call.

    Args:
        device: "cpu" (DALI's CPU decoder) or a CUDA device (NVDEC through DALI's "mixed"
            backend; the output stays on that GPU).
        threads: DALI CPU worker threads.
    """

    def __init__(self, device: str | torch.device = "cpu", threads: int = 1) -> None:
        if not dali_available():
            raise ImportError("backend 'dali' needs NVIDIA DALI: pip install nvidia-dali-cuda130 "
                              "(the wheel matching torch's CUDA version)")
        self.device = torch.device(device)
        self.threads = max(1, threads)
        self._pipes: dict[bool, object] = {}
        self._lock = threading.Lock()

    @property
    def codecs(self) -> frozenset[str]:
        return GPU_CODECS if self.device.type == "cuda" else CPU_CODECS

    def _pipe(self, with_frames: bool):
        pipe = self._pipes.get(with_frames)
        if pipe is not None:
            return pipe
        from nvidia.dali import fn, pipeline_def, types

        gpu = self.device.type == "cuda"

        @pipeline_def(batch_size=1, num_threads=self.threads,
                      device_id=(self.device.index or 0) if gpu else None,
                      exec_pipelined=False, exec_async=False, prefetch_queue_depth=1)
        def video_pipe():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            kwargs = {}
            if with_frames:
                kwargs["frames"] = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
            return fn.decoders.video(encoded, device="mixed" if gpu else "cpu", **kwargs)

        pipe = video_pipe()
        pipe.build()
        self._pipes[with_frames] = pipe
        return pipe

    def decode(self, path: str | Path, indices: Sequence[int] | None = None) -> torch.Tensor:
        """Frames ``indices`` (presentation order; None = all) of ``path`` as uint8
        ``(F, H, W, 3)`` on this decoder's device, in stored orientation.

        Raises:
            DecodeError: DALI cannot read the file or an index is past its end.
        """
        path = Path(path)
        try:
            data = np.fromfile(path, dtype=np.uint8)
        except OSError as exc:
            raise DecodeError(path, f"cannot read ({exc})") from exc
        if data.size == 0:
            raise DecodeError(path, "is empty")
        with self._lock:
            try:
                pipe = self._pipe(indices is not None)
                pipe.feed_input("encoded", [data])
                if indices is not None:
                    pipe.feed_input("frames", [np.asarray(list(indices), dtype=np.int32)])
                (out,) = pipe.run()
                return self._to_torch(out)
            except DecodeError:
                raise
            except Exception as exc:  # DALI raises RuntimeError subclasses with C++ messages
                # A failed run leaves the pipeline unusable; build a fresh one next time.
                self._pipes.clear()
                lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
                detail = " ".join(lines)[:300]
                raise DecodeError(path, f"DALI could not decode it ({type(exc).__name__}: "
                                  f"{detail})") from exc

    def _to_torch(self, out) -> torch.Tensor:
        if self.device.type != "cuda":
            return torch.from_numpy(np.array(out.as_tensor())[0])
        from nvidia.dali.plugin.pytorch import feed_ndarray

        tensor = out.as_tensor()
        result = torch.empty(tuple(tensor.shape())[1:], dtype=torch.uint8, device=self.device)
        # The copy runs on torch's current stream, so later torch ops see the frames.
        feed_ndarray(tensor, result.unsqueeze(0),
                     cuda_stream=torch.cuda.current_stream(self.device))
        return result
