"""AWQ, activation-aware weight quantization (Lin, Tang, Tang, Yang, Dang, Gan and
Han, "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration", MLSys 2024, arXiv:2306.00978; reference implementation:
github.com/mit-han-lab/llm-awq, ``awq/quantize/auto_scale.py`` and
``auto_clip.py``).

For one layer with kernel matrix ``W (K, N)`` and calibration rows ``X (R, K)``
(``KernelLayout``), summarized by ``a_k = mean|X[:, k]|`` and ``H = X^T X / R``
(``K x K``; every calibration row counts), AWQ searches two things.

**Scales** (``auto_scale``), per input channel ``k``::

    s(alpha) = max(a^alpha, 1e-4);  s /= sqrt(max(s) * min(s))
    alpha in {0, 1/n, ..., (n-1)/n}                        (n = n_grid = 20)

the layer computing ``(X diag(s)^-1) Q(diag(s) W)``.

**Clipping** (``auto_clip``), for the scaled matrix ``V = diag(s) W``: each group
``g`` of rows (the grid's groups of ``group_size`` inputs; all ``K`` rows for a
per-output-channel grid) and output column ``n`` gets its own range shrink
``r in {1, 1 - 1/m, ..., > 1 - max_shrink}`` (``m = clip_grid = 20``,
``max_shrink = 0.5``): the round-to-nearest range ``[lo, hi]`` of that group becomes
``[r lo, r hi]`` (qparams from ``numerics.qparams_from_range``; values outside
saturate), and ``r`` minimizes the group's own output error
``e_gn(r) = d^T H_s[g, g] d``, ``d = V[g, n] - Q_r(V[g, n])``, with
``H_s = diag(s)^-1 H diag(s)^-1``: the squared error of the group's partial sum
``sum_{k in g} X_k W_kn`` averaged over the rows.

Candidates are scored on the layer's whole output error::

    err = mean((X W - (X diag(s)^-1) Q(V))^2) = sum(D * (H_s D)) / N,   D = V - Q(V)

By default the clipping is searched for every ``alpha`` and the candidate (each
``alpha``, with and without clipping) with the least ``err`` is kept;
``joint=False`` does as the reference does, choosing ``alpha`` on round-to-nearest's
ranges and searching the clipping for that ``alpha`` only (``n_grid`` times less
clipping work; on ``benchmarks/bench_ptq_algos.py`` both recover about the same
share of round-to-nearest's error).  ``alpha = 0`` without clipping is
round-to-nearest, so the result is never worse than round-to-nearest on this
objective.

The result: the kernel ``Q(V)`` and the per-input-channel ``input_scale = 1 / s``
that the layer multiplies its input by (kept in the layer rather than folded into a
preceding LayerNorm / Dense, so that any layer can use it; the served layer keeps it
in a ``ScaledKernel``).

Differences from the reference: the objective is the layer's own output, on every
calibration row through ``H`` (the reference evaluates the enclosing block for the
scales, e.g. attention with one scale shared by q/k/v, and a sample of 512 tokens
for the clipping); clipping shrinks both ends of an affine range by ``r`` (the
reference clamps to ``[-r max|w|, r max|w|]``), applies to every layer (the
reference skips q/k), and is kept only where it lowers the layer's error; a
per-tensor grid is not clipped (one range for the whole kernel).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from ...core import numerics
from ...core.spec import QuantSpec
from ...core.state import QuantState
from ...flax.operands import MethodResult
from ...flax.rules import QuantMethod
from .layout import KernelLayout

__all__ = ["AWQ", "awq_scales", "awq_search", "awq_candidate", "awq_clip_ratios"]

_HI = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class AWQ(QuantMethod):
    """AWQ settings for ``QuantRule(method=...)`` (see the module docstring).

    Args:
      n_grid: number of ``alpha`` values searched, ``k / n_grid`` for ``k < n_grid``.
      clip: also search a range shrink per group and output (``auto_clip``).
      clip_grid: shrink step ``1 / clip_grid``.
      max_shrink: shrinks ``r`` are searched down to (not including) ``1 - max_shrink``.
      joint: search the clipping for every ``alpha``; ``False``: as the reference,
        only for the ``alpha`` chosen on round-to-nearest's ranges (``n_grid`` times
        less clipping work).
    """

    n_grid: int = 20
    clip: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5
    joint: bool = True

    name = "AWQ"
    statistics = frozenset({"abs_mean", "hessian"})

    def __post_init__(self):
        for field in ("n_grid", "clip_grid"):
            v = getattr(self, field)
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"AWQ.{field} must be an int >= 1; got {v!r}.")
        if not (isinstance(self.max_shrink, (int, float)) and 0 <= self.max_shrink < 1):
            raise ValueError(f"AWQ.max_shrink must be in [0, 1); got {self.max_shrink!r}.")

    def ratios(self) -> tuple[float, ...]:
        """The clipping shrinks searched, ``1`` first."""
        n = max(1, math.ceil(self.max_shrink * self.clip_grid)) if self.clip else 1
        return tuple(1.0 - i / self.clip_grid for i in range(n))

    def apply(self, kernel, layout: KernelLayout, spec: QuantSpec, stats, path: str = ""):
        """``(MethodResult, details)`` for one layer from its input ``stats``."""
        kernel = kernel.astype(jnp.float32)
        hessian = stats.hessian / jnp.maximum(stats.count, 1.0)
        ratios = self.ratios() if _clippable(layout, spec) else (1.0,)
        if self.joint:
            errors = awq_search(kernel, hessian, stats.abs_mean, spec, layout, self.n_grid,
                                ratios)
        else:  # the scale on round-to-nearest's ranges, then the clipping for that scale
            errors = awq_search(kernel, hessian, stats.abs_mean, spec, layout, self.n_grid)
            i = int(jnp.argmin(errors))
            if len(ratios) > 1:
                s = awq_scales(stats.abs_mean, i // 2 / self.n_grid)
                _, clipped, _ = awq_candidate(kernel, hessian, s, spec, layout, ratios)
                errors = errors.at[i | 1].set(clipped)
        best = int(jnp.argmin(errors))
        alpha, clip = best // 2 / self.n_grid, bool(best % 2) and len(ratios) > 1
        s = awq_scales(stats.abs_mean, alpha)
        scaled = layout.kernel(layout.matrix(kernel) * s[:, None])
        if clip:
            r = awq_candidate(kernel, hessian, s, spec, layout, ratios)[2]
            state = _clipped_state(scaled, r, spec, layout)
        else:
            r = jnp.ones(())
            state = QuantState(*numerics.calibrate(jnp, scaled, spec), spec)
        values = numerics.fake_quant(jnp, scaled, state.scale, state.zero_point, spec)
        result = MethodResult(values, state, layout.input_vector(1.0 / s))
        return result, {"alpha": alpha, "clip_mean": float(jnp.mean(r)),
                        "rtn_error": float(errors[0]), "error": float(errors[best])}


def awq_scales(abs_mean, alpha):
    """``s = max(a^alpha, 1e-4) / sqrt(max(s) min(s))`` per input channel."""
    s = jnp.maximum(jnp.power(abs_mean, alpha), 1e-4)
    return s / jnp.sqrt(jnp.max(s) * jnp.min(s))


def _clippable(layout: KernelLayout, spec: QuantSpec) -> bool:
    """Grouped grids and grids with one range per output column (not per tensor)."""
    return layout.plan(spec) is not None or math.prod(spec.scale_shape(layout.shape)) == layout.n


def _matrix_grid(layout: KernelLayout, spec: QuantSpec):
    """``(matrix spec, rows per group)`` of ``W``'s grid."""
    group = layout.plan(spec)
    return layout.matrix_spec(spec, group), group or layout.k


