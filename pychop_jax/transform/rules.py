"""Quantization rules over module paths, and the report of what they quantized.

A ``QuantRule`` says how the weights of the modules whose path it matches are
quantized, and their matmuls' inputs::

    rules = [
        QuantRule("head"),                                   # leave the head in float
        QuantRule(".*attn/(query|key|value)", weight=8, act=8),
        QuantRule(".*", weight=QuantSpec(bits=4, symmetric=True, axis=0, group_size=32)),
    ]

**Weights, found by dataflow** (``pychop_jax.transform.dataflow``): a weight is a
parameter that reaches an operand of a matmul (``lax.dot_general``, and so ``jnp.einsum``
/ ``jnp.dot`` / ``@`` / ``jnp.matmul`` / ``jnp.tensordot``) or the kernel of a
``lax.conv_general_dilated``, on either side, through views (transpose, reshape, astype,
slicing, indexing, broadcasting, a scan's per-iteration slice); or a table gathered by
data-dependent indices (an embedding lookup: weight-only).  Norm scales, biases and
constants reach no matmul and stay float; nothing is refused for being an unknown
layer.

* ``module_path`` is a regular expression matched with ``re.fullmatch`` against the
  weight's **module path**: the path of the module that owns the parameter, i.e. its
  path in the parameter tree without the parameter's own name, components joined with
  ``"/"`` (linen: ``"blocks_0/attn/query"`` for ``params["blocks_0"]["attn"]["query"]
  ["kernel"]``; nnx: the attribute path, list indices included, ``"blocks/0/attn/
  query"``; Equinox: ``"layers/0"``; a function ``f(params, x)``: the parent path in
  ``params``, ``""`` for a top-level leaf).  Full match, as Qwix does: ``"dense"``
  matches the module ``dense`` only, ``".*dense"`` any path ending in it.
* The **first** rule that matches decides; later rules are not consulted.  A rule with
  ``weight=None`` and ``act=None`` therefore keeps what it matches float.
* ``weight``: the weight's quantizer, relative to the matmul that uses it, whatever the
  storage layout:

  - an int ``b``: ``b``-bit symmetric, one scale per **output channel**: per element of
    the weight's axes that its matmul does not contract (``(in, out)`` kernels: per
    ``out``; GPT-2's transposed ``(out, in)``: per ``out``; an einsum kernel ``(d, heads,
    head_dim)``: per ``(head, head_dim)``; a scanned stack ``(layers, in, out)``: per
    ``(layer, out)``; an embedding table ``(vocab, d)``: per row);
  - a ``QuantSpec`` gives the grid (bits, symmetric, element format, scale format); its
    granularity is read the same way: ``axis=None`` one scale per tensor; any other
    ``axis`` one scale per output channel; with ``group_size=g``, groups of ``g``
    consecutive elements along the **contracted** axis (the last contracted axis in
    storage order when the matmul contracts several), one scale per group and output
    channel -- MX / NVFP4 blocks lie there too; an axis no longer than ``g`` is one
    group.  So the same rule means the same thing on every layer.  A group size that
    does not divide a longer axis raises ``ValueError`` naming the weight, the op and
    the shapes;
  - ``None`` keeps the weight float.

  A weight used by several matmuls (a tied embedding's lookup and output projection)
  is quantized once, and every use sees the same codes; its output channels are the
  axes none of its uses contracts.
* ``act``: the quantizer of each matmul's *other* operand (the input), a ``QuantSpec``
  or an int ``b`` (``b``-bit affine per tensor); ``None`` keeps it float.  Two kinds:

  - **per tensor** (``axis=None``; integer grids, fp8, ...): one range per matmul,
    tracked by ``observer`` in training and frozen at evaluation (``quant_stats``);
    inside a scanned stack, one range per layer;
  - **per block** (``group_size``: ``pj.formats.MXFP8_E4M3`` / ``MXFP4`` / ``NVFP4`` /
    ``MXINT8`` as they are, or any spec with ``axis=-1, group_size=g``): blocks of
    ``g`` consecutive features along the input's **last axis**, which the matmul must
    contract; quantized *dynamically*, on each call, training and evaluation alike
    (``qat.input_fake_quant``), as MX / NVFP4 hardware computes its scales; no range
    is kept.  A block at least as long as the last axis is the whole row: one scale
    per token (``pj.formats.INT8_PER_TOKEN``).  Not with ``lsq``.

  Per-channel input specs (``axis`` without ``group_size``) are refused.  An embedding
  lookup's input is integer ids: ``act`` applies to its table's matmul uses only.
* ``observer``: how a per-tensor input range is tracked, one of ``"minmax"``, ``"ema"``,
  ``"percentile"``, ``"mse"`` (the ``pychop_jax.observers`` of that name, default
  options) or any observer callable ``observer(stats, x, spec) -> stats``.
* ``lsq``: learn the step sizes (and affine zero points) of weight and inputs (LSQ /
  LSQ+) instead of calibrating / observing them.
* ``method``: a post-training algorithm that replaces round-to-nearest for the weight
  (a ``QuantMethod``: ``pychop_jax.algorithms.GPTQ`` / ``AWQ`` / ``SmoothQuant`` /
  ``HQQ``).  It runs in ``pychop_jax.calibrate_model``; until then the weight is
  quantized by round-to-nearest.  Not combined with ``lsq``.
* ``attention``: the quantizer of both operands of the **activation x activation**
  matmuls of the modules the rule matches (attention's ``q k^T`` and ``probs v``): a
  per-tensor ``QuantSpec`` or an int ``b`` (``b``-bit affine, as ``act``), each operand
  with its own range, tracked by ``observer``.  Such a product belongs to the deepest
  module that owns the weights its operands come from (``q`` from ``attn/query``, ``k``
  from ``attn/key``: the product's module is ``attn``).  A rule with only ``attention``
  keeps the weights it matches float (first match decides).
* ``kv_cache``: the format of the key / value caches the modules the rule matches write
  (a model-state collection updated by ``dynamic_update_slice`` whose contents the
  attention products read: linen's ``cache`` collection, nnx ``Cache`` variables): an
  int ``b`` (``b``-bit symmetric, one scale per (token, head), i.e. per element of every
  axis but the last), or a ``QuantSpec`` (``dtype="float8_e4m3fn"``: fp8 per (token,
  head); with ``group_size=g``: groups of ``g`` along the last axis, head_dim).  Each
  appended token is quantized once, when it is written; served models store the codes
  and scales (``serve_model``), the QAT model the fake-quantized values.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence

from ..core import observers
from ..core.spec import QuantSpec
from .methods import QuantMethod

__all__ = ["QuantRule", "QuantReport", "OpReport", "OBSERVERS", "first_match", "describe_spec",
           "describe_rule"]

#: observer names a rule accepts
OBSERVERS: dict[str, Callable] = {
    "minmax": observers.minmax,
    "ema": observers.ema,
    "percentile": observers.percentile,
    "mse": observers.mse,
}

def _spec(value, field: str, shorthand: Callable[[int], QuantSpec]):
    if value is None or isinstance(value, QuantSpec):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        shorthand(value)  # validates the bit width now
        return value
    raise TypeError(f"QuantRule.{field} must be a QuantSpec, an int (bits) or None; "
                    f"got {value!r}.")


@dataclasses.dataclass(frozen=True)
class QuantRule:
    """How the weights of the modules whose path matches ``module_path`` are
    quantized, and their matmuls' inputs (see the module docstring).

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
    kv_cache: QuantSpec | int | None = None

    def __post_init__(self):
        re.compile(self.module_path)
        _spec(self.weight, "weight", lambda b: QuantSpec(bits=b, symmetric=True))
        _spec(self.act, "act", lambda b: QuantSpec(bits=b))
        _spec(self.attention, "attention", lambda b: QuantSpec(bits=b))
        _spec(self.kv_cache, "kv_cache", lambda b: QuantSpec(bits=b, symmetric=True))
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

    def weight_template(self) -> QuantSpec | None:
        """The weight's spec before it meets a weight (an int becomes symmetric per
        output channel); ``plan.weight_spec`` lays it on one."""
        if isinstance(self.weight, int):
            return QuantSpec(bits=self.weight, symmetric=True, axis=-1)
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

    def kv_cache_spec(self, ndim: int) -> QuantSpec | None:
        """The cache's spec for a cache of rank ``ndim`` (see the module docstring)."""
        spec = self.kv_cache
        if spec is None:
            return None
        if isinstance(spec, int):
            spec = QuantSpec(bits=spec, symmetric=True)
        if spec.group_size is not None:
            return dataclasses.replace(spec, axis=ndim - 1)
        return dataclasses.replace(spec, axis=tuple(range(ndim - 1)) if ndim > 2
                                   else 0 if ndim == 2 else None)

    def observer_fn(self) -> Callable:
        return OBSERVERS[self.observer] if isinstance(self.observer, str) else self.observer


