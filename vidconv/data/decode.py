"""Probing and decoding video files with PyAV (FFmpeg), the CPU backend every install has.

Frame ``i`` of a video is its ``i``-th frame in presentation order: frames are ordered by
presentation timestamp (pts), whatever order the container stores or the decoder returns them
in (``unordered.mov`` in the shared test videos). Rotation metadata (a display matrix, as phones
write it) is honoured: frames come out the way a player shows them. Frames are then
centre-cropped to a square and resized to ``frame_size`` (swscale bilinear, which filters over
the whole footprint when shrinking).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Frames before the first needed one that are cheaper to decode than to seek over: a seek
# lands on the previous keyframe anyway, and short videos are usually one GOP.
_SEEK_MIN_FRAMES = 96


class DecodeError(RuntimeError):
    """A video that cannot be read; the message names the file and what went wrong."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # Raised in a loader worker process and re-raised by the loader: pickled as itself.
        return type(self), (self.path, self.reason)


@dataclass(frozen=True)
class VideoInfo:
    """What probing a file tells: stream facts read from the container, no frame decoded.

    num_frames: video packets with data (one per frame for every codec we read).
    width, height: stored (coded) size; rotation turns it for display.
    rotation: degrees counter-clockwise a player turns the stored frames (0, 90, 180, 270).
    pts: presentation timestamps of the frames in order, or None when some are missing.
    """

    num_frames: int
    width: int
    height: int
    codec: str
    rotation: int
    pts: tuple[int, ...] | None

    @property
    def display_size(self) -> tuple[int, int]:
        """(height, width) as shown, after rotation."""
        if self.rotation in (90, 270):
            return self.width, self.height
        return self.height, self.width


def _av():
    import av

    return av


def _open(path: Path):
    av = _av()
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise DecodeError(path, f"cannot open ({type(exc).__name__}: {exc})") from exc
    if not container.streams.video:
        container.close()
        raise DecodeError(path, "has no video stream")
    return container


def _rotation_of(frame) -> int:
    # PyAV reports the display matrix angle (counter-clockwise, FFmpeg's convention) as -90
    # for a file tagged rotate=90; normalise to 0/90/180/270 counter-clockwise.
    angle = getattr(frame, "rotation", 0) or 0
    return int(round(angle / 90.0)) % 4 * 90


def probe(path: str | Path) -> VideoInfo:
    """Read a file's stream facts and frame timestamps by demuxing (no decoding).

    Raises:
        DecodeError: the file cannot be opened, has no video stream or no frame.
    """
    path = Path(path)
    av = _av()
    container = _open(path)
    try:
        stream = container.streams.video[0]
        ctx = stream.codec_context
        pts: list[int | None] = []
        try:
            for packet in container.demux(stream):
                if packet.size:
                    pts.append(packet.pts)
        except (av.error.FFmpegError, OSError) as exc:
            if not pts:
                raise DecodeError(path, f"cannot read packets ({type(exc).__name__}: {exc})"
                                  ) from exc
        if not pts:
            raise DecodeError(path, "has no video frames")
        rotation = 0
        # The display matrix is only exposed on decoded frames; one frame is cheap.
        container.seek(0, stream=stream)
        try:
            for frame in container.decode(stream):
                rotation = _rotation_of(frame)
                break
        except (av.error.FFmpegError, OSError) as exc:
            raise DecodeError(path, f"cannot decode its first frame ({type(exc).__name__}: "
                              f"{exc})") from exc
        order = None if any(p is None for p in pts) else tuple(sorted(pts))  # type: ignore
        return VideoInfo(len(pts), ctx.width, ctx.height, ctx.name or "unknown", rotation,
                         order)
    finally:
        container.close()


def square_geometry(height: int, width: int, frame_size: int) -> tuple[int, int]:
    """(height, width) to resize a stored frame to so that its short side is ``frame_size``;
    the long side keeps the aspect ratio (rounded) and is centre-cropped afterwards."""
    short = min(height, width)
    return (max(frame_size, round(height * frame_size / short)),
            max(frame_size, round(width * frame_size / short)))


