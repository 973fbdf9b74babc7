"""pychop_jax.algorithms: GPTQ, AWQ, SmoothQuant, HQQ and calibrate_model.

Each algorithm is checked against a small NumPy reference written here from the
papers' formulas (float64; the JAX side runs under ``jax.enable_x64``), and against
round-to-nearest on the objective it optimizes.  The grid's round-to-nearest
reference is the README's formula, written again in NumPy.  The end-to-end tests
run tiny linen and nnx models, an ``nn.scan`` stack and plain functions through
quantize_model -> calibrate_model -> serve_model -> save/load_quantized; the
layouts the algorithms see come from the traced matmuls (``site_layout``).
"""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from quantize_model_fixtures import Single

import pychop_jax as pj
from pychop_jax.algorithms import (
    KernelLayout,
    awq_candidate,
    awq_clip_ratios,
    awq_search,
    gptq,
    hqq,
    lp_objective,
    site_layout,
    smoothquant_scales,
)
from pychop_jax.serving.algorithms.hqq import l2_range_search
from pychop_jax.transform.methods import MethodResult
from pychop_jax.transform.plan import METHOD, STATS

KEY = jax.random.key(0)


# -- NumPy references -------------------------------------------------------------------------
def np_qparams(w, bits, symmetric, axis):
    """Round-to-nearest qparams reducing over ``axis`` (README formulas, float64)."""
    if symmetric:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        scale = np.max(np.abs(w), axis=axis, keepdims=True) / qmax
        zp = np.zeros_like(scale)
    else:
        qmin, qmax = 0, 2**bits - 1
        lo = np.minimum(np.min(w, axis=axis, keepdims=True), 0)
        hi = np.maximum(np.max(w, axis=axis, keepdims=True), 0)
        scale = (hi - lo) / (qmax - qmin)
        scale = np.where(scale == 0, 1.0, scale)
        zp = np.clip(np.round(qmin - lo / scale), qmin, qmax)
    scale = np.where(scale == 0, 1.0, scale)
    return scale, zp, qmin, qmax


def np_rtn(w, scale, zp, qmin, qmax):
    """Codes and values of round-to-nearest."""
    q = np.clip(np.round(w / scale) + zp, qmin, qmax)
    return q, (q - zp) * scale


def np_gptq(w, h, bits, symmetric, group, damp, act_order):
    """GPTQ's sequential column loop (the paper's Algorithm 1 without lazy batching),
    rows of ``w (K, N)`` = input channels; groups' qparams when the group starts."""
    w = w.astype(np.float64).copy()
    h = h.astype(np.float64).copy()
    k = w.shape[0]
    fixed = np_qparams(w, bits, symmetric, axis=0) if group is None else None
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    w[dead] = 0
    static = None
    if act_order and group is not None:
        static = [np_qparams(w[i:i + group], bits, symmetric, axis=0) for i in range(0, k, group)]
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    w, h = w[perm], h[perm][:, perm]
    h += damp * np.mean(np.diag(h)) * np.eye(k)
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    q = np.zeros_like(w)
    params = fixed
    for i in range(k):
        if group is not None:
            if act_order:
                params = static[perm[i] // group]
            elif i % group == 0:
                params = np_qparams(w[i:i + group], bits, symmetric, axis=0)
        q[i] = np_rtn(w[i], *params)[1]
        err = (w[i] - q[i]) / u[i, i]
        w[i:] -= np.outer(u[i, i:], err)
        w[i] = q[i]
    out = np.zeros_like(q)
    out[perm] = q
    return out


def np_l2_range(w_rows, bits, symmetric, factors):
    """HQQ's start (hqq.py's module docstring), one row at a time: round-to-nearest's
    qparams, replaced by each candidate ``(f * s_rtn, clip(zc + d))`` whose weight l2
    error is strictly lower."""
    scale, zp, qmin, qmax = np_qparams(w_rows, bits, symmetric, axis=1)
    s_out, z_out = scale.copy(), zp.copy()
    for i, w in enumerate(w_rows):
        def l2(s, z, w=w):
            q = np.clip(np.round(w / s) + z, qmin, qmax)
            return float(np.sum((w - (q - z) * s) ** 2))
        best = l2(scale[i, 0], zp[i, 0])
        for f in factors:
            s = scale[i, 0] * f
            if symmetric:
                zs = [0.0]
            else:
                zc = np.round((qmin + qmax) / 2 - (w.min() + w.max()) * (0.5 / s))
                zs = [min(max(zc + d, qmin), qmax) for d in (-1, 0, 1)]
            for z in zs:
                e = l2(s, z)
                if e < best:
                    best, s_out[i, 0], z_out[i, 0] = e, s, z
    return s_out, z_out


def np_hqq(w_rows, bits, symmetric, iters, p, beta, kappa, optimize_scale, factors=None):
    """HQQ's iterations per row on the integer-zero-point grid (module docstring of
    hqq.py), keeping each row's best iterate on sum |r|^p (round-to-nearest's to begin
    with); they start from ``np_l2_range`` with ``factors``, else from round to nearest."""
    scale, zp, qmin, qmax = np_qparams(w_rows, bits, symmetric, axis=1)
    best_s, best_z = scale.copy(), zp.astype(np.float64)
    if factors is not None:
        scale, zp = np_l2_range(w_rows, bits, symmetric, factors)
    s, zf = scale.copy(), zp.astype(np.float64)

    def evaluate(s, zf):
        zi = np.clip(np.round(zf), qmin, qmax)
        q = np.clip(np.round(w_rows / s) + zi, qmin, qmax)
        r = w_rows - (q - zi) * s
        return zi, q, r, np.sum(np.abs(r) ** p, axis=1, keepdims=True)

    best = evaluate(best_s, best_z)[3]
    for _ in range(iters):
        zi, q, r, phi = evaluate(s, zf)
        better = phi < best
        best_s, best_z, best = np.where(better, s, best_s), np.where(better, zf, best_z), \
            np.minimum(phi, best)
        a = np.abs(r)
        e = np.sign(r) * np.maximum(a - (a + 1e-8) ** (p - 1) / beta, 0)
        t = w_rows - e
        if not symmetric:
            zf = np.clip(np.mean(q - t / s, axis=1, keepdims=True), qmin, qmax)
        if optimize_scale:
            c = q - np.clip(np.round(zf), qmin, qmax)
            den = np.sum(c * c, axis=1, keepdims=True)
            new = np.sum(c * t, axis=1, keepdims=True) / np.where(den > 0, den, 1)
            s = np.where((den > 0) & (new > 0), new, s)
        beta *= kappa
    phi = evaluate(s, zf)[3]
    better = phi < best
    return np.where(better, s, best_s), np.clip(np.round(np.where(better, zf, best_z)), qmin, qmax)


def outlier_inputs(rng, m, k, channels=(0, 5), factor=30.0):
    x = rng.normal(size=(m, k))
    x[:, list(channels)] *= factor
    return x


# ==== GPTQ ======================================================================================
GPTQ_CASES = [  # bits, symmetric, group, act_order, block
    (4, True, None, False, 16),
    (3, False, None, True, 16),
    (4, False, 16, False, 32),    # groups inside a block
    (4, True, 32, False, 16),     # a group spans two blocks
    (2, False, 16, True, 32),     # act_order with static groups
    (4, True, 8, False, 128),     # one block (block > K is cut to K)
]


@pytest.mark.parametrize("bits,symmetric,group,act_order,block", GPTQ_CASES)
def test_gptq_equals_the_sequential_column_loop(bits, symmetric, group, act_order, block):
    rng = np.random.default_rng(bits + 10 * (group or 0) + act_order)
    w = rng.normal(size=(64, 32)) * 0.1
    x = outlier_inputs(rng, 256, 64)
    x[:, 7] = 0  # a dead input channel
    h = 2 * x.T @ x / len(x)
    axis, g = (1, None) if group is None else (0, group)
    spec = pj.QuantSpec(bits=bits, symmetric=symmetric, axis=axis, group_size=g)
    expected = np_gptq(w, h, bits, symmetric, group, 0.01, act_order)
    with jax.enable_x64(True):
        values, state, _ = gptq(jnp.asarray(w), jnp.asarray(h), spec, damp=0.01,
                                act_order=act_order, block_size=block)
        np.testing.assert_allclose(np.asarray(values), expected, rtol=0, atol=1e-12)
        # every value is on the returned grid
        np.testing.assert_array_equal(pj.fake_quant(values, state), values)
    assert values.shape == (64, 32) and np.all(expected[7] == 0)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), bits=st.sampled_from([2, 4]),
       group=st.sampled_from([None, 32]), act_order=st.booleans(),
       symmetric=st.booleans())
