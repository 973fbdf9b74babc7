"""Properties of the JAX API (hypothesis).

Every new (shape, spec) compiles the ops for it: properties of the same draw run in one
test (``test_grid_properties``) so that they share those compilations."""

import jax
import jax.numpy as jnp
import numpy as np
from array_api_compat import numpy as xnp
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import array_and_spec, float_arrays, specs

import pychop_jax as pj
from pychop_jax.core import numerics

EPS32 = np.finfo(np.float32).eps


def expand(a, spec, ndim):
    a = np.asarray(a)
    if spec.group_size is None:
        return a
    return np.repeat(a, spec.group_size, axis=spec.resolve_axis(ndim))


def check_codes_in_range_with_code_dtype(x, spec):
    q = np.asarray(pj.quantize(x, pj.calibrate(x, spec)))
    assert q.dtype == spec.code_dtype
    assert q.min() >= spec.qmin and q.max() <= spec.qmax


def check_round_trip_error_at_most_half_a_step(x, spec):
    state = pj.calibrate(x, spec)
    xhat = np.asarray(pj.dequantize(pj.quantize(x, state), state), np.float64)
    scale = expand(state.scale, spec, x.ndim).astype(np.float64)
    err = np.abs(xhat - x.astype(np.float64))
    # scale/2, plus the float32 rounding of x/scale and of the dequantized product
    bound = scale / 2 + 4 * EPS32 * np.abs(x)
    assert np.all(err <= bound), (err.max(), bound.min())


def check_zero_maps_exactly_to_zero(x, spec, where):
    x = x.copy()
    flat = x.reshape(-1)
    flat[where % flat.size] = 0.0
    state = pj.calibrate(x, spec)
    xhat = np.asarray(pj.fake_quant(x, state))
    assert np.all(xhat[x == 0] == 0.0)
    assert np.all(np.asarray(pj.dequantize(pj.quantize(x, state), state))[x == 0] == 0.0)


def check_quantize_dequantize_is_idempotent(x, spec):
    state = pj.calibrate(x, spec)
    q = pj.quantize(x, state)
    np.testing.assert_array_equal(pj.quantize(pj.dequantize(q, state), state), q)


def check_fake_quant_equals_dequantize_of_quantize(x, spec):
    state = pj.calibrate(x, spec)
    y = np.asarray(pj.fake_quant(x, state))
    expected = np.asarray(pj.dequantize(pj.quantize(x, state), state))
    np.testing.assert_array_equal(y.view(np.uint8), expected.view(np.uint8))  # +0.0, not -0.0


_jit_quantize = jax.jit(pj.quantize)


def check_stochastic_rounding_picks_a_neighbour_and_is_reproducible(x, spec):
    state = pj.calibrate(x, spec)
    key = jax.random.key(0)
    q = np.asarray(pj.quantize(x, state, key=key), np.int64)
    np.testing.assert_array_equal(q, _jit_quantize(x, state, key=key))
    nearest = np.asarray(pj.quantize(x, state), np.int64)
    assert np.all(np.abs(q - nearest) <= 1)
    assert q.min() >= spec.qmin and q.max() <= spec.qmax


@st.composite
def one_grid_three_inputs(draw):
    """One (shape, spec) and three arrays of that shape: with subnormals and extremes,
    with extremes only, and plain (the draws of the separate tests these checks were)."""
    x_sub, spec = draw(array_and_spec(allow_groups=True, subnormal=True, extremes=True))
    x_ext = draw(float_arrays(x_sub.shape, extremes=True))
    x_plain = draw(float_arrays(x_sub.shape))
    return spec, x_sub, x_ext, x_plain


