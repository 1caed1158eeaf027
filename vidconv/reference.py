"""Plain-PyTorch versions of vidconv's ops: slow, obviously right, and the tests' oracle.

Each function takes the same arguments as the op in `vidconv.ops` after validation (a batched
clip tensor, explicit offsets and flips) and computes in float64 unless told otherwise, so the
fused kernels can be held to the rounding of their output dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["context", "crop_normalize", "fovea_context", "lrn_max_pool_reference",
           "st_conv3d_reference"]


def _as_offsets(offsets: torch.Tensor | Sequence[int] | None, n: int, h: int, w: int,
                size: int) -> list[tuple[int, int]]:
    if offsets is None:
        return [((h - size) // 2, (w - size) // 2)] * n
    off = torch.as_tensor(offsets, dtype=torch.int64).cpu()
    if off.dim() == 1:
        off = off.expand(n, 2)
    return [(int(y), int(x)) for y, x in off.tolist()]


def _as_flips(flip: torch.Tensor | bool | None, n: int) -> list[bool]:
    if flip is None or isinstance(flip, bool):
        return [bool(flip)] * n
    return [bool(f) for f in flip.cpu().tolist()]


def _normalize(x: torch.Tensor, mean: float | Sequence[float], std: float | Sequence[float],
               flips: list[bool]) -> torch.Tensor:
    """(x - mean) / std per channel of x (N, 3, T, S, S), then mirror the clips marked in flips."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
    x = (x - m) / s
    return torch.stack([c.flip(-1) if f else c for c, f in zip(x, flips, strict=True)])


