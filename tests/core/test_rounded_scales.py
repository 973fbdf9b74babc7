"""``QuantSpec(scale_dtype="float16" / "bfloat16")``: integer grids whose scales are
rounded up onto a 16-bit float grid, stored in that dtype, and used by every op.

References are independent of the code under test: the float32 scale of the documented
formula ``amax * fl(1 / qmax)`` is rounded up to float16 / bfloat16 with ml_dtypes
casts (round-to-nearest) corrected by one ulp of the 16-bit format where the cast fell
below, and codes are recomputed in float64 NumPy.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from array_api_compat import numpy as xnp
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import float_arrays

import pychop_jax as pj
from pychop_jax.core import numerics

torch = pytest.importorskip("torch")
from array_api_compat import torch as xtorch  # noqa: E402

DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def round_up(s32: np.ndarray, name: str) -> np.ndarray:
    """float32 values rounded up onto ``name``'s grid (saturating), via ml_dtypes."""
    dt = DTYPES[name]
    r = s32.astype(dt)  # nearest
    below = r.astype(np.float64) < s32.astype(np.float64)
    bits = r.view(np.uint16).copy()
    bits[below] += 1  # positive values: the next bit pattern is the next value up
    r = bits.view(dt)
    big = float(ml_dtypes.finfo(dt).max)
    return np.minimum(r.astype(np.float64), big).astype(np.float32)


def reference_scale(x: np.ndarray, spec: pj.QuantSpec) -> np.ndarray:
    """Symmetric grid: ``amax * fl32(1 / qmax)`` per block (float32), rounded up."""
    view, axes, _ = numerics.layout(spec, x.shape)
    amax = np.abs(x.reshape(view)).max(axis=axes, keepdims=True).astype(np.float32)
    s32 = amax * np.float32(1.0 / spec.qmax)
    s32 = np.where(amax == 0, np.float32(1.0), s32)
    return round_up(s32, spec.scale_dtype).reshape(spec.scale_shape(x.shape))


def spec(name, bits=4, group=32, **kw):
    return pj.QuantSpec(bits=bits, symmetric=True, axis=0, group_size=group,
                        scale_dtype=name, **kw)


@pytest.mark.parametrize("name", ["float16", "bfloat16"])
def test_calibrated_scale_is_rounded_up_and_never_clips(name):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((128, 24)) * np.exp(rng.uniform(-6, 6, (1, 24)))).astype(np.float32)
    sp = spec(name)
    state = pj.calibrate(x, sp)
    ref = reference_scale(x, sp)
    np.testing.assert_array_equal(np.asarray(state.scale), ref)
    # the scale is on the 16-bit grid and not below the float32 scale
    s = np.asarray(state.scale)
    np.testing.assert_array_equal(s.astype(DTYPES[name]).astype(np.float32), s)
    plain = np.asarray(pj.calibrate(x, pj.QuantSpec(bits=4, symmetric=True, axis=0,
                                                    group_size=32)).scale)
    assert np.all(s >= plain) and np.any(s > plain)
    # codes: float64 reference, and every group's largest value reaches qmax unclipped
    codes = np.asarray(pj.quantize(x, state))
    xv = x.reshape(4, 32, 24).astype(np.float64)
    t = xv / s.reshape(4, 1, 24).astype(np.float64)
    assert np.abs(t).max() <= sp.qmax
    np.testing.assert_array_equal(codes, np.clip(np.round(t), -8, 7).reshape(x.shape))
    assert np.all(np.abs(codes.reshape(4, 32, 24)).max(axis=1) == sp.qmax)
    # fake_quant and dequantize use the same rounded scale
    fq = np.asarray(pj.fake_quant(x, state))
    np.testing.assert_array_equal(fq, (np.round(t) * s.reshape(4, 1, 24)).reshape(x.shape)
                                  .astype(np.float32))
    np.testing.assert_array_equal(np.asarray(pj.dequantize(codes, state)), fq)


