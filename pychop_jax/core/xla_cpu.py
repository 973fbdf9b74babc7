"""How the JAX kernels are scheduled on XLA:CPU: speed only, never values.

Everything here was measured on XLA's CPU backend (``docs/performance.md`` has the
figures), so each choice applies on CPU only: ``lax.platform_dependent`` gives every
other platform the plain formulation until it is measured there.  Every function
returns the same bits on every path (the tests run each path and compare):

* ``minmax`` / ``max_abs``: which XLA reductions compute a range (min and max are
  exact, so any reduction tree gives the same values);
* ``inside_step``: whether the range is part of a larger traced program (a user's
  training step), which changes the best reduction;
* ``cond``: a ``lax.cond`` between the exact formulation and a cheaper one that is
  only valid when a predicate holds (the pre-scale of ``numerics`` rule 4);
* ``jit_by_size``: kernels that run in one XLA task below ``ONE_TASK_MAX`` elements;
* ``weight_only_matmul`` / ``int8_matmul``: matrix products with integer weights: a C++
  custom call (``csrc/decode_matmul.cc``) where it was built (for weight-only, its
  decoding kernels at few rows and its GEMM at prefill sizes; for int8 x int8 at few
  rows), otherwise XLA (weights dequantized in K-chunks, or one dot); same values up to
  float rounding, int32 results bit for bit.

``numerics`` calls the first three; the adapters' engine (``pychop_jax.interop``)
``jit_by_size``; the last two are for serving.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import importlib.machinery
import math
import os
import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "SEPARATE_REDUCE_MAX",
    "SPLIT_REDUCE_MIN",
    "SPLIT_ROWS",
    "ONE_TASK_MAX",
    "inside_step",
    "minmax",
    "max_abs",
    "cond",
    "jit_by_size",
    "WEIGHT_ONLY_MAX_ROWS",
    "INT8_MAX_ROWS",
    "INT8_MAX_ROWS_SMALL",
    "INT8_LARGE_WEIGHTS",
    "KERNEL_MIN_WEIGHTS",
    "CHUNKED_MAX_ROWS",
    "WEIGHT_ONLY_CHUNK",
    "decode_kernels_available",
    "weight_only_matmul",
    "int8_matmul",
]

#: inside a traced step, whole-array reductions below this size are two reductions
SEPARATE_REDUCE_MAX = 1 << 17
#: whole-array reductions from this size on are done in two stages (rows first)
SPLIT_REDUCE_MIN = 1 << 20
#: rows a 1-D array is viewed as for a two-stage reduction
SPLIT_ROWS = 64
#: kernels of ``jit_by_size`` below this many elements run in one XLA task
ONE_TASK_MAX = 1 << 20

_in_step = contextvars.ContextVar("pychop_jax_in_step", default=False)


@contextlib.contextmanager
def inside_step(flag: bool = True):
    """While tracing under this context, ranges are reduced as parts of a larger
    program (a user's jitted training step) rather than as kernels of their own.

    The kernels that trace ``numerics`` take the flag as a static argument (so it is
    part of their compilation cache key) and enter this context around the trace.
    """
    token = _in_step.set(bool(flag))
    try:
        yield
    finally:
        _in_step.reset(token)


def _on_cpu(tuned, plain, *args):
    """``tuned(*args)`` on XLA:CPU, ``plain(*args)`` on every other platform."""
    return lax.platform_dependent(*args, cpu=tuned, default=plain)


# -- reductions -----------------------------------------------------------------------
def minmax(x, axes):
    """``(min, max)`` of ``x`` over ``axes`` with keepdims (``x`` has no NaN).

    On XLA:CPU:

    * only major axes reduced (per column): two single-output reductions;
    * inside a traced step (``inside_step``) and the whole array under
      ``SEPARATE_REDUCE_MAX`` elements: two reductions (XLA's YNNPACK kernels, faster
      inside a larger fusion; slower as a kernel of their own);
    * the whole array from ``SPLIT_REDUCE_MIN`` elements: row reductions, then one
      over the rows (``_split``);
    * otherwise one variadic reduction, which reads ``x`` once.
    """
    plain = lambda x: (jnp.min(x, axis=axes, keepdims=True),  # noqa: E731
                       jnp.max(x, axis=axes, keepdims=True))
    whole = len(axes) == x.ndim
    separate = _in_step.get() and whole and x.size < SEPARATE_REDUCE_MAX
    if x.ndim - 1 not in axes or separate:
        return plain(x)

    def tuned(x):
        keep = tuple(1 if d in axes else n for d, n in enumerate(x.shape))
        if _splits(x, axes):
            rows, first = _rows(x)
            row_lo, row_hi = _variadic_minmax(rows, first)
            lo, hi = jnp.min(row_lo), jnp.max(row_hi)
        else:
            lo, hi = _variadic_minmax(x, axes)
        return jnp.reshape(lo, keep), jnp.reshape(hi, keep)

    return _on_cpu(tuned, plain, x)


def max_abs(a, axes):
    """``max(a)`` over ``axes`` with keepdims, for ``a = |x|``: in two stages for
    large whole arrays on XLA:CPU, like ``minmax``."""
    plain = lambda a: jnp.max(a, axis=axes, keepdims=True)  # noqa: E731
    if not _splits(a, axes):
        return plain(a)

    def tuned(a):
        rows, first = _rows(a)
        return jnp.reshape(jnp.max(jnp.max(rows, axis=first)), (1,) * a.ndim)

    return _on_cpu(tuned, plain, a)


def _variadic_minmax(x, axes):
    """One XLA reduction computing ``(min, max)`` over ``axes`` (keepdims=False)."""
    big = jnp.asarray(np.inf, dtype=x.dtype)
    return lax.reduce(
        (x, x), (big, -big), lambda a, b: (lax.min(a[0], b[0]), lax.max(a[1], b[1])), axes
    )


def _splits(x, axes) -> bool:
    """Whether a reduction over ``axes`` is done in two stages: the whole array,
    ``SPLIT_REDUCE_MIN`` elements or more, and ``_rows`` applies."""
    return (len(axes) == x.ndim and x.size >= SPLIT_REDUCE_MIN
            and (x.ndim > 1 or x.size % SPLIT_ROWS == 0))


def _rows(x):
    """``x`` and the axes to reduce first, leaving one value per row: the leading
    axis for 2-D and higher inputs, ``SPLIT_ROWS`` rows for a 1-D one.

    No slicing: inside a larger program a sliced-and-reshaped view of a fused
    producer made XLA:CPU's reduction several times slower.
    """
    if x.ndim == 1:
        x = jnp.reshape(x, (SPLIT_ROWS, -1))
    return x, tuple(range(1, x.ndim))


# -- branches -------------------------------------------------------------------------
def cond(pred, exact, cheap):
    """``exact()``, or on XLA:CPU ``lax.cond(pred, exact, cheap)``.

    ``cheap()`` must give the bits of ``exact()`` whenever ``pred`` is false; the
    branch saves its extra work in the common case.
    """
    return _on_cpu(lambda: lax.cond(pred, exact, cheap), exact)


# -- kernels --------------------------------------------------------------------------
#: XLA:CPU splits a loop over more than 256 KB of output into tasks for its own thread
#: pool; ``jit_by_size``'s small kernels are compiled without that split
_ONE_TASK = {"xla_disable_hlo_passes": "cpu-parallel-task-assigner"}


def jit_by_size(fun, static_argnames):
    """``fun`` jitted twice: ``kernel_for(arrays)`` picks the one-task compilation
    when every array has fewer than ``ONE_TASK_MAX`` elements, XLA's default (a
    parallel task split) otherwise.

    For kernels that run inside another framework's program (a Torch training step),
    whose thread pool still spins on the other cores: there XLA's second task waits
    for a core, and for small arrays the split costs more than it saves.  The
    compiler option names an XLA:CPU pass, so these kernels are for CPU arrays.
    """
    default = jax.jit(fun, static_argnames=static_argnames)
    one_task = jax.jit(fun, static_argnames=static_argnames, compiler_options=_ONE_TASK)

    def kernel_for(arrays):
        small = max(math.prod(a.shape) for a in arrays) < ONE_TASK_MAX
        return one_task if small else default

    return kernel_for


# -- integer-weight matmuls (decoding, prefill) ------------------------------------------
#: ``weight_only_matmul`` takes the custom call's decoding kernels up to this many rows
#: of ``x``, its prefill GEMM above
WEIGHT_ONLY_MAX_ROWS = 8
#: ``int8_matmul`` takes the custom call up to this many rows of ``a`` ...
INT8_MAX_ROWS = 8
#: ... or this many for weights under ``INT8_LARGE_WEIGHTS`` codes (XLA's int8 dot was
#: as fast or faster at 8 rows there)
INT8_MAX_ROWS_SMALL = 4
INT8_LARGE_WEIGHTS = 1 << 20
#: ... and only for weights of at least this many codes (K * N)
KERNEL_MIN_WEIGHTS = 1 << 16
#: without the custom call (or for what it does not take), up to this many rows, the
#: weights are dequantized in chunks of ``WEIGHT_ONLY_CHUNK`` rows of K (``_wo_chunked``),
#: when K splits into them
CHUNKED_MAX_ROWS = 256
WEIGHT_ONLY_CHUNK = 256

_KERNEL_ENV = "PYCHOP_JAX_DECODE_KERNELS"  # "0": never use the custom call
_kernels = None  # ISA of the loaded custom call (0 scalar, 1 AVX2), or -1: none


def decode_kernels_available() -> bool:
    """Whether the custom call of ``weight_only_matmul`` / ``int8_matmul`` is built,
    registered with XLA:CPU and has its AVX2 kernels on this CPU (the only ones
    measured); ``PYCHOP_JAX_DECODE_KERNELS=0`` (read at first use) keeps to XLA.

    Programs with the custom call cannot be serialized with ``jax.export`` (a target
    without compatibility guarantees); export with the variable set to 0."""
    return _kernel_isa() >= 1


def _kernel_isa() -> int:
    global _kernels
    if _kernels is None:
        _kernels = _load_kernels()
    return _kernels


def _load_kernels() -> int:
    if os.environ.get(_KERNEL_ENV, "1") == "0":
        return -1
    here = pathlib.Path(__file__).parent
    paths = [p for suffix in importlib.machinery.EXTENSION_SUFFIXES
             for p in here.glob(f"_decode_matmul{suffix}")]
    if not paths:
        return -1
    try:
        lib = ctypes.CDLL(str(paths[0]))
        for name, symbol in (("pychop_wo_matmul", lib.PychopWoMatmul),
                             ("pychop_int8_matmul", lib.PychopInt8Matmul)):
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(symbol), platform="cpu")
        isa = int(lib.PychopDecodeIsa())
        _self_test()
    except Exception as exc:  # an ABI mismatch with this jaxlib, a stale build, ...
        warnings.warn(f"pychop_jax: the XLA:CPU decoding kernels are not used ({exc}); "
                      "XLA's dot is used instead.", RuntimeWarning, stacklevel=3)
        return -1
    return isa


def _self_test():
    """One small product of each kernel (weight-only: decoding and GEMM) against NumPy,
    on CPU: a build that does not match this jaxlib's FFI fails here instead of in a
    user's program."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    codes = rng.integers(-128, 128, (64, 48)).astype(np.int8)
    scale = (rng.random((1, 48)) + 0.5).astype(np.float32)
    cpu = jax.devices("cpu")[0]

    def wo(x, c, s, gemm):
        return _wo_kernel(_WeightOnly.of(x, c, s, None, k_axis=0, group_size=None, bits=8,
                                         packed=False, n=None, qmin=None), isa=1, gemm=gemm)

    # first use may be inside a user's jit trace: run these calls now, eagerly
    with jax.ensure_compile_time_eval(), jax.default_device(cpu):
        got = [np.asarray(jax.jit(wo, static_argnums=3)(x, codes, scale, gemm))
               for gemm in (False, True)]
        a = np.ascontiguousarray(codes[:, :3].T)
        exact = np.asarray(jax.jit(lambda a, b: _int8_kernel(a, b, 0, isa=1))(a, codes))
    want = x.astype(np.float64) @ (codes * scale.astype(np.float64))
    if not all(np.allclose(g, want, rtol=1e-5, atol=1e-4) for g in got):
        raise RuntimeError("weight_only_matmul self-test mismatch")
    if not np.array_equal(exact, a.astype(np.int64) @ codes.astype(np.int64)):
        raise RuntimeError("int8_matmul self-test mismatch")


