"""Float element grids (fp8 / fp6 / fp4, NF4) and block scales (E8M0, two-level NVFP4).

References are independent of the code under test: ml_dtypes casts, grids enumerated
from ml_dtypes' codes, float64 NumPy, the OCP MX v1.0 rule written out with
``math.frexp``, and the NF4 constants as published.
"""

import dataclasses
import functools
import math

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
from pychop_jax.core import blockscale, encodings, numerics

F = pj.formats
FLOAT_NAMES = ["float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
               "float6_e2m3fn", "float6_e3m2fn", "float4_e2m1fn"]

# QLoRA appendix E / bitsandbytes create_normal_map, as published
NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
       -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
       0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
       0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]


def grid(name):
    """Every finite value of an ml_dtypes format, sorted, as float64."""
    dt = getattr(ml_dtypes, name)
    bits = 6 if name.startswith("float6") else 4 if name.startswith("float4") else 8
    v = np.arange(1 << bits, dtype=np.uint8).view(dt).astype(np.float64)
    return np.unique(v[np.isfinite(v)])


def values(codes, spec):
    """Float64 values of codes (fp6 codes are uint8 bit patterns)."""
    c = np.asarray(codes)
    if spec.dtype == "nf4":
        return np.asarray(NF4)[c.astype(int)]
    if c.dtype == np.uint8:
        c = c.view(getattr(ml_dtypes, spec.dtype))
    return c.astype(np.float64)


