"""The quantization formulas, written once against an array namespace ``xp``.

Every backend (jitted JAX, eager JAX, NumPy, Torch) calls these functions with its own
array-API namespace (``jax.numpy``, ``array_api_compat.numpy``,
``array_api_compat.torch``), so there is exactly one copy of the arithmetic and the
backends agree bit for bit.

The mathematics (``docs/numerics.md``), over the reduced axes and finite values only::

    lo = min(min(x), 0)          hi = max(max(x), 0)
    symmetric:   scale = max(-lo, hi) / qmax                       zero_point = 0
    asymmetric:  scale = (hi - lo) / (qmax - qmin)
                 zero_point = clip(round(qmin - lo / scale), qmin, qmax)
    scale == 0 -> 1;  0 < scale < tiny -> tiny   (tiny = smallest normal)
    quantize:    q = clip(round(x / scale) + zero_point, qmin, qmax)
    dequantize:  xhat = (q - zero_point) * scale   (saturated to +-max of the dtype)

``round`` is round-half-to-even.  Computation happens in ``F``, the *compute dtype*:
float64 for float64 input, float32 for every other float (float16 / bfloat16 are
widened exactly to float32).

The arithmetic order
--------------------
Bit-identity across backends is only possible with an order that every backend
evaluates the same way.  Measured XLA:CPU behaviours fix it:

1. XLA rewrites a division by a broadcast divisor into a multiplication by the
   reciprocal, so no formula here divides by a broadcast value.  ``x / scale`` is
   always ``x * inv`` with ``inv = 1 / scale`` computed once on the scale's own
   (same-shape) array, and ``span / (qmax - qmin)`` is ``span * R`` with
   ``R = fl(1 / (qmax - qmin))`` computed by a 0-d division (exact everywhere).
2. Under ``jit`` XLA contracts ``a * b + c`` into a fused multiply-add.  No product
   is ever added to before it is rounded.  Codes are formed in integers:
   ``steps = clip(round(t), qmin - zero_point, qmax - zero_point)`` as int32, then
   ``q = steps + zero_point``; ``zero_point = qmin - round(lo * inv)`` (exactly
   ``round(qmin - lo * inv)`` because ``qmin = 0`` for the asymmetric grid); and
   stochastic rounding compares ``floor(t) + u < t`` instead of forming ``t + u``.
3. XLA:CPU flushes subnormal inputs and results to zero; NumPy and Torch keep them.
   Subnormals are flushed explicitly: in ``x`` before it meets the scale (on every
   platform but XLA:CPU, where the hardware already does it), in the observed
   ``lo``/``hi``, and a subnormal scale becomes ``tiny``.  The zero test
   ``scale == 0 -> 1`` is made on the *range*, before the multiplication, so a scale
   that underflowed does not turn into 1 on one backend and ``tiny`` on another.
4. ``1 / scale`` is subnormal once ``scale > 2^(emax-1)`` (2-3 bit grids over ranges
   near the dtype's maximum).  The reciprocal is kept normal with an exact power-of-two
   pre-scale: ``t = (x * p) * (1 / (scale * p))`` where ``p = 2^-64`` when
   ``scale > 2^100`` and ``p = 1`` otherwise.  In JAX ``p`` and the reciprocal pass
   through ``lax.optimization_barrier`` so that XLA cannot constant-fold the two
   multiplications into one by a subnormal.  ``hi - lo`` can overflow to inf for
   ranges wider than the dtype's maximum, so for ``max(-lo, hi) > 2^(emax-2)`` the
   span is formed from quarters, ``(hi/4 - lo/4) * R * 4`` (the factors pass a barrier
   too: XLA would factor ``hi*c - lo*c`` back into ``(hi - lo)*c``); scaling by a
   power of two is exact, so the result equals ``(hi - lo) * R`` wherever that does
   not overflow.  Since ``p == 1`` unless a scale is huge, ``quantize`` and
   ``fake_quant`` branch in JAX (``xla_cpu.cond``) and skip the multiplication by
   ``p`` when none is.
5. XLA:CPU's single-output min/max reductions do not propagate NaN on large arrays
   (measured), so no result here depends on NaN propagation through a reduction:
   non-finite values are replaced before the range is reduced.  Likewise float to
   int conversion: XLA's saturates (NaN -> 0), NumPy's and Torch's are undefined out
   of range, so those two clip (and zero NaN) in floats before converting; both give
   the same int32 steps.

Shapes: the scale and zero point have the input's rank (``QuantSpec.scale_shape``);
per-group inputs are viewed with the grouped axis split into ``(n // g, g)``.

A floating zero point is a learned one (LSQ+, ``lsq``): ``integer_zero_point`` rounds
it, ``clip(round(zero_point), qmin, qmax)``, wherever codes are formed.

Float element grids (``QuantSpec(dtype=...)``: fp8 / fp6 / fp4, NF4) and block-scale
formats (``scale_dtype``) use the same order with these differences:

* qparams: ``scale = amax * fl(1 / max_value)`` (float32 scales; ``scale == 0 -> 1``,
  at least ``tiny``), or the power-of-two / two-level scales of ``blockscale``; the
  zero point is 0.  Two-level specs carry a per-tensor ``tensor_scale`` and use
  ``effective_scale = max(scale * tensor_scale, tiny)`` wherever a scale is applied.
* codes: ``t = x / scale`` as in rule 4, then ``floatgrid.round_to_format`` (integer
  bit manipulation, round-half-to-even or stochastic on uint32 noise, saturating at
  ``+-max_value``); NaN -> 0.  ``x`` and ``t`` are flushed keeping their sign (a
  signed zero is a distinct fp8 code), on every platform.  Codes of a format the
  namespace has no dtype for (fp6; fp4 in Torch) are its bit patterns as uint8
  (``encodings``).  NF4 codes are the number of float32 midpoints of adjacent table
  values that ``t`` exceeds (nearest value, ties to the lower one; NaN -> index 7, the
  value 0).
* values: ``code_value * scale`` clipped to the dtype's range, with results below
  ``tiny`` set to +0.0 on every platform (XLA:CPU flushes subnormal products, NumPy
  and Torch do not).
* clip mask: ``|t| <= max_value``.

Rounded scales (``scale_dtype="float16"`` / ``"bfloat16"`` on an integer grid): the
integer grid's formulas above, with the scale rounded up onto the format's grid by
``round_scale`` (integer bit patterns) right after ``scale == 0 -> 1`` / ``tiny``, and
again (idempotent) wherever a state's scale is applied, so a learned or hand-made scale
lies on the grid too.  The zero point is computed from the rounded scale.
"""

