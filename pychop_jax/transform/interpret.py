"""Running a traced function with its weights quantized: the interpreter.

``run(graph, handler, inputs, scope)`` evaluates the jaxpr ``dataflow.analyze`` saw,
equation by equation, under the current JAX trace (so it composes with ``jit``,
``grad``, ``vmap`` around it), the way ``jax.experimental.sparse.sparsify`` does:

* each parameter that is a ``Weight`` enters as a ``Carrier``: its float value and
  the handler's quantized twin (``handler.weight``); a view of a carrier
  (``views.STRUCTURAL``) is a carrier whose twin is the handler's view of the twin
  (``handler.view``), so a weight is quantized once, whatever path it takes;
* a site (``dataflow.Site``) is computed by the handler (``handler.site``); every
  other equation is bound as it was, carriers replaced by their float values (a norm
  scale or bias, or a weight's non-matmul use, stays float);
* higher-order equations with sites or carriers inside are re-emitted through JAX's
  public API over this interpreter: ``scan`` -> ``lax.scan``, ``cond`` ->
  ``lax.switch``, ``while`` -> ``lax.while_loop``, ``remat`` -> ``jax.checkpoint``
  (same policy); ``jit`` and ``custom_jvp`` / ``custom_vjp`` functions are inlined
  (a custom derivative rule would not know the quantized body: autodiff of the
  quantized body, straight-through estimators included, replaces it).

**State.**  Sites may keep state (observer ranges, learned input step sizes, input
statistics): ``scope`` maps a site's ``callpath`` to its state, a pytree.  A site in
a scan body has one state per iteration: the state enters the scan stacked along
the scan's length and each iteration gets its slice, so a stacked layer gets one
input range per layer without the model declaring anything.  A site in a ``while``
body has one state for all iterations (carried); a site in a ``cond`` branch keeps
its state when the other branch runs.  ``handler.initial(site)`` gives a site's
state where the scope has none (repeated along its enclosing scans): every site with
state has one in the scope from the start, so branches and loop bodies carry the same
states.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from jax import lax
from jax.extend.core import Literal

from . import views
from .dataflow import HIGHER_ORDER, Graph, Site, _sub

__all__ = ["Carrier", "Handler", "run"]


@dataclasses.dataclass
class Carrier:
    """A view of a weight inside the interpreted function.

    Attributes:
      value: its float value (``None`` when the handler holds only the quantized form:
        served codes), see ``Handler.dequantized``.
      twin: the handler's quantized form of the same view.
    """

    value: Any
    twin: Any


class Handler:
    """What a mode of the transform does at weights and sites (fake quantization for
    QAT, codes for serving, statistics for calibration).  The defaults leave everything
    float."""

    def weight(self, weight, value):
        """The quantized twin of parameter ``weight`` (a ``dataflow.Weight``) whose
        value is ``value``; ``None``: the weight stays float."""
        return None

    def view(self, eqn, twin, dynamic):
        """The twin of the view ``eqn`` makes (``dynamic``: the equation's other
        operands)."""
        return eqn.primitive.bind(twin, *dynamic, **eqn.params)

    def dequantized(self, carrier: Carrier):
        """A carrier's float value where an equation needs one."""
        return carrier.value

    def float_value(self, weight, value):
        """The float value a weight's carrier keeps (``None``: only the twin, e.g.
        served codes)."""
        return value

    def state(self, index: int, value):
        """The twin of model-state input ``index`` (a KV cache a rule quantizes), or
        ``None`` (float)."""
        return None

    def output(self, carrier: Carrier):
        """What the function returns for a carrier (a written cache): its float value,
        or the handler's form of it (served codes)."""
        return self.dequantized(carrier)

    def scan_parts(self, twin):
        """``(arrays, rebuild)``: a twin as arrays a scan slices along their axis 0, and
        the function that makes one iteration's twin from their slices."""
        return twin, lambda sliced: sliced

    def site(self, site: Site, eqn, ins, scope: dict):
        """The outputs of ``site``'s equation; ``ins``: its operands (``Carrier`` s for
        weights); ``scope``: the states, to read and update (``scope[site.callpath]``)."""
        return None

    def initial(self, site: Site):
        """A site's state where the scope has none (``None``: no state)."""
        return None


