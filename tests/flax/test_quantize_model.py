"""pychop_jax.flax.quantize_model on stock flax.linen layers and models.

Every layer check compares against an independent reference: the stock layer applied
to a kernel and an input fake-quantized by hand with ``pj.calibrate`` +
``pj.fake_quant`` (the ``minmax`` observer's first range is the batch's range, which
is what ``calibrate`` computes).
"""

import functools
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from pychop_jax.flax.quantize_model import LSQ_PARAMS, STATS, quantization_report, quantize_model
from pychop_jax.flax.rules import QuantRule
from quantize_model_fixtures import (
    A8,
    IDS,
    KEY,
    LINEN_LAYERS,
    W8,
    EncDec,
    NnxSingle,
    NnxTinyLM,
    Single,
    TinyLM,
    fq,
    nnx_forward,
    nnx_layers,
    normal,
)

import pychop_jax as pj


def fq_with(x, calib, spec):
    """``x`` fake-quantized with the range calibrated on ``calib``."""
    return pj.fake_quant(x, pj.calibrate(calib, spec))


# -- one stock layer, by hand --------------------------------------------------------------
def kernel_reference(layer, params, x, w_spec, a_spec, calib=None):
    """The stock layer on the hand-quantized kernel and input."""
    p = dict(params)
    p["kernel"] = fq(p["kernel"], w_spec)
    xq = x if a_spec is None else fq_with(x, x if calib is None else calib, a_spec)
    return layer.apply({"params": p}, xq)


@pytest.mark.parametrize("kind", sorted(LINEN_LAYERS))
def test_linen_layer_equals_hand_fake_quant_train_and_eval(kind):
    layer, shape = LINEN_LAYERS[kind]
    x1, x2 = normal(1, shape), normal(2, shape, 2.0)
    rule = QuantRule("layer", weight=W8, act=A8, observer="minmax")
    qmodel = quantize_model(Single(layer), [rule])
    v = qmodel.init(KEY, x1)
    params = v["params"]["layer"]
    assert params.keys() == layer.init(KEY, x1)["params"].keys()
    # train: the observer sees x1 first, then quantizes x1 with that range
    y1, upd = qmodel.apply(v, x1, mutable=[STATS])
    np.testing.assert_allclose(y1, kernel_reference(layer, params, x1, W8, A8),
                               rtol=1e-5, atol=1e-5)
    # eval on another batch: the range of x1, frozen
    y2 = qmodel.apply({**v, **upd}, x2)
    np.testing.assert_allclose(y2, kernel_reference(layer, params, x2, W8, A8, calib=x1),
                               rtol=1e-5, atol=1e-5)
    assert not np.allclose(y2, layer.apply({"params": params}, x2), atol=1e-2)


def test_linen_int_shorthand_is_symmetric_per_output_channel():
    layer, shape = LINEN_LAYERS["dense_general"]
    x = normal(1, shape)
    qmodel = quantize_model(Single(layer), QuantRule("layer", weight=4))
    v = qmodel.init(KEY, x)
    spec = pj.QuantSpec(bits=4, symmetric=True, axis=-1)
    np.testing.assert_allclose(qmodel.apply(v, x),
                               kernel_reference(layer, v["params"]["layer"], x, spec, None),
                               rtol=1e-5, atol=1e-5)


def test_linen_embed_lookup_and_attend():
    embed = nn.Embed(11, 6)
    ids = jnp.array([[0, 3, 10], [5, 5, 1]])
    query = normal(3, (2, 3, 6))
    rule = QuantRule("layer", weight=4, act=A8, observer="minmax")
    look = quantize_model(Single(embed), rule)
    v = look.init(KEY, ids)
    table = v["params"]["layer"]["embedding"]
    rows = pj.QuantSpec(bits=4, symmetric=True, axis=0)  # int shorthand: per token
    np.testing.assert_allclose(look.apply(v, ids), jnp.take(fq(table, rows), ids, axis=0),
                               rtol=1e-6)
    assert STATS not in v  # a lookup's input is ids: nothing observed
    attend = quantize_model(Single(embed, "attend"), rule)
    y, _ = attend.apply(v, query, mutable=[STATS])
    np.testing.assert_allclose(y, fq(query, A8) @ fq(table, rows).T, rtol=1e-5, atol=1e-5)


