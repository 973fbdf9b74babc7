"""``ScaledKernel``: a served kernel whose layer first multiplies its input by a
per-input-channel factor.

AWQ and SmoothQuant quantize ``diag(s) W`` and feed the layer ``x / s``; the
factor ``input_scale = 1 / s`` is kept with the kernel (rather than folded into a
preceding LayerNorm / Dense, which depends on the model's graph), so a served layer
computes ``(x * input_scale) @ dequantize(kernel)`` -- or the integer product, with
the input quantized after the multiplication, for a ``QuantizedKernel``.
``input_scale`` broadcasts against the input from its trailing axes
(``KernelLayout.input_vector``).

``serve_model`` builds them and ``save_quantized`` stores them (codes + scales of
the inner kernel, plus ``input_scale``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from ..core.qarray import QuantizedArray
from .int_matmul import KernelWrapper, QuantizedKernel

__all__ = ["ScaledKernel", "scaled_input"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ScaledKernel(KernelWrapper):
    """An ``QuantizedKernel`` / ``QuantizedArray`` and the factor its layer's input is
    multiplied by first.

    Attributes:
      kernel: the quantized weights (first field: Flax's shape check reads the first
        leaf, the codes).
      input_scale: per-input-channel factor, trailing-aligned with the input.
    """

    kernel: QuantizedKernel | QuantizedArray
    input_scale: Any

    wrapped = "kernel"


def scaled_input(x, kernel: ScaledKernel):
    """``x * kernel.input_scale`` in ``x``'s dtype."""
    return x * kernel.input_scale.astype(x.dtype)
