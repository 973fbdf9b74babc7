"""Tests of pychop_jax.core.floatgrid.round_to_format.

The references are independent of the code under test: ml_dtypes' casts for
round-to-nearest-even, and for everything else a table of all finite values of the format
(decoded field by field into float64) searched with np.searchsorted.
"""

from __future__ import annotations

import functools

import array_api_compat.numpy as xnp
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pychop_jax.core import floatgrid as fg
from pychop_jax.core.floatgrid import FORMATS, ROUNDINGS, FloatFormat, round_to_format

# one jitted entry point; formats and modes are static, so each combination compiles once
_jit = jax.jit(round_to_format, static_argnums=(0, 2), static_argnames=("rounding", "overflow"))

ML_DTYPES = {
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2,
    "float8_e4m3fnuz": ml_dtypes.float8_e4m3fnuz, "float8_e5m2fnuz": ml_dtypes.float8_e5m2fnuz,
    "float8_e4m3b11fnuz": ml_dtypes.float8_e4m3b11fnuz, "float8_e4m3": ml_dtypes.float8_e4m3,
    "float8_e3m4": ml_dtypes.float8_e3m4, "float6_e2m3fn": ml_dtypes.float6_e2m3fn,
    "float6_e3m2fn": ml_dtypes.float6_e3m2fn, "float4_e2m1fn": ml_dtypes.float4_e2m1fn,
    "float16": np.float16, "bfloat16": ml_dtypes.bfloat16,
}
DETERMINISTIC = ("nearest_even", "up", "down", "toward_zero", "odd", "nearest_toward_zero",
                 "nearest_away")


def _u(x):
    x = np.asarray(x)
    return x.view(np.uint64 if x.dtype == np.float64 else np.uint32)


