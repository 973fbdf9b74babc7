"""Quantization rules over module paths, and the report of which rule took which layer.

A ``QuantRule`` says how the layers whose path it matches are quantized::

    rules = [
        QuantRule("head"),                                   # leave the head in float
        QuantRule(".*attn/(query|key|value|out)", weight=8, act=8),
        QuantRule(".*", weight=QuantSpec(bits=4, symmetric=True, axis=0, group_size=32)),
    ]

* ``module_path`` is a regular expression matched with ``re.fullmatch`` against the
  layer's path: the names of the modules from the quantized model down to the layer,
  joined with ``"/"`` (linen: ``"blocks_0/attn/query"``, the scope path; nnx: the
  attribute path, list indices included, ``"blocks/0/attn/query"``).  Full match, as
  Qwix does: ``"dense"`` matches the layer ``dense`` only, ``".*dense"`` any path
  ending in it.
* The **first** rule that matches a layer decides for it; later rules are not
  consulted.  A rule with ``weight=None`` and ``act=None`` therefore excludes the
  layers it matches from every later rule (they stay float).
* ``weight``: the kernel's quantizer, a ``QuantSpec`` or an int ``b`` (shorthand for
  ``b``-bit symmetric per output channel, see ``output_axis``); ``None`` keeps the
  kernel float.  The spec's ``axis`` (and ``group_size``) index the kernel **as Flax
  stores it**: ``Dense`` / ``nnx.Linear`` ``(in, out)``; ``DenseGeneral`` /
  ``LinearGeneral`` ``(batch.., in.., out..)``; ``Einsum`` the kernel shape of the
  layer; ``Conv`` ``(spatial.., in / groups, out)``; ``Embed`` the table ``(vocab,
  features)``.
* ``act``: the quantizer of the layer's *input*, a ``QuantSpec`` or an int ``b``
  (``b``-bit affine per tensor); ``None`` keeps it float.  Two kinds of spec:

  - **per tensor** (``axis=None``; integer grids, fp8, ...): one range, tracked by
    ``observer`` in training and frozen at evaluation (``quant_stats``);
  - **per block** (``group_size``: ``pj.formats.MXFP8_E4M3`` / ``MXFP4`` / ``NVFP4`` /
    ``MXINT8`` as they are, or any spec with ``axis=-1, group_size=g``): blocks of
    ``g`` consecutive features along the input's **last axis**, which must be an axis
    the layer contracts (``Dense`` / ``Linear``, ``Conv``'s input channels,
    ``Embed.attend``'s query, a ``DenseGeneral`` / ``Einsum`` contracting it).  Such an
    input is quantized *dynamically*, on each call, training and evaluation alike
    (``qat.input_fake_quant``: ``fake_quant(x, calibrate(x, spec))``, clipped STE):
    the scales follow the blocks of the batch at hand, as MX / NVFP4 hardware computes
    them, and no range is observed or stored.  A block axis other than the last
    (e.g. ``axis=0``) or a layer that does not contract its input's last axis raises
    ``ValueError`` naming the layer when it is first called.  Not with ``lsq``.

  Per-channel input specs (``axis`` without ``group_size``) are refused.  An
  ``Embed`` lookup has integer ids as input, so ``act`` applies to the query of
  ``Embed.attend`` only.
* ``observer``: how a per-tensor input range is tracked, one of ``"minmax"``, ``"ema"``,
  ``"percentile"``, ``"mse"`` (the ``pychop_jax.observers`` of that name, default
  options) or any observer callable ``observer(stats, x, spec) -> stats``.
* ``lsq``: learn the step sizes (and affine zero points) of kernel and input (LSQ /
  LSQ+) instead of calibrating / observing them.
* ``method``: a post-training algorithm that replaces round-to-nearest for the
  kernel (a ``QuantMethod``: ``pychop_jax.algorithms.GPTQ`` / ``AWQ`` /
  ``SmoothQuant`` / ``HQQ``).  It runs in ``pychop_jax.calibrate_model``; until then
  the layer is quantized by round-to-nearest.  Not combined with ``lsq``.
* ``attention``: for an attention module the rule matches (linen
  ``MultiHeadDotProductAttention`` and its subclasses, nnx ``MultiHeadAttention``),
  the quantizer of the operands of its two activation x activation products: the
  query and key of ``q k^T`` and the attention probabilities and value of
  ``probs v`` (``pychop_jax.flax.attention``).  A per-tensor ``QuantSpec`` or an int
  ``b`` (``b``-bit affine, as ``act``); each operand has its own range, tracked by
  ``observer`` (``lsq`` does not apply to them).  ``weight`` / ``act`` concern the
  layers a rule matches and ``attention`` the attention modules, so one rule
  ``QuantRule(".*", weight=8, act=8, attention=8)`` quantizes both; a rule with only
  ``attention`` leaves the layers it matches float (first match decides).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import ClassVar

from ..core import observers
from ..core.spec import QuantSpec

__all__ = ["QuantRule", "QuantMethod", "LayerMatch", "QuantReport", "OBSERVERS", "first_match",
           "output_axis", "uncoverable_error", "describe_spec"]

#: observer names a rule accepts
OBSERVERS: dict[str, Callable] = {
    "minmax": observers.minmax,
    "ema": observers.ema,
    "percentile": observers.percentile,
    "mse": observers.mse,
}

#: the kernel axis of one output channel per layer kind (``int`` weight shorthand):
#: the last output axis of Dense / DenseGeneral / Einsum / Conv kernels, the rows
#: (tokens) of an Embed table, which are ``attend``'s output channels
_OUTPUT_AXIS = {"dense": -1, "dense_general": -1, "einsum": -1, "conv": -1, "embed": 0}


def output_axis(kind: str) -> int:
    """The kernel axis an ``int`` weight shorthand quantizes per channel for a layer
    of ``kind`` (``"dense"``, ``"dense_general"``, ``"einsum"``, ``"conv"``,
    ``"embed"``)."""
    return _OUTPUT_AXIS[kind]


def _spec(value, field: str, shorthand: Callable[[int], QuantSpec]):
    if value is None or isinstance(value, QuantSpec):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        shorthand(value)  # validates the bit width now
        return value
    raise TypeError(f"QuantRule.{field} must be a QuantSpec, an int (bits) or None; "
                    f"got {value!r}.")


class QuantMethod:
    """Base class of the post-training algorithms a ``QuantRule(method=...)`` takes.

    The algorithms themselves live in ``pychop_jax.serving.algorithms`` (public as
    ``pychop_jax.algorithms``); a rule only carries the (frozen, hashable) settings.
    Subclasses set ``name`` and ``statistics`` -- the statistics of each layer's input
    that calibration collects for them (``"hessian"``: sum of ``x^T x``;
    ``"abs_mean"`` / ``"abs_max"``: per input channel; ``"rows"``: a sample of input
    rows) -- and may extend ``check_rule``.
    """

    name: ClassVar[str] = "method"
    statistics: ClassVar[frozenset] = frozenset()

    def check_rule(self, rule: QuantRule) -> None:
        """Raise ``ValueError`` if ``rule`` cannot use this method (default: it needs a
        weight spec)."""
        if rule.weight is None:
            raise ValueError(f"QuantRule({rule.module_path!r}, method={self.name}) has no "
                             "weight spec; the method quantizes kernels: give it weight=.")


@dataclasses.dataclass(frozen=True)
class QuantRule:
    """How the layers whose path matches ``module_path`` are quantized (see the module
    docstring).

    Raises:
      re.error: ``module_path`` is not a regular expression.
      TypeError / ValueError: a bad ``weight`` / ``act`` / ``observer``.
    """

    module_path: str
    weight: QuantSpec | int | None = None
    act: QuantSpec | int | None = None
    observer: str | Callable = "ema"
    lsq: bool = False
    method: QuantMethod | None = None
    attention: QuantSpec | int | None = None

    def __post_init__(self):
        re.compile(self.module_path)
        _spec(self.weight, "weight", lambda b: QuantSpec(bits=b, symmetric=True))
        _spec(self.act, "act", lambda b: QuantSpec(bits=b))
        _spec(self.attention, "attention", lambda b: QuantSpec(bits=b))
        if isinstance(self.attention, QuantSpec) and self.attention.axis is not None:
            raise ValueError(
                f"QuantRule({self.module_path!r}).attention has axis="
                f"{self.attention.axis}: attention operands are quantized per tensor (one "
                "observed range); use axis=None.")
        if isinstance(self.act, QuantSpec) and self.act.axis is not None:
            if self.act.group_size is None:
                raise ValueError(
                    f"QuantRule({self.module_path!r}).act has axis={self.act.axis} without "
                    "group_size: inputs are quantized per tensor (axis=None, one observed "
                    "range) or per block along their last axis (axis=-1 with group_size, "
                    "e.g. pychop_jax.formats.MXFP8_E4M3, calibrated on each call).")
            if self.lsq:
                raise ValueError(
                    f"QuantRule({self.module_path!r}): act={describe_spec(self.act)} is "
                    "quantized per block on each call (its scales follow the batch); "
                    "lsq=True learns one step size per tensor. Drop lsq or use a "
                    "per-tensor act spec.")
        if isinstance(self.observer, str):
            if self.observer not in OBSERVERS:
                raise ValueError(f"QuantRule.observer={self.observer!r}: choose one of "
                                 f"{sorted(OBSERVERS)} or pass an observer function.")
        elif not callable(self.observer):
            raise TypeError(f"QuantRule.observer must be a name or a callable; "
                            f"got {self.observer!r}.")
        if self.method is not None:
            if not isinstance(self.method, QuantMethod):
                raise TypeError(f"QuantRule.method must be a QuantMethod (e.g. "
                                f"pychop_jax.algorithms.GPTQ()); got {self.method!r}.")
            if self.lsq:
                raise ValueError(f"QuantRule({self.module_path!r}): method= and lsq=True "
                                 "both set the kernel's step sizes; choose one.")
            self.method.check_rule(self)

    @property
    def quantizes(self) -> bool:
        """False for an exclusion rule (both ``weight`` and ``act`` are ``None``)."""
        return self.weight is not None or self.act is not None

    def matches(self, path: str) -> bool:
        return re.fullmatch(self.module_path, path) is not None

    def weight_spec(self, kind: str) -> QuantSpec | None:
        """The kernel's spec for a layer of ``kind`` (an int becomes symmetric per
        output channel, ``output_axis(kind)``)."""
        if isinstance(self.weight, int):
            return QuantSpec(bits=self.weight, symmetric=True, axis=output_axis(kind))
        return self.weight

    def act_spec(self) -> QuantSpec | None:
        """The input's spec (an int becomes an affine per-tensor spec)."""
        return QuantSpec(bits=self.act) if isinstance(self.act, int) else self.act

    @property
    def dynamic_act(self) -> bool:
        """Whether the input is quantized per block on each call (``act`` has a
        ``group_size``: MX / NVFP4 inputs), with no observed range."""
        return isinstance(self.act, QuantSpec) and self.act.group_size is not None

    def attention_spec(self) -> QuantSpec | None:
        """The attention products' operand spec (an int becomes affine per tensor)."""
        return QuantSpec(bits=self.attention) if isinstance(self.attention, int) \
            else self.attention

    def observer_fn(self) -> Callable:
        return OBSERVERS[self.observer] if isinstance(self.observer, str) else self.observer


