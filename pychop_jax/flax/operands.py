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
* **input**: ``qat.input_fake_quant``: observed with the layer's ``RangeState`` (the
  observer updates it when ``train``; otherwise the frozen range, or this batch's
  estimate while the state has seen nothing), or, for a per-block spec (MX / NVFP4,
  ``qat.is_dynamic``), calibrated on the input itself on every call (no state); or
  ``qat.learned_fake_quant`` (``lsq``).  A per-block input has its blocks along its
  last axis, which the layer must contract (``check_block_input``).
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
           "input_contraction", "check_block_input",
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
        """The input has an observed range (a ``RangeState`` to keep): a per-tensor
        input spec without ``lsq``."""
        return self.act is not None and not self.lsq and not self.dynamic_input

    @property
    def dynamic_input(self) -> bool:
        """The input is quantized per block, calibrated on each call (no state)."""
        return self.act is not None and qat.is_dynamic(self.act)

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


def input_contraction(kind: str, layer=None, einsum_str: str | None = None):
    """The axes of a layer's input that its op contracts, as given (negative: from the
    end), or ``None`` when they cannot be told.

    ``dense``, ``conv`` (input channels, with the window), ``embed`` (``attend``'s
    query): ``(-1,)``; ``dense_general``: the layer's ``axis``; ``einsum``: the input's
    indices of ``einsum_str`` (default: the layer's) that the kernel has and the output
    lacks (``...`` allowed: indices after it count from the end).
    """
    if kind == "dense_general":
        axis = layer.axis
        return tuple(axis) if isinstance(axis, (tuple, list)) else (int(axis),)
    if kind != "einsum":
        return (-1,)
    spec = (einsum_str or getattr(layer, "einsum_str", None) or "").replace(" ", "")
    if "->" not in spec or spec.count(",") != 1:
        return None
    inputs, out = spec.split("->")
    a, b = inputs.split(",")
    if "..." in a:
        head, tail = a.split("...", 1)
        if "..." in tail:
            return None
        axes = [(c, i) for i, c in enumerate(head)]
        axes += [(c, i - len(tail)) for i, c in enumerate(tail)]
    else:
        axes = list(zip(a, range(len(a)), strict=True))
    return tuple(i for c, i in axes if c in b and c not in out)


def check_block_input(plan: LayerPlan, shape, contracted, path: str = "") -> None:
    """Check that a per-block input spec fits the layer: blocks along the input's last
    axis (of ``shape``), an axis the layer contracts (``contracted``, from
    ``input_contraction``).  No-op for other plans.

    Raises:
      ValueError: naming the layer, when the blocks lie along another axis, do not
        tile the last axis, or the layer does not contract the input's last axis.
    """
    if not plan.dynamic_input:
        return
    spec, ndim = plan.act, len(shape)
    where = f"quantize_model: layer {path!r} ({plan.kind}), input of shape {tuple(shape)}"
    if ndim == 0 or spec.resolve_axis(ndim) != ndim - 1:
        raise ValueError(
            f"{where}: the rule's act spec has blocks of {spec.group_size} along axis "
            f"{spec.axis}; block-scaled inputs have their blocks along the input's last "
            "axis (the features, which the layer contracts). Use axis=-1, e.g. "
            "dataclasses.replace(spec, axis=-1).")
    if shape[-1] % spec.group_size:
        raise ValueError(
            f"{where}: the rule's act spec has blocks of {spec.group_size} along the "
            f"input's last axis, of length {shape[-1]}, not a multiple of it. Use a "
            "block size that divides it, or a per-tensor act spec for this layer.")
    if contracted is None or (ndim - 1) not in {a % ndim for a in contracted}:
        told = ("cannot be read from its einsum" if contracted is None
                else f"are {tuple(contracted)}")
        raise ValueError(
            f"{where}: the rule's act spec is block-scaled along the input's last axis, "
            f"which this layer does not contract (its contracted input axes {told}); "
            "the blocks of an MX / NVFP4 input must lie along the contraction. Give this "
            "layer a per-tensor act spec (axis=None) in an earlier rule, or exclude it.")


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
                      input_step=None, train: bool = False, result: MethodResult | None = None,
                      contracted=(-1,), path: str = ""):
    """The operands with kernel and input fake-quantized; returns ``(operands,
    input_range)``, the range updated by the observer when ``train``.

    ``weight_step`` / ``input_step``: the learned ``(scale, zero_point)`` of an ``lsq``
    plan (compact shapes, ``qat.init_lsq``); ``input_range``: the ``RangeState`` of an
    observed input (``None`` for a per-block input, which is calibrated on the input:
    ``y = fake_quant(x, calibrate(x, act))``, the same in training and evaluation);
    ``result``: a method's ``MethodResult`` (see the module docstring).
    ``contracted`` / ``path``: the layer's contracted input axes
    (``input_contraction``) and its path, for ``check_block_input``.
    """
    operands = list(operands)
    i, w = roles(operands)
    if i is not None:
        check_block_input(plan, operands[i].shape, contracted, path)
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
            operands[i], input_range = qat.input_fake_quant(
                operands[i], input_range, plan.act, plan.observer, train=train)
    return tuple(operands), input_range
