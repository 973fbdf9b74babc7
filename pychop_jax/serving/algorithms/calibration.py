"""``calibrate_model``: run a ``quantize_model`` model's post-training algorithms and
observe its input ranges, from calibration batches.

::

    qmodel = pj.quantize_model(model, [
        pj.QuantRule(".*mlp/.*", weight=spec4, method=pj.algorithms.GPTQ(act_order=True)),
        pj.QuantRule(".*", weight=8, act=8, method=pj.algorithms.SmoothQuant(alpha=0.5)),
    ])
    variables = qmodel.init(key, x)                                   # linen
    variables, report = pj.calibrate_model(qmodel, variables, batches)
    served_fn, served_vars = pj.serve_model(qmodel, variables, x)

    report = pj.calibrate_model(qmodel, batches)                      # nnx: in place

``batches``: a sequence (read several times) of the model's positional arguments,
each an array (one argument) or a tuple of them; ``**call_kwargs`` are passed to
every call (linen: to ``apply``, e.g. ``rngs=``).

What it does, in order:

1. finds the layers whose rule has a ``method`` and the order in which the model
   calls them (one abstract evaluation on the first batch) and their
   ``KernelLayout``;
2. runs the calibration-free methods (HQQ) on their kernels;
3. **sequentially** for the others: a pass over every batch (one jitted call of the
   quantized model per batch) collects the input statistics of the *next* layer in
   call order -- and of the later layers that receive the very same input array,
   e.g. the q / k / v projections of one attention -- with every layer processed
   so far already quantized by its algorithm (and the other quantized layers by
   round-to-nearest), so that each layer's statistics come from the quantized
   model's own activations, as GPTQ's and AWQ's sequential procedures prescribe.
   The group's algorithms then run and store their ``MethodResult`` s; the next pass
   follows.  ``L`` such layers (groups) cost ``L`` passes.
4. observes the quantized inputs' ranges (``act`` rules) from scratch over every
   batch, with the algorithms' results in place (SmoothQuant's ranges are those of
   the smoothed inputs).

Where the results go: linen returns new variables with the ``quant_method``
collection (``MethodResult`` per layer) and fresh ``quant_stats``; ``params`` are
not changed, so calibrating again from the same variables starts from the float
kernels.  nnx stores them in the model (``OperandQuant.method_result``, the
observers' ranges) and leaves it in ``eval()`` mode.  Either way the quantized
model then evaluates with the algorithms' kernels, and ``serve_model`` /
``save_quantized`` turn them into the usual ``QuantizedArray`` / ``IntKernel``
codes and scales (a ``ScaledKernel`` around them where the algorithm has an input
scale).

Raises ``ValueError`` for a method on a layer the algorithms do not cover (``Conv``,
``Embed``; DenseGeneral batch axes, Einsum batch axes), on a grid they do not
handle (``KernelLayout.plan``), for a method layer no batch reaches, and for
non-finite calibration inputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax

from ...flax.operands import kernel_name, recording_inputs
from ...flax.quantize_model import METHOD, STATS, LinenOperands, QuantizedModel
from .layout import for_layer
from .stats import batch_stats, merge

__all__ = ["calibrate_model", "CalibrationReport", "LayerCalibration"]

#: rows of input kept per layer for methods that need them and do not say how many
DEFAULT_MAX_ROWS = 4096


@dataclasses.dataclass(frozen=True)
class LayerCalibration:
    """What an algorithm did to one layer.

    Attributes:
      path: the layer's path.
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
    """The layers ``calibrate_model`` ran an algorithm on, in processing order."""

    layers: tuple[LayerCalibration, ...]
    passes: int

    def by_path(self) -> dict[str, LayerCalibration]:
        return {e.path: e for e in self.layers}

    def __str__(self) -> str:
        lines = [f"calibrate_model: {len(self.layers)} layer(s), {self.passes} pass(es)"]
        for e in self.layers:
            numbers = ", ".join(f"{k}={v:.4g}" for k, v in e.details.items())
            lines.append(f"  {e.path:<32} {e.method:<12} rows={e.rows:<7} {numbers}")
        return "\n".join(lines)


@dataclasses.dataclass
class _Layer:
    path: str
    plan: Any
    layout: Any
    max_rows: int


def _as_args(batch) -> tuple:
    return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def _batches(batches) -> list[tuple]:
    if not isinstance(batches, Sequence) or isinstance(batches, (str, bytes)):
        batches = list(batches)
    batches = [_as_args(b) for b in batches]
    if not batches:
        raise ValueError("calibrate_model: no calibration batches.")
    return batches


