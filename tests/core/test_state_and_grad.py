"""QuantState as a pytree (jit, scan, serialization) and fake_quant's gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization
from hypothesis import given, settings
from strategies import array_and_spec

import pychop_jax as pj

X = np.array([[0.1, -0.2, 0.3], [0.4, -0.5, 0.6]], np.float32)


def test_pytree_flatten_unflatten():
    state = pj.calibrate(X, pj.QuantSpec(bits=4, axis=1))
    leaves, treedef = jax.tree_util.tree_flatten(state)
    assert len(leaves) == 2
    assert leaves[0] is state.scale and leaves[1] is state.zero_point
    again = jax.tree_util.tree_unflatten(treedef, leaves)
    assert again.spec == state.spec
    np.testing.assert_array_equal(again.scale, state.scale)
    # the spec is static: states of different specs have different treedefs
    other = pj.calibrate(X, pj.QuantSpec(bits=8, axis=1))
    assert jax.tree_util.tree_structure(other) != treedef


def test_flax_serialization_round_trip():
    state = pj.calibrate(X, pj.QuantSpec(bits=5, symmetric=False, axis=0))
    blob = serialization.to_bytes({"act": state})
    target = {"act": pj.QuantState(jnp.zeros_like(state.scale),
                                   jnp.zeros_like(state.zero_point), state.spec)}
    restored = serialization.from_bytes(target, blob)["act"]
    assert restored.spec == state.spec
    np.testing.assert_array_equal(restored.scale, state.scale)
    np.testing.assert_array_equal(restored.zero_point, state.zero_point)
    assert serialization.to_state_dict(state).keys() == {"scale", "zero_point"}


def test_state_through_jit_and_scan():
    spec = pj.QuantSpec(bits=8)

    def step(state, x):
        new = pj.calibrate(x, spec)
        return new, pj.quantize(x, state)

    xs = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    init = pj.calibrate(xs[0], spec)
    final, qs = jax.jit(lambda s, xs: jax.lax.scan(step, s, xs))(init, xs)
    assert final.spec == spec and qs.shape == (5, 4)
    np.testing.assert_array_equal(final.scale, pj.calibrate(xs[-1], spec).scale)
    np.testing.assert_array_equal(qs[1], pj.quantize(xs[1], pj.calibrate(xs[0], spec)))


# -- gradients ----------------------------------------------------------------------------------
def test_ste_gradient_is_identity():
    x = jnp.asarray(np.linspace(-3, 3, 25, dtype=np.float32))
    state = pj.calibrate(x[5:20], pj.QuantSpec(bits=3))  # values outside clip
    g = jax.grad(lambda x: jnp.sum(pj.fake_quant(x, state, grad="ste") * jnp.arange(25.0)))(x)
    np.testing.assert_array_equal(g, np.arange(25.0))


@settings(max_examples=100)
@given(array_and_spec(allow_groups=True))
def test_clipped_gradient_masks_saturated_values(case):
    x, spec = case
    # calibrate on a shrunken copy so that part of x saturates
    state = pj.calibrate(x * 0.5, spec)
    w = np.arange(x.size, dtype=np.float32).reshape(x.shape) + 1
    g = np.asarray(jax.grad(lambda x: jnp.sum(pj.fake_quant(x, state) * w))(x))
    scale = np.asarray(state.scale, np.float64)
    zp = np.asarray(state.zero_point, np.float64)
    if spec.group_size:
        axis = spec.resolve_axis(x.ndim)
        scale = np.repeat(scale, spec.group_size, axis)
        zp = np.repeat(zp, spec.group_size, axis)
    t = x.astype(np.float64) / scale
    v = np.round(t) + zp
    inside = (v >= spec.qmin) & (v <= spec.qmax)
    near_edge = np.abs(np.abs(t - np.floor(t)) - 0.5) < 1e-5 * np.maximum(1, np.abs(t))
    expected = np.where(inside, w, 0.0)
    assert np.all((g == expected) | near_edge)


def test_clipped_gradient_hand_checked():
    state = pj.QuantState(jnp.ones((1,), jnp.float32), jnp.zeros((1,), jnp.int32),
                          pj.QuantSpec(bits=3, symmetric=True))  # codes [-4, 3]
    x = jnp.array([-5.0, -4.4, -4.6, 0.2, 3.4, 3.6, 10.0])
    g = jax.grad(lambda x: pj.fake_quant(x, state).sum())(x)
    np.testing.assert_array_equal(g, [0, 1, 0, 1, 1, 0, 0])


def test_state_gets_zero_gradient_and_calibration_blocks_gradient():
    def loss(x):
        return jnp.sum(pj.fake_quant(x, pj.calibrate(x, pj.QuantSpec(bits=4))) ** 2)

    g = jax.grad(loss)(jnp.asarray(X))
    state = pj.calibrate(X, pj.QuantSpec(bits=4))
    expected = 2 * pj.fake_quant(X, state)  # d/dx sum(xhat^2) with STE, nothing clipped
    np.testing.assert_allclose(g, expected, rtol=1e-6)
    gs = jax.grad(lambda s: jnp.sum(pj.fake_quant(X, s)), allow_int=True)(state)
    np.testing.assert_array_equal(gs.scale, 0.0)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_gradient_dtype_follows_input(dtype):
    x = jnp.asarray(X, dtype)
    state = pj.calibrate(x, pj.QuantSpec())
    g = jax.grad(lambda x: pj.fake_quant(x, state).astype(jnp.float32).sum())(x)
    assert g.dtype == dtype


def test_grad_under_vmap_and_jit():
    state = pj.calibrate(X, pj.QuantSpec(bits=2, axis=1))
    f = jax.jit(jax.vmap(jax.grad(lambda row: jnp.sum(pj.fake_quant(row[None], state)))))
    g = f(X * 3)
    assert g.shape == X.shape
    assert set(np.unique(np.asarray(g))) <= {0.0, 1.0}
