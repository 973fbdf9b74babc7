"""``quantize_model`` for ``flax.nnx``: a copy of the model with quantizing layers.

``quantize_nnx(model, rules)`` clones the model (``nnx.clone``: the model itself is
not modified) and, in the copy, sets the ``promote_dtype`` of every covered layer
whose path matches a quantizing rule to an ``OperandQuant``: the layer's own
``promote_dtype`` followed by ``operands.quantize_operands`` (see
``quantize_model``'s docstring for why that slot).  ``OperandQuant`` holds what the
layer's quantizers keep:

* ``input_range``: a ``pychop_jax.nnx.QuantStats`` holding the observer's
  ``RangeState`` (observed inputs), updated while ``use_running_average`` is False
  (``qmodel.train()``, the default of a new copy), frozen after ``qmodel.eval()``;
  ``None`` for a per-block input (MX / NVFP4 ``act``), calibrated on each call;
* ``weight_scale`` (+ ``weight_zero_point``), ``input_scale`` (+
  ``input_zero_point``): ``nnx.Param`` s of the LSQ step sizes (``lsq=True``).  The
  kernel's are set from the kernel when the copy is made; the input's need data:
  pass a sample call to ``quantize_model`` (``quantize_model(model, rules, x)``),
  which runs the copy once, eagerly, to set them (observing nothing);
* ``method_result``: a ``QuantMethodState`` holding the ``MethodResult`` of the
  rule's ``method`` once ``calibrate_model`` has run it (``None`` until then).

Paths are the attribute paths joined with ``"/"`` (``"blocks/0/attn/query"``).
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
from flax import nnx

from . import nnx_attention, qat
from .nnx import QuantStats
from .operands import (
    LayerPlan,
    MethodResult,
    init_input_range,
    init_input_step,
    init_weight_step,
    input_contraction,
    kernel_name,
    quantize_operands,
    record_input,
    roles,
)
from .rules import QuantReport, first_match, uncoverable_error

__all__ = ["OperandQuant", "QuantMethodState", "quantize_nnx", "report_nnx"]

_KINDS = {nnx.Linear: "dense", nnx.LinearGeneral: "dense_general", nnx.Einsum: "einsum",
          nnx.Conv: "conv", nnx.Embed: "embed"}
_NORMS = (nnx.LayerNorm, nnx.RMSNorm, nnx.BatchNorm, nnx.GroupNorm)


class QuantMethodState(nnx.Variable):
    """A post-training algorithm's ``MethodResult`` (not a trainable ``Param``)."""


def _params(step):
    """``(scale, zero_point)`` as ``nnx.Param`` s (``None`` stays ``None``)."""
    scale, zero_point = step
    return nnx.Param(scale), None if zero_point is None else nnx.Param(zero_point)


def _value(param):
    return None if param is None else param[...]


class OperandQuant(nnx.Module):
    """A quantized layer's ``promote_dtype``: the layer's own, then
    ``quantize_operands`` with the state this module holds.

    Args:
      base: the layer's original ``promote_dtype``.
      plan: the ``LayerPlan`` of the rule that took the layer.
      kernel: the layer's kernel now (LSQ step sizes start from it).
      path: the layer's path (what ``record_input`` reports).
    """

    def __init__(self, base, plan: LayerPlan, kernel, path: str = "", contracted=(-1,)):
        self.base = base
        self.plan = plan
        self.path = path
        self.contracted = contracted
        self.method_result = nnx.data(None)
        self.use_running_average = False
        self.initializing = False
        stats = init_input_range(plan)
        self.input_range = None if stats is None else QuantStats(stats)
        weight = _params(init_weight_step(plan, kernel)) if plan.learns_weight else (None, None)
        # NaN until data sets it (quantize_model's sample call)
        inputs = _params(qat.lsq_placeholder(plan.act)) if plan.learns_input else (None, None)
        self.weight_scale, self.weight_zero_point = map(nnx.data, weight)
        self.input_scale, self.input_zero_point = map(nnx.data, inputs)

    def _input_step(self, x):
        if self.initializing:
            scale, zero_point = init_input_step(self.plan, x)
            self.input_scale[...] = scale
            if zero_point is not None:
                self.input_zero_point[...] = zero_point
        scale = self.input_scale[...]
        if not isinstance(scale, jax.core.Tracer) and bool(jnp.isnan(scale).any()):
            raise ValueError(
                "quantize_model: an lsq rule's input step size is not initialised; pass "
                "a sample call, quantize_model(model, rules, *args, **kwargs).")
        return scale, _value(self.input_zero_point)

    def set_method_result(self, result: MethodResult | None) -> None:
        """Store (``None``: drop) the result of the rule's method."""
        self.method_result = None if result is None else QuantMethodState(result)

    def __call__(self, operands, **kwargs):
        if roles(operands)[0] is not None:
            record_input(self.path, operands[0])
        operands = self.base(operands, **kwargs)
        plan = self.plan
        i, _ = roles(operands)
        has_input = i is not None and plan.act is not None
        train = not (self.use_running_average or self.initializing)
        weight_step = (self.weight_scale[...], _value(self.weight_zero_point)) \
            if plan.learns_weight else None
        input_step = self._input_step(operands[i]) if has_input and plan.learns_input else None
        stats = self.input_range.get_value() if has_input and plan.observes else None
        result = None if self.method_result is None else self.method_result.get_value()
        operands, new = quantize_operands(plan, operands, input_range=stats,
                                          weight_step=weight_step, input_step=input_step,
                                          train=train, result=result,
                                          contracted=self.contracted, path=self.path)
        if stats is not None and train:
            self.input_range.set_value(new)
        return operands


