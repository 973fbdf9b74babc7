"""The interpreter (``pychop_jax.transform.interpret``) and the QAT mode
(``transform.training``) through plain functions: state per scanned layer, kept through
untaken branches and carried through loops; higher-order primitives re-emitted with the
same results; no rule, no change."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import pychop_jax as pj
from pychop_jax import QuantRule

A8 = pj.QuantSpec(bits=8)


def fq(x, spec):
    return pj.fake_quant(x, pj.calibrate(x, spec))


def w8(axis):
    return pj.QuantSpec(bits=8, symmetric=True, axis=axis)


def normal(seed, shape, scale=1.0):
    return scale * jax.random.normal(jax.random.key(seed), shape)


def stacked(p, x):
    def body(h, w):
        return jnp.tanh(h @ w), None

    h, _ = lax.scan(body, x, p["stack"])
    return h


def test_scanned_stack_has_one_input_range_per_layer():
    params = {"stack": normal(0, (3, 8, 8), 0.5)}
    x1, x2 = normal(1, (4, 8)), normal(2, (4, 8), 3.0)
    qf = pj.quantize_model(stacked, QuantRule(".*", weight=8, act=8, observer="minmax"))
    v = qf.init(params, x1)
    assert v["quant_stats"]["stack"]["input"].lo.shape == (3,)
    y1, upd = qf.apply(v, x1, mutable=["quant_stats"])
    # reference: each layer quantizes its own input with that input's range
    w = fq(params["stack"], w8((0, 2)))
    h, his = x1, []
    for i in range(3):
        his.append(h)
        h = jnp.tanh(fq(h, A8) @ w[i])
    np.testing.assert_allclose(y1, h, rtol=1e-6, atol=1e-6)
    ranges = upd["quant_stats"]["stack"]["input"]
    for i in range(3):
        lo, hi = min(float(his[i].min()), 0.0), max(float(his[i].max()), 0.0)
        assert (float(ranges.lo[i]), float(ranges.hi[i])) == pytest.approx((lo, hi), rel=1e-6)
    # evaluation: layer i's frozen range, whatever the batch
    y2 = jax.jit(qf.apply)({**v, **upd}, x2)
    h = x2
    for i in range(3):
        state = pj.calibrate(his[i], A8)
        h = jnp.tanh(pj.fake_quant(h, state) @ w[i])
    np.testing.assert_allclose(y2, h, rtol=1e-6, atol=1e-6)


def control(p, x, flag):
    y = lax.cond(flag, lambda h: h @ p["a"], lambda h: h @ p["b"], x)
    y = jax.checkpoint(lambda h: jnp.tanh(h @ p["r"]))(y)
    y = jax.jit(lambda h: h @ p["j"])(y)
    return lax.while_loop(lambda c: c[0] < 2, lambda c: (c[0] + 1, jnp.tanh(c[1] @ p["l"])),
                          (0, y))[1]


def control_reference(p, x, flag, ranges=None):
    """``control`` with weights and inputs fake-quantized by hand; ``ranges``: the
    calibration input of each site (``None``: the input itself)."""
    ranges = ranges or {}
    q = lambda name, h: pj.fake_quant(h, pj.calibrate(ranges.get(name, h), A8))  # noqa: E731
    w = {k: fq(v, w8(1)) for k, v in p.items()}
    y = q("a", x) @ w["a"] if flag else q("b", x) @ w["b"]
    y = jnp.tanh(q("r", y) @ w["r"])
    y = q("j", y) @ w["j"]
    return y, w


PARAMS = {k: normal(i, (6, 6), 0.4) for i, k in enumerate("abrjl")}


def test_cond_remat_jit_and_while_are_reemitted_quantized():
    x = normal(9, (2, 6))
    qf = pj.quantize_model(control, QuantRule(".*", weight=8, act=8, observer="minmax"))
    v = qf.init(PARAMS, x, True)
    y, upd = jax.jit(lambda v, x: qf.apply(v, x, True, mutable=["quant_stats"]))(v, x)
    stats = upd["quant_stats"]
    assert float(stats["b"]["input"].count) == 0  # the branch not taken observed nothing
    assert float(stats["a"]["input"].count) == 1
    assert float(stats["l"]["input"].count) == 2  # one state for both loop iterations
    ref, w = control_reference(PARAMS, x, True)
    h = ref
    for _ in range(2):  # minmax: each iteration's own range, the last one kept
        last = h
        h = jnp.tanh(fq(h, A8) @ w["l"])
    np.testing.assert_allclose(y, h, rtol=1e-5, atol=1e-5)
    lo, hi = min(float(last.min()), 0.0), max(float(last.max()), 0.0)
    assert (float(stats["l"]["input"].lo), float(stats["l"]["input"].hi)) == \
        pytest.approx((lo, hi), rel=1e-6)


def test_gradients_flow_through_reemitted_remat_cond_and_custom_vjp():
    @jax.custom_vjp
    def scaled(h, w):
        return h @ w

    scaled.defvjp(lambda h, w: (h @ w, (h, w)), lambda r, g: (g @ r[1].T, r[0].T @ g))

    def f(p, x):
        y = jax.checkpoint(lambda h: jnp.tanh(h @ p["r"]))(x)
        y = lax.cond(True, lambda h: h @ p["a"], lambda h: h, y)
        return scaled(y, p["c"])

    params = {k: normal(i, (5, 5)) for i, k in enumerate("rac")}
    x = normal(7, (3, 5))
    qf = pj.quantize_model(f, QuantRule(".*", weight=8))
    v = qf.init(params, x)
    grads = jax.grad(lambda p: jnp.sum(qf.apply({**v, "params": p}, x) ** 2))(params)
    # the straight-through estimator: the gradient of the model on the fake-quantized
    # weights (the custom rule is replaced by autodiff of the quantized body)
    w = {k: fq(val, w8(1)) for k, val in params.items()}
    ref = jax.grad(lambda w: jnp.sum((jnp.tanh(x @ w["r"]) @ w["a"] @ w["c"]) ** 2))(w)
    for k in params:
        np.testing.assert_allclose(grads[k], ref[k], rtol=1e-5, atol=1e-5)


def test_no_rule_no_change():
    x = normal(9, (2, 6))
    qf = pj.quantize_model(control, QuantRule("nothing", weight=8))
    with pytest.warns(UserWarning, match="matched no op"):
        v = qf.init(PARAMS, x, False)
    np.testing.assert_array_equal(jax.jit(lambda v, x: qf.apply(v, x, False))(v, x),
                                  jax.jit(control, static_argnums=2)(PARAMS, x, False))