@settings(max_examples=100)
@given(one_grid_three_inputs(), st.integers(0, 32), st.booleans())
def test_grid_properties(case, where, stochastic):
    """Five properties of one (shape, spec) per example, so that they share its
    compiled calibrate / quantize / dequantize / fake_quant (every new (shape, spec)
    compiles them; as five tests they compiled them five times): codes in range with the
    code dtype and idempotent quantize(dequantize(q)) (subnormals and extremes), the
    round trip within half a step (extremes), zero maps exactly to zero and fake_quant
    is dequantize(quantize) bit for bit (plain inputs); and in half of the examples
    (``stochastic``: its two extra compilations), stochastic rounding picks a neighbour
    of round-to-nearest, reproducibly from a key, eager and jitted (plain inputs)."""
    spec, x_sub, x_ext, x_plain = case
    check_codes_in_range_with_code_dtype(x_sub, spec)
    check_quantize_dequantize_is_idempotent(x_sub, spec)
    check_round_trip_error_at_most_half_a_step(x_ext, spec)
    check_zero_maps_exactly_to_zero(x_plain, spec, where)
    check_fake_quant_equals_dequantize_of_quantize(x_plain, spec)
    if stochastic:
        check_stochastic_rounding_picks_a_neighbour_and_is_reproducible(x_plain, spec)


@settings(max_examples=200)
@given(float_arrays((64,)), specs(1))
def test_monotonic_in_x(x, spec):
    x = np.sort(x)
    state = pj.calibrate(x, spec)
    # per-channel over a 1-d array is one value per channel: monotonic trivially;
    # use the per-tensor state so that the whole sorted vector shares one grid
    state = pj.calibrate(x, pj.QuantSpec(spec.bits, spec.symmetric, spec.narrow_range))
    q = np.asarray(pj.quantize(x, state)).astype(np.int64)
    assert np.all(np.diff(q) >= 0)


def _pipeline(x, spec):
    state = pj.calibrate(x, spec)
    return state.scale, state.zero_point, pj.quantize(x, state)


@settings(max_examples=30)
@given(array_and_spec(allow_groups=True, subnormal=True, extremes=True),
       st.integers(0, 3))
def test_jit_eager_numpy_bit_identical(case, which):
    """Eager, jitted (traced, constant-folded, closed-over state), op-by-op and NumPy
    agree bit for bit.  The op-by-op run (``jax.disable_jit``) compiles every primitive
    for the example's shape, half of this test's time: it runs in a quarter of the
    examples (``which == 0``).  30 examples: each compiles three pipelines, and the
    suite's largest cost; eager JAX against NumPy (the numerics with the NumPy namespace
    and the NumPy adapter's XLA kernel) is also property-tested, bit for bit, on the
    same draws at 100 examples in ``tests/interop/test_backends.py`` (per group at 75 in
    ``tests/interop/test_groups_backends.py``)."""
    x, spec = case
    eager = _pipeline(x, spec)
    eager_state = pj.QuantState(eager[0], eager[1], spec)

    @jax.jit
    def jitted(x_traced):
        # the pipeline traced; the eager state closed over as a constant; and the
        # whole pipeline on a constant input: XLA constant-folds the last two
        return (_pipeline(x_traced, spec), pj.quantize(x_traced, eager_state),
                _pipeline(jnp.asarray(x), spec))

    traced, folded, constant = jitted(x)
    runs = [eager, traced, constant]
    if which == 0:
        with jax.disable_jit():
            runs.append(_pipeline(jnp.asarray(x), spec))
    scale, zp = numerics.calibrate(xnp, x, spec)
    ref = (scale, zp, numerics.quantize(xnp, x, scale, zp, spec))
    for got in (*runs, (scale, zp, folded)):
        for a, b in zip(got, ref, strict=True):
            a = np.asarray(a)
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


@settings(max_examples=100)
@given(st.integers(1, 4).flatmap(lambda b: st.tuples(
    st.lists(float_arrays((4, 8)), min_size=b, max_size=b), specs(2))))
def test_vmap_equals_loop(case):
    xs, spec = case
    batch = np.stack(xs)
    mapped = jax.vmap(lambda x: _pipeline(x, spec))(batch)
    for i, x in enumerate(xs):
        for a, b in zip(mapped, _pipeline(x, spec), strict=True):
            np.testing.assert_array_equal(np.asarray(a[i]).view(np.uint8),
                                          np.asarray(b).view(np.uint8))
