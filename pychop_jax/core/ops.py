"""Jitted JAX entry points: ``calibrate``, ``quantize``, ``dequantize``, ``fake_quant``.

Each public function validates its arguments, then runs a ``jax.jit``-compiled kernel
built on ``numerics`` (the one implementation of the formulas).  Called eagerly (on
concrete arrays) they enforce the error policy of ``docs/numerics.md`` and raise ``TypeError`` /
``ValueError`` with the fix in the message.  Called inside ``jit`` / ``vmap`` /
``grad`` / ``scan`` (on tracers) they cannot raise on values: calibration ignores
non-finite values, +-inf saturate to qmin/qmax and NaN maps to the zero point.
Shape errors (bad axis, a state that does not fit) raise in both cases.  Wrap a
computation in ``jax.experimental.checkify.checkify`` and call ``check_finite`` to
get value errors inside ``jit`` too.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import checkify
from jax.extend.core import find_top_trace

from . import lsq, numerics, ste, validation, xla_cpu
from .spec import QuantSpec, join_bounds, split_bounds
from .state import QuantState

__all__ = [
    "calibrate",
    "lsq_init",
    "quantize",
    "dequantize",
    "fake_quant",
    "check_finite",
    "widen_scale",
    "fit_state",
    "is_traced",
    "current_trace",
    "as_float",
    "calibrate_kernel",
    "quantize_kernel",
    "dequantize_kernel",
]


# -- argument handling -----------------------------------------------------------------
def is_traced(x) -> bool:
    """True for a tracer, and for any value while a transformation is tracing: a
    concrete array closed over by a jitted function is a compile-time constant there,
    and checks on it would be staged out too (they could not raise)."""
    return isinstance(x, jax.core.Tracer) or type(find_top_trace(())) is not _EVAL_TRACE


with jax.core.eval_context():
    #: the trace JAX runs operations on when nothing is being traced
    _EVAL_TRACE = type(find_top_trace(()))


def current_trace():
    """The trace JAX is recording operations on now (one per ``jit``, ``vmap``, ``grad``
    level, control-flow body, ...), or ``None`` when it runs them eagerly.

    An object that must remember something for the duration of one trace and never past
    it keys it by this (weakly: a trace is alive while its tracers are)."""
    trace = find_top_trace(())
    return None if type(trace) is _EVAL_TRACE else trace


def _as_jax(x, what: str):
    if isinstance(x, jax.Array):
        return x
    validation.require_framework(x, "jax", what, accept=("numpy", None))
    try:
        return jnp.asarray(x)
    except TypeError as err:  # e.g. strings or arbitrary objects
        raise TypeError(f"{what} could not convert {type(x).__name__} to an array: {err}") from None


def as_float(x, what: str):
    x = _as_jax(x, what)
    validation.require_float(jnp.issubdtype(x.dtype, jnp.floating), x.dtype, what)
    return x


def widen_scale(scale):
    """A scale held in a narrow scale format (E8M0, float8) as float32 (exact).

    float32 / float64 scales pass as they are (``jnp.asarray`` of an array is an
    eager call)."""
    if getattr(scale, "dtype", None) in (jnp.float32, jnp.float64):
        return scale
    return jnp.asarray(scale).astype(jnp.float32)


def _fitted(x_shape, state: QuantState, what: str):
    """The state's arrays, checked (and for per-tensor, reshaped) to fit ``x_shape``;
    eagerly, a non-finite or non-positive scale is rejected."""
    concrete = isinstance(state, QuantState) and not is_traced(state.scale)
    return validation.fitted_state(
        state, x_shape, what, jnp.reshape,
        is_valid=(lambda s: bool(_valid_scale_kernel(s))) if concrete else None,
        widen=widen_scale)


def _tensor_scale(x_shape, state: QuantState):
    """A two-level state's tensor scale, shaped ``(1,) * ndim`` (else ``None``)."""
    if state.tensor_scale is None:
        return None
    return jnp.reshape(widen_scale(state.tensor_scale), (1,) * len(x_shape))


