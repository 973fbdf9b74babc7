"""Rules laid on a traced model: what each weight and each site gets, and where its
state lives.

``make_plan(graph, rules)`` resolves every ``dataflow.Weight`` and ``dataflow.Site``
against the first matching ``QuantRule``:

* a weight's spec is the rule's ``weight`` laid on the weight's storage axes
  (``weight_spec``): ``axis=None`` per tensor; per output channel -> the axes no use
  contracts (``axis`` an int, or a tuple of them); ``group_size=g`` -> groups along the
  last contracted axis (one group spanning it when it is no longer than ``g``);
* a weight site's input spec is the rule's ``act`` (a lookup has none); a per-block
  input spec must have its blocks along an axis the matmul contracts;
* an activation product's operand spec is the rule's ``attention``.

Every configuration error (a group size that does not divide its axis, blocks
along a free axis, a method on a layout the algorithms cannot read) is collected
and raised once, naming each weight, op and shape.

**Where state lives** (``state_key``): the quantized model's variables mirror the
parameter tree.  Per weight (path ``a/b/kernel``): ``quant_params/a/b/kernel/
weight_scale`` (+ ``weight_zero_point``, LSQ) and ``quant_method/a/b/kernel`` (a
``MethodResult``).  Per use ``n`` of the weight (``n = 0`` unsuffixed, then ``_1``,
``_2``, ...): ``quant_stats/a/b/kernel/input`` (the observer's ``RangeState``) or
``quant_params/a/b/kernel/input_scale`` (+ ``input_zero_point``, LSQ).  Per
activation product ``n`` of module ``a/b``: ``quant_stats/a/b/product_n/{lhs,rhs}``.
Inside scans each of these is stacked along the scans' lengths.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from ..core.spec import QuantSpec
from . import qat
from .dataflow import Graph, Site, Weight
from .rules import OpReport, QuantReport, QuantRule, describe_spec, first_match

__all__ = ["WeightPlan", "SitePlan", "Plan", "make_plan", "weight_spec", "STATS", "LEARNED",
           "METHOD", "COLLECTIONS", "nest", "flatten", "collection_of"]

#: the collections of a quantized model's variables
STATS = "quant_stats"
LEARNED = "quant_params"
METHOD = "quant_method"
COLLECTIONS = (STATS, LEARNED, METHOD)


def collection_of(entry: str) -> str:
    """The collection a site-state entry belongs to (observer ranges: ``STATS``; learned
    step sizes: ``LEARNED``)."""
    return LEARNED if entry.startswith(("input_scale", "input_zero_point")) else STATS


def weight_spec(template: QuantSpec | None, weight: Weight) -> QuantSpec | None:
    """A rule's weight spec laid on ``weight`` (see the module docstring).

    Raises:
      ValueError: a group size that does not divide the contracted axis, or a grouped
        spec on a weight whose matmul contracts nothing.
    """
    if template is None:
        return None
    if template.axis is None:
        return template
    shape = weight.shape
    if template.group_size is not None:
        if not weight.contracted:
            raise ValueError(f"{_where(weight)}: groups of {template.group_size} lie along "
                             "the contracted axis, and its matmul contracts none of its axes; "
                             "use a per-channel or per-tensor spec.")
        axis = max(weight.contracted)
        if shape[axis] <= template.group_size:  # one group spans the axis
            return dataclasses.replace(template, axis=axis, group_size=shape[axis])
        if shape[axis] % template.group_size:
            raise ValueError(
                f"{_where(weight)}: groups of {template.group_size} along its contracted axis "
                f"{axis} (length {shape[axis]}) do not divide it; use a group size that "
                f"divides {shape[axis]}, or another rule for this weight.")
        return dataclasses.replace(template, axis=axis)
    free = weight.free
    if not free:
        return dataclasses.replace(template, axis=None)
    return dataclasses.replace(template, axis=free if len(free) > 1 else free[0])


def _where(weight: Weight) -> str:
    ops = ", ".join(sorted({f"{u.primitive} contracting axes {u.contracted}" for u in weight.uses}))
    return f"weight {weight.path!r} of shape {weight.shape} ({ops})"


@dataclasses.dataclass(frozen=True)
class WeightPlan:
    """A weight's quantization.

    Attributes:
      weight: the ``dataflow.Weight``.
      rule: index of the rule that took it (``None``: no rule).
      spec: its spec on its storage axes (``None``: float).
      lsq: learned step size.
      method: the rule's ``QuantMethod``, if any.
    """

    weight: Weight
    rule: int | None
    spec: QuantSpec | None
    lsq: bool = False
    method: Any = None


@dataclasses.dataclass(frozen=True)
class SitePlan:
    """A site's quantization: its input's (weight sites) or both operands' (products).

    Attributes:
      site: the ``dataflow.Site``.
      rule: index of the rule that took it.
      act: the input (or each product operand) spec, ``None``: float.
      observer: the range observer (observed inputs).
      lsq: learned input step size.
    """

    site: Site
    rule: int | None
    act: QuantSpec | None
    observer: Callable | None = None
    lsq: bool = False

    @property
    def dynamic(self) -> bool:
        """Per-block input, calibrated on each call (no state)."""
        return self.act is not None and qat.is_dynamic(self.act)

    @property
    def observes(self) -> bool:
        return self.act is not None and not self.lsq and not self.dynamic


@dataclasses.dataclass
class Plan:
    """Rules resolved on a graph (see the module docstring).  ``caches``: ``{model-state
    input position: QuantSpec}`` of the KV caches a rule's ``kv_cache`` quantizes."""

    graph: Graph
    rules: tuple[QuantRule, ...]
    weights: dict[int, WeightPlan]
    sites: dict[tuple, SitePlan]
    report: QuantReport
    caches: dict = dataclasses.field(default_factory=dict)

    def site(self, site: Site) -> SitePlan | None:
        return self.sites.get(site.callpath)

    def cache_spec(self, site: Site) -> QuantSpec | None:
        """The format a cache site writes (``None``: float)."""
        return self.caches.get(site.state)

    def quantized_weights(self) -> list[WeightPlan]:
        return [p for p in self.weights.values() if p.spec is not None]

    # -- where state lives -------------------------------------------------------------
    def weight_key(self, weight: Weight) -> tuple[str, ...]:
        return tuple(weight.path.split("/"))

    def site_key(self, site: Site) -> tuple[str, ...]:
        if site.kind == "product":
            module = tuple(site.module.split("/")) if site.module else ()
            return module + (f"product_{site.index}",)
        return self.weight_key(self.graph.weights[site.weight])

    def entry(self, site: Site, name: str) -> str:
        """A site's state entry name in the variables (``input`` -> ``input_1`` for a
        weight's second use)."""
        if site.kind == "product" or site.index == 0:
            return name
        return f"{name}_{site.index}"

    def export(self, scope: dict) -> dict:
        """The sites' states as nested collections ``{collection: tree}``."""
        flat: dict = {}
        for callpath, state in scope.items():
            site = self.graph.site_at(callpath)
            for name, value in state.items():
                key = self.site_key(site) + (self.entry(site, name),)
                flat[(collection_of(name),) + key] = value
        return nest(flat)

    def import_scope(self, variables: dict) -> dict:
        """The sites' states found in ``variables`` (nested collections); a site with no
        entry there is left out (it starts from its initial state)."""
        scope = {}
        for site in self.graph.sites:
            plan = self.sites.get(site.callpath)
            if plan is None:
                continue
            state = {}
            for name in _entries(plan):
                key = (collection_of(name),) + self.site_key(site) + (self.entry(site, name),)
                value = _lookup(variables, key)
                if value is not None:
                    state[name] = value
            if state:
                scope[site.callpath] = state
        return scope

    def weight_variables(self, variables: dict, collection: str, name: str | None = None):
        """``{weight index: value}`` of a per-weight variable (``quant_method`` results,
        ``quant_params`` weight steps) found in ``variables``."""
        out = {}
        for index, wp in self.weights.items():
            key = (collection,) + self.weight_key(wp.weight) + ((name,) if name else ())
            value = _lookup(variables, key)
            if value is not None:
                out[index] = value
        return out


