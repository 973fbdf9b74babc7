"""Quantizing the model code people actually have (``tests/model_zoo.py``): transformers'
Flax GPT-2 and Llama, a gemma-style module, a MaxText-style scanned stack with boxed
parameters, stock layers under ``nn.scan``, nnx raw ``Param`` s, an Equinox MLP, plain
functions (control flow and custom derivatives included) and a conv net -- each with
``.*`` rules at w8a8 and at int4 g32 weight-only, through the same three steps on every
framework: fake-quantized QAT, ``calibrate_model`` (GPTQ), ``serve_model`` and
compact checkpoints.

References are independent of the code under test: the weights' contracted axes come
from the zoo's hand-written facts (read off each model's code), and the weight-only
model is compared with the float model run on weights fake-quantized by hand.
"""

import functools
import re

import jax
import jax.numpy as jnp
import model_zoo as zoo
import numpy as np
import optax
import pytest

import pychop_jax as pj
from pychop_jax import QuantRule

W8A8 = pj.QuantSpec(bits=8, symmetric=True, axis=-1)
INT4_G32 = pj.QuantSpec(bits=4, symmetric=True, axis=0, group_size=32)
RULES = {
    "w8a8": [QuantRule(".*", weight=8, act=8, observer="minmax")],
    "int4_g32": [QuantRule(".*", weight=INT4_G32)],
}
CASES = [pytest.param(name, marks=pytest.mark.skipif(zoo.missing(name) is not None,
                                                    reason=f"needs {zoo.missing(name)}"))
         for name in zoo.CASES]


def eqx_call(m, *args):
    return jax.vmap(m)(*args)


def fq(x, spec):
    return pj.fake_quant(x, pj.calibrate(x, spec))


def assert_served_close(y, ref, activations: bool):
    """The served output against the fake-quantized evaluation: equal up to float
    summation order.  With quantized activations a value that lands within rounding of
    a code boundary may round to the neighbouring code on one side only; that moves one
    token's row downstream by about one step, so a few rows may differ, by little."""
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    if not activations:
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
        return
    far = np.abs(y - ref) > 1e-4 + 1e-4 * np.abs(ref)
    assert far.mean() <= 0.1, f"{far.mean():.1%} of the outputs differ"
    assert np.max(np.abs(y - ref)) <= 0.05 * np.max(np.abs(ref))


def reference_spec(e: zoo.ExpectedWeight) -> pj.QuantSpec:
    """int4 g32 laid on a weight from the zoo's facts: groups along its last contracted
    axis (one group when that axis is shorter), one scale per other element."""
    axis = max(e.contracted)
    return pj.QuantSpec(bits=4, symmetric=True, axis=axis,
                        group_size=min(32, e.shape[axis]))


def _path(key_path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                    for k in key_path if getattr(k, "name", None) != "value")


def map_weights(tree, fn, case):
    """``tree`` (a parameter tree / nnx state / Equinox module) with ``fn(path, leaf)``
    applied to the zoo's weights."""
    def visit(kp, leaf):
        path = _path(kp)
        return fn(path, leaf) if path in case.weights else leaf

    return jax.tree_util.tree_map_with_path(visit, tree)


# -- one driver per framework ---------------------------------------------------------------
class Linen:
    def __init__(self, case, rules):
        self.case, self.kw = case, case.apply_kwargs
        self.qm = pj.quantize_model(case.model, rules)
        self.state = self.qm.init_from(case.params, *case.args, **self.kw)

    def params(self):
        return self.state["params"]

    def loss(self, params, state):
        v = {**state, "params": params}
        y, upd = self.qm.apply(v, *self.case.args, mutable=["quant_stats"], **self.kw)
        return jnp.mean(self.case.output(y) ** 2), {**state, **upd}

    def evaluate(self, state):
        return self.case.output(self.qm.apply(state, *self.case.args, **self.kw))

    def observe(self):
        """One training call: the observers see the sample batch."""
        self.state = self.loss(self.params(), self.state)[1]

    def calibrate(self, qm, state):
        return pj.calibrate_model(qm, state, [self.case.args], **self.kw)[0]

    def serve(self, qm, state):
        served_fn, served_vars = pj.serve_model(qm, state, *self.case.args, **self.kw)
        return lambda sv: self.case.output(served_fn(sv, *self.case.args, **self.kw)), \
            served_vars

    def reference(self, spec_of):
        params = map_weights(self.case.params["params"], lambda p, w: fq(w, spec_of(p)),
                             self.case)
        return self.case.forward({**self.case.params, "params": params}, *self.case.args)


