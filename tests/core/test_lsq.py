"""LSQ / LSQ+: fake_quant(x, state, grad='lsq') against the papers' formulas, and lsq_init.

Expected values are worked out by hand (Esser et al. 2019, eq. 3; Bhalgat et al. 2020)
or with an independent float64 NumPy implementation of those formulas.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pychop_jax as pj

SYM3 = pj.QuantSpec(bits=3, symmetric=True)  # codes [-4, 3]: Q_N = 4, Q_P = 3
ASYM2 = pj.QuantSpec(bits=2)  # codes [0, 3]


def _grads(x, state, w=None):
    w = jnp.ones_like(x) if w is None else w
    return jax.grad(lambda x, s: jnp.sum(pj.fake_quant(x, s, grad="lsq") * w), argnums=(0, 1))(
        x, state)


def test_symmetric_gradients_by_hand():
    # s = 0.5, so t = x / s = [-6, -3.8, -0.6, 0.4, 1.48, 3.2, 4]
    x = jnp.array([-3.0, -1.9, -0.3, 0.2, 0.74, 1.6, 2.0], jnp.float32)
    state = pj.QuantState(jnp.array([0.5], jnp.float32), jnp.array([0.0], jnp.float32), SYM3)
    w = jnp.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    dx, ds = _grads(x, state, w)
    # inside iff -4 < t < 3: elements 1..4
    np.testing.assert_array_equal(dx, [0, 2, 3, 4, 5, 0, 0])
    # d xhat/ds: t <= -Q_N -> -4; t >= Q_P -> 3; else round(t) - t
    per_elem = [-4.0, -4 + 3.8, -1 + 0.6, 0 - 0.4, 1 - 1.48, 3.0, 3.0]
    g = 1 / np.sqrt(7 * 3)  # 1 / sqrt(N * Q_P)
    expected = g * sum(wi * di for wi, di in zip([1, 2, 3, 4, 5, 6, 7], per_elem, strict=True))
    np.testing.assert_allclose(ds.scale, [expected], rtol=1e-5)
    np.testing.assert_array_equal(ds.zero_point, [0.0])  # symmetric: the zero point is fixed
    # forward: s * clip(round(t), -4, 3)
    np.testing.assert_array_equal(pj.fake_quant(x, state, grad="lsq"),
                                  [-2.0, -2.0, -0.5, 0.0, 0.5, 1.5, 1.5])


def test_asymmetric_lsq_plus_gradients_by_hand():
    # s = 1, zero point 1 -> steps in [0 - 1, 3 - 1] = [-1, 2]
    x = jnp.array([-2.5, -0.4, 0.6, 1.2, 2.5], jnp.float32)
    state = pj.QuantState(jnp.array([1.0]), jnp.array([1.0]), ASYM2)
    dx, ds = _grads(x, state)
    np.testing.assert_array_equal(dx, [0, 1, 1, 1, 0])
    g = 1 / np.sqrt(5 * 3)
    np.testing.assert_allclose(ds.scale, [g * (-1 + 0.4 + 0.4 - 0.2 + 2)], rtol=1e-5)
    # d xhat / d zero_point = -s where clipped (below or above), 0 inside
    np.testing.assert_allclose(ds.zero_point, [g * (-1.0 - 1.0)], rtol=1e-6)
    np.testing.assert_array_equal(pj.fake_quant(x, state, grad="lsq"), [-1, 0, 1, 1, 2])


@pytest.mark.parametrize("zp, like", [(1.4, 1.0), (1.6, 2.0), (2.5, 2.0), (7.0, 3.0)])
def test_float_zero_point_is_rounded_half_even_and_clipped(zp, like):
    x = jnp.array([-2.5, -0.4, 0.6, 1.2, 2.5, 4.0], jnp.float32)
    learned = pj.QuantState(jnp.array([1.0]), jnp.array([zp]), ASYM2)
    fixed = pj.QuantState(jnp.array([1.0]), jnp.array([int(like)], jnp.int32), ASYM2)
    np.testing.assert_array_equal(pj.fake_quant(x, learned, grad="lsq"), pj.fake_quant(x, fixed))
    np.testing.assert_array_equal(pj.quantize(x, learned), pj.quantize(x, fixed))
    q = pj.quantize(x, fixed)
    np.testing.assert_array_equal(pj.dequantize(q, learned), pj.dequantize(q, fixed))
    # the straight-through zero point gets the gradient of the rounded one
    _, d_learned = _grads(x, learned)
    _, d_fixed = _grads(x, fixed.replace(zero_point=jnp.array([like])))
    np.testing.assert_allclose(d_learned.zero_point, d_fixed.zero_point)


def _reference_lsq(x, s, z, qmin, qmax, axis, w):
    """float64 NumPy: the paper's gradients for a per-channel scale along ``axis``."""
    t = x / s
    lo_q, hi_q = qmin - np.round(z), qmax - np.round(z)
    inside = (t > lo_q) & (t < hi_q)
    ds = np.where(inside, np.round(t) - t, np.where(t <= lo_q, lo_q, hi_q))
    dz = np.where(inside, 0.0, -s)
    red = tuple(d for d in range(x.ndim) if d != axis)
    n = x.size // x.shape[axis]
    g = 1 / np.sqrt(n * qmax)
    return (np.where(inside, w, 0.0), g * np.sum(w * ds, red, keepdims=True),
            g * np.sum(w * dz, red, keepdims=True))


