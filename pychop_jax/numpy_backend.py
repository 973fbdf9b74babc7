"""NumPy adapter: ``calibrate`` / ``quantize`` / ``dequantize`` / ``fake_quant`` on
``np.ndarray``, and the pychop quantizer ``NumpyChopi``.

NumPy in, NumPy out, bit-identical to the JAX ops (``pychop_jax.numerics`` is the one
implementation).  The arrays are run through the core's jitted XLA kernels
(``pychop_jax.adapter``): one fused pass instead of the ~15 NumPy passes the formulas
take op by op, with the NaN / inf and subnormal handling of the contract included.
float64 input is computed in float64 (as JAX with ``jax_enable_x64``); every other
float in float32.  Results are ordinary (writable) NumPy arrays.

    state = numpy_backend.calibrate(x, QuantSpec(bits=8))   # QuantState of np arrays
    q = numpy_backend.quantize(x, state)                     # uint8 codes
    xhat = numpy_backend.dequantize(q, state)                # float32
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from array_api_compat import numpy as xnp

from . import adapter
from .chopi import Backend, Quantizer
from .spec import QuantSpec
from .state import QuantState

__all__ = ["FRAMEWORK", "calibrate", "quantize", "dequantize", "fake_quant", "NumpyChopi"]

#: XLA:CPU reads a host buffer in place only at this alignment; NumPy aligns to 16
_ALIGN = 64


def _to_xla(a: np.ndarray) -> np.ndarray:
    """``a``, or for a large unaligned (or strided) array an aligned copy: XLA then
    reads it in place, and ``np.copyto`` is about twice as fast as XLA's own copy."""
    if a.nbytes >= 1 << 16 and (a.ctypes.data % _ALIGN or not a.flags.c_contiguous):
        raw = np.empty(a.nbytes + _ALIGN, np.uint8)
        start = -raw.ctypes.data % _ALIGN
        aligned = raw[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
        np.copyto(aligned, a)
        return aligned
    return a


FRAMEWORK = adapter.Framework(
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
    return adapter.calibrate(FRAMEWORK, x, spec)


def quantize(x: np.ndarray, state: QuantState, *, check: bool = True) -> np.ndarray:
    """Codes ``clip(round(x / scale) + zero_point, qmin, qmax)`` of ``state.spec.code_dtype``.

    ``check=False`` skips the NaN / inf check (then +-inf saturate, NaN -> zero point).
    """
    return adapter.quantize(FRAMEWORK, x, state, check=check)


def dequantize(q: np.ndarray, state: QuantState) -> np.ndarray:
    """Floats ``(q - zero_point) * scale`` in the scale's dtype."""
    return adapter.dequantize(FRAMEWORK, q, state)


def fake_quant(x: np.ndarray, state: QuantState, *, check: bool = True) -> np.ndarray:
    """``dequantize(quantize(x))`` in ``x``'s dtype."""
    return adapter.fake_quant(FRAMEWORK, x, state, check=check)[0]


BACKEND = Backend("numpy", xnp, calibrate, quantize, dequantize, fake_quant)


class NumpyChopi(Quantizer):
    """pychop's integer quantizer for ``np.ndarray`` (see ``pychop_jax.chopi.Quantizer``).

    ``NumpyChopi(num_bits=8, symmetric=False, per_channel=False, channel_dim=0)``;
    ``ch(x)`` is fake quantization, ``dequantize(quantize(x))``.
    """

    backend = BACKEND
