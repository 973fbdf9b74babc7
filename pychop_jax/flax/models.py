"""``quantize_model`` for every framework: linen, nnx, Equinox and plain functions.

One mechanism quantizes them all (``pychop_jax.transform``): the model becomes a
function of its parameters, traced once per signature; its weights are found by
dataflow and its matmuls re-emitted quantized.  This module only maps each
framework's variables to and from that function:

* **linen** (``QuantizedModel``): ``qmodel.init(key, x)`` / ``qmodel.apply(variables,
  x, mutable=[...], method=..., rngs=...)`` as for the float module; ``variables`` are
  the module's own collections plus ``quant_stats`` / ``quant_params`` /
  ``quant_method`` (``transform.plan``).  ``mutable`` containing ``"quant_stats"``
  is training (the observers update), otherwise evaluation.  ``nn.scan`` stacks,
  ``nn.remat``, boxed (logically partitioned) parameters and every other module
  system feature work as they do for the float model: the transform sees the traced
  function, not the modules.
* **nnx** (``QuantizedNnxModel``): a module with the model's call signature holding a
  copy of the model (``model`` is not modified) and the quantization state
  (``QuantStats``, LSQ ``nnx.Param`` s, ``QuantMethodState``); ``train()`` / ``eval()``
  switch the observers as for ``BatchNorm``.  The state is created by the optional
  sample call of ``quantize_model(model, rules, *args)`` or by the first call.
* **Equinox** (``QuantizedEquinox``, an ``eqx.Module``): ``qmodel, state =
  quantize_model(model, rules, *args, call=...)``; ``y, state = qmodel(*args,
  state=state)``; ``eqx.nn.inference_mode(qmodel)`` freezes the observers.  The module
  holds the float model and the LSQ step sizes (what training updates); ``state``
  the observer ranges and the algorithms' results.
  ``call(model, *args)`` is how the model runs on a batch (default ``model(*args)``;
  ``lambda m, x: jax.vmap(m)(x)`` for per-example modules), so that an input range is
  a batch's.
* **a plain function** ``f(params, *args)``: ``transform.function.QuantizedFunction``
  (``init(params, x)`` -> variables; ``apply`` as linen).

Anything else (a transformers ``FlaxPreTrainedModel`` wrapper, a params dict, an
object that is not a module or function) is a ``TypeError`` naming what to pass.
"""

from __future__ import annotations

import collections
import functools
import sys
from collections.abc import Callable, Mapping

import flax.linen as nn
import jax

from ..transform.function import QuantizedFunction, VariablesModel, as_rules, merge_variables
from ..transform.plan import COLLECTIONS, LEARNED, METHOD, STATS
from ..transform.rules import QuantReport
from ..transform.tracing import join_static, leaf_paths

__all__ = ["quantize_model", "quantization_report", "QuantizedModel", "STATS", "LSQ_PARAMS",
           "METHOD", "is_equinox", "is_quantized_nnx"]
# (``QuantizedNnxModel`` / ``QuantizedEquinox`` are module attributes made on first access,
# so that importing this module imports neither flax.nnx nor Equinox)

#: the collection of learned (LSQ) step sizes
LSQ_PARAMS = LEARNED


def _is_box_key(k) -> bool:
    return getattr(k, "name", None) == "value"


def _box_paths(params) -> list[str]:
    """Parameter paths without the ``value`` attribute of boxes (``nn.Partitioned``,
    ``nnx.Variable``): a boxed kernel is named like an unboxed one."""
    return leaf_paths(params, skip=_is_box_key)