def assert_same_bits(got, want, *, where=None):
    """Equal bit patterns; any NaN equals any NaN."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    ok = (_u(got) == _u(want)) | (np.isnan(got) & np.isnan(want))
    if where is not None:
        ok |= ~where
    bad = np.flatnonzero(~ok)
    assert bad.size == 0, f"{bad.size} mismatches, first: " + ", ".join(
        f"[{i}] got {got.flat[i]!r} want {want.flat[i]!r}" for i in bad[:5])


# -- independent reference -------------------------------------------------------------------

def grid_table(fmt: FloatFormat):
    """All non-negative finite values of fmt (ascending) and their encodings, by decoding
    every (exponent, fraction) field pair."""
    e, m, bias = fmt.exp_bits, fmt.man_bits, fmt.bias
    code = np.arange(2 ** (e + m), dtype=np.int64)
    E, f = code >> m, code & (2 ** m - 1)
    keep = np.ones(code.shape, bool)
    if fmt.specials == "ieee":
        keep &= E != 2 ** e - 1
    elif fmt.specials == "fn":
        keep &= code != 2 ** (e + m) - 1
    if not fmt.subnormals:
        keep &= (E != 0) | (f == 0)
    val = np.where(E == 0, np.ldexp(f.astype(np.float64), 1 - bias - m),
                   np.ldexp((2 ** m + f).astype(np.float64), E - bias - m))
    return val[keep], code[keep]


def reference(fmt, x, rounding, overflow, noise=None):
    """Round x (float32 or float64 array) by table look-up; returns x's dtype."""
    x = np.asarray(x)
    xd = x.astype(np.float64)
    vals, codes = grid_table(fmt)
    vmax, cmax = vals[-1], codes[-1]
    top_ulp = np.ldexp(1.0, int(np.frexp(vmax)[1]) - 1 - fmt.man_bits)  # ulp of max_finite
    # the grid continued one step above max_finite (a virtual value with code cmax + 1)
    ext = np.append(vals, vmax + top_ulp)
    ecode = np.append(codes, cmax + 1)
    ax = np.abs(xd)
    fin = np.isfinite(xd)
    axf = np.where(fin, ax, 0.0)
    i = np.clip(np.searchsorted(ext, axf, side="right") - 1, 0, len(ext) - 2)
    lo, hi = ext[i], ext[i + 1]
    exact = lo == axf
    beyond = axf >= ext[-1]  # on or past the virtual value: overflow in every mode
    lo_code, hi_code = ecode[i], ecode[i + 1]
    hi_odd = (hi_code & 1) == 1
    lo_odd = (lo_code & 1) == 1
    if not fmt.subnormals:  # the gap (0, min_normal): min_normal counts as the odd multiple
        gap = (lo == 0) & (i == 0)
        hi_odd = np.where(gap, True, hi_odd)
    neg = np.signbit(xd)
    if rounding == "nearest_even":
        d_lo, d_hi = axf - lo, hi - axf
        up = (d_hi < d_lo) | ((d_hi == d_lo) & ~hi_odd)  # a tie goes to the even code
    elif rounding in ("nearest_toward_zero", "nearest_away"):
        d_lo, d_hi = axf - lo, hi - axf
        up = (d_hi < d_lo) if rounding == "nearest_toward_zero" else (d_hi <= d_lo)
    elif rounding == "toward_zero":
        up = np.zeros(x.shape, bool)
    elif rounding == "up":
        up = ~neg
    elif rounding == "down":
        up = neg
    elif rounding == "odd":
        up = ~lo_odd
    elif rounding == "stochastic_equal":
        up = noise.astype(np.int64) < 2 ** 31
    elif rounding == "stochastic":
        k = np.log2(hi - lo)
        assert np.all(k == np.round(k))  # the spacing is a power of two
        frac32 = np.ldexp(axf - lo, (32 - k).astype(np.int64))  # exact
        up = noise.astype(np.float64) < frac32
    up = up & ~exact
    mag = np.where(up, hi, lo)
    ovf = beyond | (up & (i + 1 == len(ext) - 1))
    if overflow == "saturate" or fmt.specials == "finite":
        special = vmax
    elif fmt.specials == "ieee":
        special = np.inf
    else:
        special = np.nan
    if overflow == "saturate":
        to_special = np.zeros(x.shape, bool)
    elif rounding in ("nearest_even", "nearest_toward_zero", "nearest_away", "stochastic",
                      "stochastic_equal"):
        to_special = np.ones(x.shape, bool)
    elif rounding == "up":
        to_special = ~neg
    elif rounding == "down":
        to_special = neg
    else:
        to_special = np.zeros(x.shape, bool)
    mag = np.where(ovf, np.where(to_special, special, vmax), mag)
    isinf = np.isinf(xd)
    mag = np.where(isinf, special if overflow == "ieee" else vmax, mag)
    out = np.where(neg, -mag, mag)
    if fmt.specials == "fnuz":
        out = np.where(out == 0, 0.0, out)
    out = np.where(np.isnan(xd), np.nan, out)
    return out.astype(x.dtype)


# -- probe inputs ----------------------------------------------------------------------------

def probes(fmt: FloatFormat, dtype=np.float32, n_random=4000, seed=0):
    """Grid values, midpoints (ties) and their float neighbours, the overflow threshold,
    tiny values around min_subnormal/2, float32 subnormals, random bit patterns."""
    rng = np.random.default_rng(seed)
    vals, _ = grid_table(fmt)
    fi = np.finfo(dtype)
    vals = vals[vals <= fi.max]
    top = vals[-1] + np.ldexp(1.0, int(np.frexp(vals[-1])[1]) - 1 - fmt.man_bits)
    mids = np.append((vals[:-1] + vals[1:]) / 2, (vals[-1] + top) / 2)
    q = vals[1]
    specials = np.array([0.0, q / 2, q / 4, q / 3, 3 * q / 4, q * 0.75, top, 2 * top, fi.max,
                         fi.tiny, fi.smallest_subnormal, np.inf, np.nan], np.float64)
    base = np.concatenate([vals, mids, specials, np.append(vals, top) * 1.0000001])
    if base.size > 20000:
        base = rng.choice(base, 20000, replace=False)
    base = base[np.abs(base) <= fi.max].astype(dtype)
    base = base[np.isfinite(base) | np.isnan(base)]
    near = np.concatenate([np.nextafter(base, dtype(np.inf)), np.nextafter(base, dtype(0))])
    ubits = np.uint32 if dtype == np.float32 else np.uint64
    width = 32 if dtype == np.float32 else 64
    raw = rng.integers(0, 2 ** width - 1, n_random, dtype=np.uint64, endpoint=True)
    rand = raw.astype(ubits).view(dtype)
    sub = (rng.integers(0, 2 ** (fi.nmant), 200, dtype=np.uint64)).astype(ubits).view(dtype)
    # values at the format's own scale with random low bits
    scale = rng.choice(vals[vals > 0], n_random) * rng.uniform(0.5, 2.0, n_random)
    allx = np.concatenate([base, near, rand, sub, scale.astype(dtype),
                           np.array([np.inf, -np.inf, np.nan], dtype)])
    return np.concatenate([allx, -allx]).astype(dtype)


