"""JAX entry points: errors (docs/numerics.md), jit semantics, dtypes, groups."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import pychop_jax as pj

SPEC = pj.QuantSpec(bits=8)
X = np.array([[0.1, -0.2, 0.3], [0.4, -0.5, 0.6]], np.float32)


# -- errors in eager calls ---------------------------------------------------------------
@pytest.mark.parametrize("fn", [pj.calibrate, lambda x, s: pj.quantize(x, pj.calibrate(X, s))])
@pytest.mark.parametrize(
    "bad, message",
    [
        (np.array([1.0, np.nan], np.float32), "got 1 NaN value"),
        (np.array([np.inf, -np.inf, 1.0], np.float32), "got 2 +-inf value"),
        (np.array([np.nan, np.inf], np.float32), "got 1 NaN and 1 +-inf value"),
    ],
)
def test_non_finite_input_raises(fn, bad, message):
    flat = X.copy().reshape(-1)
    flat[: bad.size] = bad
    bad = flat.reshape(X.shape)
    with pytest.raises(ValueError, match=re.escape(message)):
        fn(bad, SPEC)


def test_fake_quant_non_finite_raises_eagerly():
    state = pj.calibrate(X, SPEC)
    with pytest.raises(ValueError, match="fake_quant got 1 NaN value"):
        pj.fake_quant(np.where(X > 0.5, np.nan, X), state)


def test_empty_input_raises():
    with pytest.raises(ValueError, match="calibrate got an empty array"):
        pj.calibrate(np.zeros((0, 3), np.float32), SPEC)


@pytest.mark.parametrize("dtype", [np.int32, np.int8, np.uint8, bool])
def test_integer_input_to_calibrate_raises(dtype):
    with pytest.raises(TypeError, match="calibrate needs a floating-point array; got dtype"):
        pj.calibrate(np.ones((3,), dtype), SPEC)


def test_integer_input_to_quantize_raises():
    with pytest.raises(TypeError, match="quantize needs a floating-point array"):
        pj.quantize(np.ones(X.shape, np.int32), pj.calibrate(X, SPEC))


def test_float_codes_to_dequantize_raise():
    with pytest.raises(TypeError, match="dequantize needs integer codes"):
        pj.dequantize(X, pj.calibrate(X, SPEC))


def test_bad_axis_raises():
    with pytest.raises(ValueError, match="axis=2 is out of range for an array with 2"):
        pj.calibrate(X, pj.QuantSpec(axis=2))


def test_bad_axis_raises_under_jit_too():
    with pytest.raises(ValueError, match="axis=-3 is out of range"):
        jax.jit(lambda x: pj.calibrate(x, pj.QuantSpec(axis=-3)).scale)(X)


def test_bad_bits_raise():
    with pytest.raises(ValueError, match=r"bits must be in \[2, 16\]; got 1"):
        pj.QuantSpec(bits=1)


def test_state_of_another_shape_raises():
    state = pj.calibrate(X, pj.QuantSpec(axis=0))  # scale (2, 1)
    with pytest.raises(ValueError, match=r"needs \(3, 1\)"):
        pj.quantize(np.ones((3, 3), np.float32), state)
    with pytest.raises(ValueError, match="the state's scale has shape"):
        pj.dequantize(np.ones((3, 3), np.uint8), state)
    with pytest.raises(ValueError, match="the state's scale has shape"):
        pj.fake_quant(np.ones((2, 3, 1), np.float32), state)


def test_per_tensor_state_fits_any_rank():
    state = pj.calibrate(X, SPEC)
    v = np.array([0.1, 0.2], np.float32)
    q = pj.quantize(v, state)
    assert q.shape == (2,)
    np.testing.assert_array_equal(q, pj.quantize(v[None, :], state)[0])


def test_torch_tensor_is_rejected_with_a_pointer():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="expects a jax array but got a torch array"):
        pj.calibrate(torch.ones(3), SPEC)


def test_non_state_is_rejected():
    with pytest.raises(TypeError, match="needs a QuantState"):
        pj.quantize(X, (1.0, 0))


def test_unknown_grad_rule():
    with pytest.raises(ValueError, match="unknown grad='nope'"):
        pj.fake_quant(X, pj.calibrate(X, SPEC), grad="nope")


def test_spec_must_be_a_spec():
    with pytest.raises(TypeError, match="calibrate needs a QuantSpec"):
        pj.calibrate(X, 8)


# -- non-finite values under jit: documented, never raising ---------------------------------
def test_under_jit_nonfinite_is_ignored_saturated_or_zero_point():
    x = np.array([np.nan, np.inf, -np.inf, -1.0, 3.0, 0.0], np.float32)

    @jax.jit
    def run(x):
        state = pj.calibrate(x, SPEC)
        return state, pj.quantize(x, state), pj.fake_quant(x, state)

    state, q, y = run(x)
    clean = pj.calibrate(np.array([-1.0, 3.0, 0.0], np.float32), SPEC)
    np.testing.assert_array_equal(state.scale, clean.scale)
    zp = int(state.zero_point[0])
    np.testing.assert_array_equal(q, [zp, 255, 0, 0, 255, zp])
    y = np.asarray(y)
    assert y[0] == 0.0 and y[1] == y[4] and y[2] == y[3]
    np.testing.assert_array_equal(y, pj.dequantize(q, state))


def test_check_finite_raises_eagerly_and_under_checkify():
    with pytest.raises(ValueError, match="x got 1 NaN"):
        pj.check_finite(np.array([np.nan, 1.0], np.float32))
    np.testing.assert_array_equal(pj.check_finite(X), X)

    def f(x):
        return pj.quantize(pj.check_finite(x), pj.calibrate(x, SPEC))

    err, _ = checkify.checkify(jax.jit(f))(np.array([np.nan, 1.0], np.float32))
    with pytest.raises(checkify.JaxRuntimeError, match="contains NaN or"):
        err.throw()
    err, out = checkify.checkify(jax.jit(f))(X)
    err.throw()  # no error for finite input
    np.testing.assert_array_equal(out, pj.quantize(X, pj.calibrate(X, SPEC)))


# -- extremes: bit-identical to NumPy on the edges of float32 --------------------------------
F32 = np.finfo(np.float32)


@pytest.mark.parametrize("bits", [2, 3, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize(
    "x",
    [
        [F32.max, -F32.max, 0.0, 1.0],
        [F32.max, F32.max / 3, 0.0],
        [-F32.max, -1e38, -1.0],
        [F32.tiny, -F32.tiny, 3 * F32.smallest_subnormal, 0.0],
        [1e-45, -1e-44, 0.0],
    ],
)
def test_extremes_match_numpy_reference_backend(bits, symmetric, x):
    from array_api_compat import numpy as xnp

    from pychop_jax.core import numerics

    x = np.array(x, np.float32)
    spec = pj.QuantSpec(bits=bits, symmetric=symmetric)
    state = pj.calibrate(x, spec)
    scale, zp = numerics.calibrate(xnp, x, spec)
    assert np.isfinite(state.scale).all() and state.scale[0] > 0
    np.testing.assert_array_equal(np.asarray(state.scale).view(np.uint32), scale.view(np.uint32))
    np.testing.assert_array_equal(state.zero_point, zp)
    q = pj.quantize(x, state)
    np.testing.assert_array_equal(q, numerics.quantize(xnp, x, scale, zp, spec))
    np.testing.assert_array_equal(q, jax.jit(lambda x: pj.quantize(x, state))(x))
    # codes are finite-input-correct: dequantized extremes are within one step
    xhat = np.asarray(pj.dequantize(q, state), np.float64)
    assert np.all(np.abs(xhat - x.astype(np.float64)) <= float(state.scale[0]) * 0.5001
                  + (np.abs(x) < F32.tiny) * F32.tiny)


# -- dtypes ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision_is_computed_in_float32(dtype):
    x = jnp.asarray(X, dtype)
    state = pj.calibrate(x, SPEC)
    assert state.scale.dtype == jnp.float32
    x32 = x.astype(jnp.float32)
    np.testing.assert_array_equal(pj.quantize(x, state), pj.quantize(x32, state))
    y = pj.fake_quant(x, state)
    assert y.dtype == dtype
    np.testing.assert_array_equal(y, pj.fake_quant(x32, state).astype(dtype))


def test_dequantize_dtype_argument():
    state = pj.calibrate(X, SPEC)
    out = pj.dequantize(pj.quantize(X, state), state, dtype=jnp.bfloat16)
    assert out.dtype == jnp.bfloat16


# -- per-group ---------------------------------------------------------------------------------
def test_per_group_equals_calibrating_each_block():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 8)).astype(np.float32)
    spec = pj.QuantSpec(bits=4, symmetric=True, axis=1, group_size=4)
    state = pj.calibrate(x, spec)
    assert state.scale.shape == (6, 2)
    q = np.asarray(pj.quantize(x, state))
    block_spec = pj.QuantSpec(bits=4, symmetric=True)
    for i in range(6):
        for j in range(2):
            block = x[i, 4 * j: 4 * j + 4]
            s = pj.calibrate(block, block_spec)
            assert np.asarray(s.scale)[0] == np.asarray(state.scale)[i, j]
            np.testing.assert_array_equal(q[i, 4 * j: 4 * j + 4], pj.quantize(block, s))


def test_group_size_must_divide_axis():
    with pytest.raises(ValueError, match="not a multiple of group_size=3"):
        pj.calibrate(X, pj.QuantSpec(axis=0, group_size=3))


def test_per_channel_equals_per_tensor_of_each_channel():
    x = np.random.default_rng(1).standard_normal((3, 5)).astype(np.float32)
    state = pj.calibrate(x, pj.QuantSpec(bits=6, axis=-1))
    q = np.asarray(pj.quantize(x, state))
    for c in range(5):
        s = pj.calibrate(x[:, c], pj.QuantSpec(bits=6))
        np.testing.assert_array_equal(q[:, c], pj.quantize(x[:, c], s))


# -- stochastic rounding ------------------------------------------------------------------------
def test_stochastic_rounding_is_unbiased():
    state = pj.QuantState(jnp.ones((1,), jnp.float32), jnp.zeros((1,), jnp.int32),
                          pj.QuantSpec(bits=8, symmetric=True))
    x = jnp.full((200_000,), 0.3, jnp.float32)
    q = pj.quantize(x, state, key=jax.random.key(1))
    assert set(np.unique(np.asarray(q))) == {0, 1}
    assert abs(float(jnp.mean(q.astype(jnp.float32))) - 0.3) < 0.005
    q2 = pj.quantize(x, state, key=jax.random.key(2))
    assert not np.array_equal(q, q2)


@pytest.mark.parametrize("n", [4097, 1 << 20])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_single_non_finite_in_a_large_array_is_caught(n, bad):
    # XLA:CPU's min/max reductions drop NaN on large arrays; the checks must not rely
    # on them (numerics rule 5)
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    x[n // 3] = bad
    for spec in (SPEC, pj.QuantSpec(axis=0, group_size=n if n % 2 else 2)):
        with pytest.raises(ValueError, match="calibrate got 1"):
            pj.calibrate(x, spec)
    clean = pj.calibrate(np.nan_to_num(x, posinf=0, neginf=0), SPEC)
    with pytest.raises(ValueError, match="quantize got 1"):
        pj.quantize(x, clean)
    with pytest.raises(ValueError, match="fake_quant got 1"):
        pj.fake_quant(x, clean)
    # under jit: ignored by calibration
    state = jax.jit(lambda x: pj.calibrate(x, SPEC))(x)
    np.testing.assert_array_equal(state.scale, clean.scale)


# -- kernel schedules that must not change a bit -----------------------------------------------
@pytest.mark.parametrize("shape", [(1 << 20,), (1027, 1024)])
@pytest.mark.parametrize("where", ["first", "last"])
def test_two_stage_range_of_a_large_array_equals_numpy(shape, where):
    # on XLA:CPU arrays from xla_cpu.SPLIT_REDUCE_MIN elements on are reduced in rows
    # (64 for 1-D, the leading axis otherwise), then over the rows; the extremes may
    # sit in any row, next to non-finite values
    from array_api_compat import numpy as xnp

    from pychop_jax.core import numerics, xla_cpu

    x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    assert x.size >= xla_cpu.SPLIT_REDUCE_MIN
    flat = x.reshape(-1)
    at = flat.size - 5 if where == "last" else 3
    flat[at], flat[at - 1] = 9.5, -7.25
    for spec in (SPEC, pj.QuantSpec(bits=4, symmetric=True)):
        scale, zp = numerics.calibrate(xnp, x, spec)
        for state in (pj.calibrate(x, spec), jax.jit(pj.calibrate, static_argnums=1)(x, spec)):
            np.testing.assert_array_equal(np.asarray(state.scale).view(np.uint32),
                                          scale.view(np.uint32))
            np.testing.assert_array_equal(state.zero_point, zp)
    # under jit non-finite values are left out, wherever they are
    dirty = x.copy()
    dirty.reshape(-1)[[1, flat.size // 3, flat.size - 2]] = [np.inf, np.nan, -np.inf]
    for spec in (SPEC, pj.QuantSpec(bits=4, symmetric=True)):
        state = jax.jit(pj.calibrate, static_argnums=1)(dirty, spec)
        np.testing.assert_array_equal(state.scale, pj.calibrate(x, spec).scale)


def test_quantize_with_one_huge_channel_scale_equals_numpy():
    # quantize and fake_quant skip rule 4's pre-scale when no scale needs it
    # (lax.cond); a state where one channel needs it takes the pre-scaled branch
    from array_api_compat import numpy as xnp

    from pychop_jax.core import numerics

    x = np.array([[F32.max, 1.0], [-F32.max / 2, -0.3], [7.0, 0.25]], np.float32)
    spec = pj.QuantSpec(bits=2, axis=1)
    state = pj.calibrate(x, spec)
    assert float(state.scale[0, 0]) > 2.0**100 > float(state.scale[0, 1])
    scale, zp = numerics.calibrate(xnp, x, spec)
    expected = numerics.quantize(xnp, x, scale, zp, spec)
    np.testing.assert_array_equal(pj.quantize(x, state), expected)
    np.testing.assert_array_equal(jax.jit(pj.quantize)(x, state), expected)
    # fake_quant branches the same way (xla_cpu.cond)
    expected_fq = numerics.fake_quant(xnp, x, scale, zp, spec)
    np.testing.assert_array_equal(pj.fake_quant(x, state), expected_fq)
    np.testing.assert_array_equal(jax.jit(pj.fake_quant)(x, state), expected_fq)
    # and the plain branch agrees with the pre-scaled formula where both apply
    small = x[:, 1:]
    s = pj.calibrate(small, spec)
    scale, zp = np.asarray(s.scale), np.asarray(s.zero_point)
    np.testing.assert_array_equal(pj.quantize(small, s),
                                  numerics.quantize(xnp, small, scale, zp, spec))
    np.testing.assert_array_equal(pj.fake_quant(small, s),
                                  numerics.fake_quant(xnp, small, scale, zp, spec))


@pytest.mark.parametrize("n", [5000, (1 << 17) - 1, 1 << 17])
def test_every_reduction_schedule_gives_the_same_range(n):
    # xla_cpu.minmax picks how XLA reduces by size and context (inside_step); the
    # range may not depend on it, nor on where the non-finite values sit
    from pychop_jax.core import numerics, xla_cpu

    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    x[[0, n // 2, n - 1]] = [np.nan, np.inf, -np.inf]
    x[7], x[n - 9] = -4.5, 6.25

    def observe(x, spec, nonfinite, step):
        with xla_cpu.inside_step(step):
            return numerics.observe_range(jnp, x, spec, nonfinite=nonfinite)

    observe = jax.jit(observe, static_argnames=("spec", "nonfinite", "step"))
    for spec in (SPEC, pj.QuantSpec(bits=5, symmetric=True)):
        for nonfinite in ("ignore", "flag"):
            ranges = [observe(x, spec=spec, nonfinite=nonfinite, step=step)
                      for step in (False, True)]
            np.testing.assert_array_equal(ranges[0][0], ranges[1][0])
            np.testing.assert_array_equal(ranges[0][1], ranges[1][1])
            if nonfinite == "ignore":
                assert (float(ranges[0][0][0]), float(ranges[0][1][0])) == (-4.5, 6.25)
            else:
                assert float(ranges[0][1][0]) == np.inf and float(ranges[0][0][0]) == -np.inf
