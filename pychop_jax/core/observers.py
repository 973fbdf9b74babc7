"""Observers: range statistics over batches, as pure functions over a pytree state.

An observer turns the batches it sees into a range ``[lo, hi]`` (``lo <= 0 <= hi``),
from which ``quant_state`` derives a ``QuantState`` with the core's formula
(``numerics.qparams_from_range``)::

    stats = observers.init(spec, x.shape)            # RangeState(lo, hi, count), zeros
    stats = observers.ema(stats, x, spec)            # one batch; jit it, scan it
    state = observers.quant_state(stats, spec)       # -> QuantState
    y = pychop_jax.fake_quant(x, state)

Every observer has the signature ``observer(stats, x, spec, **options) -> stats``, so
the Flax modules take any of them (``functools.partial`` fixes options):

==============  ==================================================================
``minmax``      this batch's range: ``lo = min(min(x), 0)``, ``hi = max(max(x), 0)``
``ema``         running range: the first batch initializes it, then
                ``lo <- m * lo + (1 - m) * lo_batch`` (same for ``hi``), ``m = momentum``
``percentile``  the ``q``-th percentile of ``|x|`` clipping the batch range
                (``tails=False``), or the ``(100 - q)``-th / ``q``-th percentiles of
                ``x`` for ``lo`` / ``hi`` (``tails=True``); linear interpolation,
                as ``numpy.percentile``
``mse``         the clipped range ``(r * lo, r * hi)``, ``r`` in ``{1/K, 2/K, .., 1}``,
                that minimises ``||x - fake_quant(x)||^2``
==============  ==================================================================

``percentile`` and ``mse`` take ``momentum=None`` (default: keep this batch's range)
or a float (an exponential moving average of their per-batch ranges, like ``ema``).

Granularity follows the spec as everywhere else: per tensor, per channel
(``axis``) or per group; ``lo``/``hi`` have the state's shape
(``spec.scale_shape(x.shape)``) and ``count`` (int32, batches seen) is a scalar.

The range estimators ``percentile_range``, ``mse_range``, ``ema_update`` and
``moving_average`` are written against an array namespace ``xp`` like ``numerics``
(minmax is ``numerics.observe_range``), so other backends can call them; the Torch
adapter's observer (``TorchChopi``) uses ``moving_average``.  The NumPy / Torch
adapters do not offer ``percentile`` / ``mse`` observers as objects yet.

Eager calls validate like ``calibrate`` (type, shape, NaN/inf raise ``ValueError``);
under ``jit`` non-finite values are left out of ``minmax``/``ema`` ranges and count
as 0 in ``percentile``/``mse``.  No gradient flows through an observer.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import numerics, ops, validation, xla_cpu
from .spec import QuantSpec
from .state import QuantState

__all__ = [
    "RangeState",
    "init",
    "minmax",
    "ema",
    "percentile",
    "mse",
    "quant_state",
    "percentile_range",
    "mse_range",
    "ema_update",
]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RangeState:
    """What an observer remembers.

    Attributes:
      lo: running lower end of the range (<= 0), the state's shape, float32.
      hi: running upper end (>= 0), same shape.
      count: int32 scalar, the number of batches observed (0: nothing seen yet).
    """

    lo: Any
    hi: Any
    count: Any

    @classmethod
    def empty(cls, shape, dtype=jnp.float32) -> RangeState:
        """Statistics that have seen nothing: ``lo = hi = 0`` of ``shape``, ``count = 0``."""
        zeros = jnp.zeros(shape, dtype)
        return cls(zeros, zeros, jnp.zeros((), jnp.int32))

    def reshape(self, shape) -> RangeState:
        """The same statistics with ``lo``/``hi`` reshaped (e.g. per-channel
        ``(C,)`` <-> ``(1, .., C)``)."""
        return RangeState(jnp.reshape(self.lo, shape), jnp.reshape(self.hi, shape), self.count)


def init(spec: QuantSpec, shape, dtype=jnp.float32) -> RangeState:
    """Empty statistics for inputs of ``shape`` under ``spec`` (zeros, ``count = 0``)."""
    return RangeState.empty(spec.scale_shape(shape), dtype)


# -- range estimators, against an array namespace ---------------------------------------
def _rows(xp, x, spec: QuantSpec):
    """``x`` as ``(K, n)``: one row per scale, the reduced elements along the row.

    Rows follow the state's element order, so a ``(K,)`` result reshapes to the
    state's shape.  Non-finite values become 0.
    """
    view, axes, _ = numerics.layout(spec, x.shape)
    kept = tuple(d for d in range(len(view)) if d not in axes)
    v = xp.permute_dims(xp.reshape(x, view), kept + tuple(axes))
    n = math.prod(view[d] for d in axes)
    v = xp.reshape(v, (math.prod(view[d] for d in kept), n))
    return xp.where(xp.isfinite(v), v, xp.zeros_like(v))


def _quantile(xp, rows, q: float):
    """The ``q``-th percentile of each row (sorted ascending), interpolated linearly
    between order statistics like ``numpy.percentile``'s default."""
    n = rows.shape[1]
    pos = q / 100 * (n - 1)
    i = min(int(math.floor(pos)), n - 1)
    j = min(i + 1, n - 1)
    frac = pos - i
    a, b = rows[:, i], rows[:, j]
    return a + xp.astype(xp.asarray(frac), a.dtype) * (b - a)


