"""``calibrate_model``: run a quantized model's post-training algorithms and observe its
input ranges, from calibration batches -- for every framework.

::

    qmodel = pj.quantize_model(model, [
        pj.QuantRule(".*mlp/.*", weight=spec4, method=pj.algorithms.GPTQ(act_order=True)),
        pj.QuantRule(".*", weight=8, act=8, method=pj.algorithms.SmoothQuant(alpha=0.5)),
    ])
    variables, report = pj.calibrate_model(qmodel, variables, batches)   # linen, function
    qmodel, report = pj.calibrate_model(qmodel, batches)                 # nnx (in place)
    state, report = pj.calibrate_model(qmodel, state, batches)           # Equinox

``batches``: a sequence (read several times) of the model's positional arguments,
each an array (one argument) or a tuple of them; ``**call_kwargs`` go to every call.

What it does, in order:

1. traces the model on the first batch and finds the weights whose rule has a
   ``method``, their matmul and its layout (``site_layout``: the weight as ``W (K,
   N)``, its input as ``X (M, K)``, read off the dimension numbers through the
   weight's views).  A weight in a scanned stack is one unit per layer;
2. runs the calibration-free methods (HQQ) on their weights;
3. **sequentially** for the others, in the order the model computes them (layer by
   layer in a stack): a pass over every batch (one jitted call per batch) collects
   the input statistics of the next unit -- and of the later units whose matmul takes
   the very same input array (the q / k / v projections of one attention) -- with
   every unit processed so far quantized by its algorithm and the others by
   round-to-nearest, as GPTQ's and AWQ's sequential procedures prescribe.  ``L`` such
   groups cost ``L`` passes;
4. observes the inputs' ranges (``act`` rules) from scratch over every batch, with the
   algorithms' results in place (SmoothQuant's ranges are the smoothed inputs').

The results (``quant_method``: a ``MethodResult`` per weight, in the parameter's
layout) and fresh ranges (``quant_stats``) come back in the framework's form;
``params`` are not changed.  ``serve_model`` turns them into codes and scales.

Raises ``ValueError`` for a method on a weight the algorithms do not cover (a
convolution, a lookup-only table, a weight used by several matmuls, batch axes,
a weight indexed inside a ``while`` loop), on a grid they do not handle
(``KernelLayout.plan``), for a weight no batch reaches, and for non-finite inputs.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from ...core.ops import calibrate, fake_quant
from ...flax import models
from ...transform.dataflow import Site
from ...transform.function import VariablesModel
from ...transform.methods import MethodResult
from ...transform.plan import METHOD, STATS, Plan, nest
from ...transform.training import FakeQuant
from .layout import KernelLayout
from .stats import batch_stats, merge

__all__ = ["calibrate_model", "CalibrationReport", "LayerCalibration", "site_layout"]

#: rows of input kept per weight for methods that need them and do not say how many
DEFAULT_MAX_ROWS = 4096


@dataclasses.dataclass(frozen=True)
class LayerCalibration:
    """What an algorithm did to one weight (one layer of a stacked weight).

    Attributes:
      path: the weight's parameter path (``"layers/mlp/kernel[1]"``: layer 1 of a stack).
      method: the algorithm's name.
      rows: calibration input rows its statistics came from (0: calibration-free).
      step: the sequential pass that collected them (0: calibration-free).
      details: the algorithm's numbers (GPTQ: ``gptq_loss``; AWQ: ``alpha``, ``clip_mean``,
        ``error``, ``rtn_error``; SmoothQuant: ``outliers``, ``outliers_smoothed``;
        HQQ: ``lp``, ``lp_rtn``).
    """

    path: str
    method: str
    rows: int
    step: int
    details: dict


@dataclasses.dataclass(frozen=True)
class CalibrationReport:
    """The weights ``calibrate_model`` ran an algorithm on, in processing order."""

    layers: tuple[LayerCalibration, ...]
    passes: int

    def by_path(self) -> dict[str, LayerCalibration]:
        return {e.path: e for e in self.layers}

    def __str__(self) -> str:
        lines = [f"calibrate_model: {len(self.layers)} weight(s), {self.passes} pass(es)"]
        for e in self.layers:
            numbers = ", ".join(f"{k}={v:.4g}" for k, v in e.details.items())
            lines.append(f"  {e.path:<32} {e.method:<12} rows={e.rows:<7} {numbers}")
        return "\n".join(lines)


def site_layout(site: Site, shape) -> tuple[KernelLayout, tuple[int, ...]]:
    """``(layout, stacked)``: the ``KernelLayout`` of one slice of the weight of ``site``
    (a ``dot_general`` weight site) and the parameter axes its slices stack along (the
    layers of a scanned stack).

    Raises:
      ValueError: a matmul the algorithms do not cover (see the module docstring).
    """
    eqn = site.eqn
    if site.primitive != "dot_general":
        raise ValueError("the algorithms cover dot_general weights, not "
                         f"{site.primitive} (exclude it from the method's rule).")
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    w_c, x_c = (lc, rc) if site.operand == 0 else (rc, lc)
    if lb:
        raise ValueError("the algorithms do not cover matmuls with batch axes on the weight.")
    seen = {a for axes in site.view for a in axes}
    stacked = tuple(sorted(site.scanned))
    unseen = tuple(a for a in range(len(shape)) if a not in seen)
    if unseen != stacked or stacked != tuple(range(len(stacked))) or site.loop:
        raise ValueError("the weight reaches its matmul through indexing the algorithms do "
                         "not follow (only the per-layer slice of a scanned stack is).")
    slice_axis = {a: a - len(stacked) for a in seen}
    pairs = []  # (weight slice axis, input axis), in the weight's storage order
    for d, x in zip(w_c, x_c, strict=True):
        if len(site.view[d]) != 1:
            raise ValueError("a contracted axis of the matmul merges several weight axes.")
        pairs.append((slice_axis[site.view[d][0]], x))
    pairs.sort()
    in_axes = tuple(a for a, _ in pairs)
    out_axes = tuple(a for a in range(len(shape) - len(stacked)) if a not in in_axes)
    x_ndim = len(eqn.invars[site.activation].aval.shape)
    layout = KernelLayout(tuple(shape[len(stacked):]), in_axes, out_axes,
                          tuple(x - x_ndim for _, x in pairs))
    return layout, stacked


def _slice_spec(spec, n_stacked: int):
    """A stacked weight's spec on one slice (its axes shifted past the stack)."""
    if not n_stacked or spec.axis is None:
        return spec
    axes = spec.axis if spec.multi_axis else (spec.axis,)
    kept = tuple(a - n_stacked for a in axes if a >= n_stacked)
    if len(kept) != len(axes) - sum(a < n_stacked for a in axes) or \
            (spec.group_size is not None and not kept):
        raise ValueError(f"{spec} groups along a stacked axis.")
    axis = None if not kept else kept[0] if len(kept) == 1 else kept
    return dataclasses.replace(spec, axis=axis)


