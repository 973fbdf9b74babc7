"""``xla_cpu.weight_only_matmul`` / ``int8_matmul``: every path (XLA's dot, the custom
call's scalar and AVX2 kernels) against float64 / int64 NumPy references computed here,
and the dispatch by rows and size."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pychop_jax.core import packing, xla_cpu
from pychop_jax.core.spec import QuantSpec

needs_kernel = pytest.mark.skipif(
    not xla_cpu.decode_kernels_available(),
    reason="the XLA:CPU custom call is not built (python setup.py build_ext --inplace)")

#: XLA's formulation (other platforms), its K-chunked loop (XLA:CPU without the custom
#: call), the custom call's portable and AVX2 decoding kernels and its AVX2 prefill GEMM
PATHS = ["xla", "chunk", "scalar", "avx2", "gemm"]


def _grid(bits, affine):
    """(qmin, qmax, stored dtype) of an integer grid."""
    if affine:
        return 0, 2**bits - 1, np.uint8
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1, np.int8


def _problem(rng, M, K, N, *, k_axis, bits, affine, packed, group):
    """x, stored codes, scale, zero point (storage layout), qmin, the float64 reference
    ``x @ W``, ``W = (q - z) * s``, its magnitude ``|x| @ ((|q| + |z|) s)`` (the float
    rounding scale) and ``W`` (logical ``(K, N)``, float64)."""
    qmin, qmax, dtype = _grid(bits, affine)
    x = rng.standard_normal((M, K)).astype(np.float32)
    q = rng.integers(qmin, qmax + 1, (K, N))  # logical (K, N)
    G = 1 if group is None else K // group
    s = (rng.random((G, N)) * 1.5 + 0.25).astype(np.float32)
    z = rng.integers(qmin, qmax + 1, (G, N)).astype(np.int32) if affine else None
    rep = lambda a: np.repeat(a.astype(np.float64), K // G, axis=0)  # noqa: E731
    zk = rep(z) if affine else 0.0
    w = (q - zk) * rep(s)
    ref = x.astype(np.float64) @ w
    mag = np.abs(x.astype(np.float64)) @ ((np.abs(q) + np.abs(zk) + abs(qmin)) * rep(s))
    stored = q if k_axis == 0 else q.T
    if packed:
        spec = QuantSpec(bits=bits, symmetric=not affine)
        codes = np.asarray(packing.pack(jnp.asarray(stored, spec.code_dtype), spec))
    else:
        codes = stored.astype(dtype)
    t = (lambda a: a) if k_axis == 0 else (lambda a: None if a is None else a.T)
    return x, np.ascontiguousarray(codes), np.ascontiguousarray(t(s)), (
        None if z is None else np.ascontiguousarray(t(z))), qmin, ref, mag, w


def _run(path, x, codes, scale, zero, **kw):
    def f(x, codes, scale, zero):
        w = xla_cpu._WeightOnly.of(x, codes, scale, zero, **kw)
        if path == "xla":
            return xla_cpu._wo_plain(w)
        if path == "chunk":  # small chunks, so that small K splits
            kc = xla_cpu._chunk_rows(w, 32)
            return xla_cpu._wo_plain(w) if kc is None else xla_cpu._wo_chunked(w, kc)
        return xla_cpu._wo_kernel(w, isa=0 if path == "scalar" else 1, gemm=path == "gemm")
    return np.asarray(jax.jit(f)(x, codes, scale, zero))


def _check(y, ref, mag):
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=2e-6 * float(np.max(mag)) + 1e-30)


@st.composite
def problems(draw):
    k_axis = draw(st.sampled_from([0, 1]))
    packed = draw(st.booleans())
    bits = draw(st.sampled_from([3, 4])) if packed else draw(st.sampled_from([4, 8]))
    affine = draw(st.booleans())
    M = draw(st.sampled_from([1, 2, 3, 4, 5, 7, 13]))
    grouped = draw(st.booleans())
    if grouped:
        group = draw(st.sampled_from([8, 16, 32]))
        K = group * draw(st.sampled_from([1, 2, 3]))
    else:
        group = None
        K = draw(st.sampled_from([8, 33, 64, 100]))
    N = draw(st.sampled_from([8, 33, 64, 70, 96]))
    return dict(M=M, K=K, N=N, k_axis=k_axis, bits=bits, affine=affine, packed=packed,
                group=group)


@needs_kernel
@settings(max_examples=40)
@given(problems(), st.integers(0, 2**32 - 1))
def test_every_path_matches_float64(case, seed):
    """Both layouts, packed or not, per column or per group, symmetric or affine, the
    row blocks (1-3) and column tails of the vector kernels."""
    rng = np.random.default_rng(seed)
    x, codes, s, z, qmin, ref, mag, _ = _problem(rng, **case)
    kw = dict(k_axis=case["k_axis"], group_size=case["group"], bits=case["bits"],
              packed=case["packed"], n=case["N"] if case["k_axis"] == 0 else case["K"],
              qmin=qmin if case["packed"] else None)
    for path in PATHS:
        _check(_run(path, x, codes, s, z, **kw), ref, mag)


@needs_kernel
@pytest.mark.parametrize("k_axis", [0, 1])
@pytest.mark.parametrize("packed", [False, True])
def test_gemm_blocks(k_axis, packed):
    """The prefill GEMM across its blocks: K over several 256-row blocks (the last one
    partial), groups that straddle them (48) or are not a multiple of 8 (12: scalar
    dequantization along K), whole 64 / 128-column blocks, a partial one and a partial
    16-column panel, row blocks of 6 and a remainder."""
    rng = np.random.default_rng(8)
    bits = 4 if packed else 8
    for M, K, N, group, affine in [(14, 576, 150, 48, False), (9, 600, 150, 12, True),
                                   (6, 520, 128, None, True), (5, 256, 16, None, False)]:
        x, codes, s, z, qmin, ref, mag, _ = _problem(rng, M, K, N, k_axis=k_axis, bits=bits,
                                                     affine=affine, packed=packed, group=group)
        _check(_run("gemm", x, codes, s, z, k_axis=k_axis, group_size=group, bits=bits,
                    packed=packed, n=N if k_axis == 0 else K, qmin=qmin if packed else None),
               ref, mag)


@pytest.mark.parametrize("path", ["xla", "chunk"])
def test_xla_paths_without_the_kernel(path):
    """The formulations without the custom call: 2-bit fields, chunks smaller and larger
    than the groups, packed along either axis."""
    rng = np.random.default_rng(1)
    for K, case in [(32, dict(k_axis=0, bits=8, affine=True, packed=False, group=None)),
                    (96, dict(k_axis=1, bits=4, affine=False, packed=True, group=16)),
                    (128, dict(k_axis=0, bits=4, affine=True, packed=True, group=64)),
                    (64, dict(k_axis=1, bits=2, affine=False, packed=True, group=None)),
                    (64, dict(k_axis=0, bits=2, affine=True, packed=True, group=8))]:
        x, codes, s, z, qmin, ref, mag, _ = _problem(rng, 3, K, 20, **case)
        _check(_run(path, x, codes, s, z, k_axis=case["k_axis"], group_size=case["group"],
                    bits=case["bits"], packed=case["packed"], n=K if case["k_axis"] else 20,
                    qmin=qmin), ref, mag)


def test_chunk_rows():
    """Chunks split K into whole groups (or lie inside one) and whole packed bytes."""
    def rows(K, groups, k_axis=0, packed=False, bits=8, target=256):
        w = xla_cpu._WeightOnly(None, None, jnp.ones((groups, 1) if k_axis == 0 else
                                                     (1, groups)), None, k_axis, packed,
                                bits, (K, 1) if k_axis == 0 else (1, K), -8)
        return xla_cpu._chunk_rows(w, target)
    assert rows(2048, 1) == 256 and rows(2048, 16) == 256 and rows(2048, 4) == 256
    assert rows(256, 1) == 128  # one chunk of the whole K is no split
    assert rows(96, 1) is None and rows(192, 2) is None and rows(192, 3) == 64
    assert rows(48, 1, k_axis=1, packed=True, bits=2, target=16) == 16
    assert rows(12, 1, k_axis=1, packed=True, bits=2, target=6) is None


def _lowered(fn, *args):
    return jax.jit(fn).lower(*args).as_text()


@needs_kernel
@pytest.mark.parametrize("k_axis", [0, 1])
def test_rows_thresholds_pick_the_formulation(k_axis, monkeypatch):
    """Up to WEIGHT_ONLY_MAX_ROWS rows the custom call's decoding kernels, above them its
    GEMM, past CHUNKED_MAX_ROWS too (no chunk loop, no dot); same values."""
    monkeypatch.setattr(xla_cpu, "KERNEL_MIN_WEIGHTS", 1)
    monkeypatch.setattr(xla_cpu, "CHUNKED_MAX_ROWS", xla_cpu.WEIGHT_ONLY_MAX_ROWS + 1)
    rng = np.random.default_rng(2)
    rows = xla_cpu.WEIGHT_ONLY_MAX_ROWS
    for M, gemm in [(rows, False), (rows + 1, True), (rows + 2, True)]:
        x, codes, s, z, _, ref, mag, _ = _problem(rng, M, 512, 48, k_axis=k_axis, bits=8,
                                                  affine=True, packed=False, group=None)
        f = lambda x, c, s, z: xla_cpu.weight_only_matmul(x, c, s, z, k_axis=k_axis)  # noqa: E731
        text = _lowered(f, x, codes, s, z)
        assert "pychop_wo_matmul" in text and "stablehlo.while" not in text
        assert f"gemm = {str(gemm).lower()}" in text
        _check(np.asarray(jax.jit(f)(x, codes, s, z)), ref, mag)


@needs_kernel
def test_size_threshold_and_unsupported_grids_take_xla():
    """Weights under KERNEL_MIN_WEIGHTS codes, 2-bit fields and odd groups packed along K
    are XLA's; a large enough 4-bit weight is the custom call."""
    rng = np.random.default_rng(3)
    n_big = -(-xla_cpu.KERNEL_MIN_WEIGHTS // 64)
    cases = [  # (K, N, kwargs of _problem, custom call expected)
        (64, n_big, dict(k_axis=0, bits=4, affine=False, packed=True, group=32), True),
        (64, 8, dict(k_axis=0, bits=4, affine=False, packed=True, group=32), False),
        (64, n_big, dict(k_axis=0, bits=2, affine=False, packed=True, group=None), False),
        (63 * 16, 64, dict(k_axis=1, bits=4, affine=True, packed=True, group=63), False),
    ]
    for K, N, kw, custom in cases:
        x, codes, s, z, qmin, ref, mag, _ = _problem(rng, 1, K, N, **kw)
        f = lambda x, c, s, z, kw=kw, K=K, N=N, qmin=qmin: xla_cpu.weight_only_matmul(  # noqa: E731
            x, c, s, z, k_axis=kw["k_axis"], group_size=kw["group"], bits=kw["bits"],
            packed=True, n=N if kw["k_axis"] == 0 else K, qmin=qmin)
        assert ("pychop_wo_matmul" in _lowered(f, x, codes, s, z)) == custom
        _check(np.asarray(jax.jit(f)(x, codes, s, z)), ref, mag)


def test_no_kernel_means_xla(monkeypatch):
    """Without the custom call (not built, ``PYCHOP_JAX_DECODE_KERNELS=0``) every size
    takes XLA: the chunk loop where K splits, else one dot."""
    monkeypatch.setattr(xla_cpu, "_kernels", -1)
    rng = np.random.default_rng(4)
    x, codes, s, z, _, ref, mag, _ = _problem(rng, 1, 512, 256, k_axis=0, bits=8, affine=False,
                                           packed=False, group=None)
    f = lambda x, c, s: xla_cpu.weight_only_matmul(x, c, s)  # noqa: E731
    text = _lowered(f, x, codes, s)
    assert "pychop_wo_matmul" not in text and "stablehlo.while" in text
    _check(np.asarray(jax.jit(f)(x, codes, s)), ref, mag)
    a = rng.integers(-128, 128, (1, 512)).astype(np.int8)
    assert "pychop_int8_matmul" not in _lowered(xla_cpu.int8_matmul, a, codes)
    x, codes, s, z, _, ref, mag, _ = _problem(rng, 1, 500, 256, k_axis=0, bits=8, affine=False,
                                              packed=False, group=None)
    text = _lowered(f, x, codes, s)
    assert "pychop_wo_matmul" not in text and "stablehlo.while" not in text
    _check(np.asarray(jax.jit(f)(x, codes, s)), ref, mag)
    monkeypatch.setenv("PYCHOP_JAX_DECODE_KERNELS", "0")
    assert xla_cpu._load_kernels() == -1


@needs_kernel
@pytest.mark.parametrize("k_axis", [0, 1])
def test_jit_bfloat16_and_out_dtype(k_axis):
    """A jitted serving-style call: bfloat16 activations (widened exactly), int4 per
    group packed, bfloat16 output; the custom call and XLA's dot agree."""
    rng = np.random.default_rng(5)
    K, N = 256, 512
    x, codes, s, z, qmin, _, mag, w = _problem(rng, 2, K, N, k_axis=k_axis, bits=4,
                                               affine=True, packed=True, group=64)
    xb = jnp.asarray(x, jnp.bfloat16)
    ref = np.asarray(xb, np.float64) @ w  # the product of the rounded x

    @jax.jit
    def serve(x, codes, s, z):
        return xla_cpu.weight_only_matmul(x, codes, s, z, k_axis=k_axis, group_size=64,
                                          bits=4, packed=True, qmin=qmin,
                                          out_dtype=jnp.bfloat16)

    assert "pychop_wo_matmul" in serve.lower(xb, codes, s, z).as_text()
    y = serve(xb, codes, s, z)
    assert y.dtype == jnp.bfloat16 and y.shape == (2, N)
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=1e-2,
                               atol=1e-2 * float(np.max(mag)))


