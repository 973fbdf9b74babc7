"""Tests of pychop's float emulators (pychop.floats): Chop, Chopf, mx_quantize.

References, independent of the code under test:

* float formats: a table of every finite value of the format, decoded field by field into
  float64 (``grid``), searched for the two neighbours of x; each rounding mode picks one
  by its rule (written here, ``ref_chop``); IEEE 754 overflow;
* fixed point: float64 arithmetic on ``x * 2**fbits`` (exact for the test inputs);
* MX: per block in float64 (``ref_mx``): ``floor(log2(amax))`` from ``np.frexp``, the
  element rounding by ml_dtypes' casts after clipping (saturation), MXINT8 by ``np.rint``;
* pychop 0.6.2's own outputs, recorded as constants where it follows the spec.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pychop
from pychop import MX_FORMATS, Chop, Chopf, mx_quantize
from pychop_jax.interop import formats, framework_named

# Outputs of pychop 0.6.2 (pip install pychop==0.6.2 into a separate virtualenv, run there;
# recorded here, not computed by the code under test), for inputs where pychop follows
# the spec (no overflow, no NaN / inf).
PYCHOP_X = [0.001, -3.14159265, 2.718281828, 1234.5678, -0.0999, 6.1e-05, -3e-06, 60000.0,
            0.33333333, -777.77]
# Chop(5, 10, rmode=r)(np.array(PYCHOP_X))
PYCHOP_CHOP = {1: [0.0010004043579101562, -3.140625, 2.71875, 1235.0, -0.09991455078125,
                   6.097555160522461e-05, -2.9802322387695312e-06, 60000.0, 0.333251953125,
                   -778.0],
               2: [0.0010004043579101562, -3.140625, 2.71875, 1235.0, -0.099853515625,
                   6.103515625e-05, -2.9802322387695312e-06, 60000.0, 0.33349609375, -777.5],
               3: [0.00099945068359375, -3.142578125, 2.716796875, 1234.0, -0.09991455078125,
                   6.097555160522461e-05, -3.039836883544922e-06, 60000.0, 0.333251953125,
                   -778.0],
               4: [0.00099945068359375, -3.140625, 2.716796875, 1234.0, -0.099853515625,
                   6.097555160522461e-05, -2.9802322387695312e-06, 60000.0, 0.333251953125,
                   -777.5]}
PYCHOP_FX = [0.03125, 0.09375, -0.09375, 0.1, -0.1, 3.3, -7.99, 100.0, -100.0]
# Chopf(4, 4, rmode=r)(np.array(PYCHOP_FX))
PYCHOP_CHOPF = {1: [0.0, 0.125, -0.125, 0.125, -0.125, 3.3125, -8.0, 7.9375, -8.0],
                2: [0.0625, 0.125, -0.0625, 0.125, -0.0625, 3.3125, -7.9375, 7.9375, -8.0],
                3: [0.0, 0.0625, -0.125, 0.0625, -0.125, 3.25, -8.0, 7.9375, -8.0],
                4: [0.0, 0.0625, -0.0625, 0.0625, -0.0625, 3.25, -7.9375, 7.9375, -8.0]}
# float32: rng = np.random.default_rng(7)
# rng.standard_normal(64) * np.exp2(rng.integers(-6, 6, 64))
PYCHOP_MX_X = [0.00030753834289498627, 0.01867159642279148, -0.004283403977751732,
               -0.22264796495437622, -3.63736629486084, -0.03098895400762558, 0.01503590028733015,
               42.88688659667969, -15.750608444213867, -0.03877967968583107, 0.007653782144188881,
               1.4275480508804321, 0.001647097640670836, -0.11630850285291672,
               -0.014625911600887775, 11.12485122680664, -0.042006704956293106,
               -0.9152315258979797, -1.9012227058410645, -0.04029805585741997, -29.46776008605957,
               -3.761458158493042, -0.633723258972168, 8.680459022521973, 0.31350216269493103,
               -2.9908950328826904, -80.53630828857422, -0.5386928915977478, -0.006062617991119623,
               0.0035409058909863234, -1.5301357507705688, -0.029859580099582672,
               -7.828152656555176, -25.88279151916504, 0.06630616635084152, -0.8075346946716309,
               -0.0005081516574136913, 0.055274367332458496, -0.14590011537075043,
               -1.787231206893921, 3.5348525047302246, 0.12756355106830597, -2.4501116275787354,
               0.07614023238420486, 0.02123161591589451, -0.38678616285324097, 27.500246047973633,
               0.029838506132364273, -0.040091898292303085, 0.12502603232860565, 3.049038887023926,
               -0.018738888204097748, 2.384519338607788, 9.227033615112305, -0.18878212571144104,
               0.3414551317691803, -0.5321385860443115, 0.6672475337982178, 0.7192612886428833,
               -0.08445778489112854, 0.10156930238008499, -3.70646071434021, 0.0019885690417140722,
               -0.01854991540312767]
# mx_quantize(np.array(PYCHOP_MX_X, np.float32), name)
PYCHOP_MX = {'mxfp4_e2m1': [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 48.0, -16.0, 0.0, 0.0, 0.0, 0.0,
                            0.0, 0.0, 8.0, 0.0, 0.0, 0.0, 0.0, -32.0, 0.0, 0.0, 8.0, 0.0, 0.0,
                            -96.0, 0.0, 0.0, 0.0, 0.0, 0.0, -8.0, -24.0, 0.0, 0.0, 0.0, 0.0, 0.0,
                            -2.0, 4.0, 0.0, -2.0, 0.0, 0.0, 0.0, 24.0, 0.0, 0.0, 0.0, 4.0, 0.0,
                            2.0, 8.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -4.0, 0.0, 0.0],
             'mxfp6_e2m3': [0.0, 0.0, 0.0, 0.0, -4.0, 0.0, 0.0, 44.0, -16.0, 0.0, 0.0, 2.0, 0.0,
                            0.0, 0.0, 12.0, 0.0, 0.0, -2.0, 0.0, -30.0, -4.0, 0.0, 8.0, 0.0, -2.0,
                            -80.0, 0.0, 0.0, 0.0, -2.0, 0.0, -8.0, -26.0, 0.0, -1.0, 0.0, 0.0, 0.0,
                            -2.0, 3.5, 0.0, -2.5, 0.0, 0.0, -0.5, 28.0, 0.0, 0.0, 0.0, 3.0, 0.0,
                            2.5, 9.0, 0.0, 0.5, -0.5, 0.5, 0.5, 0.0, 0.0, -3.5, 0.0, 0.0],
             'mxfp6_e3m2': [0.0, 0.0, 0.0, -0.25, -3.5, 0.0, 0.0, 40.0, -16.0, 0.0, 0.0, 1.5, 0.0,
                            0.0, 0.0, 12.0, 0.0, -1.0, -2.0, 0.0, -28.0, -4.0, -0.75, 8.0, 0.25,
                            -3.0, -80.0, -0.5, 0.0, 0.0, -1.5, 0.0, -8.0, -24.0, 0.0625, -0.75,
                            0.0, 0.0625, -0.125, -1.75, 3.5, 0.125, -2.5, 0.0625, 0.0, -0.375,
                            28.0, 0.0, -0.0625, 0.125, 3.0, 0.0, 2.5, 10.0, -0.1875, 0.3125, -0.5,
                            0.625, 0.75, -0.0625, 0.125, -3.5, 0.0, 0.0],
             'mxfp8_e4m3': [0.00048828125, 0.01953125, -0.00439453125, -0.21875, -3.75, -0.03125,
                            0.0146484375, 44.0, -16.0, -0.0390625, 0.0078125, 1.375, 0.00146484375,
                            -0.1171875, -0.0146484375, 11.0, -0.04296875, -0.9375, -1.875,
                            -0.0390625, -30.0, -3.75, -0.625, 9.0, 0.3125, -3.0, -80.0, -0.5625,
                            -0.005859375, 0.00341796875, -1.5, -0.029296875, -8.0, -26.0, 0.0625,
                            -0.8125, -0.00048828125, 0.0546875, -0.140625, -1.75, 3.5, 0.125, -2.5,
                            0.078125, 0.021484375, -0.375, 28.0, 0.029296875, -0.0390625, 0.125,
                            3.0, -0.01953125, 2.5, 9.0, -0.1875, 0.34375, -0.5625, 0.6875, 0.75,
                            -0.0859375, 0.1015625, -3.75, 0.001953125, -0.017578125],
             'mxfp8_e5m2': [0.00030517578125, 0.01953125, -0.00390625, -0.21875, -3.5, -0.03125,
                            0.015625, 40.0, -16.0, -0.0390625, 0.0078125, 1.5, 0.001708984375,
                            -0.109375, -0.013671875, 12.0, -0.0390625, -0.875, -2.0, -0.0390625,
                            -28.0, -4.0, -0.625, 8.0, 0.3125, -3.0, -80.0, -0.5, -0.005859375,
                            0.00341796875, -1.5, -0.03125, -8.0, -24.0, 0.0625, -0.75,
                            -0.00048828125, 0.0546875, -0.15625, -1.75, 3.5, 0.125, -2.5, 0.078125,
                            0.01953125, -0.375, 28.0, 0.03125, -0.0390625, 0.125, 3.0, -0.01953125,
                            2.5, 10.0, -0.1875, 0.3125, -0.5, 0.625, 0.75, -0.078125, 0.109375,
                            -3.5, 0.001953125, -0.01953125],
             'mxint8': [0.0, 0.0, -0.0, -0.0, -4.0, -0.0, 0.0, 43.0, -16.0, -0.0, 0.0, 1.0, 0.0,
                        -0.0, -0.0, 11.0, -0.0, -1.0, -2.0, -0.0, -29.0, -4.0, -1.0, 9.0, 0.0,
                        -3.0, -81.0, -1.0, -0.0, 0.0, -2.0, -0.0, -7.75, -26.0, 0.0, -0.75, -0.0,
                        0.0, -0.25, -1.75, 3.5, 0.25, -2.5, 0.0, 0.0, -0.5, 27.5, 0.0, -0.0, 0.25,
                        3.0, -0.0, 2.5, 9.25, -0.25, 0.25, -0.5, 0.75, 0.75, -0.0, 0.0, -3.75, 0.0,
                        -0.0]}


# -- the independent references ------------------------------------------------------------
def grid(e, m, subnormal=True):
    """Non-negative finite values of the IEEE-style format (ascending) and their codes."""
    bias = 2 ** (e - 1) - 1
    codes = np.arange(((2 ** e - 1) << m), dtype=np.int64)  # top exponent: inf / NaN
    E, f = codes >> m, codes & ((1 << m) - 1)
    vals = np.where(E == 0, f * 2.0 ** (1 - bias - m), (1 + f / 2.0 ** m) * 2.0 ** (E - bias))
    if not subnormal:
        keep = (E > 0) | (f == 0)
        vals, codes = vals[keep], codes[keep]
    return vals, codes


def ref_chop(x, e, m, mode, subnormal=True):
    """x (float64) rounded to the format by ``mode`` (floatgrid names), IEEE overflow."""
    vals, codes = grid(e, m, subnormal)
    bias = 2 ** (e - 1) - 1
    vals = np.append(vals, 2.0 ** (2 ** e - 1 - bias))  # the first value past max: inf
    codes = np.append(codes, (2 ** e - 1) << m)
    out = np.empty_like(x)
    for i, v in enumerate(x):
        if np.isnan(v) or np.isinf(v):
            out[i] = v
            continue
        mag, neg = abs(v), np.signbit(v)
        if mag >= vals[-1]:  # beyond the extended grid: infinite unless toward zero
            lo_i = len(vals) - 2
            r = vals[-1] if mag > vals[-1] else mag
            away = mode in ("nearest_even", "nearest_away", "nearest_toward_zero") or \
                (mode == "up" and not neg) or (mode == "down" and neg)
            out[i] = (-1) ** neg * (np.inf if away else vals[lo_i])
            if mode == "nearest_toward_zero" and mag == vals[-1]:
                out[i] = (-1) ** neg * np.inf  # not a tie: vals[-1] itself overflows
            del r
            continue
        j = np.searchsorted(vals, mag, side="right") - 1
        lo, hi = vals[j], vals[j + 1]
        if mag == lo:
            r = lo
        else:
            dlo, dhi = mag - lo, hi - mag
            up = {"nearest_even": dhi < dlo or (dhi == dlo and codes[j + 1] % 2 == 0
                                                and codes[j] % 2 == 1),
                  "nearest_toward_zero": dhi < dlo,
                  "nearest_away": dhi <= dlo,
                  "toward_zero": False,
                  "up": not neg, "down": neg,
                  "odd": codes[j] % 2 == 0}[mode]
            r = hi if up else lo
        out[i] = -r if neg else r
        if r == vals[-1]:
            out[i] = -np.inf if neg else np.inf
    return out


MODES = {1: "nearest_even", 2: "up", 3: "down", 4: "toward_zero", 7: "nearest_toward_zero",
         8: "nearest_away", 9: "odd"}
FMTS = [(4, 3), (5, 2), (5, 10), (8, 7), (3, 1), (2, 2)]


def probe(e, m, subnormal=True, seed=0):
    """Every value of the format, the midpoints (ties), points just beside them, values
    past max, tiny values, random values, zeros, inf, NaN; both signs (float64)."""
    vals, _ = grid(e, m, subnormal)
    mids = (vals[1:] + vals[:-1]) / 2
    nxt = 2.0 ** (2 ** (e - 1))
    rng = np.random.default_rng(seed)
    extra = [vals[-1] + (nxt - vals[-1]) / 2, nxt, nxt * 3, vals[1] / 4, vals[1] / 2,
             vals[1] * 0.75, 1e-300, np.inf]
    x = np.concatenate([vals, mids, np.nextafter(mids, 0), np.nextafter(mids, np.inf), extra,
                        rng.uniform(0, vals[-1] * 1.1, 300)])
    x = np.concatenate([x, -x, [np.nan, 0.0, -0.0]])
    return x


def same_bits(got, want):
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    iv = np.uint64 if got.dtype == np.float64 else np.uint32
    ok = (got.view(iv) == want.view(iv)) | (np.isnan(got) & np.isnan(want))
    bad = np.flatnonzero(~ok)
    assert bad.size == 0, f"{bad.size} mismatches, first: " + ", ".join(
        f"[{i}] got {got.flat[i]!r} want {want.flat[i]!r}" for i in bad[:5])


def to_np(y):
    return y.numpy() if isinstance(y, torch.Tensor) else np.asarray(y)


@pytest.fixture(autouse=True)
def _auto_backend():
    pychop.backend("auto")
    yield
    pychop.backend("auto")


# -- Chop: every deterministic mode against the reference ---------------------------------
@pytest.mark.parametrize("e,m", FMTS)
@pytest.mark.parametrize("rmode", sorted(MODES))
def test_chop_matches_reference(e, m, rmode):
    x = probe(e, m)
    want = ref_chop(x, e, m, MODES[rmode])
    same_bits(Chop(e, m, rmode=rmode)(x), want)
    with np.errstate(over="ignore"):
        x32 = x.astype(np.float32)
    keep = x32.astype(np.float64) == x  # the probes that are float32 values
    same_bits(Chop(e, m, rmode=rmode)(x32[keep]), want[keep].astype(np.float32))


@pytest.mark.parametrize("e,m", [(4, 3), (5, 2), (5, 10)])
@pytest.mark.parametrize("rmode", [1, 2, 3, 4, 7, 8])
def test_chop_without_subnormals(e, m, rmode):
    x = probe(e, m, subnormal=False)
    same_bits(Chop(e, m, rmode=rmode, subnormal=False)(x),
              ref_chop(x, e, m, MODES[rmode], subnormal=False))


def test_chop_matches_pychop_062():
    x = np.array(PYCHOP_X)
    for rmode, want in PYCHOP_CHOP.items():
        np.testing.assert_array_equal(Chop(5, 10, rmode=rmode)(x), want)


def test_chop_overflow_is_ieee():
    # pychop 0.6.2 returns 0 for 70000 and 65536 for 65520 in half precision
    ch = Chop(5, 10)
    y = ch(np.array([65519.0, 65520.0, 70000.0, 1e5, -7e4, np.inf, 65504.0]))
    np.testing.assert_array_equal(y, [65504.0, np.inf, np.inf, np.inf, -np.inf, np.inf, 65504.0])
    np.testing.assert_array_equal(Chop(5, 10, rmode=4)(np.array([1e5, -1e5])), [65504, -65504])
    np.testing.assert_array_equal(Chop(5, 10, rmode=2)(np.array([1e5, -1e5])), [np.inf, -65504])


def test_chop_presets_and_attributes():
    h = Chop("h")
    assert (h.exp_bits, h.sig_bits, h.u, h.t, h.emax, h.emin) == (5, 10, 2.0 ** -11, 11, 15, -14)
    assert (h.xmax, h.xmin, h.xmins) == (65504.0, 2.0 ** -14, 2.0 ** -24)
    assert Chop(prec="q43").xmax == 240.0 and Chop("q52").xmax == 57344.0
    assert Chop("b").subnormal is False and Chop("b", subnormal=True).subnormal is True
    assert Chop("s").xmax == float(np.finfo(np.float32).max)
    x = np.random.default_rng(1).standard_normal(1000).astype(np.float32) * 100
    same_bits(Chop("h")(x), x.astype(np.float16).astype(np.float32))
    same_bits(Chop("b", subnormal=True)(x), x.astype(ml_dtypes.bfloat16).astype(np.float32))
    same_bits(Chop("s")(x), x)
    assert Chop(4, 3).random_state == 42 and "Chop(exp_bits=4" in repr(Chop(4, 3))


def test_chop_keeps_dtype_and_type():
    x = np.linspace(-3, 3, 11)
    for arr in (x.astype(np.float16), x.astype(np.float32), x):
        assert Chop(5, 10)(arr).dtype == arr.dtype
    assert Chop(5, 10)(torch.tensor(x, dtype=torch.float16)).dtype == torch.float16
    y = Chop(4, 3)(jnp.asarray(x, jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    same_bits(np.asarray(y, np.float32), Chop(4, 3)(x.astype(np.float32)))
    assert isinstance(Chop(4, 3)([1.0, 2.3]), np.ndarray)


# -- backend identity -------------------------------------------------------------------------
def _wild(seed, n, dtype=np.float32):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n) * np.exp2(rng.integers(-40, 40, n))
    x[rng.integers(0, n, 4)] = [np.nan, np.inf, -np.inf, 0.0]
    x[rng.integers(0, n, 2)] = np.float32(1e-40)  # float32 subnormals
    return x.astype(dtype)


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2 ** 31), fmt=st.sampled_from(FMTS),
       rmode=st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8, 9]), sub=st.booleans(),
       wide=st.booleans())
def test_chop_backends_bit_identical(seed, fmt, rmode, sub, wide):
    x = _wild(seed, 257, np.float64 if wide else np.float32)
    ch = Chop(*fmt, rmode=rmode, subnormal=sub)
    key = jax.random.key(seed)
    want = ch(x, key=key)
    same_bits(to_np(ch(torch.from_numpy(x), key=key)), want)
    x32 = x.astype(np.float32)  # JAX runs without x64 here
    want32 = want if not wide else ch(x32, key=key)
    same_bits(ch(jnp.asarray(x32), key=key), want32)
    jitted = jax.jit(lambda v, k: ch(v, key=k))
    same_bits(jitted(jnp.asarray(x32), key), want32)
    portable = framework_named("numpy").portable()  # the op-by-op engine
    same_bits(formats.round_float(portable, x, ch.format, rounding=ch.rounding, key=key), want)


# -- stochastic modes -------------------------------------------------------------------------
@pytest.mark.parametrize("rmode", [5, 6, 10])
def test_stochastic_reproducible_and_between_neighbours(rmode):
    x = np.random.default_rng(3).uniform(-4, 4, 4096)
    lo, hi = ref_chop(x, 4, 3, "down"), ref_chop(x, 4, 3, "up")
    a, b = Chop(4, 3, rmode=rmode, random_state=5), Chop(4, 3, rmode=rmode, random_state=5)
    ya1, ya2 = a(x), a(x)
    same_bits(ya1, b(x))                  # same seed, same sequence of calls
    same_bits(ya2, b(x))
    assert not np.array_equal(ya1, ya2)   # the stream advances
    assert np.all((ya1 == lo) | (ya1 == hi))
    exact = lo == hi
    np.testing.assert_array_equal(ya1[exact], x[exact])
    same_bits(a(x, key=jax.random.key(9)), b(x, key=jax.random.key(9)))
    # JAX eager uses the instance stream too; jit needs a key
    c = Chop(4, 3, rmode=rmode, random_state=5)
    same_bits(np.asarray(c(jnp.asarray(x, jnp.float32))), Chop(4, 3, rmode=rmode,
              random_state=5)(x.astype(np.float32)))
    with pytest.raises(ValueError, match="key"):
        jax.jit(c)(jnp.asarray(x, jnp.float32))


def test_stochastic_unbiased():
    n = 200_000
    x = np.full(n, 1.03)  # neighbours 1.0 and 1.125 in e4m3: P(up) = 0.24
    y = Chop(4, 3, rmode=5, random_state=1)(x)
    p = np.mean(y == 1.125)
    assert abs(p - 0.24) < 5 * np.sqrt(0.24 * 0.76 / n)
    assert abs(y.mean() - 1.03) < 5 * 0.125 * np.sqrt(0.24 * 0.76 / n)
    y6 = Chop(4, 3, rmode=6, random_state=1)(x)
    assert abs(np.mean(y6 == 1.125) - 0.5) < 5 * np.sqrt(0.25 / n)
    yf = Chopf(4, 4, rmode=5, random_state=2)(np.full(n, 0.1))  # 0.0625 / 0.125: P = 0.6
    assert abs(np.mean(yf == 0.125) - 0.6) < 5 * np.sqrt(0.24 / n)


# -- Chopf --------------------------------------------------------------------------------------
def ref_fixed(x, ibits, fbits, mode):
    t = x * 2.0 ** fbits
    r = {"nearest_even": np.round(t), "up": np.ceil(t), "down": np.floor(t),
         "toward_zero": np.trunc(t)}[mode]
    lo, hi = -(2.0 ** (ibits + fbits - 1)), 2.0 ** (ibits + fbits - 1) - 1
    return np.clip(r, lo, hi) / 2.0 ** fbits


@pytest.mark.parametrize("ibits,fbits", [(4, 4), (1, 7), (8, 0), (3, 12)])
@pytest.mark.parametrize("rmode", [1, 2, 3, 4])
def test_chopf_matches_reference(ibits, fbits, rmode):
    rng = np.random.default_rng(ibits * 31 + fbits)
    lim = 2.0 ** ibits
    x = np.concatenate([rng.uniform(-lim, lim, 2000),
                        (np.arange(-40, 40) + 0.5) / 2.0 ** fbits,  # ties
                        [1e-300, -1e-300, 0.0, 1e9, -1e9]])
    want = ref_fixed(x, ibits, fbits, MODES[rmode])
    np.testing.assert_array_equal(Chopf(ibits, fbits, rmode=rmode)(x), want)
    x32 = x.astype(np.float32)
    np.testing.assert_array_equal(Chopf(ibits, fbits, rmode=rmode)(x32),
                                  ref_fixed(x32.astype(np.float64), ibits, fbits,
                                            MODES[rmode]).astype(np.float32))


def test_chopf_matches_pychop_062_and_specials():
    for rmode, want in PYCHOP_CHOPF.items():
        np.testing.assert_array_equal(Chopf(4, 4, rmode=rmode)(np.array(PYCHOP_FX)), want)
    names = {"nearest": 1, "plus_inf": 2, "minus_inf": 3, "towards_zero": 4}
    for name, r in names.items():
        np.testing.assert_array_equal(Chopf(4, 4, rmode=name)(np.array(PYCHOP_FX)),
                                      PYCHOP_CHOPF[r])
    y = Chopf(4, 4)(np.array([np.inf, -np.inf, np.nan]))
    np.testing.assert_array_equal(y, [7.9375, -8.0, np.nan])
    assert Chopf(4, 4).get_format_info()["range"] == (-8.0, 7.9375)
    x = np.float32(1e-40)  # a subnormal: up gives the resolution on every backend
    for arr in (np.array([x]), torch.tensor([x]), jnp.array([x])):
        assert float(to_np(Chopf(4, 4, rmode=2)(arr))[0]) == 0.0625


# -- MX -----------------------------------------------------------------------------------------
ML = {"mxfp8_e4m3": ml_dtypes.float8_e4m3fn, "mxfp8_e5m2": ml_dtypes.float8_e5m2,
      "mxfp6_e3m2": ml_dtypes.float6_e3m2fn, "mxfp6_e2m3": ml_dtypes.float6_e2m3fn,
      "mxfp4_e2m1": ml_dtypes.float4_e2m1fn}
EMAX = {"mxfp8_e4m3": 8, "mxfp8_e5m2": 15, "mxfp6_e3m2": 4, "mxfp6_e2m3": 2,
        "mxfp4_e2m1": 2, "mxint8": 0}


def ref_mx(x, name, block=32):
    """OCP MX v1.0 in float64, block by block (x float32 or float64)."""
    flat = x.astype(np.float64).ravel()
    n = flat.size
    flat = np.concatenate([flat, np.zeros(-n % block)])
    out = np.empty_like(flat)
    for s in range(0, flat.size, block):
        b = flat[s:s + block]
        if not np.all(np.isfinite(b)):
            out[s:s + block] = np.nan
            continue
        amax = np.max(np.abs(b))
        e = np.frexp(amax)[1] - 1 - EMAX[name] if amax > 0 else -127
        if e > 127:
            out[s:s + block] = np.nan
            continue
        e = max(e, -127)
        v = b / 2.0 ** e
        if name == "mxint8":
            p = np.clip(np.rint(v * 64), -128, 127) / 64
        else:
            mx = float(ml_dtypes.finfo(ML[name]).max)
            p = np.clip(v, -mx, mx).astype(ML[name]).astype(np.float64)
        out[s:s + block] = p * 2.0 ** e
    return out[:n].reshape(x.shape).astype(x.dtype)


def test_mx_matches_pychop_062():
    x = np.array(PYCHOP_MX_X, np.float32)
    for name, want in PYCHOP_MX.items():
        np.testing.assert_array_equal(mx_quantize(x, name), np.array(want, np.float32))


def _mx_input(seed, n=32 * 40 + 7):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n) * np.exp2(rng.integers(-8, 8, n))
    x[:32] = 0.0                                    # an all-zero block
    x[32:64] = rng.standard_normal(32) * 2.0 ** -135  # float32 subnormals: scale 2**-127
    x[64:96] *= 2.0 ** 100                          # large block
    x[96:128] = np.linspace(-7, 7, 32)              # MXFP4: amax 7 -> scale 1, 7 clips to 6
    x[128:160] = rng.standard_normal(32) * 2.0 ** -122  # results below float32's normals
    x[200] = np.nan
    x[260] = np.inf
    return x


@pytest.mark.parametrize("name", sorted(MX_FORMATS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mx_matches_reference(name, dtype):
    x = _mx_input(1).astype(dtype)
    want = ref_mx(x, name)
    same_bits(mx_quantize(x, name), want)
    same_bits(to_np(mx_quantize(torch.from_numpy(x), name)), want)
    if dtype == np.float32:
        same_bits(jax.jit(lambda v: mx_quantize(v, name))(jnp.asarray(x)), want)
        same_bits(mx_quantize(jnp.asarray(x), name), want)
        same_bits(formats.mx(framework_named("numpy").portable(), x,
                             formats.MXGrid(pychop.floats._element(MX_FORMATS[name]))), want)


def test_mx_ocp_examples_and_shapes():
    b = np.zeros(32, np.float32)
    b[0] = 6.0
    assert mx_quantize(b, "mxfp4_e2m1")[0] == 6.0  # amax 6: scale 2**0
    b[0] = 7.0
    assert mx_quantize(b, "mxfp4_e2m1")[0] == 6.0  # amax 7: scale 2**0 too, 7 clips to 6
    b[0] = 8.0
    assert mx_quantize(b, "mxfp4_e2m1")[0] == 8.0  # scale 2**1
    x = np.random.default_rng(0).standard_normal((3, 5, 7)).astype(np.float32)
    y = mx_quantize(x, "mxfp8_e4m3", block_size=16)
    assert y.shape == x.shape
    same_bits(y.ravel(), ref_mx(x.ravel(), "mxfp8_e4m3", 16))
    same_bits(mx_quantize(x, (4, 3)), mx_quantize(x, pychop.create_mx_spec(4, 3)))
    assert mx_quantize(x.astype(np.float16), "mxfp4_e2m1").dtype == np.float32
    nan_block = mx_quantize(np.array([1.0, np.nan, 2.0], np.float32), "mxfp4_e2m1")
    assert np.all(np.isnan(nan_block))


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2 ** 31), name=st.sampled_from(sorted(MX_FORMATS)),
       block=st.sampled_from([1, 8, 32, 33]))
def test_mx_backends_bit_identical(seed, name, block):
    x = _wild(seed, 300)
    want = mx_quantize(x, name, block_size=block)
    same_bits(to_np(mx_quantize(torch.from_numpy(x), name, block_size=block)), want)
    same_bits(jax.jit(lambda v: mx_quantize(v, name, block_size=block))(jnp.asarray(x)), want)


# -- errors -------------------------------------------------------------------------------------
def test_errors():
    with pytest.raises(ValueError, match="rmode"):
        Chop(4, 3, rmode=11)
    with pytest.raises(ValueError, match="rmode"):
        Chop(4, 3, rmode="sideways")
    with pytest.raises(ValueError, match="rmode"):
        Chop(4, 3, rmode=0)
    with pytest.raises(ValueError, match="exp_bits"):
        Chop(1, 3)
    with pytest.raises(ValueError, match="sig_bits"):
        Chop(4, -1)
    with pytest.raises(ValueError, match="exp_bits"):
        Chop(4.0, 3)
    with pytest.raises(ValueError, match="precision"):
        Chop("quarter")
    with pytest.raises(TypeError, match="sig_bits"):
        Chop(4)
    with pytest.raises(TypeError, match="floating-point"):
        Chop(4, 3)(np.arange(4))
    with pytest.raises(TypeError, match="convert"):
        Chop(4, 3)("1.0")
    with pytest.raises(ValueError, match="float32"):
        Chop(8, 7)(np.ones(3, np.float16))        # bfloat16's range is not float16's
    with pytest.raises(ValueError, match="float64"):
        Chop(5, 30)(np.ones(3, np.float32))
    pychop.backend("numpy")
    with pytest.raises(TypeError, match="numpy array"):
        Chop(4, 3)(torch.ones(3))
    pychop.backend("auto")
    with pytest.raises(ValueError, match="ibits"):
        Chopf(0, 4)
    with pytest.raises(ValueError, match="fbits"):
        Chopf(4, -1)
    with pytest.raises(ValueError, match="float64"):
        Chopf(16, 16)(np.ones(3, np.float32))
    with pytest.raises(ValueError, match="rmode"):
        Chopf(4, 4, rmode="plus_infinity")
    with pytest.raises(ValueError, match="unknown format"):
        mx_quantize(np.ones(4), "mxfp5")
    with pytest.raises(ValueError, match="scale_sig_bits"):
        mx_quantize(np.ones(4), "mxfp4_e2m1", scale_sig_bits=3)
    with pytest.raises(TypeError, match="backend"):
        mx_quantize(np.ones(4), backend="torch")
    with pytest.raises(ValueError, match="block_size"):
        mx_quantize(np.ones(4), block_size=0)
    with pytest.raises(TypeError, match="floating-point"):
        mx_quantize(np.arange(4))
    with pytest.raises(ValueError, match="random_state"):
        Chop(4, 3, rmode=5, random_state=1.5)