def test_gptq_output_error_is_below_round_to_nearest(seed, bits, group, act_order, symmetric):
    rng = np.random.default_rng(seed)
    w = (rng.normal(size=(128, 48)) * 0.05).astype(np.float32)
    x = outlier_inputs(rng, 512, 128).astype(np.float32)
    axis = 1 if group is None else 0
    spec = pj.QuantSpec(bits=bits, symmetric=symmetric, axis=axis, group_size=group)
    values, _, _ = gptq(jnp.asarray(w), jnp.asarray(x.T @ x), spec, act_order=act_order)
    rtn = pj.fake_quant(jnp.asarray(w), pj.calibrate(jnp.asarray(w), spec))

    def err(q):
        return float(np.sum((x.astype(np.float64) @ (w - np.asarray(q, np.float64))) ** 2))

    assert err(values) < err(rtn)


def test_gptq_rejects_a_non_positive_definite_hessian():
    w = jnp.ones((8, 4))
    h = -jnp.eye(8)
    with pytest.raises(ValueError, match="not positive definite.*raise damp"):
        gptq(w, h, pj.QuantSpec(bits=4, symmetric=True, axis=1), damp=0.0)


# ==== HQQ =======================================================================================
@pytest.mark.parametrize("init", ["rtn", "l2"])
@pytest.mark.parametrize("symmetric,optimize_scale", [(False, False), (False, True),
                                                      (True, True)])
def test_hqq_equals_the_reference_iterations(symmetric, optimize_scale, init):
    rng = np.random.default_rng(3)
    w = rng.standard_t(3, size=(64, 48)) * 0.05  # heavy tails
    spec = pj.QuantSpec(bits=3, symmetric=symmetric, axis=0, group_size=16)
    rows = w.reshape(4, 16, 48).transpose(0, 2, 1).reshape(-1, 16)  # one row per group
    factors = None if init == "rtn" else np.linspace(0.6, 1.0, 9)
    s_ref, z_ref = np_hqq(rows, 3, symmetric, 20, 0.7, 10.0, 1.01, optimize_scale, factors)
    with jax.enable_x64(True):
        state, phi0, phi = hqq(jnp.asarray(w), spec, optimize_scale=optimize_scale, init=init,
                               init_grid=9, max_shrink=0.4)
        scale = np.asarray(state.scale).reshape(-1, 1)  # (groups, N): row g * N + n
        zp = np.asarray(state.zero_point).reshape(-1, 1)
        np.testing.assert_allclose(scale, s_ref, rtol=1e-12)
        np.testing.assert_array_equal(zp, z_ref)
        rtn = pj.calibrate(jnp.asarray(w), spec)
        np.testing.assert_allclose(phi0, lp_objective(jnp.asarray(w), rtn, 0.7), rtol=1e-12)
        np.testing.assert_allclose(phi, lp_objective(jnp.asarray(w), state, 0.7), rtol=1e-12)
    # zero point alone: its least-squares update rarely leaves round-to-nearest's integer
    phi, phi0 = float(phi), float(phi0)
    assert (phi < phi0) if optimize_scale else (phi <= phi0 * (1 + 1e-12))


def test_hqq_l2_start_equals_the_reference_search():
    """The start alone (the default 56 factors down to 0.5) against ``np_l2_range``; its
    weight l2 error is never above round to nearest's and, on heavy tails, below."""
    rng = np.random.default_rng(11)
    rows = rng.standard_t(2.5, size=(96, 32)) * 0.03
    rows[:4] = np.abs(rows[:4])  # all positive: zero point at the grid's end
    rows[4] = 0.0  # constant row: round-to-nearest's scale 1 stays
    factors = np.linspace(0.5, 1.0, 56)
    spec = pj.QuantSpec(bits=3, symmetric=False, axis=0)
    s_ref, z_ref = np_l2_range(rows, 3, False, factors)
    with jax.enable_x64(True):
        s, z = l2_range_search(jnp.asarray(rows), spec, tuple(factors))
        np.testing.assert_allclose(np.asarray(s), s_ref, rtol=1e-12)
        np.testing.assert_array_equal(np.asarray(z), z_ref)
    scale, zp, qmin, qmax = np_qparams(rows, 3, False, axis=1)
    err = lambda s, z: np.sum((rows - np_rtn(rows, s, z, qmin, qmax)[1]) ** 2, axis=1)  # noqa: E731
    e_rtn, e = err(scale, zp), err(s_ref, z_ref)
    assert np.all(e <= e_rtn) and np.sum(e) < 0.9 * np.sum(e_rtn)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), bits=st.sampled_from([2, 4]),
       group=st.sampled_from([None, 8]), optimize_scale=st.booleans(),
       dof=st.sampled_from([2.0, 5.0, 50.0]), init=st.sampled_from(["l2", "rtn"]))
