"""``serve_model``: from a ``quantize_model`` model to codes + scales.

::

    served_fn, served_vars = serve_model(qmodel, variables, x)   # linen (x: sample call)
    logits = jax.jit(served_fn)(served_vars, x)
    save_quantized(path, served_vars); served_vars = load_quantized(path)

    served = serve_model(qmodel)                                # nnx: a served copy
    logits = served(x)

Every quantized layer's kernel becomes (``served_kernel``)

* an ``IntKernel`` (a rule with ``weight`` and ``act``): the kernel's codes and
  scales, quantized exactly as the QAT layer fake-quantizes it (calibrated, or its
  learned LSQ step size), plus the static quantizer of its input (the observer's
  frozen range, or the learned step size; ``None`` -- calibrate per call -- while the
  observer has seen nothing, which is what the QAT evaluation does for ``minmax`` /
  ``ema``);
* a ``QuantizedArray`` (a weight-only rule: int8 per channel, int4 per group, fp8,
  MXFP4, NVFP4, NF4 (``pychop_jax.formats``), ...).

Codes of 4 bits or fewer are stored packed and unpacked inside the computation
(``served_fn`` unpacks the variables first, ``Embed`` tables excepted: linen checks a
kernel's shape against the layer's).

How the served layers compute:

* ``Dense`` / ``DenseGeneral`` / ``Conv`` / ``Einsum`` (linen and nnx) with an
  ``IntKernel`` (weight + input rules): their op slot set to ``served_ops``'
  ``served_dot_general`` / ``served_conv_general_dilated`` / ``served_einsum`` (linen
  ``Einsum`` has no op slot: the interceptor computes it) and ``promote_dtype`` to
  ``int_matmul.promote_dtype``.  Those take the integer path (``int_dot_general``,
  int32 accumulation) when the kernel's integer scales are constant along the
  contracted axes; a ``dot_general`` of float-format weights and inputs (fp8, MX,
  NVFP4) multiplies their codes (``float_dot_general``); else -- e.g. int4 groups
  along the input axis -- the float path with the input fake-quantized by the stored
  quantizer and the kernel dequantized.
* ``Embed.__call__`` (a lookup): a gather of the rows' codes and scales, only those
  rows dequantized (``served_embed.embed_lookup``; nnx: the served copy's ``Embed``
  is a ``ServedEmbed``; linen keeps the table packed: its ``setup`` is intercepted).
  ``Embed.attend`` with an ``IntKernel`` table: ``served_embed.embed_attend``, the
  integer path for per-row (per-token) scales.
* everything else -- weight-only layers (``Embed.attend`` too), an AWQ / SmoothQuant
  ``ScaledKernel`` of float-format weights -- keeps its float op with ``promote_dtype``
  = ``served_operands``: the input fake-quantized with the stored quantizer (if any),
  the weights dequantized, inside the jitted computation.

linen: the sample call decides which layers are served (pass ``method=`` to serve
another method; ``served_fn`` takes ``method=`` too); a served call that reaches a
layer a rule quantizes but the sample call did not raises ``ValueError``.

Either way the served output equals the QAT model's frozen evaluation up to float
summation order (an ``Embed`` lookup: exactly).  Attention products quantized by a
rule's ``attention`` stay the same fake quantization with the frozen ranges
(``pychop_jax.flax.attention``; linen: the served variables' ``quant_attention``
collection).

A layer whose rule has a ``method`` (GPTQ, AWQ, SmoothQuant, HQQ; run by
``calibrate_model``) is served from its ``MethodResult``: the codes of the
algorithm's kernel on the algorithm's scales (the same ``QuantizedArray`` /
``IntKernel`` as above), wrapped in a ``ScaledKernel`` when the algorithm gives the
input a per-channel factor (AWQ, SmoothQuant), which the served layer applies to
its input first.  A rule that quantizes only the input cannot be served (an integer
product needs integer weights): ``ValueError``.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..core import observers
from ..core.ops import calibrate
from ..core.qarray import QuantizedArray
from ..flax import attention, qat
from ..flax.operands import LayerPlan, kernel_name, roles
from ..flax.quantize_model import LSQ_PARAMS, METHOD, STATS, LinenOperands, QuantizedModel
from ..flax.rules import first_match
from .int_matmul import IntKernel, is_integer_format, promote_dtype
from .scaled_kernel import ScaledKernel, scaled_input
from .served_embed import embed_attend, embed_lookup
from .served_ops import (
    einsum_dimension_numbers,
    int_ready,
    quantized_input,
    served_conv_general_dilated,
    served_dot_general,
    served_einsum,
)

__all__ = ["serve_model", "served_kernel", "served_operands", "int_operands"]

_INT_OPS = {"dense": ("dot_general", served_dot_general),
            "dense_general": ("dot_general", served_dot_general),
            "conv": ("conv_general_dilated", served_conv_general_dilated),
            "einsum": ("einsum_op", served_einsum)}  # nnx; linen: _linen_einsum


def served_kernel(path: str, plan: LayerPlan, kernel, *, input_range=None, weight_step=None,
                  input_step=None, result=None):
    """The served form of one layer's kernel (``IntKernel`` or ``QuantizedArray``,
    packed when <= 4 bits; in a ``ScaledKernel`` for a ``result`` with an input
    scale).  ``input_range`` / ``weight_step`` / ``input_step``: the layer's observed
    ``RangeState`` / learned ``(scale, zero_point)`` s; ``result``: its method's
    ``MethodResult``."""
    if result is not None:
        served = served_kernel(path, plan, result.kernel, input_range=input_range,
                               weight_step=(result.state.scale, result.state.zero_point))
        return served if result.input_scale is None else ScaledKernel(served, result.input_scale)
    if plan.weight is None:
        raise ValueError(f"serve_model: {path!r} quantizes only its input; serving needs "
                         "quantized weights (give its rule a weight spec).")
    if weight_step is None:
        w_state = calibrate(kernel, plan.weight)
    else:  # learned, or a method's (full-shaped) state
        w_state = qat.learned_state(kernel.shape, plan.weight, *weight_step)
    weights = QuantizedArray.quantize(kernel, plan.weight, state=w_state, pack="auto")
    if plan.act is None:
        return weights
    state = None
    if input_step is not None:
        state = qat.learned_state((1,), plan.act, *input_step)
    elif input_range is not None and int(input_range.count) > 0:
        state = observers.quant_state(input_range, plan.act)
    return IntKernel(weights, state, plan.act)


def served_operands(*args, **kwargs):
    """A served layer's ``promote_dtype`` (linen and nnx calling conventions): the
    input fake-quantized with an ``IntKernel``'s stored quantizer (calibrated on the
    input when it has none), the weights dequantized, then ``promote_dtype``."""
    as_tuple = len(args) == 1 and isinstance(args[0], tuple)
    operands = list(args[0] if as_tuple else args)
    i, w = roles(operands)
    kernel = _unscaled(operands, i, w)
    if isinstance(kernel, IntKernel):
        if i is not None:
            operands[i] = quantized_input(operands[i], kernel)
        kernel = kernel.weights
    if isinstance(kernel, QuantizedArray):
        operands[w] = kernel.dequantize()
    promoted = promote_dtype(tuple(operands), **kwargs)
    return promoted if as_tuple else list(promoted)


def _unscaled(operands: list, i, w):
    """A ``ScaledKernel`` operand's inner kernel, the input multiplied by its
    ``input_scale`` (in place in ``operands``); other kernels as they are."""
    kernel = operands[w]
    if isinstance(kernel, ScaledKernel):
        if i is not None:
            operands[i] = scaled_input(operands[i], kernel)
        operands[w] = kernel = kernel.kernel
    return kernel


def int_operands(*args, **kwargs):
    """``promote_dtype`` for an integer-path layer whose kernel is a ``ScaledKernel``:
    the input multiplied by its ``input_scale``, then ``int_matmul.promote_dtype``."""
    as_tuple = len(args) == 1 and isinstance(args[0], tuple)
    operands = list(args[0] if as_tuple else args)
    _unscaled(operands, *roles(operands))
    if as_tuple:
        return promote_dtype(tuple(operands), **kwargs)
    return promote_dtype(*operands, **kwargs)


def _slots(kind: str, kernel) -> dict:
    """The field values that make a stock layer serve ``kernel``."""
    inner = kernel.kernel if isinstance(kernel, ScaledKernel) else kernel
    if isinstance(inner, IntKernel) and kind in _INT_OPS \
            and (inner is kernel or is_integer_format(inner.weights.spec)):
        op_name, op = _INT_OPS[kind]
        slot = int_operands if isinstance(kernel, ScaledKernel) else promote_dtype
        return {op_name: op, "promote_dtype": slot}
    return {"promote_dtype": served_operands}


_SERVED = (QuantizedArray, IntKernel, ScaledKernel)


def _unpacked(tree, keep=frozenset()):
    """``tree`` with its served kernels unpacked, except those at the key paths in
    ``keep`` (tuples of dict keys: linen ``Embed`` tables, gathered while packed)."""
    is_q = lambda a: isinstance(a, _SERVED)  # noqa: E731

    def unpack(path, a):
        if not is_q(a) or tuple(getattr(k, "key", k) for k in path) in keep:
            return a
        return a.unpack()

    return jax.tree_util.tree_map_with_path(unpack, tree, is_leaf=is_q)


# ==== linen ===================================================================================
def _subtree(tree, path: str):
    for key in filter(None, path.split("/")):
        tree = tree.get(key, {}) if hasattr(tree, "get") else {}
    return tree


def _linen_plans(qmodel: QuantizedModel, variables, args, kwargs) -> dict[str, LayerPlan]:
    """Path -> plan of every quantized layer one evaluation call reaches."""
    plans = {}

    def record(next_fun, call_args, call_kwargs, context):
        slot = getattr(context.module, "promote_dtype", None)
        if isinstance(slot, LinenOperands):  # the quantizing clone of a layer
            plans["/".join(context.module.path)] = slot.plan
        return next_fun(*call_args, **call_kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda v: qmodel.apply(v, *args, **kwargs), variables)
    return plans


def _serve_interceptor(next_fun, args, kwargs, context, rules=()):
    module = context.module
    kind = {nn.Dense: "dense", nn.DenseGeneral: "dense_general", nn.Einsum: "einsum",
            nn.Conv: "conv", nn.Embed: "embed"}.get(type(module))
    if kind == "embed" and context.method_name == "setup":
        return _served_embed_setup(next_fun, args, kwargs, module)
    if kind is None or context.method_name not in ("__call__", "attend") \
            or module.promote_dtype in (promote_dtype, served_operands, int_operands):
        return next_fun(*args, **kwargs)
    kernel = module.scope.get_variable("params", kernel_name(kind))
    if not isinstance(kernel, _SERVED):
        _require_not_quantized(rules, "/".join(module.path))
        return next_fun(*args, **kwargs)
    if kind == "embed" and context.method_name == "__call__" \
            and not isinstance(kernel, ScaledKernel):
        return embed_lookup(kernel, *args, dtype=module.dtype,
                            num_embeddings=module.num_embeddings)
    if kind == "embed" and isinstance(kernel, IntKernel):  # attend
        return embed_attend(kernel, *args, dtype=module.dtype)
    if kind == "einsum":  # no op slot: the integer path here, or the float path
        y = _linen_einsum(module, kernel, *args, **kwargs)
        if y is not None:
            return y
        slots = {"promote_dtype": served_operands}
    else:
        slots = _slots(kind, kernel)
    clone = module.clone(parent=module.scope.rewound(), **slots)
    return getattr(clone, context.method_name)(*args, **kwargs)


def _require_not_quantized(rules, path: str) -> None:
    """A served call that reaches a float layer that a rule quantizes: serve_model's
    sample call did not reach it (another method, another branch), so it has no
    served kernel -- raise rather than run it in float."""
    index = first_match(rules, path)
    if index is not None and rules[index].quantizes:
        raise ValueError(
            f"serve_model: the served model reached {path!r}, which rule #{index} "
            "quantizes, but serve_model's sample call did not (so it has no served "
            "kernel). Serve with a sample call that reaches it, e.g. "
            "serve_model(qmodel, variables, *args, method=...) for another method.")


def _linen_einsum(module, kernel, inputs, einsum_str=None):
    """A linen ``Einsum`` (which has no op slot) with an ``IntKernel`` on the integer
    path (``served_ops.served_einsum``), computed here as ``Einsum.__call__`` does:
    promote, contract, add the bias.  ``None`` when the kernel or the einsum cannot
    take the integer path (the caller serves it on the float path)."""
    inner = kernel.kernel if isinstance(kernel, ScaledKernel) else kernel
    if not isinstance(inner, IntKernel):
        return None
    if einsum_str is not None and module.einsum_str is not None:
        raise ValueError("Einsum: einsum_str given both as an attribute and an argument.")
    equation = (einsum_str or module.einsum_str or "").replace(" ", "")
    parsed = einsum_dimension_numbers(equation, jnp.ndim(inputs), len(inner.shape))
    if parsed is None or not int_ready(inner, parsed[0][0][1]):
        return None
    bias = module.scope.get_variable("params", "bias") if module.use_bias else None
    operands = [inputs, kernel, bias]
    if isinstance(kernel, ScaledKernel):
        operands = list(int_operands(*operands, dtype=module.dtype))
    else:
        operands = list(promote_dtype(*operands, dtype=module.dtype))
    y = served_einsum(equation, operands[0], operands[1], precision=module.precision,
                      preferred_element_type=module.preferred_element_type)
    if bias is not None:  # Einsum's bias: the output axes that come from the kernel
        rhs, out = equation.split("->")[0].split(",")[1], equation.split("->")[1]
        shape = [inner.shape[rhs.index(c)] if c in rhs else 1 for c in out]
        y = y + jnp.reshape(operands[2], shape)
    return y


def _served_embed_setup(next_fun, args, kwargs, module):
    """``nn.Embed.setup`` with a served table: the table as it is stored (packed codes
    too; ``Embed.setup``'s ``self.param`` would check the packed codes' shape against
    the table's), else the stock setup."""
    scope = module.scope
    if scope.has_variable("params", "embedding"):
        table = scope.get_variable("params", "embedding")
        if isinstance(table, _SERVED):
            module.embedding = table
            return None
    return next_fun(*args, **kwargs)


def _serve_linen(qmodel: QuantizedModel, variables, *args, **kwargs):
    plans = _linen_plans(qmodel, variables, args, kwargs)
    params = _as_dicts(variables["params"])  # a copy to edit
    stats, lsq = variables.get(STATS, {}), variables.get(LSQ_PARAMS, {})
    methods = variables.get(METHOD, {})
    for path, plan in plans.items():
        node = _subtree(params, path)
        name = kernel_name(plan.kind)
        learned = _subtree(lsq, path)
        node[name] = served_kernel(
            path, plan, node[name], input_range=_subtree(stats, path).get("input_range"),
            weight_step=_step(learned, "weight") if plan.learns_weight else None,
            input_step=_step(learned, "input") if plan.learns_input else None,
            result=_subtree(methods, path).get("result"))
    model = qmodel.float_model
    tables = frozenset(("params", *filter(None, path.split("/")), "embedding")
                       for path, plan in plans.items() if plan.kind == "embed")
    attn, attn_vars = attention.serve_linen(qmodel, variables, args, kwargs)

    def served_fn(served_vars, *call_args, **call_kwargs):
        with nn.intercept_methods(functools.partial(_serve_interceptor, rules=qmodel.rules)), \
                attention.intercepting(attn):
            return model.apply(_unpacked(served_vars, tables), *call_args, **call_kwargs)

    return served_fn, {"params": params, **attn_vars}


def _step(learned, prefix: str):
    return learned[f"{prefix}_scale"], learned.get(f"{prefix}_zero_point")


def _as_dicts(tree):
    if hasattr(tree, "items"):
        return {k: _as_dicts(v) for k, v in tree.items()}
    return tree


# ==== nnx ======================================================================================
def _serve_nnx(qmodel):
    from flax import nnx

    from ..flax import nnx_attention
    from ..flax.nnx_model import OperandQuant
    from .served_nnx_embed import ServedEmbed

    served = nnx.clone(qmodel)
    nnx_attention.freeze(served)  # attention products: the frozen fake quantization
    layers = [(p, m) for p, m in nnx.iter_modules(served)
              if isinstance(getattr(m, "promote_dtype", None), OperandQuant)]
    for path, layer in layers:
        slot = layer.promote_dtype
        plan = slot.plan
        name = kernel_name(plan.kind)
        step = lambda s, z: None if s is None else (s[...], None if z is None else z[...])  # noqa: E731
        kernel = served_kernel(
            "/".join(map(str, path)), plan, getattr(layer, name)[...],
            input_range=None if slot.input_range is None else slot.input_range.get_value(),
            weight_step=step(slot.weight_scale, slot.weight_zero_point),
            input_step=step(slot.input_scale, slot.input_zero_point),
            result=None if slot.method_result is None else slot.method_result.get_value())
        setattr(layer, name, nnx.Param(kernel))
        if plan.kind == "embed" and type(layer) is nnx.Embed \
                and not isinstance(kernel, ScaledKernel):
            layer.__class__ = ServedEmbed  # its __call__ gathers codes
        delattr(layer, "promote_dtype")  # a data node (the OperandQuant) becomes static
        for field, value in _slots(plan.kind, kernel).items():
            if field != "promote_dtype":
                delattr(layer, field)
            setattr(layer, field, value)
    return served


def serve_model(qmodel, variables=None, *args, **kwargs):
    """The served form of a ``quantize_model`` model (see the module docstring).

    linen: ``serve_model(qmodel, variables, *args, **kwargs)`` -> ``(served_fn,
    served_vars)``; ``args`` / ``kwargs`` are a sample call (abstractly evaluated to
    find the quantized layers), ``served_vars`` is ``{"params": ...}`` with
    ``IntKernel`` / ``QuantizedArray`` kernels (packed <= 4-bit codes) and
    ``served_fn(served_vars, *args, **kwargs)`` runs the model.
    nnx: ``serve_model(qmodel)`` -> a served copy (``qmodel`` is not modified).
    """
    if isinstance(qmodel, QuantizedModel):
        if variables is None:
            raise TypeError("serve_model(qmodel, variables, *sample_args): linen needs the "
                            "trained variables and a sample call.")
        return _serve_linen(qmodel, variables, *args, **kwargs)
    if variables is not None or args or kwargs:
        raise TypeError("serve_model(qmodel): an nnx model carries its own state.")
    return _serve_nnx(qmodel)

