"""The quantization-aware mode of the transform: weights and inputs fake-quantized.

``FakeQuant(plan, mode, ...)`` is the ``interpret.Handler`` that ``quantize_model``
models run.  Per weight (``plan.WeightPlan``), once per call, whatever path it takes:

* a ``MethodResult`` (after ``calibrate_model``): the algorithm's kernel (values on its
  grid), and its ``input_scale``, by which every matmul input of the weight is
  multiplied first (AWQ / SmoothQuant);
* a learned step size (``lsq``): ``qat.learned_fake_quant`` (LSQ / LSQ+ gradients);
* otherwise ``qat.fake_quant_weight``: calibrated on the weight every call, clipped
  straight-through gradient.

Per site (``plan.SitePlan``), the matmul's input (``act``) -- or both operands of an
activation product (``attention``) -- is fake-quantized with its state:

* observed (``qat.observed_fake_quant``): ``mode="train"`` updates the range with the
  observer first; ``"eval"`` uses the frozen range (or this batch's estimate while it
  has seen nothing); ``"init"`` observes nothing;
* learned (``lsq``): ``qat.learned_fake_quant``; ``"init"`` sets the step size from the
  input at hand (``qat.init_lsq``), as linen's ``init`` does from data;
* per block (MX / NVFP4 ``act``): calibrated on the input on every call, no state.

Then the equation runs as it was, on the quantized operands.  A gathered table
(lookup) is the weight's fake-quantized table, so a tied embedding's lookup and output
projection see the same values.  A write into a KV cache a rule's ``kv_cache``
quantizes writes the fake-quantized keys / values (per (token, head), calibrated on
what is written: each token is quantized once).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..core.qarray import QuantizedArray
from . import qat, views
from .interpret import Carrier, Handler, _bind
from .plan import LEARNED, Plan, SitePlan

__all__ = ["FakeWeight", "FakeQuant", "MODES", "input_layout"]

MODES = ("train", "eval", "init")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FakeWeight:
    """A weight's fake-quantized value and the factor its matmuls' inputs are
    multiplied by first (``None``: 1), both in the layout of the current view."""

    value: Any
    input_scale: Any = None


def input_layout(comp, site, eqn):
    """A per-contracted-element factor of a matmul's weight operand (``comp``:
    broadcastable against it, full along contracted axes) as a factor of the other
    operand: its axes moved to the other operand's matching contracted axes."""
    if eqn.primitive.name != "dot_general":
        raise ValueError(f"{site.primitive}: an input factor (AWQ / SmoothQuant) applies to "
                         "dot_general weights only.")
    (lc, rc), _ = eqn.params["dimension_numbers"]
    w_axes, x_axes = (lc, rc) if site.operand == 0 else (rc, lc)
    x_ndim = len(eqn.invars[1 - site.operand].aval.shape)
    rest = [d for d in range(comp.ndim) if d not in w_axes]
    comp = jnp.reshape(jnp.transpose(comp, tuple(w_axes) + tuple(rest)),
                       [comp.shape[d] for d in w_axes])
    comp = jnp.transpose(comp, tuple(int(i) for i in np.argsort(x_axes)))
    shape = [1] * x_ndim
    for k, d in enumerate(sorted(x_axes)):
        shape[d] = comp.shape[k]
    return jnp.reshape(comp, shape)


