"""``serve_model``: a quantization-aware model as codes + scales, for every framework.

::

    served_fn, served_vars = pj.serve_model(qmodel, variables, x)   # linen / a function
    logits = jax.jit(served_fn)(served_vars, x)
    pj.save_quantized(path, served_vars); served_vars = pj.load_quantized(path)

    served = pj.serve_model(qnnx)                  # nnx: a served copy (optional sample call)
    served = pj.serve_model(qeqx, state, x)        # Equinox: a served module
    served(x)

``served_vars`` are ``{"params": ..., "quant_inputs": ...}`` (plus a linen model's
other collections):

* ``params``: the float parameter tree with every quantized weight replaced by a
  ``QuantizedArray`` -- its codes (packed when <= 4 bits) and scales, quantized
  exactly as the QAT model fake-quantizes it (calibrated on the weight, its learned
  LSQ step size, or a post-training algorithm's ``MethodResult``, in a
  ``ScaledKernel`` with the algorithm's input factor).  Boxed (logically partitioned)
  parameters stay boxed, the codes inside the box;
* ``quant_inputs``: each quantized matmul input's frozen quantizer (a ``QuantState``
  from the observer's range or the learned step size; stacked along scans), and each
  activation product's two, at the paths of ``transform.plan``.  A range that saw
  nothing is left out: that input is calibrated per call, as the QAT evaluation does.

The served function is the same traced function, interpreted with served weights
(``serving.served_ops``): views move codes, matmuls take the integer or float path
there, lookups gather codes.  It equals the QAT model's frozen evaluation up to float
summation order (lookups exactly).  A rule that quantizes a weight's input but not the
weight cannot be served (an integer product needs integer weights): ``ValueError``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from ..core import observers
from ..core.ops import calibrate
from ..core.qarray import QuantizedArray
from ..core.state import QuantState
from ..flax import models
from ..transform import qat
from ..transform.function import VariablesModel
from ..transform.interpret import Carrier, Handler, _bind
from ..transform.plan import LEARNED, METHOD, Plan, nest
from ..transform.tracing import Traces, key_name
from ..transform.training import input_layout
from . import served_ops
from .scaled_kernel import ScaledKernel
from .served_ops import InputQuant, ServedWeight

__all__ = ["serve_model", "Serve", "ServedFunction", "INPUTS", "served_variables",
           "is_served_leaf"]

#: the served variables' collection of frozen input quantizers
INPUTS = "quant_inputs"


def is_served_leaf(x) -> bool:
    """A served weight leaf: a ``QuantizedArray`` or a ``ScaledKernel``."""
    return isinstance(x, (QuantizedArray, ScaledKernel))


class Serve(Handler):
    """The serving handler: weights as codes, matmuls on them (see the module
    docstring).  ``inputs``: the sites' frozen quantizers by callpath."""

    is_param_leaf = staticmethod(is_served_leaf)

    def __init__(self, plan: Plan):
        self.plan = plan

    def weight(self, weight, value):
        if isinstance(value, ScaledKernel):
            return ServedWeight(value.kernel, value.input_scale, None, weight.dtype)
        if isinstance(value, QuantizedArray):
            return ServedWeight(value, None, None, weight.dtype)
        return None

    def float_value(self, weight, value):
        return None

    def view(self, eqn, twin, dynamic):
        return served_ops.view(eqn, twin, dynamic)

    def dequantized(self, carrier: Carrier):
        return served_ops.dequantize(carrier.twin)

    def scan_parts(self, twin):
        return served_ops.scan_parts(twin)

    def state(self, index, value):
        spec = self.plan.caches.get(index)
        name = self.plan.graph.state_paths.get(index)
        if spec is None:
            if isinstance(value, QuantizedArray):
                raise ValueError(
                    f"serve_model: the cache {name!r} holds {value.spec.dtype or value.spec.bits}"
                    "-bit codes, but these rules keep it float: build the cache for this "
                    "model (a float cache, e.g. from the model's init).")
            return None
        if isinstance(value, QuantizedArray):
            if dataclasses.replace(value.spec, axis=spec.axis) != spec or \
                    value.spec.axis != spec.axis:
                raise ValueError(
                    f"serve_model: the cache {name!r} holds {value.spec} codes, but the rules "
                    f"write {spec}: build the cache for this rule set (a float cache is "
                    "quantized on the first call).")
            return ServedWeight(value, None, None, jnp.float32)
        return ServedWeight(QuantizedArray.quantize(value, spec, pack="auto"), None, None,
                            jnp.result_type(value))

    def output(self, carrier):
        return served_ops.materialize(carrier.twin).qa

    def site(self, site, eqn, ins, scope):
        sp = self.plan.site(site)
        state = scope.get(site.callpath, {})
        if site.kind == "cache":
            cache = ins[0]
            if not isinstance(cache, Carrier):
                return _bind(eqn, ins)
            spec = self.plan.cache_spec(site)
            update = QuantizedArray.quantize(ins[1], spec, pack=cache.twin.qa.packed)
            new = served_ops.write(served_ops.materialize(cache.twin).qa, update, ins[2:])
            return [Carrier(None, dataclasses.replace(cache.twin, qa=new))]
        if site.kind == "product":
            ins = [served_ops.dequantize(v.twin) if isinstance(v, Carrier) else v
                   for v in ins]
            if sp is not None:
                for i, name in enumerate(("lhs", "rhs")):
                    ins[i] = InputQuant(sp.act, state.get(name)).fake_quant(ins[i])
            return _bind(eqn, ins)
        carrier = ins[site.operand]
        if not isinstance(carrier, Carrier):  # a float weight
            error = _float_weight_error(self.plan, site)
            if error:
                raise ValueError(error)
            return _bind(eqn, ins)
        w = carrier.twin
        out_dtype = eqn.outvars[0].aval.dtype
        if site.kind == "lookup":
            return [served_ops.served_gather(eqn, w, ins[1])]
        a = site.activation
        x = ins[a]
        if w.input_scale is not None:
            scale = w.input_scale if w.perm is None else jnp.transpose(w.input_scale, w.perm)
            x = x * input_layout(scale, site, eqn).astype(x.dtype)
        quant = None
        if sp is not None and sp.act is not None:
            quant = InputQuant(sp.act, state.get("input"))
        if site.primitive == "dot_general":
            return [served_ops.served_dot_general(x, w, eqn.params, site.operand, quant,
                                                  out_dtype)]
        return [served_ops.served_conv_general_dilated(x, w, eqn.params, quant, out_dtype)]