def test_hqq_lp_objective_never_exceeds_round_to_nearest(seed, bits, group, optimize_scale, dof,
                                                         init):
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.standard_t(dof, size=(32, 24)).astype(np.float32) * 0.02)
    axis = -1 if group is None else 0
    spec = pj.QuantSpec(bits=bits, symmetric=False, axis=axis, group_size=group)
    state, phi0, phi = hqq(w, spec, optimize_scale=optimize_scale, init=init)
    rtn = pj.calibrate(w, spec)
    assert float(lp_objective(w, state, 0.7)) <= float(lp_objective(w, rtn, 0.7)) * (1 + 1e-6)
    assert state.scale.shape == rtn.scale.shape and state.zero_point.dtype == jnp.int32
    codes = pj.quantize(w, state)  # on the grid: codes in range, zero point integer
    assert int(codes.min()) >= spec.qmin and int(codes.max()) <= spec.qmax


# ==== AWQ =======================================================================================
def test_awq_search_equals_the_reference_grid_search():
    rng = np.random.default_rng(5)
    w = rng.normal(size=(48, 16)) * 0.1
    x = outlier_inputs(rng, 200, 48, channels=(1, 2, 30), factor=40.0)
    spec = pj.QuantSpec(bits=3, symmetric=True, axis=0, group_size=16)
    a = np.mean(np.abs(x), axis=0)
    expected = []
    for alpha in np.arange(20) / 20:
        s = np.maximum(a**alpha, 1e-4)
        s = s / np.sqrt(s.max() * s.min())
        ws = w * s[:, None]
        groups = ws.reshape(3, 16, 16)
        params = np_qparams(groups, 3, True, axis=1)
        q = np_rtn(groups, *params)[1].reshape(48, 16) / s[:, None]
        expected.append(np.mean((x @ w - x @ q) ** 2))
    with jax.enable_x64(True):
        errors = awq_search(jnp.asarray(w), jnp.asarray(x.T @ x / len(x)), jnp.asarray(a), spec,
                            KernelLayout.dense(48, 16), 20)
        np.testing.assert_allclose(np.asarray(errors)[::2], expected, rtol=1e-9)
        np.testing.assert_array_equal(errors[1::2], errors[::2])  # no clipping ratios
    assert int(np.argmin(expected)) > 0  # the outliers make a non-trivial alpha win


def np_range_qparams(lo, hi, bits, symmetric):
    """Qparams of the range ``[lo, hi]`` (``lo <= 0 <= hi``), README formulas."""
    if symmetric:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        scale = np.maximum(-lo, hi) / qmax
        zp = np.zeros_like(scale)
    else:
        qmin, qmax = 0, 2**bits - 1
        scale = (hi - lo) / (qmax - qmin)
        scale = np.where(scale == 0, 1.0, scale)
        zp = np.clip(np.round(qmin - lo / scale), qmin, qmax)
    return np.where(scale == 0, 1.0, scale), zp, qmin, qmax