def describe_spec(spec: QuantSpec | int | None, act: bool = False,
                  resolved: bool = False) -> str:
    """A rule's ``weight`` / ``act`` in words: ``"float"``, ``"int8 symmetric per output
    channel"``, ``"int4 symmetric, groups of 32 along the contraction"``, ``"int8 affine
    per tensor"``, ``"float4_e2m1fn (E8M0 scales), groups of 32 along the contraction"``,
    ``"int4 symmetric, groups of 32 along the contraction, float16 scales"``, ...
    ``resolved``: a spec laid on a weight (its storage axes: ``"per channel (axes (1,
    2))"``, ``"axis 0, groups of 32"``)."""
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
    elif act:
        along = "the last axis" if spec.axis == -1 else f"axis {spec.axis}"
        where = f"blocks of {spec.group_size} along {along}"
    elif not resolved:
        where = "per output channel" if spec.group_size is None else \
            f"groups of {spec.group_size} along the contraction"
    elif spec.group_size is None:
        where = f"per channel (axis {spec.axis})" if not spec.multi_axis else \
            f"per channel (axes {spec.axis})"
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


def first_match(rules: Sequence[QuantRule], path: str) -> int | None:
    """Index of the first rule matching ``path``, or ``None``."""
    for i, rule in enumerate(rules):
        if rule.matches(path):
            return i
    return None