def fit_state(state: QuantState, shape) -> QuantState:
    """``state`` with its arrays shaped for an input of ``shape``
    (``state.spec.scale_shape(shape)``; a per-tensor state fits any rank).

    Raises:
      ValueError: the state was calibrated for an incompatible shape.
    """
    scale, zero_point = _fitted(tuple(shape), state, "fit_state")
    return state.replace(scale=scale, zero_point=zero_point,
                         tensor_scale=_tensor_scale(tuple(shape), state))


def _raise_nonfinite(x, what: str):
    n_nan = int(jnp.sum(jnp.isnan(x)))
    n_inf = int(jnp.sum(jnp.isinf(x)))
    validation.require_finite(n_nan, n_inf, what)


def _noise(key, x, scale, spec):
    """Stochastic rounding noise: uniform [0, 1) floats for integer grids, uint32
    random bits for float element grids (``floatgrid.round_to_format``)."""
    if key is None:
        return None
    if spec.is_float:
        return jax.random.bits(key, x.shape, jnp.uint32)
    return jax.random.uniform(key, x.shape, scale.dtype)


# -- kernels ------------------------------------------------------------------------------
# The kernels are compiled per *structure* of the spec and receive the grid bounds as
# data (spec.split_bounds), so one compilation serves every bit width: XLA compilation,
# not arithmetic, dominates the cost of small calls.
_all_finite = functools.partial(numerics.all_finite, jnp)
_all_finite_kernel = jax.jit(_all_finite)
_valid_scale_kernel = jax.jit(functools.partial(numerics.valid_scale, jnp))


@functools.partial(jax.jit, static_argnames=("structure", "nonfinite", "in_step"))
def calibrate_kernel(x, bounds, structure: QuantSpec, nonfinite: str, in_step: bool = False):
    spec = join_bounds(structure, bounds)
    with xla_cpu.inside_step(in_step):
        lo, hi = numerics.calibration_range(jnp, x, spec, nonfinite=nonfinite)
    tensor_scale = numerics.tensor_scale_from_range(jnp, lo, hi, spec)
    scale, zero_point = numerics.qparams_from_range(jnp, lo, hi, spec, tensor_scale)
    # with nonfinite='flag' the range is non-finite iff x has a non-finite value
    return scale, zero_point, numerics.range_is_finite(jnp, lo, hi), tensor_scale


@functools.partial(jax.jit, static_argnames=("structure",))
def _lsq_init_kernel(x, bounds, structure: QuantSpec):
    return lsq.lsq_init(jnp, x, join_bounds(structure, bounds))


@functools.partial(jax.jit, static_argnames=("structure", "check"))
def quantize_kernel(x, scale, zero_point, key, bounds, structure: QuantSpec, check: bool,
                    tensor_scale=None):
    spec = join_bounds(structure, bounds)
    noise = _noise(key, x, scale, structure)
    q = numerics.quantize(jnp, x, scale, zero_point, spec, noise=noise,
                          tensor_scale=tensor_scale)
    return q, (_all_finite(x) if check else jnp.bool_(True))


@functools.partial(jax.jit, static_argnames=("structure", "dtype"))
def dequantize_kernel(q, scale, zero_point, bounds, structure: QuantSpec, dtype,
                      tensor_scale=None):
    spec = join_bounds(structure, bounds)
    return numerics.dequantize(jnp, q, scale, zero_point, spec,
                               tensor_scale=tensor_scale).astype(dtype)


@functools.partial(jax.jit, static_argnames=("structure", "rule"))
def _fake_quant_kernel(x, scale, zero_point, key, bounds, structure: QuantSpec, rule: str,
                       tensor_scale=None):
    noise = _noise(key, x, scale, structure)
    if tensor_scale is not None:  # the block scales are data, not learned: fold them
        scale = numerics.effective_scale(jnp, scale, jax.lax.stop_gradient(tensor_scale))
    return ste.fake_quant(x, scale, zero_point, noise, bounds, structure, rule)


