"""pychop-jax: integer quantization for JAX, Flax, NumPy and PyTorch.

The public API, re-exported from the modules that define it::

    spec  = pychop_jax.QuantSpec(bits=8, symmetric=False, axis=None)
    state = pychop_jax.calibrate(x, spec)      # QuantState pytree
    q     = pychop_jax.quantize(x, state)      # integer codes
    xhat  = pychop_jax.dequantize(q, state)    # floats
    y     = pychop_jax.fake_quant(x, state)    # STE gradient
"""

from .checkpoint import load_quantized, save_quantized
from .int_matmul import int_dot_general, make_int_dot_general, promote_dtype
from .ops import calibrate, check_finite, dequantize, fake_quant, quantize
from .ptq import PTQReport, dequantize_params, quantize_params
from .qarray import QuantizedArray
from .spec import QuantSpec
from .state import QuantState

__version__ = "0.1.0"

__all__ = [
    "QuantSpec",
    "QuantState",
    "calibrate",
    "quantize",
    "dequantize",
    "fake_quant",
    "check_finite",
    "QuantizedArray",
    "quantize_params",
    "dequantize_params",
    "PTQReport",
    "int_dot_general",
    "make_int_dot_general",
    "promote_dtype",
    "save_quantized",
    "load_quantized",
]