def _to_nc(frames: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor:
    """uint8 (N, T, H, W, C) -> (N, C, T, H, W) in compute_dtype."""
    return frames.permute(0, 4, 1, 2, 3).to(compute_dtype)


def crop_normalize(
    clips: torch.Tensor,
    size: int = 170,
    *,
    offsets: torch.Tensor | Sequence[int] | None = None,
    flip: torch.Tensor | bool | None = None,
    mean: float | Sequence[float] = 117.0,
    std: float | Sequence[float] = 64.0,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Reference of :func:`vidconv.ops.crop_normalize`: slice, normalise, flip.

    Args:
        clips: uint8 ``(N, T, H, W, 3)`` (or ``(T, H, W, 3)``).
        size: crop side S.
        offsets: top-left ``(y, x)`` per clip (None: centre, ``(H - S) // 2``).
        flip: mirror left-right after cropping (the crop is taken in the unflipped frame).
        mean, std: per-channel normalisation.
        compute_dtype: dtype of the result (float64 for an oracle).

    Returns:
        ``(N, 3, T, S, S)`` (``(3, T, S, S)`` for an unbatched input), contiguous.
    """
    unbatched = clips.dim() == 4
    if unbatched:
        clips = clips.unsqueeze(0)
    n, _, h, w, _ = clips.shape
    offs = _as_offsets(offsets, n, h, w, size)
    crops = [clips[i, :, y:y + size, x:x + size] for i, (y, x) in enumerate(offs)]
    out = _to_nc(torch.stack(crops) if n else clips[:, :, :size, :size], compute_dtype)
    if n:
        out = _normalize(out, mean, std, _as_flips(flip, n))
    return (out[0] if unbatched else out).contiguous()


def context(clips: torch.Tensor, size: int, compute_dtype: torch.dtype = torch.float64
            ) -> torch.Tensor:
    """Whole frames area-resampled to size x size: ``adaptive_avg_pool2d``, (N, 3, T, S, S).

    Output pixel ``i`` averages input rows ``floor(i*H/S)`` .. ``ceil((i+1)*H/S) - 1`` (likewise
    columns); for H = W = 2S that is the exact mean of each 2x2 block.
    """
    n, t, h, w, c = clips.shape
    x = clips.permute(0, 1, 4, 2, 3).reshape(n * t, c, h, w).to(compute_dtype)
    pooled = F.adaptive_avg_pool2d(x, size) if n * t else x[..., :size, :size]
    return pooled.reshape(n, t, c, size, size).permute(0, 2, 1, 3, 4)


def fovea_context(
    clips: torch.Tensor,
    size: int = 89,
    *,
    offsets: torch.Tensor | Sequence[int] | None = None,
    flip: torch.Tensor | bool | None = None,
    mean: float | Sequence[float] = 117.0,
    std: float | Sequence[float] = 64.0,
    compute_dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of :func:`vidconv.ops.fovea_context`.

    The fovea is :func:`crop_normalize` of the same arguments; the context is the whole frame
    through :func:`context`, normalised and mirrored like the fovea (area bins are symmetric, so
    the context of a mirrored frame is the mirrored context).

    Returns:
        ``(fovea, context)``, each ``(N, 3, T, S, S)`` (``(3, T, S, S)`` unbatched), contiguous.
    """
    unbatched = clips.dim() == 4
    if unbatched:
        clips = clips.unsqueeze(0)
    fovea = crop_normalize(clips, size, offsets=offsets, flip=flip, mean=mean, std=std,
                           compute_dtype=compute_dtype)
    ctx = context(clips, size, compute_dtype)
    if clips.shape[0]:
        ctx = _normalize(ctx, mean, std, _as_flips(flip, clips.shape[0]))
    ctx = ctx.contiguous()
    if unbatched:
        return fovea[0], ctx[0]
    return fovea, ctx


# ---- st_conv3d ----------------------------------------------------------------------------
# Computed in float64 on the CPU by default, so no TF32, cuDNN or reduced-precision path leaks in.

def _triple(value: int | Sequence[int]) -> tuple[int, int, int]:
    if isinstance(value, int):
        return (value, value, value)
    t, h, w = value
    return (int(t), int(h), int(w))


def st_conv3d_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    activation: str | None = "relu",
    *,
    out_dtype: torch.dtype | None = torch.float64,
    compute_device: str | torch.device = "cpu",
) -> torch.Tensor:
    """conv3d + bias + optional ReLU in float64.

    Args:
        x, weight, bias, stride, padding, activation: as `vidconv.ops.st_conv3d`.
        out_dtype: dtype of the result (default float64, left on `compute_device`); None
            returns x's dtype on x's device.
        compute_device: where the float64 convolution runs (the CPU by default; a GPU test may
            pass "cuda" to keep large shapes fast, float64 has no TF32 path there either).
    """
    if activation not in ("relu", None):
        raise ValueError(f"activation must be 'relu' or None, got {activation!r}")
    x64 = x.detach().to(compute_device, torch.float64)
    w64 = weight.detach().to(compute_device, torch.float64)
    b64 = None if bias is None else bias.detach().to(compute_device, torch.float64)
    out = F.conv3d(x64, w64, b64, stride=_triple(stride), padding=_triple(padding))
    if activation == "relu":
        out = out.clamp_min(0)
    if out_dtype is None:
        return out.to(x.device, x.dtype)
    return out.to(out_dtype)


# ---- lrn_max_pool ------------------------------------------------------------------------


def lrn_max_pool_reference(
    x: torch.Tensor,
    size: int = 5,
    alpha: float = 1e-4,
    beta: float = 0.5,
    k: float = 2.0,
    pool: Sequence[int] = (2, 2),
    ceil_mode: bool = True,
    *,
    out_dtype: torch.dtype | None = torch.float64,
) -> torch.Tensor:
    """``F.local_response_norm`` then ``F.max_pool3d`` over ``(1, kh, kw)`` windows with stride
    equal to the window, in float64 on the CPU.

    Args:
        x, size, alpha, beta, k, pool, ceil_mode: as `vidconv.ops.lrn_max_pool`.
        out_dtype: dtype of the result (default float64, on the CPU); None returns x's dtype on
            x's device.
    """
    window = (1, int(pool[0]), int(pool[1]))
    # local_response_norm views x as (N, 1, C, T, H*W): arbitrary strides cannot be viewed.
    x64 = x.detach().to("cpu", torch.float64).contiguous()
    out = F.max_pool3d(F.local_response_norm(x64, size, alpha, beta, k), window, window,
                       ceil_mode=ceil_mode)
    if out_dtype is None:
        return out.to(x.device, x.dtype)
    return out.to(out_dtype)
