"""The interface of the post-training algorithms a ``QuantRule(method=...)`` takes.

The algorithms themselves (GPTQ, AWQ, SmoothQuant, HQQ) live in
``pychop_jax.serving.algorithms`` (public as ``pychop_jax.algorithms``); a rule only
carries their frozen, hashable settings (a ``QuantMethod``), and a quantized model
carries their results (a ``MethodResult`` per weight), which the transform uses in
place of round-to-nearest.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax

from ..core.state import QuantState

__all__ = ["QuantMethod", "MethodResult"]


class QuantMethod:
    """Base class of the post-training algorithms.

    Subclasses set ``name`` and ``statistics`` -- the statistics of each weight's
    matmul input that calibration collects for them (``"hessian"``: sum of ``x^T x``;
    ``"abs_mean"`` / ``"abs_max"``: per input channel; ``"rows"``: a sample of input
    rows) and ``scales_input`` -- and may extend ``check_rule``.
    """

    name: ClassVar[str] = "method"
    statistics: ClassVar[frozenset] = frozenset()
    #: whether its results carry an ``input_scale`` (the input multiplied first)
    scales_input: ClassVar[bool] = False

    def check_rule(self, rule) -> None:
        """Raise ``ValueError`` if ``rule`` cannot use this method (default: it needs a
        weight spec)."""
        if rule.weight is None:
            raise ValueError(f"QuantRule({rule.module_path!r}, method={self.name}) has no "
                             "weight spec; the method quantizes weights: give it weight=.")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MethodResult:
    """A post-training algorithm's result for one weight, in the parameter's layout.

    Attributes:
      kernel: the quantized weight as floats, the parameter's shape; every value is on
        ``state``'s grid (``dequantize(quantize(kernel, state), state) == kernel``).
      state: the weight's ``QuantState``.
      input_scale: ``None``, or the per-input-channel factor the matmul's input is
        multiplied by first (AWQ / SmoothQuant: ``1 / s``), in the parameter's layout:
        the parameter's rank, full along its contracted axes (and a stacked layer axis),
        size 1 along its output channels.
    """

    kernel: Any
    state: QuantState
    input_scale: Any = None