def describe_spec(spec: QuantSpec | int | None, act: bool = False) -> str:
    """A rule's ``weight`` / ``act`` in words: ``"float"``, ``"int8 symmetric per output
    channel"`` (the ``int`` weight shorthand), ``"int4 symmetric, axis 0, groups of
    32"``, ``"int8 affine per tensor"``, ``"float4_e2m1fn (E8M0 scales), axis 0, groups of
    32"``, ``"int4 symmetric, axis 0, groups of 32, float16 scales"``, ..."""
    if spec is None:
        return "float"
    if isinstance(spec, int):
        return f"int{spec} affine per tensor" if act else \
            f"int{spec} symmetric per output channel"
    grid = "symmetric" if spec.symmetric else "affine"
    if spec.narrow_range:
        grid += " narrow"
    if spec.axis is None:
        where = "per tensor"
    elif spec.group_size is None:
        where = f"per channel (axis {spec.axis})"
    else:
        where = f"axis {spec.axis}, groups of {spec.group_size}"
    if spec.is_float:
        grid = spec.dtype
    else:
        grid = f"int{spec.bits} {grid}"
    if spec.scale_dtype == "float8_e8m0fnu":
        grid += " (E8M0 scales)"
    elif spec.block_scaled:
        grid += f" ({spec.scale_dtype} x float32 scales)"
    scales = f", {spec.scale_dtype} scales" if spec.rounded_scale_format else ""
    return f"{grid}, {where}{scales}"


