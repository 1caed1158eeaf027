"""uint8 clips for the baseline from vidconv's own loader.

The baseline reads videos through `vidconv.data.ClipLoader` like the CNNs do (same sources, same
clip sampling, same 20-clips-per-video evaluation), and undoes the loader's normalisation to get
the uint8 frames back: ``x * std + mean`` rounds to the decoded pixel values exactly, because the
loader normalises in float32 from uint8 (an error below 1e-4 of a grey level).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vidconv.clip import ClipSpec
from vidconv.ops.preprocess import DEFAULT_MEAN, DEFAULT_STD


def baseline_spec(frames: int = 10, step: int = 1, size: int = 112,
                  frame_size: int = 128) -> ClipSpec:
    """The clip the baseline reads: `frames` frames `step` apart. Smaller than the CNNs' 170 by
    default because the descriptors work on 64-pixel frames anyway."""
    if frames < 1 or step < 1:
        raise ValueError(f"frames and step must be >= 1, got frames={frames}, step={step}")
    if size > frame_size:
        raise ValueError(f"size must be <= frame_size ({frame_size}), got {size}")
    return ClipSpec(frame_offsets=tuple(range(0, frames * step, step)), size=size,
                    frame_size=frame_size)


def to_uint8(inputs: torch.Tensor, mean: Sequence[float] = DEFAULT_MEAN,
             std: Sequence[float] = DEFAULT_STD) -> torch.Tensor:
    """Normalised model input (N, 3, T, S, S) -> uint8 clips (N, T, S, S, 3)."""
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 5 or inputs.shape[1] != 3:
        shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        raise ValueError(f"inputs must be a (N, 3, T, S, S) tensor, got {shape}")
    m = torch.tensor(mean, dtype=torch.float32, device=inputs.device).view(1, 3, 1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=inputs.device).view(1, 3, 1, 1, 1)
    x = (inputs.float() * s + m).round_().clamp_(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 4, 1).contiguous().cpu()


@dataclass
class ClipSet:
    """Clips of a source with their labels and the video each came from."""

    clips: torch.Tensor  # (N, T, H, W, 3) uint8
    labels: torch.Tensor  # (N,) int64
    video_index: torch.Tensor  # (N,) int64, index into source.videos
    classes: list[str]
    loader_report: dict[str, Any] | None = None  # the loader's skipped videos, JSON-friendly


def load_clips(source: Any, spec: ClipSpec, *, train: bool, clips_per_video: int,
               batch_size: int = 32, seed: int = 0, progress: bool = False,
               desc: str = "clips") -> ClipSet:
    """`clips_per_video` clips of every video of `source` as uint8 frames: train, random
    positions, crops and flips; eval, evenly spaced centre clips.

    A train `ClipLoader` gives one random clip per video per epoch (its ``clips_per_video`` is
    for evaluation only), so the k training clips of a video come from epochs 0..k-1, each
    drawn from ``(seed, epoch)``: distinct and reproducible.
    """
    from vidconv.data import ClipLoader

    if isinstance(clips_per_video, bool) or not isinstance(clips_per_video, int) \
            or clips_per_video < 1:
        raise ValueError(f"clips_per_video must be a positive int, got {clips_per_video!r}")
    loader = ClipLoader(source, spec, batch_size=batch_size, train=train,
                        clips_per_video=clips_per_video, views=1, seed=seed)
    epochs = clips_per_video if train else 1
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=epochs * len(loader), desc=desc, leave=False, dynamic_ncols=True)
    clips, labels, index = [], [], []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            clips.append(to_uint8(batch.inputs))
            labels.append(batch.labels.cpu())
            index.append(batch.video_index.cpu())
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    if not clips:
        raise ValueError(f"source gave no clips (loader report: {getattr(loader, 'report', None)})")
    from vidconv.train.data import loader_report

    return ClipSet(torch.cat(clips), torch.cat(labels), torch.cat(index), list(source.classes),
                   loader_report(loader))