def test_saturated_scale_clips():
    """A float16 scale above 65504 saturates; the values beyond then clip to qmax."""
    x = np.array([[1e6], [-3e5], [1.0], [0.0]], np.float32)
    sp = pj.QuantSpec(bits=4, symmetric=True, axis=1, scale_dtype="float16")
    state = pj.calibrate(x, sp)
    assert float(state.scale[0, 0]) == 65504.0
    codes = np.asarray(pj.quantize(x, state)).ravel()
    np.testing.assert_array_equal(codes, [7, -5, 0, 0])  # 1e6 / 65504 = 15.3 -> clipped


@pytest.mark.parametrize("name", ["float16", "bfloat16"])
def test_hand_made_and_affine_states_use_the_rounded_scale(name):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 8)).astype(np.float32)
    sp = spec(name, bits=8)
    raw = np.full(sp.scale_shape(x.shape), 0.0123456, np.float32)
    state = pj.QuantState(jnp.asarray(raw), jnp.zeros(raw.shape, jnp.int32), sp)
    rounded = round_up(raw, name)
    t = x.reshape(2, 32, 8).astype(np.float64) / rounded.reshape(2, 1, 8)
    want = (np.clip(np.round(t), -128, 127) * rounded.reshape(2, 1, 8)).reshape(x.shape)
    np.testing.assert_array_equal(np.asarray(pj.fake_quant(x, state)), want.astype(np.float32))
    # affine grid: the zero point is computed from the rounded scale
    sp_a = pj.QuantSpec(bits=8, axis=1, scale_dtype=name)
    y = (rng.random((50, 3)) * [1.0, 7.0, 300.0] - 0.3).astype(np.float32)
    st_a = pj.calibrate(y, sp_a)
    lo, hi = np.minimum(y.min(0), 0), np.maximum(y.max(0), 0)
    s_ref = round_up((hi - lo).astype(np.float32) * np.float32(1 / 255), name)
    np.testing.assert_array_equal(np.asarray(st_a.scale).ravel(), s_ref)
    z_ref = np.clip(-np.round(lo.astype(np.float64) / s_ref), 0, 255)
    np.testing.assert_array_equal(np.asarray(st_a.zero_point).ravel(), z_ref)


@st.composite
def rounded_case(draw):
    shape = draw(st.sampled_from([(8, 6), (4, 3, 8)]))
    axis = draw(st.sampled_from([a for a in range(len(shape)) if shape[a] % 2 == 0]))
    group = draw(st.sampled_from([None, 2, shape[axis]]))
    sp = pj.QuantSpec(bits=draw(st.integers(2, 8)), symmetric=draw(st.booleans()), axis=axis,
                      group_size=group, scale_dtype=draw(st.sampled_from(list(DTYPES))))
    x = draw(float_arrays(shape, np.float32, subnormal=True, extremes=draw(st.booleans())))
    return x, sp


def bits(a):
    return np.asarray(a).view(np.uint8)


@settings(max_examples=20, deadline=None)
@given(rounded_case())
def test_bit_identical_across_jax_numpy_torch(case):
    x, sp = case
    state = pj.calibrate(x, sp)
    q, fq = pj.quantize(x, state), pj.fake_quant(x, state)
    xt = torch.from_numpy(x.copy())
    for xp, arr, to_np in ((xnp, x, np.asarray), (xtorch, xt, lambda t: t.numpy())):
        s, z = numerics.calibrate(xp, arr, sp)
        np.testing.assert_array_equal(bits(state.scale), bits(to_np(s)))
        np.testing.assert_array_equal(state.zero_point, to_np(z))
        np.testing.assert_array_equal(q, to_np(numerics.quantize(xp, arr, s, z, sp)))
        with np.errstate(over="ignore"):
            np.testing.assert_array_equal(bits(fq), bits(to_np(numerics.fake_quant(xp, arr, s, z,
                                                                                   sp))))
    # the adapters (one jitted XLA kernel) and jit agree too
    from pychop_jax.interop import numpy as inp
    from pychop_jax.interop import torch as itorch
    np_state, t_state = inp.calibrate(x, sp), itorch.calibrate(xt, sp)
    np.testing.assert_array_equal(bits(np_state.scale), bits(state.scale))
    np.testing.assert_array_equal(bits(t_state.scale.numpy()), bits(state.scale))
    np.testing.assert_array_equal(bits(inp.fake_quant(x, np_state)), bits(fq))
    np.testing.assert_array_equal(bits(itorch.fake_quant(xt, t_state).numpy()), bits(fq))
    jitted = jax.jit(lambda a: pj.fake_quant(a, pj.calibrate(a, sp)))(x)
    np.testing.assert_array_equal(bits(jitted), bits(fq))