# -- a small transformer from stock layers ----------------------------------------------------
LM_RULES = [QuantRule(".*attn/out"),  # leave the attention output projection float
            QuantRule(".*", weight=8, act=8),
            QuantRule("decoder/.*", weight=4)]  # matches nothing


@functools.cache
def linen_lm():
    """The quantized TinyLM, its variables, and jitted evaluate / observe calls."""
    qmodel = quantize_model(TinyLM(), LM_RULES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        v = jax.jit(qmodel.init)(KEY, IDS)
    evaluate = jax.jit(lambda v, ids: qmodel.apply(v, ids))
    observe = jax.jit(lambda v, ids: qmodel.apply(v, ids, mutable=[STATS]))
    return qmodel, v, evaluate, observe


def test_linen_params_tree_and_values_unchanged_and_float_checkpoint_loads():
    float_vars = TinyLM().init(KEY, IDS)
    _, v, evaluate, _ = linen_lm()
    assert set(v) == {"params", STATS}
    chex_equal = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)),
                              v["params"], float_vars["params"])
    assert all(jax.tree.leaves(chex_equal))
    assert jax.tree.structure(v["params"]) == jax.tree.structure(float_vars["params"])
    # a float checkpoint with fresh stats: evaluation uses each batch's own range
    y = evaluate({"params": float_vars["params"], STATS: v[STATS]}, IDS)
    ref = TinyLM().apply(float_vars, IDS)
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, atol=0.1 * float(jnp.abs(ref).max()))


def test_linen_report_lists_layers_and_unmatched_rules_and_init_warns():
    report = quantization_report(TinyLM(), LM_RULES, IDS)
    by_path = report.by_path()
    assert by_path["blocks_0/attn/out"].rule == 0 and not by_path["blocks_0/attn/out"].quantized
    assert by_path["blocks_1/attn/query"].rule == 1
    assert by_path["blocks_1/attn/query"].layer == "DenseGeneral"
    assert by_path["embed"].layer == "Embed" and by_path["blocks_0/mlp_in"].layer == "Dense"
    assert len(report.layers) == 1 + 2 * 6
    assert report.unmatched == (2,)
    assert ("ln_f", "LayerNorm") in report.skipped
    with pytest.warns(UserWarning, match="#2 'decoder/.*' matched no layer"):
        quantize_model(TinyLM(), LM_RULES).init(KEY, IDS)


def test_linen_stats_live_where_the_layers_are():
    _, v, _, _ = linen_lm()
    stats = v[STATS]
    assert set(stats["blocks_0"]["attn"]) == {"query", "key", "value"}  # out is excluded
    assert int(stats["blocks_0"]["mlp_in"]["input_range"].count) == 0  # init observes nothing


def test_linen_gradients_reach_every_kernel():
    _, v, evaluate, _ = linen_lm()

    def loss(params):
        logits = evaluate({**v, "params": params}, IDS)
        return optax.softmax_cross_entropy_with_integer_labels(logits, IDS).mean()

    grads = jax.jit(jax.grad(loss))(v["params"])
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    kernels = [(jax.tree_util.keystr(p), g) for p, g in flat
               if jax.tree_util.keystr(p).endswith(("['kernel']", "['embedding']"))]
    assert len(kernels) == 1 + 2 * 6
    for name, g in kernels:
        assert bool(jnp.any(g != 0)), name


