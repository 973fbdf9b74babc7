"""Served weights (``pychop_jax.serving.served_ops``): views act on codes and scales and
equal the same view of the dequantized weight; served matmuls with the weight on either
side, transposed, packed or grouped equal the float product of the dequantized weight
(a reference computed in float64 NumPy)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import pychop_jax as pj
from pychop_jax.serving import served_ops
from pychop_jax.serving.served_ops import InputQuant, ServedWeight, respec


def eqn_of(fn, *args):
    closed = jax.make_jaxpr(fn)(*args)
    return closed.jaxpr.eqns[0]


def dq64(qa):
    return np.asarray(qa.dequantize(jnp.float32), np.float64)


SPECS = {
    "int8 per column": pj.QuantSpec(bits=8, symmetric=True, axis=1),
    "int4 groups of 4 along axis 0": pj.QuantSpec(bits=4, symmetric=False, axis=0, group_size=4),
    "int4 per tensor": pj.QuantSpec(bits=4, symmetric=True),
    "fp8 per column": pj.QuantSpec(dtype="float8_e4m3fn", axis=1),
}


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("view", ["transpose", "reshape", "slice", "expand", "squeeze"])
def test_views_of_codes_equal_views_of_values(name, view):
    w = jax.random.normal(jax.random.key(0), (8, 6))
    qa = pj.QuantizedArray.quantize(w, SPECS[name])
    fns = {"transpose": lambda a: a.T, "reshape": lambda a: jnp.reshape(a, (2, 4, 6)),
           "slice": lambda a: a[4:8], "expand": lambda a: a[None],
           "squeeze": lambda a: jnp.squeeze(a[:1], 0)}
    fn = fns[view]
    served = ServedWeight(qa)
    if view == "squeeze":
        served = served_ops.view(eqn_of(lambda a: a[:1], w), served, [])
        served = served_ops.view(eqn_of(lambda a: jnp.squeeze(a, 0), w[:1]), served, [])
    else:
        served = served_ops.view(eqn_of(fn, w), served, [])
    got = np.asarray(served_ops.dequantize(served), np.float64)
    np.testing.assert_array_equal(got, np.asarray(fn(jnp.asarray(dq64(qa))), np.float64))


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("side", ["rhs", "lhs", "rhs transposed"])
def test_weight_only_matmul_on_either_side(side, packed):
    x = jax.random.normal(jax.random.key(1), (3, 16))
    w = jax.random.normal(jax.random.key(2), (16, 10))
    spec = pj.QuantSpec(bits=4, symmetric=True, axis=0, group_size=8)
    stored = w.T if side == "rhs transposed" else w
    qspec = spec if side != "rhs transposed" else pj.QuantSpec(bits=4, symmetric=True, axis=1,
                                                                group_size=8)
    qa = pj.QuantizedArray.quantize(stored, qspec, pack=packed)
    ref = np.asarray(x, np.float64) @ (dq64(qa).T if side == "rhs transposed" else dq64(qa))
    served = ServedWeight(qa)
    if side == "rhs":
        params = eqn_of(lambda a, b: a @ b, x, w).params
        y = served_ops.served_dot_general(x, served, params, 1, None, jnp.float32)
    elif side == "lhs":  # (w^T x^T)^T: the weight on the left
        params = eqn_of(lambda b, a: lax.dot_general(b, a, (((0,), (1,)), ((), ()))),
                        w, x).params
        y = served_ops.served_dot_general(x, served, params, 0, None, jnp.float32).T
    else:
        served = served_ops.view(eqn_of(lambda a: a.T, stored), served, [])
        params = eqn_of(lambda a, b: a @ b, x, w).params
        y = served_ops.served_dot_general(x, served, params, 1, None, jnp.float32)
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=1e-5, atol=1e-5)


def test_integer_path_equals_fake_quantized_product():
    x = jax.random.normal(jax.random.key(3), (4, 32))
    w = jax.random.normal(jax.random.key(4), (32, 8))
    qa = pj.QuantizedArray.quantize(w, pj.QuantSpec(bits=8, symmetric=True, axis=1))
    state = pj.calibrate(x, pj.QuantSpec(bits=8))
    params = eqn_of(lambda a, b: a @ b, x, w).params
    y = served_ops.served_dot_general(x, ServedWeight(qa), params, 1,
                                      InputQuant(state.spec, state), jnp.float32)
    ref = np.asarray(pj.fake_quant(x, state), np.float64) @ dq64(qa)
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=1e-5, atol=1e-5)


def test_lookup_gathers_codes_and_scales_exactly():
    table = jax.random.normal(jax.random.key(5), (11, 8))
    for spec in (pj.QuantSpec(bits=4, symmetric=True, axis=0),
                 pj.QuantSpec(bits=4, symmetric=False, axis=1, group_size=4),
                 pj.QuantSpec(bits=8)):
        qa = pj.QuantizedArray.quantize(table, spec)
        ids = jnp.array([[0, 3, 10], [5, 5, 1]])
        eqn = [e for e in jax.make_jaxpr(lambda t, i: jnp.take(t, i, axis=0))(table, ids)
               .jaxpr.eqns][-1]
        inner = eqn.params["jaxpr"].jaxpr.eqns if "jaxpr" in eqn.params else [eqn]
        gather = [e for e in inner if e.primitive.name == "gather"][0]
        idx = jnp.clip(ids, 0, 10)[..., None]
        got = served_ops.served_gather(gather, ServedWeight(qa), idx)
        np.testing.assert_array_equal(np.asarray(got), np.take(dq64(qa), ids, axis=0))


@pytest.mark.parametrize("shape, scale_shape, axis, group", [
    ((4, 6), (1, 6), 1, None), ((4, 6), (1, 1), None, None), ((4, 6), (4, 6), (0, 1), None),
    ((8, 6), (2, 6), 0, 4), ((3, 8, 6), (3, 2, 6), 1, 4)])
def test_respec_reads_the_granularity_off_the_scale(shape, scale_shape, axis, group):
    spec, expand = respec(pj.QuantSpec(bits=4, symmetric=True), shape, scale_shape)
    assert (spec.axis, spec.group_size, expand) == (axis, group, None)
    assert spec.scale_shape(shape) == scale_shape


def test_respec_expands_a_constant_axis_beside_a_grouped_one():
    spec, expand = respec(pj.QuantSpec(bits=4, symmetric=True), (8, 6), (2, 1))
    assert (spec.axis, spec.group_size, expand) == (0, 4, (1,))


@pytest.mark.parametrize("eq, shape, spec", [
    ("btd,dnh->btnh", (16, 2, 8), pj.QuantSpec(bits=4, symmetric=True, axis=0, group_size=8)),
    ("btnh,nhd->btd", (2, 8, 16), pj.QuantSpec(bits=4, symmetric=False, axis=1, group_size=4)),
    ("btd,dnh->btnh", (16, 2, 5), pj.QuantSpec(bits=4, symmetric=True, axis=(1, 2))),
    ("btnh,nhd->btd", (2, 8, 16), pj.QuantSpec(bits=8, symmetric=True, axis=2)),
])
@pytest.mark.parametrize("act", [None, "per tensor", "per token"])
def test_einsum_kernels_as_matrix_products(eq, shape, spec, act):
    """Kernels whose contracted and free axes are contiguous runs take the matrix-product
    kernels; the result is the product of the dequantized weight either way."""
    lhs, rhs = eq.split("->")[0].split(",")
    sizes = {"b": 2, "t": 3, **dict(zip(rhs, shape, strict=True))}
    x = jax.random.normal(jax.random.key(6), tuple(sizes[c] for c in lhs))
    w = jax.random.normal(jax.random.key(7), shape)
    qa = pj.QuantizedArray.quantize(w, spec)
    if act is not None and spec.bits == 4 and not spec.symmetric:
        pytest.skip("the integer path takes symmetric and affine grids alike; one is enough")
    quant = None
    if act == "per tensor":
        quant = InputQuant(pj.QuantSpec(bits=8), pj.calibrate(x, pj.QuantSpec(bits=8)))
    elif act == "per token":
        quant = InputQuant(pj.QuantSpec(bits=8, symmetric=True, axis=-1,
                                        group_size=x.shape[-1]))
    params = eqn_of(lambda a, b: jnp.einsum(eq, a, b), x, w)
    inner = params.params["jaxpr"].jaxpr.eqns if "jaxpr" in params.params else [params]
    dot = [e for e in inner if e.primitive.name == "dot_general"][0]
    y = served_ops.served_dot_general(x, ServedWeight(qa), dot.params, 1, quant, jnp.float32)
    xq = np.asarray(x if quant is None else quant.fake_quant(x), np.float64)
    ref = np.einsum(eq, xq, dq64(qa))
    np.testing.assert_allclose(np.asarray(y, np.float64).reshape(ref.shape), ref,
                               rtol=1e-4, atol=1e-4)
