"""Integer matmuls: int8 codes, int32 accumulation, scales and zero points after."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import pychop_jax as pj

DN = (((1,), (0,)), ((), ()))


def qa_from_codes(codes, scale, zero_point, spec):
    """A QuantizedArray built directly from integer codes (no calibration)."""
    codes = jnp.asarray(codes, spec.code_dtype)
    shape = spec.scale_shape(codes.shape)
    state = pj.QuantState(jnp.broadcast_to(jnp.asarray(scale, jnp.float32), shape),
                          jnp.broadcast_to(jnp.asarray(zero_point, jnp.int32), shape), spec)
    return pj.QuantizedArray(codes=codes, state=state, shape=codes.shape)


@pytest.mark.parametrize("lsym, rsym", [(True, True), (False, True), (True, False),
                                        (False, False)])
def test_exact_on_small_integer_cases(lsym, rsym):
    rng = np.random.default_rng(0)
    ls = pj.QuantSpec(8, symmetric=lsym)
    rs = pj.QuantSpec(8, symmetric=rsym, axis=1)
    lc = rng.integers(ls.qmin, ls.qmax + 1, (5, 7))
    rc = rng.integers(rs.qmin, rs.qmax + 1, (7, 3))
    lz = 0 if lsym else 100
    rz = np.zeros((1, 3), int) if rsym else np.array([[3, 128, 250]])
    lhs = qa_from_codes(lc, 1.0, lz, ls)
    rhs = qa_from_codes(rc, np.array([[1.0, 2.0, 0.5]]), rz, rs)
    expected = ((lc - lz) @ ((rc - rz) * np.array([[1.0, 2.0, 0.5]])))  # exact integers
    got = np.asarray(pj.int_dot_general(lhs, rhs, DN))
    np.testing.assert_array_equal(got, expected)


@settings(max_examples=100)
@given(st.sampled_from([2, 4, 8]), st.booleans(), st.sampled_from([3, 8]), st.booleans(),
       st.integers(0, 2**16))
def test_matches_float_matmul_of_dequantized(lbits, lsym, rbits, rsym, seed):
    k1, k2 = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(k1, (6, 40)) * 3 + 1
    w = jax.random.normal(k2, (40, 5))
    ql = pj.QuantizedArray.quantize(x, pj.QuantSpec(lbits, lsym), pack=False)
    qr = pj.QuantizedArray.quantize(w, pj.QuantSpec(rbits, rsym, axis=1))  # packed when <= 4
    got = pj.int_dot_general(ql, qr, DN)
    ref = jnp.matmul(ql.dequantize(), qr.dequantize(), precision="highest")
    tol = 1e-5 * jnp.matmul(jnp.abs(ql.dequantize()), jnp.abs(qr.dequantize()))
    assert bool(jnp.all(jnp.abs(got - ref) <= tol + 1e-6))


def test_float_operands_are_quantized_dynamically_or_with_a_state():
    x = jax.random.normal(jax.random.key(1), (4, 16))
    w = jax.random.normal(jax.random.key(2), (16, 8))
    dynamic = pj.int_dot_general(x, w, DN)
    ql = pj.QuantizedArray.quantize(x, pj.serving.int_matmul.DEFAULT_INPUT_SPEC)
    qr = pj.QuantizedArray.quantize(w, pj.serving.int_matmul.DEFAULT_WEIGHT_SPEC)
    np.testing.assert_array_equal(dynamic, pj.int_dot_general(ql, qr, DN))
    state = pj.calibrate(x * 4, pj.QuantSpec(8))  # a static, wider range
    static = pj.int_dot_general(x, qr, DN, lhs_state=state)
    ql_static = pj.QuantizedArray.quantize(x, None, state=state)
    np.testing.assert_array_equal(static, pj.int_dot_general(ql_static, qr, DN))
    assert not np.array_equal(static, dynamic)


def test_batch_dimensions():
    x = jax.random.normal(jax.random.key(3), (2, 4, 16))
    w = jax.random.normal(jax.random.key(4), (2, 16, 3))
    dn = (((2,), (1,)), ((0,), (0,)))
    ql = pj.QuantizedArray.quantize(x, pj.QuantSpec(8))
    qr = pj.QuantizedArray.quantize(w, pj.QuantSpec(8, symmetric=True, axis=2))
    got = pj.int_dot_general(ql, qr, dn)
    ref = jax.lax.dot_general(ql.dequantize(), qr.dequantize(), dn, precision="highest")
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("x_shape, dn", [
    ((16,), (((0,), (0,)), ((), ()))),                  # vector lhs: no free axis
    ((2, 3, 16), (((2,), (0,)), ((), ()))),             # two free lhs axes
    ((5, 16), (((1,), (0,)), ((), ()))),
])
def test_asymmetric_activation_correction_in_every_layout(x_shape, dn):
    x = jax.random.normal(jax.random.key(7), x_shape) + 2.0  # far from symmetric
    w = jax.random.normal(jax.random.key(8), (16, 4))
    ql = pj.QuantizedArray.quantize(x, pj.QuantSpec(8))
    qr = pj.QuantizedArray.quantize(w, pj.QuantSpec(8, symmetric=True, axis=1))
    got = pj.int_dot_general(ql, qr, dn)
    ref = jax.lax.dot_general(ql.dequantize(), qr.dequantize(), dn, precision="highest")
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_errors():
    x = jnp.ones((4, 16))
    with pytest.raises(ValueError, match="12-bit codes; the integer path takes at most 8"):
        pj.int_dot_general(pj.QuantizedArray.quantize(x, pj.QuantSpec(12)), x.T, DN)
    with pytest.raises(ValueError, match="varies along the contracted axes"):
        pj.int_dot_general(pj.QuantizedArray.quantize(x, pj.QuantSpec(8, axis=1)), x.T, DN)


def test_as_flax_dot_general_with_quantized_kernels():
    x = jax.random.normal(jax.random.key(5), (3, 12))
    kw = dict(dot_general=pj.make_int_dot_general(), promote_dtype=pj.promote_dtype)
    dense = nn.Dense(6, **kw)
    params = nn.Dense(6).init(jax.random.key(6), x)
    qparams, _ = pj.quantize_params(params, [("kernel", pj.serving.int_matmul.DEFAULT_WEIGHT_SPEC)])
    y = jax.jit(dense.apply)(qparams, x)
    kernel = qparams["params"]["kernel"]
    expected = pj.int_dot_general(x, kernel, DN) + params["params"]["bias"]
    np.testing.assert_allclose(y, expected, rtol=1e-6)
    # float kernels work too (quantized per call), and close to the float layer
    y_float_kernel = dense.apply(params, x)
    np.testing.assert_allclose(y_float_kernel, nn.Dense(6).apply(params, x), atol=0.05)

    layer = nnx.Linear(12, 6, rngs=nnx.Rngs(0), **kw)
    layer.kernel = nnx.Param(pj.QuantizedArray.quantize(layer.kernel[...],
                                                        pj.serving.int_matmul.DEFAULT_WEIGHT_SPEC))
    np.testing.assert_allclose(layer(x), pj.int_dot_general(x, layer.kernel[...], DN)
                               + layer.bias[...], rtol=1e-6)


CONV_DN = ("NHWC", "HWIO", "NHWC")


@pytest.mark.parametrize("padding, strides, dilation, groups, lsym, rsym", [
    ("SAME", (1, 1), None, 1, False, True),
    ("SAME", (2, 2), None, 1, False, False),
    ("VALID", (1, 1), (2, 2), 1, True, True),
    (((1, 2), (0, 1)), (2, 1), None, 1, True, False),
    ("SAME", (1, 1), None, 2, False, True),
])
def test_int_conv_matches_float_conv_of_dequantized(padding, strides, dilation, groups,
                                                    lsym, rsym):
    x = jax.random.normal(jax.random.key(9), (2, 9, 8, 4)) + 0.5
    w = jax.random.normal(jax.random.key(10), (3, 3, 4 // groups, 6))
    ql = pj.QuantizedArray.quantize(x, pj.QuantSpec(8, symmetric=lsym))
    qr = pj.QuantizedArray.quantize(w, pj.QuantSpec(8, symmetric=rsym, axis=3))
    kw = dict(window_strides=strides, padding=padding, rhs_dilation=dilation,
              dimension_numbers=CONV_DN, feature_group_count=groups)
    got = pj.int_conv_general_dilated(ql, qr, **kw)
    # float reference: zero padding of the *dequantized* input, i.e. padding with 0.0
    ref = jax.lax.conv_general_dilated(ql.dequantize(), qr.dequantize(), precision="highest",
                                       **kw)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_int_conv_exact_on_integers():
    spec = pj.QuantSpec(8)
    codes = np.random.default_rng(3).integers(0, 256, (1, 5, 5, 2))
    x = qa_from_codes(codes, 1.0, 7, spec)
    kspec = pj.QuantSpec(8, symmetric=True, axis=3)
    kcodes = np.random.default_rng(4).integers(-127, 128, (3, 3, 2, 3))
    k = qa_from_codes(kcodes, 1.0, 0, kspec)
    got = pj.int_conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=CONV_DN)
    vals = np.pad(codes - 7, ((0, 0), (1, 1), (1, 1), (0, 0)))  # 0.0 outside the image
    expected = np.zeros((1, 5, 5, 3))
    for i in range(5):
        for j in range(5):
            expected[0, i, j] = np.tensordot(vals[0, i:i + 3, j:j + 3], kcodes, 3)
    np.testing.assert_array_equal(got, expected)


def test_int_kernel_carries_the_input_state_into_flax_layers():
    x = jax.random.normal(jax.random.key(11), (2, 6, 6, 3))
    conv = nn.Conv(4, (3, 3), conv_general_dilated=pj.int_conv_general_dilated,
                   promote_dtype=pj.promote_dtype)
    params = nn.Conv(4, (3, 3)).init(jax.random.key(12), x)["params"]
    state = pj.calibrate(x, pj.QuantSpec(8))
    kernel = pj.QuantizedKernel(pj.QuantizedArray.quantize(params["kernel"],
                                                     pj.QuantSpec(8, True, axis=3)), state)
    y = jax.jit(conv.apply)({"params": {**params, "kernel": kernel}}, x)
    xq = pj.QuantizedArray.quantize(x, None, state=state)
    ref = jax.lax.conv_general_dilated(xq.dequantize(), kernel.weights.dequantize(), (1, 1),
                                       "SAME", dimension_numbers=CONV_DN,
                                       precision="highest") + params["bias"]
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_longest_contraction_int32_holds_is_exact_and_one_more_is_rejected():
    """8-bit affine input against 8-bit symmetric weights: |q - z| <= 255 and 128, so
    K = 65793 is the longest contraction whose bracket always fits in int32.  At that
    length, with every product at its extreme (255 * -128), the result is still exact;
    one code more raises instead of wrapping around."""
    k = (2**31 - 1) // (255 * 128)
    assert k == 65793
    ls, rs = pj.QuantSpec(8), pj.QuantSpec(8, symmetric=True, axis=1)
    lhs = qa_from_codes(np.full((1, k), 255), 0.5, 0, ls)  # q - z = 255
    rhs = qa_from_codes(np.full((k, 1), -128), 0.25, 0, rs)  # q = -128
    got = float(pj.int_dot_general(lhs, rhs, DN)[0, 0])
    exact = k * 255 * -128  # -2147483520, 127 from int32's minimum
    assert got == np.float32(np.float32(exact) * np.float32(0.5 * 0.25))
    longer = qa_from_codes(np.full((1, k + 1), 255), 0.5, 0, ls)
    with pytest.raises(ValueError, match=r"K=65794 .* exceed the int32 accumulator"):
        pj.int_dot_general(longer, qa_from_codes(np.zeros((k + 1, 1)), 0.25, 0, rs), DN)
    # symmetric 8-bit on both sides allows 2^31 / 128^2 codes
    sym = pj.QuantSpec(8, symmetric=True)
    ok = qa_from_codes(np.zeros((1, k + 1)), 1.0, 0, sym)
    assert float(pj.int_dot_general(ok, qa_from_codes(np.zeros((k + 1, 1)), 1.0, 0, rs),
                                    DN)[0, 0]) == 0.0


def test_conv_window_too_long_for_int32_is_rejected():
    x = jnp.ones((1, 4, 4, 70000), jnp.float32)  # NHWC: a 1x1 window of 70000 codes
    kernel = jnp.ones((1, 1, 70000, 2), jnp.float32)
    with pytest.raises(ValueError, match="int_conv_general_dilated: contracting K=70000"):
        pj.int_conv_general_dilated(x, kernel, (1, 1), "VALID",
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_unknown_keywords_are_rejected_not_dropped():
    x = jnp.ones((2, 8), jnp.float32)
    w = jnp.ones((8, 3), jnp.float32)
    state = pj.calibrate(x, pj.QuantSpec(bits=8))
    dn = (((1,), (0,)), ((), ()))
    with pytest.raises(TypeError, match="lhs_stat"):
        pj.int_dot_general(x, w, dn, lhs_stat=state)
    with pytest.raises(TypeError, match="rhs_sate"):
        pj.int_conv_general_dilated(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 5)), (1, 1),
                                    "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    rhs_sate=state)
    # the keyword nnx.Linear passes is accepted
    np.testing.assert_array_equal(pj.int_dot_general(x, w, dn, out_sharding=None),
                                  pj.int_dot_general(x, w, dn))
