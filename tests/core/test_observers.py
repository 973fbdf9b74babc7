"""Observers against independent references: NumPy percentiles, a brute-force MSE search
in float64 NumPy, the EMA update rule written out, and per-channel / per-group shapes."""

import array_api_compat.numpy as anp
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pychop_jax as pj
from pychop_jax import observers as ob

RNG = np.random.default_rng(0)
X = RNG.standard_normal((32, 6)).astype(np.float32) * np.linspace(0.5, 3, 6, dtype=np.float32)
PER_COL = pj.QuantSpec(bits=4, axis=1)
PER_TENSOR = pj.QuantSpec(bits=4)


def _np_range(x, axis):
    """min(min(x), 0), max(max(x), 0) over every axis but ``axis``, keepdims."""
    red = tuple(d for d in range(x.ndim) if d != axis)
    return np.minimum(x.min(red, keepdims=True), 0), np.maximum(x.max(red, keepdims=True), 0)


# -- minmax and ema -------------------------------------------------------------------------
def test_minmax_is_this_batch_and_counts():
    stats = ob.minmax(ob.init(PER_COL, X.shape), X * 3, PER_COL)
    stats = ob.minmax(stats, X, PER_COL)
    lo, hi = _np_range(X, 1)
    np.testing.assert_array_equal(stats.lo, lo)
    np.testing.assert_array_equal(stats.hi, hi)
    assert int(stats.count) == 2
    # the QuantState is the one calibrate computes from the same batch
    state = ob.quant_state(stats, PER_COL)
    ref = pj.calibrate(X, PER_COL)
    np.testing.assert_array_equal(state.scale, ref.scale)
    np.testing.assert_array_equal(state.zero_point, ref.zero_point)


def test_ema_update_rule():
    m = 0.75
    batches = [X, 2 * X + 1, X[::-1] - 3]
    stats = ob.init(PER_COL, X.shape)
    lo, hi = _np_range(batches[0], 1)  # the first batch initializes
    for i, b in enumerate(batches):
        stats = ob.ema(stats, b, PER_COL, momentum=m)
        if i:
            blo, bhi = _np_range(b, 1)
            lo, hi = m * lo + (1 - m) * blo, m * hi + (1 - m) * bhi
        np.testing.assert_allclose(stats.lo, lo, rtol=1e-6)
        np.testing.assert_allclose(stats.hi, hi, rtol=1e-6)
    assert int(stats.count) == 3


@pytest.mark.parametrize("momentum", [1.0, -0.1, 1.5, True, "0.9", None])
def test_bad_momentum_raises(momentum):
    with pytest.raises(ValueError, match=r"momentum must be .*\[0, 1\)"):
        ob.ema(ob.init(PER_COL, X.shape), X, PER_COL, momentum=momentum)


def test_momentum_zero_is_minmax_and_percentile_momentum_blends():
    s0 = ob.ema(ob.init(PER_TENSOR, X.shape), X * 5, PER_TENSOR, momentum=0.0)
    s0 = ob.ema(s0, X, PER_TENSOR, momentum=0.0)
    np.testing.assert_array_equal(s0.hi, ob.minmax(ob.init(PER_TENSOR, X.shape), X, PER_TENSOR).hi)
    p = ob.percentile(ob.init(PER_TENSOR, X.shape), X, PER_TENSOR, q=90.0, momentum=0.5)
    p = ob.percentile(p, 3 * X, PER_TENSOR, q=90.0, momentum=0.5)
    a = np.percentile(np.abs(X), 90)
    np.testing.assert_allclose(p.hi, [[0.5 * a + 0.5 * 3 * a]], rtol=1e-5)