class Function(Linen):
    def __init__(self, case, rules):
        self.case, self.kw = case, {}
        self.qm = pj.quantize_model(case.model, rules)
        self.state = self.qm.init(case.params, *case.args)

    def reference(self, spec_of):
        params = map_weights(self.case.params, lambda p, w: fq(w, spec_of(p)), self.case)
        return self.case.forward(params, *self.case.args)


class Nnx:
    def __init__(self, case, rules):
        from flax import nnx

        self.nnx, self.case = nnx, case
        self.qm = pj.quantize_model(case.model, rules, *case.args)
        self.state = self.qm

    def params(self):
        return self.nnx.state(self.qm.model, self.nnx.Param)

    def loss(self, params, qm):
        nnx = self.nnx
        qm = nnx.clone(qm)
        nnx.update(qm.model, params)
        qm.train()
        y = qm(*self.case.args)
        return jnp.mean(y ** 2), qm

    def evaluate(self, qm):
        qm.eval()
        return qm(*self.case.args)

    def observe(self):
        self.qm.train()
        self.qm(*self.case.args)

    def calibrate(self, qm, state):
        return pj.calibrate_model(state, [self.case.args])[0]

    def serve(self, qm, state):
        served = pj.serve_model(state)
        return lambda s: s(*self.case.args), served

    def reference(self, spec_of):
        nnx = self.nnx
        model = nnx.clone(self.case.model)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        params = map_weights(params, lambda p, w: fq(w, spec_of(p)), self.case)
        return self.case.forward(nnx.merge(graphdef, params, rest), *self.case.args)


class Equinox:
    def __init__(self, case, rules):
        import equinox as eqx

        self.eqx, self.case = eqx, case
        self.qm, self.state = pj.quantize_model(case.model, rules, *case.args, call=eqx_call)

    def params(self):
        return self.eqx.filter(self.qm.model, self.eqx.is_inexact_array)

    def loss(self, params, state):
        static = self.eqx.partition(self.qm.model, self.eqx.is_inexact_array)[1]
        qm = self.eqx.tree_at(lambda m: m.model, self.qm, self.eqx.combine(params, static))
        y, state = qm(*self.case.args, state=state)
        return jnp.mean(y ** 2), state

    def evaluate(self, state):
        y, _ = self.eqx.nn.inference_mode(self.qm)(*self.case.args, state=state)
        return y

    def observe(self):
        self.state = self.loss(self.params(), self.state)[1]

    def calibrate(self, qm, state):
        return pj.calibrate_model(qm, state, [self.case.args])[0]

    def serve(self, qm, state):
        served = pj.serve_model(qm, state, *self.case.args)
        return lambda s: s(*self.case.args), served

    def reference(self, spec_of):
        model = map_weights(self.case.model, lambda p, w: fq(w, spec_of(p)), self.case)
        return self.case.forward(model, *self.case.args)


DRIVERS = {"linen": Linen, "function": Function, "nnx": Nnx, "equinox": Equinox}


@functools.cache
def quantized(name: str, rules: str):
    case = zoo.build(name)
    return case, DRIVERS[case.framework](case, RULES[rules])


# -- the tests --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CASES)
def test_report_finds_every_weight_with_its_contracted_axes(name):
    case, d = quantized(name, "int4_g32")
    got = {}
    for op in _report(d).ops:
        if op.weight is not None:
            got.setdefault(op.weight, set()).update(op.contracted)
            assert op.quantized, op
    assert set(got) == set(case.weights)
    for path, e in case.weights.items():
        assert tuple(sorted(got[path])) == e.contracted, path
    assert not [o for o in _report(d).ops if o.kind == "float"]


def _report(d):
    qm = d.qm
    case = d.case
    if case.framework == "linen":
        return qm.report(case.params, *case.args, **case.apply_kwargs)
    if case.framework == "function":
        return qm.report({"params": case.params}, *case.args)
    return qm.report(*case.args)


@pytest.mark.parametrize("name", CASES)
def test_weight_only_equals_the_model_on_hand_fake_quantized_weights(name):
    case, d = quantized(name, "int4_g32")
    y = d.evaluate(d.state)
    ref = d.reference(lambda path: reference_spec(case.weights[path]))
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=2e-5, atol=2e-5)
    assert y.shape == case.output_shape


