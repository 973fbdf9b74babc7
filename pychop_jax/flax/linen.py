"""Flax linen quantization-aware training modules.

Drop-in for ``flax.linen`` layers, with the train/eval switch as a call argument::

    import pychop_jax.linen as qnn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            x = qnn.QuantConv(16, (3, 3), act_bits=8)(x, train)
            x = nn.relu(x).reshape(x.shape[0], -1)
            return qnn.QuantDense(10, weight_bits=4, act_bits=4)(x, train)

    variables = Net().init(key, x)                    # params (+ quant_stats)
    y, updates = Net().apply(variables, x, train=True, mutable=["quant_stats"])
    y = Net().apply({**variables, **updates}, x)      # eval: ranges frozen

* ``QuantDense(features, ...)`` / ``QuantConv(features, kernel_size, ...)`` subclass
  ``nn.Dense`` / ``nn.Conv``: same attributes, same ``kernel``/``bias`` params (so a
  float checkpoint loads unchanged), plus the ``qat.QuantOptions`` fields
  (``weight_bits=8``, ``weight_symmetric=True``, ``act_bits=None``,
  ``act_symmetric=False``, ``observer=observers.ema``, ``lsq=False``, and the float /
  block formats ``weight_format`` / ``act_format``).  The kernel is
  fake-quantized per output channel inside the layer's op (a ``WeightQuant`` module in
  the ``dot_general_cls`` / ``conv_general_dilated_cls`` slot, which wraps
  ``dot_general`` / ``conv_general_dilated`` if given); the input, when ``act_bits``
  is set, by an ``IntQuantizedLayer`` child named ``input_quant``.
* ``IntQuantizedLayer(bits, ...)`` fake-quantizes activations.  Observer statistics
  (an ``observers.RangeState``) live in the ``quant_stats`` collection under
  ``range``: updated when ``train=True`` (make the collection mutable, as
  ``batch_stats`` for BatchNorm; not during ``init``), frozen otherwise.
* ``lsq=True``: step sizes are params named ``lsq_scale`` (and ``lsq_zero_point`` for
  affine grids), created by ``init`` from the kernel and the activations that reach
  the layer (Esser et al., 2019).  To start from float weights, ``init_lsq`` creates
  them from the weights at hand.

``train`` may be given as a call argument or a module attribute (the call wins);
without either the layer evaluates.  All computation is in ``pychop_jax.qat``, shared
with ``pychop_jax.nnx``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import flax.linen as nn
import jax
from jax import lax

from ..core import observers
from ..core.spec import QuantSpec
from ..transform import qat
from ..transform.qat import QuantOptions

__all__ = ["IntQuantizedLayer", "QuantDense", "QuantConv", "WeightQuant", "init_lsq"]


def _train(attribute: bool | None, argument: bool | None) -> bool:
    return bool(argument if argument is not None else attribute)


def _lsq_params(module: nn.Module, x, spec: QuantSpec):
    """The ``lsq_scale`` (and ``lsq_zero_point``) params, created from ``x``."""
    made = []

    def init(_key, i):  # runs only when the params are created; one lsq_init for both
        if not made:
            made.append(qat.init_lsq(x, spec))
        return made[0][i]

    scale = module.param("lsq_scale", init, 0)
    zero_point = None if spec.symmetric else module.param("lsq_zero_point", init, 1)
    return scale, zero_point


class IntQuantizedLayer(nn.Module):
    """Fake-quantizes activations with an observed (or learned) range.

    Attributes:
      bits: code width, 2..16.
      symmetric: symmetric grid (signed codes) or affine (default).
      axis: ``None`` for one range per tensor, or the channel axis.
      observer: a ``pychop_jax.observers`` function (default ``ema``, momentum 0.9).
      lsq: learn the step size (and affine zero point) instead of observing.
      train: default of the call argument.
      spec: a ``QuantSpec`` used instead of ``bits`` / ``symmetric`` / ``axis`` (float
        element formats, e.g. ``QuantSpec(dtype="float8_e4m3fn")``); a per-block spec
        (``group_size``, MX) calibrates on each call and keeps no statistics
        (``qat.input_fake_quant``).

    Variables: ``quant_stats/range`` (``observers.RangeState``, compact shape ``()``
    or ``(C,)``); with ``lsq=True`` instead params ``lsq_scale`` (+ ``lsq_zero_point``).
    """

    bits: int = 8
    symmetric: bool = False
    axis: int | None = None
    observer: Callable = observers.ema
    lsq: bool = False
    train: bool | None = None
    spec: QuantSpec | None = None

    @nn.compact
    def __call__(self, x, train: bool | None = None):
        spec = self.spec or QuantSpec(bits=self.bits, symmetric=self.symmetric, axis=self.axis)
        if self.lsq:
            return qat.learned_fake_quant(x, spec, *_lsq_params(self, x, spec))
        train = _train(self.train, train)
        if qat.is_dynamic(spec):
            return qat.input_fake_quant(x, None, spec, self.observer, train=train)[0]
        n = None if spec.axis is None else x.shape[spec.resolve_axis(x.ndim)]
        stats = self.variable("quant_stats", "range", qat.init_stats, spec, n)
        y, new = qat.input_fake_quant(x, stats.value, spec, self.observer, train=train)
        if train and not self.is_initializing():
            stats.value = new
        return y


class WeightQuant(nn.Module):
    """The layer's op (``dot_general`` / ``conv_general_dilated``) with the kernel
    fake-quantized by ``qat.fake_quant_weight``.

    Created by ``QuantDense``/``QuantConv`` (its parent) through their
    ``dot_general_cls``/``conv_general_dilated_cls`` slot; it reads the options and the
    wrapped op from the parent.  Holds ``lsq_scale`` (+ ``lsq_zero_point``) with
    ``lsq=True``.
    """

    @nn.compact
    def __call__(self, lhs, rhs, *args, **kwargs):
        options: QuantOptions = self.parent
        spec = options.weight_spec
        learned = _lsq_params(self, rhs, spec) if options.lsq and spec else (None, None)
        return self.parent._base_op()(lhs, qat.fake_quant_weight(rhs, spec, *learned),
                                      *args, **kwargs)


@dataclasses.dataclass(repr=False, eq=False)
class _QuantLayer(QuantOptions):
    """What QuantDense and QuantConv add to their flax.linen base class: the options,
    the ``train`` default, the input quantizer and the op ``WeightQuant`` wraps (the
    base class's ``_op_slot`` attribute, else the ``jax.lax`` function of that name)."""

    train: bool | None = None
    _op_slot = ""

    def _base_op(self):
        return getattr(self, self._op_slot) or getattr(lax, self._op_slot)

    @nn.compact
    def _quant_call(self, inputs, train: bool | None = None):
        # bound as ``__call__`` in each class body: linen wraps only methods that a
        # Module subclass defines itself
        spec = self.act_spec
        if spec is not None:
            layer = IntQuantizedLayer(spec=spec, observer=self.observer, lsq=self.lsq,
                                      name="input_quant")
            inputs = layer(inputs, _train(self.train, train))
        return super().__call__(inputs)


class QuantDense(_QuantLayer, nn.Dense):
    """``nn.Dense`` with fake-quantized kernel (and optionally input); see the module
    docstring and ``qat.QuantOptions`` for the extra attributes."""

    dot_general_cls: Callable | None = WeightQuant
    _op_slot = "dot_general"
    __call__ = _QuantLayer._quant_call


class QuantConv(_QuantLayer, nn.Conv):
    """``nn.Conv`` with fake-quantized kernel (and optionally input); see the module
    docstring and ``qat.QuantOptions`` for the extra attributes."""

    conv_general_dilated_cls: Callable | None = WeightQuant
    _op_slot = "conv_general_dilated"
    __call__ = _QuantLayer._quant_call


def _without_lsq(tree):
    if not isinstance(tree, Mapping):
        return tree
    return {k: _without_lsq(v) for k, v in tree.items() if not k.startswith("lsq_")}


def init_lsq(model: nn.Module, variables, *args, **kwargs):
    """``variables`` with every LSQ step size (re)initialised from data.

    Drops the ``lsq_*`` params and runs ``model.apply(variables, *args, **kwargs)``
    with every collection mutable, so the layers recreate them from the kernels in
    ``variables`` and the activations ``args`` produce.  Use it to fine-tune from a
    float model: ``init_lsq(model, {"params": float_params}, x)`` returns the QAT
    model's variables (with empty ``quant_stats`` where layers observe).
    """
    variables = dict(variables)
    variables["params"] = _without_lsq(variables.get("params", {}))
    _, new = model.apply(variables, *args, mutable=True, rngs={"params": jax.random.key(0)},
                         **kwargs)
    return {**variables, **new}
