"""``jax.Array`` as an interop ``Framework``: the JAX API behind the same interface.

The pychop quantizer objects delegate to a ``Framework``; for JAX arrays its four
operations are ``pychop_jax.calibrate`` / ``quantize`` / ``dequantize`` /
``fake_quant`` themselves (jitted kernels, traceable), so ``JaxChopi`` works inside
``jax.jit`` too.  The XLA-engine fields are the identity: JAX arrays need no
conversion.
"""

from __future__ import annotations

import jax.numpy as jnp

from ..core import ops
from ..core.spec import QuantSpec
from ..core.state import QuantState
from . import engine

__all__ = ["FRAMEWORK"]


class _JaxFramework(engine.Framework):
    """JAX arrays: the operations are the JAX API's."""

    def calibrate(self, x, spec: QuantSpec) -> QuantState:
        return ops.calibrate(x, spec)

    def quantize(self, x, state: QuantState, *, check: bool = True):
        return ops.quantize(x, state, check=check)

    def dequantize(self, q, state: QuantState):
        return ops.dequantize(q, state)

    def fake_quant(self, x, state: QuantState, *, check: bool = True):
        return ops.fake_quant(x, state, check=check)

    def is_traced(self, x) -> bool:
        return ops.is_traced(x)

    def current_trace(self):
        return ops.current_trace()


def _identity(a):
    return a


FRAMEWORK = _JaxFramework(
    name="jax",
    xp=jnp,
    to_xla=_identity,
    from_jax=_identity,
    on_xla=lambda a: True,
    is_float=lambda a: bool(jnp.issubdtype(a.dtype, jnp.floating)),
    is_integer=lambda a: bool(jnp.issubdtype(a.dtype, jnp.integer)),
    is_wide=lambda a: a.dtype.itemsize == 8,
)
