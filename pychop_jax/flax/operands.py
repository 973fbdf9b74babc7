"""The per-layer math of ``quantize_model``: a layer's operands, fake-quantized.

Every layer ``quantize_model`` covers (linen and nnx ``Dense`` / ``Linear``,
``DenseGeneral`` / ``LinearGeneral``, ``Einsum``, ``Conv``, ``Embed``) passes the
operands of its op through its ``promote_dtype`` field right before the op::

    inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=...)  # linen
    inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=...)  # nnx
    (table,) = self.promote_dtype(table, ...);  query, table = ...(query, table)  # Embed

so the quantized layer keeps its op and its params and gets, in that slot, the
layer's own ``promote_dtype`` followed by ``quantize_operands``:

* **roles**: one operand is the kernel (the ``Embed`` table); of two or more, the
  first is the input and the second the kernel (a bias stays float).
* **kernel**: ``qat.fake_quant_weight``: calibrated on the kernel every call
  (clipped straight-through gradient), or with a learned step size (``lsq``).
* **input**: ``qat.observed_fake_quant`` with the layer's ``RangeState`` (the
  observer updates it when ``train``; otherwise the frozen range, or this batch's
  estimate while the state has seen nothing), or ``qat.learned_fake_quant``.
* **method result** (a rule with ``method=``, after ``calibrate_model``): a
  ``MethodResult`` replaces both: the kernel is the algorithm's quantized kernel
  (values on its grid, used as they are) and the input is first multiplied by the
  result's per-input-channel ``input_scale`` (AWQ / SmoothQuant), then quantized as
  above.  ``record_input`` hands each quantizing layer's raw input to the recorder
  that ``recording_inputs`` installs (calibration of the algorithms' statistics).

The functions are pure; ``quantize_model``'s linen and nnx halves only store the
state they take and return.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from ..core.spec import QuantSpec
from ..core.state import QuantState
from . import qat
from .rules import QuantRule

__all__ = ["LayerPlan", "MethodResult", "roles", "quantize_operands", "init_input_range",
           "init_weight_step", "init_input_step", "kernel_name", "recording_inputs",
           "record_input"]


def kernel_name(kind: str) -> str:
    """The parameter that holds a covered layer's weight (``Embed``: its table)."""
    return "embedding" if kind == "embed" else "kernel"


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """What a rule means for one layer: resolved specs, observer and mode.

    Attributes:
      kind: ``"dense"``, ``"dense_general"``, ``"einsum"``, ``"conv"`` or ``"embed"``.
      weight: the kernel's spec (``None``: float kernel).
      act: the input's spec (``None``: float input).
      observer: the input observer (unused with ``lsq``).
      lsq: learned step sizes for kernel and input.
      method: the rule's ``QuantMethod`` (``None``: round-to-nearest).
    """

    kind: str
    weight: QuantSpec | None
    act: QuantSpec | None
    observer: Callable
    lsq: bool
    method: Any = None

    @classmethod
    def from_rule(cls, rule: QuantRule, kind: str) -> LayerPlan:
        return cls(kind, rule.weight_spec(kind), rule.act_spec(), rule.observer_fn(), rule.lsq,
                   rule.method)

    @property
    def observes(self) -> bool:
        """The input has an observed range (a ``RangeState`` to keep)."""
        return self.act is not None and not self.lsq

    @property
    def learns_weight(self) -> bool:
        return self.lsq and self.weight is not None

    @property
    def learns_input(self) -> bool:
        return self.lsq and self.act is not None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MethodResult:
    """A post-training algorithm's result for one layer.

    Attributes:
      kernel: the quantized kernel as floats, the kernel's shape; every value is on
        ``state``'s grid (``dequantize(quantize(kernel, state), state) == kernel``).
      state: the kernel's ``QuantState`` (the rule's weight spec).
      input_scale: ``None``, or the per-input-channel factor the layer's input is
        multiplied by first (AWQ / SmoothQuant: ``1 / s``), shaped to broadcast
        against the input from its trailing axes.
    """

    kernel: Any
    state: QuantState
    input_scale: Any = None


_RECORDER: contextvars.ContextVar = contextvars.ContextVar("pychop_jax_recorder", default=None)


@contextlib.contextmanager
def recording_inputs(recorder: Callable):
    """While active, quantizing layers call ``recorder(path, x)`` with their raw input
    (before any quantization) when they run."""
    token = _RECORDER.set(recorder)
    try:
        yield
    finally:
        _RECORDER.reset(token)


def record_input(path: str, x) -> None:
    """Hand ``x`` (layer ``path``'s raw input) to the active recorder, if any."""
    recorder = _RECORDER.get()
    if recorder is not None:
        recorder(path, x)


def roles(operands) -> tuple[int | None, int]:
    """``(input index or None, kernel index)`` of a ``promote_dtype`` call's operands."""
    return (None, 0) if len(operands) == 1 else (0, 1)


def init_input_range(plan: LayerPlan):
    """The empty ``RangeState`` of an observed input (``None`` if not observed)."""
    return qat.init_stats(plan.act) if plan.observes else None


def init_weight_step(plan: LayerPlan, kernel):
    """LSQ's ``(scale, zero_point)`` from the kernel (``None`` unless learned)."""
    return qat.init_lsq(kernel, plan.weight) if plan.learns_weight else None


def init_input_step(plan: LayerPlan, x):
    """LSQ's ``(scale, zero_point)`` from an input batch (``None`` unless learned)."""
    return qat.init_lsq(x, plan.act) if plan.learns_input else None


def quantize_operands(plan: LayerPlan, operands, *, input_range=None, weight_step=None,
                      input_step=None, train: bool = False, result: MethodResult | None = None):
    """The operands with kernel and input fake-quantized; returns ``(operands,
    input_range)``, the range updated by the observer when ``train``.

    ``weight_step`` / ``input_step``: the learned ``(scale, zero_point)`` of an ``lsq``
    plan (compact shapes, ``qat.init_lsq``); ``input_range``: the ``RangeState`` of an
    observed input; ``result``: a method's ``MethodResult`` (see the module docstring).
    """
    operands = list(operands)
    i, w = roles(operands)
    if result is not None:
        operands[w] = result.kernel.astype(operands[w].dtype)
        if i is not None and result.input_scale is not None:
            operands[i] = operands[i] * result.input_scale.astype(operands[i].dtype)
    elif plan.weight is not None:
        learned = weight_step if plan.learns_weight else (None, None)
        operands[w] = qat.fake_quant_weight(operands[w], plan.weight, *learned)
    if plan.act is not None and i is not None:
        if plan.lsq:
            operands[i] = qat.learned_fake_quant(operands[i], plan.act, *input_step)
        else:
            operands[i], input_range = qat.observed_fake_quant(
                operands[i], input_range, plan.act, plan.observer, train=train)
    return tuple(operands), input_range
