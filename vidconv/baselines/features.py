"""Local per-frame descriptors for the feature-histogram baseline.

The paper's non-CNN baseline (Karpathy et al. 2014, Sec. 4.1) extracts many hand-made local
features per frame (HOG, texture, colour histograms, motion from frame differences, ...),
quantises each into a k-means vocabulary and classifies the pooled histograms. We keep three
families that between them cover what the synthetic benchmark varies:

- ``hog``: gradient-orientation histograms on a grid of patches (shape, texture);
- ``colour``: joint RGB histograms on the same grid (colour);
- ``motion``: a histogram of *normal flow* per patch, computed from frame differences only:
  at every pixel the temporal difference ``It`` and the spatial gradient ``g`` give the flow
  component along the gradient, ``-It * g / |g|^2``. Binned by direction and speed, this sees the
  direction and speed of motion that plain ``|It|`` would not (motion-only classes differ in
  exactly that), and costs no optical-flow solver.

Every frame is area-resized to ``frame_size`` (64 by default) first: the descriptors are coarse
by design, and the baseline should stay a cheap CPU job. Patches are ``2 x 2`` cells of
``cell`` pixels with a stride of one cell, so a 64-pixel frame gives a ``7 x 7`` patch grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from vidconv.ops._validate import expect_dtype, expect_ndim, expect_size, expect_tensor

FEATURE_TYPES = ("hog", "colour", "motion")


@dataclass(frozen=True)
class FeatureConfig:
    """How local descriptors are computed.

    frame_size: frames are area-resized to this square side before anything else.
    cell: cell side in pixels (at ``frame_size``); a patch is 2 x 2 cells, stride one cell.
    orientations: unsigned gradient-orientation bins of ``hog``.
    colour_levels: levels per RGB channel of ``colour`` (levels**3 bins).
    directions: direction bins of ``motion``; speeds are split into static / slow / fast at
        ``speed_thresholds`` (pixels per frame at ``frame_size``).
    frame_step: use every frame_step-th frame of a clip (motion is always between consecutive
        used frames, so a larger step also means larger apparent speeds).
    """

    frame_size: int = 64
    cell: int = 8
    orientations: int = 8
    colour_levels: int = 4
    directions: int = 8
    speed_thresholds: tuple[float, float] = (0.15, 1.0)
    frame_step: int = 1

    def __post_init__(self) -> None:
        if self.frame_size < 2 * self.cell:
            raise ValueError(
                f"frame_size must be at least 2 * cell = {2 * self.cell}, got {self.frame_size}"
            )
        for name in ("cell", "orientations", "colour_levels", "directions", "frame_step"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def grid(self) -> int:
        """Patches per side of a frame."""
        return self.frame_size // self.cell - 1

    def dims(self) -> dict[str, int]:
        """Descriptor length of every feature type."""
        return {
            "hog": 4 * self.orientations,
            "colour": self.colour_levels**3,
            "motion": 4 * (2 * self.directions + 1),
        }


def as_clips(clips: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Validate and return uint8 clips as a (N, T, H, W, 3) tensor (a single (T, H, W, 3) clip
    gets a batch dimension)."""
    if isinstance(clips, np.ndarray):
        clips = torch.from_numpy(clips)
    clips = expect_tensor("clips", clips)
    expect_dtype("clips", clips, (torch.uint8,))
    expect_ndim("clips", clips, (4, 5), "(N, T, H, W, 3) or (T, H, W, 3)")
    if clips.dim() == 4:
        clips = clips.unsqueeze(0)
    expect_size("clips", clips, 4, 3, "RGB channels")
    return clips


def _resize(frames: torch.Tensor, size: int) -> torch.Tensor:
    """(F, H, W, 3) uint8 -> (F, 3, size, size) float in [0, 1], area resampling."""
    x = frames.permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-2:] != (size, size):
        x = F.adaptive_avg_pool2d(x, size)
    return x