@dataclasses.dataclass(frozen=True)
class OpReport:
    """One matmul (or lookup) the transform found.

    Attributes:
      module: the module path the rules matched.
      primitive: ``"dot_general"``, ``"conv_general_dilated"`` or ``"gather"``.
      kind: ``"weight"`` (a weight's matmul), ``"lookup"`` (an embedding lookup),
        ``"product"`` (activation x activation), ``"cache"`` (a write into a KV cache)
        or ``"float"`` (never quantizable).
      weight: the weight's parameter path (``None`` for products / float ops).
      shape: the weight's shape (products: the operands' shapes).
      contracted: the weight's axes the op contracts.
      rule: the index of the rule that took it (``None``: no rule matched).
      quantized: whether it is quantized.
      what: what is quantized, in words (``"weight int8 symmetric per channel ...,
        input int8 affine per tensor"``), or why it stays float.
      stack: lengths of the enclosing scans (one state per layer of a scanned stack).
      weight_spec: the weight's ``QuantSpec`` laid on its storage axes (``None``: float).
      input_spec: the input's (products: each operand's) ``QuantSpec`` (``None``: float).
    """

    module: str
    primitive: str
    kind: str
    weight: str | None
    shape: tuple
    contracted: tuple
    rule: int | None
    quantized: bool
    what: str
    stack: tuple = ()
    weight_spec: QuantSpec | None = None
    input_spec: QuantSpec | None = None


