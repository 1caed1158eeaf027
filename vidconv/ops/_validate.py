"""Input checks shared by the ops: errors name the argument, the expected and the actual value."""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Iterable, Sequence

import numpy as np
import torch

# The CUDA kernels take sizes, strides and padding as 32-bit ints (csrc/cuda/*_kernel.h), so
# larger values are refused here rather than wrapped around there.
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
# 1/std is applied in float32: a std below this makes it infinite.
_FLOAT32_MAX = float(np.finfo(np.float32).max)


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
    """Each of `others` is None or a tensor on `reference`'s device."""
    for name, t in others.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {_describe(t)}")
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


def _describe(value: object) -> str:
    return f"{value!r} ({type(value).__name__})"


def _is_bool(value: object) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dtype == torch.bool
    return isinstance(value, bool | np.bool_)


def expect_int(name: str, value: object, *, minimum: int | None = None,
               maximum: int | None = None) -> int:
    """`value` as a Python int.

    Any integral type is taken: int, numpy integers, 0-d integer tensors (whatever has
    ``__index__``). Bools are refused although Python counts them as ints: a flag passed where a
    size or count belongs is a mistake, not the number 1.
    """
    if _is_bool(value):
        raise TypeError(f"{name} must be an int, got {_describe(value)}")
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be an int, got {_describe(value)}") from None
    _expect_in_range(name, number, minimum, maximum)
    return number


def _expect_in_range(name: str, number: int, minimum: int | None, maximum: int | None) -> None:
    if minimum is not None and number < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {number}")
    if maximum is not None and number > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {number}")


def expect_bool(name: str, value: object) -> bool:
    """`value` as a Python bool: True/False or a numpy bool; no truthy strings or numbers."""
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be True or False, got {_describe(value)}")
    return bool(value)


def expect_real(name: str, value: object) -> float:
    """`value` as a Python float: any real number (int, float, numpy scalars), not a bool."""
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {_describe(value)}")
    return float(value)


def expand_triple(name: str, value: object, *, maximum: int = INT32_MAX) -> list[int]:
    """An int or a sequence of three (or one) ints as three Python ints (t, h, w).

    Integral types are taken as by :func:`expect_int`; one-element sequences are repeated, as
    ``torch.nn.functional.conv3d`` does. Lower bounds are the caller's (they differ between
    stride and padding); values above `maximum` are refused.
    """
    expected = f"{name} must be an int or three ints (t, h, w)"
    if isinstance(value, str | bytes) or _is_bool(value):
        raise TypeError(f"{expected}, got {_describe(value)}")
    if isinstance(value, torch.Tensor | np.ndarray) and value.ndim == 0:
        items: list[object] = [value]
    elif isinstance(value, Iterable):
        items = list(value)
    elif hasattr(value, "__index__"):
        items = [value]
    else:
        raise TypeError(f"{expected}, got {_describe(value)}")
    if len(items) not in (1, 3):
        raise ValueError(f"{expected}, got {value!r}")
    numbers_: list[int] = []
    for i, item in enumerate(items):
        try:
            if _is_bool(item):
                raise TypeError
            numbers_.append(operator.index(item))  # type: ignore[arg-type]
        except TypeError:
            what = (_describe(value) if item is value
                    else f"{value!r}: item {i} is {_describe(item)}")
            raise TypeError(f"{expected}, got {what}") from None
    if len(numbers_) == 1:
        numbers_ *= 3
    for number in numbers_:
        if number > maximum:
            raise ValueError(f"{name} must be at most {maximum} along each axis, got {numbers_}")
    return numbers_


def per_channel(name: str, value: object, channels: int, *, nonzero: bool = False) -> list[float]:
    """One real number or `channels` of them (a sequence, array or 1-D tensor) as a float list.

    Every value must be finite and representable in float32, which the kernels compute in;
    with `nonzero` its reciprocal must be too (the kernels multiply by ``1 / value``).
    """
    expected = f"{name} must be one float or {channels} floats"
    if isinstance(value, torch.Tensor | np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, numbers.Real) and not _is_bool(value):
        items = [float(value)] * channels
    elif isinstance(value, str | bytes) or _is_bool(value) or not isinstance(value, Iterable):
        raise TypeError(f"{expected}, got {_describe(value)}")
    else:
        raw = value.tolist() if isinstance(value, torch.Tensor | np.ndarray) else list(value)
        if len(raw) != channels:
            raise ValueError(f"{expected}, got {len(raw)}: {value!r}")
        items = []
        for i, item in enumerate(raw):
            if _is_bool(item) or not isinstance(item, numbers.Real):
                raise TypeError(f"{expected}, got {value!r}: item {i} is {_describe(item)}")
            items.append(float(item))
    for v in items:
        if not math.isfinite(v) or abs(v) > _FLOAT32_MAX:
            raise ValueError(f"{name} must be finite (within float32's range), got {items}")
        if nonzero and (v == 0.0 or 1.0 / abs(v) > _FLOAT32_MAX):
            raise ValueError(f"{name} must be non-zero with 1/{name} within float32's range, "
                             f"got {items}")
    return items