def _float_weight_error(plan: Plan, site) -> str | None:
    """Why a weight site whose weight the served variables hold in float cannot be
    served (``None``: it can, its rule leaves it float)."""
    wp = plan.weights[site.weight]
    path = plan.graph.paths[site.weight]
    if wp.spec is not None:
        rule = plan.rules[wp.rule]
        return (f"serve_model: this call reaches {path!r}, which rule #{wp.rule} "
                f"({rule.module_path!r}) quantizes, but the served variables hold it in "
                "float: serve_model's sample call did not reach it. Serve with a sample call "
                "that reaches every weight the served calls use (e.g. the model's __call__ "
                "rather than one of its methods).")
    sp = plan.sites.get(site.callpath)
    if sp is not None and sp.act is not None:
        return (f"serve_model: {path!r} quantizes only its input; serving needs quantized "
                "weights (give its rule a weight spec).")
    return None


# -- from QAT variables to served ones ------------------------------------------------------
def served_weight(wp, value, learned=None, result=None):
    """The served form of one weight: a ``QuantizedArray`` (packed when <= 4 bits), in a
    ``ScaledKernel`` for a method result with an input factor."""
    spec = wp.spec
    if result is not None:
        qa = QuantizedArray.quantize(jnp.asarray(result.kernel), spec, state=result.state,
                                     pack="auto")
        return qa if result.input_scale is None else ScaledKernel(qa, result.input_scale)
    if learned is not None:
        state = qat.learned_state(jnp.shape(value), spec, *learned)
    else:
        state = calibrate(value, spec)
    return QuantizedArray.quantize(value, spec, state=state, pack="auto")