@dataclasses.dataclass
class _Unit:
    """One weight (one layer of a stacked weight) an algorithm processes."""

    weight: int
    index: tuple  # the layer, for a stacked weight
    site: Site
    path: str
    plan: Any
    layout: KernelLayout
    spec: Any
    order: tuple

    @property
    def method(self):
        return self.plan.method

    @property
    def max_rows(self) -> int:
        return getattr(self.method, "max_rows", DEFAULT_MAX_ROWS)


def _units(plan: Plan) -> list[_Unit]:
    units, errors = [], []
    for index, wp in plan.weights.items():
        if wp.method is None:
            continue
        w = wp.weight
        matmuls = [u for u in w.uses if u.kind == "weight"]
        try:
            if len(matmuls) != 1:
                raise ValueError(f"the algorithms take a weight used by one matmul; it has "
                                 f"{len(matmuls)}.")
            site = matmuls[0]
            layout, stacked = site_layout(site, w.shape)
            spec = _slice_spec(wp.spec, len(stacked))
            layout.plan(spec)
        except ValueError as e:
            errors.append(f"{w.path!r} ({wp.method.name}): {e}")
            continue
        for layer in itertools.product(*(range(w.shape[a]) for a in stacked)):
            name = w.path + "".join(f"[{i}]" for i in layer)
            order = (site.callpath[0], layer, site.callpath[1:])
            units.append(_Unit(index, layer, site, name, wp, layout, spec, order))
    if errors:
        raise ValueError("calibrate_model:\n  - " + "\n  - ".join(errors))
    return sorted(units, key=lambda u: u.order)


