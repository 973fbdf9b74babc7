"""The core's formulas on another framework's arrays: what the NumPy and Torch adapters share.

``numpy_backend`` and ``torch_backend`` are this module applied to a ``Framework``: how
to recognise that framework's arrays and how to hand them to JAX and back.  The rest
is written once here: the argument checks (the messages of ``validation``, the same as
``ops`` raises) and the *pipelines*, short compositions of ``numerics`` functions
written against an array namespace ``xp``.  No formula lives here.

Two engines run a pipeline, and give the same bits (tested):

* **XLA** (arrays JAX can read in place: NumPy arrays, Torch CPU tensors).  The buffer
  goes to JAX without a copy where possible (DLPack for tensors; ``device_put`` for
  NumPy, which copies unless the buffer is 64-byte aligned), one jitted kernel runs
  the whole pipeline (XLA fuses it into one pass over the data, two when a range is
  reduced first), and the results come back: zero-copy tensors for Torch, ordinary
  writable arrays (one copy of the output) for NumPy.  float64 (and int64) input runs
  under ``jax.enable_x64`` so that it is computed in float64 whatever the global
  setting.
* **xp** (everything else, e.g. CUDA tensors): the pipeline called with
  ``array_api_compat``'s namespace on the array's own device.  Every formula step is
  then a pass over memory, about 10x slower than a fused XLA kernel on CPU.

Eager checks (DESIGN.md section 6): wrong framework or non-float input -> ``TypeError``;
empty input, NaN / +-inf, a bad axis or a state that does not fit -> ``ValueError``.
The NaN / inf check costs nothing in calibration (``nonfinite='flag'`` makes the range
itself non-finite) and one fused reduction in ``quantize`` / ``fake_quant``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import numerics, validation
from .spec import QuantSpec, join_bounds, split_bounds
from .state import QuantState

__all__ = [
    "Framework",
    "calibrate",
    "observe",
    "qparams",
    "quantize",
    "dequantize",
    "fake_quant",
]


@dataclasses.dataclass(frozen=True)
class Framework:
    """How the adapters see one array framework.

    Attributes:
      name: ``'numpy'`` or ``'torch'``, as ``validation.framework_of`` names it.
      xp: the framework's ``array_api_compat`` namespace (the xp engine).
      to_jax / from_jax: move an array into JAX (CPU) and a JAX result back.
      on_xla: whether the XLA engine can read an array (else the xp engine runs).
      is_float / is_integer: dtype tests for the checks.
      is_wide: whether an array has a 64-bit dtype (run under ``jax.enable_x64``).
    """

    name: str
    xp: Any
    to_jax: Callable
    from_jax: Callable
    on_xla: Callable[[Any], bool]
    is_float: Callable[[Any], bool]
    is_integer: Callable[[Any], bool]
    is_wide: Callable[[Any], bool]

    def portable(self) -> Framework:
        """This framework with the XLA engine switched off (the xp engine always)."""
        return dataclasses.replace(self, on_xla=lambda a: False)


@functools.cache
def cpu_device():
    """The JAX CPU device the XLA engine runs on (whatever JAX's default device is)."""
    return jax.devices("cpu")[0]


# -- pipelines: compositions of numerics, run by either engine ---------------------------
# Each takes (xp, *arrays, spec, **options) and returns a tuple of arrays (or None).
def _finite_range(xp, lo, hi):
    """With ``nonfinite='flag'`` the range is non-finite iff the input was."""
    return xp.all(xp.isfinite(lo) & xp.isfinite(hi))


def _all_finite(xp, x, check: bool):
    """One reduction: ``x * 0`` is 0 for finite values, NaN otherwise, and a sum
    propagates NaN (min/max reductions may not, numerics rule 5)."""
    if not check:
        return None
    return xp.isfinite(xp.sum(x * 0))


def _calibrate_pipeline(xp, x, spec):
    lo, hi = numerics.observe_range(xp, x, spec, nonfinite="flag")
    scale, zero_point = numerics.qparams_from_range(xp, lo, hi, spec)
    return scale, zero_point, _finite_range(xp, lo, hi)


def _observe_pipeline(xp, x, spec):
    lo, hi = numerics.observe_range(xp, x, spec, nonfinite="flag")
    return lo, hi, _finite_range(xp, lo, hi)


def _qparams_pipeline(xp, lo, hi, spec):
    return numerics.qparams_from_range(xp, lo, hi, spec)


def _quantize_pipeline(xp, x, scale, zero_point, spec, *, check):
    return numerics.quantize(xp, x, scale, zero_point, spec), _all_finite(xp, x, check)


def _dequantize_pipeline(xp, q, scale, zero_point, spec):
    return (numerics.dequantize(xp, q, scale, zero_point, spec),)


def _fake_quant_pipeline(xp, x, scale, zero_point, spec, *, check, mask):
    y = xp.astype(numerics.fake_quant(xp, x, scale, zero_point, spec), x.dtype)
    inside = numerics.clip_mask(xp, x, scale, zero_point, spec) if mask else None
    return y, inside, _all_finite(xp, x, check)


# -- engines ----------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("pipeline", "structure", "options"))
def _xla_kernel(arrays, bounds, pipeline, structure, options):
    # bounds as data: one compilation per spec *structure* serves every bit width
    return pipeline(jnp, *arrays, join_bounds(structure, bounds), **dict(options))


def _run(fw: Framework, pipeline, arrays, spec: QuantSpec, **options):
    """``pipeline(xp, *arrays, spec, **options)`` on the engine that can read ``arrays``."""
    if all(fw.on_xla(a) for a in arrays):
        wide = any(fw.is_wide(a) for a in arrays)
        with jax.enable_x64(True) if wide else contextlib.nullcontext():
            bounds, structure = split_bounds(spec)
            out = _xla_kernel(tuple(fw.to_jax(a) for a in arrays), bounds, pipeline,
                              structure, tuple(sorted(options.items())))
            out = jax.block_until_ready(out)
            return tuple(None if o is None else fw.from_jax(o) for o in out)
    # NumPy warns about the saturating products the formulas clip on purpose
    with np.errstate(all="ignore"):
        return pipeline(fw.xp, *arrays, spec, **options)


# -- checks -----------------------------------------------------------------------------------
def _require_spec(spec, what: str) -> None:
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"{what} needs a QuantSpec; got {type(spec).__name__}.")