def _input_states(plan: Plan, variables) -> dict:
    """The sites' frozen input quantizers ``{callpath: {name: QuantState}}`` from QAT
    variables (see the module docstring)."""
    scope = plan.import_scope(variables)
    out = {}
    for callpath, sp in plan.sites.items():
        if sp.act is None or sp.dynamic:
            continue
        state = scope.get(callpath, {})
        frozen = {}
        if sp.site.kind == "product":
            for name in ("lhs", "rhs"):
                if name in state:
                    frozen[name] = _frozen(state[name], sp, callpath)
        elif sp.lsq:
            if "input_scale" in state:
                frozen["input"] = _learned_state(sp.act, state)
        elif "input" in state:
            frozen["input"] = _frozen(state["input"], sp, callpath)
        frozen = {k: v for k, v in frozen.items() if v is not None}
        if frozen:
            out[callpath] = frozen
    return out


def _learned_state(spec, state) -> QuantState:
    """A learned input step size (and float zero point) as a ``QuantState``."""
    scale = jnp.asarray(state["input_scale"])
    zero = state.get("input_zero_point")
    zero = jnp.zeros(scale.shape, jnp.int32) if zero is None else jnp.asarray(zero)
    return QuantState(scale, zero, spec)


def _frozen(stats, sp, callpath):
    """A range's frozen ``QuantState``; ``None`` if it saw nothing (calibrated per call)."""
    count = jnp.asarray(stats.count)
    if not isinstance(count, jax.core.Tracer):
        seen = int(jnp.sum(count > 0))
        if seen == 0:
            return None
        if seen != count.size:
            raise ValueError(
                f"serve_model: the input range of site {sp.site.module!r} "
                f"({sp.site.primitive}) saw data in {seen} of its {count.size} stacked "
                "layers; observe (train or calibrate_model) over batches that reach every "
                "layer before serving.")
    return observers.quant_state(stats, sp.act)


def served_variables(plan: Plan, variables: dict, params_key: str = "params") -> dict:
    """``{"params": served params, "quant_inputs": ...}`` from QAT ``variables``.

    Raises:
      ValueError: a rule that quantizes a weight's input but not the weight.
    """
    errors = [_float_weight_error(plan, sp.site) for sp in plan.sites.values()
              if sp.site.kind == "weight" and plan.weights[sp.site.weight].spec is None]
    errors = [e for e in errors if e]
    if errors:
        raise ValueError("\n".join(dict.fromkeys(errors)))
    params = variables[params_key]
    flat, treedef = jax.tree_util.tree_flatten(params)
    learned = {}
    for index, step in plan.weight_variables(variables, LEARNED, "weight_scale").items():
        zero = plan.weight_variables(variables, LEARNED, "weight_zero_point").get(index)
        learned[index] = (step, zero)
    methods = plan.weight_variables(variables, METHOD)
    for index, wp in plan.weights.items():
        if wp.spec is None:
            continue
        flat[index] = served_weight(wp, flat[index], learned.get(index), methods.get(index))
    served = jax.tree_util.tree_unflatten(treedef, flat)
    inputs = _input_states(plan, variables)
    exported = {}
    for callpath, state in inputs.items():
        site = plan.graph.site_at(callpath)
        for name, value in state.items():
            exported[plan.site_key(site) + (plan.entry(site, name),)] = value
    return {"params": served, INPUTS: nest(exported)}


def _import_inputs(plan: Plan, served_vars) -> dict:
    """The frozen quantizers found in served variables, by callpath."""
    out = {}
    tree = served_vars.get(INPUTS, {})
    for callpath, sp in plan.sites.items():
        site = sp.site
        names = ("lhs", "rhs") if site.kind == "product" else ("input",)
        state = {}
        for name in names:
            node = tree
            for k in plan.site_key(site) + (plan.entry(site, name),):
                node = node.get(k) if hasattr(node, "get") else None
                if node is None:
                    break
            if node is not None:
                state[name] = node
        if state:
            out[callpath] = state
    return out


def _float_avals(params, dtypes: dict):
    """The float parameter tree's shapes and dtypes, served weights replaced by their
    float ``ShapeDtypeStruct``."""
    def aval(path, x):
        if isinstance(x, ScaledKernel):
            x = x.kernel
        if isinstance(x, QuantizedArray):
            return jax.ShapeDtypeStruct(x.shape, dtypes.get(_name(path), jnp.float32))
        return x

    return jax.tree_util.tree_map_with_path(aval, params, is_leaf=is_served_leaf)


