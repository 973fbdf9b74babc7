"""QuantSpec: the integer grid, code dtypes, granularity shapes and its errors."""

import numpy as np
import pytest

from pychop_jax import QuantSpec


@pytest.mark.parametrize(
    "bits, symmetric, narrow, qmin, qmax, dtype",
    [
        (8, False, False, 0, 255, np.uint8),
        (8, True, False, -128, 127, np.int8),
        (8, True, True, -127, 127, np.int8),
        (4, False, False, 0, 15, np.uint8),
        (4, True, False, -8, 7, np.int8),
        (2, True, False, -2, 1, np.int8),
        (2, True, True, -1, 1, np.int8),
        (2, False, False, 0, 3, np.uint8),
        (9, True, False, -256, 255, np.int16),
        (9, False, False, 0, 511, np.uint16),
        (16, True, False, -32768, 32767, np.int16),
        (16, False, False, 0, 65535, np.uint16),
    ],
)
def test_grid_and_code_dtype(bits, symmetric, narrow, qmin, qmax, dtype):
    spec = QuantSpec(bits=bits, symmetric=symmetric, narrow_range=narrow)
    assert (spec.qmin, spec.qmax) == (qmin, qmax)
    assert spec.code_dtype == np.dtype(dtype)
    info = np.iinfo(spec.code_dtype)
    assert info.min <= spec.qmin and spec.qmax <= info.max


def test_frozen_and_hashable():
    a, b = QuantSpec(bits=4, axis=1), QuantSpec(bits=4, axis=1)
    assert a == b and hash(a) == hash(b)
    assert len({a, b, QuantSpec(bits=4, axis=0)}) == 2
    with pytest.raises(AttributeError):
        a.bits = 8


@pytest.mark.parametrize("bits", [0, 1, 17, 32, -8])
def test_bits_out_of_range(bits):
    with pytest.raises(ValueError, match=r"QuantSpec.bits must be in \[2, 16\]"):
        QuantSpec(bits=bits)


@pytest.mark.parametrize("bits", [8.0, "8", None, True])
def test_bits_not_an_integer(bits):
    with pytest.raises(ValueError, match="QuantSpec.bits must be an integer"):
        QuantSpec(bits=bits)


def test_numpy_integers_are_accepted():
    spec = QuantSpec(bits=np.int64(4), axis=np.int32(-1))
    assert spec.bits == 4 and type(spec.bits) is int and spec.axis == -1


def test_narrow_range_needs_symmetric():
    with pytest.raises(ValueError, match="narrow_range applies to symmetric"):
        QuantSpec(bits=8, symmetric=False, narrow_range=True)


def test_flags_must_be_bool():
    with pytest.raises(ValueError, match="QuantSpec.symmetric must be a bool"):
        QuantSpec(symmetric="yes")


def test_axis_must_be_int():
    with pytest.raises(ValueError, match="QuantSpec.axis must be an integer"):
        QuantSpec(axis=1.5)


def test_group_size_needs_axis_and_positive():
    with pytest.raises(ValueError, match="group_size needs the axis"):
        QuantSpec(group_size=4)
    with pytest.raises(ValueError, match="group_size must be >= 1"):
        QuantSpec(axis=0, group_size=0)


@pytest.mark.parametrize(
    "spec, shape, expected",
    [
        (QuantSpec(), (3, 4, 5), (1, 1, 1)),
        (QuantSpec(axis=0), (3, 4, 5), (3, 1, 1)),
        (QuantSpec(axis=-1), (3, 4, 5), (1, 1, 5)),
        (QuantSpec(axis=1, group_size=2), (3, 4, 5), (3, 2, 5)),
        (QuantSpec(axis=0, group_size=4), (8,), (2,)),
        (QuantSpec(), (), ()),
    ],
)
def test_scale_shape(spec, shape, expected):
    assert spec.scale_shape(shape) == expected


def test_axis_out_of_range():
    with pytest.raises(ValueError, match=r"axis=2 is out of range for an array with 2"):
        QuantSpec(axis=2).scale_shape((3, 4))
    with pytest.raises(ValueError, match=r"axis=-3 is out of range"):
        QuantSpec(axis=-3).scale_shape((3, 4))


def test_group_size_must_divide():
    with pytest.raises(ValueError, match="not a multiple of group_size=3"):
        QuantSpec(axis=1, group_size=3).scale_shape((2, 8))


def test_granularity_names():
    assert QuantSpec().granularity == "tensor"
    assert QuantSpec(axis=0).granularity == "channel"
    assert QuantSpec(axis=0, group_size=2).granularity == "group"
