"""Statistics of a layer's input, accumulated over calibration batches.

For input rows ``X (M, K)`` (``KernelLayout.rows``), summed over every batch:

* ``hessian``: ``sum X^T X`` (``K x K``; GPTQ's ``H = 2 X^T X / n`` is
  ``2 * hessian / count``);
* ``abs_sum``: ``sum_m |X[m, k]|`` (AWQ's ``mean|X|`` is ``abs_sum / count``);
* ``abs_max``: ``max_m |X[m, k]|`` (SmoothQuant);
* ``rows``: the first ``max_rows`` rows seen (AWQ's output-error search);
* ``count``: the number of rows.

Which fields are filled is the union of the methods' ``statistics``; the others
stay ``None``.  Non-finite inputs are rejected when the statistics are used
(``check_finite``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["LayerStats", "batch_stats", "merge", "STATISTICS"]

STATISTICS = frozenset({"hessian", "abs_mean", "abs_max", "rows"})


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerStats:
    """Input statistics of one layer (see the module docstring)."""

    count: Any
    hessian: Any = None
    abs_sum: Any = None
    abs_max: Any = None
    rows: Any = None

    @property
    def abs_mean(self):
        return self.abs_sum / jnp.maximum(self.count, 1.0)

    def check_finite(self, path: str) -> None:
        """Raise ``ValueError`` if a statistic is NaN / inf (non-finite inputs)."""
        for name in ("hessian", "abs_sum", "abs_max", "rows"):
            v = getattr(self, name)
            if v is not None and not bool(jnp.all(jnp.isfinite(v))):
                raise ValueError(f"calibrate_model: the input of {path!r} has NaN or inf "
                                 f"values ({name} is not finite); check the calibration data.")


def batch_stats(x_rows, needs: frozenset, max_rows: int) -> LayerStats:
    """The statistics of one batch's rows ``(M, K)`` (traceable)."""
    x = x_rows.astype(jnp.float32)
    hessian = abs_sum = abs_max = rows = None
    if "hessian" in needs:
        hessian = lax.dot_general(x, x, (((0,), (0,)), ((), ())),
                                  precision=lax.Precision.HIGHEST)
    if "abs_mean" in needs:
        abs_sum = jnp.sum(jnp.abs(x), axis=0)
    if "abs_max" in needs:
        abs_max = jnp.max(jnp.abs(x), axis=0)
    if "rows" in needs:
        rows = x[:max_rows]
    return LayerStats(jnp.float32(x.shape[0]), hessian, abs_sum, abs_max, rows)


def merge(a: LayerStats | None, b: LayerStats, max_rows: int) -> LayerStats:
    """``a`` and ``b`` together (``a is None``: ``b``)."""
    if a is None:
        return b
    add = lambda u, v: None if u is None else u + v  # noqa: E731
    rows = a.rows
    if rows is not None and rows.shape[0] < max_rows:
        rows = jnp.concatenate([rows, b.rows[:max_rows - rows.shape[0]]])
    return LayerStats(a.count + b.count, add(a.hessian, b.hessian), add(a.abs_sum, b.abs_sum),
                      None if a.abs_max is None else jnp.maximum(a.abs_max, b.abs_max), rows)