def _name(path) -> str:
    return "/".join(key_name(k) for k in path)


# -- served models ------------------------------------------------------------------------
class ServedFunction:
    """A served linen model or function: ``served_fn(served_vars, *args, **kwargs)``
    (linen: ``method=``, ``rngs=`` and ``mutable=`` too: ``served_fn(served_vars,
    tokens, decode=True, mutable=["cache"])`` returns ``(logits, {"cache": ...})`` with
    the KV cache updated -- codes and scales where a rule's ``kv_cache`` quantizes it)."""

    def __init__(self, model: VariablesModel, dtypes: dict):
        self.model, self.dtypes = model, dict(dtypes)

    def __call__(self, served_vars, *args, method=None, mutable=False, **kwargs):
        params = served_vars["params"]
        others = {k: v for k, v in served_vars.items() if k not in ("params", INPUTS)}
        avals = _float_avals(params, self.dtypes)
        float_vars = {"params": avals, **others}
        traced, arrays = self.model.trace(float_vars, args, kwargs, method,
                                          self.model.own_collections(mutable))
        out = _served_call(traced, params, arrays, served_vars)
        if mutable is False:
            return out
        return out if self.model.own_collections(mutable) else (out, {})


def _served_call(traced, params, arrays, served_vars):
    """The served outputs of one call of the ``traced`` signature."""
    return Traces.run(traced, Serve(traced.plan), params, arrays,
                      _import_inputs(traced.plan, served_vars))[0]


def _dtypes(plan: Plan) -> dict:
    return {wp.weight.path: wp.weight.dtype for wp in plan.weights.values()}


def _serve_variables_model(qmodel: VariablesModel, variables, args, kwargs, method=None):
    mutable = kwargs.pop("mutable", False)
    traced, _ = qmodel.trace(variables, args, kwargs, method, qmodel.own_collections(mutable))
    plan = traced.plan
    served = served_variables(plan, variables)
    params, others = qmodel.split(variables)
    del params
    out = {**others, **served}
    return ServedFunction(qmodel, _dtypes(plan)), out


def serve_model(qmodel, *args, **kwargs):
    """The served form of a ``quantize_model`` model (see the module docstring).

    linen / a function: ``serve_model(qmodel, variables, *args, **kwargs)`` ->
    ``(served_fn, served_vars)``; ``args`` / ``kwargs`` are a sample call (traced
    abstractly), ``method=`` serves another linen method.
    nnx: ``serve_model(qmodel, *args)`` -> a served copy (``args``: a sample call,
    optional once the model has been called).
    Equinox: ``serve_model(qmodel, state, *args)`` -> a served module.
    """
    method = kwargs.pop("method", None)
    if isinstance(qmodel, VariablesModel):
        if not args:
            raise TypeError("serve_model(qmodel, variables, *sample_args): the trained "
                            "variables and a sample call.")
        return _serve_variables_model(qmodel, args[0], args[1:], kwargs, method)
    if models.is_equinox(qmodel):
        if not args:
            raise TypeError("serve_model(qmodel, state, *sample_args) for an Equinox model.")
        return _serve_equinox(qmodel, args[0], args[1:], kwargs)
    if models.is_quantized_nnx(qmodel):
        return _serve_nnx(qmodel, args, kwargs)
    raise TypeError(f"serve_model takes a quantize_model model; got {type(qmodel).__name__}.")


def _flat_served(served: dict) -> dict:
    """Served variables with the parameters as a list of leaves (an nnx ``State`` or an
    Equinox module is not a checkpoint tree; the served model knows their structure)."""
    leaves = jax.tree_util.tree_leaves(served["params"], is_leaf=is_served_leaf)
    return {**served, "params": leaves}


def _unflat_served(template: dict, stored: dict) -> dict:
    """Inverse of ``_flat_served`` with ``template``'s parameter structure."""
    treedef = jax.tree_util.tree_structure(template["params"], is_leaf=is_served_leaf)
    return {**stored, "params": jax.tree_util.tree_unflatten(treedef, stored["params"])}