def uncoverable_error(path: str, layer: object, index: int) -> ValueError:
    """The error for a layer that rule ``index`` matches but that quantize_model
    cannot quantize."""
    return ValueError(
        f"quantize_model: rule #{index} matches {path!r}, a {type(layer).__module__}."
        f"{type(layer).__qualname__} with parameters of its own, which quantize_model "
        "cannot quantize (covered: Dense/Linear, DenseGeneral/LinearGeneral, Einsum, "
        "Conv, Embed, and modules built from them). Exclude it with an earlier "
        f"QuantRule({path!r}) without weight/act, or narrow the rule's module_path.")


def first_match(rules: Sequence[QuantRule], path: str) -> int | None:
    """Index of the first rule matching ``path``, or ``None``."""
    for i, rule in enumerate(rules):
        if rule.matches(path):
            return i
    return None


@dataclasses.dataclass(frozen=True)
class LayerMatch:
    """One coverable layer of the model.

    Attributes:
      path: the layer's path (as the rules see it).
      layer: the layer's class name (``"Dense"``, ``"LinearGeneral"``, ...).
      rule: index of the rule that took it, ``None`` if no rule matched.
      quantized: whether that rule quantizes anything (not an exclusion rule).
    """

    path: str
    layer: str
    rule: int | None
    quantized: bool


