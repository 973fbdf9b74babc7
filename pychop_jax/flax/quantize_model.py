"""``quantize_model``: quantization-aware copies of stock Flax models, by rules.

::

    from pychop_jax.flax.quantize_model import quantize_model, quantization_report
    from pychop_jax.flax.rules import QuantRule

    rules = [QuantRule("head"), QuantRule(".*", weight=8, act=8)]

    # linen: a Module wrapping the model; same params tree, plus quant_stats
    qmodel = quantize_model(model, rules)
    variables = qmodel.init(key, x)                       # params == model.init's
    y, upd = qmodel.apply(variables, x, mutable=["quant_stats"])  # observe (QAT / PTQ)
    y = qmodel.apply({**variables, **upd}, x)             # evaluate, ranges frozen

    # nnx: a new Module (the model is left as it is), same call signature
    qmodel = quantize_model(model, rules)
    qmodel.train(); y = qmodel(x)                          # observers update
    qmodel.eval();  y = qmodel(x)                          # ranges frozen

**How layers are intercepted.**  Every covered layer (``Dense`` / ``Linear``,
``DenseGeneral`` / ``LinearGeneral`` -- and so the q/k/v/out projections of
``MultiHeadDotProductAttention`` / ``MultiHeadAttention`` --, ``Einsum``, ``Conv``,
``Embed``) hands the operands of its op to its ``promote_dtype`` field immediately
before the op.  That public field is the one slot all five layers have in both APIs
(linen ``Einsum`` and both ``Embed`` have no op slot), and it sees input and kernel
together, so the quantized layer is the stock layer with ``promote_dtype`` =
its own ``promote_dtype`` followed by ``operands.quantize_operands``.  The layer's op
(``dot_general``, ``einsum_op``, ``conv_general_dilated``, custom ones included)
and its params are untouched.

* linen: ``QuantizedModel`` calls the model under ``nn.intercept_methods``.  When a
  covered layer's ``__call__`` (or ``Embed.attend``) is called and its path matches
  a quantizing rule, the interceptor calls the same method of
  ``layer.clone(parent=layer.scope.rewound(), promote_dtype=<quantizing>)``: the
  clone lives in the layer's own scope (a rewound scope: the same variables and
  RNG counters, fresh name reservations, as Flax itself uses for repeated calls of
  a compact module), so it reads and creates exactly the layer's params.
  The observer's ``RangeState`` is the variable ``quant_stats/<layer>/input_range``;
  LSQ step sizes are ``quant_params/<layer>/{weight,input}_{scale,zero_point}``
  (outside ``params``, so ``params`` stays the float model's tree; differentiate
  ``quant_params`` too to learn them).  A rule's ``method`` result (from
  ``calibrate_model``) is the ``MethodResult`` variable
  ``quant_method/<layer>/result``.  Observers update when ``quant_stats`` is
  mutable (not during ``init``); otherwise the ranges are frozen, and a range that
  has seen nothing uses the batch's own estimate (``qat.observed_fake_quant``).
  A per-block input spec (MX / NVFP4 ``act``) keeps no range: it is calibrated on
  each call (``qat.input_fake_quant``), so such a layer has no ``quant_stats`` entry.
* nnx (``nnx_model``): ``quantize_model`` clones the model (``nnx.clone``) and sets
  each matched layer's ``promote_dtype`` to an ``OperandQuant`` module that holds the
  layer's ``QuantStats`` and LSQ ``nnx.Param`` s.  ``qmodel.train()`` / ``eval()`` set its
  ``use_running_average`` as for ``BatchNorm`` (new copies observe).

**Attention products.**  A rule with ``attention`` quantizes the ``q k^T`` and
``probs v`` operands of the attention modules it matches (``attention.py``): linen
re-calls ``MultiHeadDotProductAttention`` as a clone whose einsum fields quantize
(ranges ``quant_stats/<module>/attn_*_range``), nnx sets an ``nnx.MultiHeadAttention``'s
``attention_fn`` to an ``AttentionQuant`` (``nnx_attention.py``).

**Errors.**  A module whose path matches a quantizing rule but that is not a covered
stock layer and holds parameters itself (``ConvTranspose``, ``ConvLocal``, a
subclass of a covered layer, a custom module with raw params) raises ``ValueError``
naming it; exclude it with an earlier rule without specs.  Normalization layers
(``LayerNorm``, ``RMSNorm``, ``BatchNorm``, ``GroupNorm``) stay float and are
listed in the report's ``skipped``.  Rules that take no layer are reported
(``quantization_report``) and warned about at ``init`` (linen) / build time (nnx).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import warnings
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax

from . import attention
from .operands import (
    LayerPlan,
    init_input_range,
    init_input_step,
    init_weight_step,
    input_contraction,
    quantize_operands,
    roles,
)
from .rules import QuantReport, QuantRule, first_match, uncoverable_error

__all__ = ["quantize_model", "quantization_report", "QuantizedModel", "LinenOperands", "STATS",
           "LSQ_PARAMS", "METHOD"]

#: linen collection of the observers' ranges
STATS = "quant_stats"
#: linen collection of the learned (LSQ) step sizes
LSQ_PARAMS = "quant_params"
#: linen collection of the post-training algorithms' results (``MethodResult`` s)
METHOD = "quant_method"


def _rules(rules) -> tuple[QuantRule, ...]:
    rules = (rules,) if isinstance(rules, QuantRule) else tuple(rules)
    for r in rules:
        if not isinstance(r, QuantRule):
            raise TypeError(f"quantize_model: rules must be QuantRule s; got {r!r}.")
    return rules


# ==== linen ===================================================================================
_LINEN_KINDS = {nn.Dense: "dense", nn.DenseGeneral: "dense_general", nn.Einsum: "einsum",
                nn.Conv: "conv", nn.Embed: "embed"}
_LINEN_METHODS = ("__call__", "attend")
_LINEN_NORMS = (nn.LayerNorm, nn.RMSNorm, nn.BatchNorm, nn.GroupNorm)


class LinenOperands:
    """A linen layer's ``promote_dtype`` slot: its own ``promote_dtype``, then
    ``quantize_operands`` with the variables of the layer's ``scope``."""

    def __init__(self, base: Callable, plan: LayerPlan, scope, path: str = "",
                 contracted=(-1,)):
        self.base, self.plan, self.scope = base, plan, scope
        self.path, self.contracted = path, contracted

    def _variable(self, col, name, init, *args):
        return self.scope.variable(col, name, init, *args)

    def _step(self, prefix: str, init):
        """LSQ ``(scale, zero_point)`` variables, created by ``init()`` (called once)."""
        made = []

        def part(i):
            if not made:
                made.append(init())
            return made[0][i]

        scale = self._variable(LSQ_PARAMS, f"{prefix}_scale", part, 0).value
        zero_point = None
        spec = self.plan.weight if prefix == "weight" else self.plan.act
        if not spec.symmetric:
            zero_point = self._variable(LSQ_PARAMS, f"{prefix}_zero_point", part, 1).value
        return scale, zero_point

    def __call__(self, *operands, **kwargs):
        operands = self.base(*operands, **kwargs)
        plan = self.plan
        i, w = roles(operands)
        has_input = i is not None and plan.act is not None
        weight_step = input_step = stats = None
        if plan.learns_weight:
            weight_step = self._step("weight", lambda: init_weight_step(plan, operands[w]))
        if has_input and plan.learns_input:
            input_step = self._step("input", lambda: init_input_step(plan, operands[i]))
        if has_input and plan.observes:
            stats = self._variable(STATS, "input_range", init_input_range, plan)
        train = (self.scope.is_mutable_collection(STATS)
                 and not self.scope.get_flag("initializing", False))
        result = None
        if plan.method is not None and self.scope.has_variable(METHOD, "result"):
            result = self.scope.get_variable(METHOD, "result")
        operands, new = quantize_operands(
            plan, operands, input_range=None if stats is None else stats.value,
            weight_step=weight_step, input_step=input_step, train=train, result=result,
            contracted=self.contracted, path=self.path)
        if stats is not None and train:
            stats.value = new
        return operands