def _ranges(v, spec: QuantSpec, layout: KernelLayout, mspec: QuantSpec):
    """Round-to-nearest's range of ``V``'s grid, state-shaped for ``mspec``: per group
    ``(K / g, N)``, or the kernel's own ranges (per tensor, per output channel, ...)
    repeated per output column ``(1, N)``."""
    if mspec.axis == 0:
        return numerics.calibration_range(jnp, v, mspec)
    lo, hi = numerics.calibration_range(jnp, layout.kernel(v), spec)
    return tuple(layout.matrix(jnp.broadcast_to(b, layout.shape))[:1] for b in (lo, hi))


def _output_error(d, h):
    """``sum(D * (H D)) / N``: the mean squared output error over rows and columns."""
    return jnp.sum(d * jnp.matmul(h, d, precision=_HI)) / d.shape[1]


def _group_errors(d, h, group):
    """``(G, N)``: ``d[g, n]^T H[g, g] d[g, n]`` for each group ``g`` of ``group`` rows."""
    k, n = d.shape
    g = k // group
    blocks = jnp.transpose(jnp.diagonal(jnp.reshape(h, (g, group, g, group)), axis1=0, axis2=2),
                           (2, 0, 1))
    dg = jnp.reshape(d, (g, group, n))
    return jnp.sum(dg * jnp.matmul(blocks, dg, precision=_HI), axis=1)


