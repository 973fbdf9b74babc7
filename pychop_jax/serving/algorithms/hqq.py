"""HQQ, half-quadratic quantization (Badri and Shaji, "Half-Quadratic Quantization of
Large Machine Learning Models", 2023, mobiusml.github.io/hqq_blog; reference
implementation: github.com/mobiusml/hqq, ``hqq/core/optimize.py``,
``optimize_weights_proximal_legacy``).  Calibration-free.

Per group of the rule's grid (every scale of the ``QuantSpec``: one row ``w`` of
``numerics.layout``'s view), HQQ minimizes the l_p reconstruction error
``phi(s, z) = sum |w - (q - z) s|^p`` (``p < 1``: heavy-tailed errors cost little)
over the zero point ``z`` (and optionally the scale ``s``), ``q = Q_{s,z}(w)``, by
half-quadratic splitting with an auxiliary error ``e``::

    start: s, z from the l2 range search below (init="rtn": round-to-nearest's
           range, the reference's start); beta = beta0
    repeat iters times:
        q   = clip(round(w / s) + round(z), qmin, qmax)
        r   = w - (q - round(z)) s
        e   = sign(r) max(|r| - |r|^(p-1) / beta, 0)        (l_p shrinkage)
        z   = mean(q - (w - e) / s)                         (the reference's update)
        s   = <q - round(z), w - e> / ||q - round(z)||^2    (optimize_scale only)
        beta = kappa * beta

Differences from the reference, all because the served grid has an *integer*
zero point (``QuantState``; codes are ``clip(round(w / s) + z)``): ``z`` is kept as
a float between iterations but every ``q`` and every error uses ``round(z)``
(clipped to the grid); and instead of the reference's global early stop on the
mean absolute error, each group keeps its best iterate on ``phi`` (the
round-to-nearest start included, so ``phi`` is never worse than round-to-nearest's).
Symmetric grids have no zero point: only the scale is optimized there
(``optimize_scale=True`` is required).

The start (``init="l2"``, default; an addition to the reference, still
calibration-free) is each group's best range on the weight l2 error
``sum (w - (q - z) s)^2`` over the grid's integer zero points: with
``s_0, z_0`` round-to-nearest's qparams and ``lo, hi`` the group's min / max, for each
factor ``f`` of ``numpy.linspace(1 - max_shrink, 1, init_grid)`` (in that order),
``s = f s_0`` and the zero points ``z = clip(zc + d, qmin, qmax)``, ``d = -1, 0, 1``,
around the one that centers the grid on the group,
``zc = round((qmin + qmax) / 2 - (lo + hi) (0.5 / s))`` (symmetric grids: ``z = 0``);
a candidate replaces the best so far (round-to-nearest's to begin with) only if its
l2 error is strictly lower.  Why: on the example LM (``examples/transformer_lm.py
--rows algorithms``, int4 g128 / int3 g128 / int2 g32) each group's exact optimum of
``sum |r|^0.7`` (an exhaustive search over scales and integer zero points) is *worse*
than round to nearest, while the l2 optimum closes part of round-to-nearest's gap to
fp32 (the figures: docs/performance.md, the per-group range table of
``benchmarks/bench_lm_range_ceiling.py``); started there, the half-quadratic iterations
change little, and the best iterate is still chosen on ``phi`` (so the guarantee above
holds).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ...core import numerics
from ...core.spec import QuantSpec
from ...core.state import QuantState
from ...transform.methods import MethodResult, QuantMethod

__all__ = ["HQQ", "hqq", "l2_range_search", "lp_objective", "shrink_lp"]


@dataclasses.dataclass(frozen=True)
class HQQ(QuantMethod):
    """HQQ settings for ``QuantRule(method=...)`` (see the module docstring; the
    defaults are the reference's: ``lp_norm=0.7, beta=10, kappa=1.01, iters=20``,
    except ``optimize_scale``: the reference optimizes the zero point only, which on
    an integer-zero-point grid rarely moves from round-to-nearest's, and ``init``: the
    reference starts from round-to-nearest's range).

    Args:
      iters: half-quadratic iterations.
      lp_norm: ``p`` of the objective, ``0 < p <= 1``.
      beta: initial penalty; the shrinkage threshold is ``|r|^(p-1) / beta``.
      kappa: factor applied to ``beta`` after each iteration.
      optimize_scale: also update the scale (least squares against ``w - e``).
      init: ``"l2"``: start from each group's best range on the weight l2 error (the
        search in the module docstring); ``"rtn"``: from round-to-nearest's range.
      init_grid: scale factors the ``"l2"`` search tries, ``>= 2``.
      max_shrink: the smallest factor is ``1 - max_shrink``, ``0 < max_shrink < 1``.
    """

    iters: int = 20
    lp_norm: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01
    optimize_scale: bool = True
    init: str = "l2"
    init_grid: int = 56
    max_shrink: float = 0.5

    name = "HQQ"
    statistics = frozenset()

    def __post_init__(self):
        if not (isinstance(self.iters, int) and self.iters >= 1):
            raise ValueError(f"HQQ.iters must be an int >= 1; got {self.iters!r}.")
        if not 0 < self.lp_norm <= 1:
            raise ValueError(f"HQQ.lp_norm must be in (0, 1]; got {self.lp_norm!r}.")
        if not (self.beta > 0 and self.kappa > 0):
            raise ValueError("HQQ.beta and HQQ.kappa must be > 0.")
        if self.init not in ("l2", "rtn"):
            raise ValueError(f"HQQ.init must be 'l2' (best weight-l2 range) or 'rtn' "
                             f"(round-to-nearest's range); got {self.init!r}.")
        if not (isinstance(self.init_grid, int) and self.init_grid >= 2):
            raise ValueError(f"HQQ.init_grid must be an int >= 2; got {self.init_grid!r}.")
        if not 0 < self.max_shrink < 1:
            raise ValueError(f"HQQ.max_shrink must be in (0, 1); got {self.max_shrink!r}.")

    def check_rule(self, rule) -> None:
        super().check_rule(rule)
        spec = rule.weight_template()
        if spec.symmetric and not self.optimize_scale:
            raise ValueError(
                f"QuantRule({rule.module_path!r}, method=HQQ): a symmetric grid has no zero "
                "point to optimize; use an asymmetric weight spec (symmetric=False) or "
                "HQQ(optimize_scale=True).")

    def apply(self, kernel, layout, spec: QuantSpec, stats=None, path: str = ""):
        """``(MethodResult, details)`` for one layer (``layout`` / ``stats`` unused)."""
        kernel = kernel.astype(jnp.float32)
        state, before, after = hqq(kernel, spec, iters=self.iters, lp_norm=self.lp_norm,
                                   beta=self.beta, kappa=self.kappa,
                                   optimize_scale=self.optimize_scale, init=self.init,
                                   init_grid=self.init_grid, max_shrink=self.max_shrink)
        values = numerics.fake_quant(jnp, kernel, state.scale, state.zero_point, spec)
        return MethodResult(values, state), {"lp_rtn": float(before), "lp": float(after)}


def shrink_lp(r, beta, p):
    """The l_p shrinkage ``sign(r) max(|r| - |r|^(p-1) / beta, 0)`` (the reference's
    ``shrink_op``, with its ``1e-8`` guard inside the power)."""
    a = jnp.abs(r)
    return jnp.sign(r) * jnp.maximum(a - jnp.power(a + 1e-8, p - 1) / beta, 0.0)


def lp_objective(w, state: QuantState, p: float):
    """``sum |w - fake_quant(w, state)|^p`` over the whole array."""
    r = w - numerics.fake_quant(jnp, w, state.scale, state.zero_point, state.spec)
    return jnp.sum(jnp.abs(r) ** p)


def _row_view(spec: QuantSpec, shape):
    """``(to_rows, from_rows)``: the array as ``(G, L)`` rows, one per scale, and the
    ``(G, 1)`` per-row state back to the spec's scale shape."""
    view, axes, state_view = numerics.layout(spec, shape)
    kept = tuple(d for d in range(len(view)) if d not in axes)
    perm = kept + tuple(axes)
    g = 1
    for d in kept:
        g *= view[d]

    def to_rows(x):
        return jnp.reshape(jnp.transpose(jnp.reshape(x, view), perm), (g, -1))

    def from_rows(a):
        t = jnp.reshape(a, tuple(view[d] for d in kept) + (1,) * len(axes))
        return jnp.reshape(jnp.transpose(t, tuple(int(i) for i in np.argsort(perm))),
                           spec.scale_shape(shape))

    return to_rows, from_rows


