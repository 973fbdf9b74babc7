"""Each formula against an independent float64 reference written here.

The reference uses true division and float64 arithmetic; the library uses float32
and multiplications by reciprocals (``pychop_jax.numerics``).  They agree to one or
two ulps on the scale and exactly on codes, except where the reference value lies
within rounding distance of a .5 tie.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from strategies import array_and_spec

import pychop_jax as pj

TINY32 = np.finfo(np.float32).tiny


def reference_qparams(x, spec):
    """scale, zero_point in float64 by the textbook formulas (state-shaped)."""
    x = np.asarray(x, np.float64)
    shape = spec.scale_shape(x.shape)
    axis = spec.resolve_axis(x.ndim)
    if spec.group_size is None:
        axes = tuple(d for d in range(x.ndim) if d != axis)
        view = x
    else:
        g = spec.group_size
        view = x.reshape(x.shape[:axis] + (x.shape[axis] // g, g) + x.shape[axis + 1:])
        axes = (axis + 1,)
    lo = np.minimum(view.min(axis=axes, keepdims=True), 0).reshape(shape)
    hi = np.maximum(view.max(axis=axes, keepdims=True), 0).reshape(shape)
    if spec.symmetric:
        scale = np.maximum(-lo, hi) / spec.qmax
    else:
        scale = (hi - lo) / (spec.qmax - spec.qmin)
    scale = np.where(scale == 0, 1.0, np.maximum(scale, TINY32))
    zp = np.zeros(shape)
    if not spec.symmetric:
        zp = np.clip(np.round(spec.qmin - lo / scale), spec.qmin, spec.qmax)
    return scale, zp, lo


def expand(a, spec, x_shape):
    """State-shaped -> broadcastable against x (repeat groups)."""
    if spec.group_size is None:
        return a
    axis = spec.resolve_axis(len(x_shape))
    return np.repeat(a, spec.group_size, axis=axis)


def near_tie(v, tol):
    return np.abs(np.abs(v - np.floor(v)) - 0.5) <= tol


def check_scale_matches_float64_formula(x, spec):
    state = pj.calibrate(x, spec)
    ref_scale, _, _ = reference_qparams(x, spec)
    scale = np.asarray(state.scale, np.float64)
    assert scale.dtype == np.float64 and state.scale.dtype == jnp.float32
    assert scale.shape == ref_scale.shape
    # two roundings (the reciprocal constant and the product) -> within 2 ulp
    np.testing.assert_array_less(np.abs(scale - ref_scale),
                                 2.0 * np.spacing(ref_scale.astype(np.float32)) + 1e-300)


def check_zero_point_matches_float64_formula(x, spec):
    state = pj.calibrate(x, spec)
    zp = np.asarray(state.zero_point)
    assert state.zero_point.dtype == jnp.int32
    scale = np.asarray(state.scale, np.float64)
    _, _, lo = reference_qparams(x, spec)
    if spec.symmetric:
        assert np.all(zp == 0)
        return
    v = spec.qmin - lo / scale  # reference with the library's own scale
    ref = np.clip(np.round(v), spec.qmin, spec.qmax)
    ok = (zp == ref) | near_tie(v, 1e-5)
    assert ok.all(), (zp, ref, v)


def check_codes_match_float64_formula(x, spec):
    state = pj.calibrate(x, spec)
    q = np.asarray(pj.quantize(x, state))
    scale = expand(np.asarray(state.scale, np.float64), spec, x.shape)
    zp = expand(np.asarray(state.zero_point, np.float64), spec, x.shape)
    t = x.astype(np.float64) / scale
    ref = np.clip(np.round(t) + zp, spec.qmin, spec.qmax)
    ok = (q == ref) | near_tie(t, 1e-6 * np.maximum(1, np.abs(t)))
    assert ok.all()
    assert q.dtype == spec.code_dtype


def check_dequantize_is_exact_product(x, spec):
    state = pj.calibrate(x, spec)
    q = np.asarray(pj.quantize(x, state))
    xhat = np.asarray(pj.dequantize(q, state))
    scale = expand(np.asarray(state.scale, np.float64), spec, x.shape)
    zp = expand(np.asarray(state.zero_point, np.float64), spec, x.shape)
    # (q - zp) * scale is exact in float64 (<= 17 x 24 bits), so one rounding to f32
    ref = ((q.astype(np.float64) - zp) * scale).astype(np.float32)
    np.testing.assert_array_equal(xhat, ref)
    assert xhat.dtype == np.float32


@settings(max_examples=100)
@given(array_and_spec(allow_groups=True))
def test_formulas_match_float64_references(case):
    """Scale, zero point, codes and dequantized values of one (shape, spec) per example
    against the float64 references (one test, so that the four checks share the
    example's compiled calibrate / quantize / dequantize)."""
    x, spec = case
    check_scale_matches_float64_formula(x, spec)
    check_zero_point_matches_float64_formula(x, spec)
    check_codes_match_float64_formula(x, spec)
    check_dequantize_is_exact_product(x, spec)


def test_hand_checked_example():
    # x = [-1, 0, 0.5, 3]: asymmetric 8 bit -> scale = 4/255, zp = round(255/4) = 64
    x = np.array([-1.0, 0.0, 0.5, 3.0], np.float32)
    state = pj.calibrate(x, pj.QuantSpec(bits=8))
    assert np.float32(state.scale[0]) == pytest.approx(4 / 255, rel=1e-7)
    assert int(state.zero_point[0]) == 64
    np.testing.assert_array_equal(pj.quantize(x, state), [0, 64, 96, 255])
    # symmetric 4 bit -> scale = 3/7
    state = pj.calibrate(x, pj.QuantSpec(bits=4, symmetric=True))
    assert np.float32(state.scale[0]) == pytest.approx(3 / 7, rel=1e-7)
    np.testing.assert_array_equal(pj.quantize(x, state), [-2, 0, 1, 7])


def test_all_zero_gives_unit_scale():
    for spec in (pj.QuantSpec(), pj.QuantSpec(symmetric=True), pj.QuantSpec(axis=0)):
        state = pj.calibrate(np.zeros((3, 2), np.float32), spec)
        np.testing.assert_array_equal(state.scale, 1.0)
        np.testing.assert_array_equal(pj.quantize(np.zeros((3, 2), np.float32), state),
                                      np.asarray(state.zero_point) * np.ones((3, 2)))


def test_tiny_range_clamps_scale_to_smallest_normal():
    x = np.array([0.0, 4 * TINY32], np.float32)
    state = pj.calibrate(x, pj.QuantSpec(bits=8, symmetric=True))
    assert np.float32(state.scale[0]) == TINY32


def test_float64_input_gives_float64_scale():
    with jax.enable_x64(True):
        x = np.array([-1.0, 2.0, 1e-300], np.float64)
        state = pj.calibrate(x, pj.QuantSpec(bits=16))
        assert state.scale.dtype == jnp.float64
        assert float(state.scale[0]) == pytest.approx(3.0 / 65535, rel=2**-52)