def _holds_params(module) -> bool:
    return any(isinstance(v, nnx.Param) for v in vars(module).values())


def _classify(model, rules):
    """``(path, module, rule index, kind)`` of the layers the rules concern, in graph
    order: covered layers (kind from ``_KINDS``), normalization layers a quantizing
    rule matches (kind ``None``) and uncoverable layers an exclusion rule matches
    (kind ``"excluded"``).

    Raises:
      ValueError: an uncoverable layer a quantizing rule matches.
    """
    found = []
    for path, module in nnx.iter_modules(model):
        path = "/".join(str(p) for p in path)
        kind = _KINDS.get(type(module))
        index = first_match(rules, path)
        quantizing = index is not None and rules[index].quantizes
        if index is not None and rules[index].attention is not None \
                and nnx_attention.is_attention(module):
            found.append((path, module, index, "attention"))
        elif kind is not None:
            found.append((path, module, index, kind))
        elif index is None or isinstance(module, OperandQuant):
            continue
        elif isinstance(module, _NORMS):
            if quantizing:
                found.append((path, module, index, None))
        elif _holds_params(module):
            if quantizing:
                raise uncoverable_error(path, module, index)
            found.append((path, module, index, "excluded"))
    return found


def report_nnx(model, rules) -> QuantReport:
    """The ``QuantReport`` of ``rules`` over an nnx model (nothing is changed)."""
    entries = [(path, type(m).__name__, index, kind)
               for path, m, index, kind in _classify(model, rules)]
    return QuantReport.collect(rules, entries)


def quantize_nnx(model, rules, *args, **kwargs):
    """The quantized copy of ``model`` (see the module docstring); ``args`` /
    ``kwargs``: an optional sample call that sets LSQ input step sizes from data."""

    qmodel = nnx.clone(model)
    layers = _classify(qmodel, rules)  # listed first: the loop changes the graph
    for path, layer, index, kind in layers:
        if kind == "attention":
            nnx_attention.install_nnx(layer, rules[index], path)
            continue
        if kind not in _KINDS.values() or index is None or not rules[index].quantizes:
            continue
        if isinstance(layer.promote_dtype, OperandQuant):
            raise ValueError(f"quantize_model: {path!r} is quantized already.")
        plan = LayerPlan.from_rule(rules[index], kind)
        kernel = getattr(layer, kernel_name(kind))[...]
        slot = OperandQuant(layer.promote_dtype, plan, kernel, path,
                            input_contraction(kind, layer))
        delattr(layer, "promote_dtype")  # a static function becomes a data node
        layer.promote_dtype = nnx.data(slot)
    message = report_nnx(qmodel, rules).warning()
    if message:
        warnings.warn(message, stacklevel=3)
    if args or kwargs:
        _run_initializing(qmodel, *args, **kwargs)
    return qmodel


def _run_initializing(qmodel, *args, **kwargs):
    """One eager call that sets LSQ input step sizes from the data and observes nothing."""
    slots = [m for _, m in nnx.iter_modules(qmodel)
             if isinstance(m, (OperandQuant, nnx_attention.AttentionQuant))]
    for m in slots:
        m.initializing = True
    try:
        qmodel(*args, **kwargs)
    finally:
        for m in slots:
            m.initializing = False
