"""Flax NNX quantization-aware training modules.

Drop-in where ``nnx.Linear`` / ``nnx.Conv`` stand::

    import pychop_jax.nnx as qnnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv = qnnx.QuantConv(1, 16, (3, 3), act_bits=8, rngs=rngs)
            self.fc = qnnx.QuantDense(1024, 10, weight_bits=4, act_bits=4, rngs=rngs)

    model = Net(nnx.Rngs(0))
    model.train()   # observers track the input ranges
    model.eval()    # ranges frozen

* ``QuantDense(in_features, out_features, *, rngs, ...)`` and
  ``QuantConv(in_features, out_features, kernel_size, strides=1, *, rngs, ...)``
  subclass ``nnx.Linear`` / ``nnx.Conv`` and accept all their arguments, the same
  ``kernel``/``bias`` params, plus the ``qat.QuantOptions`` keywords
  (``weight_bits=8``, ``weight_symmetric=True``, ``act_bits=None``,
  ``act_symmetric=False``, ``observer=observers.ema``, ``lsq=False``, and the float /
  block formats ``weight_format`` / ``act_format``).  The kernel is
  fake-quantized per output channel inside the layer's op: a ``WeightQuant`` module in
  the ``dot_general`` / ``conv_general_dilated`` slot, wrapping the op passed there.
  The input, when ``act_bits`` is set, goes through an ``IntQuantizedLayer`` at
  ``input_quant``.
* ``IntQuantizedLayer(bits=8, *, symmetric, axis, num_features, observer, lsq,
  use_running_average)`` fake-quantizes activations.  Its observer statistics are a
  ``QuantStats`` variable (an ``observers.RangeState``) at ``stats``, updated while
  ``use_running_average`` is False, the attribute ``model.train()`` /
  ``model.eval()`` set (as for ``nnx.BatchNorm``).
* ``lsq=True``: step sizes are ``nnx.Param`` s named ``lsq_scale`` (+
  ``lsq_zero_point`` for affine grids).  Kernels' are initialised at construction;
  activations' need data: call ``init_lsq(model, x)`` once (also after loading float
  weights), until then the activation step size is NaN and an eager call raises.

All computation is in ``pychop_jax.qat``, shared with ``pychop_jax.linen``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax.numpy as jnp
from flax import nnx
from jax import lax

from ..core import observers, ops
from ..core.spec import QuantSpec
from ..transform import qat
from ..transform.qat import QuantOptions

__all__ = ["QuantStats", "IntQuantizedLayer", "WeightQuant", "QuantDense", "QuantConv",
           "init_lsq"]


class QuantStats(nnx.Variable):
    """Observer statistics (an ``observers.RangeState``): not a parameter, not
    differentiated; select them with ``nnx.state(model, QuantStats)``."""


class _LearnedStepSize(nnx.Module):
    """Holds ``lsq_scale`` (+ ``lsq_zero_point``) params; ``init_lsq`` sets them."""

    _init_from_data = False

    def _set_lsq(self, scale, zero_point) -> None:
        self.lsq_scale = nnx.Param(scale)
        self.lsq_zero_point = None if zero_point is None else nnx.Param(zero_point)

    def _learned(self, x, spec: QuantSpec):
        """``(scale, zero_point)`` for ``x``, first re-initialised from ``x`` inside
        ``init_lsq``."""
        if self._init_from_data:
            scale, zero_point = qat.init_lsq(x, spec)
            self.lsq_scale[...] = scale
            if zero_point is not None:
                self.lsq_zero_point[...] = zero_point
        scale = self.lsq_scale[...]
        if not ops.is_traced(scale) and bool(jnp.isnan(scale).any()):
            raise ValueError(
                f"{type(self).__name__}(lsq=True) has no step size yet; call "
                "pychop_jax.nnx.init_lsq(model, x) on a sample batch first."
            )
        zero_point = None if self.lsq_zero_point is None else self.lsq_zero_point[...]
        return scale, zero_point


class IntQuantizedLayer(_LearnedStepSize):
    """Fake-quantizes activations with an observed (or learned) range.

    Args:
      bits: code width, 2..16.
      symmetric: symmetric grid (signed codes) or affine (default).
      axis: ``None`` for one range per tensor, or the channel axis (then
        ``num_features`` is its length).
      num_features: number of channels, for ``axis`` not None.
      observer: a ``pychop_jax.observers`` function (default ``ema``, momentum 0.9).
      lsq: learn the step size (and affine zero point) instead of observing.
      use_running_average: True freezes the statistics (``model.eval()``), False
        updates them on every call (``model.train()``, the default).
      spec: a ``QuantSpec`` used instead of ``bits`` / ``symmetric`` / ``axis`` (float
        element formats); a per-block spec (``group_size``, MX) calibrates on each
        call and keeps no statistics (``stats`` is ``None``).
    """

    def __init__(self, bits: int = 8, *, symmetric: bool = False, axis: int | None = None,
                 num_features: int | None = None, observer: Callable = observers.ema,
                 lsq: bool = False, use_running_average: bool = False,
                 spec: QuantSpec | None = None):
        self.spec = spec or QuantSpec(bits=bits, symmetric=symmetric, axis=axis)
        self.observer = observer
        self.lsq = lsq
        self.use_running_average = use_running_average
        if lsq:
            self._set_lsq(*qat.lsq_placeholder(self.spec, num_features))
            self.stats = None
        elif qat.is_dynamic(self.spec):
            self.stats = None
        else:
            self.stats = QuantStats(qat.init_stats(self.spec, num_features))

    def __call__(self, x, use_running_average: bool | None = None):
        if self.lsq:
            return qat.learned_fake_quant(x, self.spec, *self._learned(x, self.spec))
        frozen = self.use_running_average if use_running_average is None else use_running_average
        stats = None if self.stats is None else self.stats.get_value()
        y, stats = qat.input_fake_quant(x, stats, self.spec, self.observer, train=not frozen)
        if not frozen and self.stats is not None:
            self.stats.set_value(stats)
        return y


class WeightQuant(_LearnedStepSize):
    """``op(lhs, rhs, ...)`` with the kernel ``rhs`` fake-quantized
    (``qat.fake_quant_weight``); sits in the ``dot_general`` /
    ``conv_general_dilated`` slot of ``QuantDense`` / ``QuantConv``."""

    def __init__(self, op: Callable, spec: QuantSpec | None, *, lsq: bool, kernel):
        self.op = op
        self.spec = spec
        self.lsq = bool(lsq and spec is not None)
        if self.lsq:
            self._set_lsq(*qat.init_lsq(kernel, spec))

    def __call__(self, lhs, rhs, *args, **kwargs):
        learned = self._learned(rhs, self.spec) if self.lsq else (None, None)
        return self.op(lhs, qat.fake_quant_weight(rhs, self.spec, *learned), *args, **kwargs)


_OPTION_NAMES = frozenset(f.name for f in dataclasses.fields(QuantOptions))


class _QuantLayer:
    """What QuantDense and QuantConv add to ``nnx.Linear`` / ``nnx.Conv``."""

    _op_slot: str

    def __init__(self, *args, rngs: nnx.Rngs, **kwargs):
        options = QuantOptions(**{k: kwargs.pop(k) for k in _OPTION_NAMES & kwargs.keys()})
        op = kwargs.pop(self._op_slot, getattr(lax, self._op_slot))
        super().__init__(*args, rngs=rngs, **kwargs)
        # the slot held a function (static); the quantizer is a module (data)
        setattr(self, self._op_slot, nnx.data(WeightQuant(
            op, options.weight_spec, lsq=options.lsq, kernel=self.kernel[...])))
        spec = options.act_spec
        self.input_quant = None if spec is None else IntQuantizedLayer(
            spec=spec, observer=options.observer, lsq=options.lsq)

    def __call__(self, inputs, *args, **kwargs):
        if self.input_quant is not None:
            inputs = self.input_quant(inputs)
        return super().__call__(inputs, *args, **kwargs)


class QuantDense(_QuantLayer, nnx.Linear):
    """``nnx.Linear(in_features, out_features, *, rngs, ...)`` with fake-quantized
    kernel (and optionally input); extra keywords: ``qat.QuantOptions``."""

    _op_slot = "dot_general"


class QuantConv(_QuantLayer, nnx.Conv):
    """``nnx.Conv(in_features, out_features, kernel_size, strides=1, *, rngs, ...)``
    with fake-quantized kernel (and optionally input); extra keywords:
    ``qat.QuantOptions``."""

    _op_slot = "conv_general_dilated"


def init_lsq(model: nnx.Module, *args, **kwargs):
    """(Re)initialise every LSQ step size in ``model`` from data, in place.

    Runs ``model(*args, **kwargs)`` once, eagerly, while each learned quantizer sets
    its step size (and zero point) from the tensor it receives: the kernel as it is
    now, the activations of this batch (Esser et al., 2019).  Returns the output.
    """
    learners = [m for _, m in nnx.iter_modules(model) if isinstance(m, _LearnedStepSize)]
    for m in learners:
        m._init_from_data = True
    try:
        return model(*args, **kwargs)
    finally:
        for m in learners:
            m._init_from_data = False