class _WeightOnly:
    """The validated operands of ``weight_only_matmul``: codes in their storage layout,
    scale and zero point (code units, or ``None``) broadcast to one value per group and
    output column in that layout, ``(K, N)``, groups ``G``, field offset ``qmin``."""

    def __init__(self, x, codes, scale, zero_point, k_axis, packed, bits, shape, qmin):
        self.x, self.codes, self.scale, self.zero = x, codes, scale, zero_point
        self.k_axis, self.packed, self.bits, self.qmin = k_axis, packed, bits, qmin
        self.shape = shape  # unpacked storage shape
        self.K = shape[k_axis]
        self.N = shape[1 - k_axis]
        self.G = None if scale is None else scale.shape[k_axis]

    @classmethod
    def of(cls, x, codes, scale, zero_point, *, k_axis, group_size, bits, packed, n, qmin):
        x, codes = jnp.asarray(x), jnp.asarray(codes)
        if k_axis not in (0, 1):
            raise ValueError(f"weight_only_matmul: k_axis must be 0 or 1, got {k_axis}.")
        if x.ndim != 2 or codes.ndim != 2:
            raise ValueError("weight_only_matmul: x and codes must be 2-D, got shapes "
                             f"{x.shape} and {codes.shape}.")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"weight_only_matmul: x must be a float array, got {x.dtype}.")
        if packed:
            if codes.dtype != jnp.uint8 or not 1 <= bits <= 4:
                raise ValueError("weight_only_matmul: packed codes are the uint8 bytes of "
                                 "pychop_jax.core.packing.pack for bits <= 4, got "
                                 f"{codes.dtype} with bits={bits}.")
            if qmin is None:
                raise ValueError("weight_only_matmul: packed codes store q - qmin; pass "
                                 "qmin=spec.qmin (e.g. -8 for symmetric int4, 0 for affine).")
            per_byte = 2 if bits > 2 else 4
            last = per_byte * codes.shape[1] if n is None else int(n)
            if -(-last // per_byte) != codes.shape[1]:
                raise ValueError(f"weight_only_matmul: {codes.shape[1]} packed bytes per row "
                                 f"do not hold n={last} codes of {bits} bits.")
            shape = (codes.shape[0], last)
        else:
            if codes.dtype not in (jnp.int8, jnp.uint8):
                raise ValueError("weight_only_matmul: codes must be int8 or uint8 "
                                 f"(or packed uint8), got {codes.dtype}.")
            shape = codes.shape
        K = shape[k_axis]
        if x.shape[1] != K:
            raise ValueError(f"weight_only_matmul: x has {x.shape[1]} columns, the codes "
                             f"{K} rows along k_axis={k_axis} (storage shape {shape}).")
        scale = jnp.asarray(scale, jnp.float32)
        if scale.ndim != 2:
            scale = jnp.reshape(scale, (1,) * (2 - scale.ndim) + scale.shape)
        groups = scale.shape[k_axis]
        if group_size is not None:
            if K % group_size:
                raise ValueError(f"weight_only_matmul: group_size={group_size} does not "
                                 f"divide K={K}.")
            if groups not in (1, K // group_size):
                raise ValueError(f"weight_only_matmul: the scale has {groups} values along "
                                 f"K; groups of {group_size} need {K // group_size}.")
        elif groups not in (1, K):
            raise ValueError(f"weight_only_matmul: the scale varies along K ({groups} values) "
                             "but group_size is not given.")
        if groups > 1 and K % groups:
            raise ValueError(f"weight_only_matmul: {groups} groups do not divide K={K}.")
        target = (groups, shape[1]) if k_axis == 0 else (shape[0], groups)
        try:
            scale = jnp.broadcast_to(scale, target)
            if zero_point is not None:
                zero_point = jnp.broadcast_to(jnp.asarray(zero_point, jnp.float32), target)
        except ValueError:
            raise ValueError(f"weight_only_matmul: scale {jnp.shape(scale)} / zero point "
                             f"{jnp.shape(zero_point)} do not broadcast to one value per "
                             f"group and output column, {target}.") from None
        return cls(x, codes, scale, zero_point, k_axis, packed, bits, shape, qmin)

    def unpacked_codes(self):
        """int32 codes q of the storage shape (packed fields + qmin)."""
        if not self.packed:
            return self.codes.astype(jnp.int32)
        w = 4 if self.bits > 2 else 2
        shifts = jnp.arange(0, 8, w, dtype=jnp.uint8)
        fields = (self.codes[..., None] >> shifts) & np.uint8(2**w - 1)
        fields = fields.reshape(self.codes.shape[0], -1)[:, :self.shape[1]]
        return fields.astype(jnp.int32) + self.qmin

    def kernel_applies(self) -> bool:
        """What the custom call takes: one byte per code or 4-bit fields, whole groups
        of fields (an even group size when packed along K)."""
        if self.packed and self.bits <= 2:
            return False
        if self.packed and self.k_axis == 1 and self.G > 1 and (self.K // self.G) % 2:
            return False
        return self.K * self.N >= KERNEL_MIN_WEIGHTS


def _expand(a, k_axis, K):
    """Per-group values repeated along K (storage layout)."""
    return jnp.repeat(a, K // a.shape[k_axis], axis=k_axis) if a.shape[k_axis] > 1 else a


def _wo_plain(w: _WeightOnly):
    """``x @ ((q - z) * s)`` with the weights dequantized in float32, one
    ``dot_general`` (XLA's formulation, and every other platform's)."""
    q = w.unpacked_codes().astype(jnp.float32)
    if w.zero is not None:
        q = q - _expand(w.zero, w.k_axis, w.K)
    weights = q * _expand(w.scale, w.k_axis, w.K)
    return lax.dot_general(w.x.astype(jnp.float32), weights, (((1,), (w.k_axis,)), ((), ())),
                           precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)


def _chunk_rows(w: _WeightOnly, target: int | None = None) -> int | None:
    """The K-chunk of ``_wo_chunked`` for these weights: ``target`` (default
    ``WEIGHT_ONLY_CHUNK``), half or a quarter of it, whichever first splits K into
    several pieces of whole groups and whole packed bytes; else ``None``."""
    target = WEIGHT_ONLY_CHUNK if target is None else target
    gs = w.K // w.G
    for kc in (target, target // 2, target // 4):
        whole_groups = w.G == 1 or kc % gs == 0 or gs % kc == 0
        whole_bytes = not (w.packed and w.k_axis == 1) or kc % (2 if w.bits > 2 else 4) == 0
        if 0 < kc < w.K and w.K % kc == 0 and whole_groups and whole_bytes:
            return kc
    return None


def _wo_chunked(w: _WeightOnly, kc: int):
    """``_wo_plain`` over chunks of ``kc`` rows of K in a ``fori_loop``: each chunk is
    dequantized into a buffer that stays in cache and is reused, then multiplied (the
    whole float32 weight, written once per call, made ``_wo_plain`` 2-16x slower than
    the float32 dot on XLA:CPU)."""
    x = w.x.astype(jnp.float32)
    gs = w.K // w.G
    per_byte = 2 if w.bits > 2 else 4
    def piece(a, start, size):
        return lax.dynamic_slice_in_dim(a, start, size, axis=w.k_axis)

    def body(i, acc):
        k0 = i * kc
        if w.packed and w.k_axis == 1:
            codes = piece(w.codes, k0 // per_byte, kc // per_byte)
        else:
            codes = piece(w.codes, k0, kc)
        shape = (kc, w.N) if w.k_axis == 0 else (w.N, kc)
        q = _WeightOnly(None, codes, None, None, w.k_axis, w.packed, w.bits, shape,
                        w.qmin).unpacked_codes().astype(jnp.float32)
        g0, ng = k0 // gs, max(1, kc // gs)
        scale, zero = ((piece(w.scale, g0, ng), None if w.zero is None else piece(w.zero, g0, ng))
                       if w.G > 1 else (w.scale, w.zero))
        if zero is not None:
            q = q - _expand(zero, w.k_axis, kc)
        weights = q * _expand(scale, w.k_axis, kc)
        return acc + lax.dot_general(lax.dynamic_slice_in_dim(x, k0, kc, axis=1), weights,
                                     (((1,), (w.k_axis,)), ((), ())),
                                     precision=lax.Precision.HIGHEST,
                                     preferred_element_type=jnp.float32)

    return lax.fori_loop(0, w.K // kc, body, jnp.zeros((x.shape[0], w.N), jnp.float32))


def _wo_kernel(w: _WeightOnly, isa: int, gemm: bool = False):
    """The custom call ``pychop_wo_matmul``: per group ``g`` and output column ``n``,
    ``s (sum_k x_k v_k - z' sum_k x_k)`` over the stored values ``v`` (int8, uint8, or
    4-bit fields), ``z' = z - qmin`` for fields; XLA prepares the per-group sums of
    ``x`` and, for fields packed along K, its even and odd elements.

    ``gemm`` (AVX2 only, ``isa=1``): the prefill kernel instead, a float32 GEMM over
    panels of ``(v - z') s`` dequantized once per call into a cache-sized buffer (it
    needs none of those sums)."""
    x = w.x.astype(jnp.float32)
    M, K = x.shape
    none = jnp.zeros((0,), jnp.float32)
    kind = 2 if w.packed else (1 if w.codes.dtype == jnp.uint8 else 0)
    zero = w.zero
    if w.packed:  # fields hold q - qmin: q - z = field - (z - qmin)
        zero = (jnp.full((1,), -w.qmin, jnp.float32) if zero is None else zero - w.qmin)
    if zero is None:
        zero = xs = none
    elif gemm:
        xs = none
    else:
        xs = jnp.sum(x.reshape(M, w.G, K // w.G), axis=2)
    xe = xo = none
    if kind == 2 and w.k_axis == 1 and not gemm:
        xp = jnp.pad(x, ((0, 0), (0, K % 2)))
        xe, xo = xp[:, 0::2], xp[:, 1::2]
    call = jax.ffi.ffi_call("pychop_wo_matmul", jax.ShapeDtypeStruct((M, w.N), jnp.float32))
    return call(x, w.codes, w.scale, zero, xs, xe, xo, k_axis=np.int64(w.k_axis),
                kind=np.int64(kind), has_zero=bool(zero.size), gemm=bool(gemm),
                isa=np.int64(isa))


def weight_only_matmul(x, codes, scale, zero_point=None, *, k_axis: int = 0,
                       group_size: int | None = None, bits: int = 8, packed: bool = False,
                       n: int | None = None, out_dtype=jnp.float32, qmin: int | None = None):
    """``x @ W`` with ``W = (codes - zero_point) * scale``, without materialising ``W``.

    ``out[m, j] = sum_g s[g, j] * sum_{k in g} x[m, k] * (q[k, j] - z[g, j])``, ``g``
    running over the groups of ``group_size`` codes along K (one group: per output
    column).

    Args:
      x: ``(M, K)`` float32 (or bfloat16 / float16: widened to float32 exactly).
      codes: int8 (uint8 for affine grids; int8 codes of a 4-bit / 2-bit grid), laid
        out ``(K, N)`` when ``k_axis=0`` or ``(N, K)`` when ``k_axis=1``; or, with
        ``packed=True``, the uint8 bytes of ``pychop_jax.core.packing.pack`` (fields
        ``q - qmin`` along the last storage axis, two per byte for 3-4 bits, four for
        1-2 bits).
      scale, zero_point: broadcastable to one value per group and output column in the
        storage layout: per column ``(1, N)`` / ``(N, 1)``, per group ``(K/g, N)`` /
        ``(N, K/g)``; ``zero_point`` in code units, ``None`` for a symmetric grid.
      group_size: codes per group along K (``None``: the scale's shape decides).
      bits, packed, n: the field width of packed codes and the unpacked length of the
        last storage axis (default: every field of every byte).
      out_dtype: dtype of the result.
      qmin: the grid's lowest code, which packed fields are stored relative to
        (``spec.qmin``: -8 symmetric int4, -7 narrow range, 0 affine); required when
        ``packed``.

    Returns:
      ``(M, N)`` of ``out_dtype``.

    The formulation (measured on a 2-core Zen 4 with AVX2, ``docs/performance.md``;
    ``benchmarks/bench_decode_matmul.py --sweep`` re-measures it):

    * XLA:CPU with the custom call built (``decode_kernels_available``), a grid it
      takes and at least ``KERNEL_MIN_WEIGHTS`` codes (``_WeightOnly.kernel_applies``):

      - ``M <= WEIGHT_ONLY_MAX_ROWS``: its decoding kernels, which read each code once
        and multiply it with every row (2-3x the float32 dot at 1-8 rows);
      - more rows: its prefill GEMM (``_wo_kernel(gemm=True)``), which dequantizes each
        weight once per call into cache-sized panels and multiplies them at about the
        FMA peak.  The decoding kernels' cost grows faster with M: at 8 rows they cost
        less CPU time than the GEMM in 6 of 8 cases (2048x8192 / 8192x2048, int8 and
        int4 g128, both layouts), at 10 rows more in 6, at 16 in all 8.  At 16-256 rows
        the float32 dot cost 0.99-2.7x the GEMM's CPU time, each other formulation
        more than the GEMM in every case; at 512 rows (2048x8192, wall clock) the GEMM
        was still level with or ahead of them;
    * XLA:CPU without it: up to ``CHUNKED_MAX_ROWS`` rows, the weights dequantized
      ``WEIGHT_ONLY_CHUNK`` rows of K at a time in a loop (``_wo_chunked``: 1.25-1.8x one
      dot from 64 to 256 rows);
    * more rows, every other platform and K that does not split: the dequantized
      weights in one float32 ``dot_general`` (``_wo_plain``).

    All agree to float rounding.
    """
    w = _WeightOnly.of(x, codes, scale, zero_point, k_axis=k_axis, group_size=group_size,
                       bits=bits, packed=packed, n=n, qmin=qmin)
    plain = lambda: _wo_plain(w)  # noqa: E731
    kc = _chunk_rows(w)
    if w.kernel_applies() and decode_kernels_available():
        gemm = x.shape[0] > WEIGHT_ONLY_MAX_ROWS
        out = _on_cpu(lambda: _wo_kernel(w, isa=1, gemm=gemm), plain)
    elif kc is not None and x.shape[0] <= CHUNKED_MAX_ROWS:
        out = _on_cpu(lambda: _wo_chunked(w, kc), plain)
    else:
        out = plain()
    return out.astype(out_dtype)


def _int8_plain(a, b, b_k_axis):
    return lax.dot_general(a, b, (((1,), (b_k_axis,)), ((), ())),
                           preferred_element_type=jnp.int32)


def _int8_kernel(a, b, b_k_axis, isa: int):
    """The custom call ``pychop_int8_matmul`` (``a`` widened to int16 by XLA)."""
    n = b.shape[1 - b_k_axis]
    call = jax.ffi.ffi_call("pychop_int8_matmul", jax.ShapeDtypeStruct((a.shape[0], n), jnp.int32))
    return call(a.astype(jnp.int16), b, b_k_axis=np.int64(b_k_axis), isa=np.int64(isa))


def int8_matmul(a, b, *, b_k_axis: int = 0):
    """int32 ``(M, N) = a (M, K) int8 @ b`` int8 (``(K, N)`` when ``b_k_axis=0``,
    ``(N, K)`` when 1), exact (wrapping modulo 2^32 like XLA's int32 dot); fast at
    small M on CPU.

    ``out[m, j] = sum_k a[m, k] * b[k, j]`` in int32.  On XLA:CPU, with the custom call
    built, at least ``KERNEL_MIN_WEIGHTS`` codes in ``b`` and ``M <= INT8_MAX_ROWS``
    (``INT8_MAX_ROWS_SMALL`` under ``INT8_LARGE_WEIGHTS`` codes), the custom call (XLA's
    int8 dot converts the whole of ``b`` to int32 first at one row); otherwise, and on
    every other platform, ``lax.dot_general`` with int32 accumulation.  Bit for bit the
    same.
    """
    a, b = jnp.asarray(a), jnp.asarray(b)
    if a.dtype != jnp.int8 or b.dtype != jnp.int8:
        raise TypeError(f"int8_matmul: a and b must be int8, got {a.dtype} and {b.dtype}.")
    if b_k_axis not in (0, 1) or a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[b_k_axis]:
        raise ValueError(f"int8_matmul: shapes {a.shape} and {b.shape} do not contract with "
                         f"b_k_axis={b_k_axis}.")
    plain = lambda: _int8_plain(a, b, b_k_axis)  # noqa: E731
    rows = INT8_MAX_ROWS if b.size >= INT8_LARGE_WEIGHTS else INT8_MAX_ROWS_SMALL
    if a.shape[0] <= rows and b.size >= KERNEL_MIN_WEIGHTS and decode_kernels_available():
        return _on_cpu(lambda: _int8_kernel(a, b, b_k_axis, isa=1), plain)
    return plain()