def test_other_platforms_get_xla_dot():
    """Lowered for a GPU, the program holds no custom call (``lax.platform_dependent``)."""
    x = jnp.zeros((1, 512), jnp.float32)
    codes = jnp.zeros((512, 256), jnp.int8)
    s = jnp.ones((1, 256), jnp.float32)
    for fn, args in [(lambda x, c, s: xla_cpu.weight_only_matmul(x, c, s), (x, codes, s)),
                     (lambda a, b: xla_cpu.int8_matmul(a, b), (x.astype(jnp.int8), codes))]:
        exported = jax.export.export(jax.jit(fn), platforms=["cuda"])(*args)
        assert "custom_call @pychop" not in exported.mlir_module()


def test_argument_checks():
    x = np.zeros((1, 8), np.float32)
    packed = np.zeros((8, 4), np.uint8)
    with pytest.raises(ValueError, match="qmin"):
        xla_cpu.weight_only_matmul(x, packed, np.ones((1, 8)), packed=True, bits=4)
    with pytest.raises(ValueError, match="group"):
        xla_cpu.weight_only_matmul(x, np.zeros((8, 8), np.int8), np.ones((2, 8)))
    with pytest.raises(ValueError, match="columns"):
        xla_cpu.weight_only_matmul(x, np.zeros((4, 8), np.int8), np.ones((1, 8)))
    with pytest.raises(TypeError, match="int8"):
        xla_cpu.int8_matmul(np.zeros((1, 8), np.int16), np.zeros((8, 8), np.int8))
    with pytest.raises(ValueError, match="contract"):
        xla_cpu.int8_matmul(np.zeros((1, 8), np.int8), np.zeros((4, 8), np.int8))