def np_awq_clip(v, xs, bits, symmetric, group, pairs):
    """AWQ's clipping search written out: for each group of ``group`` rows of ``v`` and
    each output column, the factors ``(a, b)`` in ``pairs`` of round-to-nearest's range
    ``[lo, hi]`` -> ``[a lo, b hi]`` with the least error of the group's partial sums
    over the rows of ``xs`` (the first on ties); returns ``(a (G, N), b (G, N), Q)``."""
    k, n = v.shape
    r_lo, r_hi, q = np.ones((k // group, n)), np.ones((k // group, n)), np.zeros_like(v)
    for g in range(k // group):
        rows = slice(g * group, (g + 1) * group)
        vg = v[rows]
        hi = np.max(np.abs(vg), axis=0) if symmetric else np.maximum(vg.max(axis=0), 0)
        lo = -hi if symmetric else np.minimum(vg.min(axis=0), 0)
        errs, qs = [], []
        for a, b in pairs:
            qg = np_rtn(vg, *np_range_qparams(lo * a, hi * b, bits, symmetric))[1]
            errs.append(np.mean((xs[:, rows] @ (vg - qg)) ** 2, axis=0))
            qs.append(qg)
        best = np.argmin(np.array(errs), axis=0)
        r_lo[g] = np.asarray(pairs)[best, 0]
        r_hi[g] = np.asarray(pairs)[best, 1]
        q[rows] = np.stack(qs)[best, :, np.arange(n)].T
    return r_lo, r_hi, q


def test_awq_ratios():
    # 1 first, shrinks in steps of 1/clip_grid above 1 - max_shrink, growths up to 1 + max_grow
    assert pj.AWQ().ratios() == (1.0, *(1 - i / 40 for i in range(1, 20)),
                                 *(1 + i / 40 for i in range(1, 5)))
    assert pj.AWQ(clip_grid=20, max_grow=0.0).ratios() == tuple(1 - i / 20 for i in range(10))
    assert pj.AWQ(clip=False).ratios() == (1.0,)
    for bad in (dict(max_grow=-0.1), dict(max_shrink=1.0), dict(clip_grid=0),
                dict(ends="both")):
        with pytest.raises(ValueError, match="AWQ"):
            pj.AWQ(**bad)


@pytest.mark.parametrize("symmetric,group,independent", [
    (False, 16, False), (True, 16, False), (False, 48, False), (False, 16, True),
    (False, 48, True)])
def test_awq_clip_search_equals_the_reference(symmetric, group, independent):
    rng = np.random.default_rng(8)
    w = rng.standard_t(4, size=(48, 16)) * 0.1
    x = outlier_inputs(rng, 200, 48, channels=(1, 30), factor=20.0) @ \
        np.linalg.qr(rng.normal(size=(48, 48)))[0] * 0.3 + outlier_inputs(rng, 200, 48)
    a = np.mean(np.abs(x), axis=0)
    spec = pj.QuantSpec(bits=3, symmetric=symmetric, axis=0 if group < 48 else -1,
                        group_size=group if group < 48 else None)
    ratios = (1.0, 0.95, 0.9, 0.8, 0.7, 0.6, 1.05, 1.1)
    pairs = [(p, q) for p in ratios for q in ratios] if independent else [(r, r) for r in ratios]
    layout = KernelLayout.dense(48, 16)
    with jax.enable_x64(True):
        errors = np.asarray(awq_search(jnp.asarray(w), jnp.asarray(x.T @ x / len(x)),
                                       jnp.asarray(a), spec, layout, 20, ratios))
        for i in (0, 7, 13):
            alpha = i / 20
            s = np.maximum(a**alpha, 1e-4)
            s = s / np.sqrt(s.max() * s.min())
            r_lo, r_hi, q = np_awq_clip(w * s[:, None], x / s, 3, symmetric, group, pairs)
            err = np.mean((x @ w - (x / s) @ q) ** 2)
            got = awq_candidate(jnp.asarray(w), jnp.asarray(x.T @ x / len(x)), jnp.asarray(s),
                                spec, layout, ratios, independent)
            np.testing.assert_allclose(got[1], err, rtol=1e-9)
            np.testing.assert_array_equal(np.asarray(got[2]), r_lo)
            np.testing.assert_array_equal(np.asarray(got[3]), r_hi)
            chosen = awq_clip_ratios(jnp.asarray(w), jnp.asarray(x.T @ x / len(x)),
                                     jnp.asarray(s), spec, layout, ratios, independent)
            np.testing.assert_array_equal(np.asarray(chosen[0]), r_lo)
            if not independent:
                np.testing.assert_allclose(errors[2 * i + 1], err, rtol=1e-9)
            else:  # the two ends do move apart, and no group does worse than one factor
                assert np.any(r_lo != r_hi)
                shared = np_awq_clip(w * s[:, None], x / s, 3, symmetric, group,
                                     [(r, r) for r in ratios])[2]
                if group == 48:  # one group per column: the error is the group's own
                    assert err <= np.mean((x @ w - (x / s) @ shared) ** 2) * (1 + 1e-12)
    assert np.min(errors[1::2]) < np.min(errors[::2])  # clipping helps at 3 bits


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), bits=st.sampled_from([2, 3, 4]),
       grid=st.sampled_from(["g8", "channel", "tensor"]), symmetric=st.booleans(),
       joint=st.booleans(), ends=st.sampled_from(["independent", "shared"]))
def test_awq_output_error_never_exceeds_round_to_nearest(seed, bits, grid, symmetric, joint,
                                                         ends):
    """On a q/k/v-shaped DenseGeneral kernel (D, H, Dh): the served layer's error on
    the calibration rows is at most round-to-nearest's, and equals ``details``."""
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.normal(size=(32, 2, 8)).astype(np.float32) * 0.1)
    x = jnp.asarray(outlier_inputs(rng, 96, 32, factor=float(rng.uniform(1, 40)))
                    .astype(np.float32))
    spec = {"g8": pj.QuantSpec(bits=bits, symmetric=symmetric, axis=0, group_size=8),
            "channel": pj.QuantSpec(bits=bits, symmetric=symmetric, axis=0, group_size=32),
            "tensor": pj.QuantSpec(bits=bits, symmetric=symmetric)}[grid]
    layout = KernelLayout((32, 2, 8), (0,), (1, 2), (-1,))
    stats = pj.algorithms.batch_stats(x, pj.AWQ.statistics, 4096)
    result, details = pj.AWQ(joint=joint, ends=ends).apply(w, layout, spec, stats)
    assert result.input_scale.shape == (32, 1, 1)  # the kernel's layout: full on its input
    ref = jnp.einsum("mk,khd->mhd", x, w)
    served = jnp.einsum("mk,khd->mhd", x * result.input_scale.reshape(32), result.kernel)
    rtn = jnp.einsum("mk,khd->mhd", x, pj.fake_quant(w, pj.calibrate(w, spec)))
    err, err_rtn = float(jnp.mean((served - ref) ** 2)), float(jnp.mean((rtn - ref) ** 2))
    assert err <= err_rtn * (1 + 1e-4)
    np.testing.assert_allclose(err, details["error"], rtol=1e-3)
    np.testing.assert_allclose(err_rtn, details["rtn_error"], rtol=1e-3)
    assert result.state.scale.shape == spec.scale_shape(w.shape)
    np.testing.assert_array_equal(pj.fake_quant(result.kernel, result.state), result.kernel)
    if grid == "tensor":
        assert details["clip_mean"] == 1.0  # one range for the whole kernel: not clipped


def test_awq_result_output_error_is_at_most_round_to_nearest():
    rng = np.random.default_rng(6)
    w = jnp.asarray(rng.normal(size=(64, 32)).astype(np.float32) * 0.1)
    x = jnp.asarray(outlier_inputs(rng, 300, 64).astype(np.float32))
    spec = pj.QuantSpec(bits=4, symmetric=False, axis=0, group_size=32)
    layout = KernelLayout.dense(64, 32)
    stats = pj.algorithms.batch_stats(x, pj.AWQ.statistics, 4096)
    result, details = pj.AWQ().apply(w, layout, spec, stats)
    assert result.input_scale.shape == (64, 1)  # the kernel's layout
    served = (x * result.input_scale[:, 0]) @ result.kernel
    rtn = x @ pj.fake_quant(w, pj.calibrate(w, spec))
    err, err_rtn = float(jnp.mean((served - x @ w) ** 2)), float(jnp.mean((rtn - x @ w) ** 2))
    assert err < err_rtn
    np.testing.assert_allclose(err, details["error"], rtol=1e-3)
    np.testing.assert_allclose(err_rtn, details["rtn_error"], rtol=1e-3)
    # the stored kernel is on its own grid
    np.testing.assert_array_equal(pj.fake_quant(result.kernel, result.state), result.kernel)


# ==== SmoothQuant ================================================================================
def test_smoothquant_scales_follow_the_paper_and_preserve_the_product():
    rng = np.random.default_rng(7)
    w = rng.normal(size=(32, 8)) * 0.1
    x = outlier_inputs(rng, 100, 32)
    x[:, 3] = 0
    amax = np.max(np.abs(x), axis=0)
    for alpha in (0.0, 0.5, 0.85):
        expected = np.maximum(amax**alpha / np.maximum(np.abs(w).max(1), 1e-5) ** (1 - alpha), 1e-5)
        s = np.asarray(smoothquant_scales(jnp.asarray(amax), jnp.asarray(w), alpha))
        np.testing.assert_allclose(s, expected, rtol=1e-6)
        np.testing.assert_allclose((x / s) @ (w * s[:, None]), x @ w, rtol=1e-5, atol=1e-9)
    smoothed = np.max(np.abs(x / s), axis=0)
    assert smoothed.max() / np.median(smoothed) < amax.max() / np.median(amax)


