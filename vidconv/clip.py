"""What a model takes as input, stated once so that models and loaders agree on it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ClipSpec:
    """The clip a model consumes.

    frame_offsets: frame indices relative to the clip's first frame: ``(0,)`` for single frame,
        ``(0, ..., 9)`` for early and slow fusion, ``(0, 15)`` for late fusion.
    size: side of each model input in pixels: 170 at full resolution, 89 per multires stream.
    multires: whether the model takes the (fovea, context) pair.
    stream: for multires models, "both", "fovea" or "context".
    frame_size: side the decoded frames are resized to before cropping: 178 for multires
        models (fovea = centre 89, context = whole frame / 2); for full-resolution models the
        paper trains on 200x200 frames with a random 170x170 crop.
    """

    frame_offsets: tuple[int, ...]
    size: int
    multires: bool = False
    stream: str = "both"
    frame_size: int = 200

    @property
    def frames(self) -> int:
        """Frames the model sees per clip."""
        return len(self.frame_offsets)

    @property
    def span(self) -> int:
        """Frames of video one clip covers (16 for late fusion's two frames 15 apart)."""
        return self.frame_offsets[-1] + 1