# -- percentile --------------------------------------------------------------------------
@pytest.mark.parametrize("q", [50.0, 90.0, 99.0, 100.0])
def test_percentile_abs_matches_numpy_per_channel(q):
    stats = ob.percentile(ob.init(PER_COL, X.shape), X, PER_COL, q=q)
    a = np.percentile(np.abs(X), q, axis=0, keepdims=True)
    lo, hi = _np_range(X, 1)
    np.testing.assert_allclose(stats.hi, np.minimum(hi, a), rtol=1e-6)
    np.testing.assert_allclose(stats.lo, np.maximum(lo, -a), rtol=1e-6)


def test_percentile_tails_matches_numpy_per_tensor_and_on_a_middle_axis():
    stats = ob.percentile(ob.init(PER_TENSOR, X.shape), X + 0.5, PER_TENSOR, q=95.0, tails=True)
    np.testing.assert_allclose(stats.lo, [[min(np.percentile(X + 0.5, 5), 0)]], rtol=1e-6)
    np.testing.assert_allclose(stats.hi, [[np.percentile(X + 0.5, 95)]], rtol=1e-6)
    x3 = X.reshape(4, 8, 6).transpose(0, 2, 1)  # (4, 6, 8), channels on axis 1
    spec = pj.QuantSpec(bits=8, axis=1)
    stats = ob.percentile(ob.init(spec, x3.shape), x3, spec, q=80.0, tails=True)
    assert stats.hi.shape == (1, 6, 1)
    ref = np.percentile(x3, 80, axis=(0, 2), keepdims=True)
    np.testing.assert_allclose(stats.hi, np.maximum(ref, 0), rtol=1e-6)


def test_percentile_keeps_zero_for_one_sided_data():
    relu = np.maximum(X, 0)
    stats = ob.percentile(ob.init(PER_COL, X.shape), relu, PER_COL, q=90.0)
    np.testing.assert_array_equal(stats.lo, 0.0)
    np.testing.assert_allclose(stats.hi, np.percentile(relu, 90, axis=0, keepdims=True), rtol=1e-6)


def test_bad_percentile_raises():
    with pytest.raises(ValueError, match=r"q must be a percentile in \(0, 100\]"):
        ob.percentile(ob.init(PER_COL, X.shape), X, PER_COL, q=0)


# -- mse -----------------------------------------------------------------------------------
def _fake_quant_f64(x, lo, hi, bits, symmetric):
    """Independent float64 reference of the formulas in docs/numerics.md."""
    if symmetric:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        scale = max(-lo, hi) / qmax
        zp = 0
    else:
        qmin, qmax = 0, 2**bits - 1
        scale = (hi - lo) / (qmax - qmin)
        zp = np.clip(np.round(qmin - lo / scale), qmin, qmax)
    q = np.clip(np.round(x / scale) + zp, qmin, qmax)
    return (q - zp) * scale


@pytest.mark.parametrize("symmetric", [False, True])
def test_mse_matches_brute_force_search(symmetric):
    k = 20
    x = RNG.standard_normal((40, 3)) ** 3  # heavy tails: clipping pays off
    x = x.astype(np.float32)
    spec = pj.QuantSpec(bits=3, symmetric=symmetric, axis=1)
    stats = ob.mse(ob.init(spec, x.shape), x, spec, num_candidates=k)
    lo0, hi0 = _np_range(x.astype(np.float64), 1)
    clipped = []
    for c in range(3):
        col = x[:, c].astype(np.float64)
        errs = [np.sum((col - _fake_quant_f64(col, r * lo0[0, c], r * hi0[0, c], 3, symmetric))
                       ** 2) for r in np.arange(1, k + 1) / k]
        got = np.sum((col - _fake_quant_f64(col, float(stats.lo[0, c]), float(stats.hi[0, c]),
                                            3, symmetric)) ** 2)
        assert got <= min(errs) * (1 + 1e-5) + 1e-12
        clipped.append(min(errs) < errs[-1])
        # the chosen range is one of the candidates
        end, end0 = (stats.hi, hi0) if hi0[0, c] else (stats.lo, lo0)
        ratio = float(end[0, c]) / end0[0, c]
        assert abs(ratio * k - round(ratio * k)) < 1e-4
    assert any(clipped)  # somewhere the search beats the plain min/max range