@dataclasses.dataclass(frozen=True)
class QuantReport:
    """What the rules quantize in one traced model: every op found, all at once.

    Attributes:
      rules: the rules, in order.
      ops: every weight matmul, lookup and activation product, in trace order, and
        every matmul that stays float whatever the rules say (with the reason).
    """

    rules: tuple[QuantRule, ...]
    ops: tuple[OpReport, ...]

    @property
    def unmatched(self) -> tuple[int, ...]:
        """Indices of the rules that took no op."""
        used = {o.rule for o in self.ops}
        return tuple(i for i in range(len(self.rules)) if i not in used)

    @property
    def quantized(self) -> tuple[OpReport, ...]:
        return tuple(o for o in self.ops if o.quantized)

    @property
    def left_float(self) -> tuple[OpReport, ...]:
        return tuple(o for o in self.ops if not o.quantized)

    def weights(self) -> dict[str, OpReport]:
        """Weight path -> its first op."""
        out = {}
        for o in self.ops:
            if o.weight is not None and o.kind in ("weight", "lookup"):
                out.setdefault(o.weight, o)
        return out

    def summary(self, max_paths: int = 3) -> str:
        """The report as text: one line per rule (what it quantizes, the ops it took),
        then the ops no rule took and the ops left float, with their reasons."""
        def paths(items):
            items = list(dict.fromkeys(items))
            shown = ", ".join(items[:max_paths])
            more = len(items) - max_paths
            return shown + (f", ... (+{more})" if more > 0 else "")

        lines = []
        for i, rule in enumerate(self.rules):
            took = [o for o in self.ops if o.rule == i]
            if not rule.quantizes and rule.attention is None and rule.kv_cache is None:
                what = "float (excluded)"
            else:
                what = describe_rule(rule)
            names = [o.weight or f"{o.module or '<root>'} ({o.kind})" for o in took]
            ops = f"{len(took)} op(s): {paths(names)}" if took else "no op (unmatched)"
            lines.append(f"#{i} {rule.module_path!r}: {what} -> {ops}")
        free = [o for o in self.ops if o.rule is None and o.kind != "float"]
        if free:
            lines.append("float, no rule quantizes them: "
                         + paths(o.weight or f"{o.module or '<root>'} ({o.kind})" for o in free))
        for o in self.ops:
            if o.kind == "float":
                lines.append(f"float {o.primitive} in {o.module or '<root>'!r}: {o.what}")
        return "\n".join(lines)

    def warning(self) -> str | None:
        """A message naming the rules that took nothing, or ``None``."""
        if not self.unmatched:
            return None
        names = ", ".join(f"#{i} {self.rules[i].module_path!r}" for i in self.unmatched)
        return f"quantize_model: rule(s) {names} matched no op."


def describe_rule(rule: QuantRule) -> str:
    """What a rule quantizes, in words."""
    name = rule.observer if isinstance(rule.observer, str) else \
        getattr(rule.observer, "__name__", "custom")
    parts = []
    if rule.quantizes:
        what = f"weight {describe_spec(rule.weight)}, input {describe_spec(rule.act, act=True)}"
        if rule.dynamic_act:
            what += " (per block, calibrated on each call)"
        elif rule.act is not None and not rule.lsq:
            what += f" ({name} observer)"
        what += ", LSQ" if rule.lsq else ""
        if rule.method is not None:
            what += f", {rule.method.name}"
        parts.append(what)
    if rule.attention is not None:
        parts.append(f"activation products {describe_spec(rule.attention, act=True)} "
                     f"({name} observer)")
    if rule.kv_cache is not None:
        parts.append(f"KV cache {_describe_cache(rule.kv_cache)}")
    return "; ".join(parts)


def _describe_cache(spec) -> str:
    if isinstance(spec, int):
        return f"int{spec} per (token, head)"
    grid = spec.dtype or f"int{spec.bits}"
    if spec.group_size is not None:
        return f"{grid}, groups of {spec.group_size} along head_dim"
    return f"{grid} per (token, head)"
