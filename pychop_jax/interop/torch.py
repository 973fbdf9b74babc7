"""Torch adapter: the core ops on ``torch.Tensor``.

* ``calibrate`` / ``observe`` / ``qparams`` / ``quantize`` / ``dequantize`` /
  ``fake_quant`` for tensors, bit-identical to the JAX ops.  CPU tensors run through
  one jitted XLA kernel per call, read and returned in place (no copies, one fused
  pass); tensors on other devices run the same ``numerics`` formulas with
  ``array_api_compat.torch`` on their own device (``pychop_jax.interop.engine``).
* ``fake_quant`` carries the **clipped straight-through gradient**
  (``FakeQuantSTE``, a ``torch.autograd.Function``): ``dL/dx = dL/dy * 1[qmin <=
  round(x/scale) + zp <= qmax]``, the mask of ``numerics.clip_mask`` computed in the
  same pass as ``y``.
* ``observer_step``: one training step of a moving-average observer (the range of
  the batch, its moving average with the running range, qparams, fake quantization
  and its mask) as one pipeline; pychop's ``TorchChopi`` runs it.

The observer's moving average, per tensor or per channel, over the batch ranges of
``numerics.observe_range`` (``averaging_constant`` c, the weight of the new batch, as
``torch.ao.quantization.MovingAverageMinMaxObserver``)::

    first batch:   lo, hi = batch_lo, batch_hi
    then:          lo = lo + (batch_lo - lo) / (1 / c)      (hi alike)
    scale, zero_point = numerics.qparams_from_range(lo, hi)

(``lo + c * (batch_lo - lo)`` up to rounding; the division keeps the result
bit-identical across engines, see ``observers.moving_average``.)

Importing this module imports torch; ``import pychop_jax`` does not.
"""

from __future__ import annotations

import jax
import torch
from array_api_compat import torch as xtorch

from ..core import numerics, observers
from ..core.spec import QuantSpec
from ..core.state import QuantState
from . import engine

__all__ = [
    "FRAMEWORK",
    "calibrate",
    "observe",
    "qparams",
    "quantize",
    "dequantize",
    "fake_quant",
    "FakeQuantSTE",
    "observer_step",
]

#: dtypes NumPy lacks: these go to XLA by DLPack
_DLPACK_ONLY = {torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz,
                torch.float8_e5m2fnuz}


def _to_xla(t: torch.Tensor):
    """A CPU tensor for the XLA kernel: its NumPy view (read in place; passing NumPy
    arrays to a jitted function costs a third of ``jax.dlpack.from_dlpack``)."""
    t = t.detach()
    if t.dtype in _DLPACK_ONLY:
        # XLA's DLPack import takes compact (row-major) strides only
        return jax.dlpack.from_dlpack(t.contiguous())
    return t.resolve_neg().numpy()


class _TorchFramework(engine.Framework):
    """Tensors: the engine's operations, with a differentiable ``fake_quant``."""

    def fake_quant(self, x, state, *, check=True):
        return fake_quant(x, state, check=check)


FRAMEWORK = _TorchFramework(
    name="torch",
    xp=xtorch,
    to_xla=_to_xla,
    from_jax=torch.from_dlpack,
    on_xla=lambda t: t.device.type == "cpu",
    is_float=lambda t: t.is_floating_point(),
    is_integer=lambda t: not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool),
    is_wide=lambda t: t.element_size() == 8,
)


# -- functions ------------------------------------------------------------------------------
def calibrate(x: torch.Tensor, spec: QuantSpec) -> QuantState:
    """Scale and zero point of ``x`` (``pychop_jax.calibrate`` for tensors): a
    ``QuantState`` of tensors, shape ``spec.scale_shape(x.shape)``.  No gradient."""
    return engine.calibrate(FRAMEWORK, x, spec)


def observe(x: torch.Tensor, spec: QuantSpec):
    """``(lo, hi)`` of ``x`` per ``spec`` (``numerics.observe_range``; raises on NaN/inf)."""
    return engine.observe(FRAMEWORK, x, spec)


def qparams(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec):
    """``(scale, zero_point)`` of a range (``numerics.qparams_from_range``)."""
    return engine.qparams(FRAMEWORK, lo, hi, spec)


def quantize(x: torch.Tensor, state: QuantState, *, check: bool = True) -> torch.Tensor:
    """Integer codes (uint8/uint16 asymmetric, int8/int16 symmetric); float element
    formats: torch's float8 dtypes, uint8 for fp6 and NF4, and for fp4 (torch has no
    fp4 dtype) uint8 holding the fp4 bit pattern, the same bits as the JAX codes,
    which ``dequantize`` takes.  No gradient."""
    return engine.quantize(FRAMEWORK, x, state, check=check)


def dequantize(q: torch.Tensor, state: QuantState) -> torch.Tensor:
    """Floats ``(q - zero_point) * scale`` in the scale's dtype."""
    return engine.dequantize(FRAMEWORK, q, state)


class FakeQuantSTE(torch.autograd.Function):
    """Fake quantization with the clipped straight-through gradient.

    ``compute(mask) -> (y, inside)`` runs the forward pass (``inside``, the clip mask
    as 1 / 0 in a float or uint8 dtype, only when ``mask``); the backward pass is
    ``grad * inside``, as in Torch's own fake-quantize backward (so an infinite
    incoming gradient at a saturated position gives NaN there, as it does in Torch).
    """

    @staticmethod
    def forward(ctx, x, compute):
        need_mask = ctx.needs_input_grad[0]
        y, inside = compute(need_mask)
        if need_mask:
            ctx.save_for_backward(inside)
        return y

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None


def fake_quant(x: torch.Tensor, state: QuantState, *, check: bool = True) -> torch.Tensor:
    """``dequantize(quantize(x))`` in ``x``'s dtype, differentiable in ``x`` with the
    clipped straight-through gradient (zero where the code saturated)."""
    return FakeQuantSTE.apply(
        x, lambda mask: engine.fake_quant(FRAMEWORK, x, state, check=check, mask=mask))


# -- the observer ---------------------------------------------------------------------------
def observer_step(xp, x, running_min, running_max, spec, *, averaging_constant, first,
                  mask):
    """One training step of a moving-average observer as one pipeline (one XLA kernel
    on CPU; run it with ``engine.prepare`` / ``engine.run``):
    the batch range, its moving average with the running range (the buffers, in
    pychop's shapes), the qparams, fake quantization and its mask.

    -> y, inside, and the new state packed into one array (one tensor to bring back
    instead of five; each costs a DLPack import):
    ``stack([lo, hi, scale, zero_point, finite])``, state-shaped entries in the
    compute dtype, in which the zero point (an integer below ``2^16``) and the
    finiteness of ``x`` (1 / 0) are exact.
    """
    lo, hi, finite = engine.observe_pipeline(xp, x, spec)
    if not first:
        c = averaging_constant
        lo = observers.moving_average(xp, xp.reshape(running_min, lo.shape), lo, c)
        hi = observers.moving_average(xp, xp.reshape(running_max, hi.shape), hi, c)
    scale, zero_point = numerics.qparams_from_range(xp, lo, hi, spec)
    y, inside, _ = engine.fake_quant_pipeline(xp, x, scale, zero_point, spec,
                                               check=False, mask=mask)
    F = lo.dtype
    flag = xp.broadcast_to(xp.astype(finite, F), lo.shape)
    return y, inside, xp.stack([lo, hi, scale, xp.astype(zero_point, F), flag])
