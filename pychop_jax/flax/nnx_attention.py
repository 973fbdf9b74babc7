"""The nnx half of ``attention``: ``AttentionQuant``, an ``nnx.MultiHeadAttention``'s
quantizing ``attention_fn`` (see ``pychop_jax.flax.attention`` for the formulas)."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import attention as nnx_attention
from flax.nnx.nn import dtypes

from . import qat
from .attention import OPERANDS, AttentionPlan, range_name
from .nnx import QuantStats
from .rules import QuantRule

__all__ = ["AttentionQuant", "install_nnx", "is_attention", "freeze"]


def is_attention(module) -> bool:
    """Whether ``module`` is an ``nnx.MultiHeadAttention`` (``attention=`` applies)."""
    return isinstance(module, nnx.MultiHeadAttention)


class AttentionQuant(nnx.Module):
    """An ``nnx.MultiHeadAttention``'s ``attention_fn``: Flax's
    ``dot_product_attention_weights`` with a ``promote_dtype`` that fake-quantizes ``q``
    and ``k``, then ``fq(probs) . fq(v)``; one ``QuantStats`` range per operand,
    updated while ``use_running_average`` is False (``train()``), frozen after
    ``eval()``.

    Args:
      plan: the rule's ``AttentionPlan``.
      path: the attention module's path.
    """

    def __init__(self, plan: AttentionPlan, path: str = ""):
        self.plan = plan
        self.path = path
        self.use_running_average = False
        self.initializing = False  # quantize_model's sample call observes nothing
        for name in OPERANDS:
            setattr(self, range_name(name), QuantStats(plan.init_range()))

    def _quantize(self, name, x):
        var = getattr(self, range_name(name))
        train = not (self.use_running_average or self.initializing)
        y, new = qat.observed_fake_quant(x, var.get_value(), self.plan.spec, self.plan.observer,
                                         train=train)
        if train:
            var.set_value(new)
        return y

    def __call__(self, query, key, value, bias=None, mask=None, broadcast_dropout=True,
                 dropout_rng=None, dropout_rate=0.0, deterministic=False, dtype=None,
                 precision=None, module=None, promote_dtype=dtypes.promote_dtype,
                 is_causal=False):
        query, key, value = promote_dtype((query, key, value), dtype=dtype)

        def quantize_qk(operands, dtype=None):
            q, k = promote_dtype(operands, dtype=dtype)
            return self._quantize("query", q), self._quantize("key", k)

        probs = nnx_attention.dot_product_attention_weights(
            query, key, bias, mask, broadcast_dropout, dropout_rng, dropout_rate,
            deterministic, dtype, precision, module, promote_dtype=quantize_qk,
            is_causal=is_causal)
        probs, value = self._quantize("probs", probs), self._quantize("value", value)
        if probs.shape[-3] != value.shape[-2]:  # grouped-query attention, as Flax does it
            q_heads, v_heads = probs.shape[-3], value.shape[-2]
            probs = probs.reshape(probs.shape[:-3] + (v_heads, q_heads // v_heads)
                                  + probs.shape[-2:])
            out = jnp.einsum("...hgqk,...kh1d->...qhgd", probs, jnp.expand_dims(value, -2),
                             precision=precision)
            return out.reshape(out.shape[:-3] + (q_heads, out.shape[-1]))
        return jnp.einsum("...hqk,...khd->...qhd", probs, value, precision=precision)


def install_nnx(layer, rule: QuantRule, path: str = "") -> None:
    """Set ``layer.attention_fn`` (an ``nnx.MultiHeadAttention``) to an
    ``AttentionQuant`` of ``rule``'s plan.

    Raises:
      ValueError: the layer's attention function is not Flax's ``dot_product_attention``
        (a custom one has no hook), or it is quantized already.
    """
    if isinstance(layer.attention_fn, AttentionQuant):
        raise ValueError(f"quantize_model: {path!r} is quantized already.")
    if layer.attention_fn is not nnx.dot_product_attention:
        raise ValueError(
            f"quantize_model: {path!r} ({type(layer).__name__}) has a custom attention_fn "
            f"({getattr(layer.attention_fn, '__name__', layer.attention_fn)!r}); attention= "
            "quantizes Flax's nnx.dot_product_attention only. Drop attention= from the rule.")
    slot = AttentionQuant(AttentionPlan.from_rule(rule), path)
    delattr(layer, "attention_fn")  # a static function becomes a data node
    layer.attention_fn = nnx.data(slot)


def freeze(model) -> None:
    """Freeze the ranges of every ``AttentionQuant`` in ``model`` (``serve_model``: a
    served copy evaluates, whatever mode the quantized model was in)."""
    for _, m in nnx.iter_modules(model):
        if isinstance(m, AttentionQuant):
            m.use_running_average = True