_REPORTS: contextvars.ContextVar[list | None] = contextvars.ContextVar("_REPORTS", default=None)


class _LinenInterceptor:
    """The ``nn.intercept_methods`` interceptor of one ``QuantizedModel`` call."""

    def __init__(self, rules, prefix: tuple[str, ...]):
        self.rules, self.prefix, self.entries = rules, prefix, []

    def _path(self, module) -> str | None:
        path = tuple(module.path)
        if path[:len(self.prefix)] != self.prefix:
            return None
        return "/".join(path[len(self.prefix):])

    def _attention(self, module):
        """The clone of an attention module whose products are quantized
        (``attention.py``), or ``None`` when no rule with ``attention`` takes it."""
        if attention.is_quantized_linen_attention(module):
            return None
        path = self._path(module)
        index = None if path is None else first_match(self.rules, path)
        if index is None or self.rules[index].attention is None:
            return None
        self.entries.append((path, type(module).__name__, index, "attention"))
        return attention.quantized_linen_attention(module, self.rules[index], path)

    def __call__(self, next_fun, args, kwargs, context):
        module, method = context.module, context.method_name
        if method == "__call__" and isinstance(module, nn.MultiHeadDotProductAttention):
            clone = self._attention(module)
            if clone is not None:
                return clone(*args, **kwargs)
        kind = _LINEN_KINDS.get(type(module))
        if kind is not None and isinstance(module.promote_dtype, LinenOperands):
            return next_fun(*args, **kwargs)  # the quantized clone itself
        path = self._path(module)
        if path is None or (kind is None and method != "__call__"):
            return next_fun(*args, **kwargs)
        index = first_match(self.rules, path)
        quantizing = index is not None and self.rules[index].quantizes
        if kind is not None and method in _LINEN_METHODS:
            self.entries.append((path, type(module).__name__, index, kind))
            if not quantizing:
                return next_fun(*args, **kwargs)
            scope = module.scope.rewound()
            einsum_str = kwargs.get("einsum_str", args[1] if len(args) > 1 else None) \
                if kind == "einsum" else None
            slot = LinenOperands(module.promote_dtype,
                                 LayerPlan.from_rule(self.rules[index], kind), scope, path,
                                 input_contraction(kind, module, einsum_str))
            clone = module.clone(parent=scope, promote_dtype=slot)
            return getattr(clone, method)(*args, **kwargs)
        y = next_fun(*args, **kwargs)
        if index is not None and kind is None:
            if isinstance(module, _LINEN_NORMS):
                if quantizing:
                    self.entries.append((path, type(module).__name__, index, None))
            elif _holds_params(module.variables.get("params", {})):
                if quantizing:
                    raise uncoverable_error(path, module, index)
                self.entries.append((path, type(module).__name__, index, "excluded"))
        return y