def test_linen_observers_update_only_when_stats_are_mutable():
    _, v, evaluate, observe = linen_lm()
    frozen, upd = observe(v, IDS)
    assert int(upd[STATS]["blocks_0"]["mlp_in"]["input_range"].count) == 1
    # before any observation, evaluation quantizes with the batch's own range:
    # the first training call (which observes that batch) gives the same output
    np.testing.assert_allclose(evaluate(v, IDS), frozen, rtol=1e-5, atol=1e-5)
    v2 = {**v, **upd}
    _, upd2 = observe(v2, 3 * IDS % 32)
    assert int(upd2[STATS]["blocks_0"]["mlp_in"]["input_range"].count) == 2
    # evaluation reads the frozen ranges: it differs from observing the same batch
    y_eval = evaluate(v2, 5 * IDS % 32)
    y_train, _ = observe(v2, 5 * IDS % 32)
    assert not np.allclose(y_eval, y_train, atol=1e-4)


def test_linen_ptq_calibration_matches_ema_of_the_batches():
    layer, shape = LINEN_LAYERS["dense"]
    xs = [normal(10 + i, shape, 1.0 + i) for i in range(3)]
    qmodel = quantize_model(Single(layer), QuantRule("layer", weight=W8, act=A8))  # ema
    v = qmodel.init(KEY, xs[0])
    for x in xs:
        _, upd = qmodel.apply(v, x, mutable=[STATS])
        v = {**v, **upd}
    expected = pj.observers.init(A8, shape)
    for x in xs:
        expected = pj.observers.ema(expected, x, A8)
    got = v[STATS]["layer"]["input_range"]
    np.testing.assert_allclose([got.lo, got.hi], [expected.lo.squeeze(), expected.hi.squeeze()],
                               rtol=1e-6)
    x = normal(20, shape)
    state = pj.observers.quant_state(expected, A8)
    p = v["params"]["layer"]
    ref = layer.apply({"params": {**p, "kernel": fq(p["kernel"], W8)}}, pj.fake_quant(x, state))
    np.testing.assert_allclose(qmodel.apply(v, x), ref, rtol=1e-5, atol=1e-5)


def test_linen_lsq_step_sizes_from_data_and_learned():
    layer, shape = LINEN_LAYERS["dense"]
    x = normal(1, shape)
    qmodel = quantize_model(Single(layer), QuantRule("layer", weight=W8, act=A8, lsq=True))
    v = qmodel.init(KEY, x)
    assert STATS not in v
    lsq = v[LSQ_PARAMS]["layer"]
    kernel = v["params"]["layer"]["kernel"]
    np.testing.assert_allclose(lsq["weight_scale"], pj.lsq_init(kernel, W8).scale.reshape(-1))
    np.testing.assert_allclose(lsq["input_scale"], pj.lsq_init(x, A8).scale.reshape(()))
    assert set(lsq) == {"weight_scale", "input_scale", "input_zero_point"}

    def loss(trainable):
        return jnp.sum(qmodel.apply({**v, **trainable}, x) ** 2)

    grads = jax.grad(loss)({"params": v["params"], LSQ_PARAMS: v[LSQ_PARAMS]})
    for leaf in jax.tree.leaves(grads[LSQ_PARAMS]):
        assert bool(jnp.all(jnp.isfinite(leaf))) and bool(jnp.any(leaf != 0))


def test_linen_end_to_end_qat_training_with_kwargs_passthrough():
    qmodel, v, _, _ = linen_lm()
    opt = optax.adam(3e-3)
    opt_state = opt.init(v["params"])
    targets = jnp.roll(IDS, -1, axis=1)

    @jax.jit
    def step(v, opt_state, key):
        def loss(params):
            logits, upd = qmodel.apply({**v, "params": params}, IDS, deterministic=False,
                                       mutable=[STATS], rngs={"dropout": key})
            return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean(), upd

        (value, upd), grads = jax.value_and_grad(loss, has_aux=True)(v["params"])
        updates, opt_state = opt.update(grads, opt_state)
        return {**v, **upd, "params": optax.apply_updates(v["params"], updates)}, opt_state, value

    losses = []
    for i in range(8):
        v, opt_state, value = step(v, opt_state, jax.random.key(i))
        losses.append(float(value))
    assert losses[-1] < losses[0]
    logits = jax.jit(lambda v: qmodel.apply(v, IDS, deterministic=True))(v)
    assert bool(jnp.all(jnp.isfinite(logits)))
    assert int(v[STATS]["blocks_1"]["attn"]["query"]["input_range"].count) == 8