def test_mse_keeps_full_range_for_uniform_data():
    x = np.linspace(-1, 1, 64, dtype=np.float32)[:, None]  # exactly on an 8-bit-ish grid
    spec = pj.QuantSpec(bits=2, symmetric=True, axis=None)
    stats = ob.mse(ob.init(spec, x.shape), x, spec, num_candidates=10)
    ref = min((np.sum((x - _fake_quant_f64(x, -r, r, 2, True)) ** 2), r)
              for r in np.arange(1, 11) / 10)
    np.testing.assert_allclose(stats.hi, [[ref[1]]], rtol=1e-6)


# -- shapes, namespaces, errors, transformations ---------------------------------------------
@pytest.mark.parametrize("spec, shape", [
    (pj.QuantSpec(), (1, 1, 1)),
    (pj.QuantSpec(axis=0), (2, 1, 1)),
    (pj.QuantSpec(axis=-1), (1, 1, 6)),
    (pj.QuantSpec(axis=2, group_size=3), (2, 4, 2)),
])
@pytest.mark.parametrize("observer", [ob.minmax, ob.ema, ob.percentile, ob.mse])
def test_state_shapes(spec, shape, observer):
    x = X[:8].reshape(2, 4, 6)
    stats = observer(ob.init(spec, x.shape), x, spec)
    assert stats.lo.shape == stats.hi.shape == shape
    assert np.all(np.asarray(stats.lo) <= 0) and np.all(np.asarray(stats.hi) >= 0)
    assert ob.quant_state(stats, spec).scale.shape == shape


def test_xp_estimators_agree_across_namespaces():
    for fn in (lambda xp, x: ob.percentile_range(xp, x, PER_COL, 97.0, tails=True),
               lambda xp, x: ob.mse_range(xp, x, PER_COL, num_candidates=16)):
        jlo, jhi = fn(jnp, jnp.asarray(X))
        nlo, nhi = fn(anp, X)
        np.testing.assert_allclose(jlo, nlo, rtol=1e-6)
        np.testing.assert_allclose(jhi, nhi, rtol=1e-6)
    lo, hi = ob.ema_update(anp, np.float32(-1), np.float32(2), np.int32(4), np.float32(-3),
                           np.float32(0), 0.5)
    assert (float(lo), float(hi)) == (-2.0, 1.0)


def test_eager_errors_and_traced_nan():
    stats = ob.init(PER_COL, X.shape)
    bad = X.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="observers.ema got 1 NaN"):
        ob.ema(stats, bad, PER_COL)
    with pytest.raises(ValueError, match=r"needs \(1, 6\)"):
        ob.minmax(ob.init(PER_COL, (32, 5)), X, PER_COL)
    with pytest.raises(TypeError, match="needs a RangeState"):
        ob.minmax(pj.calibrate(X, PER_COL), X, PER_COL)
    # under jit NaN is left out of the range
    traced = jax.jit(lambda s, x: ob.ema(s, x, PER_COL))(stats, bad)
    np.testing.assert_array_equal(traced.hi, _np_range(np.nan_to_num(bad), 1)[1])


def test_observers_scan_over_batches_under_jit():
    batches = X.reshape(4, 8, 6)

    @jax.jit
    def run(stats):
        return jax.lax.scan(lambda s, b: (ob.ema(s, b, PER_COL, momentum=0.5), None), stats,
                            batches)[0]

    stats = run(ob.init(PER_COL, (8, 6)))
    eager = ob.init(PER_COL, (8, 6))
    for b in batches:
        eager = ob.ema(eager, b, PER_COL, momentum=0.5)
    np.testing.assert_allclose(stats.hi, eager.hi, rtol=1e-6)
    assert int(stats.count) == 4
