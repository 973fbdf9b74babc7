"""Torch adapter: the core ops on ``torch.Tensor``, and pychop's Torch modules.

* ``calibrate`` / ``quantize`` / ``dequantize`` / ``fake_quant`` for tensors,
  bit-identical to the JAX ops.  CPU tensors run through one jitted XLA kernel per
  call, read and returned in place (no copies, one fused pass); tensors on other
  devices run the same ``numerics`` formulas with ``array_api_compat.torch`` on their
  own device (``pychop_jax.adapter``).
* ``fake_quant`` carries the **clipped straight-through gradient**
  (``torch.autograd.Function``): ``dL/dx = dL/dy * 1[qmin <= round(x/scale) + zp <=
  qmax]``, the mask of ``numerics.clip_mask`` computed in the same pass as ``y``.
* ``TorchChopi`` (pychop's ``Chopi`` for Torch, an ``nn.Module``), ``IntQuantizedLayer``
  (a fake-quantization layer to put between layers) and pychop 0.6's ``ChopiSTE`` and
  ``IQuantizedLinear`` / ``IQuantizedConv{1,2,3}d``.

The observer of ``TorchChopi`` in training is an exponential moving average of the
range (as ``torch.ao.quantization.MovingAverageMinMaxObserver``), per tensor or per
channel, over the batch ranges of ``numerics.observe_range``::

    first batch:   lo, hi = batch_lo, batch_hi
    then:          lo = lo + (batch_lo - lo) / (1 / momentum)      (hi alike)
    scale, zero_point = numerics.qparams_from_range(lo, hi)

(``lo + momentum * (batch_lo - lo)`` up to rounding; the division keeps the result
bit-identical across engines, see ``observers.moving_average``.)

``momentum=1`` uses each batch's own range (what weight quantizers do).  ``calibrate(x)``
sets the range to ``x``'s, so its scale equals every other backend's ``calibrate``.

Importing this module imports torch; ``import pychop_jax`` does not.
"""

from __future__ import annotations

import jax
import numpy as np
import torch
import torch.nn.functional as F
from array_api_compat import torch as xtorch
from torch import nn

from . import adapter, numerics, observers
from .chopi import Backend, Quantizer
from .spec import QuantSpec
from .state import QuantState

__all__ = [
    "FRAMEWORK",
    "calibrate",
    "observe",
    "qparams",
    "quantize",
    "dequantize",
    "fake_quant",
    "TorchChopi",
    "IntQuantizedLayer",
    "ChopiSTE",
    "IQuantizedLinear",
    "IQuantizedDense",
    "IQuantizedConv1d",
    "IQuantizedConv2d",
    "IQuantizedConv3d",
]

#: dtypes NumPy lacks: these go to XLA by DLPack
_DLPACK_ONLY = {torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2}


def _to_xla(t: torch.Tensor):
    """A CPU tensor for the XLA kernel: its NumPy view (read in place; passing NumPy
    arrays to a jitted function costs a third of ``jax.dlpack.from_dlpack``)."""
    t = t.detach()
    if t.dtype in _DLPACK_ONLY:
        # XLA's DLPack import takes compact (row-major) strides only
        return jax.dlpack.from_dlpack(t.contiguous())
    return t.resolve_neg().numpy()