def _as_args(batch) -> tuple:
    return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def _batches(batches) -> list[tuple]:
    if not isinstance(batches, Sequence) or isinstance(batches, (str, bytes)):
        batches = list(batches)
    batches = [_as_args(b) for b in batches]
    if not batches:
        raise ValueError("calibrate_model: no calibration batches.")
    return batches


class _Recorder(FakeQuant):
    """The QAT evaluation that also records the raw input statistics of some sites."""

    def __init__(self, plan, methods, recorded: dict):
        super().__init__(plan, "eval", methods=methods)
        self.recorded = recorded  # callpath -> (layout, needs, max_rows)

    def _stats(self, site, x):
        layout, needs, max_rows = self.recorded[site.callpath]
        return batch_stats(layout.rows(x), needs, max_rows)

    def initial(self, site):
        state = super().initial(site)
        if site.callpath not in self.recorded:
            return state
        x = site.eqn.invars[site.activation].aval
        shapes = jax.eval_shape(lambda a: self._stats(site, a),
                                jax.ShapeDtypeStruct(x.shape, x.dtype))
        zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        return {**(state or {}), "record": zeros}

    def site(self, site, eqn, ins, scope):
        if site.callpath in self.recorded:
            state = dict(scope[site.callpath])
            state["record"] = self._stats(site, ins[site.activation])
            scope[site.callpath] = state
        return super().site(site, eqn, ins, scope)


def _rtn(value, spec, layout: KernelLayout | None) -> MethodResult:
    """Round-to-nearest as a ``MethodResult`` (with a unit input factor when the
    method scales the input: the results' structure is the same before and after)."""
    state = calibrate(value, spec)
    factor = None if layout is None else layout.weight_vector(jnp.ones((layout.k,)))
    return MethodResult(fake_quant(value, state), state, factor)


def _results(units: list[_Unit], done: dict, leaves) -> dict:
    """``{weight index: MethodResult}`` of every method weight: the algorithms' results
    where they have run, round-to-nearest elsewhere (a stacked weight's layers one by
    one), the same structure whatever has run."""
    by_weight: dict[int, list[_Unit]] = {}
    for u in units:
        by_weight.setdefault(u.weight, []).append(u)
    out = {}
    for index, group in by_weight.items():
        value = jnp.asarray(leaves[index])
        parts = []
        for u in group:
            part = done.get(u.path)
            if part is None:
                scaled = u.layout if u.method.scales_input else None
                part = _rtn(value[u.index] if u.index else value, u.spec, scaled)
            parts.append(part)
        if not group[0].index:
            out[index] = parts[0]
            continue
        shape = tuple(value.shape[:len(group[0].index)])
        stacked = jax.tree_util.tree_map(
            lambda *xs, shape=shape: jnp.reshape(jnp.stack(xs), shape + jnp.shape(xs[0])),
            *parts)
        out[index] = dataclasses.replace(stacked, state=dataclasses.replace(
            stacked.state, spec=group[0].plan.spec))
    return out