def _to_display(rgb: np.ndarray, rotation: int, frame_size: int | None) -> np.ndarray:
    if rotation:
        # np.rot90 turns counter-clockwise, the display matrix's direction.
        rgb = np.rot90(rgb, rotation // 90)
    if frame_size is not None:
        h, w = rgb.shape[:2]
        y, x = (h - frame_size) // 2, (w - frame_size) // 2
        rgb = rgb[y:y + frame_size, x:x + frame_size]
    return np.ascontiguousarray(rgb)


def reformatter():
    """One PyAV frame converter for a video's frames. ``frame.reformat`` builds a converter
    (an FFmpeg SwsContext, its filters included) for every frame it is called on: ~0.9 ms of
    the ~2 ms that converting a 640x360 frame to 356x200 RGB took on the development CPU,
    spent again each frame. Shared, it is built once and gives the same bits."""
    from av.video.reformatter import VideoReformatter

    return VideoReformatter()


def _convert(frame, rotation: int, frame_size: int | None, converter=None) -> np.ndarray:
    """A decoded frame as upright uint8 RGB, centre-cropped and resized when ``frame_size``
    is given; ``converter``: a :func:`reformatter` shared by the video's frames."""
    h = w = None
    if frame_size is not None:
        h, w = square_geometry(frame.height, frame.width, frame_size)
    if converter is None:
        rgb = frame.reformat(width=w, height=h, format="rgb24", interpolation="BILINEAR")
    else:
        rgb = converter.reformat(frame, width=w, height=h, format="rgb24",
                                 interpolation="BILINEAR")
    return _to_display(rgb.to_ndarray(), rotation, frame_size)


def decode_frames(path: str | Path, indices: Sequence[int] | None = None, *,
                  frame_size: int | None = None, info: VideoInfo | None = None,
                  threads: int = 0, seek: bool = True, by_pts: bool = True) -> np.ndarray:
    """Frames of a video as uint8 RGB, in display orientation.

    Args:
        path: the file.
        indices: frame indices (presentation order; any order, repeats allowed), or None for
            every frame.
        frame_size: centre-crop to a square and resize to ``frame_size`` x ``frame_size``; None
            keeps the displayed size.
        info: the file's :func:`probe` result (probed here if None); its timestamps let the
            decoder seek close to the first needed frame of a long video.
        threads: FFmpeg decoder threads (0 = FFmpeg's choice).
        seek: allow seeking close to the first needed frame.
        by_pts: identify frames by timestamp (their rank among the probe's timestamps). A
            frame whose timestamp the probe did not see makes the call start again from the
            beginning, counting frames in decoder output order instead.

    Returns:
        ``(len(indices), H, W, 3)`` uint8 (every frame when ``indices`` is None).

    Raises:
        DecodeError: the file is unreadable, or has fewer frames than an index asks for.
    """
    path = Path(path)
    av = _av()
    if info is None:
        info = probe(path)
    wanted = None if indices is None else sorted(set(int(i) for i in indices))
    if wanted is not None and wanted and wanted[0] < 0:
        raise ValueError(f"indices must be >= 0, got {wanted[0]}")
    pts_index = None if info.pts is None or not by_pts else {
        p: i for i, p in enumerate(info.pts)}
    container = _open(path)
    frames: dict[int, np.ndarray] = {}
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = threads
        counter = 0
        seeked = bool(seek and wanted and pts_index is not None
                      and wanted[0] >= _SEEK_MIN_FRAMES)
        if seeked:
            container.seek(info.pts[wanted[0]], stream=stream, backward=True,  # type: ignore
                           any_frame=False)
        unplaced = False
        lookup = frozenset(wanted or ())
        decoded: list[tuple[int, int, object]] = []  # (pts, arrival, frame) for full decodes
        converter = reformatter()
        try:
            for frame in container.decode(stream):
                if wanted is None:
                    key = frame.pts if frame.pts is not None else counter
                    decoded.append((key, counter, _convert(frame, info.rotation, frame_size,
                                                            converter)))
                    counter += 1
                    continue
                if pts_index is not None:
                    if frame.pts not in pts_index:
                        unplaced = True
                        break
                    index = pts_index[frame.pts]
                else:
                    index = counter
                counter += 1
                if index in frames or index not in lookup:
                    continue
                frames[index] = _convert(frame, info.rotation, frame_size, converter)
                if len(frames) == len(wanted):
                    break
        except (av.error.FFmpegError, OSError) as exc:
            got = len(decoded) if wanted is None else len(frames)
            raise DecodeError(path, f"decoding failed after {got} frame(s) "
                              f"({type(exc).__name__}: {exc})") from exc
    finally:
        container.close()
    if wanted is None:
        if not decoded:
            raise DecodeError(path, "decoded no frames")
        decoded.sort(key=lambda item: (item[0], item[1]))
        return np.stack([f for _, _, f in decoded])  # type: ignore[misc]
    missing = [i for i in wanted if i not in frames]
    if missing and (seeked or unplaced):
        return decode_frames(path, indices, frame_size=frame_size, info=info, threads=threads,
                             seek=False, by_pts=not unplaced and by_pts)
    if missing:
        raise DecodeError(path, f"has no frame {missing[0]} (decoded {counter} frames, probe "
                          f"said {info.num_frames})")
    return np.stack([frames[int(i)] for i in indices])  # type: ignore[union-attr]