class FakeQuant(Handler):
    """The QAT handler (see the module docstring).

    Args:
      plan: the resolved rules.
      mode: ``"train"``, ``"eval"`` or ``"init"``.
      learned: ``{weight index: (scale, zero_point)}`` of LSQ weights.
      methods: ``{weight index: MethodResult}``.
    """

    def __init__(self, plan: Plan, mode: str = "eval", learned=None, methods=None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}; got {mode!r}.")
        self.plan, self.mode = plan, mode
        self.learned, self.methods = learned or {}, methods or {}

    # -- weights --------------------------------------------------------------------------
    def weight(self, weight, value):
        wp = self.plan.weights.get(weight.index)
        if wp is None or wp.spec is None:
            return None
        result = self.methods.get(weight.index)
        if result is not None:
            return FakeWeight(jnp.asarray(result.kernel).astype(value.dtype), result.input_scale)
        if wp.lsq:
            if weight.index not in self.learned:
                raise ValueError(
                    f"quantize_model: {weight.path!r} learns its step sizes (lsq=True), and "
                    f"the variables have none ({LEARNED}/{weight.path}/weight_scale): make "
                    "the quantization variables with init / init_from (linen, functions) "
                    "from the float ones, or call the nnx model once.")
            scale, zero_point = self.learned[weight.index]
            return FakeWeight(qat.learned_fake_quant(value, wp.spec, scale, zero_point))
        return FakeWeight(qat.fake_quant_weight(value, wp.spec))

    def view(self, eqn, twin, dynamic):
        scale = twin.input_scale
        if scale is not None:
            scale = views.apply_to_companion(eqn, scale, dynamic)
        return FakeWeight(_bind(eqn, [twin.value, *dynamic])[0], scale)

    # -- sites ----------------------------------------------------------------------------
    def initial(self, site):
        sp = self.plan.site(site)
        state = None
        if sp is not None and sp.act is not None:
            if site.kind == "product":
                state = {"lhs": qat.init_stats(sp.act), "rhs": qat.init_stats(sp.act)}
            elif sp.lsq:
                scale, zero_point = qat.lsq_placeholder(sp.act)
                state = {"input_scale": scale}
                if zero_point is not None:
                    state["input_zero_point"] = zero_point
            elif sp.observes:
                state = {"input": qat.init_stats(sp.act)}
        return state

    def state(self, index, value):
        if isinstance(value, QuantizedArray):
            raise ValueError(
                f"the model's state {self.plan.graph.state_paths[index]!r} is a quantized "
                "cache (served codes); the quantization-aware model keeps caches float "
                "(fake-quantized by kv_cache rules). Pass the float cache.")
        return None

    def site(self, site, eqn, ins, scope):
        sp = self.plan.site(site)
        if site.kind == "cache":
            spec = self.plan.cache_spec(site)
            ins = list(ins)
            if spec is not None:  # what is written is quantized once
                ins[1] = qat.fake_quant_weight(ins[1], spec)
            return _bind(eqn, ins)
        if site.kind == "product":
            ins = list(ins)
            if sp is not None:
                state = dict(scope[site.callpath])
                for i, name in enumerate(("lhs", "rhs")):
                    ins[i], state[name] = self.observed(sp, ins[i], state[name])
                scope[site.callpath] = state
            return _bind(eqn, ins)
        ins = list(ins)
        w = site.operand
        twin = ins[w].twin if isinstance(ins[w], Carrier) else None
        if twin is not None:
            ins[w] = twin.value
        if site.kind == "lookup":
            return _bind(eqn, ins)
        a = site.activation
        state = dict(scope.get(site.callpath, {}))
        if twin is not None and twin.input_scale is not None:
            ins[a] = ins[a] * input_layout(twin.input_scale, site, eqn).astype(ins[a].dtype)
        if sp is not None and sp.act is not None:
            ins[a], state = self.quantize_input(sp, ins[a], state)
        if state:
            scope[site.callpath] = state
        return _bind(eqn, ins)

    def observed(self, sp: SitePlan, x, stats):
        """``x`` fake-quantized with an observed range; ``(y, stats)``."""
        return qat.observed_fake_quant(x, stats, sp.act, sp.observer, train=self.mode == "train")

    def quantize_input(self, sp: SitePlan, x, state: dict):
        """A weight site's input fake-quantized (see the module docstring)."""
        if sp.dynamic:
            return qat.fake_quant_weight(x, sp.act), state
        if sp.lsq:
            if self.mode == "init":
                scale, zero_point = qat.init_lsq(x, sp.act)
                state["input_scale"] = scale
                if zero_point is not None:
                    state["input_zero_point"] = zero_point
            return qat.learned_fake_quant(x, sp.act, state["input_scale"],
                                          state.get("input_zero_point")), state
        y, state["input"] = self.observed(sp, x, state["input"])
        return y, state