def _as_range(xp, lo, hi, like):
    """Clamp a range so that it contains 0 (``lo <= 0 <= hi``)."""
    zero = xp.zeros_like(like)
    lo, hi = xp.reshape(lo, like.shape), xp.reshape(hi, like.shape)
    return xp.minimum(lo, zero), xp.maximum(hi, zero)


def percentile_range(xp, x, spec: QuantSpec, q: float = 99.99, *, tails: bool = False):
    """``(lo, hi)`` from percentiles of ``x``, state-shaped, in the compute dtype.

    ``tails=False``: ``a = percentile(|x|, q)`` and the batch range clipped to
    ``[-a, a]``, so a one-sided input (post-ReLU) keeps ``lo = 0``.
    ``tails=True``: ``lo = percentile(x, 100 - q)``, ``hi = percentile(x, q)``.
    Both are then widened to contain 0.
    """
    F = numerics.compute_dtype(xp, x.dtype)
    x = xp.astype(x, F)
    lo, hi = numerics.observe_range(xp, x, spec)
    rows = _rows(xp, x, spec)
    if tails:
        rows = xp.sort(rows, axis=1)
        return _as_range(xp, _quantile(xp, rows, 100 - q), _quantile(xp, rows, q), lo)
    a = xp.reshape(_quantile(xp, xp.sort(xp.abs(rows), axis=1), q), lo.shape)
    return xp.maximum(lo, -a), xp.minimum(hi, a)


def mse_range(xp, x, spec: QuantSpec, *, num_candidates: int = 100):
    """``(lo, hi)`` minimising ``||x - fake_quant(x)||^2`` over clipped ranges.

    Candidates are ``(r * lo, r * hi)`` for ``r = k / K``, ``k = 1 .. K``
    (``K = num_candidates``), ``(lo, hi)`` the batch range; each is turned into a grid
    by ``numerics.qparams_from_range`` and scored by the squared error of the
    fake-quantized ``x``, per scale (channel, group).  Ties go to the smaller ratio.
    The candidates are evaluated together (a leading axis of length ``K``), so the
    work is ``K`` passes over ``x``.
    """
    if spec.is_float or spec.block_scaled:
        raise ValueError("observers.mse: the MSE search covers integer grids with float32 "
                         f"(or float16 / bfloat16) scales; got dtype={spec.dtype!r}, "
                         f"scale_dtype={spec.scale_dtype!r}. "
                         "Use minmax / ema / percentile for float and block-scaled formats.")
    F = numerics.compute_dtype(xp, x.dtype)
    x = xp.astype(x, F)
    x = xp.where(xp.isfinite(x), x, xp.zeros_like(x))
    lo, hi = numerics.observe_range(xp, x, spec)
    view, axes, state_view = numerics.layout(spec, x.shape)
    xv = xp.reshape(x, (1,) + view)
    k = xp.reshape(xp.arange(1, num_candidates + 1, dtype=F), (-1,) + (1,) * len(view))
    ratios = k / xp.astype(xp.asarray(num_candidates), F)
    lo_c = ratios * xp.reshape(lo, (1,) + state_view)
    hi_c = ratios * xp.reshape(hi, (1,) + state_view)
    scale, zero_point = numerics.qparams_from_range(xp, lo_c, hi_c, spec)
    steps = numerics.grid_steps(xp, xv, scale, zero_point, spec)
    err = (numerics.steps_to_values(xp, steps, scale) - xv) ** 2
    err = xp.sum(err, axis=tuple(d + 1 for d in axes), keepdims=True)
    best = xp.argmin(err, axis=0, keepdims=True)
    pick = xp.reshape(xp.arange(num_candidates), k.shape) == best
    zero = xp.zeros_like(lo_c)
    state_shape = spec.scale_shape(x.shape)
    lo = xp.reshape(xp.sum(xp.where(pick, lo_c, zero), axis=0), state_shape)
    hi = xp.reshape(xp.sum(xp.where(pick, hi_c, zero), axis=0), state_shape)
    return lo, hi