# -- int8 x int8 -> int32 ---------------------------------------------------------------
def _int8_paths(a, b, b_k_axis):
    out = {"xla": jax.jit(lambda a, b: xla_cpu._int8_plain(a, b, b_k_axis))(a, b)}
    if xla_cpu.decode_kernels_available():
        for name, isa in (("scalar", 0), ("avx2", 1)):
            out[name] = jax.jit(lambda a, b, isa=isa: xla_cpu._int8_kernel(a, b, b_k_axis, isa))(
                a, b)
    return {k: np.asarray(v) for k, v in out.items()}


@settings(max_examples=30)
@given(st.sampled_from([1, 2, 3, 4, 5]), st.sampled_from([1, 7, 16, 33, 64, 130]),
       st.sampled_from([1, 31, 32, 64, 100]), st.sampled_from([0, 1]),
       st.integers(0, 2**32 - 1))
def test_int8_bit_for_bit(M, K, N, b_k_axis, seed):
    """Every path equals the int64 product exactly (extreme codes included: -128 * -128)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(-128, 128, (M, K)).astype(np.int8)
    b = rng.integers(-128, 128, (K, N)).astype(np.int8)
    a[0, 0] = b[0, 0] = -128
    want = a.astype(np.int64) @ b.astype(np.int64)
    stored = b if b_k_axis == 0 else np.ascontiguousarray(b.T)
    for path, got in _int8_paths(a, stored, b_k_axis).items():
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, want, err_msg=path)


@needs_kernel
@pytest.mark.parametrize("b_k_axis", [0, 1])
def test_int8_wraps_like_xla(b_k_axis):
    """A contraction past 2^31 wraps modulo 2^32 on every path, as XLA's int32 dot."""
    K = 1 << 17
    a = np.full((1, K), -128, np.int8)
    b = np.full((K, 32) if b_k_axis == 0 else (32, K), -128, np.int8)
    paths = _int8_paths(a, b, b_k_axis)
    assert np.all(paths["xla"] == np.int32(-(2**31)))
    for path, got in paths.items():
        np.testing.assert_array_equal(got, paths["xla"], err_msg=path)