def _gradients(gray: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Central differences of (F, 1, S, S) images, replicate-padded."""
    p = F.pad(gray, (1, 1, 1, 1), mode="replicate")
    gx = (p[..., 1:-1, 2:] - p[..., 1:-1, :-2]) * 0.5
    gy = (p[..., 2:, 1:-1] - p[..., :-2, 1:-1]) * 0.5
    return gx, gy


def _soft_bins(angle: torch.Tensor, weight: torch.Tensor, bins: int, period: float) -> torch.Tensor:
    """Per-pixel histogram maps (F, bins, S, S): `weight` split linearly between the two nearest
    of `bins` circular bins of `angle` (so a small rotation moves mass smoothly)."""
    pos = angle.remainder(period) * (bins / period)
    lo = pos.floor()
    frac = pos - lo
    lo = lo.long() % bins
    hi = (lo + 1) % bins
    out = torch.zeros(angle.shape[0], bins, *angle.shape[2:], dtype=weight.dtype)
    out.scatter_add_(1, lo, weight * (1 - frac))
    out.scatter_add_(1, hi, weight * frac)
    return out


def _patches(maps: torch.Tensor, cell: int) -> torch.Tensor:
    """Per-pixel maps (F, B, S, S) -> patch descriptors (F, G*G, 4*B): cells summed, then each
    patch is the 2 x 2 block of cell histograms at a stride of one cell."""
    cells = F.avg_pool2d(maps, cell) * (cell * cell)
    blocks = F.unfold(cells, kernel_size=2)  # (F, B*4, G*G), channel-major within a block
    return blocks.transpose(1, 2)


def _hog(gray: torch.Tensor, cfg: FeatureConfig) -> torch.Tensor:
    gx, gy = _gradients(gray)
    mag = torch.sqrt(gx * gx + gy * gy)
    maps = _soft_bins(torch.atan2(gy, gx), mag, cfg.orientations, math.pi)
    d = _patches(maps, cfg.cell)
    # HOG's block normalisation: L2, clip at 0.2, L2 again (contrast invariance).
    d = F.normalize(d, dim=-1, eps=1e-3).clamp_(max=0.2)
    return F.normalize(d, dim=-1, eps=1e-3)


def _colour(rgb: torch.Tensor, cfg: FeatureConfig) -> torch.Tensor:
    q, c = cfg.colour_levels, cfg.cell
    f, _, size, _ = rgb.shape
    idx = (rgb * q).long().clamp_(max=q - 1)
    code = (idx[:, 0] * q + idx[:, 1]) * q + idx[:, 2]  # (F, S, S)
    # Count colours per cell with one bincount (far cheaper than a one-hot map), then sum each
    # patch's 2 x 2 cells: colour needs no layout inside a patch.
    n = size // c
    code = code[:, : n * c, : n * c]
    cell_id = (torch.arange(n * c) // c)
    cell = (cell_id[:, None] * n + cell_id[None, :]).expand(f, -1, -1)
    frame = torch.arange(f)[:, None, None]
    flat = ((frame * n * n + cell) * q**3 + code).flatten()
    cells = torch.bincount(flat, minlength=f * n * n * q**3).view(f, n, n, q**3).float()
    patch = cells[:, :-1, :-1] + cells[:, 1:, :-1] + cells[:, :-1, 1:] + cells[:, 1:, 1:]
    patch = patch.flatten(1, 2)
    return (patch / patch.sum(-1, keepdim=True)).sqrt()


def _motion(gray: torch.Tensor, cfg: FeatureConfig) -> torch.Tensor:
    """Normal-flow histograms between consecutive frames: gray is (N, T, 1, S, S)."""
    a, b = gray[:, :-1].flatten(0, 1), gray[:, 1:].flatten(0, 1)
    it = b - a
    gx, gy = _gradients((a + b) * 0.5)
    g2 = gx * gx + gy * gy
    gmag = torch.sqrt(g2)
    # Normal flow: the flow component along the gradient, -It g / |g|^2; its speed |It| / |g|.
    speed = it.abs() / (gmag + 0.02)
    angle = torch.atan2(-it * gy, -it * gx)
    # Weighting by |g| counts only pixels where the frame difference says something about the
    # direction (flat regions carry none); the static bin keeps still textured areas visible.
    slow_t, fast_t = cfg.speed_thresholds
    static = (speed < slow_t).to(gmag.dtype)
    fast = (speed >= fast_t).to(gmag.dtype)
    slow = 1.0 - static - fast
    dirs = _soft_bins(angle, gmag, cfg.directions, 2 * math.pi)
    maps = torch.cat([dirs * slow, dirs * fast, gmag * static], dim=1)
    d = _patches(maps, cfg.cell)
    d = d / (d.sum(-1, keepdim=True) + 1e-3)
    return d.sqrt()


def patch_regions(cfg: FeatureConfig, level: int) -> torch.Tensor:
    """Index of the level x level spatial-pyramid cell every patch of a frame falls into
    (G*G,), by the patch centre."""
    g = cfg.grid
    centre = (torch.arange(g, dtype=torch.float64) + 1.0) / (g + 1)
    band = (centre * level).long().clamp_(max=level - 1)
    return (band[:, None] * level + band[None, :]).flatten()


def clip_descriptors(clips: torch.Tensor | np.ndarray, cfg: FeatureConfig | None = None,
                     features: tuple[str, ...] = FEATURE_TYPES) -> dict[str, torch.Tensor]:
    """Local descriptors of every clip.

    Args:
        clips: uint8 (N, T, H, W, 3) or (T, H, W, 3) RGB frames (e.g. decoded video, or the
            uint8 frames of a ClipLoader batch; see `vidconv.baselines.data`).
        cfg: descriptor settings.
        features: which of ``FEATURE_TYPES`` to compute; ``motion`` needs T >= 2 used frames.

    Returns:
        name -> float32 tensor (N, F * G*G, D): F frames (T-1 frame pairs for motion), G*G
        patches per frame in row-major order, D = ``cfg.dims()[name]``.
    """
    cfg = cfg or FeatureConfig()
    unknown = [f for f in features if f not in FEATURE_TYPES]
    if unknown or not features:
        raise ValueError(f"features must be a non-empty subset of {FEATURE_TYPES}, got {features}")
    clips = as_clips(clips)[:, :: cfg.frame_step]
    n, t = clips.shape[:2]
    if "motion" in features and t < 2:
        raise ValueError(
            f"clips must have at least 2 frames (after frame_step={cfg.frame_step}) for motion "
            f"features, got {t}"
        )
    out: dict[str, list[torch.Tensor]] = {f: [] for f in features}
    g2 = cfg.grid**2
    with torch.no_grad():
        # Chunks of clips: big enough to keep the cores busy, small enough for the cache.
        for chunk in clips.split(max(1, 256 // t)):
            m = chunk.shape[0]
            rgb = _resize(chunk.flatten(0, 1), cfg.frame_size)
            gray = (0.299 * rgb[:, 0:1] + 0.587 * rgb[:, 1:2] + 0.114 * rgb[:, 2:3])
            if "hog" in features:
                out["hog"].append(_hog(gray, cfg).reshape(m, t * g2, -1))
            if "colour" in features:
                out["colour"].append(_colour(rgb, cfg).reshape(m, t * g2, -1))
            if "motion" in features:
                out["motion"].append(_motion(gray.unflatten(0, (m, t)), cfg)
                                     .reshape(m, (t - 1) * g2, -1))
    return {name: torch.cat(v) for name, v in out.items()}
