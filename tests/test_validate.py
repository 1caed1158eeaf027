"""Argument checks shared by the ops (vidconv.ops._validate), through st_conv3d and directly:
integral types are taken as nn.Conv3d takes them, anything else is a TypeError or ValueError
naming the argument, the expected and the actual value."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vidconv.ops import st_conv3d
from vidconv.ops._validate import expand_triple, expect_bool, expect_int, per_channel


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 5, 9, 9, generator=g)
    w = torch.randn(4, 3, 3, 3, 3, generator=g)
    b = torch.randn(4, generator=g)
    return x, w, b


@pytest.mark.parametrize("stride,padding", [
    (np.int64(2), np.int32(1)),
    ((np.int64(1), 2, np.uint8(2)), np.array([1, 0, 1])),
    (torch.tensor(2), torch.tensor([1, 1, 0])),
    ((2,), [1]),
])
def test_st_conv3d_takes_integral_types(stride, padding):
    x, w, b = _inputs()
    got = st_conv3d(x, w, b, stride, padding, None)
    s, p = expand_triple("stride", stride), expand_triple("padding", padding)
    torch.testing.assert_close(got, F.conv3d(x, w, b, s, p))


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(bias=[0.0, 0.0, 0.0, 0.0]), TypeError,
     r"bias must be a torch.Tensor or None, got \[0.0, 0.0, 0.0, 0.0\] \(list\)"),
    (dict(bias=np.zeros(4, dtype=np.float32)), TypeError, r"bias must be a torch.Tensor.*ndarray"),
    (dict(stride=2**62), ValueError, r"stride must be at most 2147483647 along each axis, got "
                                     r"\[4611686018427387904"),
    (dict(stride=2**63), ValueError, "stride must be at most 2147483647"),
    (dict(padding=(0, 2**31, 0)), ValueError, "padding must be at most 2147483647"),
    (dict(stride=2.0), TypeError, r"stride must be an int or three ints \(t, h, w\), got 2.0 "
                                  r"\(float\)"),
    (dict(stride=(1, 2.0, 1)), TypeError, r"item 1 is 2.0 \(float\)"),
    (dict(padding=torch.tensor([1.0, 1.0, 1.0])), TypeError, "padding must be an int"),
    (dict(stride=True), TypeError, r"stride .* got True \(bool\)"),
    (dict(stride="2"), TypeError, r"got '2' \(str\)"),
    (dict(stride=None), TypeError, r"got None \(NoneType\)"),
    (dict(stride=(1, 2)), ValueError, r"stride must be an int or three ints .* got \(1, 2\)"),
])
def test_st_conv3d_bad_arguments(kwargs, error, match):
    x, w, b = _inputs()
    args = dict(bias=b) | kwargs
    with pytest.raises(error, match=match):
        st_conv3d(x, w, **args)


def test_expect_int_and_bool():
    assert expect_int("n", np.int64(3)) == 3 and type(expect_int("n", np.int64(3))) is int
    assert expect_int("n", torch.tensor(5)) == 5
    for bad in (True, np.bool_(False), torch.tensor(True), 3.0, "3", None, torch.tensor(2.0)):
        with pytest.raises(TypeError, match="n must be an int, got"):
            expect_int("n", bad)
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        expect_int("n", 0, minimum=1)
    with pytest.raises(ValueError, match="n must be <= 9, got 10"):
        expect_int("n", 10, maximum=9)
    assert expect_bool("flag", np.bool_(True)) is True
    for bad in ("no", 1, 0, None, "False"):
        with pytest.raises(TypeError, match="flag must be True or False, got"):
            expect_bool("flag", bad)


def test_per_channel():
    assert per_channel("mean", np.float32(2.5), 3) == [2.5] * 3
    assert per_channel("mean", torch.tensor([1.0, 2.0, 3.0]), 3) == [1.0, 2.0, 3.0]
    assert per_channel("mean", np.array(4.0), 3) == [4.0] * 3
    for bad in (None, "abc", True, (1.0, "2", 3.0), (1.0, True, 3.0)):
        with pytest.raises(TypeError, match="mean must be one float or 3 floats"):
            per_channel("mean", bad, 3)
    with pytest.raises(ValueError, match="got 2"):
        per_channel("mean", (1.0, 2.0), 3)
    for bad in (float("nan"), (1.0, float("inf"), 1.0), 1e39):
        with pytest.raises(ValueError, match="mean must be finite"):
            per_channel("mean", bad, 3)
    for bad in (0.0, (1.0, 0.0, 1.0), 1e-45):
        with pytest.raises(ValueError, match="std must be non-zero"):
            per_channel("std", bad, 3, nonzero=True)
