"""SmoothQuant (Xiao, Lin, Seznec, Wu, Demouth and Han, "SmoothQuant: Accurate and
Efficient Post-Training Quantization for Large Language Models", ICML 2023,
arXiv:2211.10438; reference implementation: github.com/mit-han-lab/smoothquant,
``smoothquant/smooth.py``).

For w8a8 layers whose inputs have outlier channels: per input channel ``k``::

    s_k = max(max|X[:, k]|^alpha / max(max_n |W[k, n]|, 1e-5)^(1 - alpha), 1e-5)
    X' = X diag(s)^-1,   W' = diag(s) W          (X' W' = X W)

moving part of the activations' range into the weights (``alpha = 0.5`` by
default; larger ``alpha`` moves more).  The kernel becomes round-to-nearest of
``W'`` on the rule's grid, and the layer multiplies its input by
``input_scale = 1 / s`` before the input quantizer (whose range
``calibrate_model`` then observes on ``X'``).  The reference folds ``1 / s`` into
the preceding LayerNorm; here the layer keeps it (``ScaledKernel`` when served), so
any layer can use it.

``details``: ``outliers`` = ``max_k max|X[:, k]| / median_k max|X[:, k]|`` of the
input, and ``outliers_smoothed`` the same of ``X'``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from ...core import numerics
from ...core.spec import QuantSpec
from ...core.state import QuantState
from ...transform.methods import MethodResult, QuantMethod
from .layout import KernelLayout

__all__ = ["SmoothQuant", "smoothquant_scales", "outlier_ratio"]


@dataclasses.dataclass(frozen=True)
class SmoothQuant(QuantMethod):
    """SmoothQuant settings for ``QuantRule(method=...)`` (see the module docstring).

    Args:
      alpha: migration strength in ``[0, 1]``.
    """

    alpha: float = 0.5

    name = "SmoothQuant"
    statistics = frozenset({"abs_max"})
    scales_input: ClassVar[bool] = True

    def __post_init__(self):
        if not (isinstance(self.alpha, (int, float)) and 0 <= self.alpha <= 1):
            raise ValueError(f"SmoothQuant.alpha must be in [0, 1]; got {self.alpha!r}.")

    def check_rule(self, rule) -> None:
        super().check_rule(rule)
        if rule.act is None:
            raise ValueError(f"QuantRule({rule.module_path!r}, method=SmoothQuant) has no act "
                             "spec; SmoothQuant moves activation outliers into the weights "
                             "for quantized inputs (w8a8): give it act=.")

    def apply(self, kernel, layout: KernelLayout, spec: QuantSpec, stats, path: str = ""):
        """``(MethodResult, details)`` for one layer from its input ``stats``."""
        kernel = kernel.astype(jnp.float32)
        w = layout.matrix(kernel)
        s = smoothquant_scales(stats.abs_max, w, self.alpha)
        scaled = layout.kernel(w * s[:, None])
        state = QuantState(*numerics.calibrate(jnp, scaled, spec), spec)
        values = numerics.fake_quant(jnp, scaled, state.scale, state.zero_point, spec)
        result = MethodResult(values, state, layout.weight_vector(1.0 / s))
        return result, {"outliers": float(outlier_ratio(stats.abs_max)),
                        "outliers_smoothed": float(outlier_ratio(stats.abs_max / s))}


def smoothquant_scales(abs_max, w, alpha: float):
    """``s (K,)`` from the input's ``max|X|`` per channel and the matrix ``W (K, N)``."""
    w_max = jnp.maximum(jnp.max(jnp.abs(w), axis=1), 1e-5)
    return jnp.maximum(jnp.power(abs_max, alpha) / jnp.power(w_max, 1.0 - alpha), 1e-5)


def outlier_ratio(abs_max):
    """``max / median`` of per-channel maxima (1 for a flat profile)."""
    return jnp.max(abs_max) / jnp.maximum(jnp.median(abs_max), 1e-30)
