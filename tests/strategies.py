"""Hypothesis strategies shared by the test modules."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pychop_jax import QuantSpec

#: a few shapes only: every new (shape, spec) pair costs an XLA compilation
SHAPES = [(33,), (4, 8), (2, 3, 5)]


@st.composite
def specs(draw, ndim: int, allow_groups: bool = False, shape=None):
    """Any valid QuantSpec for an array of rank ``ndim``."""
    bits = draw(st.integers(2, 16))
    symmetric = draw(st.booleans())
    narrow = symmetric and draw(st.booleans())
    axis = draw(st.sampled_from([None, *range(-ndim, ndim)]))
    group = None
    if allow_groups and axis is not None and shape is not None:
        n = shape[axis]
        group = draw(st.sampled_from([None] + [g for g in (1, 2, 3, 4, 8) if n % g == 0]))
    return QuantSpec(bits=bits, symmetric=symmetric, narrow_range=narrow, axis=axis,
                     group_size=group)


@st.composite
def float_arrays(draw, shape, dtype=np.float32, subnormal=False, exp_range=(-20, 20),
                 extremes=False):
    """Finite arrays whose magnitudes span many binades (one random binade offset).

    ``extremes=True`` widens the offset to the whole exponent range of ``dtype``
    and mixes in +-max, +-tiny and subnormals.
    """
    fi = np.finfo(dtype)
    if extremes:
        exp_range = (fi.minexp - 24, fi.maxexp - 1)
    mantissas = draw(hnp.arrays(
        dtype, shape,
        elements=st.floats(-1.0, 1.0, width=np.dtype(dtype).itemsize * 8,
                           allow_subnormal=False),
    ))
    exponent = draw(st.integers(*exp_range))
    with np.errstate(over="ignore", under="ignore"):
        x = (mantissas.astype(np.float64) * 2.0**exponent).astype(dtype)
    if extremes:
        specials = np.array([fi.max, -fi.max, fi.tiny, -fi.tiny, fi.smallest_subnormal, 0.0],
                            dtype)
        picks = draw(hnp.arrays(np.int8, shape, elements=st.integers(-8, len(specials) - 1)))
        x = np.where(picks >= 0, specials[np.maximum(picks, 0)], x).astype(dtype)
    if not subnormal:
        x = np.where(np.abs(x) < fi.tiny, 0, x).astype(dtype)
    return x


@st.composite
def array_and_spec(draw, dtype=np.float32, allow_groups=False, subnormal=False, extremes=False):
    shape = draw(st.sampled_from(SHAPES))
    x = draw(float_arrays(shape, dtype, subnormal=subnormal, extremes=extremes))
    spec = draw(specs(len(shape), allow_groups=allow_groups, shape=shape))
    return x, spec
