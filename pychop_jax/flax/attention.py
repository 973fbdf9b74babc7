"""Quantized attention products: ``q k^T`` and ``probs v`` as activation x activation
fake-quantized matmuls, for ``QuantRule(attention=spec)`` (``quantize_model``).

For an attention module a rule with ``attention`` matches, the four operands of its
two products are fake-quantized with ``spec`` (per tensor), each with its own
observed range (``qat.observed_fake_quant``: the rule's observer updates it in
training / calibration, frozen in evaluation; a range that has seen nothing uses the
batch's estimate), and the products are then the model's own float einsums of the
quantized values::

    logits = einsum('...qhd,...khd->...hqk', fq(q'), fq(k))     q' = q / sqrt(d)  (linen)
    probs  = softmax(mask(logits))  (dropout)                   q' = q            (nnx)
    out    = einsum('...hqk,...khd->...qhd', fq(probs), fq(v))

``fq`` has the clipped straight-through gradient, so QAT gradients reach the q / k /
v projections.  The hooks are Flax's own override points:

* linen ``nn.MultiHeadDotProductAttention`` (and subclasses such as ``SelfAttention``):
  the module is re-called as a clone whose ``qk_attn_weights_einsum_cls`` and
  ``attn_weights_value_einsum_cls`` build ``LinenAttentionEinsum`` s, which Flax's
  ``dot_product_attention`` calls for its two einsums; ``q'`` is the query already
  divided by ``sqrt(depth)`` there.  The ranges are the variables
  ``quant_stats/<module>/attn_{query,key,probs,value}_range``.
* nnx ``nnx.MultiHeadAttention``: its ``attention_fn`` becomes an ``AttentionQuant``
  module (``nnx_attention``; on the ``quantize_model`` copy), which runs Flax's
  ``dot_product_attention_weights`` with a ``promote_dtype`` that quantizes ``q`` and
  ``k`` (before the ``1 / sqrt(depth)`` scaling, which Flax applies after that hook)
  and then ``fq(probs) . fq(v)`` (grouped-query attention included).  Its
  ``QuantStats`` follow ``train()`` / ``eval()``.

A module whose attention function has no such hook (a custom ``attention_fn``), or
whose einsums are already overridden, raises ``ValueError``; so does a linen module
with ``precision`` set (Flax rejects it together with einsum overrides).

Serving (``serve_model``) keeps these products as the same fake quantization with the
frozen ranges (float einsums of quantized values), not as integer einsums: their
operands change every call, so an integer product would quantize both at run time,
and at these sizes the float einsum is not the bottleneck.  linen stores the frozen
per-operand ``(scale, zero_point)`` in the served variables' ``quant_attention``
collection (``served_states``); nnx keeps the ``AttentionQuant`` in eval mode.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..core import observers
from ..core.ops import calibrate, fake_quant
from ..core.spec import QuantSpec
from ..core.state import QuantState
from . import qat
from .rules import QuantRule

__all__ = ["OPERANDS", "AttentionPlan", "LinenAttentionEinsum", "quantized_linen_attention",
           "is_quantized_linen_attention", "range_name", "served_name", "served_states",
           "ServedAttention", "SERVED", "serve_linen", "intercepting"]

#: the quantized operands: q and k of q.k^T, probs and v of probs.v
OPERANDS = ("query", "key", "probs", "value")
#: linen collection of a served model's frozen attention quantizers
SERVED = "quant_attention"
_STATS = "quant_stats"


def range_name(operand: str) -> str:
    """The ``quant_stats`` variable of an operand's observed range."""
    return f"attn_{operand}_range"


@dataclasses.dataclass(frozen=True)
class AttentionPlan:
    """The operand spec and observer of a rule with ``attention``."""

    spec: QuantSpec
    observer: Callable

    @classmethod
    def from_rule(cls, rule: QuantRule) -> AttentionPlan:
        return cls(rule.attention_spec(), rule.observer_fn())

    def init_range(self):
        return qat.init_stats(self.spec)


# ==== linen ===================================================================================
class LinenAttentionEinsum:
    """One of Flax's attention einsums (``einsum(subscripts, a, b)``) with both operands
    fake-quantized, their ranges held in ``scope`` (the attention module's)."""

    def __init__(self, plan: AttentionPlan, scope, names: tuple[str, str]):
        self.plan, self.scope, self.names = plan, scope, names

    def _quantize(self, name, x):
        stats = self.scope.variable(_STATS, range_name(name), self.plan.init_range)
        train = (self.scope.is_mutable_collection(_STATS)
                 and not self.scope.get_flag("initializing", False))
        y, new = qat.observed_fake_quant(x, stats.value, self.plan.spec, self.plan.observer,
                                         train=train)
        if train:
            stats.value = new
        return y

    def __call__(self, subscripts, a, b, **kwargs):
        a, b = self._quantize(self.names[0], a), self._quantize(self.names[1], b)
        return jnp.einsum(subscripts, a, b, **kwargs)


class _EinsumFactory:
    """A ``*_einsum_cls`` field value: builds the einsum when the module calls it."""

    def __init__(self, make: Callable, plan: AttentionPlan | None):
        self.make, self.plan = make, plan

    def __call__(self):
        return self.make()