# ==== layouts ====================================================================================
def gpt2_dense(params, x):
    """A transposed ``(out, in)`` kernel, as transformers' Flax GPT-2 applies it."""
    return x @ params["layer"]["kernel"].T


# name: (linen layer or function, input shape, the layout written out: in axes, out axes,
# the input axes contracted with the in axes)
LAYOUT_LAYERS = {
    "dense": (nn.Dense(6), (2, 3, 5), ((0,), (1,), (-1,))),
    "dense_general_in": (nn.DenseGeneral((2, 3), axis=-1), (2, 4, 5), ((0,), (1, 2), (-1,))),
    "dense_general_out": (nn.DenseGeneral(4, axis=(-2, -1)), (2, 3, 5),
                          ((0, 1), (2,), (-2, -1))),
    # flax sorts DenseGeneral's axes: its kernel is (3, 5, 4), as for axis=(-2, -1)
    "dense_general_swapped": (nn.DenseGeneral(4, axis=(-1, -2)), (2, 3, 5),
                              ((0, 1), (2,), (-2, -1))),
    "einsum_swapped": (nn.Einsum((5, 3, 4), "btd,dth->bh"), (2, 3, 5),
                       ((0, 1), (2,), (-1, -2))),
    "einsum": (nn.Einsum((5, 2, 3), "btd,dnh->btnh"), (2, 4, 5), ((0,), (1, 2), (-1,))),
    "einsum_middle": (nn.Einsum((4, 3), "bdt,dh->bth"), (2, 4, 5), ((0,), (1,), (-2,))),
    "gpt2_transposed": (gpt2_dense, (2, 3, 5), ((1,), (0,), (-1,))),
}


def one_weight_site(model, x, params=None):
    """``(site, weight, forward(kernel, x))`` of the one weight of ``model`` (a linen
    layer, put at path ``layer``, or a function ``f(params, x)``), from its traced call."""
    rule = pj.QuantRule(".*", weight=8)
    if isinstance(model, nn.Module):
        qmodel = pj.quantize_model(Single(model), rule)
        params = Single(model).init(KEY, x)["params"]
        params = {"layer": {k: jnp.zeros_like(a) if k == "bias" else a
                            for k, a in params["layer"].items()}}
        qmodel.report({"params": params}, x)

        def forward(kernel, x):
            return Single(model).apply({"params": {"layer": {**params["layer"],
                                                             "kernel": kernel}}}, x)
    else:
        qmodel = pj.quantize_model(model, rule)
        qmodel.report({"params": params}, x)

        def forward(kernel, x):
            return model({"layer": {"kernel": kernel}}, x)
    [weight] = qmodel.last_trace().graph.weights.values()
    assert weight.path == "layer/kernel"
    [site] = weight.uses
    return site, params["layer"]["kernel"], forward


