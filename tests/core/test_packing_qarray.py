"""Packing of low-bit codes and the QuantizedArray pytree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import pychop_jax as pj
from pychop_jax.core import packing

LOW_BIT_SPECS = [pj.QuantSpec(b, s, n) for b in (2, 3, 4) for s in (False, True)
                 for n in ((False, True) if s else (False,))]


@st.composite
def codes_and_spec(draw):
    spec = draw(st.sampled_from(LOW_BIT_SPECS))
    shape = draw(st.sampled_from([(), (1,), (5,), (7,), (8,), (3, 1), (2, 9), (4, 3, 5)]))
    codes = draw(hnp.arrays(spec.code_dtype, shape,
                            elements=st.integers(spec.qmin, spec.qmax)))
    return codes, spec


@settings(max_examples=200)
@given(codes_and_spec())
def test_pack_unpack_round_trip(case):
    codes, spec = case
    packed = packing.pack(codes, spec)
    assert packed.dtype == jnp.uint8
    k = 8 // packing.field_bits(spec)
    n = codes.shape[-1] if codes.ndim else 1
    assert packed.shape[-1] == -(-n // k)  # ceil: 2 (4-bit) or 4 (2-bit) per byte
    out = packing.unpack(packed, spec, codes.shape)
    assert out.dtype == spec.code_dtype and out.shape == codes.shape
    np.testing.assert_array_equal(out, codes)


def test_packing_layout_is_little_endian_fields():
    spec = pj.QuantSpec(bits=4)  # unsigned: fields hold the codes themselves
    np.testing.assert_array_equal(packing.pack(np.array([1, 2, 15], np.uint8), spec),
                                  [0x21, 0x0F])
    spec2 = pj.QuantSpec(bits=2, symmetric=True)  # codes -2..1 stored as q + 2
    np.testing.assert_array_equal(packing.pack(np.array([-2, -1, 0, 1], np.int8), spec2),
                                  [0b11_10_01_00])


def test_packing_errors():
    with pytest.raises(ValueError, match="packing needs bits <= 4"):
        packing.pack(np.zeros(4, np.uint8), pj.QuantSpec(bits=8))
    with pytest.raises(ValueError, match=r"pack into \(2,\)"):
        packing.unpack(jnp.zeros((3,), jnp.uint8), pj.QuantSpec(bits=4), (4,))


X = jax.random.normal(jax.random.key(0), (12, 10))


@pytest.mark.parametrize("spec, packed", [
    (pj.QuantSpec(8, symmetric=True, axis=1), False),
    (pj.QuantSpec(4, symmetric=True, axis=1), True),
    (pj.QuantSpec(3, axis=0), True),
    (pj.QuantSpec(2, axis=1, group_size=5), True),
    (pj.QuantSpec(12), False),
])
def test_quantized_array_matches_ops(spec, packed):
    qa = pj.QuantizedArray.quantize(X, spec)
    assert qa.packed is packed and qa.shape == X.shape and qa.dtype == spec.code_dtype
    state = pj.calibrate(X, spec)
    np.testing.assert_array_equal(qa.unpacked_codes(), pj.quantize(X, state))
    np.testing.assert_array_equal(qa.dequantize(), pj.dequantize(pj.quantize(X, state), state))
    np.testing.assert_array_equal(qa.unpack().dequantize(), qa.dequantize())


def test_nbytes_counts_what_is_stored():
    spec = pj.QuantSpec(4, symmetric=True, axis=1)
    qa = pj.QuantizedArray.quantize(X, spec)
    # 12 x 10 codes, 2 per byte -> 12 x 5 bytes; 10 float32 scales; a symmetric grid's
    # zero point (0) once
    assert qa.nbytes == 12 * 5 + 10 * 4 + 4
    assert qa.unpack().nbytes == 12 * 10 + 10 * 4 + 4
    affine = pj.QuantizedArray.quantize(X, pj.QuantSpec(4, symmetric=False, axis=1))
    assert affine.nbytes == 12 * 5 + 10 * 4 + 10 * 4  # one int32 zero point per scale
    np.testing.assert_array_equal(qa.dequantize(), pj.dequantize(
        pj.quantize(X, pj.calibrate(X, spec)), pj.calibrate(X, spec)))


def test_quantized_array_is_a_pytree():
    qa = pj.QuantizedArray.quantize(X, pj.QuantSpec(4, axis=0))
    leaves, treedef = jax.tree_util.tree_flatten(qa)
    assert len(leaves) == 3  # codes, scale, zero point
    again = jax.tree_util.tree_unflatten(treedef, leaves)
    np.testing.assert_array_equal(again.dequantize(), qa.dequantize())
    np.testing.assert_array_equal(jax.jit(lambda q: q.dequantize())(qa), qa.dequantize())
    blob = serialization.to_bytes({"w": qa})
    target = {"w": jax.tree_util.tree_map(jnp.zeros_like, qa)}
    restored = serialization.from_bytes(target, blob)["w"]
    np.testing.assert_array_equal(restored.codes, qa.codes)
    np.testing.assert_array_equal(restored.dequantize(), qa.dequantize())


def test_quantize_with_given_state_and_pack_flag():
    state = pj.calibrate(X * 2, pj.QuantSpec(4))
    qa = pj.QuantizedArray.quantize(X, None, state=state, pack=False)
    assert not qa.packed
    np.testing.assert_array_equal(qa.codes, pj.quantize(X, state))
    with pytest.raises(ValueError, match="packing needs bits <= 4"):
        pj.QuantizedArray.quantize(X, pj.QuantSpec(8), pack=True)


def test_unpacked_codes_give_their_own_shape_and_packed_codes_need_one():
    x = jnp.linspace(-1.0, 1.0, 24, dtype=jnp.float32).reshape(4, 6)
    state = pj.calibrate(x, pj.QuantSpec(bits=8))
    qa = pj.QuantizedArray(pj.quantize(x, state), state)
    assert qa.shape == (4, 6) and not qa.packed
    np.testing.assert_array_equal(qa.dequantize(), pj.dequantize(qa.codes, state))
    with pytest.raises(ValueError, match="shape="):
        pj.QuantizedArray(jnp.zeros((4, 3), jnp.uint8), state, packed=True)