def rand(shape, seed=0, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


# -- the spec ---------------------------------------------------------------------------------
def test_integer_specs_unchanged():
    a = pj.QuantSpec(bits=8)
    assert a == pj.QuantSpec(bits=8) and hash(a) == hash(pj.QuantSpec(bits=8))
    assert (a.dtype, a.scale_dtype, a.is_float) == (None, None, False)
    assert pj.QuantSpec(dtype="int8") == pj.QuantSpec(bits=8, symmetric=True)
    assert pj.QuantSpec(dtype="uint4") == pj.QuantSpec(bits=4)
    assert pj.QuantSpec(dtype=np.int8) == pj.QuantSpec(bits=8, symmetric=True)


@pytest.mark.parametrize("name", FLOAT_NAMES)
def test_float_spec_fields(name):
    spec = pj.QuantSpec(dtype=name)
    assert spec.symmetric and spec.is_float
    assert spec.max_value == float(grid(name)[-1])
    assert spec.emax_elem == math.floor(math.log2(spec.max_value))
    assert pj.QuantSpec(dtype=getattr(ml_dtypes, name)) == spec
    with pytest.raises(ValueError, match="no qmax"):
        spec.qmax  # noqa: B018


def test_emax_elem_of_the_ocp_formats():
    # OCP MX v1.0 table 1: emax of e4m3 8, e5m2 15, e2m3 2, e3m2 4, e2m1 2; MXINT8 scale 2^-6
    got = {k: F.PRESETS[k].emax_elem for k in F.PRESETS}
    assert got == {"MXFP8_E4M3": 8, "MXFP8_E5M2": 15, "MXFP6_E2M3": 2, "MXFP6_E3M2": 4,
                   "MXFP4": 2, "MXINT8": 6, "NVFP4": 2, "NF4": 0}


def test_presets():
    assert F.MXFP4.group_size == 32 and F.MXFP4.axis == -1
    assert F.NVFP4.group_size == 16 and F.NVFP4.scale_dtype == "float8_e4m3fn"
    assert F.NF4.group_size == 64 and F.NF4.dtype == "nf4"
    assert F.MXINT8.narrow_range and F.MXINT8.bits == 8
    moved = dataclasses.replace(F.MXFP8_E4M3, axis=0)
    assert moved.axis == 0 and moved.scale_dtype == "float8_e8m0fnu"


@pytest.mark.parametrize("kwargs, match", [
    (dict(dtype="float8"), "not a known element format"),
    (dict(dtype="float32"), "not a known element format"),
    (dict(dtype="float8_e4m3fn", bits=4), "8-bit codes"),
    (dict(dtype="float4_e2m1fn", narrow_range=True), "narrow_range applies to integer"),
    (dict(dtype="float8_e4m3fn", scale_dtype="float16"), "scale_dtype"),
    (dict(dtype="float8_e4m3fn", scale_rounding="ceil"), "power-of-two scales only"),
    (dict(dtype="float8_e4m3fn", scale_dtype="float8_e8m0fnu", scale_rounding="up"),
     "scale_rounding"),
    (dict(bits=8, scale_dtype="float8_e8m0fnu"), "symmetric"),
    (dict(dtype="int8", bits=4), "8 bits"),
])
def test_spec_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pj.QuantSpec(**kwargs)


# -- per-tensor fp8 against ml_dtypes casts -------------------------------------------------
@pytest.mark.parametrize("name", ["float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                                  "float8_e5m2fnuz"])
@pytest.mark.parametrize("scale", [2.0**-3, 0.0123])
def test_fp8_quantize_matches_ml_dtypes_cast(name, scale):
    spec = pj.QuantSpec(dtype=name)
    fmax = spec.max_value
    x = rand((64, 33), seed=1) * np.float32(scale * fmax / 5)
    x = np.clip(x, -0.99 * scale * fmax, 0.99 * scale * fmax).astype(np.float32)
    state = pj.QuantState(jnp.full((1, 1), scale, jnp.float32), jnp.zeros((1, 1), jnp.int32),
                          spec)
    q = np.asarray(pj.quantize(x, state))
    # the contract's order: t = x * fl(1 / scale), then a round-to-nearest-even cast
    t = x * (np.float32(1) / np.float32(scale))
    ref = t.astype(getattr(ml_dtypes, name))
    assert q.dtype == ref.dtype
    np.testing.assert_array_equal(q.view(np.uint8), ref.view(np.uint8))
    xhat = np.asarray(pj.dequantize(q, state))
    np.testing.assert_array_equal(xhat, ref.astype(np.float32) * np.float32(scale))


@pytest.mark.parametrize("name", FLOAT_NAMES)
def test_per_channel_codes_are_nearest_grid_values(name):
    spec = pj.QuantSpec(dtype=name, axis=0)
    x = rand((6, 50), seed=2) * 3
    state = pj.calibrate(x, spec)
    scale = np.asarray(state.scale, np.float64)
    # scale = amax * fl(1 / max_value)
    amax = np.abs(x).max(axis=1, keepdims=True)
    want = amax * (np.float32(1) / np.float32(spec.max_value))
    np.testing.assert_array_equal(np.asarray(state.scale), want.astype(np.float32))
    v = values(pj.quantize(x, state), spec)
    t = x.astype(np.float64) * (1 / scale.astype(np.float32)).astype(np.float64)
    g = grid(name)
    dist = np.abs(t[..., None] - g).min(axis=-1)
    inside = np.abs(t) <= g[-1]
    assert np.all(np.abs(t - v)[inside] <= dist[inside])
    assert np.all(v[~inside] == np.sign(t[~inside]) * g[-1])


# -- MX: E8M0 shared exponents --------------------------------------------------------------
def ocp_exponent(amax, emax_elem):
    """OCP MX v1.0: floor(log2(amax)) - emax_elem, clamped (zero blocks: the minimum)."""
    if amax == 0:
        return -126
    return min(max(math.frexp(amax)[1] - 1 - emax_elem, -126), 127)


@pytest.mark.parametrize("name", ["MXFP8_E4M3", "MXFP8_E5M2", "MXFP6_E2M3", "MXFP6_E3M2",
                                  "MXFP4", "MXINT8"])
def test_mx_scales_are_ocp_powers_of_two(name):
    spec = F.PRESETS[name]
    x = rand((4, 128), seed=3) * np.exp2(np.random.default_rng(4).integers(-8, 8, (4, 128)))
    x = x.astype(np.float32)
    x[1, 32:64] = 0.0  # a zero block
    state = pj.calibrate(x, spec)
    scale = np.asarray(state.scale, np.float64)
    mant, _ = np.frexp(scale)
    assert np.all(mant == 0.5)  # powers of two
    amax = np.abs(x.reshape(4, 4, 32)).max(-1)
    want = np.array([[2.0 ** ocp_exponent(float(a), spec.emax_elem) for a in row] for row in amax])
    np.testing.assert_array_equal(scale, want)
    # per-block bound: nearest grid value at the block's scale, or clipped to max
    xhat = np.asarray(pj.dequantize(pj.quantize(x, state), state), np.float64)
    t = x.reshape(4, 4, 32) / scale[..., None]
    v = xhat.reshape(4, 4, 32) / scale[..., None]
    g = (np.arange(-127, 128, dtype=np.float64) if name == "MXINT8"
         else grid(spec.dtype))
    dist = np.abs(t[..., None] - g).min(-1)
    inside = np.abs(t) <= g[-1]
    assert np.all(np.abs(t - v)[inside] <= dist[inside])
    np.testing.assert_array_equal(v[~inside], np.sign(t[~inside]) * g[-1])


def test_ocp_examples_mxfp4():
    x = np.zeros((2, 32), np.float32)
    x[0, :3] = [6.0, -3.0, 0.5]
    x[1, :3] = [7.0, 1.0, -0.25]
    state = pj.calibrate(x, F.MXFP4)
    np.testing.assert_array_equal(np.asarray(state.scale), [[1.0], [1.0]])  # 2^(2 - 2)
    xhat = np.asarray(pj.fake_quant(x, state))
    np.testing.assert_array_equal(xhat[0, :3], [6.0, -3.0, 0.5])
    np.testing.assert_array_equal(xhat[1, :3], [6.0, 1.0, 0.0])  # 7 clips; -0.25 ties to 0
    up = pj.calibrate(x, dataclasses.replace(F.MXFP4, scale_rounding="ceil"))
    np.testing.assert_array_equal(np.asarray(up.scale), [[1.0], [2.0]])
    xhat = np.asarray(pj.fake_quant(x, up))
    np.testing.assert_array_equal(xhat[1, :3], [8.0, 1.0, 0.0])  # 3.5 ties to even 4


def test_ocp_examples_mxfp8_and_mxint8():
    x = np.zeros((1, 32), np.float32)
    x[0, :2] = [448.0, 1.0]
    assert float(pj.calibrate(x, F.MXFP8_E4M3).scale.ravel()[0]) == 1.0
    x[0, :2] = [1.5, -0.75]
    st = pj.calibrate(x, F.MXINT8)
    assert float(st.scale.ravel()[0]) == 2.0**-6  # X = 2^0, elements int8 * 2^-6
    np.testing.assert_array_equal(np.asarray(pj.quantize(x, st))[0, :2], [96, -48])


@given(st.floats(0, 2.0**127, width=32, allow_subnormal=False), st.sampled_from(list(F.PRESETS)))
@settings(max_examples=40)
def test_ceil_scale_never_clips_and_is_smallest(a, name):
    spec = F.PRESETS[name]
    amax = jnp.asarray([a], jnp.float32)
    k = int(blockscale.mx_shared_exponent(jnp, amax, spec.emax_elem, rounding="ceil",
                                          max_value=spec.max_value)[0])
    if a == 0 or k in (-126, 127):
        return
    assert a <= spec.max_value * 2.0**k
    assert a > spec.max_value * 2.0 ** (k - 1)


def test_e8m0_codes_match_ml_dtypes():
    k = np.arange(-126, 128, dtype=np.int32)
    s = blockscale.pow2(xnp, k, np.zeros((), np.float32))
    codes = blockscale.e8m0_encode(xnp, s)
    np.testing.assert_array_equal(codes, s.astype(ml_dtypes.float8_e8m0fnu).view(np.uint8))
    np.testing.assert_array_equal(blockscale.e8m0_decode(xnp, codes, s), s)


# -- NVFP4 ------------------------------------------------------------------------------------
def test_nvfp4_two_level_scales():
    x = rand((4, 64), seed=5) * np.float32(3)
    x[2, :16] *= 1e-3  # a small block
    state = pj.calibrate(x, F.NVFP4)
    amax = float(np.abs(x).max())
    ts = float(np.asarray(state.tensor_scale).ravel()[0])
    assert np.asarray(state.tensor_scale).shape == (1, 1)
    assert ts == np.float32(amax) * (np.float32(1) / np.float32(448 * 6))
    s = np.asarray(state.scale)
    assert s.shape == (4, 4)
    # block scales lie on the e4m3 grid, and are e4m3(amax_b / 6 / ts) (nearest)
    np.testing.assert_array_equal(s.astype(ml_dtypes.float8_e4m3fn).astype(np.float32), s)
    u = np.abs(x.reshape(4, 4, 16)).max(-1) * (np.float32(1) / np.float32(6))
    want = (u * (np.float32(1) / np.float32(ts))).astype(ml_dtypes.float8_e4m3fn)
    np.testing.assert_array_equal(s, np.maximum(want.astype(np.float32), 2.0**-9))
    assert s.max() <= 448
    # values: fp4 grid at the effective scale fl(s_b * s_t)
    eff = (s * np.float32(ts)).astype(np.float32)
    xhat = np.asarray(pj.fake_quant(x, state)).reshape(4, 4, 16)
    v = xhat / eff[..., None]
    assert np.all(np.isin(np.abs(v), grid("float4_e2m1fn")))
    q = pj.quantize(x, state)
    assert q.dtype == jnp.float4_e2m1fn
    np.testing.assert_array_equal(np.asarray(pj.dequantize(q, state)), xhat.reshape(4, 64))


def test_two_level_state_needs_its_tensor_scale():
    x = rand((2, 16))
    state = pj.calibrate(x, F.NVFP4).replace(tensor_scale=None)
    with pytest.raises(ValueError, match="tensor_scale"):
        pj.fake_quant(x, state)


# -- NF4 --------------------------------------------------------------------------------------
def test_nf4_table_and_codes():
    np.testing.assert_array_equal(pj.core.spec.NF4_VALUES, np.asarray(NF4, np.float32))
    x = rand((3, 128), seed=6)
    spec = F.NF4
    state = pj.calibrate(x, spec)
    amax = np.abs(x.reshape(3, 2, 64)).max(-1)
    np.testing.assert_array_equal(np.asarray(state.scale), amax)  # max_value 1
    q = np.asarray(pj.quantize(x, state))
    assert q.dtype == np.uint8 and q.max() <= 15
    t = x.reshape(3, 2, 64).astype(np.float64) / amax[..., None].astype(np.float64)
    d = np.abs(t[..., None] - np.asarray(NF4))
    nearest = d.argmin(-1).reshape(3, 128)
    sorted_d = np.sort(d, -1)
    clear = (sorted_d[..., 1] - sorted_d[..., 0] > 1e-6).reshape(3, 128)
    np.testing.assert_array_equal(q[clear], nearest[clear])
    xhat = np.asarray(pj.dequantize(q, state))
    want = (np.asarray(NF4, np.float32)[q].reshape(3, 2, 64) * amax[..., None]).reshape(3, 128)
    np.testing.assert_array_equal(xhat, want)


def test_nf4_rejects_stochastic_rounding():
    state = pj.calibrate(rand((1, 64)), F.NF4)
    with pytest.raises(ValueError, match="nf4 rounds to the nearest"):
        pj.quantize(rand((1, 64)), state, key=jax.random.key(0))


# -- round trips, stochastic rounding, non-finite values ---------------------------------------
@pytest.mark.parametrize("name", list(F.PRESETS))
def test_round_trip_and_fake_quant_agree(name):
    spec = F.PRESETS[name]
    x = rand((4, 128), seed=7)
    state = pj.calibrate(x, spec)
    y = np.asarray(pj.fake_quant(x, state))
    np.testing.assert_array_equal(np.asarray(pj.dequantize(pj.quantize(x, state), state)), y)
    np.testing.assert_array_equal(np.asarray(jax.jit(pj.fake_quant)(x, state)), y)
    qa = pj.QuantizedArray.quantize(x, spec)
    np.testing.assert_array_equal(np.asarray(qa.dequantize()), y)
    if qa.packed:
        np.testing.assert_array_equal(np.asarray(qa.unpack().pack().dequantize()), y)
    # fake_quant is idempotent on the same state
    np.testing.assert_array_equal(np.asarray(pj.fake_quant(y, state)), y)


def test_quantized_array_bytes():
    x = rand((8, 256))
    n = x.size
    assert pj.QuantizedArray.quantize(x, F.MXFP4).nbytes == n // 2 + n // 32 + 4
    assert pj.QuantizedArray.quantize(x, F.NVFP4).nbytes == n // 2 + n // 16 + 4 + 4
    assert pj.QuantizedArray.quantize(x, F.MXFP6_E2M3).nbytes == 3 * n // 4 + n // 32 + 4
    assert pj.QuantizedArray.quantize(x, F.MXFP8_E4M3).nbytes == n + n // 32 + 4
    assert pj.QuantizedArray.quantize(x, F.NF4).nbytes == n // 2 + 4 * n // 64 + 4


@pytest.mark.parametrize("name", ["float8_e4m3fn", "float4_e2m1fn", "float6_e3m2fn"])
def test_stochastic_rounding_is_unbiased(name):
    spec = pj.QuantSpec(dtype=name)
    g = grid(name)
    x = np.full((4096,), (g[-3] + g[-2]) * 0.5 + (g[-2] - g[-3]) * 0.2, np.float32)
    state = pj.QuantState(jnp.ones((1,)), jnp.zeros((1,), jnp.int32), spec)
    v = values(pj.quantize(x, state, key=jax.random.key(1)), spec)
    assert set(np.unique(v)) <= {g[-3], g[-2]}
    p_up = (x[0] - g[-3]) / (g[-2] - g[-3])
    assert abs((v == g[-2]).mean() - p_up) < 0.05
    y = np.asarray(pj.fake_quant(x, state, key=jax.random.key(1)))
    np.testing.assert_array_equal(y, v.astype(np.float32))


def test_nonfinite_under_jit():
    x = jnp.asarray([np.nan, np.inf, -np.inf, 1.0], jnp.float32)
    state = pj.QuantState(jnp.ones((1,)), jnp.zeros((1,), jnp.int32), pj.QuantSpec(
        dtype="float8_e4m3fn"))
    y = np.asarray(jax.jit(pj.fake_quant)(x, state))
    np.testing.assert_array_equal(y, [0.0, 448.0, -448.0, 1.0])
    with pytest.raises(ValueError, match="NaN"):
        pj.quantize(x, state)


# -- errors -----------------------------------------------------------------------------------
def test_errors():
    x = rand((4, 48))
    with pytest.raises(ValueError, match="multiple of group_size=32"):
        pj.calibrate(x, F.MXFP4)
    with pytest.raises(TypeError, match="floating-point"):
        pj.calibrate(np.ones((4, 32), np.int32), F.MXFP4)
    state = pj.calibrate(x[:, :32], F.MXFP8_E4M3)
    with pytest.raises(TypeError, match="float8_e4m3fn codes"):
        pj.dequantize(np.ones((4, 32), np.int8), state)
    with pytest.raises(ValueError, match="LSQ"):
        pj.lsq_init(x, pj.QuantSpec(dtype="float8_e4m3fn"))
    with pytest.raises(ValueError, match="LSQ"):
        pj.fake_quant(x[:, :32], state, grad="lsq")
    with pytest.raises(ValueError, match="calibrate_state"):
        numerics.calibrate(xnp, x[:, :16], F.NVFP4)


# -- backends ---------------------------------------------------------------------------------
torch = pytest.importorskip("torch")
from array_api_compat import torch as xtorch  # noqa: E402

BACKEND_SPECS = [F.MXFP8_E4M3, F.MXFP6_E3M2, F.MXFP4, F.MXINT8, F.NVFP4, F.NF4,
                 pj.QuantSpec(dtype="float8_e5m2", axis=0),
                 dataclasses.replace(F.MXFP4, scale_rounding="ceil", axis=0)]


def as_bits(a):
    if hasattr(a, "numpy"):  # torch
        a = a.view(torch.uint8) if a.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else a
        a = a.numpy()
    a = np.asarray(a)
    return a.view(np.uint8) if a.dtype.itemsize == 1 else a.view(f"u{a.dtype.itemsize}")


@functools.partial(jax.jit, static_argnames="spec")
def jitted_fake_quant(x, s, z, t, noise, spec):
    return numerics.fake_quant(jnp, x, s, z, spec, noise=noise, tensor_scale=t)


@given(st.sampled_from(range(len(BACKEND_SPECS))),
       float_arrays((32, 64), subnormal=True, extremes=False), st.booleans())
@settings(max_examples=20)
def test_backends_bit_identical(i, x, stochastic):
    spec = BACKEND_SPECS[i]
    xt = torch.from_numpy(x.copy())
    s, z, t = numerics.calibrate_state(jnp, jnp.asarray(x), spec)
    s_np, z_np, t_np = numerics.calibrate_state(xnp, x, spec)
    s_t, z_t, t_t = numerics.calibrate_state(xtorch, xt, spec)
    assert (as_bits(s) == as_bits(s_np)).all() and (as_bits(s) == as_bits(s_t)).all()
    noise = None
    if stochastic and spec.dtype != "nf4":
        noise = np.random.default_rng(0).integers(0, 2**32, x.shape, dtype=np.uint32)
    n_t = None if noise is None else torch.from_numpy(noise.astype(np.int64))
    kw = dict(tensor_scale=t)
    outs = {
        "jit": jitted_fake_quant(x, s, z, t, noise, spec),
        "eager": numerics.fake_quant(jnp, jnp.asarray(x), s, z, spec, noise=noise, **kw),
        "numpy": numerics.fake_quant(xnp, x, s_np, z_np, spec, noise=noise, tensor_scale=t_np),
        "torch": numerics.fake_quant(xtorch, xt, s_t, z_t, spec, noise=n_t, tensor_scale=t_t),
    }
    ref = as_bits(outs.pop("jit"))
    for name, out in outs.items():
        np.testing.assert_array_equal(as_bits(out), ref, err_msg=name)
    q = as_bits(numerics.quantize(jnp, jnp.asarray(x), s, z, spec, noise=noise, **kw))
    np.testing.assert_array_equal(
        as_bits(numerics.quantize(xnp, x, s_np, z_np, spec, noise=noise, tensor_scale=t_np)), q)
    # torch has no fp4 dtype: its fp4 codes are the same bit patterns as uint8
    qt = numerics.quantize(xtorch, xt, s_t, z_t, spec, noise=n_t, tensor_scale=t_t)
    np.testing.assert_array_equal(as_bits(qt), q)


@pytest.mark.parametrize("spec", [F.MXFP8_E4M3, F.NVFP4, F.NF4, F.MXFP6_E2M3])
def test_adapters_give_the_same_bits(spec):
    from pychop_jax.interop import numpy as pjnp
    from pychop_jax.interop import torch as pjt

    x = rand((8, 64), seed=9) * 5
    state = pj.calibrate(x, spec)
    q = as_bits(pj.quantize(x, state))
    y = as_bits(pj.fake_quant(x, state))
    for fw, conv in ((pjnp.FRAMEWORK, np.asarray), (pjnp.FRAMEWORK.portable(), np.asarray),
                     (pjt.FRAMEWORK, torch.from_numpy), (pjt.FRAMEWORK.portable(),
                                                         torch.from_numpy)):
        xs = conv(x.copy())
        s2 = fw.calibrate(xs, spec)
        assert (as_bits(s2.scale) == as_bits(state.scale)).all()
        np.testing.assert_array_equal(as_bits(fw.fake_quant(xs, s2)), y)
        q2 = fw.quantize(xs, s2)
        if fw.name == "torch" and spec.dtype == "float4_e2m1fn":
            # no fp4 dtype in torch: uint8 holding the fp4 bit pattern (ml_dtypes' layout,
            # the low nibble), i.e. the JAX codes' bits; dequantize takes them back
            assert q2.dtype == torch.uint8
            np.testing.assert_array_equal(q2.numpy(), q)  # ml_dtypes' float4 byte = uint8
            assert int(q2.max()) < 16
            with pytest.raises(TypeError, match="uint8 bit patterns"):
                fw.dequantize(q2.to(torch.int8), s2)
        else:
            np.testing.assert_array_equal(as_bits(q2), q)
        np.testing.assert_array_equal(as_bits(fw.dequantize(q2, s2)), y)


# -- the stateless MX value rule (blockscale.mx_fake_quant; pychop.mx_quantize runs it) -----------
MX_NAMES = ["MXFP8_E4M3", "MXFP8_E5M2", "MXFP6_E2M3", "MXFP6_E3M2", "MXFP4", "MXINT8"]


def ref_mx_values(x, spec):
    """OCP MX v1.0 in float64, block by block along the last axis: the shared exponent by
    ``math.frexp`` (clamped to E8M0's -127..127; NaN / inf blocks and exponents > 127:
    NaN), elements by ml_dtypes' cast after clipping, MXINT8 by ``np.rint`` in [-127, 127]."""
    xb = x.astype(np.float64).reshape(-1, spec.group_size)
    out = np.empty_like(xb)
    for i, b in enumerate(xb):
        amax = np.max(np.abs(b))
        if not np.isfinite(amax):
            out[i] = np.nan
            continue
        e = math.frexp(amax)[1] - 1 - spec.emax_elem if amax > 0 else -127
        if e > 127:
            out[i] = np.nan
            continue
        e = max(e, -127)
        v = b / 2.0**e
        if spec.dtype is None:
            p = np.clip(np.rint(v), -127, 127)
        else:
            m = spec.max_value
            p = np.clip(v, -m, m).astype(getattr(ml_dtypes, spec.dtype)).astype(np.float64)
        out[i] = p * 2.0**e
    return out.reshape(x.shape).astype(x.dtype)


@pytest.mark.parametrize("name", MX_NAMES)
def test_mx_fake_quant_matches_the_ocp_reference_on_every_backend(name):
    spec = F.PRESETS[name]
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((6, 64)) * np.exp2(rng.integers(-8, 8, (6, 64)))).astype(np.float32)
    x[1, :32] = rng.standard_normal(32) * 2.0**-135  # float32 subnormals: scale 2^-127
    x[2, :32] = rng.standard_normal(32) * 2.0**-122  # results below float32's normals
    x[3, :32] = 0.0
    x[4, 5] = np.nan
    x[5, 40] = -np.inf
    want = ref_mx_values(x, spec)
    assert np.all(np.isnan(want[4, :32])) and np.all(np.isnan(want[5, 32:]))
    got = jax.jit(lambda v: blockscale.mx_fake_quant(jnp, v, spec))(jnp.asarray(x))
    np.testing.assert_array_equal(as_bits(got), as_bits(want))
    np.testing.assert_array_equal(as_bits(blockscale.mx_fake_quant(xnp, x, spec)), as_bits(want))
    got_t = blockscale.mx_fake_quant(xtorch, torch.from_numpy(x.copy()), spec)
    np.testing.assert_array_equal(as_bits(got_t), as_bits(want))
    x64 = x.astype(np.float64) * 2.0**200  # float64: exponents above 127 -> NaN blocks
    np.testing.assert_array_equal(as_bits(blockscale.mx_fake_quant(xnp, x64, spec)),
                                  as_bits(ref_mx_values(x64, spec)))


@pytest.mark.parametrize("name", MX_NAMES)
@pytest.mark.parametrize("axis", [-1, 0])
def test_mx_fake_quant_is_the_state_path_on_normal_data(name, axis):
    """On finite data whose blocks stay in float32's normal range, the stateless rule and
    calibrate + fake_quant are the same quantizer (one shared exponent, one grid); they
    differ in the sign of zero only (the state path writes +0.0 below ``tiny``)."""
    spec = dataclasses.replace(F.PRESETS[name], axis=axis)
    x = rand((64, 96), seed=11) * 7
    want = np.asarray(pj.fake_quant(x, pj.calibrate(x, spec)))
    got = jax.jit(lambda v: blockscale.mx_fake_quant(jnp, v, spec))(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(got), want)  # -0.0 == +0.0
    ref = ref_mx_values(np.moveaxis(x, axis, -1).copy(), dataclasses.replace(spec, axis=-1))
    np.testing.assert_array_equal(as_bits(got), as_bits(np.moveaxis(ref, -1, axis)))


def test_mx_fake_quant_errors():
    x = np.ones((2, 32), np.float32)
    with pytest.raises(ValueError, match="float8_e8m0fnu"):
        blockscale.mx_fake_quant(xnp, x, F.NVFP4)
    with pytest.raises(ValueError, match="float8_e8m0fnu"):
        blockscale.mx_fake_quant(xnp, x, pj.QuantSpec(dtype="float8_e4m3fn"))
    with pytest.raises(TypeError, match="float32 / float64"):
        blockscale.mx_fake_quant(xnp, x.astype(np.float16), F.MXFP4)


@pytest.mark.parametrize("spec", [pj.QuantSpec(dtype="float8_e4m3fn"), F.MXFP4, F.MXFP6_E3M2,
                                  F.NF4])
def test_codes_as_bits_are_the_ml_dtypes_bytes(spec):
    """The uint8 form of codes (Torch's fp4 codes): ml_dtypes' storage byte of each code,
    decoded back to the same values by dequantize, in JAX and NumPy."""
    x = rand((4, 64), seed=11) * 3
    state = pj.calibrate(x, spec)
    q = pj.quantize(x, state)
    bits = encodings.codes_as_bits(jnp, q, spec)
    assert bits.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(bits), np.asarray(q).view(np.uint8))
    assert int(bits.max()) < 2 ** spec.bits
    s, z = np.asarray(state.scale), np.asarray(state.zero_point)
    for xp, b in ((jnp, bits), (xnp, np.asarray(bits))):
        np.testing.assert_array_equal(as_bits(numerics.dequantize(xp, b, s, z, spec)),
                                      as_bits(pj.dequantize(q, state)))