# -- 1. nearest-even against ml_dtypes ---------------------------------------------------------

ALL_F16 = np.arange(2 ** 16, dtype=np.uint16).view(np.float16)


@pytest.mark.parametrize("name", sorted(ML_DTYPES))
def test_nearest_even_matches_ml_dtypes(name):
    fmt, dt = FORMATS[name], ML_DTYPES[name]
    x = np.concatenate([ALL_F16.astype(np.float32), probes(fmt)])
    want = x.astype(dt).astype(np.float32)
    # ml_dtypes' 'finite' formats have no NaN: a NaN input becomes +-0 there; ours stays NaN
    where = ~np.isnan(x) if fmt.specials == "finite" else None
    assert_same_bits(round_to_format(xnp, x, fmt, overflow="ieee"), want, where=where)
    assert_same_bits(np.asarray(_jit(jnp, jnp.asarray(x), fmt, overflow="ieee")), want,
                     where=where)
    if fmt.specials == "finite":
        assert np.isnan(round_to_format(xnp, np.float32(np.nan), fmt, overflow="ieee"))


@pytest.mark.parametrize("name", ["float8_e4m3fn", "float8_e5m2fnuz", "float6_e3m2fn",
                                  "float16", "bfloat16"])
def test_nearest_even_float64_input(name):
    """float64 input is rounded once, straight from float64.  ml_dtypes' float64 casts to
    the 8/6/4-bit types round twice (through float32): 2**-10 * (1 + 2**-52) becomes 0 in
    float8_e4m3fn instead of min_subnormal.  So ml_dtypes is the reference where x is a
    float32 number, and the table reference everywhere."""
    fmt, dt = FORMATS[name], ML_DTYPES[name]
    x = probes(fmt, np.float64, n_random=2000)
    got = round_to_format(xnp, x, fmt, overflow="ieee")
    with jax.enable_x64(True):
        got_jit = np.asarray(_jit(jnp, jnp.asarray(x), fmt, overflow="ieee"))
    assert_same_bits(got_jit, got)
    assert_same_bits(got, reference(fmt, x, "nearest_even", "ieee"))
    f32 = (x.astype(np.float32).astype(np.float64) == x) & ~np.isnan(x)
    assert f32.sum() > 100
    assert_same_bits(got[f32], x[f32].astype(dt).astype(np.float64))


def test_saturate_is_the_default():
    fmt = FORMATS["float8_e5m2"]
    x = np.array([1e6, -np.inf, np.inf, np.nan, 61440.0, 61439.0], np.float32)
    got = round_to_format(xnp, x, fmt)
    assert_same_bits(got, np.array([57344, -57344, 57344, np.nan, 57344, 57344], np.float32))
    got = round_to_format(xnp, x, fmt, overflow="ieee")
    assert_same_bits(got, np.array([np.inf, -np.inf, np.inf, np.nan, np.inf, 57344],
                                   np.float32))


# -- 2. every mode against the table reference --------------------------------------------------