# -- nnx ----------------------------------------------------------------------------------------
@functools.cache
def _served_nnx_class():
    from flax import nnx

    class ServedVariables(nnx.Variable):
        """A served model's codes, scales and frozen input quantizers."""

    class ServedNnxModel(nnx.Module):
        """A served nnx model: the float model's structure, its weights as codes +
        scales, its inputs' frozen quantizers.  Call it like the model."""

        def __init__(self, qmodel, served, graphdef, rest, dtypes):
            self.graphdef = graphdef
            self.served = ServedVariables(served)
            self.rest = ServedVariables(rest)
            self.rules = qmodel.rules
            self.dtypes = dict(dtypes)

        def served_variables(self) -> dict:
            """The served codes, scales and input quantizers (what ``save_quantized``
            writes: the parameters as the list of their leaves)."""
            return _flat_served(self.served.get_value())

        def set_state(self, model) -> None:
            """Copy ``model``'s non-parameter state (its caches, batch statistics) into
            this served copy: e.g. fresh caches, ``model.init_cache(b);
            served.set_state(model)``."""
            self.rest.set_value(nnx.state(model, nnx.Not(nnx.Param)))

        def with_served_variables(self, stored) -> ServedNnxModel:
            """A copy with stored served variables (``load_quantized(path, like=...)``)."""
            copy = nnx.clone(self)
            copy.served.set_value(_unflat_served(self.served.get_value(), stored))
            return copy

        def __call__(self, *args, **kwargs):
            served = self.served.get_value()
            fn = models.nnx_function(self.rules, self.graphdef)
            variables = {"params": _float_avals(served["params"], self.dtypes),
                         "rest": self.rest.get_value()}
            traced, arrays = fn.trace(variables, args, kwargs)
            out, rest = _served_call(traced, served["params"], arrays, served)
            self.rest.set_value(rest)  # its caches (codes and scales where quantized)
            return out

    return ServedNnxModel


def _serve_nnx(qmodel, args, kwargs):
    """The served copy runs the model's evaluation graph (``eval()`` on a copy: no
    dropout, running batch statistics), whatever mode ``qmodel`` is in; the rules'
    plan comes from its most recent call, in whichever mode."""
    from flax import nnx

    if args or kwargs:
        qmodel.run(args, kwargs, mode="eval")
    _, variables = models.nnx_variables(qmodel)
    traced = qmodel.last_trace()
    if traced is None:
        raise TypeError("serve_model(qmodel, *args): this nnx model has not been called yet; "
                        "pass a sample call.")
    model = nnx.clone(qmodel.model)
    model.eval()
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    served = served_variables(traced.plan, variables)
    return _served_nnx_class()(qmodel, served, graphdef, rest, _dtypes(traced.plan))


# -- Equinox --------------------------------------------------------------------------------
@functools.cache
def _served_equinox_class():
    import equinox as eqx

    class ServedEquinox(eqx.Module):
        """A served Equinox model: call it like the model."""

        served: dict
        static: Any
        rules: tuple = eqx.field(static=True)
        call: Any = eqx.field(static=True)
        dtypes: tuple = eqx.field(static=True)

        def served_variables(self) -> dict:
            """The served codes, scales and input quantizers (what ``save_quantized``
            writes: the parameters as the list of their leaves)."""
            return _flat_served(self.served)

        def with_served_variables(self, stored) -> ServedEquinox:
            """A copy with stored served variables (``load_quantized(path, like=...)``)."""
            return eqx.tree_at(lambda m: m.served, self, _unflat_served(self.served, stored))

        def __call__(self, *args, **kwargs):
            fn = models.eqx_function(self.rules, self.static, self.call)
            dtypes = dict(self.dtypes)
            variables = {"params": _float_avals(self.served["params"], dtypes)}
            traced, arrays = fn.trace(variables, args, kwargs)
            return _served_call(traced, self.served["params"], arrays, self.served)

    return ServedEquinox


def _serve_equinox(qmodel, state, args, kwargs):
    fn, variables = qmodel.variables(state)
    traced, _ = fn.trace(variables, args, kwargs)
    served = served_variables(traced.plan, variables)
    return _served_equinox_class()(served, fn.static, qmodel.rules, qmodel.call,
                                   tuple(sorted(_dtypes(traced.plan).items())))

