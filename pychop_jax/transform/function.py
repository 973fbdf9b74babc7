"""Quantization-aware models over *variables*: plain functions, and the base of linen's.

``quantize_model(f, rules)`` of a plain function ``f(params, *args, **kwargs)`` is a
``QuantizedFunction``, used the way a linen model is::

    qf = pj.quantize_model(f, rules)
    variables = qf.init(params, x)               # {"params": params, "quant_stats": ...}
    y = qf.apply(variables, x)                   # evaluation: frozen ranges
    y, updates = qf.apply(variables, x, mutable=["quant_stats"])   # training: observe
    grads = jax.grad(loss)(variables["params"])  # through the straight-through estimators

``variables`` is ``{"params": ...}`` plus the quantization collections of
``transform.plan`` (``quant_stats``: observer ranges; ``quant_params``: LSQ step
sizes, trained with the params; ``quant_method``: post-training algorithms' results,
set by ``calibrate_model``).  ``params`` are never changed: a float checkpoint loads
as it is.

``VariablesModel`` is the machinery: subclasses say how their model becomes a
function ``fn(params, dynamic)`` (``function``) and how the variables split into
parameters and the rest (``split``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..core import ops
from ..core.qarray import QuantizedArray
from .plan import COLLECTIONS, LEARNED, METHOD, STATS, Plan, nest
from .rules import QuantReport, QuantRule
from .tracing import Traced, Traces, join_static, leaf_paths, split_static
from .training import FakeQuant

__all__ = ["VariablesModel", "QuantizedFunction", "as_rules", "mutable_collections",
           "init_weight_steps", "merge_variables"]


def as_rules(rules) -> tuple[QuantRule, ...]:
    """``rules`` as a tuple of ``QuantRule`` s (one rule alone is accepted).

    Raises:
      TypeError: an element that is not a ``QuantRule``.
    """
    rules = (rules,) if isinstance(rules, QuantRule) else tuple(rules)
    for r in rules:
        if not isinstance(r, QuantRule):
            raise TypeError(f"quantize_model: rules must be QuantRule s; got {r!r}.")
    return rules


def mutable_collections(mutable, available: Sequence[str]) -> tuple[str, ...]:
    """The collections a linen-style ``mutable`` argument names (``True``: all)."""
    if mutable is True:
        return tuple(available)
    if not mutable:
        return ()
    if isinstance(mutable, str):
        return (mutable,)
    return tuple(mutable)


def init_weight_steps(plan: Plan, params_leaves) -> dict:
    """LSQ's initial ``(scale, zero_point)`` of every learned weight, from its value
    (``ops.lsq_init``, the spec's full scale shape; ``zero_point`` ``None`` when
    symmetric)."""
    out = {}
    for index, wp in plan.weights.items():
        if wp.lsq:
            state = ops.lsq_init(params_leaves[index], wp.spec)
            out[index] = (state.scale, None if wp.spec.symmetric else state.zero_point)
    return out


class VariablesModel:
    """A quantization-aware model whose state is a linen-style ``variables`` dict (see
    the module docstring).

    Subclasses implement ``function(method, static) -> fn(params, dynamic)``,
    ``split(variables) -> (params, others)`` and may override ``paths``.
    """

    def __init__(self, rules):
        self.rules = as_rules(rules)
        self._traces = Traces(self.rules)

    # -- what subclasses provide ---------------------------------------------------------
    def function(self, method, static) -> Callable:
        raise NotImplementedError

    def split(self, variables):
        """``(params, others)``: the parameters and the model's other variables."""
        return variables["params"], {}

    def paths(self, params) -> list[str]:
        return leaf_paths(params)

    def state_paths(self, others) -> list[str]:
        """The names of the model-state leaves (``others``' arrays, in order) as the
        rules see them: their module path and variable name (a cache: ``blocks_0/attn/
        cached_key``)."""
        return leaf_paths(others, skip=_box_key, is_leaf=_is_quantized)[1]

    def own_collections(self, mutable):
        """What of a linen-style ``mutable`` concerns the model's own collections (not
        the quantization ones): ``()`` for none, a tuple of names, or ``True`` (all)."""
        return ()

    # -- tracing --------------------------------------------------------------------------
    def trace(self, variables, args, kwargs, method=None, mutable=()) -> tuple[Traced, list]:
        """The trace of one call, and its dynamic values."""
        params, others = self.split(variables)
        arrays, static = split_static((others, args, kwargs))
        fn = self.function(method, (static, mutable))
        traced = self._traces.get(fn, params, arrays, (method, static, mutable),
                                  self.paths(params), dict(enumerate(self.state_paths(others))))
        return traced, arrays

    def last_trace(self) -> Traced | None:
        """The most recent trace (``None`` before the first call)."""
        return self._traces.last

    def report(self, variables, *args, method=None, mutable=True, **kwargs) -> QuantReport:
        """The ``QuantReport`` of one call (abstract: nothing is computed); ``mutable``
        as for ``apply`` (default: the model's own collections mutable, as a training
        call or a decoding call writing its cache needs)."""
        return self.trace(variables, args, kwargs, method,
                          self.own_collections(mutable))[0].plan.report

    # -- the QAT model ----------------------------------------------------------------------
    def run(self, variables, args, kwargs, *, method=None, mutable=(), mode="eval",
            handler=None):
        """``(outputs, scope, traced, learned)`` of one call in ``mode``; ``handler(plan,
        mode, learned, methods)`` makes the handler (default: ``FakeQuant``)."""
        traced, arrays = self.trace(variables, args, kwargs, method, mutable)
        plan = traced.plan
        params, _ = self.split(variables)
        learned = {}
        for index, step in plan.weight_variables(variables, LEARNED, "weight_scale").items():
            zero = plan.weight_variables(variables, LEARNED, "weight_zero_point").get(index)
            learned[index] = (step, zero)
        methods = plan.weight_variables(variables, METHOD)
        if mode == "init":
            leaves = jax.tree_util.tree_leaves(params)
            learned = {**init_weight_steps(plan, leaves), **learned}
        make = handler or (lambda p, m, lr, ms: FakeQuant(p, m, learned=lr, methods=ms))
        out, scope = Traces.run(traced, make(plan, mode, learned, methods), params, arrays,
                                plan.import_scope(variables))
        return out, scope, traced, learned

    def apply(self, variables, *args, method=None, mutable=False, **kwargs):
        """The model on ``args`` with its weights (and inputs) fake-quantized.

        ``mutable``: the collections to return updated, linen's convention (``True``:
        all; ``"quant_stats"`` among them: the observers update their ranges --
        training; otherwise the ranges are frozen -- evaluation).  Returns the output,
        or, as linen does for any ``mutable`` but ``False`` (``[]`` included), ``(output,
        updates)``; as in linen, an updated collection is returned whole (the states of
        the sites this call did not reach -- another ``method``, another branch -- as
        they are in ``variables``).
        """
        names = mutable_collections(mutable, (STATS, LEARNED))
        own = self.own_collections(mutable)
        mode = "train" if STATS in names else "eval"
        out, scope, traced, _ = self.run(variables, args, kwargs, method=method,
                                         mutable=own, mode=mode)
        if mutable is False:
            return out
        updates = {}
        if own:
            out, made = out
            updates.update(made)
        exported = traced.plan.export(scope)
        for c in names:
            if c in COLLECTIONS and (c in exported or c in variables):
                updates[c] = merge_variables(variables.get(c, {}), exported.get(c, {}))
        return out, updates

    def init_variables(self, variables, args, kwargs, method=None):
        """``variables`` with the quantization collections created from one call: empty
        observer ranges, LSQ step sizes from the weights and the inputs at hand.  The
        call may update the model's own collections (a training call: batch statistics);
        those updates are dropped, ``variables`` keep theirs.  Warns about rules that
        take no op.

        The sample call runs as one compiled program that returns only the new state:
        XLA drops the rest of the forward pass, and the model is not run op by op.

        Raises:
          ValueError: a weight the rules quantize, or (where the rules quantize
            inputs) a floating sample input, with NaN / +-inf values, as the eager
            quantizers would (checked on concrete arrays; under an outer ``jit`` such
            values are ignored, as there).
        """
        arrays, static = split_static((variables, args, kwargs))
        plans = []

        def created(arrays):
            variables, args, kwargs = join_static(arrays, static)
            _, scope, traced, learned = self.run(variables, args, kwargs, method=method,
                                                 mutable=self.own_collections(True),
                                                 mode="init")
            plan = traced.plan
            plans.append(plan)
            flat = {}
            for index, (scale, zero_point) in learned.items():
                key = plan.weight_key(plan.weights[index].weight)
                flat[(LEARNED,) + key + ("weight_scale",)] = scale
                if zero_point is not None:
                    flat[(LEARNED,) + key + ("weight_zero_point",)] = zero_point
            return merge_variables(plan.export(scope), nest(flat))

        made = jax.jit(created)(arrays)
        plan = plans[0]
        params = jax.tree_util.tree_leaves(self.split(variables)[0])
        for index, wp in plan.weights.items():
            if wp.spec is not None:
                _check_finite(params[index], f"init: the weight {wp.weight.path!r}")
        if any(sp.act is not None for sp in plan.sites.values()):
            for leaf in jax.tree_util.tree_leaves((args, kwargs)):
                _check_finite(leaf, "init: the sample input")
        message = plan.report.warning()
        if message:
            warnings.warn(message, stacklevel=4)
        return {**variables, **made}