def hqq(w, spec: QuantSpec, *, iters: int = 20, lp_norm: float = 0.7, beta: float = 10.0,
        kappa: float = 1.01, optimize_scale: bool = True, init: str = "l2",
        init_grid: int = 56, max_shrink: float = 0.5):
    """HQQ's qparams for ``w`` on ``spec``'s grid (see the module docstring; the
    settings are ``HQQ``'s).

    Returns ``(state, phi_rtn, phi)``: the ``QuantState`` and the l_p objective of
    round-to-nearest and of the result, summed over every group.
    """
    to_rows, from_rows = _row_view(spec, tuple(w.shape))
    row_spec = QuantSpec(bits=spec.bits, symmetric=spec.symmetric,
                         narrow_range=spec.narrow_range, axis=0)
    factors = None if init == "rtn" else tuple(
        float(f) for f in np.linspace(1.0 - max_shrink, 1.0, init_grid))
    scale, zf, phi0, phi = _hqq(to_rows(w), row_spec, iters, float(lp_norm), float(beta),
                                float(kappa), bool(optimize_scale), factors)
    zero_point = numerics.integer_zero_point(jnp, zf, row_spec)
    return QuantState(from_rows(scale), from_rows(zero_point), spec), phi0, phi


def l2_range_search(rows, spec: QuantSpec, factors):
    """Each row's ``(scale, zero_point)`` of least ``sum (w - (q - z) s)^2`` among
    round-to-nearest's and the candidates of the module docstring (scales
    ``f * s_rtn`` for ``f`` in ``factors``, in order; three integer zero points each),
    ``(G, 1)`` each; ``rows`` is ``(G, L)`` with ``spec`` per row (``axis=0``)."""
    F = rows.dtype
    s0, z0 = numerics.calibrate(jnp, rows, spec)

    def l2(s, z):
        r = rows - numerics.steps_to_values(jnp, numerics.grid_steps(jnp, rows, s, z, spec), s)
        return jnp.sum(r * r, axis=1, keepdims=True)

    lo = jnp.min(rows, axis=1, keepdims=True)
    hi = jnp.max(rows, axis=1, keepdims=True)
    mid = jnp.asarray((spec.qmin + spec.qmax) / 2, F)

    def step(best, f):
        s_f = s0 * f
        if spec.symmetric:
            zs = (jnp.zeros_like(z0),)
        else:
            zc = jnp.round(mid - (lo + hi) * (0.5 / s_f))
            zs = tuple(jnp.clip(zc + d, spec.qmin, spec.qmax).astype(jnp.int32)
                       for d in (-1.0, 0.0, 1.0))
        for z in zs:
            err, s, zp = best
            e = l2(s_f, z)
            better = e < err
            best = (jnp.where(better, e, err), jnp.where(better, s_f, s),
                    jnp.where(better, z, zp))
        return best, None

    (_, s, z), _ = lax.scan(step, (l2(s0, z0), s0, z0), jnp.asarray(factors, F))
    return s, z


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5, 6, 7))
def _hqq(rows, spec, iters, p, beta0, kappa, optimize_scale, factors):
    F = rows.dtype
    tiny = jnp.finfo(F).tiny
    s_rtn, z_rtn = numerics.calibrate(jnp, rows, spec)
    s0, z0 = (s_rtn, z_rtn) if factors is None else l2_range_search(rows, spec, factors)
    qmin, qmax = spec.qmin, spec.qmax

    def evaluate(s, zf):
        zi = numerics.integer_zero_point(jnp, zf, spec)
        steps = numerics.grid_steps(jnp, rows, s, zi, spec)
        r = rows - numerics.steps_to_values(jnp, steps, s)
        return zi, steps, r, jnp.sum(jnp.abs(r) ** p, axis=1, keepdims=True)

    z0 = z0.astype(F)
    phi0 = evaluate(s_rtn, z_rtn.astype(F))[3]  # the best so far: round-to-nearest

    def body(_, c):
        s, zf, beta, best_s, best_z, best_phi = c
        zi, steps, r, phi = evaluate(s, zf)
        better = phi < best_phi
        best_s, best_z = jnp.where(better, s, best_s), jnp.where(better, zf, best_z)
        best_phi = jnp.minimum(phi, best_phi)
        e = shrink_lp(r, beta, p)
        target = rows - e
        q = (steps + zi).astype(F)
        if not spec.symmetric:
            zf = jnp.clip(jnp.mean(q - target * (1.0 / s), axis=1, keepdims=True), qmin, qmax)
        if optimize_scale:
            c_ = q - numerics.integer_zero_point(jnp, zf, spec).astype(F)
            den = jnp.sum(c_ * c_, axis=1, keepdims=True)
            new = jnp.sum(c_ * target, axis=1, keepdims=True) / jnp.where(den > 0, den, 1.0)
            s = jnp.where((den > 0) & (new > tiny) & jnp.isfinite(new), new, s)
        return s, zf, beta * kappa, best_s, best_z, best_phi

    s, zf, _, best_s, best_z, best_phi = lax.fori_loop(
        0, iters, body, (s0, z0, jnp.asarray(beta0, F), s_rtn, z_rtn.astype(F), phi0))
    phi = evaluate(s, zf)[3]  # the last update's iterate
    better = phi < best_phi
    best_s, best_z = jnp.where(better, s, best_s), jnp.where(better, zf, best_z)
    return best_s, best_z, jnp.sum(phi0), jnp.sum(jnp.minimum(phi, best_phi))