from __future__ import annotations

import numpy as np

from . import blockscale, encodings, floatgrid, xla_cpu
from .spec import NF4_VALUES, QuantSpec

__all__ = [
    "compute_dtype",
    "observe_range",
    "calibration_range",
    "qparams_from_range",
    "calibrate",
    "calibrate_state",
    "to_grid",
    "grid_steps",
    "quantize",
    "dequantize",
    "fake_quant",
    "clip_mask",
    "needs_prescale",
    "steps_to_values",
    "layout",
    "barrier",
    "integer_zero_point",
    "all_finite",
    "range_is_finite",
    "valid_scale",
    "tensor_scale_from_range",
    "effective_scale",
    "code_dtype",
    "has_code_dtype",
    "round_scale",
]

#: scales above this use the power-of-two pre-scale of rule 4
_HUGE_SCALE_EXP = 100
_PRESCALE_EXP = -64


# -- dtypes and namespaces --------------------------------------------------------
def _is_jax(xp) -> bool:
    return xp.__name__.startswith("jax")


def barrier(xp, *arrays):
    """Hide values from XLA's algebraic rewrites (identity on other backends)."""
    if _is_jax(xp):
        from jax import lax

        return lax.optimization_barrier(arrays)
    return arrays


def compute_dtype(xp, dtype):
    """float64 for float64, float32 for every other floating dtype (in ``xp``'s terms)."""
    return xp.float64 if dtype == xp.float64 else xp.float32


def _finfo(xp, dtype):
    return np.finfo(np.float64 if dtype == xp.float64 else np.float32)


def _device(xp, like) -> dict:
    """``device=`` keyword for array creation next to ``like`` (JAX places by itself)."""
    return {} if _is_jax(xp) else {"device": like.device}


def _const(xp, value, dtype, like):
    """A 0-d array of ``dtype`` on ``like``'s device."""
    return xp.asarray(value, dtype=dtype, **_device(xp, like))


def _bounds(xp, spec, like):
    """``(qmin, qmax)`` as int32 0-d arrays.

    ``spec.qmin`` / ``spec.qmax`` are Python ints, or traced int32 scalars when the
    JAX kernels pass the bit width as data (``spec.split_bounds``), so one compiled
    kernel serves every bit width.
    """
    return (xp.astype(xp.asarray(spec.qmin, **_device(xp, like)), xp.int32),
            xp.astype(xp.asarray(spec.qmax, **_device(xp, like)), xp.int32))


def code_dtype(xp, spec: QuantSpec):
    """The codes' dtype in ``xp``'s terms (``spec.code_dtype``; ml_dtypes' float types
    for NumPy, ``jnp``'s for JAX, Torch's float8 types; Torch has no fp6 / fp4).

    Raises:
      TypeError: the namespace has no such dtype.
    """
    name = spec.code_dtype.name
    if _is_jax(xp) or not spec.element_format:
        return getattr(xp, name)
    if "torch" in xp.__name__:  # array_api_compat.torch re-exports torch's dtypes
        if not hasattr(xp, name):
            raise TypeError(f"torch has no {name} dtype to hold {name} codes: quantize from "
                            "NumPy or JAX arrays, or use fake_quant (which Torch supports).")
        return getattr(xp, name)
    return spec.code_dtype