def _holds_params(params) -> bool:
    """Whether a linen module's ``params`` has leaves of its own (not only children)."""
    return any(not hasattr(v, "items") for v in params.values())


@dataclasses.dataclass(frozen=True, eq=False)
class _Held:
    """Holds the float model out of sight of linen, which would otherwise adopt a
    Module-valued field as a child named after the field (and so move every
    variable of the model under that name)."""

    module: nn.Module


class QuantizedModel(nn.Module):
    """A linen model with its layers quantized by ``rules`` (``quantize_model``).

    Calls the float model with the same arguments, in the same scope (so its
    variables keep their paths), under the interceptor described in the module
    docstring.  Build it with ``quantize_model``.

    Attributes:
      held: the float model (not modified), as ``float_model``.
      rules: the ``QuantRule`` s, first match wins.
    """

    held: _Held
    rules: tuple[QuantRule, ...]

    @property
    def float_model(self) -> nn.Module:
        return self.held.module

    def __call__(self, *args, **kwargs):
        return self.quantized_call(None, *args, **kwargs)

    def quantized_call(self, method, *args, **kwargs):
        """The float model's ``method`` (``None``: ``__call__``; a name; or a function
        ``f(model, *args, **kwargs)``, such as ``Model.decode``) on ``args``, with the
        layers it reaches quantized.  ``apply`` / ``init`` with ``method=`` call this."""
        interceptor = _LinenInterceptor(self.rules, tuple(self.path))
        inner = self.float_model.clone(parent=self.scope)
        with nn.intercept_methods(interceptor):
            if method is None:
                y = inner(*args, **kwargs)
            elif isinstance(method, str):
                y = getattr(inner, method)(*args, **kwargs)
            else:
                y = method(inner, *args, **kwargs)
        recorder = _REPORTS.get()
        if recorder is not None:
            recorder.extend(interceptor.entries)
        elif self.is_initializing():
            message = QuantReport.collect(self.rules, interceptor.entries).warning()
            if message:
                warnings.warn(message, stacklevel=2)
        return y


    def apply(self, variables, *args, method=None, **kwargs):
        """``Module.apply``; ``method`` names a method of the float model (a string, or
        ``Model.decode``-style function / any ``f(model, *args)``), run with the same
        layers quantized as ``__call__``."""
        return super().apply(variables, *args, method=self._method(method), **kwargs)

    def init(self, rngs, *args, method=None, **kwargs):
        """``Module.init``; ``method`` as for ``apply``."""
        return super().init(rngs, *args, method=self._method(method), **kwargs)

    def _method(self, method):
        """``apply`` / ``init``'s ``method`` for the float model, as a function of this
        module (``None``: ``__call__``).

        Raises:
          AttributeError: a name that is not a method of the float model.
        """
        if method is None or method == "__call__" or method is QuantizedModel.__call__:
            return None
        if getattr(method, "__func__", None) is QuantizedModel.__call__:
            return None
        if isinstance(method, str):
            if not callable(getattr(type(self.float_model), method, None)):
                raise AttributeError(
                    f"quantize_model: {type(self.float_model).__name__} has no method "
                    f"{method!r} (apply(..., method=...) names a method of the float model).")
        elif not callable(method):
            raise TypeError(f"apply(method=...) takes a method name or a function; "
                            f"got {method!r}.")

        def run(module, *args, **kwargs):
            return module.quantized_call(method, *args, **kwargs)

        return run