class _Recorder:
    """Collects, during one trace, the statistics of the first pending layer called and
    of the later pending layers called on the identical input array."""

    def __init__(self, pending: dict[str, _Layer]):
        self.pending = pending
        self.leader = None
        self.leader_x = None
        self.stats: dict = {}

    def __call__(self, path: str, x):
        layer = self.pending.get(path)
        if layer is None:
            return
        if self.leader is None:
            self.leader, self.leader_x = path, x
        elif path != self.leader and x is not self.leader_x:
            return
        s = batch_stats(layer.layout.rows(x), layer.plan.method.statistics, layer.max_rows)
        self.stats[path] = merge(self.stats.get(path), s, layer.max_rows)


def _layer(path: str, plan, module, kernel_shape, x, einsum_str=None) -> _Layer:
    try:
        layout = for_layer(plan.kind, module, kernel_shape, x.ndim, einsum_str)
        layout.plan(plan.weight)
    except ValueError as e:
        raise ValueError(f"calibrate_model: layer {path!r} ({plan.method.name}): {e}") from None
    return _Layer(path, plan, layout, getattr(plan.method, "max_rows", DEFAULT_MAX_ROWS))


def _run_sequence(layers: dict[str, _Layer], kernel_of, collect, store) -> CalibrationReport:
    """Steps 2-3 of the module docstring.  ``kernel_of(path)``: the float kernel;
    ``collect(pending)``: ``{path: LayerStats}`` over every batch; ``store(path,
    result)``."""
    entries = []
    pending = {}
    for path, layer in layers.items():
        if layer.plan.method.statistics:
            pending[path] = layer
            continue
        result, details = layer.plan.method.apply(kernel_of(path), layer.layout,
                                                  layer.plan.weight, None, path)
        store(path, result)
        entries.append(LayerCalibration(path, layer.plan.method.name, 0, 0, details))
    passes = 0
    while pending:
        stats = collect(pending)
        passes += 1
        if not stats:
            raise ValueError(f"calibrate_model: no calibration batch reaches the layer(s) "
                             f"{sorted(pending)}.")
        for path in [p for p in pending if p in stats]:
            layer, s = pending.pop(path), stats[path]
            s.check_finite(path)
            result, details = layer.plan.method.apply(kernel_of(path), layer.layout,
                                                      layer.plan.weight, s, path)
            store(path, result)
            entries.append(LayerCalibration(path, layer.plan.method.name, int(s.count), passes,
                                            details))
    return CalibrationReport(tuple(entries), passes)


def _accumulate(step, batches, pending) -> dict:
    total: dict = {}
    for args in batches:
        for path, s in step(args).items():
            total[path] = merge(total.get(path), s, pending[path].max_rows)
    return total


# ==== linen ===================================================================================
def _as_dicts(tree):
    if hasattr(tree, "items"):
        return {k: _as_dicts(v) for k, v in tree.items()}
    return tree


def _node(tree: dict, path: str, create: bool = False):
    for key in filter(None, path.split("/")):
        if create:
            tree = tree.setdefault(key, {})
        else:
            tree = tree[key]
    return tree


def _linen_layers(qmodel, variables, args, call_kwargs) -> dict[str, _Layer]:
    found: dict[str, _Layer] = {}

    def intercept(next_fun, a, kw, context):
        module = context.module
        slot = getattr(module, "promote_dtype", None)
        if (isinstance(slot, LinenOperands) and slot.plan.method is not None
                and context.method_name == "__call__"):
            path = "/".join(module.path)
            if path not in found:
                kernel = module.scope.get_variable("params", kernel_name(slot.plan.kind))
                einsum_str = a[1] if len(a) > 1 else kw.get("einsum_str")
                found[path] = _layer(path, slot.plan, module, kernel.shape, a[0], einsum_str)
        return next_fun(*a, **kw)

    with nn.intercept_methods(intercept):
        jax.eval_shape(lambda v: qmodel.apply(v, *args, **call_kwargs), variables)
    return found


