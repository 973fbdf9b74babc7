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
per-output-channel grid) and output column ``n`` gets its own pair of range factors:
the round-to-nearest range ``[lo, hi]`` of that group becomes ``[r_lo lo, r_hi hi]``
(qparams from ``numerics.qparams_from_range``; values outside saturate), with the
factors from::

    F = {1, 1 - 1/m, 1 - 2/m, ... > 1 - max_shrink} + {1 + 1/m, ... <= 1 + max_grow}
    (m = clip_grid = 40, max_shrink = 0.5, max_grow = 0.1: 24 factors in steps of 0.025)

The pair minimizes the group's own output error ``e_gn = d^T H_s[g, g] d``,
``d = V[g, n] - Q(V[g, n])``, with ``H_s = diag(s)^-1 H diag(s)^-1``: the squared
error of the group's partial sum ``sum_{k in g} X_k W_kn`` averaged over the rows.
Factors above 1 widen the range: under the ``H``-weighted error a slightly coarser
step (and the integer zero point that moves with it) can put the levels nearer the
weights that matter.  Two searches:

1. *shared*: ``r_lo = r_hi = r in F`` (the reference's one factor), ``|F|`` candidates;
2. *independent ends* (``ends="independent"``, asymmetric grids; a symmetric grid
   only uses ``max(-lo, hi)``): every pair in ``F x F`` (``|F|^2`` candidates, one
   ``lax.map`` over them), for the chosen ``alpha`` only.

Candidates are scored on the layer's whole output error::

    err = mean((X W - (X diag(s)^-1) Q(V))^2) = sum(D * (H_s D)) / N,   D = V - Q(V)

By default the shared clipping is searched for every ``alpha`` and the candidate
(each ``alpha``, with and without clipping) with the least ``err`` is kept;
``joint=False`` does as the reference does, choosing ``alpha`` on round-to-nearest's
ranges and searching the clipping for that ``alpha`` only (``n_grid`` times less
clipping work; ``benchmarks/bench_ptq_algos.py`` compares the two).  Then, for that
``alpha``, the independent-ends search replaces the shared factors where its ``err`` is
lower (the per-group choice ignores the error terms between groups, so it is compared on
the whole ``err``).
``alpha = 0`` without clipping is round-to-nearest, so the result is never worse
than round-to-nearest on this objective.

The result: the kernel ``Q(V)`` and the per-input-channel ``input_scale = 1 / s``
that the layer multiplies its input by (kept in the layer rather than folded into a
preceding LayerNorm / Dense, so that any layer can use it; the served layer keeps it
in a ``ScaledKernel``).

Differences from the reference: the objective is the layer's own output, on every
calibration row through ``H`` (the reference evaluates the enclosing block for the
scales, e.g. attention with one scale shared by q/k/v, and a sample of 512 tokens
for the clipping); clipping scales the two ends of an affine range, by one factor or
by two searched independently, and may also widen it (the reference clamps to
``[-r max|w|, r max|w|]`` with ``r`` from 1 down to 0.5 in steps of 0.05), applies to
every layer (the reference skips q/k), and is kept only where it lowers the layer's
error; a per-tensor grid is not clipped (one range for the whole kernel).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax import lax

from ...core import numerics
from ...core.spec import QuantSpec
from ...core.state import QuantState
from ...transform.methods import MethodResult, QuantMethod
from .layout import KernelLayout

__all__ = ["AWQ", "awq_scales", "awq_search", "awq_candidate", "awq_clip_ratios"]

_HI = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class AWQ(QuantMethod):
    """AWQ settings for ``QuantRule(method=...)`` (see the module docstring).

    Args:
      n_grid: number of ``alpha`` values searched, ``k / n_grid`` for ``k < n_grid``.
      clip: also search each group's range (``auto_clip``).
      clip_grid: range factors are searched in steps of ``1 / clip_grid``.
      max_shrink: factors go down to (not including) ``1 - max_shrink``.
      max_grow: and up to (including) ``1 + max_grow``.
      ends: ``"independent"``: a second search, for the chosen ``alpha``, over every
        pair of factors for the two ends of an asymmetric grid's range; ``"shared"``:
        one factor for both ends only (the reference; symmetric grids always).
      joint: search the (shared-factor) clipping for every ``alpha``; ``False``: as the
        reference, only for the ``alpha`` chosen on round-to-nearest's ranges
        (``n_grid`` times less clipping work).
    """

    n_grid: int = 20
    clip: bool = True
    clip_grid: int = 40
    max_shrink: float = 0.5
    max_grow: float = 0.1
    ends: str = "independent"
    joint: bool = True

    name = "AWQ"
    statistics = frozenset({"abs_mean", "hessian"})
    scales_input: ClassVar[bool] = True

    def __post_init__(self):
        for field in ("n_grid", "clip_grid"):
            v = getattr(self, field)
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"AWQ.{field} must be an int >= 1; got {v!r}.")
        if not (isinstance(self.max_shrink, (int, float)) and 0 <= self.max_shrink < 1):
            raise ValueError(f"AWQ.max_shrink must be in [0, 1); got {self.max_shrink!r}.")
        if not (isinstance(self.max_grow, (int, float)) and 0 <= self.max_grow <= 1):
            raise ValueError(f"AWQ.max_grow must be in [0, 1]; got {self.max_grow!r}.")
        if self.ends not in ("independent", "shared"):
            raise ValueError(f"AWQ.ends must be 'independent' or 'shared'; got {self.ends!r}.")

    def ratios(self) -> tuple[float, ...]:
        """The range factors searched: ``1`` first, then the shrinks
        ``1 - i / clip_grid`` (``> 1 - max_shrink``), then the growths
        ``1 + i / clip_grid`` (``<= 1 + max_grow``)."""
        if not self.clip:
            return (1.0,)
        m = self.clip_grid
        shrinks = max(1, math.ceil(self.max_shrink * m - 1e-9))
        grows = math.floor(self.max_grow * m + 1e-9)
        return (tuple(1.0 - i / m for i in range(shrinks))
                + tuple(1.0 + i / m for i in range(1, grows + 1)))

    def apply(self, kernel, layout: KernelLayout, spec: QuantSpec, stats, path: str = ""):
        """``(MethodResult, details)`` for one layer from its input ``stats``."""
        ratios = self.ratios() if _clippable(layout, spec) else (1.0,)
        independent = len(ratios) > 1 and self.ends == "independent" and not spec.symmetric
        out = _awq_layer(kernel.astype(jnp.float32),
                         stats.hessian / jnp.maximum(stats.count, 1.0), stats.abs_mean,
                         spec=spec, layout=layout, n_grid=self.n_grid, ratios=ratios,
                         joint=self.joint, independent=independent)
        errors, best, error, r_lo, r_hi, s, values, scale, zero_point = out
        result = MethodResult(values, QuantState(scale, zero_point, spec),
                              layout.weight_vector(1.0 / s))
        return result, {"alpha": int(best) // 2 / self.n_grid,
                        "clip_mean": float(jnp.mean(r_lo + r_hi) / 2),
                        "rtn_error": float(errors[0]), "error": float(error)}