@needs_kernel
@pytest.mark.parametrize("b_k_axis", [0, 1])
@pytest.mark.parametrize("large", [False, True])
def test_int8_rows_threshold(b_k_axis, large, monkeypatch):
    """INT8_MAX_ROWS rows for large weights, INT8_MAX_ROWS_SMALL below
    INT8_LARGE_WEIGHTS codes; XLA's dot above; same integers."""
    monkeypatch.setattr(xla_cpu, "KERNEL_MIN_WEIGHTS", 1)
    monkeypatch.setattr(xla_cpu, "INT8_LARGE_WEIGHTS", 64 * 96 if large else 64 * 96 + 1)
    rng = np.random.default_rng(6)
    b = rng.integers(-128, 128, (64, 96)).astype(np.int8)  # (K, N)
    stored = b if b_k_axis == 0 else np.ascontiguousarray(b.T)
    rows = xla_cpu.INT8_MAX_ROWS if large else xla_cpu.INT8_MAX_ROWS_SMALL
    for M, custom in [(rows, True), (rows + 1, False)]:
        a = rng.integers(-128, 128, (M, 64)).astype(np.int8)
        f = lambda a, b: xla_cpu.int8_matmul(a, b, b_k_axis=b_k_axis)  # noqa: E731
        assert ("pychop_int8_matmul" in _lowered(f, a, stored)) == custom
        want = a.astype(np.int64) @ b.astype(np.int64)
        np.testing.assert_array_equal(np.asarray(jax.jit(f)(a, stored)), want)


@needs_kernel
def test_concurrent_custom_calls_complete():
    """Independent custom calls in one program (XLA may run them at once on its pool,
    each scheduling chunks on the same pool) finish, with the right values."""
    rng = np.random.default_rng(7)
    xs = [rng.standard_normal((1, 512)).astype(np.float32) for _ in range(6)]
    codes = rng.integers(-128, 128, (512, 1024)).astype(np.int8)
    s = np.ones((1, 1024), np.float32)

    @jax.jit
    def many(xs, codes, s):
        return [xla_cpu.weight_only_matmul(x, codes, s) for x in xs]

    want = [x.astype(np.float64) @ codes for x in xs]
    for _ in range(20):
        for got, ref in zip(many(xs, codes, s), want, strict=True):
            np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-3)