def _calibrate_linen(qmodel: QuantizedModel, variables, batches, call_kwargs):
    variables = _as_dicts(variables)
    variables.pop(METHOD, None)
    batches = _batches(batches)
    layers = _linen_layers(qmodel, variables, batches[0], call_kwargs)
    results: dict = {}

    def kernel_of(path):
        return _node(variables["params"], path)[kernel_name(layers[path].plan.kind)]

    def store(path, result):
        _node(results, path, create=True)["result"] = result

    def collect(pending):
        current = {**variables, METHOD: results} if results else variables

        def run(v, args):
            recorder = _Recorder(pending)

            def intercept(next_fun, a, kw, context):
                slot = getattr(context.module, "promote_dtype", None)
                if isinstance(slot, LinenOperands) and context.method_name == "__call__":
                    recorder("/".join(context.module.path), a[0])
                return next_fun(*a, **kw)

            with nn.intercept_methods(intercept):
                qmodel.apply(v, *args, **call_kwargs)
            return recorder.stats

        jitted = jax.jit(run)
        return _accumulate(lambda args: jitted(current, args), batches, pending)

    report = _run_sequence(layers, kernel_of, collect, store)
    if results:
        variables[METHOD] = results
    if variables.pop(STATS, None) is None:  # no observed inputs (init creates the ranges)
        return variables, report
    observe = jax.jit(lambda v, args: qmodel.apply(v, *args, mutable=[STATS], **call_kwargs)[1])
    for args in batches:
        variables = {**variables, **_as_dicts(observe(variables, args))}
    return variables, report


# ==== nnx ======================================================================================
def _calibrate_nnx(qmodel, batches, call_kwargs):
    from flax import nnx

    from ...flax.nnx_model import OperandQuant
    from ...flax.operands import init_input_range

    batches = _batches(batches)
    modules = {}
    for _, layer in nnx.iter_modules(qmodel):
        slot = getattr(layer, "promote_dtype", None)
        if isinstance(slot, OperandQuant):
            slot.set_method_result(None)
            if slot.plan.method is not None:
                modules[slot.path] = (layer, slot)

    def traced(fn):
        graphdef, state = nnx.split(qmodel)

        def run(state, args):
            model = nnx.merge(graphdef, state)
            return fn(model, args)

        return run, state

    # call order and input ranks: one abstract call
    order: dict[str, Any] = {}

    def note(path, x):
        if path in modules and path not in order:
            order[path] = x

    def call(model, args):
        with recording_inputs(note):
            model(*args, **call_kwargs)

    run, state = traced(call)
    jax.eval_shape(run, state, batches[0])
    layers = {}
    for path, x in order.items():
        layer, slot = modules[path]
        kernel = getattr(layer, kernel_name(slot.plan.kind))
        layers[path] = _layer(path, slot.plan, layer, kernel.shape, x)

    def kernel_of(path):
        layer, slot = modules[path]
        return getattr(layer, kernel_name(slot.plan.kind))[...]

    def store(path, result):
        modules[path][1].set_method_result(result)

    def collect(pending):
        def stats_of(model, args):
            recorder = _Recorder(pending)
            with recording_inputs(recorder):
                model(*args, **call_kwargs)
            return recorder.stats

        run, state = traced(stats_of)
        jitted = jax.jit(run)
        return _accumulate(lambda args: jitted(state, args), batches, pending)

    report = _run_sequence(layers, kernel_of, collect, store)
    slots = [m for _, m in nnx.iter_modules(qmodel) if isinstance(m, OperandQuant)]
    observed = [s for s in slots if s.input_range is not None]
    if observed:
        for s in observed:
            s.input_range.set_value(init_input_range(s.plan))
        qmodel.train()

        def observe(model, args):
            model(*args, **call_kwargs)
            return nnx.state(model)

        run, _ = traced(observe)
        jitted = jax.jit(run)
        for args in batches:
            nnx.update(qmodel, jitted(nnx.state(qmodel), args))
    qmodel.eval()
    return report


def calibrate_model(qmodel, *args, **call_kwargs):
    """Run the rules' post-training algorithms and observe input ranges (see the module
    docstring).

    linen: ``calibrate_model(qmodel, variables, batches, **call_kwargs)`` ->
    ``(variables, report)``.  nnx: ``calibrate_model(qmodel, batches, **call_kwargs)``
    -> ``report`` (the model is updated in place and left in ``eval()`` mode).
    ``report`` is a ``CalibrationReport``.
    """
    if isinstance(qmodel, QuantizedModel):
        if len(args) != 2:
            raise TypeError("calibrate_model(qmodel, variables, batches, **call_kwargs) for a "
                            "linen quantize_model model.")
        return _calibrate_linen(qmodel, args[0], args[1], call_kwargs)
    if isinstance(qmodel, nn.Module):
        raise TypeError("calibrate_model takes the model quantize_model returned, not the "
                        "float model.")
    if len(args) != 1:
        raise TypeError("calibrate_model(qmodel, batches, **call_kwargs) for an nnx model "
                        "(it carries its own state).")
    return _calibrate_nnx(qmodel, args[0], call_kwargs)