@pytest.mark.parametrize("name", sorted(LAYOUT_LAYERS))
def test_layouts_read_off_traced_matmuls_turn_each_layer_into_rows_times_matrix(name):
    model, shape, axes = LAYOUT_LAYERS[name]
    x = jax.random.normal(jax.random.key(1), shape)
    params = None if isinstance(model, nn.Module) else \
        {"layer": {"kernel": jax.random.normal(jax.random.key(2), (6, 5))}}
    site, kernel, forward = one_weight_site(model, x, params)
    lay, stacked = site_layout(site, kernel.shape)
    assert stacked == () and lay == KernelLayout(kernel.shape, *axes)
    y = forward(kernel, x)
    rows, w = lay.rows(x), lay.matrix(kernel)
    np.testing.assert_allclose(np.sort((rows @ w).ravel()), np.sort(np.ravel(y)), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_array_equal(lay.kernel(w), kernel)
    v = jnp.arange(1.0, lay.k + 1)
    np.testing.assert_allclose(lay.rows(x * lay.input_vector(v)), rows * v, rtol=1e-6)
    # MethodResult.input_scale's layout: the same factor on the kernel's contracted axes
    scaled = lay.weight_vector(v)
    assert scaled.ndim == kernel.ndim and all(scaled.shape[a] == 1 for a in lay.out_axes)
    np.testing.assert_allclose(forward(kernel * scaled, x),
                               forward(kernel, x * lay.input_vector(v)), rtol=1e-5, atol=1e-5)


def test_site_layout_of_a_scanned_stack_is_one_layer_s():
    def stack(params, x):
        return jax.lax.scan(lambda h, w: (h @ w.T, None), x, params["layer"]["kernel"])[0]

    kernel = jax.random.normal(jax.random.key(3), (3, 5, 5))
    site, _, _ = one_weight_site(stack, jnp.ones((2, 5)), {"layer": {"kernel": kernel}})
    lay, stacked = site_layout(site, kernel.shape)
    assert stacked == (0,) and lay == KernelLayout((5, 5), (1,), (0,), (-1,))


def test_layouts_reject_uncovered_grids_and_layers():
    lay = KernelLayout.dense(16, 8)
    assert lay.plan(pj.QuantSpec(bits=4, axis=-1)) is None
    assert lay.plan(pj.QuantSpec(bits=4)) is None
    assert lay.plan(pj.QuantSpec(bits=4, axis=0, group_size=8)) == 8
    with pytest.raises(ValueError, match="per group along the last contracted axis"):
        lay.plan(pj.QuantSpec(bits=4, axis=0))  # per input channel
    with pytest.raises(ValueError, match="per group along the last contracted axis"):
        lay.plan(pj.QuantSpec(bits=4, axis=1, group_size=4))  # groups of outputs
    heads = KernelLayout((2, 8, 16), (0, 1), (2,), (-2, -1))  # an attention out projection
    assert heads.plan(pj.QuantSpec(bits=4, axis=1, group_size=8)) == 8
    with pytest.raises(ValueError, match="last contracted axis"):
        heads.plan(pj.QuantSpec(bits=4, axis=0, group_size=1))
    with pytest.raises(ValueError, match="split the kernel"):
        KernelLayout((4, 3), (0,), (0,), (-1,))
    with pytest.raises(ValueError, match="must be negative"):
        KernelLayout((4, 3), (0,), (1,), (1,))
    site, kernel, _ = one_weight_site(nn.Conv(4, (3,)), jnp.ones((2, 6, 3)))
    with pytest.raises(ValueError, match="cover dot_general weights, not conv_general_dilated"):
        site_layout(site, kernel.shape)
    site, kernel, _ = one_weight_site(nn.Einsum((2, 5, 3), "bld,bdh->blh"), jnp.ones((2, 4, 5)))
    with pytest.raises(ValueError, match="batch axes"):
        site_layout(site, kernel.shape)


# ==== rules =====================================================================================
def test_rules_validate_methods():
    with pytest.raises(TypeError, match="QuantMethod"):
        pj.QuantRule(".*", weight=4, method="gptq")
    with pytest.raises(ValueError, match="choose one"):
        pj.QuantRule(".*", weight=4, lsq=True, method=pj.GPTQ())
    with pytest.raises(ValueError, match="has no weight spec"):
        pj.QuantRule(".*", act=8, method=pj.AWQ())
    with pytest.raises(ValueError, match="no act spec"):
        pj.QuantRule(".*", weight=8, method=pj.SmoothQuant())
    with pytest.raises(ValueError, match="symmetric grid has no zero point"):
        pj.QuantRule(".*", weight=4, method=pj.HQQ(optimize_scale=False))
    with pytest.raises(ValueError, match="alpha"):
        pj.SmoothQuant(alpha=1.5)
    for bad, match in [(dict(init="mse"), "HQQ.init"), (dict(init_grid=1), "init_grid"),
                       (dict(max_shrink=1.0), "max_shrink")]:
        with pytest.raises(ValueError, match=match):
            pj.HQQ(**bad)
    rule = pj.QuantRule(".*", weight=4, method=pj.GPTQ(act_order=True))
    assert hash(rule) == hash(pj.QuantRule(".*", weight=4, method=pj.GPTQ(act_order=True)))


# ==== end to end ================================================================================
class LinenNet(nn.Module):
    """Dense -> attention (DenseGeneral q/k/v/out) -> Einsum; input outliers."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(16, name="inp")(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=2, name="attn", deterministic=True)(x)
        return nn.Einsum((16, 8), "btf,fd->btd", name="out")(nn.gelu(x))


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.inp = nnx.Linear(12, 16, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=16, decode=False, rngs=rngs)
        self.out = nnx.Einsum("btf,fd->btd", (16, 8), rngs=rngs)

    def __call__(self, x):
        x = self.inp(x)
        x = x + self.attn(x, deterministic=True)
        return self.out(nnx.gelu(x))


def batches(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(outlier_inputs(rng, 2 * 8, 12).reshape(2, 8, 12).astype(np.float32))
            for _ in range(n)]


W4G = pj.QuantSpec(bits=4, symmetric=False, axis=0, group_size=4)
W3 = pj.QuantSpec(bits=3, symmetric=False, axis=-1)
METHODS = {  # method, weight spec of the attention / output layers, act
    "gptq": (pj.GPTQ(act_order=True), W3, None),
    "awq": (pj.AWQ(), W3, None),
    "hqq": (pj.HQQ(), W3, None),
    "smoothquant": (pj.SmoothQuant(), 8, 8),
}


def rules_for(name):
    method, spec, act = METHODS[name]
    return [pj.QuantRule(".*attn/(query|key|value|out)", weight=spec, act=act, method=method,
                         observer="minmax"),
            pj.QuantRule("inp", weight=W4G if act is None else 8, act=act, method=method,
                         observer="minmax"),
            pj.QuantRule("out", weight=spec, act=act, method=method, observer="minmax")]


def rtn_rules(rules):
    return [pj.QuantRule(r.module_path, weight=r.weight, act=r.act, observer="minmax")
            for r in rules]


def mse(a, b):
    return float(jnp.mean((a - b) ** 2))


_LINEN_CACHE: dict = {}


def linen_calibrated(name):
    """``(qmodel, variables, calibrated, report, rtn model, rtn variables)`` of LinenNet
    under ``rules_for(name)``, computed once per module (the RTN baseline once per
    rule set: GPTQ, AWQ and HQQ share theirs)."""
    if name not in _LINEN_CACHE:
        data = batches()
        rules = rules_for(name)
        qmodel = pj.quantize_model(LinenNet(), rules)
        v = qmodel.init(KEY, data[0])
        calibrated, report = pj.calibrate_model(qmodel, v, data)
        key = ("rtn", tuple(rtn_rules(rules)))
        if key not in _LINEN_CACHE:
            rtn = pj.quantize_model(LinenNet(), rtn_rules(rules))
            _LINEN_CACHE[key] = (rtn, *pj.calibrate_model(rtn, v, data))
        _LINEN_CACHE[name] = (qmodel, v, calibrated, report, *_LINEN_CACHE[key])
    return _LINEN_CACHE[name]


#: MethodResult.input_scale's shape per kernel: inp (12, 16), q/k/v (16, 2, 8) contracting
#: D, attn out (2, 8, 16) contracting (H, Dh), out (16, 8)
INPUT_SCALE_SHAPES = {"inp": (12, 1), "attn/query": (16, 1, 1), "attn/key": (16, 1, 1),
                      "attn/value": (16, 1, 1), "attn/out": (2, 8, 1), "out": (16, 1)}
LINEN_PATHS = ["inp/kernel", "attn/query/kernel", "attn/key/kernel", "attn/value/kernel",
               "attn/out/kernel", "out/kernel"]  # parameter paths, in the order computed


@pytest.mark.parametrize("name", sorted(METHODS))
def test_linen_end_to_end(name, tmp_path):
    model = LinenNet()
    qmodel, v, calibrated, report, rtn, rtn_vars, rtn_report = linen_calibrated(name)
    assert rtn_report.layers == () and METHOD not in rtn_vars
    # every method weight was processed, in the order the model computes them; q/k/v
    # share their input, so one pass takes them
    assert [e.path for e in report.layers] == LINEN_PATHS
    if name != "hqq":
        steps = report.by_path()
        assert [steps[p].step for p in LINEN_PATHS] == [1, 2, 2, 2, 3, 4]
        assert report.passes == 4 and steps["inp/kernel"].rows == 3 * 16
    else:
        assert report.passes == 0
    # the results mirror the parameter tree, in the parameter's layout
    for path in LINEN_PATHS:
        node, param = calibrated[METHOD], calibrated["params"]
        for k in path.split("/"):
            node, param = node[k], param[k]
        assert isinstance(node, MethodResult) and node.kernel.shape == param.shape
        np.testing.assert_array_equal(pj.fake_quant(node.kernel, node.state), node.kernel)
        if name in ("awq", "smoothquant"):  # full on the contracted axes, 1 on the others
            assert node.input_scale.shape == INPUT_SCALE_SHAPES[path.rsplit("/", 1)[0]]
        else:
            assert node.input_scale is None
    np.testing.assert_array_equal(calibrated["params"]["inp"]["kernel"],
                                  v["params"]["inp"]["kernel"])  # params stay float
    x = batches(1, seed=9)[0]  # held-out
    fp = model.apply({"params": v["params"]}, x)
    y = qmodel.apply(calibrated, x)
    assert mse(y, fp) < mse(rtn.apply(rtn_vars, x), fp)
    served_fn, served = pj.serve_model(qmodel, calibrated, x)
    kernel = served["params"]["inp"]["kernel"]
    if name in ("awq", "smoothquant"):
        assert isinstance(kernel, pj.ScaledKernel)
        np.testing.assert_array_equal(kernel.input_scale,
                                      calibrated[METHOD]["inp"]["kernel"].input_scale)
    else:
        assert isinstance(kernel, pj.QuantizedArray)
    run = jax.jit(served_fn)
    y_served = run(served, x)
    np.testing.assert_allclose(y_served, y, rtol=1e-4, atol=1e-5)
    path = tmp_path / "served.msgpack"
    pj.save_quantized(path, served)
    loaded = pj.load_quantized(path)
    np.testing.assert_array_equal(run(loaded, x), y_served)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_nnx_end_to_end(name):
    data = batches()
    model = NnxNet(nnx.Rngs(0))
    rules = rules_for(name)
    x = batches(1, seed=9)[0]
    fp = model(x)
    qmodel = pj.quantize_model(model, rules)
    returned, report = pj.calibrate_model(qmodel, data)
    assert returned is qmodel  # in place, left in eval()
    assert [e.path for e in report.layers] == LINEN_PATHS
    assert report.passes == (0 if name == "hqq" else 4)
    rtn = pj.quantize_model(model, rtn_rules(rules))
    pj.calibrate_model(rtn, data)
    y = qmodel(x)
    if name in ("gptq", "smoothquant"):  # AWQ / HQQ: per layer only (see the linen test)
        assert mse(y, fp) < mse(rtn(x), fp)
    for e in report.layers:  # each layer no worse than RTN on its own objective
        if name == "awq":
            assert e.details["error"] <= e.details["rtn_error"]
        elif name == "hqq":
            assert e.details["lp"] <= e.details["lp_rtn"]
    assert isinstance(qmodel.quant_method.get_value()["inp"]["kernel"], MethodResult)
    assert not isinstance(model.inp.kernel[...], MethodResult)  # the float model untouched
    served = pj.serve_model(qmodel)
    np.testing.assert_allclose(served(x), y, rtol=1e-4, atol=1e-5)


def test_linen_and_nnx_give_the_same_results():
    """The same weights through both APIs: the same GPTQ kernels."""
    data = batches()
    nmodel = NnxNet(nnx.Rngs(0))
    rules = rules_for("gptq")

    class Linen(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(16, name="inp")(x)
            return nn.Einsum((16, 8), "btf,fd->btd", use_bias=False, name="out")(nn.gelu(x))

    class Nnx(nnx.Module):
        def __init__(self, src):
            self.inp, self.out = src.inp, src.out

        def __call__(self, x):
            return self.out(nnx.gelu(self.inp(x)))

    rules2 = [r for r in rules if "attn" not in r.module_path]
    params = {"inp": {"kernel": nmodel.inp.kernel[...], "bias": nmodel.inp.bias[...]},
              "out": {"kernel": nmodel.out.kernel[...]}}
    ql = pj.quantize_model(Linen(), rules2)
    v, _ = pj.calibrate_model(ql, {"params": params}, data)
    qn2 = pj.quantize_model(Nnx(nmodel), rules2)
    pj.calibrate_model(qn2, data)
    for name in ("inp", "out"):
        nnx_result = qn2.quant_method.get_value()[name]["kernel"]
        np.testing.assert_allclose(v[METHOD][name]["kernel"].kernel, nnx_result.kernel,
                                   rtol=1e-6, atol=1e-7)


class Two(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(8, use_bias=False, name="b")(nn.Dense(16, use_bias=False, name="a")(x))


def two_function(params, x):
    """``Two`` as a plain function."""
    return x @ params["a"]["kernel"] @ params["b"]["kernel"]


def two_transposed(params, x):
    """``Two`` with GPT-2's ``(out, in)`` kernels: ``x @ w.T``."""
    return x @ params["a"]["kernel"].T @ params["b"]["kernel"].T


@pytest.mark.parametrize("kind", ["linen", "function", "function, (out, in) kernels"])
def test_calibration_is_sequential_through_quantized_layers(kind):
    """The second layer's GPTQ Hessian comes from the first layer's GPTQ output -- for a
    linen model and a plain function (``quantize_model(f, rules)``, ``qf.init(params,
    x)``), whose kernels may be stored transposed: the layout comes from the matmul."""
    spec = pj.QuantSpec(bits=3, symmetric=True, axis=-1)
    data = [b.reshape(-1, 12) for b in batches()]
    rule = pj.QuantRule(".*", weight=spec, method=pj.GPTQ())
    params = Two().init(KEY, data[0])["params"]
    transposed = kind.endswith("kernels")
    if kind == "linen":
        qmodel = pj.quantize_model(Two(), rule)
        v = qmodel.init_from({"params": params}, data[0])
    else:
        if transposed:
            params = jax.tree.map(jnp.transpose, params)
        qmodel = pj.quantize_model(two_transposed if transposed else two_function, rule)
        v = qmodel.init(params, data[0])
    out, report = pj.calibrate_model(qmodel, v, data)
    assert [e.path for e in report.layers] == ["a/kernel", "b/kernel"] and report.passes == 2
    assert [e.step for e in report.layers] == [1, 2]
    matrix = (lambda w: w.T) if transposed else (lambda w: w)  # noqa: E731
    x = jnp.concatenate(data)
    wa = matrix(out[METHOD]["a"]["kernel"].kernel)
    np.testing.assert_allclose(wa, gptq(matrix(params["a"]["kernel"]), 2 * x.T @ x / len(x),
                                        spec)[0], rtol=1e-5, atol=1e-6)
    h = x @ wa  # the quantized first layer's output
    expected = gptq(matrix(params["b"]["kernel"]), 2 * h.T @ h / len(h), spec)[0]
    np.testing.assert_allclose(matrix(out[METHOD]["b"]["kernel"].kernel), expected, rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(qmodel.apply(out, x), x @ wa @ expected, rtol=1e-5, atol=1e-5)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = jnp.tanh(nn.Dense(16, use_bias=False, name="a")(x))
        return x + nn.Dense(x.shape[-1], use_bias=False, name="b")(h), None


class Stack(nn.Module):
    """Two ``Block`` s under ``nn.scan``: kernels ``layers/a/kernel (2, 12, 16)`` and
    ``layers/b/kernel (2, 16, 12)``."""

    @nn.compact
    def __call__(self, x):
        scanned = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                          length=2)
        return scanned(name="layers")(x, None)[0]


def test_calibration_of_a_scanned_stack_is_per_layer_and_sequential():
    """Each layer of an ``nn.scan`` stack is its own unit (``path[l]``), processed in the
    order the stack computes them, each Hessian from the layers before it quantized."""
    spec = pj.QuantSpec(bits=3, symmetric=True, axis=-1)
    data = [b.reshape(-1, 12) for b in batches()]
    qmodel = pj.quantize_model(Stack(), pj.QuantRule(".*", weight=spec, method=pj.GPTQ()))
    v = qmodel.init(KEY, data[0])
    out, report = pj.calibrate_model(qmodel, v, data)
    assert [e.path for e in report.layers] == ["layers/a/kernel[0]", "layers/b/kernel[0]",
                                               "layers/a/kernel[1]", "layers/b/kernel[1]"]
    assert [e.step for e in report.layers] == [1, 2, 3, 4] and report.passes == 4
    assert all(e.rows == 3 * 16 for e in report.layers)
    got = out[METHOD]["layers"]
    assert got["a"]["kernel"].kernel.shape == (2, 12, 16)
    assert got["a"]["kernel"].state.scale.shape == (2, 1, 16)  # one scale per layer, column
    params = v["params"]["layers"]
    h = jnp.concatenate(data)
    for layer in range(2):  # the sequential procedure, written out
        wa = gptq(params["a"]["kernel"][layer], 2 * h.T @ h / len(h), spec)[0]
        np.testing.assert_allclose(got["a"]["kernel"].kernel[layer], wa, rtol=1e-5, atol=1e-6)
        z = jnp.tanh(h @ wa)
        wb = gptq(params["b"]["kernel"][layer], 2 * z.T @ z / len(z), spec)[0]
        np.testing.assert_allclose(got["b"]["kernel"].kernel[layer], wb, rtol=1e-5, atol=1e-6)
        h = h + z @ wb
    np.testing.assert_allclose(qmodel.apply(out, jnp.concatenate(data)), h, rtol=1e-5,
                               atol=1e-5)


def test_smoothquant_observes_the_smoothed_inputs():
    data = batches()
    _, _, out, report, *_ = linen_calibrated("smoothquant")
    entry = report.by_path()["inp/kernel"]
    assert entry.details["outliers"] > 10 > entry.details["outliers_smoothed"]
    scale = out[METHOD]["inp"]["kernel"].input_scale
    assert scale.shape == (12, 1)  # the (12, 16) kernel's layout
    xs = jnp.concatenate(data) * scale[:, 0]
    rng_state = out[STATS]["inp"]["kernel"]["input"]
    np.testing.assert_allclose(rng_state.lo.ravel(), jnp.minimum(xs.min(), 0), rtol=1e-6)
    np.testing.assert_allclose(rng_state.hi.ravel(), jnp.maximum(xs.max(), 0), rtol=1e-6)
    assert "SmoothQuant" in str(report)


def test_calibrate_model_errors():
    data = batches()

    class WithConv(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Conv(4, (3,), name="conv")(x)

    qmodel = pj.quantize_model(WithConv(), pj.QuantRule(".*", weight=4, method=pj.GPTQ()))
    v = qmodel.init(KEY, data[0])
    with pytest.raises(ValueError, match="'conv/kernel' \\(GPTQ\\): the algorithms cover "
                                         "dot_general weights, not conv_general_dilated"):
        pj.calibrate_model(qmodel, v, data)

    class Lookup(nn.Module):  # a table only looked up: no matmul input to calibrate on
        @nn.compact
        def __call__(self, ids):
            return nn.Dense(4, name="head")(nn.Embed(16, 12, name="embed")(ids))

    ids = jnp.zeros((2, 8), jnp.int32)
    qmodel = pj.quantize_model(Lookup(), pj.QuantRule(".*", weight=4, method=pj.GPTQ()))
    with pytest.raises(ValueError, match="'embed/embedding' \\(GPTQ\\): .*used by one "
                                         "matmul; it has 0"):
        pj.calibrate_model(qmodel, qmodel.init(KEY, ids), [ids])

    def twice(params, x):  # one weight, two matmuls
        return x @ params["w"] + jnp.tanh(x) @ params["w"]

    qf = pj.quantize_model(twice, pj.QuantRule(".*", weight=4, method=pj.GPTQ()))
    x = data[0].reshape(-1, 12)
    with pytest.raises(ValueError, match="'w' \\(GPTQ\\): .*used by one matmul; it has 2"):
        pj.calibrate_model(qf, qf.init({"w": jnp.ones((12, 4))}, x), [x])

    class Batched(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Einsum((2, 12, 3), "bld,bdh->blh", name="heads")(x)

    qmodel = pj.quantize_model(Batched(), pj.QuantRule(".*", weight=4, method=pj.GPTQ()))
    with pytest.raises(ValueError, match="'heads/kernel'.*batch axes"):
        pj.calibrate_model(qmodel, qmodel.init(KEY, data[0]), data)
    qmodel = pj.quantize_model(nn.Dense(4), pj.QuantRule(".*", weight=4, method=pj.GPTQ()))
    v = qmodel.init(KEY, data[0])
    with pytest.raises(ValueError, match="no calibration batches"):
        pj.calibrate_model(qmodel, v, [])
    with pytest.raises(ValueError, match="NaN or inf"):
        pj.calibrate_model(qmodel, v, [data[0].at[0, 0, 0].set(jnp.nan)])
    with pytest.raises(TypeError, match="variables, batches"):
        pj.calibrate_model(qmodel, data)
    with pytest.raises(TypeError, match="not the float model"):
        pj.calibrate_model(nn.Dense(4), v, data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nq = pj.quantize_model(NnxNet(nnx.Rngs(0)), pj.QuantRule(".*", weight=4))
    with pytest.raises(TypeError, match="carries its own state"):
        pj.calibrate_model(nq, v, data)