# ==== linen ===================================================================================
class QuantizedModel(VariablesModel):
    """A linen model with its weights quantized by ``rules`` (``quantize_model``).

    Attributes:
      float_model: the float model (not modified).
      rules: the ``QuantRule`` s, first match wins.
    """

    def __init__(self, model: nn.Module, rules):
        super().__init__(rules)
        self.float_model = model

    def split(self, variables):
        params = variables.get("params", {})
        others = {k: v for k, v in variables.items() if k != "params" and k not in COLLECTIONS}
        return params, others

    def paths(self, params) -> list[str]:
        return _box_paths(params)

    def state_paths(self, others) -> list[str]:
        """Without the collection's name: ``cache/blocks_0/attn/cached_key`` is the
        variable ``cached_key`` of module ``blocks_0/attn``."""
        return [p.split("/", 1)[-1] for p in super().state_paths(others)]

    def own_collections(self, mutable):
        if mutable is True:
            return True
        if not mutable:
            return ()
        names = (mutable,) if isinstance(mutable, str) else tuple(mutable)
        return tuple(c for c in names if c not in COLLECTIONS)

    def function(self, method, static):
        static_args, mutable = static
        model = self.float_model

        def fn(params, dynamic):
            others, args, kwargs = join_static(dynamic, static_args)
            kwargs = dict(kwargs)
            own = mutable if mutable is True else list(mutable) if mutable else False
            return model.apply({"params": params, **others}, *args, method=method,
                               mutable=own, **kwargs)

        return fn

    def init(self, rngs, *args, method=None, **kwargs):
        """``Module.init`` of the float model, then the quantization collections from
        the same call (empty observer ranges; LSQ step sizes from the data), which gets
        the same ``rngs`` (a training call's dropout)."""
        variables = self.float_model.init(rngs, *args, method=method, **kwargs)
        rngs = dict(rngs) if isinstance(rngs, Mapping) else {"params": rngs}
        return self.init_from(variables, *args, method=method, rngs=rngs, **kwargs)

    def init_from(self, variables, *args, method=None, **kwargs):
        """``variables`` (the float model's, e.g. pretrained) with the quantization
        collections added from one sample call: empty observer ranges, LSQ step sizes
        from the given weights and the data.  ``kwargs`` as ``apply``'s (``rngs=``);
        the call may update the model's own collections (batch statistics of a training
        call): ``variables`` keep theirs."""
        return self.init_variables(dict(variables), args, kwargs, method)

    def apply(self, variables, *args, method=None, mutable=False, **kwargs):
        """``Module.apply`` of the float model with its weights (and inputs)
        fake-quantized; ``mutable`` as linen's (``"quant_stats"`` among them: training,
        the observers update), ``rngs=`` / ``method=`` as linen's."""
        return super().apply(variables, *args, method=method, mutable=mutable, **kwargs)

    def __repr__(self) -> str:
        return f"QuantizedModel({type(self.float_model).__name__}, {len(self.rules)} rule(s))"


# ==== nnx =====================================================================================
@functools.cache
def _nnx_types():
    from flax import nnx

    class QuantStats(nnx.Variable):
        """Observer ranges of a quantized nnx model (not trained)."""

    class QuantMethodState(nnx.Variable):
        """Post-training algorithms' results (not trained)."""

    return nnx, QuantStats, QuantMethodState


class _NnxFunction(VariablesModel):
    """The nnx model as a function of its ``nnx.Param`` s (the rest of its state is
    passed along and returned updated)."""

    def __init__(self, rules, graphdef, rest_filter):
        super().__init__(rules)
        self.graphdef, self.rest_filter = graphdef, rest_filter

    def split(self, variables):
        return variables["params"], {"rest": variables["rest"]}

    def paths(self, params) -> list[str]:
        return _box_paths(params)

    def state_paths(self, others) -> list[str]:
        return [p.split("/", 1)[-1] for p in super().state_paths(others)]

    def function(self, method, static):
        nnx = _nnx_types()[0]
        static_args, _ = static
        graphdef = self.graphdef

        def fn(params, dynamic):
            others, args, kwargs = join_static(dynamic, static_args)
            model = nnx.merge(graphdef, params, others["rest"])
            target = model if method is None else getattr(model, method)
            out = target(*args, **kwargs)
            return out, nnx.state(model, nnx.Not(nnx.Param))

        return fn


def nnx_variables(module) -> tuple:
    """``(graphdef, variables)``: a quantized nnx module's model graph, and its state as
    the transform's variables (``params``, the rest of the model's state, the
    quantization collections)."""
    nnx, _, _ = _nnx_types()
    graphdef, params, rest = nnx.split(module.model, nnx.Param, ...)
    return graphdef, {"params": params, "rest": rest,
                      STATS: module.quant_stats.get_value(),
                      LEARNED: module.quant_params.get_value(),
                      METHOD: module.quant_method.get_value()}


class _TraceKey:
    """A quantized nnx module's key into ``_NNX_FUNCTIONS``: a static attribute (hashed by
    identity), so the copies nnx makes of the module -- inside ``nnx.jit``, clones --
    find the traces of the module they copy."""

    __slots__ = ()