@pytest.mark.parametrize("name", ["float16", "bfloat16"])
def test_quantized_array_stores_16_bit_scales_and_round_trips(name, tmp_path):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((128, 64)).astype(np.float32)
    sp = spec(name)
    qa = pj.QuantizedArray.quantize(w, sp)
    assert qa.packed and qa.state.scale.dtype == DTYPES[name]
    # 4-bit codes + one 16-bit scale per 32 weights + one int32 zero point
    assert qa.nbytes == 128 * 64 // 2 + 4 * 64 * 2 + 4
    np.testing.assert_array_equal(np.asarray(qa.dequantize()),
                                  np.asarray(pj.fake_quant(w, pj.calibrate(w, sp))))
    path = tmp_path / "w.msgpack"
    size = pj.save_quantized(path, {"w": qa})
    back = pj.load_quantized(path)["w"]
    assert back.state.scale.dtype == DTYPES[name] and back.spec == sp
    np.testing.assert_array_equal(bits(back.state.scale), bits(qa.state.scale))
    np.testing.assert_array_equal(np.asarray(back.codes), np.asarray(qa.codes))
    f32 = pj.save_quantized(tmp_path / "f.msgpack", {"w": pj.QuantizedArray.quantize(
        w, pj.QuantSpec(bits=4, symmetric=True, axis=0, group_size=32))})
    assert size < f32 - 4 * 64 * 2 + 64  # two bytes saved per scale, up to framing


def test_lsq_learns_a_step_applied_rounded():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((64, 4)).astype(np.float32)
    sp = spec("float16", bits=4)
    init = pj.lsq_init(x, sp)
    scale, zp = init.scale, init.zero_point
    state = init
    rounded = round_up(np.asarray(scale), "float16")
    y = pj.fake_quant(x, state, grad="lsq")
    t = x.reshape(2, 32, 4).astype(np.float64) / rounded.reshape(2, 1, 4)
    want = (np.clip(np.round(t), -8, 7) * rounded.reshape(2, 1, 4)).reshape(x.shape)
    np.testing.assert_array_equal(np.asarray(y), want.astype(np.float32))
    g = jax.grad(lambda s: jnp.sum(pj.fake_quant(x, pj.QuantState(s, zp, sp), grad="lsq") ** 2)
                 )(scale)
    assert np.all(np.isfinite(np.asarray(g))) and np.any(np.asarray(g) != 0)


def test_observer_state_and_int_matmul_use_rounded_scales():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((16, 64)).astype(np.float32)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    a_spec = pj.QuantSpec(bits=8, scale_dtype="float16")
    stats = pj.observers.minmax(pj.observers.init(a_spec, x.shape), x, a_spec)
    a_state = pj.observers.quant_state(stats, a_spec)
    np.testing.assert_array_equal(np.asarray(a_state.scale),
                                  np.asarray(pj.calibrate(x, a_spec).scale))
    w_spec = pj.QuantSpec(bits=8, symmetric=True, axis=1, scale_dtype="float16")
    qw = pj.QuantizedArray.quantize(w, w_spec)
    out = pj.int_dot_general(x, qw, (((1,), (0,)), ((), ())), lhs_state=a_state)
    ref = np.asarray(pj.fake_quant(x, a_state)).astype(np.float64) @ np.asarray(
        qw.dequantize()).astype(np.float64)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-4)


def test_spec_errors_for_rounded_scales():
    with pytest.raises(ValueError, match="integer grid"):
        pj.QuantSpec(dtype="float8_e4m3fn", scale_dtype="bfloat16")
    with pytest.raises(ValueError, match="scale_rounding"):
        pj.QuantSpec(bits=4, symmetric=True, scale_dtype="float16", scale_rounding="ceil")
