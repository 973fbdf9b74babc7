"""HQQ, half-quadratic quantization (Badri and Shaji, "Half-Quadratic Quantization of
Large Machine Learning Models", 2023, mobiusml.github.io/hqq_blog; reference
implementation: github.com/mobiusml/hqq, ``hqq/core/optimize.py``,
``optimize_weights_proximal_legacy``).  Calibration-free.

Per group of the rule's grid (every scale of the ``QuantSpec``: one row ``w`` of
``numerics.layout``'s view), HQQ minimizes the l_p reconstruction error
``phi(s, z) = sum |w - (q - z) s|^p`` (``p < 1``: heavy-tailed errors cost little)
over the zero point ``z`` (and optionally the scale ``s``), ``q = Q_{s,z}(w)``, by
half-quadratic splitting with an auxiliary error ``e``::

    start: s, z from round-to-nearest's range; beta = beta0
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
from ...flax.operands import MethodResult
from ...flax.rules import QuantMethod

__all__ = ["HQQ", "hqq", "lp_objective", "shrink_lp"]


@dataclasses.dataclass(frozen=True)
class HQQ(QuantMethod):
    """HQQ settings for ``QuantRule(method=...)`` (see the module docstring; the
    defaults are the reference's: ``lp_norm=0.7, beta=10, kappa=1.01, iters=20``,
    except ``optimize_scale``: the reference optimizes the zero point only, which on
    an integer-zero-point grid rarely moves from round-to-nearest's).

    Args:
      iters: half-quadratic iterations.
      lp_norm: ``p`` of the objective, ``0 < p <= 1``.
      beta: initial penalty; the shrinkage threshold is ``|r|^(p-1) / beta``.
      kappa: factor applied to ``beta`` after each iteration.
      optimize_scale: also update the scale (least squares against ``w - e``).
    """

    iters: int = 20
    lp_norm: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01
    optimize_scale: bool = True

    name = "HQQ"
    statistics = frozenset()

    def __post_init__(self):
        if not (isinstance(self.iters, int) and self.iters >= 1):
            raise ValueError(f"HQQ.iters must be an int >= 1; got {self.iters!r}.")
        if not 0 < self.lp_norm <= 1:
            raise ValueError(f"HQQ.lp_norm must be in (0, 1]; got {self.lp_norm!r}.")
        if not (self.beta > 0 and self.kappa > 0):
            raise ValueError("HQQ.beta and HQQ.kappa must be > 0.")

    def check_rule(self, rule) -> None:
        super().check_rule(rule)
        spec = rule.weight_spec("dense")
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
                                   optimize_scale=self.optimize_scale)
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
        kappa: float = 1.01, optimize_scale: bool = True):
    """HQQ's qparams for ``w`` on ``spec``'s grid (see the module docstring).

    Returns ``(state, phi_rtn, phi)``: the ``QuantState`` and the l_p objective of
    round-to-nearest and of the result, summed over every group.
    """
    to_rows, from_rows = _row_view(spec, tuple(w.shape))
    row_spec = QuantSpec(bits=spec.bits, symmetric=spec.symmetric,
                         narrow_range=spec.narrow_range, axis=0)
    scale, zf, phi0, phi = _hqq(to_rows(w), row_spec, iters, float(lp_norm), float(beta),
                                float(kappa), bool(optimize_scale))
    zero_point = numerics.integer_zero_point(jnp, zf, row_spec)
    return QuantState(from_rows(scale), from_rows(zero_point), spec), phi0, phi


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5, 6))
def _hqq(rows, spec, iters, p, beta0, kappa, optimize_scale):
    F = rows.dtype
    tiny = jnp.finfo(F).tiny
    s0, z0 = numerics.calibrate(jnp, rows, spec)
    qmin, qmax = spec.qmin, spec.qmax

    def evaluate(s, zf):
        zi = numerics.integer_zero_point(jnp, zf, spec)
        steps = numerics.grid_steps(jnp, rows, s, zi, spec)
        r = rows - numerics.steps_to_values(jnp, steps, s)
        return zi, steps, r, jnp.sum(jnp.abs(r) ** p, axis=1, keepdims=True)

    z0 = z0.astype(F)
    phi0 = evaluate(s0, z0)[3]

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
        0, iters, body, (s0, z0, jnp.asarray(beta0, F), s0, z0, phi0))
    phi = evaluate(s, zf)[3]  # the last update's iterate
    better = phi < best_phi
    best_s, best_z = jnp.where(better, s, best_s), jnp.where(better, zf, best_z)
    return best_s, best_z, jnp.sum(phi0), jnp.sum(jnp.minimum(phi, best_phi))