@dataclasses.dataclass(frozen=True)
class QuantReport:
    """Which rule took which layer.

    Attributes:
      rules: the rules, in order.
      layers: every coverable layer (each path once, in call / graph order), and
        the uncoverable ones that an exclusion rule took.
      skipped: ``(path, class name)`` of normalization layers a quantizing rule
        matched; they stay float (their params are scales, not matmul weights).
      unmatched: indices of the rules that took no layer.
    """

    rules: tuple[QuantRule, ...]
    layers: tuple[LayerMatch, ...]
    skipped: tuple[tuple[str, str], ...] = ()

    @property
    def unmatched(self) -> tuple[int, ...]:
        used = {m.rule for m in self.layers}
        return tuple(i for i in range(len(self.rules)) if i not in used)

    def by_path(self) -> dict[str, LayerMatch]:
        return {m.path: m for m in self.layers}

    def summary(self, max_paths: int = 3) -> str:
        """The report as text: one line per rule (its pattern, what it quantizes, and
        the layers it took), then the layers no rule took (float) and the skipped
        normalization layers.  At most ``max_paths`` paths per line, then a count."""
        def paths(items):
            items = list(items)
            shown = ", ".join(items[:max_paths])
            more = len(items) - max_paths
            return shown + (f", ... (+{more})" if more > 0 else "")

        def kinds(i):
            return {m.layer for m in self.layers if m.rule == i}

        lines = []
        for i, rule in enumerate(self.rules):
            took = [m.path for m in self.layers if m.rule == i]
            name = rule.observer if isinstance(rule.observer, str) else \
                getattr(rule.observer, "__name__", "custom")
            if not rule.quantizes:
                what = "float (excluded)"
            else:
                what = (f"weight {describe_spec(rule.weight)}, input "
                        f"{describe_spec(rule.act, act=True)}")
                if rule.dynamic_act:
                    what += " (per block, calibrated on each call)"
                elif rule.act is not None and not rule.lsq:
                    what += f" ({name} observer)"
                what += ", LSQ" if rule.lsq else ""
            if rule.attention is not None:
                what = "" if not rule.quantizes else what + "; "
                what += (f"attention q.k^T and probs.v operands "
                         f"{describe_spec(rule.attention, act=True)} ({name} observer)")
            layers = f"{len(took)} layer(s) [{', '.join(sorted(kinds(i)))}]: {paths(took)}" \
                if took else "no layer (unmatched)"
            lines.append(f"#{i} {rule.module_path!r}: {what} -> {layers}")
        free = [m.path for m in self.layers if m.rule is None]
        if free:
            lines.append(f"no rule, float: {paths(free)}")
        if self.skipped:
            lines.append(f"normalization layers, float: {paths(p for p, _ in self.skipped)}")
        return "\n".join(lines)

    def warning(self) -> str | None:
        """A message naming the rules that took no layer, or ``None``."""
        if not self.unmatched:
            return None
        names = ", ".join(f"#{i} {self.rules[i].module_path!r}" for i in self.unmatched)
        return f"quantize_model: rule(s) {names} matched no layer."

    @classmethod
    def collect(cls, rules, entries) -> QuantReport:
        """A report from ``(path, class name, rule index, kind)`` entries
        (``kind is None``: a skipped normalization layer; ``"excluded"``: a layer
        quantize_model cannot cover, taken by an exclusion rule); repeated paths once."""
        layers, skipped, seen = [], [], set()
        for path, name, index, kind in entries:
            if path in seen:
                continue
            seen.add(path)
            if kind is None:
                skipped.append((path, name))
            elif kind == "attention":  # an attention module whose products are quantized
                layers.append(LayerMatch(path, name, index, True))
            else:  # a covered layer, or an uncoverable one that a rule excludes
                quantized = index is not None and rules[index].quantizes
                layers.append(LayerMatch(path, name, index, quantized))
        return cls(tuple(rules), tuple(layers), tuple(skipped))
