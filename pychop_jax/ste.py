"""Straight-through gradient rules for fake quantization (``jax.custom_vjp``).

``fake_quant(x) = dequantize(quantize(x))`` is piecewise constant, so its true
gradient is zero almost everywhere.  Training through it uses a surrogate:

* ``'ste'``: the straight-through estimator (Bengio et al., 2013),
  ``dL/dx = dL/dxhat``.
* ``'clipped'`` (default): the clipped STE, ``dL/dx = dL/dxhat * 1[qmin <= round(x /
  scale) + zero_point <= qmax]``; no gradient reaches values that were saturated
  (nor NaN inputs).

Both give the state (scale, zero point) a zero cotangent: the state is a statistic of
the data here, not a parameter.  A rule is a function
``rule(x, scale, zero_point, spec, g) -> (dx, dscale, dzero_point)``; ``RULES`` maps
names to rules, so further rules (a learned step size) register in one place.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from . import numerics
from .spec import QuantSpec, join_bounds

__all__ = ["RULES", "fake_quant", "register_rule"]

Rule = Callable[..., tuple]


def _ste(x, scale, zero_point, spec, g):
    return g, None, None


def _clipped(x, scale, zero_point, spec, g):
    inside = numerics.clip_mask(jnp, x, scale, zero_point, spec)
    return jnp.where(inside, g, jnp.zeros_like(g)), None, None


RULES: dict[str, Rule] = {"ste": _ste, "clipped": _clipped}


def register_rule(name: str, rule: Rule) -> None:
    """Make ``rule`` available as ``fake_quant(..., grad=name)``."""
    RULES[name] = rule


def _forward(x, scale, zero_point, noise, spec):
    y = numerics.fake_quant(jnp, x, scale, zero_point, spec, noise=noise)
    return y.astype(x.dtype)


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
    return (dx.astype(x.dtype), dscale, dzp, None, None)


fake_quant.defvjp(_fwd, _bwd)