def moving_average(xp, old, new, rate: float):
    """One moving-average step ``old + rate * (new - old)``, bit-identical on every
    engine: computed as ``old + (new - old) / (1 / rate)``.

    ``old + rate * (new - old)`` would not be: XLA:CPU contracts a product feeding a
    sum into a fused multiply-add (one rounding instead of two) and an optimization
    barrier does not stop it.  A division by a same-shape array is exact on every
    backend and never contracted; the barrier keeps XLA from seeing that the divisor
    is a constant (it would rewrite the division into a product, numerics rule 1).
    ``rate == 1`` returns ``new`` itself.
    """
    if rate == 1.0:
        return new
    (divisor,) = numerics.barrier(xp, xp.full_like(new, 1.0 / rate))
    return old + (new - old) / divisor


def ema_update(xp, lo, hi, count, new_lo, new_hi, momentum: float):
    """``(lo, hi)`` after one batch: ``(new_lo, new_hi)`` when ``count == 0``, else
    ``m * old + (1 - m) * new`` with ``m = momentum`` (``moving_average``)."""
    fresh = count == 0
    blend = lambda old, new: xp.where(  # noqa: E731
        fresh, new, moving_average(xp, old, new, 1.0 - momentum))
    return blend(lo, new_lo), blend(hi, new_hi)


# -- validation -------------------------------------------------------------------------
def _check_momentum(momentum, what: str, *, optional: bool) -> None:
    if momentum is None and optional:
        return
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not (
        0.0 <= momentum < 1.0
    ):
        none = "None (keep each batch's range) or " if optional else ""
        raise ValueError(
            f"{what}: momentum must be {none}a float in [0, 1), the weight kept by the "
            f"running range per batch (e.g. 0.9); got {momentum!r}."
        )


def _prepared(stats: RangeState, x, spec: QuantSpec, what: str):
    """Type / shape checks (eager and traced) and, eagerly, the NaN/inf check."""
    validation.require_spec(spec, what)
    if not isinstance(stats, RangeState):
        raise TypeError(
            f"{what} needs a RangeState (from observers.init); got {type(stats).__name__}."
        )
    x = ops.as_float(x, what)
    validation.require_nonempty(x.size, what)
    expected = spec.scale_shape(x.shape)
    validation.require_state_fits(x.shape, jnp.shape(stats.lo), expected, what)
    if not ops.is_traced(x):
        ops.check_finite(x, what)
    return jax.lax.stop_gradient(x)