def _calibrate(vmodel: VariablesModel, variables: dict, batches, call_kwargs):
    """The framework-free procedure (see the module docstring): ``(variables, report)``."""
    variables = {k: v for k, v in variables.items() if k != METHOD}
    batches = _batches(batches)
    traced, _ = vmodel.trace(variables, batches[0], call_kwargs)
    plan = traced.plan
    params, _ = vmodel.split(variables)
    leaves = jax.tree_util.tree_leaves(params)
    units = _units(plan)
    done: dict[str, MethodResult] = {}
    entries, passes = [], 0

    def apply(u: _Unit, stats):
        value = jnp.asarray(leaves[u.weight])
        kernel = value[u.index] if u.index else value
        result, details = u.method.apply(kernel, u.layout, u.spec, stats, u.path)
        if u.method.scales_input and result.input_scale is None:
            result = dataclasses.replace(result, input_scale=u.layout.weight_vector(
                jnp.ones((u.layout.k,))))
        done[u.path] = result
        return details

    pending = []
    for u in units:
        if u.method.statistics:
            pending.append(u)
        else:
            entries.append(LayerCalibration(u.path, u.method.name, 0, 0, apply(u, None)))
    # one compilation for every pass: all pending sites are recorded, the results (their
    # values change, not their structure) are an argument
    recorded = {u.site.callpath: (u.layout, u.method.statistics, u.max_rows) for u in pending}

    @jax.jit
    def step(methods, args):
        handler = lambda p, mode, learned, m: _Recorder(p, methods, recorded)  # noqa: E731
        _, scope, _, _ = vmodel.run(variables, args, call_kwargs, mode="eval", handler=handler)
        return {cp: s["record"] for cp, s in scope.items() if "record" in s}

    while pending:
        leader = pending[0]
        group = [u for u in pending if u.index == leader.index and
                 (u is leader or (u.site.input == leader.site.input and u.site.input))]
        methods = _results(units, done, leaves)
        totals: dict = {}
        for args in batches:
            stats_by_site = step(methods, args)
            for u in group:
                stats = stats_by_site[u.site.callpath]
                if u.index:
                    stats = jax.tree_util.tree_map(lambda a, i=u.index: a[i], stats)
                if float(stats.count) == 0:
                    continue
                totals[u.path] = merge(totals.get(u.path), stats, u.max_rows)
        passes += 1
        for u in group:
            s = totals.get(u.path)
            if s is None:
                raise ValueError(f"calibrate_model: no calibration batch reaches {u.path!r}.")
            s.check_finite(u.path)
            details = apply(u, s)
            entries.append(LayerCalibration(u.path, u.method.name, int(s.count), passes,
                                            details))
            pending.remove(u)
    if units:
        results = _results(units, done, leaves)
        flat = {(METHOD,) + plan.weight_key(plan.weights[i].weight): r
                for i, r in results.items()}
        variables = {**variables, **nest(flat)}
    observed = [sp for sp in plan.sites.values() if sp.observes]
    if observed:
        variables = {k: v for k, v in variables.items() if k != STATS}
        observe = jax.jit(lambda v, args: vmodel.apply(v, *args, mutable=[STATS],
                                                       **call_kwargs)[1])
        for args in batches:
            variables = {**variables, **observe(variables, args)}
    return variables, CalibrationReport(tuple(entries), passes)


def calibrate_model(qmodel, *args, **call_kwargs):
    """Run the rules' post-training algorithms and observe input ranges (see the module
    docstring).

    linen / a function: ``calibrate_model(qmodel, variables, batches, **call_kwargs)``
    -> ``(variables, report)``.  nnx: ``calibrate_model(qmodel, batches,
    **call_kwargs)`` -> ``(qmodel, report)`` (updated in place, left in ``eval()``
    mode).  Equinox: ``calibrate_model(qmodel, state, batches)`` -> ``(state,
    report)``.  ``report`` is a ``CalibrationReport``.
    """
    if isinstance(qmodel, VariablesModel):
        if len(args) != 2:
            raise TypeError("calibrate_model(qmodel, variables, batches, **call_kwargs) for a "
                            "linen model or a function.")
        return _calibrate(qmodel, dict(args[0]), args[1], call_kwargs)
    if models.is_equinox(qmodel):
        if len(args) != 2:
            raise TypeError("calibrate_model(qmodel, state, batches) for an Equinox model.")
        fn, variables = qmodel.variables(args[0])
        variables, report = _calibrate(fn, variables, args[1], call_kwargs)
        return {STATS: variables.get(STATS, {}), METHOD: variables.get(METHOD, {})}, report
    if models.is_quantized_nnx(qmodel):
        if len(args) != 1:
            raise TypeError("calibrate_model(qmodel, batches, **call_kwargs) for an nnx model "
                            "(it carries its own state).")
        batches = _batches(args[0])
        if not qmodel.initialized:
            qmodel.run(batches[0], call_kwargs, mode="init")
        graphdef, variables = models.nnx_variables(qmodel)
        fn = qmodel.functions(graphdef)
        variables, report = _calibrate(fn, variables, batches, call_kwargs)
        qmodel.quant_method.set_value(variables.get(METHOD, {}))
        qmodel.quant_stats.set_value(variables.get(STATS, {}))
        qmodel.eval()
        return qmodel, report
    raise TypeError("calibrate_model takes the model quantize_model returned (not the float "
                    f"model); got {type(qmodel).__name__}.")
