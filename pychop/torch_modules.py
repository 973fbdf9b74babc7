"""pychop's Torch modules: ``TorchChopi`` (an ``nn.Module``), ``IntQuantizedLayer``,
``ChopiSTE`` and the ``IQuantized*`` layers, on the Torch adapter
(``pychop_jax.interop.torch``).

In training ``TorchChopi`` observes the range with a moving average
(``averaging_constant`` c, the weight of the new batch, as
``torch.ao.quantization.MovingAverageMinMaxObserver``; the first batch sets it) and
fake-quantizes with the clipped straight-through gradient; in eval the range is
frozen.  ``averaging_constant=1`` uses each batch's own range (what the weight
quantizers of ``IQuantized*`` do).  ``calibrate(x)`` sets the range to ``x``'s, so its
scale equals every other backend's ``calibrate``.

pychop_jax's own observers (``pychop_jax.observers.ema``) take ``momentum``, the
weight of the *old* range: ``averaging_constant = 1 - momentum``.  ``TorchChopi``
still accepts ``momentum=`` in pychop's sense (the weight of the new batch) with a
``DeprecationWarning``.

Importing this module imports torch; ``import pychop`` does not.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pychop_jax.core import numerics
from pychop_jax.interop import engine
from pychop_jax.interop import torch as torch_ops

from .quantizer import Quantizer

__all__ = [
    "TorchChopi",
    "IntQuantizedLayer",
    "ChopiSTE",
    "IQuantizedLinear",
    "IQuantizedDense",
    "IQuantizedConv1d",
    "IQuantizedConv2d",
    "IQuantizedConv3d",
]

#: in the order of the observer's results: range, then qparams
_BUFFERS = ("running_min", "running_max", "scale", "zero_point")
_MOMENTUM_RENAMED = (
    "TorchChopi's momentum= is averaging_constant= now (the weight of the new batch, "
    "torch.ao's name); pychop_jax.observers.ema's momentum is the weight of the old "
    "range (averaging_constant = 1 - momentum).")
#: ``TorchChopi._prepared_step`` before the first training step: (input signature,
#: ``engine.prepare``d observer step, whether its state comes back as four scalars)
_UNPREPARED = (None, None, False)


class TorchChopi(nn.Module, Quantizer):
    """pychop's integer quantizer for tensors, as an ``nn.Module``.

    ``TorchChopi(num_bits=8, symmetric=False, per_channel=False, channel_dim=0,
    averaging_constant=0.01)``.  Besides ``calibrate`` / ``quantize`` / ``dequantize``
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

    backend = torch_ops.FRAMEWORK
    __call__ = nn.Module.__call__
    #: set per instance by the first training step (an instance unpickled without it
    #: falls back to this)
    _prepared_step = _UNPREPARED

    def __init__(self, num_bits=8, symmetric=False, per_channel=False, channel_dim=0, *,
                 bits=None, axis=None, narrow_range=False, averaging_constant=None,
                 momentum=None):
        nn.Module.__init__(self)
        for name in _BUFFERS:
            self.register_buffer(name, None)
        Quantizer.__init__(self, num_bits, symmetric, per_channel, channel_dim,
                           bits=bits, axis=axis, narrow_range=narrow_range)
        if momentum is not None:
            warnings.warn(_MOMENTUM_RENAMED, DeprecationWarning, stacklevel=2)
            if averaging_constant is not None and averaging_constant != momentum:
                raise ValueError(f"averaging_constant={averaging_constant!r} and "
                                 f"momentum={momentum!r} disagree; pass averaging_constant only.")
            averaging_constant = momentum
        self.averaging_constant = 0.01 if averaging_constant is None else averaging_constant

    @property
    def averaging_constant(self) -> float:
        """Weight of the new batch in the moving average of the range, in (0, 1]."""
        return self._averaging_constant

    @averaging_constant.setter
    def averaging_constant(self, value) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not 0.0 < float(value) <= 1.0:
            raise ValueError(f"averaging_constant must be in (0, 1] (the weight of the new "
                             f"batch, e.g. 0.01); got {value!r}.")
        self._averaging_constant = float(value)

    @property
    def momentum(self) -> float:
        """Deprecated name of ``averaging_constant`` (pychop's sense: the weight of the
        new batch, not pychop_jax's weight of the old range)."""
        warnings.warn(_MOMENTUM_RENAMED, DeprecationWarning, stacklevel=2)
        return self.averaging_constant

    @momentum.setter
    def momentum(self, value) -> None:
        warnings.warn(_MOMENTUM_RENAMED, DeprecationWarning, stacklevel=2)
        self.averaging_constant = value

    def __getstate__(self):
        # the prepared kernel call is a closure (not picklable) and cheap to rebuild
        return {**self.__dict__, "_prepared_step": _UNPREPARED}

    def extra_repr(self) -> str:
        return f"{self._config_repr()}, averaging_constant={self.averaging_constant!r}"

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor) -> None:
        """Set the range to ``x``'s, and ``scale`` / ``zero_point`` from it."""
        self._require_array(x, "calibrate")
        lo, hi = engine.observe(torch_ops.FRAMEWORK, x, self.spec, "calibrate")
        scale, zero_point = torch_ops.qparams(lo, hi, self.spec)
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
            return torch_ops.FakeQuantSTE.apply(x, lambda mask: self._observe(x, mask))
        if not self.calibrated:
            self.calibrate(x)
        return torch_ops.fake_quant(x, self._state_for(x.shape, "forward"))

    @torch.no_grad()
    def _observe(self, x: torch.Tensor, mask: bool):
        """Observer step and fake quantization in one kernel; updates the buffers.

        The kernel call is ``engine.prepare``d once per input signature, and the
        checks of ``x`` and of the running range, which depend only on the signature,
        are done then.  Inside a training step every Python operation here costs more
        than in isolation (``docs/performance.md``), so the steady state is kept to the
        kernel call and four in-place writes.
        """
        buffers = self._buffers
        running_min, running_max = buffers["running_min"], buffers["running_max"]
        first = running_min is None
        if first:  # placeholders, unused
            running_min = running_max = x.new_zeros(())
        signature = (x.shape, x.dtype, x.device, running_min.shape, running_min.dtype,
                     first, mask, self.averaging_constant)
        known, step, scalars = self._prepared_step
        if signature != known:
            engine.check_range_input(torch_ops.FRAMEWORK, x, self.spec, "forward")
            if not first:  # the running range must fit x (per channel: as many channels)
                self._state_shaped((running_min, running_max), x.shape, "forward")
            step = engine.prepare(torch_ops.FRAMEWORK, torch_ops.observer_step,
                                  (x, running_min, running_max), self.spec, to_host=(2,),
                                  averaging_constant=self.averaging_constant,
                                  first=first, mask=mask)
            # a per-tensor state on the XLA engine, in the buffers' dtype, comes back
            # as NumPy scalars
            fw = torch_ops.FRAMEWORK
            scalars = (not first and running_min.dim() == 0 and fw.on_xla(x)
                       and running_min.dtype == numerics.compute_dtype(fw.xp, x.dtype))
            self._prepared_step = (signature, step, scalars)
        y, inside, packed = step(x, running_min, running_max)
        if not packed[-1].all():
            engine.raise_nonfinite(torch_ops.FRAMEWORK, x, "forward")
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
    (moving average, ``averaging_constant``), in eval it freezes it; the output is always
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

    * weight: ``chop``'s settings (per-channel if ``chop`` is), ``averaging_constant=1``:
      the range of the current weights at every call, in training and in eval;
    * bias: ``chop``'s bit width and grid, per tensor, ``averaging_constant=1``, likewise;
    * output: ``chop``'s bit width and grid, per tensor, ``chop``'s averaging constant.

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
        self.weight_quant = TorchChopi(**config, averaging_constant=1.0)
        if self.bias is not None:
            self.bias_quant = TorchChopi(**grid, averaging_constant=1.0)
        self.output_quant = TorchChopi(
            **grid, averaging_constant=getattr(chop, "averaging_constant", 0.01))

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