@pytest.mark.parametrize("name", CASES)
def test_jitted_qat_step_reaches_every_quantized_weight(name):
    """The w8a8 rules: every weight and its input fake-quantized, the observers updated
    in the step.  (The int4 g32 rules' grouped weights reach the same sites and take
    ``fake_quant``'s clipped straight-through gradient, property-tested with groups in
    tests/core/test_state_and_grad.py.)"""
    rules = "w8a8"
    if name == "control_flow":
        pytest.skip("its lax.while_loop has no reverse-mode derivative, float or quantized")
    case, d = quantized(name, rules)
    params = d.params()
    opt = optax.sgd(1e-2)

    @jax.jit
    def step(params, state, opt_state):
        (loss, state), grads = jax.value_and_grad(d.loss, has_aux=True)(params, state)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), state, opt_state, grads, loss

    if case.framework == "nnx":
        from flax import nnx

        @nnx.jit
        def grads_of(qm):
            return nnx.grad(lambda m: jnp.mean(m(*case.args) ** 2))(qm)

        d.qm.train()
        grads = nnx.state(grads_of(d.qm), nnx.Param)
        loss = 0.0
    else:
        _, _, _, grads, loss = step(params, d.state, opt.init(params))
    assert np.isfinite(float(loss))
    norms = {}

    def visit(kp, g):
        norms[_path(kp)] = float(jnp.sum(jnp.abs(g)))

    jax.tree_util.tree_map_with_path(visit, grads)
    for path in case.weights:
        key = path if case.framework != "nnx" else "model/" + path
        assert norms.get(key, 0.0) > 0, (path, sorted(norms)[:5])


@pytest.mark.parametrize("rules", sorted(RULES))
@pytest.mark.parametrize("name", CASES)
def test_served_equals_fake_quant_evaluation_and_checkpoint_round_trips(name, rules, tmp_path):
    case, d = quantized(name, rules)
    if rules == "w8a8":
        d.observe()
    ref = d.evaluate(d.state)
    run, served = d.serve(d.qm, d.state)
    y = run(served)
    assert_served_close(y, ref, activations=rules == "w8a8")
    path = tmp_path / "served.msgpack"
    pj.save_quantized(path, served)
    loaded = pj.load_quantized(path, like=served) if case.framework in ("nnx", "equinox") \
        else pj.load_quantized(path)
    np.testing.assert_array_equal(np.asarray(run(loaded)), np.asarray(y))


GPTQ_CASES = ["gpt2", "llama", "gemma_style", "maxtext_style", "stock_scan", "nnx_raw",
              "equinox_mlp", "plain_function"]


@pytest.mark.parametrize("name", [c for c in CASES if c.values[0] in GPTQ_CASES])
def test_calibrate_with_gptq_then_serve(name):
    case = zoo.build(name)
    # the algorithms take a weight used by one matmul: lookup-only tables, and gemma's
    # gating weight (w[0] and w[1], two matmuls), stay round-to-nearest
    lookups = [p for p, e in case.weights.items()
               if "dot_general" not in e.uses or p.endswith("gating_einsum")]
    modules = "|".join(re.escape(p.rsplit("/", 1)[0]) for p in lookups)
    rules = ([QuantRule(modules, weight=INT4_G32)] if lookups else []) + \
        [QuantRule(".*", weight=INT4_G32, method=pj.GPTQ())]
    d = DRIVERS[case.framework](case, rules)
    before = d.evaluate(d.state)
    state = d.calibrate(d.qm, d.state)
    if case.framework == "nnx":
        d.qm = state
    after = d.evaluate(state)
    assert not np.allclose(np.asarray(before), np.asarray(after))
    run, served = d.serve(d.qm, state)
    np.testing.assert_allclose(np.asarray(run(served)), np.asarray(after), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(zoo.missing("maxtext_style") is not None, reason="maxtext_style missing")
def test_served_boxed_params_keep_their_boxes_and_partition_specs():
    """MaxText-style params are ``nn.LogicallyPartitioned`` boxes: the served variables
    keep every box with its axis names (the layer axis of the scan first), codes inside,
    so ``nn.get_partition_spec`` gives the same specs as for the float model."""
    import flax.linen as nn

    case, d = quantized("maxtext_style", "int4_g32")
    _, served = d.serve(d.qm, d.state)
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)  # noqa: E731
    float_boxes = {_path(kp): b for kp, b in jax.tree_util.tree_leaves_with_path(
        case.params["params"], is_leaf=is_box)}
    served_boxes = {_path(kp): b for kp, b in jax.tree_util.tree_leaves_with_path(
        served["params"], is_leaf=is_box)}
    assert set(served_boxes) == set(float_boxes)
    for path, box in served_boxes.items():
        assert is_box(box) and box.names == float_boxes[path].names, path
        assert isinstance(box.value, pj.QuantizedArray) == (path in case.weights), path
    assert nn.get_partition_spec(served)["params"] == nn.get_partition_spec(case.params)["params"]
