"""Input checks shared by the ops: errors name the argument, the expected and the actual value."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch


def _names(items: Iterable[object]) -> str:
    return " or ".join(str(i) for i in items)


def expect_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def expect_dtype(name: str, t: torch.Tensor, dtypes: Sequence[torch.dtype]) -> None:
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {_names(dtypes)}, got {t.dtype}")


def expect_ndim(name: str, t: torch.Tensor, ndims: Sequence[int], layout: str = "") -> None:
    if t.dim() not in ndims:
        what = f" {layout}" if layout else ""
        raise ValueError(
            f"{name} must have {_names(ndims)} dimensions{what}, got shape {tuple(t.shape)}"
        )


def expect_size(name: str, t: torch.Tensor, dim: int, size: int, what: str) -> None:
    if t.shape[dim] != size:
        raise ValueError(
            f"{name} must have {size} {what} (dim {dim}), got {t.shape[dim]} "
            f"in shape {tuple(t.shape)}"
        )


def expect_same_device(reference_name: str, reference: torch.Tensor,
                       **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.device != reference.device:
            raise ValueError(
                f"{name} is on {t.device} but {reference_name} is on {reference.device}; "
                "move them to the same device"
            )


def expect_contiguous(name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(
            f"{name} must be contiguous (got strides {t.stride()} for shape {tuple(t.shape)}); "
            f"call {name}.contiguous() first"
        )


def expand_triple(name: str, value: int | Sequence[int]) -> list[int]:
    """An int or a 3-sequence as a list of three ints (the (t, h, w) of conv arguments)."""
    if isinstance(value, int):
        return [value] * 3
    items = list(value)
    if len(items) != 3 or not all(isinstance(v, int) for v in items):
        raise ValueError(f"{name} must be an int or three ints (t, h, w), got {value!r}")
    return items
