"""AWQ, activation-aware weight quantization (Lin, Tang, Tang, Yang, Dang, Gan and
Han, "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration", MLSys 2024, arXiv:2306.00978; reference implementation:
github.com/mit-han-lab/llm-awq, ``awq/quantize/auto_scale.py``).

For one layer with kernel matrix ``W (K, N)`` and calibration rows ``X (R, K)``
(``KernelLayout``), per input channel ``k``::

    a_k      = mean |X[:, k]|                      (over every calibration row)
    s(alpha) = max(a^alpha, 1e-4);  s /= sqrt(max(s) * min(s))
    err(alpha) = mean((X W - X Q(diag(s) W) diag(s)^-1)^2)   over the stored rows
    alpha*   = argmin over alpha in {0, 1/n, ..., (n-1)/n}    (n = n_grid = 20)

``Q`` is round-to-nearest on the rule's grid (scales calibrated on ``diag(s) W``).
``alpha = 0`` gives ``s = 1``, plain round-to-nearest, so the chosen scales are never
worse than round-to-nearest on this objective (on the stored calibration rows).

The result: the kernel ``Q(diag(s*) W)`` and the per-input-channel
``input_scale = 1 / s*`` that the layer multiplies its input by (kept in the
layer rather than folded into a preceding LayerNorm / Dense, so that any layer can
use it; the served layer keeps it in a ``ScaledKernel``).  Differences from the
reference: the error is the layer's own output (the reference evaluates the
enclosing block, e.g. attention, and shares one scale between q/k/v), and its
weight-clipping search (``auto_clip``) is not done.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from ...core import numerics
from ...core.spec import QuantSpec
from ...core.state import QuantState
from ...flax.operands import MethodResult
from ...flax.rules import QuantMethod
from .layout import KernelLayout

__all__ = ["AWQ", "awq_scales", "awq_search"]


@dataclasses.dataclass(frozen=True)
class AWQ(QuantMethod):
    """AWQ settings for ``QuantRule(method=...)`` (see the module docstring).

    Args:
      n_grid: number of ``alpha`` values searched, ``k / n_grid`` for ``k < n_grid``.
      max_rows: calibration input rows kept per layer for the error search.
    """

    n_grid: int = 20
    max_rows: int = 4096

    name = "AWQ"
    statistics = frozenset({"abs_mean", "rows"})

    def __post_init__(self):
        for field in ("n_grid", "max_rows"):
            v = getattr(self, field)
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"AWQ.{field} must be an int >= 1; got {v!r}.")

    def apply(self, kernel, layout: KernelLayout, spec: QuantSpec, stats, path: str = ""):
        """``(MethodResult, details)`` for one layer from its input ``stats``."""
        kernel = kernel.astype(jnp.float32)
        errors = awq_search(kernel, stats.rows, stats.abs_mean, spec, layout, self.n_grid)
        best = int(jnp.argmin(errors))
        s = awq_scales(stats.abs_mean, best / self.n_grid)
        scaled = layout.kernel(layout.matrix(kernel) * s[:, None])
        state = QuantState(*numerics.calibrate(jnp, scaled, spec), spec)
        values = numerics.fake_quant(jnp, scaled, state.scale, state.zero_point, spec)
        result = MethodResult(values, state, layout.input_vector(1.0 / s))
        return result, {"alpha": best / self.n_grid, "rtn_error": float(errors[0]),
                        "error": float(errors[best])}


def awq_scales(abs_mean, alpha):
    """``s = max(a^alpha, 1e-4) / sqrt(max(s) min(s))`` per input channel."""
    s = jnp.maximum(jnp.power(abs_mean, alpha), 1e-4)
    return s / jnp.sqrt(jnp.max(s) * jnp.min(s))


@functools.partial(jax.jit, static_argnames=("spec", "layout", "n_grid"))
def awq_search(kernel, rows, abs_mean, spec: QuantSpec, layout: KernelLayout, n_grid: int = 20):
    """The output error ``mean((X W - X Q(diag(s) W) diag(s)^-1)^2)`` for each
    ``alpha = k / n_grid`` (``(n_grid,)``), ``X = rows`` ``(R, K)``."""
    w = layout.matrix(kernel)
    ref = rows @ w

    def error(alpha):
        s = awq_scales(abs_mean, alpha)
        scaled = layout.kernel(w * s[:, None])
        scale, zero_point = numerics.calibrate(jnp, scaled, spec)
        q = layout.matrix(numerics.fake_quant(jnp, scaled, scale, zero_point, spec))
        return jnp.mean((rows @ (q / s[:, None]) - ref) ** 2)

    return lax.map(error, jnp.arange(n_grid, dtype=abs_mean.dtype) / n_grid)