_code_dtype = code_dtype


def has_code_dtype(xp, spec: QuantSpec) -> bool:
    """Whether ``xp`` has ``spec``'s code dtype (Torch has no fp4): where it has not, a
    <= 8-bit float format's codes are its bit patterns as uint8 (``encodings.codes_as_bits``)."""
    try:
        code_dtype(xp, spec)
    except TypeError:
        return False
    return True


# -- granularity as shapes ----------------------------------------------------------
def layout(spec: QuantSpec, shape):
    """How an input of ``shape`` is viewed for ``spec``.

    Returns ``(view_shape, reduce_axes, state_view_shape)``: the input is reshaped to
    ``view_shape``, reduced over ``reduce_axes`` (keepdims), and the result has
    ``state_view_shape``, which reshapes to ``spec.scale_shape(shape)``.
    """
    shape = tuple(int(n) for n in shape)
    state_shape = spec.scale_shape(shape)  # validates axis and divisibility
    if spec.group_size is None:
        kept = spec.resolve_axes(len(shape))
        reduce_axes = tuple(d for d in range(len(shape)) if d not in kept)
        return shape, reduce_axes, state_shape
    axis = spec.resolve_axis(len(shape))
    g = spec.group_size
    view = shape[:axis] + (shape[axis] // g, g) + shape[axis + 1 :]
    state_view = shape[:axis] + (shape[axis] // g, 1) + shape[axis + 1 :]
    return view, (axis + 1,), state_view


def _minmax(xp, x, axes):
    """``(min, max)`` over ``axes`` with keepdims (``x`` has no NaN: rule 5).

    min and max are exact, so how XLA reduces is chosen for speed alone
    (``xla_cpu.minmax``); other backends reduce twice.
    """
    if not axes:  # torch's amin/amax treat an empty dim tuple as "all dims"
        return x, x
    if _is_jax(xp):
        return xla_cpu.minmax(x, axes)
    return xp.min(x, axis=axes, keepdims=True), xp.max(x, axis=axes, keepdims=True)


def _max_abs(xp, x, axes):
    """``max(|x|)`` over ``axes`` with keepdims (``xla_cpu.max_abs`` on JAX)."""
    a = xp.abs(x)
    if not axes:
        return a
    if _is_jax(xp):
        return xla_cpu.max_abs(a, axes)
    return xp.max(a, axis=axes, keepdims=True)


# -- calibration ----------------------------------------------------------------------
def observe_range(xp, x, spec: QuantSpec, *, nonfinite: str = "ignore"):
    """``(lo, hi)`` of ``x`` over the reduced axes, shaped like the state.

    ``lo = min(min(x), 0)``, ``hi = max(max(x), 0)`` in the compute dtype, subnormal
    results flushed to +0.0.  ``nonfinite`` says what NaN / +-inf do:

    * ``'ignore'``: they are left out of the range (the behaviour under ``jit``);
    * ``'flag'``: NaN counts as +inf, so a range is non-finite exactly where ``x``
      has a non-finite value (eager callers check ``isfinite(lo) & isfinite(hi)``
      and raise, in the same single pass).
    """
    x, axes, state_shape = _range_input(xp, x, spec, nonfinite)
    zero = _const(xp, 0.0, x.dtype, x)
    lo, hi = _minmax(xp, x, axes)
    lo = xp.minimum(lo, zero)
    hi = xp.maximum(hi, zero)
    tiny = _const(xp, _finfo(xp, x.dtype).tiny, x.dtype, x)
    lo = xp.where(lo > -tiny, zero, lo)
    hi = xp.where(hi < tiny, zero, hi)
    return xp.reshape(lo, state_shape), xp.reshape(hi, state_shape)


def _range_input(xp, x, spec: QuantSpec, nonfinite: str):
    """``x`` in the compute dtype and the per-group view, non-finite values replaced
    as ``nonfinite`` says; with the reduced axes and the state's shape."""
    F = compute_dtype(xp, x.dtype)
    x = xp.astype(x, F)
    view, axes, _ = layout(spec, x.shape)
    state_shape = spec.scale_shape(x.shape)
    x = xp.reshape(x, view)
    if nonfinite == "ignore":
        x = xp.where(xp.isfinite(x), x, _const(xp, 0.0, F, x))
    elif nonfinite == "flag":
        x = xp.where(xp.isnan(x), _const(xp, np.inf, F, x), x)
    else:
        raise ValueError(f"nonfinite must be 'ignore' or 'flag'; got {nonfinite!r}")
    return x, axes, state_shape


def calibration_range(xp, x, spec: QuantSpec, *, nonfinite: str = "ignore"):
    """The range ``calibrate`` turns into qparams: ``observe_range`` for affine grids;
    for symmetric ones ``(-a, a)`` with ``a = max(|x|)`` (flushed to 0 below the
    smallest normal), computed by one reduction instead of two.

    A symmetric grid uses only ``max(-lo, hi)`` of the range, which is ``a`` exactly,
    so the qparams are bit-identical; ``nonfinite`` works as in ``observe_range``.
    Observers keep ``observe_range``: they carry ``lo`` and ``hi`` separately.
    """
    if not spec.symmetric:
        return observe_range(xp, x, spec, nonfinite=nonfinite)
    x, axes, state_shape = _range_input(xp, x, spec, nonfinite)
    a = _max_abs(xp, x, axes)
    tiny = _const(xp, _finfo(xp, x.dtype).tiny, x.dtype, x)
    a = xp.reshape(xp.where(a < tiny, _const(xp, 0.0, x.dtype, x), a), state_shape)
    return -a, a


def qparams_from_range(xp, lo, hi, spec: QuantSpec, tensor_scale=None):
    """``(scale, zero_point)`` from a range with ``lo <= 0 <= hi`` (state-shaped).

    ``scale`` has ``lo``'s dtype (the compute dtype), ``zero_point`` is int32.
    See the module docstring for the arithmetic order.  Float element grids and block
    scale formats: ``_block_qparams`` (the block scales of a two-level spec are relative
    to ``tensor_scale``, by default ``tensor_scale_from_range(lo, hi)``).
    """
    if spec.is_float or spec.block_scaled:
        return _block_qparams(xp, lo, hi, spec, tensor_scale)
    F = lo.dtype
    fi = _finfo(xp, F)
    zero = _const(xp, 0.0, F, lo)
    one = _const(xp, 1.0, F, lo)
    tiny = _const(xp, fi.tiny, F, lo)
    qmin, qmax = (xp.astype(b, F) for b in _bounds(xp, spec, lo))
    amax = xp.maximum(-lo, hi)
    if spec.symmetric:
        span = amax
        scale = span * (one / qmax)
    else:
        recip_levels = one / (qmax - qmin)  # 0-d / 0-d: an exact IEEE division
        big = amax > _const(xp, 2.0 ** (fi.maxexp - 2), F, lo)
        shrink = xp.where(big, _const(xp, 0.25, F, lo), one)
        grow = xp.where(big, _const(xp, 4.0, F, lo), one)
        # the barrier stops XLA from factoring hi*c - lo*c into (hi - lo)*c
        shrink, grow = barrier(xp, shrink, grow)
        span = hi * shrink - lo * shrink
        scale = (span * recip_levels) * grow
    scale = round_scale(xp, xp.where(span == zero, one, xp.maximum(scale, tiny)), spec)
    if spec.symmetric:
        zero_point = xp.zeros(scale.shape, dtype=xp.int32, **_device(xp, lo))
    else:
        # qmin == 0 here, so qmin - round(t) == round(qmin - t) exactly.
        t = to_grid(xp, lo, scale)
        zero_point = xp.astype(xp.clip(qmin - xp.round(t), qmin, qmax), xp.int32)
    return scale, zero_point


def _block_qparams(xp, lo, hi, spec, tensor_scale):
    F = lo.dtype
    amax = xp.maximum(-lo, hi)
    one = _const(xp, 1.0, F, lo)
    zero_point = xp.zeros(amax.shape, dtype=xp.int32, **_device(xp, lo))
    if spec.scale_dtype == "float8_e8m0fnu":
        scale = blockscale.e8m0_scale(xp, amax, spec.emax_elem, rounding=spec.scale_rounding,
                                      max_value=spec.max_value)
    elif spec.two_level:
        if tensor_scale is None:
            tensor_scale = blockscale.tensor_scale(xp, amax, spec)
        u = amax * (one / _const(xp, spec.max_value, F, lo))
        fmt = spec.scale_format
        s = floatgrid.round_to_format(xp, to_grid(xp, u, tensor_scale), fmt)
        scale = xp.maximum(s, _const(xp, fmt.min_subnormal, F, lo))
    else:
        tiny = _const(xp, _finfo(xp, F).tiny, F, lo)
        scale = amax * (one / _const(xp, spec.max_value, F, lo))
        scale = xp.where(amax == _const(xp, 0.0, F, lo), one, xp.maximum(scale, tiny))
    return scale, zero_point


def round_scale(xp, scale, spec: QuantSpec):
    """An integer grid's scale on its ``scale_dtype``'s grid (``"float16"`` /
    ``"bfloat16"``): rounded **up** (``floatgrid.round_to_format(..., rounding="up")``,
    integer bit patterns, so every backend gives the same bits), saturating at the
    format's largest finite value; returned in ``scale``'s dtype.  Other specs' scales
    pass unchanged.

    Up, not nearest: ``amax * fl(1/qmax)`` rounded up keeps ``amax / scale <= qmax``,
    so calibration never clips the value that set the range (a scale rounded down
    would push ``max|w| / scale`` above ``qmax``; the clip of the codes stays correct
    either way).  The relative step is at most 2^-10 (float16) / 2^-7 (bfloat16) of the
    scale.  Idempotent: a scale already on the grid is unchanged, so ``_views`` applies
    it to every state a quantizer is handed (learned LSQ steps, states built by hand).
    """
    fmt = spec.rounded_scale_format
    if fmt is None:
        return scale
    return floatgrid.round_to_format(xp, scale, fmt, rounding="up", overflow="saturate")


def tensor_scale_from_range(xp, lo, hi, spec: QuantSpec):
    """The per-tensor scale of a two-level spec (``blockscale.tensor_scale`` of the
    block maxima ``max(-lo, hi)``), ``None`` for every other spec."""
    if not spec.two_level:
        return None
    return blockscale.tensor_scale(xp, xp.maximum(-lo, hi), spec)


def effective_scale(xp, scale, tensor_scale):
    """The scale a two-level state applies: ``max(scale * tensor_scale, tiny)``
    (``scale`` itself when ``tensor_scale`` is ``None``)."""
    if tensor_scale is None:
        return scale
    tiny = _const(xp, _finfo(xp, scale.dtype).tiny, scale.dtype, scale)
    return xp.maximum(scale * xp.astype(tensor_scale, scale.dtype), tiny)


def calibrate(xp, x, spec: QuantSpec, *, nonfinite: str = "ignore"):
    """``(scale, zero_point)`` of ``x``: ``qparams_from_range(calibration_range(x))``.

    Raises:
      ValueError: a two-level spec, whose state has a third array: use
        ``calibrate_state``.
    """
    if spec.two_level:
        raise ValueError("numerics.calibrate: a two-level spec (scale_dtype="
                         f"{spec.scale_dtype!r}) also has a tensor scale; use calibrate_state.")
    lo, hi = calibration_range(xp, x, spec, nonfinite=nonfinite)
    return qparams_from_range(xp, lo, hi, spec)


def calibrate_state(xp, x, spec: QuantSpec, *, nonfinite: str = "ignore"):
    """``(scale, zero_point, tensor_scale)`` of ``x`` for any spec (``tensor_scale`` is
    ``None`` but for two-level specs)."""
    lo, hi = calibration_range(xp, x, spec, nonfinite=nonfinite)
    t = tensor_scale_from_range(xp, lo, hi, spec)
    return (*qparams_from_range(xp, lo, hi, spec, t), t)


# -- quantize / dequantize ------------------------------------------------------------
def _flush(xp, x):
    """Subnormals to +-0.  XLA:CPU does this in hardware, so there it is skipped."""

    def flush(x):
        tiny = _const(xp, _finfo(xp, x.dtype).tiny, x.dtype, x)
        return xp.where(xp.abs(x) < tiny, _const(xp, 0.0, x.dtype, x), x)

    if _is_jax(xp):
        from jax import lax

        return lax.platform_dependent(x, cpu=lambda x: x, default=flush)
    return flush(x)


def needs_prescale(xp, scale):
    """Whether any scale is above ``2^100`` and needs rule 4's pre-scale."""
    return xp.any(scale > _const(xp, 2.0**_HUGE_SCALE_EXP, scale.dtype, scale))


def to_grid(xp, x, scale):
    """``t = x / scale`` evaluated as ``(x * p) * (1 / (scale * p))`` (rule 4).

    ``x`` and ``scale`` share the compute dtype and broadcast against each other.
    """
    return _to_grid(xp, x, scale, prescale=True)


def _to_grid(xp, x, scale, *, prescale: bool):
    """``to_grid``; ``prescale=False`` computes ``x * (1 / scale)``, the same values
    wherever no scale exceeds ``2^100`` (there ``p == 1`` exactly) with one
    multiplication per element fewer.  Only ``_exact_or_cheap`` passes it."""
    F = scale.dtype
    one = _const(xp, 1.0, F, scale)
    if not prescale:
        return x * (one / scale)
    huge = scale > _const(xp, 2.0**_HUGE_SCALE_EXP, F, scale)
    p = xp.where(huge, _const(xp, 2.0**_PRESCALE_EXP, F, scale), one)
    inv = one / (scale * p)
    p, inv = barrier(xp, p, inv)
    return (x * p) * inv


def _exact_or_cheap(xp, scale, compute):
    """``compute(prescale=True)``; in JAX a branch (``xla_cpu.cond``) that runs
    ``compute(prescale=False)`` when no scale needs the pre-scale (same bits)."""
    exact = lambda: compute(True)  # noqa: E731
    if not _is_jax(xp):
        return exact()
    return xla_cpu.cond(needs_prescale(xp, scale), exact, lambda: compute(False))


def integer_zero_point(xp, zero_point, spec: QuantSpec):
    """The int32 zero point the grid uses.

    An integer zero point is returned as it is.  A floating one is a *learned* zero
    point (LSQ+, kept in code units so that it can receive a gradient): the forward
    pass uses ``clip(round(zero_point), qmin, qmax)`` (half-to-even; NaN -> 0) and the
    gradient passes straight through the rounding.
    """
    if xp.isdtype(zero_point.dtype, "integral"):
        return zero_point
    F = zero_point.dtype
    qmin, qmax = (xp.astype(b, F) for b in _bounds(xp, spec, zero_point))
    z = xp.clip(xp.round(zero_point), qmin, qmax)
    return xp.astype(xp.where(xp.isnan(z), _const(xp, 0.0, F, z), z), xp.int32)


def _views(xp, x, scale, zero_point, spec, tensor_scale=None):
    """Reshape ``x`` and the state so that they broadcast (per-group split); a float
    (learned) zero point is rounded here (``integer_zero_point``), so every function
    below sees the int32 zero point the grid uses.  A two-level state's scale is its
    ``effective_scale``."""
    scale = round_scale(xp, effective_scale(xp, scale, tensor_scale), spec)
    if spec.is_float:  # zero point 0, never learned
        zero_point = xp.astype(zero_point, xp.int32)
    view, _, state_view = layout(spec, x.shape)
    return (
        xp.reshape(x, view),
        xp.reshape(scale, state_view),
        xp.reshape(integer_zero_point(xp, zero_point, spec), state_view),
    )


def _rounded(xp, x, scale, noise, prescale=True):
    """``round(x / scale)`` as integer-valued floats (NaN and +-inf pass through).

    With ``noise`` (uniform in [0, 1)) the rounding is stochastic:
    ``floor(t) + [floor(t) + u < t]``, i.e. up with probability ``frac(t)``.
    """
    t = _to_grid(xp, _flush(xp, x), scale, prescale=prescale)
    if noise is None:
        return xp.round(t)
    f = xp.floor(t)
    return f + xp.astype(f + noise < t, t.dtype)


def _step_bounds(xp, zero_point, spec):
    """``(qmin - zero_point, qmax - zero_point)``: the clip range of the steps."""
    qmin, qmax = _bounds(xp, spec, zero_point)
    return qmin - zero_point, qmax - zero_point


def grid_steps(xp, x, scale, zero_point, spec: QuantSpec, *, noise=None):
    """int32 ``steps = clip(round(x / scale), qmin - zp, qmax - zp)`` (NaN -> 0).

    ``x``, ``scale`` and ``zero_point`` are in the (per-group) view; ``x`` in the
    compute dtype.  The code is ``steps + zero_point`` and the value
    ``steps * scale``.  +-inf saturate.
    """
    return _grid_steps(xp, x, scale, zero_point, spec, noise, prescale=True)


def _grid_steps(xp, x, scale, zero_point, spec, noise, *, prescale):
    r = _rounded(xp, x, scale, noise, prescale)
    low, high = _step_bounds(xp, zero_point, spec)
    if _is_jax(xp):
        # XLA converts saturating and maps NaN to 0: clip in integers afterwards.
        return xp.clip(xp.astype(r, xp.int32), low, high)
    F = r.dtype
    r = xp.clip(r, xp.astype(low, F), xp.astype(high, F))
    return xp.astype(xp.where(xp.isnan(r), _const(xp, 0.0, F, r), r), xp.int32)


def steps_to_values(xp, steps, scale):
    """``steps * scale`` in the scale's dtype, clipped to its finite range: a grid
    over a range near the dtype's maximum can place its outermost code beyond it
    (e.g. 2-bit over [-max, max]), and the nearest float, +-max, keeps the round
    trip within scale/2 where inf would not."""
    F = scale.dtype
    big = _const(xp, _finfo(xp, F).max, F, scale)
    return xp.clip(xp.astype(steps, F) * scale, -big, big)


# -- checks (one reduction each; eager callers turn them into errors) -------------------
def all_finite(xp, x):
    """Whether ``x`` has no NaN / +-inf: ``x * 0`` is 0 for finite values and NaN
    otherwise, and a sum propagates NaN (min/max reductions may not, rule 5)."""
    return xp.isfinite(xp.sum(x * _const(xp, 0.0, x.dtype, x)))


def range_is_finite(xp, lo, hi):
    """With ``observe_range(..., nonfinite='flag')`` the range is non-finite exactly
    where the input was."""
    return xp.all(xp.isfinite(lo) & xp.isfinite(hi))


def valid_scale(xp, scale):
    """Whether every scale is finite and positive."""
    return xp.all(xp.isfinite(scale) & (scale > _const(xp, 0.0, scale.dtype, scale)))


def _view_like(xp, noise, xv):
    return None if noise is None else xp.reshape(noise, xv.shape)


def quantize(xp, x, scale, zero_point, spec: QuantSpec, *, noise=None, tensor_scale=None):
    """Integer codes ``clip(round(x / scale) + zero_point, qmin, qmax)``.

    ``x``: any floating array; ``scale``/``zero_point``: state-shaped.  Returns codes
    of ``spec.code_dtype`` and ``x``'s shape.  Non-finite input (reachable only
    where the caller does not validate, e.g. under ``jit``): +-inf saturate to
    ``qmax``/``qmin``, NaN maps to the zero point.

    Float element grids: codes ``round_to_format(x / scale)`` as ``code_dtype(xp,
    spec)`` (``noise``: uint32 random bits of ``x``'s shape for stochastic rounding),
    NF4: uint8 table indices; see the module docstring.  ``tensor_scale``: a
    two-level state's per-tensor scale.
    """
    shape = x.shape
    xv, sv, zv = _views(xp, xp.astype(x, scale.dtype), scale, zero_point, spec, tensor_scale)
    noise = _view_like(xp, noise, xv)
    if spec.is_float:
        def float_codes(prescale):
            return xp.reshape(_element_codes(xp, xv, sv, spec, noise, prescale), shape)
        return _exact_or_cheap(xp, sv, float_codes)

    def codes(prescale):
        steps = _grid_steps(xp, xv, sv, zv, spec, noise, prescale=prescale)
        return xp.reshape(xp.astype(steps + zv, _code_dtype(xp, spec)), shape)

    return _exact_or_cheap(xp, scale, codes)


def dequantize(xp, q, scale, zero_point, spec: QuantSpec, *, tensor_scale=None):
    """``xhat = (q - zero_point) * scale`` in the scale's dtype, ``q``'s shape.

    The product is clipped to the dtype's finite range (see ``steps_to_values``).
    Float element grids: ``value(q) * scale`` (``value``: the code's float value, the
    NF4 table entry), clipped, results below ``tiny`` -> +0.0.
    """
    shape = q.shape
    qv, sv, zv = _views(xp, q, scale, zero_point, spec, tensor_scale)
    if spec.is_float:
        return xp.reshape(_element_values(xp, _code_values(xp, qv, spec, sv.dtype), sv), shape)
    return xp.reshape(steps_to_values(xp, xp.astype(qv, xp.int32) - zv, sv), shape)


def fake_quant(xp, x, scale, zero_point, spec: QuantSpec, *, noise=None, tensor_scale=None):
    """``dequantize(quantize(x))`` without materialising the codes.

    Returns ``x``'s shape and dtype; computed in the compute dtype, whose bits equal
    ``dequantize(quantize(x))`` (then rounded to ``x.dtype`` for float16 / bfloat16).
    NaN becomes 0.0.
    """
    shape, dtype = x.shape, x.dtype
    xv, sv, zv = _views(xp, xp.astype(x, scale.dtype), scale, zero_point, spec, tensor_scale)
    noise = _view_like(xp, noise, xv)
    if spec.is_float:
        def float_values(prescale):
            v = _element_grid(xp, xv, sv, spec, noise, prescale)
            return xp.astype(xp.reshape(_element_values(xp, v, sv), shape), dtype)
        return _exact_or_cheap(xp, sv, float_values)

    def values(prescale):
        steps = _grid_steps(xp, xv, sv, zv, spec, noise, prescale=prescale)
        return xp.astype(xp.reshape(steps_to_values(xp, steps, sv), shape), dtype)

    return _exact_or_cheap(xp, scale, values)


def clip_mask(xp, x, scale, zero_point, spec: QuantSpec, *, tensor_scale=None):
    """``True`` where ``round(x / scale) + zero_point`` lies in ``[qmin, qmax]``
    (float element grids: where ``|x / scale| <= max_value``).

    False for NaN.  This is the pass-through mask of the clipped straight-through
    estimator.
    """
    shape = x.shape
    xv, sv, zv = _views(xp, xp.astype(x, scale.dtype), scale, zero_point, spec, tensor_scale)
    if spec.is_float:
        t = _to_grid(xp, _flush_signed(xp, xv), sv, prescale=True)
        return xp.reshape(xp.abs(t) <= _const(xp, spec.max_value, t.dtype, t), shape)
    r = _rounded(xp, xv, sv, None)
    low, high = _step_bounds(xp, zv, spec)
    inside = (r >= xp.astype(low, r.dtype)) & (r <= xp.astype(high, r.dtype))
    return xp.reshape(inside, shape)


# -- float element grids (fp8 / fp6 / fp4, NF4) ----------------------------------------------
def _flush_signed(xp, x):
    """Subnormals to a zero of their sign, on every platform (a signed zero is a code)."""
    tiny = _const(xp, _finfo(xp, x.dtype).tiny, x.dtype, x)
    return xp.where(xp.abs(x) < tiny, xp.copysign(_const(xp, 0.0, x.dtype, x), x), x)


def _nf4_midpoints(dtype_name: str):
    table = NF4_VALUES.astype(np.float64)
    mids = (table[1:] + table[:-1]) / 2  # exact in float64
    return [float(np.asarray(m, dtype_name)) for m in mids]


def _nf4_codes(xp, t):
    """Index of the nearest NF4 value (ties to the lower one; NaN -> 7, the value 0)."""
    F = t.dtype
    mids = _nf4_midpoints("float64" if F == xp.float64 else "float32")
    code = xp.zeros(t.shape, dtype=xp.int32, **_device(xp, t))
    for m in mids:
        code = code + xp.astype(t > _const(xp, m, F, t), xp.int32)
    return xp.where(xp.isnan(t), xp.full_like(code, 7), code)


def _nf4_table(xp, code, F, like):
    """NF4 table values of int ``code`` (one select per entry: exact, any device)."""
    v = xp.zeros(code.shape, dtype=F, **_device(xp, like))
    for i, value in enumerate(NF4_VALUES.tolist()):
        v = xp.where(code == i, _const(xp, value, F, like), v)
    return v


def _grid_units(xp, xv, sv, prescale):
    t = _to_grid(xp, _flush_signed(xp, xv), sv, prescale=prescale)
    return _flush_signed(xp, t)


def _element_grid(xp, xv, sv, spec, noise, prescale):
    """``x / scale`` rounded onto the element grid, as values in the compute dtype
    (NaN -> 0)."""
    t = _grid_units(xp, xv, sv, prescale)
    if spec.dtype == "nf4":
        _no_stochastic_nf4(noise)
        return _nf4_table(xp, _nf4_codes(xp, t), t.dtype, t)
    rounding = "nearest_even" if noise is None else "stochastic"
    v = floatgrid.round_to_format(xp, t, spec.element_format, rounding=rounding,
                                  overflow="saturate", noise=noise)
    return xp.where(xp.isnan(v), _const(xp, 0.0, v.dtype, v), v)


def _no_stochastic_nf4(noise):
    if noise is not None:
        raise ValueError("nf4 rounds to the nearest table value only; stochastic rounding "
                         "(a key) is not supported for dtype='nf4'.")


def _element_codes(xp, xv, sv, spec, noise, prescale):
    """Codes of ``x / scale``: the element format's dtype, NF4's uint8 indices, or for
    fp6 (no XLA type) the format's bit patterns as uint8."""
    if spec.dtype == "nf4":
        _no_stochastic_nf4(noise)
        return xp.astype(_nf4_codes(xp, _grid_units(xp, xv, sv, prescale)), xp.uint8)
    v = _element_grid(xp, xv, sv, spec, noise, prescale)
    if spec.element_format.bits > 8:  # float16 / bfloat16 codes
        return xp.astype(v, code_dtype(xp, spec))
    u = encodings.encode_float_bits(xp, v, spec.element_format)
    if spec.code_dtype == np.uint8 or not has_code_dtype(xp, spec):
        return u  # fp6 everywhere, fp4 in Torch: the bit patterns as uint8
    # the encodings reinterpreted as the code dtype, not a float -> float8 conversion
    # (docs/performance.md, the float-format rows)
    return encodings.bits_as_codes(xp, u, spec, code_dtype(xp, spec))


def _code_values(xp, q, spec, F):
    """The float value of each code (exact conversion; NF4: the table; fp6: decoded
    from its bit patterns)."""
    if spec.dtype == "nf4":
        return _nf4_table(xp, xp.astype(q, xp.int32), F, q)
    if spec.code_dtype == np.uint8 or q.dtype == xp.uint8:  # bit patterns (encodings.codes_as_bits)
        return encodings.decode_float_bits(xp, q, spec.element_format, F)
    return xp.astype(q, F)


def _element_values(xp, v, sv):
    """``v * scale`` clipped to the dtype's finite range; below ``tiny`` -> +0.0."""
    F = sv.dtype
    fi = _finfo(xp, F)
    big = _const(xp, fi.max, F, sv)
    out = xp.clip(v * sv, -big, big)
    return xp.where(xp.abs(out) < _const(xp, fi.tiny, F, sv), _const(xp, 0.0, F, sv), out)