REF_FORMATS = [
    FORMATS["float8_e4m3fn"], FORMATS["float8_e5m2"], FORMATS["float8_e4m3fnuz"],
    FORMATS["float6_e2m3fn"], FORMATS["float4_e2m1fn"], FORMATS["float16"],
    FloatFormat(3, 4, subnormals=False), FloatFormat(5, 2, specials="fnuz", subnormals=False),
    FloatFormat(2, 0, specials="finite"), FloatFormat(4, 0, specials="fn"),
    FloatFormat(6, 5), FloatFormat(8, 10),                    # grids below 2**-126
    FloatFormat(8, 7, subnormals=False),                      # bfloat16, flush-to-zero
    FloatFormat(4, 3, bias=3, specials="finite"),             # custom bias
    FloatFormat(8, 3, bias=130),                              # reaches below float32's range
    FloatFormat(8, 0, bias=129, specials="finite"),           # ... with m == 0
    FloatFormat(8, 2, bias=128, subnormals=False),            # ... without subnormals
    FloatFormat(7, 10, bias=120),                             # subnormal shift from max(E, 1)
]


@pytest.mark.parametrize("fmt", REF_FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("overflow", ["saturate", "ieee"])
def test_deterministic_modes_match_table_reference(fmt, overflow):
    x = probes(fmt, n_random=1500, seed=1)
    for rounding in DETERMINISTIC:
        want = reference(fmt, x, rounding, overflow)
        got = round_to_format(xnp, x, fmt, rounding=rounding, overflow=overflow)
        assert_same_bits(got, want)
        got = np.asarray(_jit(jnp, jnp.asarray(x), fmt, rounding=rounding, overflow=overflow))
        assert_same_bits(got, want)


@pytest.mark.parametrize("fmt", [FORMATS["float8_e4m3fn"], FloatFormat(5, 2, subnormals=False),
                                 FloatFormat(11, 8), FloatFormat(11, 4, bias=1030)],
                         ids=lambda f: f.name)
def test_float64_input_matches_table_reference(fmt):
    x = probes(fmt, np.float64, n_random=1500, seed=2)
    rng = np.random.default_rng(3)
    noise = rng.integers(0, 2 ** 32, x.shape, dtype=np.uint64).astype(np.uint32)
    for rounding in ROUNDINGS:
        for overflow in ("saturate", "ieee"):
            want = reference(fmt, x, rounding, overflow, noise=noise)
            got = round_to_format(xnp, x, fmt, rounding=rounding, overflow=overflow,
                                  noise=noise)
            assert_same_bits(got, want)


def test_float32_format_is_the_identity_on_float32():
    """e8m23 with subnormals: every float32, subnormals included, maps to itself."""
    fmt = FORMATS["float32"]
    rng = np.random.default_rng(4)
    x = np.concatenate([rng.integers(0, 2 ** 32, 20000, dtype=np.uint64).astype(np.uint32),
                        rng.integers(0, 2 ** 23, 2000, dtype=np.uint64).astype(np.uint32),
                        np.array([1, 0x807FFFFF, 0x80000001, 0x7F7FFFFF], np.uint32)]).view(
        np.float32)
    noise = rng.integers(0, 2 ** 32, x.shape, dtype=np.uint64).astype(np.uint32)
    for rounding in ROUNDINGS:
        got = np.asarray(_jit(jnp, jnp.asarray(x), fmt, rounding=rounding, overflow="ieee",
                              noise=jnp.asarray(noise)))
        assert_same_bits(got, x)


def test_subnormal_grid_below_float32_normals_survives_xla():
    """A wide-exponent format whose subnormals lie below 2**-126: XLA:CPU flushes float32
    subnormals in float arithmetic, the bit-pattern route must not."""
    fmt = FloatFormat(8, 10)  # min_subnormal 2**-136
    tiny = np.array([2.0 ** -149, 2.0 ** -137, 3 * 2.0 ** -137, 2.0 ** -136, 2.0 ** -127,
                     1.5 * 2.0 ** -136], np.float32)
    x = jnp.asarray(tiny)
    assert_same_bits(np.asarray(_jit(jnp, x, fmt, rounding="up")),
                     np.array([2.0 ** -136, 2.0 ** -136, 2.0 ** -135, 2.0 ** -136, 2.0 ** -127,
                               2.0 ** -135], np.float32))
    assert_same_bits(np.asarray(_jit(jnp, x, fmt)),
                     np.array([0.0, 0.0, 2.0 ** -135, 2.0 ** -136, 2.0 ** -127, 2.0 ** -135],
                              np.float32))
    # e4m3fn rounding 'up' of the smallest float32 subnormal gives its min_subnormal
    assert float(_jit(jnp, jnp.asarray(np.float32(2.0 ** -149)), FORMATS["float8_e4m3fn"],
                      rounding="up")) == 2.0 ** -9


@pytest.mark.parametrize("fmt", [FloatFormat(5, 23), FloatFormat(8, 23, subnormals=False),
                                 FloatFormat(6, 23, specials="fn")], ids=lambda f: f.name)
def test_full_precision_formats_agree_with_the_float64_route(fmt):
    """man_bits == 23 on float32 input (shifts down to 0) against the same format on the
    float64 route (shift >= 29), which the table tests validate; too large for a table."""
    x = probes(FORMATS["float16"], n_random=20000, seed=7)
    for rounding in DETERMINISTIC:
        for overflow in ("saturate", "ieee"):
            kw = dict(rounding=rounding, overflow=overflow)
            want = round_to_format(xnp, x.astype(np.float64), fmt, **kw).astype(np.float32)
            assert_same_bits(round_to_format(xnp, x, fmt, **kw), want)
            assert_same_bits(np.asarray(_jit(jnp, jnp.asarray(x), fmt, **kw)), want)


def test_scalar_and_nd_inputs_keep_their_shape():
    torch = pytest.importorskip("torch")
    import array_api_compat.torch as xtorch

    fmt = FORMATS["float8_e4m3fn"]
    jitted = functools.partial(_jit, jnp)  # (eager JAX compiles every op per new shape)
    for f, make in ((functools.partial(round_to_format, xnp), np.asarray),
                    (jitted, jnp.asarray),
                    (functools.partial(round_to_format, xtorch), torch.tensor)):
        y = f(make(np.float32(0.3)), fmt)
        assert tuple(y.shape) == () and float(y) == 0.3125
        y = f(make(np.full((2, 3, 4), -1000.0, np.float32)), fmt)
        assert tuple(y.shape) == (2, 3, 4) and float(y[1, 2, 3]) == -448.0


# -- 3. stochastic modes ---------------------------------------------------------------------

STOCH_FORMATS = [FORMATS["float8_e4m3fn"], FORMATS["float8_e5m2"], FORMATS["float4_e2m1fn"],
                 FloatFormat(3, 4, subnormals=False), FloatFormat(8, 10), FORMATS["bfloat16"]]


@pytest.mark.parametrize("fmt", STOCH_FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("rounding", ["stochastic", "stochastic_equal"])
def test_stochastic_matches_exact_rule(fmt, rounding):
    """Round up iff noise / 2**32 < (|x| - lo) / (hi - lo) (stochastic), iff noise < 2**31
    (stochastic_equal); the result is always one of the two neighbours."""
    x = probes(fmt, n_random=1500, seed=5)
    rng = np.random.default_rng(6)
    noise = rng.integers(0, 2 ** 32, x.shape, dtype=np.uint64).astype(np.uint32)
    for overflow in ("saturate", "ieee"):
        want = reference(fmt, x, rounding, overflow, noise=noise)
        assert_same_bits(round_to_format(xnp, x, fmt, rounding=rounding, overflow=overflow,
                                         noise=noise), want)
        got = _jit(jnp, jnp.asarray(x), fmt, rounding=rounding, overflow=overflow,
                   noise=jnp.asarray(noise))
        assert_same_bits(np.asarray(got), want)


def test_stochastic_threshold_is_exact():
    """x = 1 + 3/32 lies 3/4 of the way from 1 to 1.125 in e4m3: up iff noise < 3 * 2**30."""
    fmt = FORMATS["float8_e4m3fn"]
    t = 3 * 2 ** 30
    noise = np.array([0, t - 1, t, 2 ** 32 - 1], np.uint32)
    x = np.full(4, 1 + 3 / 32, np.float32)
    got = round_to_format(xnp, x, fmt, rounding="stochastic", noise=noise)
    np.testing.assert_array_equal(got, [1.125, 1.125, 1.0, 1.0])
    got = round_to_format(xnp, -x, fmt, rounding="stochastic", noise=noise)
    np.testing.assert_array_equal(got, [-1.125, -1.125, -1.0, -1.0])


def _neighbours(fmt, v):
    vals, _ = grid_table(fmt)
    i = np.searchsorted(vals, abs(v), side="right") - 1
    return vals[i], vals[min(i + 1, len(vals) - 1)]


def _rounded_many(fmt, v, rounding, seed, n=4096):
    """``v`` (clipped to the format's range, float32) and ``n`` stochastic roundings
    of it with the noise of ``seed``, as float64."""
    v = np.float32(np.clip(np.float32(v), -fmt.max_finite, fmt.max_finite))
    noise = np.random.default_rng(seed).integers(0, 2 ** 32, n, dtype=np.uint64).astype(
        np.uint32)
    got = round_to_format(xnp, np.full(n, v, np.float32), fmt, rounding=rounding,
                          noise=noise)
    return v, got.astype(np.float64)


@settings(max_examples=40)
@given(st.sampled_from(STOCH_FORMATS[:4]), st.floats(-1.0, 1.0, width=32),
       st.integers(-12, 4), st.integers(0, 2 ** 32 - 1))
def test_stochastic_is_unbiased(fmt, mant, exp2, seed):
    v, got = _rounded_many(fmt, np.ldexp(mant, exp2), "stochastic", seed)
    n = got.size
    lo, hi = _neighbours(fmt, float(v))
    assert set(np.abs(got)) <= {lo, hi}
    p = (abs(float(v)) - lo) / (hi - lo) if hi > lo else 0.0
    sd = (hi - lo) * np.sqrt(p * (1 - p) / n)
    assert abs(got.mean() - float(v)) <= 6 * sd + 1e-12 * abs(float(v))


@settings(max_examples=20)
@given(st.sampled_from(STOCH_FORMATS[:4]), st.floats(-400.0, 400.0, width=32),
       st.integers(0, 2 ** 32 - 1))
def test_stochastic_equal_picks_each_neighbour_half_the_time(fmt, v, seed):
    v, got = _rounded_many(fmt, v, "stochastic_equal", seed)
    n = got.size
    lo, hi = _neighbours(fmt, float(v))
    if lo == abs(float(v)):
        assert np.all(got == float(v))
        return
    frac_up = np.mean(np.abs(got) == hi)
    assert set(np.abs(got)) <= {lo, hi}
    assert abs(frac_up - 0.5) <= 5 * 0.5 / np.sqrt(n)


def test_stochastic_is_reproducible_from_the_noise():
    fmt = FORMATS["float8_e5m2"]
    x = jax.random.normal(jax.random.key(0), (1000,), jnp.float32)
    noise = jax.random.bits(jax.random.key(1), x.shape, jnp.uint32)
    a = _jit(jnp, x, fmt, rounding="stochastic", noise=noise)
    b = _jit(jnp, x, fmt, rounding="stochastic", noise=noise)
    c = _jit(jnp, x, fmt, rounding="stochastic",
             noise=jax.random.bits(jax.random.key(2), x.shape, jnp.uint32))
    assert_same_bits(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


# -- 4. backends give the same bits ------------------------------------------------------------

@st.composite
def formats_st(draw):
    e, m = draw(st.integers(2, 8)), draw(st.integers(0, 10))
    specials = draw(st.sampled_from(("ieee", "fn", "fnuz", "finite")))
    bias = 2 ** (e - 1) - (specials != "fnuz") + draw(st.sampled_from((0, 0, 0, -1, 1, 2)))
    return FloatFormat(e, m, bias=bias, specials=specials, subnormals=draw(st.booleans()))



def _random_floats(rng, n, dtype):
    width = 32 if dtype == np.float32 else 64
    u = np.uint32 if width == 32 else np.uint64
    raw = rng.integers(0, 2 ** width - 1, n, dtype=np.uint64, endpoint=True).astype(u)
    x = raw.view(dtype)
    k = n // 4  # normal values of moderate size, and subnormals
    x[:k] = (rng.standard_normal(k) * np.exp2(rng.integers(-30, 30, k))).astype(dtype)
    x[k:2 * k] = (raw[k:2 * k] >> (1 if width == 32 else 12)).view(dtype)
    x[k:2 * k] = np.where(rng.random(k) < 0.5, x[k:2 * k],
                          (raw[k:2 * k] & ((1 << (23 if width == 32 else 52)) - 1)).view(dtype))
    return x


@settings(max_examples=100)
@given(formats_st(), st.sampled_from(ROUNDINGS), st.sampled_from(("saturate", "ieee")),
       st.integers(0, 2 ** 32 - 1), st.booleans())
def test_backends_bit_identical(fmt, rounding, overflow, seed, f64):
    torch = pytest.importorskip("torch")
    import array_api_compat.torch as xtorch

    rng = np.random.default_rng(seed)
    f64 = f64 or fmt.emax > 127  # beyond float32's range: float64 input only
    dtype = np.float64 if f64 else np.float32
    x = _random_floats(rng, 256, dtype)
    noise = rng.integers(0, 2 ** 32, x.shape, dtype=np.uint64).astype(np.uint32)
    kw = dict(rounding=rounding, overflow=overflow)
    ref = round_to_format(xnp, x, fmt, noise=noise, **kw)
    assert ref.dtype == dtype
    with jax.enable_x64(f64):
        jx, jn = jnp.asarray(x), jnp.asarray(noise)
        jit_out = np.asarray(_jit(jnp, jx, fmt, noise=jn, **kw))
        eager_out = np.asarray(round_to_format(jnp, jx, fmt, noise=jn, **kw))
    tnoise = torch.from_numpy(noise) if seed % 2 else torch.from_numpy(noise.astype(np.int64))
    torch_out = round_to_format(xtorch, torch.from_numpy(x), fmt, noise=tnoise, **kw).numpy()
    for got in (jit_out, eager_out, torch_out):
        assert np.array_equal(_u(got), _u(ref))
    if fmt.man_bits <= 6:  # and the values are the table reference's
        assert_same_bits(ref, reference(fmt, x, rounding, overflow, noise=noise))


def test_half_precision_inputs_are_widened_exactly():
    torch = pytest.importorskip("torch")
    import array_api_compat.torch as xtorch

    fmt = FORMATS["float8_e4m3fn"]
    for dt, tdt in ((np.float16, torch.float16), (ml_dtypes.bfloat16, torch.bfloat16)):
        x = np.arange(2 ** 16, dtype=np.uint16).view(dt)
        want = round_to_format(xnp, x.astype(np.float32), fmt, rounding="up")
        assert want.dtype == np.float32
        assert_same_bits(round_to_format(xnp, x, fmt, rounding="up"), want)
        assert_same_bits(np.asarray(_jit(jnp, jnp.asarray(x), fmt, rounding="up")), want)
        tx = torch.from_numpy(x.view(np.int16)).view(tdt)
        assert_same_bits(round_to_format(xtorch, tx, fmt, rounding="up").numpy(), want)


# -- 5. formats and bad input ------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(ML_DTYPES))
def test_format_properties_match_ml_dtypes(name):
    fmt, fi = FORMATS[name], ml_dtypes.finfo(ML_DTYPES[name])
    assert fmt.max_finite == float(fi.max)
    assert fmt.min_normal == float(fi.smallest_normal)
    assert fmt.min_subnormal == float(fi.smallest_subnormal)
    assert fmt.emax == fi.maxexp - 1 and fmt.emin == fi.minexp
    assert fmt.bits == fi.bits
    assert fmt.has_inf == bool(np.isinf(np.array(np.inf, np.float32).astype(ML_DTYPES[name])))


def test_format_defaults_and_lookup():
    assert FloatFormat(4, 3).bias == 7 and FloatFormat(4, 3, specials="fnuz").bias == 8
    assert FloatFormat(4, 3, specials="fn") == FORMATS["float8_e4m3fn"]  # name not compared
    assert fg.get_format("float8_e5m2") is FORMATS["float8_e5m2"]
    assert fg.get_format(ml_dtypes.float8_e4m3fn) is FORMATS["float8_e4m3fn"]
    assert fg.get_format(jnp.bfloat16) is FORMATS["bfloat16"]
    assert fg.get_format("e6m5") == FloatFormat(6, 5)
    assert FloatFormat(3, 4, subnormals=False).min_subnormal == FloatFormat(3, 4).min_normal
    assert FloatFormat(5, 2).name == "e5m2"
    assert fg.PYCHOP_RMODES[5] == "stochastic"


@pytest.mark.parametrize("kw, match", [
    (dict(exp_bits=0, man_bits=3), "exp_bits"),
    (dict(exp_bits=12, man_bits=3), "exp_bits"),
    (dict(exp_bits=4, man_bits=-1), "man_bits"),
    (dict(exp_bits=4, man_bits=53), "man_bits"),
    (dict(exp_bits=4.0, man_bits=3), "exp_bits"),
    (dict(exp_bits=4, man_bits=3, specials="nan"), "specials"),
    (dict(exp_bits=1, man_bits=3), "exp_bits >= 2"),
    (dict(exp_bits=4, man_bits=3, bias=-2000), "bias"),
    (dict(exp_bits=4, man_bits=3, subnormals=None), "subnormals"),
])
def test_bad_format(kw, match):
    with pytest.raises(ValueError, match=match):
        FloatFormat(**kw)


def test_bad_arguments():
    x = np.ones(3, np.float32)
    fmt = FORMATS["float8_e4m3fn"]
    with pytest.raises(ValueError, match="unknown rounding .* use one of"):
        round_to_format(xnp, x, fmt, rounding="nearest")
    with pytest.raises(ValueError, match="unknown overflow .* use one of"):
        round_to_format(xnp, x, fmt, overflow="clip")
    with pytest.raises(ValueError, match="unknown float format"):
        round_to_format(xnp, x, "float7")
    with pytest.raises(TypeError, match="floating-point array .* got dtype int32"):
        round_to_format(xnp, np.ones(3, np.int32), fmt)
    with pytest.raises(TypeError, match="floating-point array"):
        round_to_format(jnp, jnp.ones(3, jnp.int32), fmt)
    with pytest.raises(ValueError, match="pass float64 input"):
        round_to_format(xnp, x, FloatFormat(5, 30))
    with pytest.raises(ValueError, match="pass float64 input"):
        round_to_format(xnp, x, FloatFormat(9, 3))
    with pytest.raises(ValueError, match="needs noise"):
        round_to_format(xnp, x, fmt, rounding="stochastic")
    with pytest.raises(TypeError, match="uint32"):
        round_to_format(xnp, x, fmt, rounding="stochastic", noise=np.ones(3, np.int32))
    with pytest.raises(ValueError, match="x's shape"):
        round_to_format(xnp, x, fmt, rounding="stochastic_equal", noise=np.ones(4, np.uint32))
    with pytest.raises(TypeError, match="array namespace"):
        round_to_format(object(), x, fmt)
    # float64 is fine for the wide format
    assert round_to_format(xnp, np.ones(3), FloatFormat(5, 30)).dtype == np.float64
