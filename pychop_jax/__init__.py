"""pychop-jax: quantization for JAX, Flax, NumPy and PyTorch.

The public API, re-exported from the subpackages that define it::

    spec  = pychop_jax.QuantSpec(bits=8, symmetric=False, axis=None)
    state = pychop_jax.calibrate(x, spec)      # QuantState pytree
    q     = pychop_jax.quantize(x, state)      # integer codes
    xhat  = pychop_jax.dequantize(q, state)    # floats
    y     = pychop_jax.fake_quant(x, state)    # STE gradient
    s     = pychop_jax.lsq_init(x, spec)       # learnable state: fake_quant(x, s, grad='lsq')

Subpackages (arrows point down): ``serving`` (integer matmuls, PTQ, checkpoints,
``serve_model``, decoding, the post-training algorithms) above ``flax`` (the linen /
nnx QAT layers; ``quantize_model`` for linen, nnx, Equinox and functions) and
``interop`` (the same numerics on NumPy and Torch arrays), above ``transform`` (the
framework-free jaxpr transformation that finds weights by dataflow and quantizes them;
the layer-level QAT functions ``qat``), above ``core`` (spec, numerics, state, ops,
observers, QuantizedArray).  Public
modules: ``observers``, ``formats`` (MX / NVFP4 / NF4 presets), ``qat``,
``algorithms`` (GPTQ, AWQ, SmoothQuant, HQQ for ``QuantRule(method=...)``, run by
``calibrate_model``), ``serving``, ``linen`` and ``nnx``; the last two are imported on
first access, so that ``import pychop_jax`` does not load ``flax.nnx``.  Every other
module is reached by its subpackage (``pychop_jax.core.numerics``,
``pychop_jax.serving.ptq``).
"""

import importlib

from . import algorithms
from .core import formats, observers
from .core.ops import calibrate, check_finite, dequantize, fake_quant, lsq_init, quantize
from .core.qarray import QuantizedArray
from .core.spec import QuantSpec
from .core.state import QuantState
from .flax import serialization as _serialization  # noqa: F401  (registers the pytrees)
from .flax.models import quantization_report, quantize_model
from .serving.algorithms import AWQ, GPTQ, HQQ, CalibrationReport, SmoothQuant, calibrate_model
from .serving.checkpoint import load_quantized, save_quantized
from .serving.deploy import serve_model
from .serving.float_matmul import float_dot_general
from .serving.int_matmul import (
    QuantizedKernel,
    int_conv_general_dilated,
    int_dot_general,
    make_int_dot_general,
    promote_dtype,
)
from .serving.ptq import PTQReport, dequantize_params, quantize_params
from .serving.scaled_kernel import ScaledKernel
from .transform import qat
from .transform.rules import QuantReport, QuantRule

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
    "float_dot_general",
    "QuantizedKernel",
    "make_int_dot_general",
    "promote_dtype",
    "save_quantized",
    "load_quantized",
    "QuantRule",
    "QuantReport",
    "quantize_model",
    "quantization_report",
    "serve_model",
    "calibrate_model",
    "CalibrationReport",
    "GPTQ",
    "AWQ",
    "SmoothQuant",
    "HQQ",
    "ScaledKernel",
    "algorithms",
    "observers",
    "formats",
    "qat",
    "serving",
]
# (``linen`` and ``nnx`` are left out of ``__all__`` so that ``from pychop_jax import *``
# does not import them: access them as ``pychop_jax.linen`` / ``pychop_jax.nnx``)

#: modules imported on first access (``pychop_jax.nnx`` loads ``flax.nnx``)
_LAZY = {"linen": ".linen", "nnx": ".nnx"}


def __getattr__(name):
    if name == "IntKernel":  # QuantizedKernel's deprecated name (a DeprecationWarning)
        from .serving import int_matmul

        return int_matmul.IntKernel
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return importlib.import_module(target, __name__)


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