# -- what cannot be covered ----------------------------------------------------------------
class WithTranspose(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.ConvTranspose(2, (3, 3), name="up")(nn.Dense(3, name="fc")(x))


class RawParams(nn.Module):
    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.ones, (x.shape[-1], 2))
        return x @ w


class WithRaw(nn.Module):
    @nn.compact
    def __call__(self, x):
        return RawParams(name="custom")(nn.Dense(3, name="fc")(x))


@pytest.mark.parametrize("model, name", [(WithTranspose(), "ConvTranspose"),
                                         (WithRaw(), "RawParams")])
def test_linen_matched_uncoverable_layer_raises_and_can_be_excluded(model, name):
    x = normal(1, (1, 4, 4, 3))
    with pytest.raises(ValueError, match=f"rule #0 matches '(up|custom)'.*{name}"):
        quantize_model(model, QuantRule(".*", weight=8)).init(KEY, x)
    v = quantize_model(model, [QuantRule("up|custom"), QuantRule(".*", weight=8)]).init(KEY, x)
    assert "fc" in v["params"]


# ==== nnx ======================================================================================
from flax import nnx  # noqa: E402
from pychop_jax.flax.nnx_model import OperandQuant  # noqa: E402

from pychop_jax.nnx import QuantStats  # noqa: E402


def nnx_reference(layer, x, w_spec, a_spec, calib=None):
    """A copy of the float layer on the hand-quantized kernel and input."""
    ref = nnx.clone(layer)
    ref.kernel[...] = fq(ref.kernel[...], w_spec)
    xq = x if a_spec is None else fq_with(x, x if calib is None else calib, a_spec)
    return ref(xq)


@pytest.mark.parametrize("kind", ["conv", "dense", "dense_general", "einsum"])
def test_nnx_layer_equals_hand_fake_quant_train_and_eval(kind):
    layer, shape = nnx_layers()[kind]
    x1, x2 = normal(1, shape), normal(2, shape, 2.0)
    model = NnxSingle(layer)
    qmodel = quantize_model(model, QuantRule("layer", weight=W8, act=A8, observer="minmax"))
    assert isinstance(qmodel.layer.promote_dtype, OperandQuant)
    assert not isinstance(model.layer.promote_dtype, OperandQuant)  # the model is untouched
    np.testing.assert_allclose(qmodel(x1), nnx_reference(layer, x1, W8, A8), rtol=1e-5, atol=1e-5)
    qmodel.eval()
    np.testing.assert_allclose(qmodel(x2), nnx_reference(layer, x2, W8, A8, calib=x1),
                               rtol=1e-5, atol=1e-5)
    assert int(qmodel.layer.promote_dtype.input_range.get_value().count) == 1


def test_nnx_embed_lookup_and_attend():
    embed = nnx.Embed(11, 6, rngs=nnx.Rngs(0))
    ids = jnp.array([[0, 3, 10], [5, 5, 1]])
    query = normal(3, (2, 3, 6))
    rule = QuantRule("layer", weight=4, act=A8, observer="minmax")
    rows = pj.QuantSpec(bits=4, symmetric=True, axis=0)
    table = fq(embed.embedding[...], rows)
    look = quantize_model(NnxSingle(embed), rule)
    np.testing.assert_allclose(look(ids), jnp.take(table, ids, axis=0), rtol=1e-6)
    attend = quantize_model(NnxSingle(embed, "attend"), rule)
    np.testing.assert_allclose(attend(query), fq(query, A8) @ table.T, rtol=1e-5, atol=1e-5)


NNX_RULES = [QuantRule(".*attn/out"), QuantRule(".*", weight=8, act=8),
             QuantRule("decoder/.*", weight=4)]


def nnx_lm():
    model = NnxTinyLM(nnx.Rngs(0))
    model.eval()  # no dropout
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model, quantize_model(model, NNX_RULES)


