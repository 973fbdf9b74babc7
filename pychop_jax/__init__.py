"""pychop-jax: integer quantization for JAX, Flax, NumPy and PyTorch.

The public API, re-exported from the modules that define it::

    spec  = pychop_jax.QuantSpec(bits=8, symmetric=False, axis=None)
    state = pychop_jax.calibrate(x, spec)      # QuantState pytree
    q     = pychop_jax.quantize(x, state)      # integer codes
    xhat  = pychop_jax.dequantize(q, state)    # floats
    y     = pychop_jax.fake_quant(x, state)    # STE gradient
    s     = pychop_jax.lsq_init(x, spec)       # learnable state: fake_quant(x, s, grad='lsq')

Submodules: ``observers`` (range statistics over batches), ``qat`` (the layer-level
functions), the Flax skins ``linen`` and ``nnx`` and ``serving`` (QAT -> integer
model); the last three are imported on first access, so that ``import pychop_jax``
does not load ``flax.nnx``.
"""

import importlib

from . import observers, qat
from .checkpoint import load_quantized, save_quantized
from .int_matmul import (
    IntKernel,
    int_conv_general_dilated,
    int_dot_general,
    make_int_dot_general,
    promote_dtype,
)
from .ops import calibrate, check_finite, dequantize, fake_quant, lsq_init, quantize
from .ptq import PTQReport, dequantize_params, quantize_params
from .qarray import QuantizedArray
from .spec import QuantSpec
from .state import QuantState

__version__ = "0.1.0"

__all__ = [
    "QuantSpec",
    "QuantState",
    "calibrate",
    "lsq_init",
    "quantize",
    "dequantize",
    "fake_quant",
    "check_finite",
    "QuantizedArray",
    "quantize_params",
    "dequantize_params",
    "PTQReport",
    "int_dot_general",
    "int_conv_general_dilated",
    "IntKernel",
    "make_int_dot_general",
    "promote_dtype",
    "save_quantized",
    "load_quantized",
    "observers",
    "qat",
    "linen",
    "nnx",
    "serving",
]

_LAZY = ("linen", "nnx", "serving")


def __getattr__(name):
    if name in _LAZY:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