# -- observers over a RangeState ----------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("spec", "method", "options", "momentum", "in_step"))
def _update(stats, x, spec, method, options, momentum, in_step):
    kw = dict(options)
    if method == "minmax":
        with xla_cpu.inside_step(in_step):
            lo, hi = numerics.observe_range(jnp, x, spec)
    elif method == "percentile":
        lo, hi = percentile_range(jnp, x, spec, **kw)
    else:
        lo, hi = mse_range(jnp, x, spec, **kw)
    lo, hi = lo.astype(stats.lo.dtype), hi.astype(stats.hi.dtype)
    if momentum is not None:
        lo, hi = ema_update(jnp, stats.lo, stats.hi, stats.count, lo, hi, momentum)
    return RangeState(lo, hi, stats.count + 1)


def minmax(stats: RangeState, x, spec: QuantSpec) -> RangeState:
    """This batch's range, ``lo = min(min(x), 0)``, ``hi = max(max(x), 0)``
    (``numerics.observe_range``); ``count`` + 1."""
    x = _prepared(stats, x, spec, "observers.minmax")
    return _update(stats, x, spec, "minmax", (), None, ops.is_traced(x))


def ema(stats: RangeState, x, spec: QuantSpec, *, momentum: float = 0.9) -> RangeState:
    """Running min/max: the first batch (``count == 0``) initializes the range, later
    ones blend in as ``lo <- momentum * lo + (1 - momentum) * min(min(x), 0)`` (and
    the same for ``hi``).

    Raises:
      ValueError: ``momentum`` outside [0, 1).
    """
    _check_momentum(momentum, "observers.ema", optional=False)
    x = _prepared(stats, x, spec, "observers.ema")
    return _update(stats, x, spec, "minmax", (), float(momentum), ops.is_traced(x))


def percentile(stats: RangeState, x, spec: QuantSpec, *, q: float = 99.99,
               tails: bool = False, momentum: float | None = None) -> RangeState:
    """Range from percentiles of this batch (``percentile_range``), kept as is
    (``momentum=None``) or blended into the running range like ``ema``.

    Raises:
      ValueError: ``q`` outside (0, 100], or ``momentum`` neither None nor in [0, 1).
    """
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 < q <= 100:
        raise ValueError(
            f"observers.percentile: q must be a percentile in (0, 100], e.g. 99.99; got {q!r}."
        )
    _check_momentum(momentum, "observers.percentile", optional=True)
    x = _prepared(stats, x, spec, "observers.percentile")
    options = (("q", float(q)), ("tails", bool(tails)))
    return _update(stats, x, spec, "percentile", options, momentum, ops.is_traced(x))


def mse(stats: RangeState, x, spec: QuantSpec, *, num_candidates: int = 100,
        momentum: float | None = None) -> RangeState:
    """Range minimising the fake-quantization error of this batch (``mse_range``),
    kept as is (``momentum=None``) or blended into the running range like ``ema``.

    Raises:
      ValueError: ``num_candidates`` < 1, or a bad ``momentum``.
    """
    if isinstance(num_candidates, bool) or not isinstance(num_candidates, (int, np.integer)) \
            or num_candidates < 1:
        raise ValueError(
            f"observers.mse: num_candidates must be an int >= 1 (e.g. 100); got {num_candidates!r}."
        )
    _check_momentum(momentum, "observers.mse", optional=True)
    x = _prepared(stats, x, spec, "observers.mse")
    options = (("num_candidates", int(num_candidates)),)
    return _update(stats, x, spec, "mse", options, momentum, ops.is_traced(x))


def quant_state(stats: RangeState, spec: QuantSpec) -> QuantState:
    """The ``QuantState`` of the observed range (``numerics.qparams_from_range``).

    Statistics that have seen nothing (``lo = hi = 0``) give ``scale = 1`` (the
    smallest scale of an E8M0 / two-level spec).  Float element grids and block-scale
    formats take the range's ``max(-lo, hi)`` as ``amax`` (``blockscale``).
    """
    lo, hi = jnp.asarray(stats.lo), jnp.asarray(stats.hi)
    tensor_scale = numerics.tensor_scale_from_range(jnp, lo, hi, spec)
    scale, zero_point = numerics.qparams_from_range(jnp, lo, hi, spec, tensor_scale)
    return QuantState(scale=scale, zero_point=zero_point, spec=spec, tensor_scale=tensor_scale)