def test_nnx_model_unchanged_and_params_kept():
    model, _ = nnx_lm()
    before = nnx.state(model)
    y = nnx_forward(model, IDS)
    model2, qmodel = nnx_lm()
    np.testing.assert_array_equal(nnx_forward(model2, IDS), y)  # building changes nothing
    assert jax.tree.structure(nnx.state(model2)) == jax.tree.structure(before)
    # the copy's params: the model's, plus nothing but the quantizers' (no LSQ here)
    params = nnx.state(qmodel, nnx.Param)
    assert jax.tree.structure(params) == jax.tree.structure(nnx.state(model2, nnx.Param))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(nnx.state(model2, nnx.Param)),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    stats = nnx.state(qmodel, QuantStats)
    assert "query" in stats["blocks"][0]["attn"] and "out" not in stats["blocks"][0]["attn"]


def test_nnx_report_and_unmatched_warning():
    model = NnxTinyLM(nnx.Rngs(0))
    report = quantization_report(model, NNX_RULES)
    by_path = report.by_path()
    assert by_path["blocks/1/attn/out"].rule == 0 and not by_path["blocks/1/attn/out"].quantized
    assert by_path["blocks/0/attn/value"].layer == "LinearGeneral"
    assert by_path["blocks/0/attn/value"].rule == 1
    assert len(report.layers) == 1 + 2 * 6 and report.unmatched == (2,)
    assert ("ln_f", "LayerNorm") in report.skipped
    with pytest.warns(UserWarning, match="#2 'decoder/.*' matched no layer"):
        quantize_model(model, NNX_RULES)


def test_nnx_gradients_reach_every_kernel():
    _, qmodel = nnx_lm()

    @nnx.jit
    def grads(model):
        def loss(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(IDS), IDS).mean()
        return nnx.grad(loss)(model)

    g = grads(qmodel)
    flat = jax.tree_util.tree_flatten_with_path(nnx.state(g, nnx.Param))[0]
    kernels = [(jax.tree_util.keystr(p), v) for p, v in flat
               if "kernel" in jax.tree_util.keystr(p) or "embedding" in jax.tree_util.keystr(p)]
    assert len(kernels) == 1 + 2 * 6
    for name, v in kernels:
        assert bool(jnp.any(v != 0)), name


def test_nnx_train_observes_and_eval_freezes():
    _, qmodel = nnx_lm()
    slot = qmodel.blocks[0].mlp_in.promote_dtype
    assert int(slot.input_range.get_value().count) == 0
    qmodel.eval()
    y_first = nnx_forward(qmodel, IDS)  # nothing observed: the batch's own range
    assert int(slot.input_range.get_value().count) == 0
    qmodel.train()
    qmodel.set_attributes(deterministic=True)  # observe, without dropout
    np.testing.assert_allclose(nnx_forward(qmodel, IDS), y_first, rtol=1e-5, atol=1e-5)
    assert int(slot.input_range.get_value().count) == 1
    qmodel.eval()
    other = 5 * IDS % 32
    y_eval = nnx_forward(qmodel, other)
    assert int(slot.input_range.get_value().count) == 1
    qmodel.train()
    qmodel.set_attributes(deterministic=True)
    assert not np.allclose(nnx_forward(qmodel, other), y_eval, atol=1e-4)


def test_nnx_lsq_step_sizes_from_the_kernel_and_the_sample_call():
    layer, shape = nnx_layers()["dense"]
    x = normal(1, shape)
    rule = QuantRule("layer", weight=W8, act=A8, lsq=True)
    unset = quantize_model(NnxSingle(layer), rule)
    with pytest.raises(ValueError, match="not initialised"):
        unset(x)
    qmodel = quantize_model(NnxSingle(layer), rule, x)
    slot = qmodel.layer.promote_dtype
    np.testing.assert_allclose(slot.weight_scale[...],
                               pj.lsq_init(layer.kernel[...], W8).scale.reshape(-1))
    np.testing.assert_allclose(slot.input_scale[...], pj.lsq_init(x, A8).scale.reshape(()))
    g = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(qmodel)
    for leaf in jax.tree.leaves(nnx.state(g.layer.promote_dtype, nnx.Param)):
        assert bool(jnp.all(jnp.isfinite(leaf))) and bool(jnp.any(leaf != 0))