def _bind(eqn, vals):
    params = eqn.primitive.get_bind_params(eqn.params)
    if isinstance(params, tuple):  # (subfuns, params) on some JAX versions
        subfuns, params = params
        vals = [*subfuns, *vals]
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*vals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


class _Run:
    def __init__(self, graph: Graph, handler: Handler):
        self.graph, self.handler = graph, handler
        self.stateful = [s for s in graph.sites if s.kind != "float"]

    # -- values ---------------------------------------------------------------------------
    def floats(self, vals):
        return [self.handler.dequantized(v) if isinstance(v, Carrier) else v for v in vals]

    # -- jaxprs --------------------------------------------------------------------------
    def eval(self, jaxpr, consts, ins, prefix, scope, depth=0):
        env = {}
        for v, x in zip(jaxpr.constvars, consts, strict=True):
            env[v] = x
        for v, x in zip(jaxpr.invars, ins, strict=True):
            env[v] = x
        read = lambda v: v.val if isinstance(v, Literal) else env[v]  # noqa: E731
        for i, eqn in enumerate(jaxpr.eqns):
            path = prefix + (i,)
            vals = [read(v) for v in eqn.invars]
            outs = self.equation(eqn, path, vals, scope, depth)
            for v, x in zip(eqn.outvars, outs, strict=True):
                env[v] = x
        return [read(v) for v in jaxpr.outvars]

    def equation(self, eqn, path, vals, scope, depth):
        site = self.graph.site_at(path)
        if site is not None and site.kind != "float":
            return self.handler.site(site, eqn, vals, scope)
        name = eqn.primitive.name
        if name in HIGHER_ORDER and path in self.graph.active:
            return self.higher_order(eqn, path, vals, scope, depth)
        if vals and isinstance(vals[0], Carrier) and views.is_structural(eqn):
            if name == "optimization_barrier":
                return vals
            carrier, dynamic = vals[0], self.floats(vals[1:])
            value = None if carrier.value is None else _bind(eqn, [carrier.value, *dynamic])[0]
            return [Carrier(value, self.handler.view(eqn, carrier.twin, dynamic))]
        return _bind(eqn, self.floats(vals))

    # -- states of the sites inside a higher-order equation -------------------------------------
    def inner(self, prefix) -> list[Site]:
        n = len(prefix)
        return [s for s in self.stateful if s.callpath[:n] == prefix]

    def states(self, sites, scope, depth: int) -> dict:
        """The states of ``sites`` seen from ``depth`` enclosing scans: the scope's, else
        their initial ones, repeated along their scans deeper than ``depth``."""
        out = {}
        for s in sites:
            if s.callpath in scope:
                out[s.callpath] = scope[s.callpath]
                continue
            state = self.handler.initial(s)
            if state is not None:
                lead = tuple(s.stack[depth:])
                out[s.callpath] = jax.tree_util.tree_map(
                    lambda a, lead=lead: jax.numpy.broadcast_to(a, lead + jax.numpy.shape(a)),
                    state)
        return out

    # -- higher-order equations ----------------------------------------------------------------
    def higher_order(self, eqn, path, vals, scope, depth):
        name = eqn.primitive.name
        subs = _sub(eqn)
        if name == "scan":
            return self.scan(eqn, path, vals, scope, depth, subs[0])
        if name == "cond":
            return self.cond(path, vals, scope, depth, subs)
        if name == "while":
            return self.while_loop(eqn, path, vals, scope, depth, subs)
        jaxpr, consts = subs[0]
        if name in ("remat", "remat2", "checkpoint"):
            return self.remat(eqn, path, vals, scope, depth, jaxpr, consts)
        return self.eval(jaxpr, consts, vals, path + (0,), scope, depth)  # jit, custom_*

    def scan(self, eqn, path, vals, scope, depth, sub):
        p = eqn.params
        nc, nk = p["num_consts"], p["num_carry"]
        jaxpr, consts = sub
        body_path = path + (0,)
        given = self.states(self.inner(body_path), scope, depth)
        const_vals, carry, xs = vals[:nc], self.floats(vals[nc:nc + nk]), vals[nc + nk:]
        parts = [self.handler.scan_parts(x.twin) if isinstance(x, Carrier) else (None, None)
                 for x in xs]
        xs_split = [(x.value, part) if isinstance(x, Carrier) else (x, None)
                    for x, (part, _) in zip(xs, parts, strict=True)]

        def body(c, x):
            x_vals, local = x[0], dict(x[1])
            ins = [Carrier(v, rebuild(t)) if isinstance(orig, Carrier) else v
                   for (v, t), orig, (_, rebuild) in zip(x_vals, xs, parts, strict=True)]
            outs = self.floats(self.eval(jaxpr, consts, [*const_vals, *c, *ins], body_path,
                                         local, depth + 1))
            return outs[:nk], (outs[nk:], local)

        carry_out, (ys, new) = lax.scan(body, carry, (xs_split, given), length=p["length"],
                                        reverse=p["reverse"], unroll=p.get("unroll", 1))
        scope.update(new)
        return [*carry_out, *ys]

    def cond(self, path, vals, scope, depth, subs):
        index, operands = vals[0], vals[1:]
        sites = [s for b in range(len(subs)) for s in self.inner(path + (b,))]
        start = self.states(sites, scope, depth)

        def branch(b):
            jaxpr, consts = subs[b]

            def fn(states):
                local = dict(states)
                outs = self.eval(jaxpr, consts, operands, path + (b,), local, depth)
                return self.floats(outs), local

            return fn

        outs, new = lax.switch(index, [branch(b) for b in range(len(subs))], start)
        scope.update(new)
        return outs

    def while_loop(self, eqn, path, vals, scope, depth, subs):
        p = eqn.params
        nc, nb = p["cond_nconsts"], p["body_nconsts"]
        (cond_jaxpr, cond_consts), (body_jaxpr, body_consts) = subs
        cond_vals, body_vals, init = vals[:nc], vals[nc:nc + nb], self.floats(vals[nc + nb:])
        start = self.states(self.inner(path + (1,)), scope, depth)
        frozen = self.states(self.inner(path + (0,)), scope, depth)

        def cond_fn(carry):
            local = dict(frozen)  # the condition's sites observe nothing
            return self.eval(cond_jaxpr, cond_consts, [*cond_vals, *carry[0]], path + (0,),
                             local, depth)[0]

        def body_fn(carry):
            c, states = carry
            local = dict(states)
            outs = self.eval(body_jaxpr, body_consts, [*body_vals, *c], path + (1,), local,
                             depth)
            return self.floats(outs), local

        outs, new = lax.while_loop(cond_fn, body_fn, (init, start))
        scope.update(new)
        return outs

    def remat(self, eqn, path, vals, scope, depth, jaxpr, consts):
        p = eqn.params
        start = self.states(self.inner(path + (0,)), scope, depth)
        split = [(v.value, v.twin) if isinstance(v, Carrier) else (v, None) for v in vals]

        def fn(args, states):
            local = dict(states)
            ins = [Carrier(v, t) if isinstance(orig, Carrier) else v
                   for (v, t), orig in zip(args, vals, strict=True)]
            outs = self.eval(jaxpr, consts, ins, path + (0,), local, depth)
            return self.floats(outs), local

        outs, new = jax.checkpoint(fn, prevent_cse=p.get("prevent_cse", True),
                                   policy=p.get("policy"))(split, start)
        scope.update(new)
        return outs


def run(graph: Graph, handler: Handler, inputs, scope: dict | None = None):
    """Evaluate ``graph``'s function on the flat ``inputs`` (parameters first) with
    ``handler``; returns ``(flat outputs, scope)`` (``scope``: the sites' states,
    stacked along enclosing scans; see the module docstring)."""
    scope = {} if scope is None else dict(scope)
    closed = graph.jaxpr
    runner = _Run(graph, handler)
    ins = list(inputs)
    for index, weight in graph.weights.items():
        twin = handler.weight(weight, ins[index])
        if twin is not None:
            ins[index] = Carrier(handler.float_value(weight, ins[index]), twin)
    for index in graph.state_paths:
        twin = handler.state(index, ins[index])
        if twin is not None:
            ins[index] = Carrier(None, twin)
    scope = runner.states(runner.stateful, scope, 0)
    outs = runner.eval(closed.jaxpr, closed.consts, ins, (), scope)
    return [handler.output(v) if isinstance(v, Carrier) else v for v in outs], scope