@functools.partial(jax.jit, static_argnames=("spec", "layout", "n_grid", "ratios", "joint",
                                             "independent"))
def _awq_layer(kernel, hessian, abs_mean, *, spec, layout, n_grid, ratios, joint, independent):
    """``AWQ.apply`` in one jitted call: ``(errors (2 n_grid,), best candidate, its
    error, r_lo, r_hi, s, kernel values, scale, zero point)``."""
    w = layout.matrix(kernel)
    alphas = jnp.arange(n_grid, dtype=abs_mean.dtype) / n_grid
    if joint:
        errors = _search(w, hessian, abs_mean, spec, layout, alphas, ratios)
    else:  # the scale on round-to-nearest's ranges, then the clipping for that scale
        errors = _search(w, hessian, abs_mean, spec, layout, alphas, (1.0,))
        if len(ratios) > 1:
            i = jnp.argmin(errors)
            s = awq_scales(abs_mean, alphas[i // 2])
            errors = errors.at[i | 1].set(_candidate(w, hessian, s, spec, layout, ratios)[1])
    best = jnp.argmin(errors)
    s = awq_scales(abs_mean, alphas[best // 2])
    v = w * s[:, None]
    if len(ratios) == 1:  # not clipped
        scale, zero_point = numerics.calibrate(jnp, layout.kernel(v), spec)
        one = jnp.ones(())
        error = errors[best]
        r_lo = r_hi = one
    else:
        _, clipped, r_lo, r_hi = _candidate(w, hessian, s, spec, layout, ratios)
        clip = best % 2 == 1
        error = jnp.where(clip, clipped, errors[best])
        r_lo, r_hi = (jnp.where(clip, r, jnp.ones_like(r)) for r in (r_lo, r_hi))
        if independent:  # both ends' factors, for this alpha; kept where err is lower
            _, err2, lo2, hi2 = _candidate(w, hessian, s, spec, layout, ratios, True)
            better = err2 < error
            error = jnp.where(better, err2, error)
            r_lo, r_hi = jnp.where(better, lo2, r_lo), jnp.where(better, hi2, r_hi)
        scale, zero_point = _clipped_qparams(v, r_lo, r_hi, spec, layout)
    values = numerics.fake_quant(jnp, layout.kernel(v), scale, zero_point, spec)
    return errors, best, error, r_lo, r_hi, s, values, scale, zero_point


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


def _quantized(v, lo, hi, r_lo, r_hi, mspec):
    """``Q(V)`` by round-to-nearest on the range ``[r_lo lo, r_hi hi]`` (state-shaped)."""
    scale, zp = numerics.qparams_from_range(jnp, lo * r_lo, hi * r_hi, mspec)
    return numerics.fake_quant(jnp, v, scale, zp, mspec)


def _factor_pairs(ratios, independent: bool):
    """``(C, 2)`` candidate ``(r_lo, r_hi)``: every pair of ``ratios`` (independent
    ends) or ``(r, r)``; ``(1, 1)`` first."""
    if independent:
        return tuple((a, b) for a in ratios for b in ratios)
    return tuple((r, r) for r in ratios)


def _clip_search(v, h, lo, hi, mspec, group, pairs):
    """Per (group, column) ``(G, N)`` each: the factors ``(r_lo, r_hi)`` in ``pairs``
    with the least group error (the first on ties)."""
    grid = jnp.asarray(pairs, v.dtype)
    errs = lax.map(lambda p: _group_errors(v - _quantized(v, lo, hi, p[0], p[1], mspec), h,
                                           group), grid)
    best = jnp.argmin(errs, axis=0)
    return grid[best, 0], grid[best, 1]


def _candidate(w, hessian, s, spec, layout, ratios, independent=False):
    """``(plain error, clipped error, r_lo, r_hi)`` of ``diag(s) W`` (see
    ``awq_candidate``)."""
    mspec, group = _matrix_grid(layout, spec)
    v = w * s[:, None]
    h = hessian / (s[:, None] * s[None, :])
    lo, hi = _ranges(v, spec, layout, mspec)
    plain = _output_error(v - _quantized(v, lo, hi, 1.0, 1.0, mspec), h)
    if len(ratios) == 1:
        return plain, plain, jnp.ones_like(lo), jnp.ones_like(hi)
    r_lo, r_hi = _clip_search(v, h, lo, hi, mspec, group,
                              _factor_pairs(ratios, independent and not spec.symmetric))
    return plain, _output_error(v - _quantized(v, lo, hi, r_lo, r_hi, mspec), h), r_lo, r_hi


def _search(w, hessian, abs_mean, spec, layout, alphas, ratios):
    """``(2 len(alphas),)``: plain and shared-factor clipped error per ``alpha``."""
    def errors(alpha):
        plain, clipped, _, _ = _candidate(w, hessian, awq_scales(abs_mean, alpha), spec,
                                          layout, ratios)
        return jnp.stack([plain, clipped])

    return jnp.reshape(lax.map(errors, alphas), (-1,))


@functools.partial(jax.jit, static_argnames=("spec", "layout", "n_grid", "ratios"))
def awq_search(kernel, hessian, abs_mean, spec: QuantSpec, layout: KernelLayout,
               n_grid: int = 20, ratios: tuple[float, ...] = (1.0,)):
    """The output error ``mean((X W - X diag(s)^-1 Q(diag(s) W))^2)`` of every
    candidate, ``(2 n_grid,)``: entry ``2 i`` for ``alpha = i / n_grid`` with
    round-to-nearest ranges, ``2 i + 1`` with the clipping search over ``ratios``, one
    factor for both ends of each range (the same as ``2 i`` for ``ratios = (1.0,)``).
    ``hessian`` is ``X^T X / R``."""
    alphas = jnp.arange(n_grid, dtype=abs_mean.dtype) / n_grid
    return _search(layout.matrix(kernel), hessian, abs_mean, spec, layout, alphas, ratios)


@functools.partial(jax.jit, static_argnames=("spec", "layout", "ratios", "independent"))
def awq_candidate(kernel, hessian, s, spec: QuantSpec, layout: KernelLayout,
                  ratios: tuple[float, ...], independent: bool = False):
    """For the input-channel scales ``s``: ``(error on round-to-nearest's ranges, error
    with the clipping search, r_lo, r_hi)``.  The factors of the two ends of the
    ranges are per (group, output column), ``(K / g, N)`` for groups of ``g`` rows,
    ``(1, N)`` for a per-output-column grid; searched over every pair of ``ratios``
    when ``independent`` (asymmetric grids), else equal, over ``ratios``."""
    return _candidate(layout.matrix(kernel), hessian, s, spec, layout, ratios, independent)


def awq_clip_ratios(kernel, hessian, s, spec: QuantSpec, layout: KernelLayout,
                    ratios: tuple[float, ...], independent: bool = False):
    """The chosen factors ``(r_lo, r_hi)`` of ``awq_candidate``."""
    return awq_candidate(kernel, hessian, s, spec, layout, ratios, independent)[2:]


def _clipped_qparams(v, r_lo, r_hi, spec: QuantSpec, layout: KernelLayout):
    """The kernel's ``(scale, zero_point)`` for the ranges ``[r_lo lo, r_hi hi]`` of
    ``V``'s grid (``V = matrix(kernel)``)."""
    mspec, _ = _matrix_grid(layout, spec)
    lo, hi = _ranges(v, spec, layout, mspec)
    scale, zp = numerics.qparams_from_range(jnp, lo * r_lo, hi * r_hi, mspec)
    state = layout.state_from_matrix(scale, zp, spec)
    return state.scale, state.zero_point