def _quantized(v, lo, hi, r, mspec):
    """``Q_r(V)``: round-to-nearest of ``V`` on the range ``[r lo, r hi]`` (state-shaped)."""
    scale, zp = numerics.qparams_from_range(jnp, lo * r, hi * r, mspec)
    return numerics.fake_quant(jnp, v, scale, zp, mspec)


def _clip_search(v, h, lo, hi, mspec, group, ratios):
    """Per (group, column) ``(G, N)``: the shrink in ``ratios`` with the least group
    error (the first, i.e. the largest, on ties)."""
    grid = jnp.asarray(ratios, v.dtype)
    errs = lax.map(lambda r: _group_errors(v - _quantized(v, lo, hi, r, mspec), h, group), grid)
    return grid[jnp.argmin(errs, axis=0)]


def _candidate(w, hessian, s, spec, layout, ratios):
    """``(plain error, clipped error, shrinks)`` of ``diag(s) W`` (see ``awq_candidate``)."""
    mspec, group = _matrix_grid(layout, spec)
    v = w * s[:, None]
    h = hessian / (s[:, None] * s[None, :])
    lo, hi = _ranges(v, spec, layout, mspec)
    plain = _output_error(v - _quantized(v, lo, hi, 1.0, mspec), h)
    if len(ratios) == 1:
        return plain, plain, jnp.ones_like(lo)
    r = _clip_search(v, h, lo, hi, mspec, group, ratios)
    return plain, _output_error(v - _quantized(v, lo, hi, r, mspec), h), r


@functools.partial(jax.jit, static_argnames=("spec", "layout", "n_grid", "ratios"))
def awq_search(kernel, hessian, abs_mean, spec: QuantSpec, layout: KernelLayout,
               n_grid: int = 20, ratios: tuple[float, ...] = (1.0,)):
    """The output error ``mean((X W - X diag(s)^-1 Q(diag(s) W))^2)`` of every
    candidate, ``(2 n_grid,)``: entry ``2 i`` for ``alpha = i / n_grid`` with
    round-to-nearest ranges, ``2 i + 1`` with the clipping search over ``ratios``
    (the same as ``2 i`` for ``ratios = (1.0,)``).  ``hessian`` is ``X^T X / R``."""
    w = layout.matrix(kernel)

    def errors(alpha):
        plain, clipped, _ = _candidate(w, hessian, awq_scales(abs_mean, alpha), spec, layout,
                                       ratios)
        return jnp.stack([plain, clipped])

    alphas = jnp.arange(n_grid, dtype=abs_mean.dtype) / n_grid
    return jnp.reshape(lax.map(errors, alphas), (-1,))


@functools.partial(jax.jit, static_argnames=("spec", "layout", "ratios"))
def awq_candidate(kernel, hessian, s, spec: QuantSpec, layout: KernelLayout,
                  ratios: tuple[float, ...]):
    """For the input-channel scales ``s``: ``(error on round-to-nearest's ranges, error
    with the clipping search, the chosen shrinks)``; the shrinks are per (group, output
    column), ``(K / g, N)`` for groups of ``g`` rows, ``(1, N)`` for a per-output-column
    grid."""
    return _candidate(layout.matrix(kernel), hessian, s, spec, layout, ratios)


def awq_clip_ratios(kernel, hessian, s, spec: QuantSpec, layout: KernelLayout,
                    ratios: tuple[float, ...]):
    """The chosen shrinks of ``awq_candidate``."""
    return awq_candidate(kernel, hessian, s, spec, layout, ratios)[2]


def _clipped_state(scaled, r, spec: QuantSpec, layout: KernelLayout) -> QuantState:
    """The kernel's ``QuantState`` for the ranges of ``scaled`` shrunk by ``r``."""
    mspec, _ = _matrix_grid(layout, spec)
    lo, hi = _ranges(layout.matrix(scaled), spec, layout, mspec)
    scale, zp = numerics.qparams_from_range(jnp, lo * r, hi * r, mspec)
    if layout.plan(spec) is not None:
        return layout.state_from_matrix(scale, zp, spec)
    # one range per output column: (1, N) -> the kernel's scale shape (1 on the in-axes)
    order = jnp.argsort(jnp.asarray(layout.out_axes))
    ones = [1 if a in layout.in_axes else layout.shape[a] for a in range(len(layout.shape))]

    def back(a):
        t = jnp.transpose(jnp.reshape(a, layout.out_dims), tuple(int(i) for i in order))
        return jnp.reshape(jnp.reshape(t, ones), spec.scale_shape(layout.shape))

    return QuantState(back(scale), back(zp), spec)