FRAMEWORK = adapter.Framework(
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
    return adapter.calibrate(FRAMEWORK, x, spec)


def observe(x: torch.Tensor, spec: QuantSpec):
    """``(lo, hi)`` of ``x`` per ``spec`` (``numerics.observe_range``; raises on NaN/inf)."""
    return adapter.observe(FRAMEWORK, x, spec)


def qparams(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec):
    """``(scale, zero_point)`` of a range (``numerics.qparams_from_range``)."""
    return adapter.qparams(FRAMEWORK, lo, hi, spec)


def quantize(x: torch.Tensor, state: QuantState, *, check: bool = True) -> torch.Tensor:
    """Integer codes (uint8/uint16 asymmetric, int8/int16 symmetric).  No gradient."""
    return adapter.quantize(FRAMEWORK, x, state, check=check)


def dequantize(q: torch.Tensor, state: QuantState) -> torch.Tensor:
    """Floats ``(q - zero_point) * scale`` in the scale's dtype."""
    return adapter.dequantize(FRAMEWORK, q, state)


class _FakeQuantSTE(torch.autograd.Function):
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
    return _FakeQuantSTE.apply(
        x, lambda mask: adapter.fake_quant(FRAMEWORK, x, state, check=check, mask=mask))


BACKEND = Backend("torch", xtorch, calibrate, quantize, dequantize, fake_quant)


# -- the observer ---------------------------------------------------------------------------
def _observer_step(xp, x, running_min, running_max, spec, *, momentum, first, mask):
    """One training step of ``TorchChopi`` as one pipeline (one XLA kernel on CPU):
    the batch range, its moving average with the running range (the buffers, in
    pychop's shapes), the qparams, fake quantization and its mask.

    -> y, inside, and the new state packed into one array (one tensor to bring back
    instead of five; each costs a DLPack import):
    ``stack([lo, hi, scale, zero_point, finite])``, state-shaped entries in the
    compute dtype, in which the zero point (an integer below ``2^16``) and the
    finiteness of ``x`` (1 / 0) are exact.
    """
    lo, hi, finite = adapter.observe_pipeline(xp, x, spec)
    if not first:
        lo = observers.moving_average(xp, xp.reshape(running_min, lo.shape), lo, momentum)
        hi = observers.moving_average(xp, xp.reshape(running_max, hi.shape), hi, momentum)
    scale, zero_point = numerics.qparams_from_range(xp, lo, hi, spec)
    y, inside, _ = adapter.fake_quant_pipeline(xp, x, scale, zero_point, spec,
                                               check=False, mask=mask)
    F = lo.dtype
    flag = xp.broadcast_to(xp.astype(finite, F), lo.shape)
    return y, inside, xp.stack([lo, hi, scale, xp.astype(zero_point, F), flag])


# -- modules -------------------------------------------------------------------------------
#: in the order of the observer's results: range, then qparams
_BUFFERS = ("running_min", "running_max", "scale", "zero_point")
#: ``TorchChopi._prepared_step`` before the first training step: (input signature,
#: ``adapter.prepare``d observer step, whether its state comes back as four scalars)
_UNPREPARED = (None, None, False)


class TorchChopi(nn.Module, Quantizer):
    """pychop's integer quantizer for tensors, as an ``nn.Module``.

    ``TorchChopi(num_bits=8, symmetric=False, per_channel=False, channel_dim=0,
    momentum=0.01)``.  Besides ``calibrate`` / ``quantize`` / ``dequantize``
    (``pychop_jax.chopi.Quantizer``):

    * ``forward(x, training=None)``: fake quantization with the clipped
      straight-through gradient.  ``training=None`` follows ``self.training`` (so
      ``model.eval()`` works).  In training the observer (module docstring) first
      updates the range with ``x``; in eval the frozen range is used (calibrated on
      ``x`` if there is none yet).  Either way it returns dequantized floats.
    * Buffers ``scale``, ``zero_point`` (pychop's shapes) and ``running_min``,
      ``running_max`` (the observed range): ``None`` until calibrated, saved in
      ``state_dict`` and loadable into a fresh, uncalibrated instance.
    """

    backend = BACKEND
    __call__ = nn.Module.__call__
    #: set per instance by the first training step (instances unpickled from older
    #: versions fall back to this)
    _prepared_step = _UNPREPARED

    def __init__(self, num_bits=8, symmetric=False, per_channel=False, channel_dim=0, *,
                 bits=None, axis=None, narrow_range=False, momentum=0.01):
        nn.Module.__init__(self)
        for name in _BUFFERS:
            self.register_buffer(name, None)
        Quantizer.__init__(self, num_bits, symmetric, per_channel, channel_dim,
                           bits=bits, axis=axis, narrow_range=narrow_range)
        if not 0.0 < float(momentum) <= 1.0:
            raise ValueError(f"momentum must be in (0, 1]; got {momentum!r}.")
        self.momentum = float(momentum)

    def __getstate__(self):
        # the prepared kernel call is a closure (not picklable) and cheap to rebuild
        return {**self.__dict__, "_prepared_step": _UNPREPARED}

    def extra_repr(self) -> str:
        return f"{self._config_repr()}, momentum={self.momentum!r}"

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor) -> None:
        """Set the range to ``x``'s, and ``scale`` / ``zero_point`` from it."""
        self._require_array(x, "calibrate")
        lo, hi = adapter.observe(FRAMEWORK, x, self.spec, "calibrate")
        scale, zero_point = qparams(lo, hi, self.spec)
        self._keep(x.shape, lo, hi, scale, zero_point)

    def _keep(self, shape, *state_shaped) -> None:
        """Store the range and qparams (state-shaped) in the pychop-shaped buffers:
        in place where they fit (the buffers keep their identity), else replaced."""
        for name, value in zip(_BUFFERS, state_shaped, strict=True):
            value, current = self._squeeze(value), self._buffers[name]
            if (current is not None and current.shape == value.shape
                    and current.dtype == value.dtype):
                current.copy_(value)
            else:
                setattr(self, name, value)
        self._calibrated_shape = tuple(shape)

    def forward(self, x: torch.Tensor, training: bool | None = None) -> torch.Tensor:
        training = self.training if training is None else bool(training)
        self._require_array(x, "forward")
        if training:
            return _FakeQuantSTE.apply(x, lambda mask: self._observe(x, mask))
        if not self.calibrated:
            self.calibrate(x)
        return fake_quant(x, self._state_for(x.shape, "forward"))

    @torch.no_grad()
    def _observe(self, x: torch.Tensor, mask: bool):
        """Observer step and fake quantization in one kernel; updates the buffers.

        The kernel call is ``adapter.prepare``d once per input signature, and the
        checks of ``x`` and of the running range, which depend only on the signature,
        are done then.  Inside a training step every Python operation here costs
        several times its cost in isolation (measured: 20-40 us for a reshape or a
        buffer write), so the steady state is kept to the kernel call and four
        in-place writes.
        """
        buffers = self._buffers
        running_min, running_max = buffers["running_min"], buffers["running_max"]
        first = running_min is None
        if first:  # placeholders, unused
            running_min = running_max = x.new_zeros(())
        signature = (x.shape, x.dtype, x.device, running_min.shape, running_min.dtype,
                     first, mask, self.momentum)
        known, step, scalars = self._prepared_step
        if signature != known:
            adapter.check_range_input(FRAMEWORK, x, self.spec, "forward")
            if not first:  # the running range must fit x (per channel: as many channels)
                self._state_shaped((running_min, running_max), x.shape, "forward")
            step = adapter.prepare(FRAMEWORK, _observer_step, (x, running_min, running_max),
                                   self.spec, to_host=(2,), momentum=self.momentum,
                                   first=first, mask=mask)
            # a per-tensor state on the XLA engine, in the buffers' dtype, comes back
            # as NumPy scalars
            scalars = (not first and running_min.dim() == 0 and FRAMEWORK.on_xla(x)
                       and running_min.dtype == numerics.compute_dtype(xtorch, x.dtype))
            self._prepared_step = (signature, step, scalars)
        y, inside, packed = step(x, running_min, running_max)
        if not packed[-1].all():
            adapter.raise_nonfinite(FRAMEWORK, x, "forward")
        if scalars:
            # four scalars into the 0-d buffers (exact: a Python float holds any
            # float32 / float64 value); the buffers keep their identity
            lo, hi, scale, zero_point, _ = packed.ravel().tolist()
            for name, value in zip(_BUFFERS, (lo, hi, scale, int(zero_point)), strict=True):
                buffers[name].fill_(value)
            if self._calibrated_shape != x.shape:
                self._calibrated_shape = tuple(x.shape)
        else:
            # a read-only NumPy array from the XLA engine (CPU), else a tensor
            state = torch.from_numpy(packed.copy()) if isinstance(packed, np.ndarray) else packed
            lo, hi, scale, zero_point, _ = state.unbind(0)
            self._keep(x.shape, lo, hi, scale, zero_point.to(torch.int32))
        return y, inside

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        """Fake quantization with the frozen range (no observer step)."""
        return self.forward(x, training=False)

    # -- state_dict into an uncalibrated (or differently shaped) instance --------------------
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in _BUFFERS:
            incoming = state_dict.get(prefix + name)
            current = getattr(self, name)
            if incoming is not None and (current is None or current.shape != incoming.shape):
                device = incoming.device if current is None else current.device
                setattr(self, name, torch.empty_like(incoming, device=device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class IntQuantizedLayer(TorchChopi):
    """A fake-quantization layer to put between layers, with its own observer::

        nn.Sequential(nn.Linear(64, 64), IntQuantizedLayer(num_bits=8), nn.ReLU(), ...)

    It is a ``TorchChopi``: in training it tracks the range of what flows through it
    (moving average, ``momentum``), in eval it freezes it; the output is always
    dequantized floats with a clipped straight-through gradient.  pychop 0.6's
    ``IntQuantizedLayer(chop)`` form is accepted: the settings of the quantizer ``chop``
    are copied (the layer still has its own range).
    """

    def __init__(self, num_bits=8, *args, **kwargs):
        if isinstance(num_bits, Quantizer):
            kwargs = {**num_bits.config, **kwargs}
            num_bits = kwargs.pop("num_bits")
        super().__init__(num_bits, *args, **kwargs)


#: pychop 0.6: ``ChopiSTE(bits=8, symmetric=False)`` is the Torch quantizer with an STE.
ChopiSTE = TorchChopi


class _IQuantized:
    """Mixin for pychop 0.6's ``IQuantized*`` layers: the layer's weight, bias and
    output each get their own ``TorchChopi`` built from the settings of ``chop``.

    * weight: ``chop``'s settings (per-channel if ``chop`` is), ``momentum=1``: the
      range of the current weights at every call, in training and in eval;
    * bias: ``chop``'s bit width and grid, per tensor, ``momentum=1``, likewise;
    * output: ``chop``'s bit width and grid, per tensor, ``chop``'s momentum.

    (pychop 0.6.2 passes all three through one quantizer, so its range follows
    whichever came last.)  ``chop=None`` leaves the layer unquantized, as in pychop.
    """

    def __init__(self, *args, chop: Quantizer | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight_quant = self.bias_quant = self.output_quant = None
        if chop is None:
            return
        config = chop.config
        grid = dict(num_bits=config["num_bits"], symmetric=config["symmetric"],
                    narrow_range=config["narrow_range"])
        self.weight_quant = TorchChopi(**config, momentum=1.0)
        if self.bias is not None:
            self.bias_quant = TorchChopi(**grid, momentum=1.0)
        self.output_quant = TorchChopi(**grid, momentum=getattr(chop, "momentum", 0.01))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_quant is None:
            return self._layer(x, self.weight, self.bias)
        # the parameters are quantized with their current range also in eval (the
        # optimizer may have moved them since the last training step); only the
        # output's range freezes
        weight = self.weight_quant(self.weight, training=True)
        bias = None if self.bias is None else self.bias_quant(self.bias, training=True)
        return self.output_quant(self._layer(x, weight, bias))


class IQuantizedLinear(_IQuantized, nn.Linear):
    """``nn.Linear`` with fake-quantized weight, bias and output:
    ``IQuantizedLinear(in_features, out_features, bias=True, chop=TorchChopi(8))``."""

    def _layer(self, x, weight, bias):
        return F.linear(x, weight, bias)


IQuantizedDense = IQuantizedLinear


class _IQuantizedConv(_IQuantized):
    def _layer(self, x, weight, bias):
        return self._conv_forward(x, weight, bias)


class IQuantizedConv1d(_IQuantizedConv, nn.Conv1d):
    """``nn.Conv1d`` with fake-quantized weight, bias and output (``chop=`` keyword)."""


class IQuantizedConv2d(_IQuantizedConv, nn.Conv2d):
    """``nn.Conv2d`` with fake-quantized weight, bias and output (``chop=`` keyword)."""


class IQuantizedConv3d(_IQuantizedConv, nn.Conv3d):
    """``nn.Conv3d`` with fake-quantized weight, bias and output (``chop=`` keyword)."""