# -- public API -------------------------------------------------------------------------
def calibrate(x, spec: QuantSpec) -> QuantState:
    """Scale and zero point of ``x`` under ``spec``.

    Over the axes ``spec`` reduces, and over finite values only::

        lo = min(min(x), 0),  hi = max(max(x), 0)
        symmetric:  scale = max(-lo, hi) / qmax,        zero_point = 0
        asymmetric: scale = (hi - lo) / (qmax - qmin),
                    zero_point = clip(round(qmin - lo / scale), qmin, qmax)

    with ``scale = 1`` for an all-zero range and at least the dtype's smallest
    normal.  Arithmetic order: ``pychop_jax.core.numerics``.  No gradient flows through
    calibration (the input is ``stop_gradient``-ed).

    Args:
      x: floating array (JAX or NumPy); float16/bfloat16 are calibrated in float32.
      spec: the ``QuantSpec``.

    Returns:
      ``QuantState`` with ``scale`` (float32, float64 for float64 input) and
      ``zero_point`` (int32) of shape ``spec.scale_shape(x.shape)``.

    Raises:
      TypeError: non-float input, or an array of another framework (torch).
      ValueError: empty input, bad axis / group size; eagerly also NaN or +-inf.
    """
    validation.require_spec(spec, "calibrate")
    x = as_float(x, "calibrate")
    validation.require_nonempty(x.size, "calibrate")
    spec.scale_shape(x.shape)  # axis and group-size errors, eagerly and under jit
    x = jax.lax.stop_gradient(x)
    if is_traced(x):
        scale, zero_point, _, tensor_scale = calibrate_kernel(
            x, *split_bounds(spec), nonfinite="ignore", in_step=True)
    else:
        scale, zero_point, ok, tensor_scale = calibrate_kernel(
            x, *split_bounds(spec), nonfinite="flag")
        if not ok:
            _raise_nonfinite(x, "calibrate")
    return QuantState(scale=scale, zero_point=zero_point, spec=spec, tensor_scale=tensor_scale)


def lsq_init(x, spec: QuantSpec) -> QuantState:
    """A learnable state for ``fake_quant(..., grad='lsq')``, initialised from ``x``.

    The step size of Esser et al. (2019), ``scale = 2 * mean(|x|) / sqrt(Q_P)`` with
    ``Q_P = qmax``, over the axes ``spec`` reduces.  The zero point is *float32*
    (code units): 0 for symmetric grids, and for asymmetric ones the code of
    ``lo = min(min(x), 0)`` under that scale (0 for non-negative data), which LSQ+
    then learns.  Quantizers round a float zero point half-to-even (the gradient passes
    straight through), so every entry point accepts this state, and
    ``jax.grad(loss)(state)`` differentiates both leaves.  Formulas:
    ``lsq.lsq_init``; no gradient flows into ``x``.

    Raises:
      TypeError / ValueError: as ``calibrate`` (non-float or empty input, bad axis,
        eagerly NaN or +-inf).
    """
    validation.require_spec(spec, "lsq_init")
    _require_integer_grid(spec, "lsq_init")
    x = as_float(x, "lsq_init")
    validation.require_nonempty(x.size, "lsq_init")
    spec.scale_shape(x.shape)
    x = jax.lax.stop_gradient(x)
    if not is_traced(x) and not bool(_all_finite_kernel(x)):
        _raise_nonfinite(x, "lsq_init")
    scale, zero_point = _lsq_init_kernel(x, *split_bounds(spec))
    return QuantState(scale=scale, zero_point=zero_point.astype(scale.dtype), spec=spec)