def _check_linen(module, path: str) -> None:
    params = inspect.signature(module.attention_fn).parameters
    if not {"qk_attn_weights_einsum", "attn_weights_value_einsum"} <= set(params):
        raise ValueError(
            f"quantize_model: {path!r} ({type(module).__name__}) has an attention_fn "
            f"({getattr(module.attention_fn, '__name__', module.attention_fn)!r}) without "
            "Flax's qk_attn_weights_einsum / attn_weights_value_einsum arguments, so its "
            "products cannot be quantized. Use nn.dot_product_attention, or drop "
            "attention= from the rule.")
    if module.qk_attn_weights_einsum_cls or module.attn_weights_value_einsum_cls:
        raise ValueError(f"quantize_model: {path!r} already overrides its attention einsums "
                         "(qk_attn_weights_einsum_cls / attn_weights_value_einsum_cls); "
                         "drop attention= from the rule.")
    if module.precision is not None:
        raise ValueError(f"quantize_model: {path!r} sets precision={module.precision!r}, "
                         "which Flax's dot_product_attention rejects together with einsum "
                         "overrides; drop precision or attention= from the rule.")


def quantized_linen_attention(module, rule_or_plan, path: str = "", make_einsum=None):
    """A clone of ``module`` (in its own, rewound scope) whose two attention einsums
    quantize their operands; ``make_einsum(scope, names)`` builds each einsum
    (default: ``LinenAttentionEinsum`` with the rule's plan)."""
    _check_linen(module, path)
    scope = module.scope.rewound()
    plan = rule_or_plan if isinstance(rule_or_plan, AttentionPlan) else \
        AttentionPlan.from_rule(rule_or_plan)
    if make_einsum is None:
        def make_einsum(scope, names):
            return LinenAttentionEinsum(plan, scope, names)

    return module.clone(
        parent=scope,
        qk_attn_weights_einsum_cls=_EinsumFactory(lambda: make_einsum(scope, OPERANDS[:2]),
                                                  plan),
        attn_weights_value_einsum_cls=_EinsumFactory(lambda: make_einsum(scope, OPERANDS[2:]),
                                                     plan))


def is_quantized_linen_attention(module) -> bool:
    """Whether ``module`` is an attention module whose einsums this module set."""
    return isinstance(module, nn.MultiHeadDotProductAttention) and isinstance(
        module.qk_attn_weights_einsum_cls, _EinsumFactory)


def served_name(operand: str) -> str:
    """The ``quant_attention`` entry of an operand's frozen quantizer."""
    return f"attn_{operand}"


def served_states(stats_node: dict, plan: AttentionPlan) -> dict:
    """The frozen ``{attn_<operand>: {"scale", "zero_point"}}`` of a module's observed
    ranges (``stats_node``: its ``quant_stats`` subtree); operands whose range has seen
    nothing are left out (they calibrate per call, as the QAT evaluation does)."""
    out = {}
    for name in OPERANDS:
        stats = stats_node.get(range_name(name))
        if stats is not None and int(stats.count) > 0:
            state = observers.quant_state(stats, plan.spec)
            out[served_name(name)] = {"scale": state.scale, "zero_point": state.zero_point}
    return out


class ServedAttention:
    """A served linen attention einsum: operands fake-quantized with the stored frozen
    states (``quant_attention`` collection), or calibrated per call without one."""

    def __init__(self, spec: QuantSpec, scope, names: tuple[str, str]):
        self.spec, self.scope, self.names = spec, scope, names

    def _quantize(self, name, x):
        if self.scope.has_variable(SERVED, served_name(name)):
            s = self.scope.get_variable(SERVED, served_name(name))
            state = QuantState(s["scale"], s["zero_point"], self.spec)
        else:
            state = calibrate(x, self.spec)
        return fake_quant(x, state)

    def __call__(self, subscripts, a, b, **kwargs):
        a, b = self._quantize(self.names[0], a), self._quantize(self.names[1], b)
        return jnp.einsum(subscripts, a, b, **kwargs)


def _attention_plans(qmodel, variables, args, kwargs) -> dict[str, AttentionPlan]:
    """Path -> plan of every quantized attention module one evaluation call reaches."""
    plans = {}

    def record(next_fun, call_args, call_kwargs, context):
        if is_quantized_linen_attention(context.module):
            plans["/".join(context.module.path)] = context.module.qk_attn_weights_einsum_cls.plan
        return next_fun(*call_args, **call_kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda v: qmodel.apply(v, *args, **kwargs), variables)
    return plans


def serve_linen(qmodel, variables, args, kwargs):
    """``(interceptor, collections)`` for ``serve_model``'s linen path: the served
    model's attention modules run their products with the stored frozen quantizers;
    ``collections`` is ``{"quant_attention": ...}`` (``{}`` when no attention module is
    quantized; then ``interceptor`` is ``None``)."""
    plans = _attention_plans(qmodel, variables, args, kwargs)
    if not plans:
        return None, {}
    stats = variables.get(_STATS, {})
    served = {}
    for path, plan in plans.items():
        node, target = stats, served
        for key in path.split("/"):
            node = node.get(key, {}) if hasattr(node, "get") else {}
            target = target.setdefault(key, {})
        target.update(served_states(node, plan))

    def interceptor(next_fun, call_args, call_kwargs, context):
        module = context.module
        plan = plans.get("/".join(module.path))
        if plan is None or context.method_name != "__call__" \
                or is_quantized_linen_attention(module):
            return next_fun(*call_args, **call_kwargs)
        clone = quantized_linen_attention(
            module, plan, make_einsum=lambda scope, names: ServedAttention(plan.spec, scope,
                                                                           names))
        return clone(*call_args, **call_kwargs)

    return interceptor, {SERVED: served}


@contextlib.contextmanager
def intercepting(interceptor):
    """``nn.intercept_methods(interceptor)``, or nothing for ``None``."""
    if interceptor is None:
        yield
    else:
        with nn.intercept_methods(interceptor):
            yield