class _Kept:
    """Traced functions (or tables of them) by a hashable key, the ``size`` most
    recently used: a model rebuilt on every call -- an Equinox model, a served copy, an
    nnx module's copies -- finds its traces here; an unhashable key gets a fresh value
    (``make()``), kept nowhere."""

    def __init__(self, size: int):
        self.size, self.items = size, collections.OrderedDict()

    def get(self, key, make: Callable):
        try:
            fn = self.items.pop(key, None)
        except TypeError:  # e.g. an Equinox static part holding non-float arrays
            return make()
        if fn is None:
            fn = make()
        self.items[key] = fn
        while len(self.items) > self.size:
            self.items.popitem(last=False)
        return fn


_FUNCTIONS_KEPT = 64
#: the traced functions of the most recently used quantized nnx modules (by their
#: ``_TraceKey``), each by graphdef of its model, in use order: kept beside the module,
#: not in it, where nnx's graph walks (train / eval / clone / split) would meet a dict
#: keyed by GraphDefs; a module whose entry was dropped traces again on its next call
_NNX_FUNCTIONS = _Kept(_FUNCTIONS_KEPT)


def _make_nnx_model_class():
    nnx, QuantStats, QuantMethodState = _nnx_types()

    class QuantizedNnxModel(nnx.Module):
        """An nnx model with its weights quantized by ``rules`` (see the module
        docstring).  ``model``: a copy of the float model."""

        def __init__(self, model, rules):
            self.model = nnx.clone(model)
            self.rules = as_rules(rules)
            self.quant_stats = QuantStats({})
            self.quant_params = nnx.Param({})
            self.quant_method = QuantMethodState({})
            self.use_running_average = False
            self.initialized = False
            self.trace_key = _TraceKey()

        @property
        def float_model(self):
            return self.model

        def functions(self, graphdef):
            """The traced function of the model's ``graphdef`` (kept beside the module:
            ``_NNX_FUNCTIONS``)."""
            cache = _NNX_FUNCTIONS.get(self.trace_key, dict)
            fn = cache.pop(graphdef, None)  # (re)inserted last: the dict is in use order
            if fn is None:
                fn = _NnxFunction(self.rules, graphdef, None)
            cache[graphdef] = fn
            return fn

        def last_trace(self):
            """The most recent trace of a call, in whichever mode (graph); ``None``
            before the first call."""
            for fn in reversed(_NNX_FUNCTIONS.items.get(self.trace_key, {}).values()):
                if fn.last_trace() is not None:
                    return fn.last_trace()
            return None

        def run(self, args, kwargs, mode=None, method=None):
            """``(output, traced)`` of one call; the first call makes the quantization
            state (and warns of unmatched rules).  ``mode="init"`` (the sample call of
            ``quantize_model``) only makes it: the model's own state is not updated."""
            graphdef, variables = nnx_variables(self)
            fn = self.functions(graphdef)
            if not self.initialized:
                made = fn.init_variables(variables, args, kwargs, method)
                self.quant_stats.set_value(made.get(STATS, {}))
                self.quant_params.set_value(made.get(LEARNED, {}))
                self.initialized = True  # (init_variables warned of unmatched rules)
                if mode == "init":
                    return None, fn.last_trace()
                graphdef, variables = nnx_variables(self)
            if mode is None:
                mode = "eval" if self.use_running_average else "train"
            (out, rest), scope, traced, _ = fn.run(variables, args, kwargs, method=method,
                                                   mode=mode)
            nnx.update(self.model, rest)
            if mode == "train":  # the states of the sites this call did not reach: kept
                exported = traced.plan.export(scope)
                self.quant_stats.set_value(merge_variables(self.quant_stats.get_value(),
                                                           exported.get(STATS, {})))
            return out, traced

        def __call__(self, *args, **kwargs):
            return self.run(args, kwargs)[0]

        def report(self, *args, **kwargs) -> QuantReport:
            graphdef, variables = nnx_variables(self)
            return self.functions(graphdef).trace(variables, args, kwargs)[0].plan.report

    return QuantizedNnxModel


def __getattr__(name):  # the nnx / Equinox classes load their framework on first access
    if name == "QuantizedNnxModel":
        return _nnx_class()
    if name == "QuantizedEquinox":
        return _equinox_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _nnx_class():
    return _make_nnx_model_class()