def quantize(x, state: QuantState, *, key=None, check: bool = True):
    """Integer codes ``clip(round(x / scale) + zero_point, qmin, qmax)``.

    Rounding is half-to-even, or stochastic with ``key`` (a ``jax.random`` key:
    rounds up with probability equal to the fractional part).

    Args:
      x: floating array whose shape fits ``state`` (same rank; per-tensor states
        fit any shape).
      state: from ``calibrate``.
      key: optional PRNG key for stochastic rounding.
      check: eagerly reject NaN / +-inf in ``x`` (one extra reduction).  Has no
        effect under ``jit``, where +-inf saturate and NaN maps to the zero point.

    Returns:
      codes of ``state.spec.code_dtype`` (int8/int16 symmetric, uint8/uint16
      asymmetric) and ``x``'s shape.
    """
    x = as_float(x, "quantize")
    scale, zero_point = _fitted(x.shape, state, "quantize")
    check = check and not is_traced(x)
    q, ok = quantize_kernel(x, scale, zero_point, key, *split_bounds(state.spec), check,
                            _tensor_scale(x.shape, state))
    if check and not ok:
        _raise_nonfinite(x, "quantize")
    return q


def dequantize(q, state: QuantState, *, dtype=None):
    """Floats ``(q - zero_point) * scale``.

    Args:
      q: integer codes whose shape fits ``state``.
      state: the ``QuantState`` the codes were made with.
      dtype: output dtype; default the scale's dtype (float32 / float64).
    """
    q = _as_jax(q, "dequantize")
    validation.require_codes(q.dtype, getattr(state, "spec", None))
    scale, zero_point = _fitted(q.shape, state, "dequantize")
    dtype = jnp.dtype(dtype or scale.dtype)
    return dequantize_kernel(q, scale, zero_point, *split_bounds(state.spec), dtype,
                             _tensor_scale(q.shape, state))


def fake_quant(x, state: QuantState, *, grad: str = "clipped", key=None, check: bool = True):
    """``dequantize(quantize(x))`` in ``x``'s dtype, with a straight-through gradient.

    Args:
      x: floating array whose shape fits ``state``.
      state: from ``calibrate`` (or an observer).
      grad: gradient rule, a key of ``pychop_jax.core.ste.RULES``: ``'clipped'``
        (default; zero gradient where the code saturated), ``'ste'`` (identity) or
        ``'lsq'`` (learned step size: the state's ``scale``, and a float
        ``zero_point``, receive the LSQ / LSQ+ gradient; start from ``lsq_init``).
      key: optional PRNG key for stochastic rounding.
      check: eagerly reject NaN / +-inf (no effect under ``jit``, where NaN -> 0.0).
    """
    if grad not in ste.RULES:
        raise ValueError(f"fake_quant: unknown grad={grad!r}; choose one of {sorted(ste.RULES)}.")
    if grad == "lsq" and isinstance(state, QuantState):
        _require_integer_grid(state.spec, "fake_quant(grad='lsq')")
    x = as_float(x, "fake_quant")
    scale, zero_point = _fitted(x.shape, state, "fake_quant")
    if check and not is_traced(x) and not bool(_all_finite_kernel(x)):
        _raise_nonfinite(x, "fake_quant")
    return _fake_quant_kernel(x, scale, zero_point, key, *split_bounds(state.spec), grad,
                              _tensor_scale(x.shape, state))


def _require_integer_grid(spec: QuantSpec, what: str):
    if spec.is_float or spec.block_scaled:
        raise ValueError(f"{what}: learned step sizes (LSQ) need an integer grid with float32 "
                         f"(or float16 / bfloat16) scales; got dtype={spec.dtype!r}, "
                         f"scale_dtype={spec.scale_dtype!r}. "
                         "Use calibrate / an observer for float and block-scaled formats.")


def check_finite(x, what: str = "x"):
    """Assert that ``x`` is finite; returns ``x``.

    Eagerly this raises ``ValueError`` like the entry points do.  Under ``jit`` it
    emits a ``jax.experimental.checkify`` check, so wrap the function::

        err, out = checkify.checkify(jax.jit(f))(x)
        err.throw()
    """
    x = jnp.asarray(x)
    if not is_traced(x):
        if not bool(_all_finite_kernel(x)):
            _raise_nonfinite(x, what)
        return x
    checkify.check(
        jnp.all(jnp.isfinite(x)),
        f"{what} contains NaN or +-inf; quantization needs finite input.",
    )
    return x
