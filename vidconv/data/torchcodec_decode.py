"""Probing and decoding video files with torchcodec, PyTorch's own video decoder: FFmpeg on the
CPU, NVDEC on CUDA.

The contract is :mod:`vidconv.data.decode`'s (PyAV): frame ``i`` is the ``i``-th frame in
presentation order, frames come out the way a player shows them, centre-cropped to a square and
resized to ``frame_size``, and any unreadable file raises
:class:`~vidconv.data.decode.DecodeError` naming it.

What torchcodec does itself (checked against torchcodec 0.17)
    - Frame numbering: in its "exact" seek mode (the one used here) opening a file scans all its
      packets (a demux, no decoding: the cost of PyAV's probe) and numbers frames by
      timestamp, so index ``i`` is the ``i``-th frame in presentation order, as for PyAV, also
      for a file that stores them out of order. The scan runs on every open, so every call
      here pays it once.
    - Rotation: torchcodec applies the display matrix while decoding; its metadata reports the
      displayed (post-rotation) size and the angle (FFmpeg's convention, counter-clockwise;
      None without a matrix). Nothing is turned here; :func:`probe` reports the stored size
      and the angle the way :mod:`vidconv.data.decode` does.
    - Seeking: a batch of indices is decoded in one call that seeks to the keyframe before a
      needed frame whenever that is ahead of the decoder's position, and otherwise decodes on.
    - Frame rate: ``metadata.average_fps`` (from the scan). Frames are addressed by index here,
      never by time, so it is not used.
    - Resize: on the CPU the resize is a torchcodec decoder transform, FFmpeg's scale filter
      (swscale, bilinear) on each decoded frame, as PyAV's ``reformat`` does; the centre square
      is cut here (torchcodec's CenterCrop rounds an odd margin the other way). Unresized
      frames equal PyAV's; resized ones differ by a grey level or so on average (PyAV's wheel
      bundles its own FFmpeg, torchcodec uses the system's, and the two scale paths round
      differently). torchcodec's
      NVDEC path takes no decoder transforms, so on CUDA the full frames are resized on the GPU
      with :func:`vidconv.data.dali.resize_square` (torch's antialiased bilinear, as for DALI).

torchcodec is optional and imported lazily. Its wheels link against CUDA torch (libtorch_cuda,
libnvrtc), so it does not load beside a CPU-only torch build; :func:`torchcodec_problem` says
why it cannot be used in this environment.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from vidconv.data.decode import DecodeError, VideoInfo, square_geometry

_IMPORT_PROBLEM: list[str | None] = []

# torchcodec prefixes its C++ errors with the function, source file and line.
_SOURCE_PREFIX = re.compile(r"^\w+, \S+\.(?:cpp|h):\d+, ")


def torchcodec_problem() -> str | None:
    """Why torchcodec cannot be used here (a sentence naming the cause), or None when it can."""
    if not _IMPORT_PROBLEM:
        try:
            import torchcodec.decoders  # noqa: F401
        except ModuleNotFoundError as exc:
            if exc.name is not None and exc.name.split(".")[0] != "torchcodec":
                _IMPORT_PROBLEM.append(_import_failure(exc))
            else:
                _IMPORT_PROBLEM.append(
                    "torchcodec is not installed; its wheels need a CUDA build of torch "
                    "(they run on the CPU too), e.g. pip install torch==2.14.1 "
                    "torchcodec==0.17.0")
        except Exception as exc:  # a build for another torch raises OSError, RuntimeError, ...
            _IMPORT_PROBLEM.append(_import_failure(exc))
        else:
            _IMPORT_PROBLEM.append(None)
    return _IMPORT_PROBLEM[0]


def _import_failure(exc: Exception) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return (f"torchcodec does not import with torch {torch.__version__} "
            f"({type(exc).__name__}: {first[:300]}); its wheels need a CUDA build of torch "
            "(they run on the CPU too), e.g. pip install torch==2.14.1 torchcodec==0.17.0")


def torchcodec_available() -> bool:
    """Whether torchcodec imports in this environment."""
    return torchcodec_problem() is None


def _decoders():
    problem = torchcodec_problem()
    if problem is not None:
        raise ImportError(problem)
    import torchcodec.decoders

    return torchcodec.decoders


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {_SOURCE_PREFIX.sub('', text)[:300]}"


def _open(path: Path, *, device: str = "cpu", threads: int = 1, transforms=None):
    decoders = _decoders()
    try:
        return decoders.VideoDecoder(str(path), dimension_order="NHWC", seek_mode="exact",
                                     device=device, num_ffmpeg_threads=threads,
                                     transforms=transforms)
    except (RuntimeError, ValueError, OSError) as exc:
        failure = exc
    if path.is_dir():
        raise DecodeError(path, "is a folder, not a video file") from failure
    try:
        container = decoders.get_container_metadata(str(path))
    except (RuntimeError, ValueError, OSError):
        raise DecodeError(path, f"cannot open ({_reason(failure)})") from failure
    if container.best_video_stream_index is None:
        raise DecodeError(path, "has no video stream") from failure
    raise DecodeError(path, f"cannot open its video stream ({_reason(failure)})") from failure


def _rotation(angle: float | None) -> int:
    # The same normalisation as the PyAV backend: counter-clockwise, 0/90/180/270.
    return int(round((angle or 0) / 90.0)) % 4 * 90


def probe(path: str | Path) -> VideoInfo:
    """Stream facts of a file from torchcodec's scan, and its first frame decoded.

    ``pts`` is None: torchcodec orders frames by timestamp itself and exposes the timestamps in
    seconds only, so there are no integer timestamps to report.

    Raises:
        DecodeError: the file cannot be opened, has no video stream or no decodable frame.
        ImportError: torchcodec does not import here (see :func:`torchcodec_problem`).
    """
    path = Path(path)
    decoder = _open(path)
    meta = decoder.metadata
    if len(decoder) == 0:
        raise DecodeError(path, "has no video frames")
    try:
        decoder.get_frames_at([0])
    except (RuntimeError, ValueError, IndexError) as exc:
        raise DecodeError(path, f"cannot decode its first frame ({_reason(exc)})") from exc
    rotation = _rotation(meta.rotation)
    width, height = meta.width, meta.height
    if rotation in (90, 270):  # metadata gives the displayed size; VideoInfo the stored one
        width, height = height, width
    return VideoInfo(len(decoder), int(width), int(height), meta.codec or "unknown", rotation,
                     None)


def decode_frames(path: str | Path, indices: Sequence[int] | None = None, *,
                  frame_size: int | None = None, info: VideoInfo | None = None,
                  threads: int = 0, device: str | torch.device = "cpu"
                  ) -> np.ndarray | torch.Tensor:
    """Frames of a video as uint8 RGB, in display orientation.

    Args:
        path: the file.
        indices: frame indices (presentation order; any order, repeats allowed), or None for
            every frame.
        frame_size: centre-crop to a square and resize to ``frame_size`` x ``frame_size``; None
            keeps the displayed size.
        info: a :func:`probe` result (of either backend) for the file, or None. torchcodec
            scans the file when it opens it anyway; ``info`` only names the frame count the
            probe saw in the error for an index past the end.
        threads: FFmpeg decoder threads on the CPU (0 = FFmpeg's choice).
        device: "cpu" (FFmpeg) or a CUDA device (NVDEC; torchcodec falls back to its CPU
            decoder for a stream NVDEC cannot read, and the frames still end up on the device).

    Returns:
        ``(len(indices), H, W, 3)`` uint8 (every frame when ``indices`` is None): a NumPy array
        on the CPU, a torch tensor on the CUDA device.

    Raises:
        DecodeError: the file is unreadable, or has fewer frames than an index asks for.
        ValueError: a negative index or a bad ``frame_size`` / ``device``.
        ImportError: torchcodec does not import here.
    """
    path = Path(path)
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or a CUDA device, got {str(device)!r}")
    if frame_size is not None and (isinstance(frame_size, bool)
                                   or not isinstance(frame_size, int) or frame_size < 1):
        raise ValueError(f"frame_size must be a positive int or None, got {frame_size!r}")
    wanted = None if indices is None else sorted(set(int(i) for i in indices))
    if wanted and wanted[0] < 0:
        raise ValueError(f"indices must be >= 0, got {wanted[0]}")
    on_cuda = device.type == "cuda"
    transforms = None
    if frame_size is not None and not on_cuda:
        # torchcodec rotates before its transforms, so the displayed size decides the resize;
        # the container header has it (no scan).
        from torchcodec.transforms import Resize

        transforms = [Resize(square_geometry(*_displayed_size(path), frame_size))]
    decoder = _open(path, device=str(device), threads=threads, transforms=transforms)
    total = len(decoder)
    if total == 0:
        raise DecodeError(path, "has no video frames")
    if wanted is None:
        wanted = list(range(total))
    if wanted and wanted[-1] >= total:
        said = "" if info is None else f", probe said {info.num_frames}"
        raise DecodeError(path, f"has no frame {wanted[-1]} (torchcodec found {total} "
                          f"frames{said})")
    if not wanted:
        h, w = (frame_size, frame_size) if frame_size else (decoder.metadata.height,
                                                             decoder.metadata.width)
        empty = torch.empty((0, h, w, 3), dtype=torch.uint8, device=device)
        return empty if on_cuda else empty.numpy()
    try:
        frames = decoder.get_frames_at(wanted).data
    except (RuntimeError, ValueError, IndexError) as exc:
        raise DecodeError(path, f"decoding failed ({_reason(exc)})") from exc
    if on_cuda and frame_size is not None:
        from vidconv.data.dali import resize_square

        frames = resize_square(frames, frame_size)
    elif frame_size is not None:
        # The centre square cut here rather than by torchcodec's CenterCrop, which rounds an
        # odd margin's offset up where the PyAV backend rounds it down (a one-pixel shift).
        h, w = frames.shape[1:3]
        y, x = (h - frame_size) // 2, (w - frame_size) // 2
        frames = frames[:, y:y + frame_size, x:x + frame_size]
    if indices is not None and list(indices) != wanted:
        position = {i: k for k, i in enumerate(wanted)}
        frames = frames[torch.tensor([position[int(i)] for i in indices],
                                     device=frames.device)]
    frames = frames.contiguous()
    return frames if on_cuda else frames.numpy()


def _displayed_size(path: Path) -> tuple[int, int]:
    decoders = _decoders()
    try:
        container = decoders.get_container_metadata(str(path))
    except (RuntimeError, ValueError, OSError):
        container = None
    stream = None if container is None or container.best_video_stream_index is None \
        else container.streams[container.best_video_stream_index]
    if stream is None or not stream.width or not stream.height:
        _open(path)  # raises the DecodeError that says what is wrong
        raise DecodeError(path, "has no frame size in its container header")
    return int(stream.height), int(stream.width)
