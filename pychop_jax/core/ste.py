"""Straight-through gradient rules for fake quantization (``jax.custom_vjp``).

``fake_quant(x) = dequantize(quantize(x))`` is piecewise constant, so its true
gradient is zero almost everywhere.  Training through it uses a surrogate:

* ``'ste'``: the straight-through estimator (Bengio et al., 2013),
  ``dL/dx = dL/dxhat``.
* ``'clipped'`` (default): the clipped STE, ``dL/dx = dL/dxhat * 1[qmin <= round(x /
  scale) + zero_point <= qmax]``; no gradient reaches values that were saturated
  (nor NaN inputs).

Both give the state (scale, zero point) a zero cotangent: the state is a statistic of
the data here, not a parameter.

* ``'lsq'``: learned step size quantization (Esser et al., 2019, "Learned Step Size
  Quantization", ICLR 2020) and, for asymmetric grids, its learned offset (Bhalgat et
  al., 2020, "LSQ+").  ``x`` gets the paper's pass-through mask, strict and before
  rounding (``qmin - zp < x / scale < qmax - zp``; it differs from ``'clipped'``
  within half a step of the grid's ends), and the scale (and a floating zero point)
  get the paper's gradient, scaled by ``1 / sqrt(N * Q_P)``: see
  ``lsq.lsq_grads``.  An integer zero point is treated as fixed.

A floating zero point is a learned one: the forward pass rounds it
(``numerics.integer_zero_point``), the gradient passes straight through the rounding.

A rule is a function ``rule(x, scale, zero_point, spec, g) -> (dx, dscale,
dzero_point)`` (``None`` for a zero cotangent); ``RULES`` maps names to rules, so
further rules register in one place.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from . import lsq, numerics
from .spec import QuantSpec, join_bounds

__all__ = ["RULES", "fake_quant", "register_rule"]

Rule = Callable[..., tuple]


def _ste(x, scale, zero_point, spec, g):
    return g, None, None


def _clipped(x, scale, zero_point, spec, g):
    inside = numerics.clip_mask(jnp, x, scale, zero_point, spec)
    return jnp.where(inside, g, jnp.zeros_like(g)), None, None


def _lsq(x, scale, zero_point, spec, g):
    return lsq.lsq_grads(jnp, x, scale, zero_point, spec, g)


RULES: dict[str, Rule] = {"ste": _ste, "clipped": _clipped, "lsq": _lsq}


def register_rule(name: str, rule: Rule) -> None:
    """Make ``rule`` available as ``fake_quant(..., grad=name)``."""
    RULES[name] = rule


def _forward(x, scale, zero_point, noise, spec):
    return numerics.fake_quant(jnp, x, scale, zero_point, spec, noise=noise)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def fake_quant(x, scale, zero_point, noise, bounds, structure: QuantSpec, rule: str):
    """Fake-quantize ``x`` with the gradient rule ``rule`` (a key of ``RULES``).

    ``noise`` is ``None`` (round-half-to-even) or uniform [0, 1) noise of ``x``'s
    shape in the compute dtype (stochastic rounding).  ``bounds`` (int32
    ``[qmin, qmax]``) and ``structure`` are the two halves of the spec
    (``spec.split_bounds``).  Returns ``x``'s dtype.
    """
    return _forward(x, scale, zero_point, noise, join_bounds(structure, bounds))


def _fwd(x, scale, zero_point, noise, bounds, structure, rule):
    y = _forward(x, scale, zero_point, noise, join_bounds(structure, bounds))
    return y, (x, scale, zero_point, bounds)


def _bwd(structure, rule, residuals, g):
    x, scale, zero_point, bounds = residuals
    dx, dscale, dzp = RULES[rule](x, scale, zero_point, join_bounds(structure, bounds), g)
    if dscale is not None:
        dscale = dscale.astype(scale.dtype)
    if dzp is not None and jnp.issubdtype(zero_point.dtype, jnp.floating):
        dzp = dzp.astype(zero_point.dtype)
    else:  # an integer zero point is not differentiable: zero cotangent
        dzp = None
    return (dx.astype(x.dtype), dscale, dzp, None, None)


fake_quant.defvjp(_fwd, _bwd)