class NnxRaw(nnx.Module):
    def __init__(self):
        self.w = nnx.Param(jnp.ones((3, 2)))

    def __call__(self, x):
        return x @ self.w[...]


class NnxWithUncoverable(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(3, 3, rngs=rngs)
        self.up = nnx.ConvTranspose(3, 2, (3, 3), rngs=rngs)
        self.custom = NnxRaw()


@pytest.mark.parametrize("path, name", [("up", "ConvTranspose"), ("custom", "NnxRaw")])
def test_nnx_matched_uncoverable_layer_raises_and_can_be_excluded(path, name):
    model = NnxWithUncoverable(nnx.Rngs(0))
    other = "custom" if path == "up" else "up"
    with pytest.raises(ValueError, match=f"rule #1 matches '{path}'.*{name}"):
        quantize_model(model, [QuantRule(other), QuantRule(".*", weight=8)])
    qmodel = quantize_model(model, [QuantRule("up|custom"), QuantRule(".*", weight=8)])
    assert isinstance(qmodel.fc.promote_dtype, OperandQuant)
    report = quantization_report(model, [QuantRule("up|custom"), QuantRule(".*", weight=8)])
    assert report.by_path()[path].rule == 0 and report.unmatched == ()


def test_nnx_end_to_end_qat_training():
    _, qmodel = nnx_lm()
    qmodel.train()
    optimizer = nnx.Optimizer(qmodel, optax.adam(3e-3), wrt=nnx.Param)
    targets = jnp.roll(IDS, -1, axis=1)

    @nnx.jit
    def step(model, optimizer):
        def loss(model):
            logits = model(IDS)
            return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

        value, grads = nnx.value_and_grad(loss)(model)
        optimizer.update(model, grads)
        return value

    qmodel.set_attributes(deterministic=True)  # dropout needs rngs; keep it off
    losses = [float(step(qmodel, optimizer)) for _ in range(8)]
    assert losses[-1] < losses[0]
    slot = qmodel.blocks[1].attn.query.promote_dtype
    assert int(slot.input_range.get_value().count) == 8
    qmodel.eval()
    assert bool(jnp.all(jnp.isfinite(nnx_forward(qmodel, IDS))))


# -- apply(method=...) ----------------------------------------------------------------------
def test_linen_apply_method_quantizes_the_same_layers():
    qmodel = quantize_model(EncDec(), QuantRule(".*", weight=W8, act=A8, observer="minmax"))
    v = qmodel.init(KEY, IDS)
    h = qmodel.apply(v, IDS, method="encode")
    p = v["params"]
    table = p["embed"]["embedding"]
    rows = pj.QuantSpec(bits=8, symmetric=True, axis=-1)  # W8 on the (vocab, d) table
    emb = jnp.take(fq(table, rows), IDS, axis=0)
    ref_h = fq(emb, A8) @ fq(p["enc"]["kernel"], W8) + p["enc"]["bias"]
    np.testing.assert_allclose(h, ref_h, rtol=1e-5, atol=1e-5)
    y = qmodel.apply(v, h, method=EncDec.decode)
    d = fq(h, A8) @ fq(p["dec"]["kernel"], W8) + p["dec"]["bias"]
    np.testing.assert_allclose(y, fq(d, A8) @ fq(table, rows).T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(qmodel.apply(v, h, method=lambda m, h: m.decode(h)), y,
                               rtol=0, atol=0)
    np.testing.assert_allclose(qmodel.apply(v, IDS), y, rtol=1e-6, atol=1e-6)
    _, upd = qmodel.apply(v, IDS, method="encode", mutable=[STATS])
    counts = {k: int(s["input_range"].count) for k, s in upd[STATS].items()}
    assert counts == {"embed": 0, "enc": 1, "dec": 0}  # only the layers encode reaches observe
    with pytest.raises(AttributeError, match="EncDec has no method 'decoder'"):
        qmodel.apply(v, h, method="decoder")
