"""NumPy adapter: ``calibrate`` / ``quantize`` / ``dequantize`` / ``fake_quant`` on
``np.ndarray``.

NumPy in, NumPy out, bit-identical to the JAX ops (``pychop_jax.numerics`` is the one
implementation).  The arrays are run through the core's jitted XLA kernels
(``pychop_jax.interop.engine``): one fused pass instead of the ~15 NumPy passes the formulas
take op by op, with the NaN / inf and subnormal handling of the contract included.
float64 input is computed in float64 (as JAX with ``jax_enable_x64``); every other
float in float32.  Results are ordinary (writable) NumPy arrays.

    from pychop_jax.interop import numpy as pjnp
    state = pjnp.calibrate(x, QuantSpec(bits=8))   # QuantState of np arrays
    q = pjnp.quantize(x, state)                     # uint8 codes
    xhat = pjnp.dequantize(q, state)                # float32
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from array_api_compat import numpy as xnp

from ..core.spec import QuantSpec
from ..core.state import QuantState
from . import engine

__all__ = ["FRAMEWORK", "calibrate", "quantize", "dequantize", "fake_quant"]

#: XLA:CPU reads a host buffer in place only at this alignment; NumPy aligns to 16
_ALIGN = 64


def _to_xla(a: np.ndarray) -> np.ndarray:
    """``a``, or for a large unaligned (or strided) array an aligned copy: XLA then
    reads it in place, and ``np.copyto`` is faster than XLA's own copy
    (``docs/performance.md``)."""
    if a.nbytes >= 1 << 16 and (a.ctypes.data % _ALIGN or not a.flags.c_contiguous):
        raw = np.empty(a.nbytes + _ALIGN, np.uint8)
        start = -raw.ctypes.data % _ALIGN
        aligned = raw[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
        np.copyto(aligned, a)
        return aligned
    return a


FRAMEWORK = engine.Framework(
    name="numpy",
    xp=xnp,
    to_xla=_to_xla,
    from_jax=np.array,  # a copy: np.asarray of a JAX array is read-only
    on_xla=lambda a: True,
    # jnp.issubdtype also knows ml_dtypes' bfloat16 and float8 types
    is_float=lambda a: bool(jnp.issubdtype(a.dtype, jnp.floating)),
    is_integer=lambda a: bool(jnp.issubdtype(a.dtype, jnp.integer)),
    is_wide=lambda a: a.dtype.itemsize == 8,
)


def calibrate(x: np.ndarray, spec: QuantSpec) -> QuantState:
    """Scale and zero point of ``x`` (``pychop_jax.calibrate`` for NumPy).

    Returns a ``QuantState`` whose ``scale`` (float32, float64 for float64 input) and
    ``zero_point`` (int32) are NumPy arrays of shape ``spec.scale_shape(x.shape)``.

    Raises:
      TypeError: not a NumPy array, or not floating point.
      ValueError: empty input, NaN or +-inf, a bad axis or group size.
    """
    return engine.calibrate(FRAMEWORK, x, spec)


def quantize(x: np.ndarray, state: QuantState, *, check: bool = True) -> np.ndarray:
    """Codes ``clip(round(x / scale) + zero_point, qmin, qmax)`` of ``state.spec.code_dtype``.

    ``check=False`` skips the NaN / inf check (then +-inf saturate, NaN -> zero point).
    """
    return engine.quantize(FRAMEWORK, x, state, check=check)


def dequantize(q: np.ndarray, state: QuantState) -> np.ndarray:
    """Floats ``(q - zero_point) * scale`` in the scale's dtype."""
    return engine.dequantize(FRAMEWORK, q, state)


def fake_quant(x: np.ndarray, state: QuantState, *, check: bool = True) -> np.ndarray:
    """``dequantize(quantize(x))`` in ``x``'s dtype."""
    return engine.fake_quant(FRAMEWORK, x, state, check=check)[0]