# ==== Equinox =================================================================================
def is_equinox(model) -> bool:
    """Whether ``model`` is an Equinox module (without importing Equinox)."""
    eqx = sys.modules.get("equinox")
    return eqx is not None and isinstance(model, eqx.Module)


class _EqxFunction(VariablesModel):
    """An Equinox model as a function of its inexact arrays."""

    def __init__(self, rules, static, call):
        super().__init__(rules)
        self.static, self.call = static, call

    def function(self, method, static):
        import equinox as eqx

        static_args, _ = static
        model_static, call = self.static, self.call

        def fn(params, dynamic):
            _, args, kwargs = join_static(dynamic, static_args)
            model = eqx.combine(params, model_static)
            return call(model, *args, **kwargs)

        return fn


_KEPT = _Kept(_FUNCTIONS_KEPT)


def eqx_function(rules, static, call) -> _EqxFunction:
    """The traced function of an Equinox model's static part (``eqx.partition``)."""
    return _KEPT.get(("equinox", rules, static, call),
                     lambda: _EqxFunction(rules, static, call))


def nnx_function(rules, graphdef) -> _NnxFunction:
    """The traced function of an nnx model's graph (all variables as one state)."""
    return _KEPT.get(("nnx", rules, graphdef), lambda: _NnxFunction(rules, graphdef, None))


@functools.cache
def _equinox_class():
    import equinox as eqx

    class QuantizedEquinox(eqx.Module):
        """An Equinox model with its weights quantized by ``rules`` (see the module
        docstring).

        Attributes:
          model: the float model (its arrays are what training updates).
          quant_params: learned (LSQ) step sizes (trained with the model).
          rules: the rules (static).
          call: how the model runs on a batch (static).
          inference: ``True`` freezes the observers (``eqx.nn.inference_mode``).
        """

        model: eqx.Module
        quant_params: dict
        rules: tuple = eqx.field(static=True)
        call: Callable = eqx.field(static=True)
        inference: bool = False

        def function(self) -> _EqxFunction:
            params, static = eqx.partition(self.model, eqx.is_inexact_array)
            return eqx_function(self.rules, static, self.call), params

        def variables(self, state):
            fn, params = self.function()
            state = state or {}
            return fn, {"params": params, STATS: state.get(STATS, {}),
                        LEARNED: self.quant_params, METHOD: state.get(METHOD, {})}

        def __call__(self, *args, state=None, **kwargs):
            fn, variables = self.variables(state)
            mode = "eval" if self.inference else "train"
            out, scope, traced, _ = fn.run(variables, args, kwargs, mode=mode)
            stats = merge_variables(variables[STATS], traced.plan.export(scope).get(STATS, {})) \
                if mode == "train" else variables[STATS]
            return out, {**(state or {}), STATS: stats}

        def report(self, *args, **kwargs) -> QuantReport:
            fn, variables = self.variables(None)
            return fn.trace(variables, args, kwargs)[0].plan.report

    return QuantizedEquinox


def _quantize_equinox(model, rules, args, kwargs, call):
    cls = _equinox_class()
    call = call or (lambda m, *a, **k: m(*a, **k))
    qmodel = cls(model, {}, as_rules(rules), call)
    if not args and not kwargs:
        raise TypeError("quantize_model(equinox_model, rules, *args): an Equinox model "
                        "needs a sample call (its quantization state is made from it); "
                        "pass the model's inputs after the rules.")
    fn, variables = qmodel.variables(None)
    made = fn.init_variables(variables, args, kwargs)
    qmodel = cls(model, made.get(LEARNED, {}), qmodel.rules, call)
    return qmodel, {STATS: made.get(STATS, {})}


# ==== dispatch ================================================================================
def is_quantized_nnx(qmodel) -> bool:
    """Whether ``qmodel`` is a ``QuantizedNnxModel`` (without importing nnx)."""
    return "flax.nnx" in sys.modules and isinstance(qmodel, _nnx_class())


def _is_nnx(model) -> bool:
    nnx = sys.modules.get("flax.nnx")
    return nnx is not None and isinstance(model, nnx.Module)