@pytest.mark.parametrize("symmetric", [True, False])
def test_per_channel_gradients_match_reference(symmetric):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 4)).astype(np.float32) * np.array([0.5, 1, 2, 4], np.float32)
    w = rng.standard_normal(x.shape).astype(np.float32)
    spec = pj.QuantSpec(bits=3, symmetric=symmetric, axis=1)
    state = pj.lsq_init(x, spec)
    state = state.replace(scale=state.scale * 0.3)  # make some values saturate
    dx, ds = _grads(jnp.asarray(x), state, jnp.asarray(w))
    s = np.asarray(state.scale, np.float64)
    z = np.asarray(state.zero_point, np.float64)
    ex, es, ez = _reference_lsq(x.astype(np.float64), s, z, spec.qmin, spec.qmax, 1, w)
    assert 0 < np.sum(ex == 0) < x.size  # both cases occur
    np.testing.assert_allclose(dx, ex, rtol=1e-6)
    np.testing.assert_allclose(ds.scale, es, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ds.zero_point, 0.0 if symmetric else ez, rtol=1e-4, atol=1e-6)


def test_lsq_init_matches_the_paper():
    x = np.array([[0.5, -1.0, 0.0], [1.5, 2.0, -4.0]], np.float32)
    state = pj.lsq_init(x, pj.QuantSpec(bits=4, symmetric=True, axis=0))  # Q_P = 7
    np.testing.assert_allclose(state.scale, [[2 * 0.5 / np.sqrt(7)], [2 * 2.5 / np.sqrt(7)]],
                               rtol=1e-6)
    assert state.zero_point.dtype == jnp.float32
    np.testing.assert_array_equal(state.zero_point, 0.0)
    # asymmetric (Q_P = 2^4 - 1 = 15): zero point 0 for non-negative data,
    # else the code of min(x) under the initial scale
    pos = pj.lsq_init(np.abs(x), pj.QuantSpec(bits=4))
    np.testing.assert_allclose(pos.scale, [[2 * np.abs(x).mean() / np.sqrt(15)]], rtol=1e-6)
    np.testing.assert_array_equal(pos.zero_point, [[0.0]])
    mixed = pj.lsq_init(x, pj.QuantSpec(bits=4))
    s = 2 * np.abs(x).mean() / np.sqrt(15)  # 0.8607
    np.testing.assert_array_equal(mixed.zero_point, [[np.round(4.0 / s)]])  # 5


def test_lsq_init_errors():
    with pytest.raises(ValueError, match="lsq_init got 1 NaN"):
        pj.lsq_init(np.array([1.0, np.nan], np.float32), SYM3)
    with pytest.raises(TypeError, match="lsq_init needs a floating-point array"):
        pj.lsq_init(np.array([1, 2]), SYM3)


def test_integer_zero_point_state_learns_only_the_scale():
    x = jnp.array([-2.5, -0.4, 0.6, 1.2, 2.5])
    state = pj.calibrate(x, ASYM2)  # int32 zero point
    ds = jax.grad(lambda s: jnp.sum(pj.fake_quant(x, s, grad="lsq")), allow_int=True)(state)
    assert ds.scale.dtype == jnp.float32 and float(jnp.abs(ds.scale).sum()) > 0
    assert ds.zero_point.dtype == jax.dtypes.float0


def test_training_the_state_with_optax_reduces_error():
    x = jax.random.normal(jax.random.key(0), (512, 8))
    spec = pj.QuantSpec(bits=3, axis=1)
    state = pj.lsq_init(x, spec)
    loss = jax.jit(lambda s: jnp.mean((pj.fake_quant(x, s, grad="lsq") - x) ** 2))
    opt = optax.adam(1e-2)
    opt_state = opt.init(state)

    @jax.jit
    def step(state, opt_state):
        g = jax.grad(loss)(state)
        updates, opt_state = opt.update(g, opt_state)
        return optax.apply_updates(state, updates), opt_state

    before = float(loss(state))
    for _ in range(60):
        state, opt_state = step(state, opt_state)
    assert isinstance(state, pj.QuantState) and state.spec == spec
    assert float(loss(state)) < 0.8 * before


def test_closed_over_input_inside_jit_is_treated_as_traced():
    # a concrete array closed over by a jitted function is a constant of the trace:
    # the eager NaN checks must not try to read a staged-out flag
    x = jnp.array([-1.0, 0.5, 2.0])
    state = pj.lsq_init(x, SYM3)
    y = jax.jit(lambda s: pj.fake_quant(x, s, grad="lsq"))(state)
    np.testing.assert_array_equal(y, pj.fake_quant(x, state))
    cal = jax.jit(lambda: pj.calibrate(x, SYM3).scale)()
    np.testing.assert_array_equal(cal, pj.calibrate(x, SYM3).scale)


def test_a_calibrated_state_made_learnable_differentiates_both_leaves():
    x = jax.random.normal(jax.random.key(3), (64, 8)) * 2 + 0.5
    spec = pj.QuantSpec(bits=4)
    state = pj.calibrate(x, spec)
    loss = lambda s: jnp.sum(pj.fake_quant(x, s, grad="lsq") ** 2)  # noqa: E731
    with pytest.raises(TypeError, match="int32"):  # jax.grad's own check of the leaves
        jax.grad(loss)(state)
    learnable = state.learnable()
    assert learnable.zero_point.dtype == jnp.float32
    np.testing.assert_array_equal(pj.quantize(x, learnable), pj.quantize(x, state))
    grads = jax.grad(loss)(learnable)
    assert float(jnp.abs(grads.scale).sum()) > 0 and float(jnp.abs(grads.zero_point).sum()) > 0