def _entries(plan: SitePlan) -> tuple[str, ...]:
    if plan.site.kind == "product":
        return ("lhs", "rhs") if plan.act is not None else ()
    if plan.act is None or plan.dynamic:
        return ()
    if plan.lsq:
        return ("input_scale",) if plan.act.symmetric else ("input_scale", "input_zero_point")
    return ("input",)


def _lookup(tree, key):
    for k in key:
        if not hasattr(tree, "get"):
            return None
        tree = tree.get(k)
        if tree is None:
            return None
    return tree


def nest(flat: dict) -> dict:
    """``{(k1, k2, ...): v}`` -> ``{k1: {k2: ... v}}``."""
    out: dict = {}
    for key, value in flat.items():
        node = out
        for k in key[:-1]:
            node = node.setdefault(k, {})
        node[key[-1]] = value
    return out


def flatten(tree, prefix=()) -> dict:
    """Inverse of ``nest`` for dict-nested trees (leaves: anything not a dict)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def make_plan(graph: Graph, rules) -> Plan:
    """Resolve ``rules`` on ``graph`` (see the module docstring).

    Raises:
      ValueError: every configuration error at once.
    """
    rules = tuple(rules)
    errors: list[str] = []
    weights: dict[int, WeightPlan] = {}
    for index, w in graph.weights.items():
        r = first_match(rules, w.module)
        rule = None if r is None else rules[r]
        spec = None
        if rule is not None:
            try:
                spec = weight_spec(rule.weight_template(), w)
            except ValueError as e:
                errors.append(str(e))
        weights[index] = WeightPlan(w, r, spec, lsq=bool(rule and rule.lsq) and spec is not None,
                                    method=rule.method if rule is not None and spec is not None
                                    else None)
    sites: dict[tuple, SitePlan] = {}
    caches: dict = {}
    ops = []
    for site in graph.sites:
        if site.kind == "cache":
            r = first_match(rules, site.module)
            shape = tuple(site.eqn.invars[0].aval.shape)
            spec = None if r is None else rules[r].kv_cache_spec(len(shape))
            if spec is not None and spec.group_size is not None and \
                    spec.group_size >= shape[-1]:  # one group spans head_dim
                spec = dataclasses.replace(spec, group_size=shape[-1])
            if spec is not None:
                caches[site.state] = spec
            what = (f"cache {describe_spec(spec, resolved=True)}" if spec is not None else
                    "float cache (no rule with kv_cache= matches)")
            ops.append(OpReport(site.module, site.primitive, "cache",
                                graph.state_paths.get(site.state), shape, (),
                                r if spec is not None else None, spec is not None, what,
                                site.stack, input_spec=spec))
            continue
        if site.kind == "float":
            ops.append(OpReport(site.module, site.primitive, "float", None, site.shapes, (),
                                None, False, site.reason, site.stack))
            continue
        if site.kind == "product":
            r = first_match(rules, site.module)
            spec = None if r is None else rules[r].attention_spec()
            if spec is not None:
                rule = rules[r]
                sites[site.callpath] = SitePlan(site, r, spec, rule.observer_fn())
            if spec is not None:
                what = f"both operands {describe_spec(spec, act=True)}"
            elif r is None:
                what = "float (no rule matches)"
            else:
                what = f"float (rule #{r}, the first that matches, has no attention=)"
            ops.append(OpReport(site.module, site.primitive, "product", None, site.shapes, (),
                                r if spec is not None else None, spec is not None, what,
                                site.stack, input_spec=spec))
            continue
        wp = weights[site.weight]
        w = wp.weight
        rule = None if wp.rule is None else rules[wp.rule]
        act = None
        if rule is not None and site.kind == "weight":
            act = rule.act_spec()
            if act is not None and qat.is_dynamic(act):
                last = site.eqn.invars[site.activation].aval.shape[-1]
                if act.group_size >= last:  # one block spans the row: per token
                    act = dataclasses.replace(act, group_size=last)
                err = _block_input_error(site, act, w)
                if err:
                    errors.append(err)
        if rule is not None and (wp.spec is not None or act is not None):
            sites[site.callpath] = SitePlan(site, wp.rule, act, rule.observer_fn(),
                                            lsq=rule.lsq and act is not None)
        quantized = wp.spec is not None or act is not None
        if rule is None:
            what = "float (no rule matches)"
        elif not quantized:
            what = f"float (excluded by rule #{wp.rule})"
        else:
            what = (f"weight {describe_spec(wp.spec, resolved=True)}, input "
                    f"{describe_spec(act, act=True) if site.kind == 'weight' else 'ids'}")
        ops.append(OpReport(site.module, site.primitive, site.kind, w.path, w.shape,
                            site.contracted, wp.rule, quantized, what, site.stack,
                            weight_spec=wp.spec, input_spec=act))
    if errors:
        raise ValueError("quantize_model: the rules do not fit the model:\n  - "
                         + "\n  - ".join(dict.fromkeys(errors)))
    return Plan(graph, rules, weights, sites, QuantReport(rules, tuple(ops)), caches)


def _block_input_error(site: Site, act: QuantSpec, weight: Weight) -> str | None:
    """Why a per-block input spec does not fit a weight site (``None``: it fits)."""
    eqn = site.eqn
    a = site.activation
    shape = tuple(eqn.invars[a].aval.shape)
    ndim = len(shape)
    where = (f"weight {weight.path!r}: its {site.primitive} input of shape {shape}, rule act "
             f"{describe_spec(act, act=True)}")
    if ndim == 0 or act.resolve_axis(ndim) != ndim - 1:
        return (f"{where}: block-scaled inputs have their blocks along the input's last axis "
                "(axis=-1).")
    if shape[-1] % act.group_size:
        return (f"{where}: blocks of {act.group_size} do not divide the last axis "
                f"({shape[-1]}); use a block size that divides it, or a per-tensor act spec.")
    if site.primitive == "dot_general":
        (lc, rc), _ = eqn.params["dimension_numbers"]
        contracted = lc if a == 0 else rc
    else:
        contracted = (eqn.params["dimension_numbers"].lhs_spec[1],)
    if ndim - 1 not in {d % ndim for d in contracted}:
        return (f"{where}: the matmul does not contract the input's last axis (it contracts "
                f"{tuple(contracted)}); MX / NVFP4 blocks must lie along the contraction. Give "
                "this weight a per-tensor act spec in an earlier rule, or exclude it.")
    return None