def _refuse(model) -> TypeError:
    name = f"{type(model).__module__}.{type(model).__qualname__}"
    if hasattr(model, "module") and hasattr(model, "params"):
        return TypeError(
            f"quantize_model got a {name}, a wrapper around a Flax module (transformers' "
            "FlaxPreTrainedModel): pass its module, quantize_model(model.module, rules), "
            "and use {'params': model.params} as the variables.")
    if isinstance(model, dict):
        return TypeError("quantize_model got a dict (parameters?): pass the model -- a linen "
                         "Module, an nnx Module, an Equinox Module, or a function "
                         "f(params, *args) -- and give the parameters to its init / apply.")
    return TypeError(
        f"quantize_model cannot trace a {name}: pass a flax.linen Module (unbound), a "
        "flax.nnx Module, an Equinox Module, or a function f(params, *args).")


def _is_function(model) -> bool:
    import inspect

    return inspect.isfunction(model) or inspect.ismethod(model) or \
        isinstance(model, functools.partial) or inspect.isbuiltin(model)


def quantize_model(model, rules, *args, call=None, **kwargs):
    """A quantization-aware version of ``model`` whose weights follow ``rules``.

    Args:
      model: a ``flax.linen.Module`` (unbound), a ``flax.nnx.Module``, an Equinox
        ``Module``, or a function ``f(params, *args, **kwargs)``.
      rules: ``QuantRule`` s; the first one matching a weight's module path decides.
      *args: a sample call -- nnx: optional (otherwise the first call makes the
        quantization state); Equinox: required.
      **kwargs: keyword arguments of that sample call.
      call: Equinox only: ``call(model, *args)``, how the model runs on a batch.

    Returns:
      linen: a ``QuantizedModel`` (``init`` / ``apply``); nnx: a
      ``QuantizedNnxModel`` (call it like the model); Equinox: ``(qmodel, state)``;
      a function: a ``QuantizedFunction`` (``init(params, *args)`` / ``apply``).

    Raises:
      TypeError: anything else (the message names what to pass).
      ValueError: rules that do not fit the model (at the first trace).
    """
    rules = as_rules(rules)
    if call is not None and not is_equinox(model):
        raise TypeError("quantize_model(call=...) is for Equinox models.")
    if isinstance(model, nn.Module):
        if args or kwargs:
            raise TypeError("quantize_model: a linen model takes no sample call; "
                            "qmodel.init(key, *args) initialises from data.")
        if model.scope is not None:
            raise TypeError("quantize_model takes an unbound linen Module (the model's "
                            "definition), not a bound one; pass model.clone(parent=None).")
        return QuantizedModel(model, rules)
    if _is_nnx(model):
        qmodel = _nnx_class()(model, rules)
        if args or kwargs:
            qmodel.run(args, kwargs, mode="init")  # warns of unmatched rules
        return qmodel
    if is_equinox(model):
        return _quantize_equinox(model, rules, args, kwargs, call)
    if _is_function(model):
        if args or kwargs:
            raise TypeError("quantize_model(f, rules): a function takes no sample call; "
                            "qf.init(params, *args) initialises from data.")
        return QuantizedFunction(model, rules)
    raise _refuse(model)


def quantization_report(model, rules, *args, **kwargs) -> QuantReport:
    """Every op the rules concern in ``model``, all at once (nothing is computed: the
    model is traced abstractly).

    linen: ``quantization_report(model, rules, *args, rngs=key, **kwargs)``, a sample
    call; nnx / Equinox: ``(model, rules, *args)``; a function: ``(f, rules, params,
    *args)``.  Also ``qmodel.report(...)`` of a quantized model.
    """
    rules = as_rules(rules)
    if isinstance(model, nn.Module):
        rngs = kwargs.pop("rngs", jax.random.key(0))
        variables = jax.eval_shape(lambda: model.init(rngs, *args, **kwargs))
        rngs = dict(rngs) if isinstance(rngs, Mapping) else {"params": rngs}
        return QuantizedModel(model, rules).report(variables, *args, rngs=rngs, **kwargs)
    if _is_nnx(model):
        return _nnx_class()(model, rules).report(*args, **kwargs)
    if is_equinox(model):
        call = kwargs.pop("call", None) or (lambda m, *a, **k: m(*a, **k))
        qmodel = _equinox_class()(model, {}, rules, call)
        return qmodel.report(*args, **kwargs)
    if _is_function(model):
        if not args:
            raise TypeError("quantization_report(f, rules, params, *args): a function needs "
                            "its parameters and a sample call.")
        return QuantizedFunction(model, rules).report({"params": args[0]}, *args[1:], **kwargs)
    raise _refuse(model)