def _check_finite(x, what: str) -> None:
    """``ops.check_finite`` on a floating array outside any trace (``ops.is_traced``:
    under an outer ``jit`` even a closed-over concrete array is a staged constant)."""
    if isinstance(x, (jax.Array, np.ndarray)) and not ops.is_traced(x) \
            and jnp.issubdtype(x.dtype, jnp.floating):
        ops.check_finite(x, what)


def _box_key(k) -> bool:
    return getattr(k, "name", None) == "value"


def _is_quantized(x) -> bool:
    return isinstance(x, QuantizedArray)


def merge_variables(a: Mapping, b: Mapping) -> dict:
    """``a`` updated by ``b``, nested mappings merged key by key (a collection's states
    updated by those of one call)."""
    out = dict(a)
    for k, v in b.items():
        old = out.get(k)
        out[k] = merge_variables(old, v) if isinstance(v, Mapping) and isinstance(old, Mapping) \
            else v
    return out


class QuantizedFunction(VariablesModel):
    """``quantize_model(f, rules)`` for a plain function ``f(params, *args, **kwargs)``
    (see the module docstring)."""

    def __init__(self, fn: Callable, rules):
        super().__init__(rules)
        self.fn = fn

    def function(self, method, static):
        static_args, _ = static

        def fn(params, dynamic):
            others, args, kwargs = join_static(dynamic, static_args)
            del others
            return self.fn(params, *args, **kwargs)

        return fn

    def init(self, params, *args, **kwargs) -> dict:
        """``{"params": params, ...}`` with the quantization collections, from one
        sample call."""
        return self.init_variables({"params": params}, args, kwargs)

    def __repr__(self) -> str:
        name = getattr(self.fn, "__qualname__", repr(self.fn))
        return f"QuantizedFunction({name}, {len(self.rules)} rule(s))"