def _require_float_input(fw: Framework, x, what: str) -> None:
    validation.require_framework(x, fw.name, what)
    validation.require_float(fw.is_float(x), x.dtype, what)


def _raise_nonfinite(fw: Framework, x, what: str):
    xp = fw.xp
    validation.require_finite(int(xp.sum(xp.isnan(x))), int(xp.sum(xp.isinf(x))), what)


def _fitted(fw: Framework, shape, state: QuantState, what: str):
    """The state's arrays, checked (and for per-tensor, reshaped) to fit ``shape``."""
    if not isinstance(state, QuantState):
        raise TypeError(f"{what} needs a QuantState (from calibrate); got {type(state).__name__}.")
    validation.require_framework(state.scale, fw.name, f"{what} (the state's scale)")
    expected = state.spec.scale_shape(shape)
    scale, zero_point = state.scale, state.zero_point
    if state.spec.axis is None and math.prod(scale.shape) == 1:  # per-tensor fits any rank
        scale, zero_point = fw.xp.reshape(scale, expected), fw.xp.reshape(zero_point, expected)
    validation.require_state_fits(shape, tuple(scale.shape), expected, what)
    return scale, zero_point


def _range_input(fw: Framework, x, spec: QuantSpec, what: str) -> None:
    _require_spec(spec, what)
    _require_float_input(fw, x, what)
    validation.require_nonempty(math.prod(x.shape), what)
    spec.scale_shape(tuple(x.shape))  # axis and group-size errors


# -- the eager entry points -----------------------------------------------------------------
def calibrate(fw: Framework, x, spec: QuantSpec) -> QuantState:
    """``QuantState`` (arrays of ``fw``) of ``x``; see ``pychop_jax.calibrate``."""
    _range_input(fw, x, spec, "calibrate")
    scale, zero_point, ok = _run(fw, _calibrate_pipeline, (x,), spec)
    if not bool(ok):
        _raise_nonfinite(fw, x, "calibrate")
    return QuantState(scale=scale, zero_point=zero_point, spec=spec)


def observe(fw: Framework, x, spec: QuantSpec, what: str = "observe"):
    """``(lo, hi)`` of ``x`` (state-shaped, compute dtype): ``numerics.observe_range``
    over finite input (non-finite input raises)."""
    _range_input(fw, x, spec, what)
    lo, hi, ok = _run(fw, _observe_pipeline, (x,), spec)
    if not bool(ok):
        _raise_nonfinite(fw, x, what)
    return lo, hi


def qparams(fw: Framework, lo, hi, spec: QuantSpec):
    """``(scale, zero_point)`` of a range with ``lo <= 0 <= hi``:
    ``numerics.qparams_from_range``."""
    return _run(fw, _qparams_pipeline, (lo, hi), spec)


def quantize(fw: Framework, x, state: QuantState, *, check: bool = True):
    """Integer codes of ``x``; see ``pychop_jax.quantize``.  ``check=False`` skips the
    NaN / inf check (for input that was just calibrated on)."""
    _require_float_input(fw, x, "quantize")
    scale, zero_point = _fitted(fw, tuple(x.shape), state, "quantize")
    q, ok = _run(fw, _quantize_pipeline, (x, scale, zero_point), state.spec, check=check)
    if check and not bool(ok):
        _raise_nonfinite(fw, x, "quantize")
    return q


def dequantize(fw: Framework, q, state: QuantState):
    """Floats ``(q - zero_point) * scale`` in the scale's dtype; see
    ``pychop_jax.dequantize``."""
    validation.require_framework(q, fw.name, "dequantize")
    validation.require_integer_codes(fw.is_integer(q), q.dtype)
    scale, zero_point = _fitted(fw, tuple(q.shape), state, "dequantize")
    return _run(fw, _dequantize_pipeline, (q, scale, zero_point), state.spec)[0]


def fake_quant(fw: Framework, x, state: QuantState, *, check: bool = True, mask: bool = False):
    """``(dequantize(quantize(x)) in x's dtype, clip mask or None)``.

    The mask (``numerics.clip_mask``, computed in the same pass when ``mask=True``) is
    where the clipped straight-through gradient passes.
    """
    _require_float_input(fw, x, "fake_quant")
    scale, zero_point = _fitted(fw, tuple(x.shape), state, "fake_quant")
    y, inside, ok = _run(fw, _fake_quant_pipeline, (x, scale, zero_point), state.spec,
                         check=check, mask=mask)
    if check and not bool(ok):
        _raise_nonfinite(fw, x, "fake_quant")
    return y, inside