@contextlib.contextmanager
def _recording():
    entries = []
    token = _REPORTS.set(entries)
    try:
        yield entries
    finally:
        _REPORTS.reset(token)


# ==== both =====================================================================================
def quantize_model(model, rules: QuantRule | Sequence[QuantRule], *args, **kwargs):
    """A quantization-aware version of ``model`` whose layers follow ``rules``.

    Args:
      model: a ``flax.linen.Module`` (not bound) or a ``flax.nnx.Module``.
      rules: ``QuantRule`` s; the first one matching a layer's path decides for it.
      *args, **kwargs: nnx only, optional: a sample call, run once to set the LSQ
        step sizes of inputs from data (linen's ``init`` does that).

    Returns:
      linen: a ``QuantizedModel`` (a linen Module) to ``init`` / ``apply`` with the
      model's arguments.  nnx: a new nnx Module with the model's call signature
      (``model`` is not modified).

    Raises:
      ValueError: a matched layer that cannot be quantized (nnx: here; linen: when
        the model is first run).
    """
    rules = _rules(rules)
    if isinstance(model, nn.Module):
        if args or kwargs:
            raise TypeError("quantize_model: a linen model takes no sample call; "
                            "qmodel.init(key, *args) initialises from data.")
        return QuantizedModel(_Held(model), rules)
    from . import nnx_model

    return nnx_model.quantize_nnx(model, rules, *args, **kwargs)


def quantization_report(model, rules, *args, **kwargs) -> QuantReport:
    """Which rule takes which layer of ``model``, without quantizing anything.

    linen: ``args`` / ``kwargs`` are a sample call (abstractly evaluated with
    ``jax.eval_shape``; pass ``rngs=`` for models that need more than ``params``).
    nnx: the module graph is read; ``args`` are not needed.
    """
    rules = _rules(rules)
    if not isinstance(model, nn.Module):
        from . import nnx_model

        return nnx_model.report_nnx(model, rules)
    rngs = kwargs.pop("rngs", jax.random.key(0))
    qmodel = QuantizedModel(_Held(model), rules)
    with _recording() as entries:
        jax.eval_shape(lambda: qmodel.init(rngs, *args, **kwargs))
    return QuantReport.collect(rules, entries)
