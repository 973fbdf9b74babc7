"""benchmarks/bench_lm_range_ceiling.py's ``RangeSearch`` against a brute-force search
written here (NumPy, float64 objectives): the chosen qparams reach the least objective
among round-to-nearest's and every (factor, integer zero point) candidate, on grouped
and per-output-channel grids, for the weight-l2 and the H-weighted objective.  (The
benchmark itself trains the example LM: minutes, not run here.)"""

import importlib.util
import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pychop_jax as pj
from pychop_jax.algorithms import KernelLayout, LayerStats

BENCH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_lm_range_ceiling.py")


def _load():
    name = "bench_lm_range_ceiling"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCH)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


def brute_force(w, h, bits, factors, s0):
    """Least objective per (group, column) of the matrix ``w (K, N)`` over every
    candidate ``(f s0, z)``, ``f`` in ``factors``, ``z`` in ``[0, 2^bits - 1]``;
    ``s0 (G, N)``: round-to-nearest's scale of each group of ``K / G`` consecutive rows;
    ``h``: ``None`` (weight l2) or the ``K x K`` matrix of ``e^T H_gg e``."""
    k, n = w.shape
    G = s0.shape[0]
    g = k // G
    qmax = 2 ** bits - 1
    best = np.full((G, n), np.inf)
    for gi in range(G):
        rows = slice(gi * g, (gi + 1) * g)
        hg = None if h is None else h[rows, rows]
        for col in range(n):
            wv = w[rows, col].astype(np.float32)
            for f in factors:
                s = np.float32(s0[gi, col] * np.float32(f))
                for z in range(qmax + 1):
                    q = np.clip(np.round(wv / s) + z, 0, qmax)
                    e = wv.astype(np.float64) - (q - z) * np.float64(s)
                    obj = e @ e if hg is None else e @ hg @ e
                    best[gi, col] = min(best[gi, col], obj)
    return best


def objective(w, values, h, G):
    """Per (group, column) objective of the quantized matrix ``values``."""
    k, n = w.shape
    g = k // G
    e = (w.astype(np.float64) - values.astype(np.float64)).reshape(G, g, n)
    if h is None:
        return np.sum(e * e, axis=1)
    out = np.empty((G, n))
    for gi in range(G):
        hg = h[gi * g:(gi + 1) * g, gi * g:(gi + 1) * g]
        out[gi] = np.einsum("kn,kl,ln->n", e[gi], hg, e[gi])
    return out


CASES = {
    # Dense (K=8, N=3), groups of 4 inputs along axis 0
    "grouped": (KernelLayout.dense(8, 3), dict(axis=0, group_size=4), 2),
    # DenseGeneral (2, 4, 3) contracting (0, 1): one range per output channel
    "per channel": (KernelLayout((2, 4, 3), (0, 1), (2,), (-2, -1)), dict(axis=-1), 1),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("objective_name", ["l2", "output"])
@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_range_search_finds_the_least_objective(case, objective_name, seed):
    bench = _load()
    layout, grid, G = CASES[case]
    rng = np.random.default_rng(seed)
    kernel = rng.standard_t(3, layout.shape).astype(np.float32)
    spec = pj.QuantSpec(bits=2, symmetric=False, **grid)
    x = rng.normal(size=(64, layout.k)) @ rng.normal(size=(layout.k, layout.k))
    x = x.astype(np.float32)
    h = None
    stats = None
    if objective_name == "output":
        stats = LayerStats(count=jnp.float32(64.0), hessian=jnp.asarray(x.T @ x))
        h = (x.T.astype(np.float64) @ x.astype(np.float64)) / 64
    method = bench.RangeSearch(objective_name, factors=9, lo=0.5, hi=1.1)
    result, details = method.apply(jnp.asarray(kernel), layout, spec, stats)

    # the result is on its own state's grid, in the kernel's layout
    state = result.state
    assert state.scale.shape == spec.scale_shape(layout.shape)
    np.testing.assert_array_equal(np.asarray(result.kernel), np.asarray(
        pj.fake_quant(jnp.asarray(kernel), state)))

    w = np.asarray(layout.matrix(jnp.asarray(kernel)))
    values = np.asarray(layout.matrix(result.kernel))
    got = objective(w, values, h, G)
    rtn_values = np.asarray(layout.matrix(pj.fake_quant(jnp.asarray(kernel),
                                                        pj.calibrate(jnp.asarray(kernel), spec))))
    rtn = objective(w, rtn_values, h, G)
    # one RTN scale per (group, column): the Dense groups' (K / g, N), the per-channel (1, 1, N)
    s0 = np.asarray(pj.calibrate(jnp.asarray(kernel), spec).scale).reshape(G, w.shape[1])
    want = np.minimum(brute_force(w, h, 2, method.grid(), s0), rtn)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert np.all(got <= rtn * (1 + 1e-5) + 1e-7)
    # the details are the summed objectives (float32 sums in the search)
    assert details["objective_rtn"] == pytest.approx(rtn.sum(), rel=1e-4)
    assert details["objective"] == pytest.approx(got.sum(), rel=1e-4)


def test_range_search_refuses_bad_settings():
    bench = _load()
    with pytest.raises(ValueError, match="objective"):
        bench.RangeSearch("l1")
    with pytest.raises(ValueError, match="factors"):
        bench.RangeSearch("l2", factors=0)
    with pytest.raises(ValueError, match="scale_dtype=None"):
        pj.QuantRule(".*", weight=pj.QuantSpec(bits=4, axis=0, group_size=32,
                                               scale_dtype="float16"),
                     method=bench.RangeSearch())
    assert bench.RangeSearch("output").statistics == frozenset({"hessian"})
    assert bench.RangeSearch("l2").statistics == frozenset()


def test_range_search_runs_in_calibrate_model_and_serves():
    """The benchmark's method through ``pj.calibrate_model`` (the layout read off the
    traced matmul, the result in the kernel's layout) equals ``apply`` on the layer's
    inputs, and serves as the calibrated model evaluates."""
    import flax.linen as nn
    import jax

    bench = _load()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 8, 64)).astype(np.float32))
    spec = pj.QuantSpec(bits=2, symmetric=False, axis=0, group_size=32)
    method = bench.RangeSearch("output", factors=9, lo=0.5, hi=1.1)
    qmodel = pj.quantize_model(nn.Dense(8), pj.QuantRule(".*", weight=spec, method=method))
    v = qmodel.init(jax.random.key(0), x)
    out, report = pj.calibrate_model(qmodel, v, [x])
    [entry] = report.layers
    assert entry.path == "kernel" and entry.method == "RangeSearch" and entry.rows == 16
    rows = np.asarray(x).reshape(-1, 64)
    stats = LayerStats(count=jnp.float32(16.0), hessian=jnp.asarray(rows.T @ rows))
    want, details = method.apply(v["params"]["kernel"], KernelLayout.dense(64, 8), spec, stats)
    result = out["quant_method"]["kernel"]
    np.testing.assert_allclose(result.kernel, want.kernel, rtol=1e-6, atol=1e-6)
    assert entry.details["objective"] <= entry.details["objective_rtn"]
    assert entry.details["objective"] == pytest.approx(details["objective"], rel=1e-4)
    served_fn, served = pj.serve_model(qmodel, out, x)
    np.testing.assert_allclose(served_fn(served, x), qmodel.apply(out, x), rtol=1e-5, atol=1e-5)
