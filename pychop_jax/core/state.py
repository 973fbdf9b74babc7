"""``QuantState``: the data a calibrated quantizer carries, as a JAX pytree.

Leaves: ``scale`` (float32, or float64 for float64 input) and ``zero_point`` (int32),
(and for two-level specs ``tensor_scale``), all of the input's rank
(``QuantSpec.scale_shape``).  Static metadata: the frozen
``QuantSpec``.  A state therefore passes through ``jit``, ``vmap``, ``grad``,
``lax.scan`` and ``shard_map`` like any pytree, and serializes with
``flax.serialization`` (registered in ``pychop_jax.flax.serialization``) or orbax as
a dict of its two arrays.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from .spec import QuantSpec

__all__ = ["QuantState"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantState:
    """Scale and zero point of a calibrated quantizer.

    Attributes:
      scale: step between codes, shape ``spec.scale_shape(x.shape)``.
      zero_point: int32 code of 0.0, same shape (zeros when symmetric); or a float
        zero point being learned (``lsq_init``, LSQ+), which quantizers round
        half-to-even and clip to [qmin, qmax].
      spec: the ``QuantSpec`` (static pytree metadata).
      tensor_scale: ``None``, or for a two-level spec (``spec.two_level``, NVFP4) the
        per-tensor float32 scale (all-ones shape of the input's rank); ``scale`` then
        holds the block scales (on ``spec.scale_dtype``'s grid, as float32) and the
        scale applied is ``numerics.effective_scale(scale, tensor_scale)``.

    A state's ``scale`` may also be held in ``spec.scale_dtype`` itself (E8M0 /
    float8, as ``QuantizedArray`` stores it); the entry points widen it exactly.
    """

    scale: Any
    zero_point: Any
    spec: QuantSpec = dataclasses.field(metadata=dict(static=True))
    tensor_scale: Any = None

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of ``scale`` and ``zero_point``."""
        return tuple(self.scale.shape)

    def learnable(self) -> QuantState:
        """This state with a float zero point (code units), for ``jax.grad``.

        ``jax.grad`` refuses integer leaves, such as the int32 zero point of
        ``calibrate``; ``jax.grad(loss)(state.learnable())`` differentiates both
        leaves of ``fake_quant(x, state, grad='lsq')``.  Quantizers round a float zero
        point half-to-even, so the codes are unchanged.  ``lsq_init`` returns such a
        state initialised with LSQ's step size.
        """
        return self.replace(zero_point=jax.numpy.asarray(self.zero_point,
                                                         dtype=self.scale.dtype))

    def replace(self, **changes) -> QuantState:
        """A copy with some fields replaced (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)
