"""pychop_jax.quantize_model on stock flax.linen / flax.nnx layers and models.

Every layer check compares against an independent reference: the stock layer applied
to a kernel and an input fake-quantized by hand with ``pj.calibrate`` +
``pj.fake_quant`` (the ``minmax`` observer's first range is the batch's range, which
is what ``calibrate`` computes).  A rule's weight spec is relative to the matmul:
``W8`` (``axis=-1``) is one scale per output channel, i.e. per element of every
kernel axis the layer does not contract; the references spell those axes out
(``OUTPUT_AXES``, read off each layer's code).
"""

import functools
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from quantize_model_fixtures import (
    A8,
    IDS,
    KEY,
    LINEN_LAYERS,
    W8,
    EncDec,
    NnxDrop,
    NnxSingle,
    NnxTinyLM,
    Single,
    TinyLM,
    channel_spec,
    fq,
    nnx_forward,
    nnx_layers,
    normal,
)

import pychop_jax as pj
from pychop_jax.flax.models import LSQ_PARAMS, STATS, quantization_report, quantize_model
from pychop_jax.transform.rules import QuantRule

ROWS = {bits: pj.QuantSpec(bits=bits, symmetric=True, axis=0) for bits in (4, 8)}  # tables


def fq_with(x, calib, spec):
    """``x`` fake-quantized with the range calibrated on ``calib``."""
    return pj.fake_quant(x, pj.calibrate(calib, spec))


def count(stats, *path):
    """The observation count of the input range at ``path`` (the weight's path)."""
    for k in path:
        stats = stats[k]
    return int(stats["input"].count)


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
    assert count(v[STATS], "layer", "kernel") == 0  # init observes nothing
    w_spec = channel_spec(kind)
    # train: the observer sees x1 first, then quantizes x1 with that range
    y1, upd = qmodel.apply(v, x1, mutable=[STATS])
    assert count(upd[STATS], "layer", "kernel") == 1
    np.testing.assert_allclose(y1, kernel_reference(layer, params, x1, w_spec, A8),
                               rtol=1e-5, atol=1e-5)
    # eval on another batch: the range of x1, frozen
    y2 = qmodel.apply({**v, **upd}, x2)
    np.testing.assert_allclose(y2, kernel_reference(layer, params, x2, w_spec, A8, calib=x1),
                               rtol=1e-5, atol=1e-5)
    assert not np.allclose(y2, layer.apply({"params": params}, x2), atol=1e-2)


def test_linen_int_shorthand_is_symmetric_per_output_channel():
    """On a (d, heads, head_dim) DenseGeneral kernel: one scale per (head, head_dim)."""
    layer, shape = LINEN_LAYERS["dense_general"]
    x = normal(1, shape)
    qmodel = quantize_model(Single(layer), QuantRule("layer", weight=4))
    v = qmodel.init(KEY, x)
    np.testing.assert_allclose(qmodel.apply(v, x),
                               kernel_reference(layer, v["params"]["layer"], x,
                                                channel_spec("dense_general", 4), None),
                               rtol=1e-5, atol=1e-5)


def test_linen_embed_lookup_and_attend():
    """The table per row (the axis neither the lookup nor ``attend`` contracts); ``act``
    quantizes ``attend``'s query, not the ids."""
    embed = nn.Embed(11, 6)
    ids = jnp.array([[0, 3, 10], [5, 5, 1]])
    query = normal(3, (2, 3, 6))
    rule = QuantRule("layer", weight=4, act=A8, observer="minmax")
    look = quantize_model(Single(embed), rule)
    v = look.init(KEY, ids)
    table = v["params"]["layer"]["embedding"]
    np.testing.assert_allclose(look.apply(v, ids), jnp.take(fq(table, ROWS[4]), ids, axis=0),
                               rtol=1e-6)
    assert STATS not in v  # a lookup's input is ids: nothing observed
    attend = quantize_model(Single(embed, "attend"), rule)
    va = attend.init(KEY, query)
    assert set(va[STATS]["layer"]["embedding"]) == {"input"}
    y, upd = attend.apply({**va, "params": v["params"]}, query, mutable=[STATS])
    assert count(upd[STATS], "layer", "embedding") == 1
    np.testing.assert_allclose(y, fq(query, A8) @ fq(table, ROWS[4]).T, rtol=1e-5, atol=1e-5)


# -- a small transformer from stock layers ----------------------------------------------------
LM_RULES = [QuantRule(".*attn/out"),  # leave the attention output projection float
            QuantRule(".*", weight=8, act=8),
            QuantRule("decoder/.*", weight=4)]  # matches nothing
#: the TinyLM's weights: the tied table, and per block q, k, v, out, mlp_in, mlp_out
LM_WEIGHTS = ["embed/embedding"] + [f"blocks_{i}/{name}/kernel" for i in range(2)
                                    for name in ("attn/query", "attn/key", "attn/value",
                                                 "attn/out", "mlp_in", "mlp_out")]


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
    float_vars = jax.jit(TinyLM().init)(KEY, IDS)
    _, v, evaluate, _ = linen_lm()
    assert set(v) == {"params", STATS}
    chex_equal = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)),
                              v["params"], float_vars["params"])
    assert all(jax.tree.leaves(chex_equal))
    assert jax.tree.structure(v["params"]) == jax.tree.structure(float_vars["params"])
    # a float checkpoint with fresh stats: evaluation uses each batch's own range
    y = evaluate({"params": float_vars["params"], STATS: v[STATS]}, IDS)
    ref = jax.jit(TinyLM().apply)(float_vars, IDS)
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, atol=0.1 * float(jnp.abs(ref).max()))


def check_lm_report(report, sep):
    """The TinyLM's report (linen paths ``blocks_0/...``; nnx ``blocks/0/...``)."""
    name = lambda path: path.replace("blocks_", "blocks" + sep)  # noqa: E731
    weights = report.weights()
    assert set(weights) == {name(p) for p in LM_WEIGHTS}  # the norms are not weights
    out = weights[name("blocks_0/attn/out/kernel")]
    assert out.rule == 0 and not out.quantized and out.what == "float (excluded by rule #0)"
    query = weights[name("blocks_1/attn/query/kernel")]
    assert query.rule == 1 and query.quantized and query.kind == "weight"
    assert query.primitive == "dot_general" and query.contracted == (0,)
    assert query.shape == (16, 2, 8) and "per channel (axes (1, 2))" in query.what
    mlp = weights[name("blocks_0/mlp_in/kernel")]
    assert mlp.contracted == (0,) and "per channel (axis 1)" in mlp.what
    # the tied table: looked up (weight only), then attended to (weight and input)
    table = [o for o in report.ops if o.weight == "embed/embedding"]
    assert [(o.kind, o.primitive, o.contracted) for o in table] == [
        ("lookup", "gather", (1,)), ("weight", "dot_general", (1,))]
    assert table[0].what.endswith("input ids") and "input int8 affine" in table[1].what
    assert all(o.quantized and "per channel (axis 0)" in o.what for o in table)
    # the attention products: found, float (no rule says attention=)
    products = [o for o in report.ops if o.kind == "product"]
    assert [o.module for o in products] == [name(f"blocks_{i}/attn") for i in (0, 0, 1, 1)]
    assert not any(o.quantized for o in products)
    assert not [o for o in report.ops if o.kind == "float"]
    assert len(report.quantized) == 2 + 2 * 5 and report.unmatched == (2,)
    assert not any("ln" in o.module for o in report.ops)
    assert "#2 'decoder/.*': weight int4 symmetric per output channel, input float -> no op " \
           "(unmatched)" in report.summary()


def test_linen_report_lists_ops_and_unmatched_rules_and_init_warns():
    check_lm_report(quantization_report(TinyLM(), LM_RULES, IDS), "_")
    with pytest.warns(UserWarning, match="#2 'decoder/.\\*' matched no op"):
        jax.eval_shape(quantize_model(TinyLM(), LM_RULES).init, KEY, IDS)  # at trace time


@pytest.mark.parametrize("lsq", [False, True])
def test_init_rejects_non_finite_weights_and_inputs_and_allows_them_elsewhere(lsq):
    """init runs compiled, where NaN / inf are ignored: it checks eagerly what the
    eager quantizers would reject -- a quantized weight, an input the rules quantize --
    and leaves a float-only input (weight-only rules) alone."""
    x = normal(1, (2, 8))
    model = nn.Dense(4)
    params = model.init(KEY, x)
    bad_x = x.at[1, 3].set(jnp.nan)
    bad_w = jax.tree.map(lambda a: a.at[0, 0].set(jnp.inf) if a.ndim == 2 else a, params)
    qmodel = quantize_model(model, QuantRule(".*", weight=W8, act=A8, lsq=lsq))
    with pytest.raises(ValueError, match=r"init: the sample input got 1 NaN"):
        qmodel.init_from(params, bad_x)
    with pytest.raises(ValueError, match=r"init: the weight 'kernel' got 1 \+-inf"):
        qmodel.init_from(bad_w, x)
    weight_only = quantize_model(model, QuantRule(".*", weight=W8))
    weight_only.init_from(params, bad_x)  # the input is not quantized
    # under an outer jit nothing is checked, as in every jitted quantizer -- also not
    # the concrete weights a jitted function closes over
    jax.jit(qmodel.init_from)(bad_w, x)
    jax.jit(lambda x: qmodel.init_from(bad_w, x))(x)


def test_linen_stats_live_where_the_weights_are():
    _, v, _, _ = linen_lm()
    stats = v[STATS]
    assert set(stats) == {"embed", "blocks_0", "blocks_1"}
    assert set(stats["blocks_0"]["attn"]) == {"query", "key", "value"}  # out is excluded
    assert count(stats, "blocks_0", "mlp_in", "kernel") == 0  # init observes nothing
    # the table's one matmul use (attend) has an input; its lookup has none
    assert set(stats["embed"]["embedding"]) == {"input"}


def test_linen_gradients_reach_every_kernel():
    _, v, evaluate, _ = linen_lm()

    def loss(params):
        logits = evaluate({**v, "params": params}, IDS)
        return optax.softmax_cross_entropy_with_integer_labels(logits, IDS).mean()

    grads = jax.jit(jax.grad(loss))(v["params"])
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    kernels = [(jax.tree_util.keystr(p), g) for p, g in flat
               if jax.tree_util.keystr(p).endswith(("['kernel']", "['embedding']"))]
    assert len(kernels) == len(LM_WEIGHTS)
    for name, g in kernels:
        assert bool(jnp.any(g != 0)), name


def test_linen_observers_update_only_when_stats_are_mutable():
    _, v, evaluate, observe = linen_lm()
    frozen, upd = observe(v, IDS)
    assert count(upd[STATS], "blocks_0", "mlp_in", "kernel") == 1
    # before any observation, evaluation quantizes with the batch's own range:
    # the first training call (which observes that batch) gives the same output
    np.testing.assert_allclose(evaluate(v, IDS), frozen, rtol=1e-5, atol=1e-5)
    v2 = {**v, **upd}
    _, upd2 = observe(v2, 3 * IDS % 32)
    assert count(upd2[STATS], "blocks_0", "mlp_in", "kernel") == 2
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
    got = v[STATS]["layer"]["kernel"]["input"]
    np.testing.assert_allclose([got.lo, got.hi], [expected.lo.squeeze(), expected.hi.squeeze()],
                               rtol=1e-6)
    x = normal(20, shape)
    state = pj.observers.quant_state(expected, A8)
    p = v["params"]["layer"]
    ref = layer.apply({"params": {**p, "kernel": fq(p["kernel"], channel_spec("dense"))}},
                      pj.fake_quant(x, state))
    np.testing.assert_allclose(qmodel.apply(v, x), ref, rtol=1e-5, atol=1e-5)


def test_linen_lsq_step_sizes_from_data_and_learned():
    layer, shape = LINEN_LAYERS["dense"]
    x = normal(1, shape)
    qmodel = quantize_model(Single(layer), QuantRule("layer", weight=W8, act=A8, lsq=True))
    v = qmodel.init(KEY, x)
    assert STATS not in v
    lsq = v[LSQ_PARAMS]["layer"]["kernel"]
    kernel = v["params"]["layer"]["kernel"]
    # the weight's steps in the spec's full scale shape: (1, out)
    assert lsq["weight_scale"].shape == (1, 6)
    # init runs compiled (one program): XLA may sum the mean |w| in another order than
    # the eager pj.lsq_init, a last-bit difference
    np.testing.assert_allclose(lsq["weight_scale"],
                               pj.lsq_init(kernel, channel_spec("dense")).scale, rtol=1e-6)
    np.testing.assert_allclose(lsq["input_scale"], pj.lsq_init(x, A8).scale.reshape(()),
                               rtol=1e-6)
    np.testing.assert_allclose(lsq["input_zero_point"],
                               pj.lsq_init(x, A8).zero_point.reshape(()), rtol=1e-6)
    assert set(lsq) == {"weight_scale", "input_scale", "input_zero_point"}

    def loss(trainable):
        return jnp.sum(qmodel.apply({**v, **trainable}, x) ** 2)

    grads = jax.grad(loss)({"params": v["params"], LSQ_PARAMS: v[LSQ_PARAMS]})
    for leaf in jax.tree.leaves(grads[LSQ_PARAMS]):
        assert bool(jnp.all(jnp.isfinite(leaf))) and bool(jnp.any(leaf != 0))
    # variables without the steps (a float checkpoint): the weight's path and the way out
    with pytest.raises(ValueError, match="'layer/kernel' learns its step sizes.*"
                       "quant_params/layer/kernel/weight_scale.*init_from"):
        qmodel.apply({"params": v["params"]}, x)
    # mutable=True: every collection, whole (the weight steps too, which no site holds)
    _, upd = qmodel.apply(v, x, mutable=True)
    assert set(upd) == {"params", LSQ_PARAMS}
    jax.tree.map(np.testing.assert_array_equal, upd[LSQ_PARAMS], v[LSQ_PARAMS])


def test_linen_end_to_end_qat_training_with_kwargs_passthrough():
    qmodel, v, evaluate, _ = linen_lm()
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
    assert bool(jnp.all(jnp.isfinite(evaluate(v, IDS))))  # deterministic by default
    assert count(v[STATS], "blocks_1", "attn", "query", "kernel") == 8


class NormDrop(nn.Module):
    """Batch statistics and dropout in training mode."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.BatchNorm(use_running_average=not train, name="bn")(nn.Dense(4, name="fc")(x))
        return nn.Dense(3, name="out")(nn.Dropout(0.5, deterministic=not train)(h))


def test_linen_init_and_report_from_a_training_call_with_batch_stats_and_dropout():
    """The sample call of init / the report may update the model's own collections and
    draw dropout masks, as linen's init allows (init keeps the float init's batch
    statistics); training updates both collections, with rngs and mutable as linen's."""
    x = normal(1, (5, 6))
    rules = [QuantRule("fc", weight=8, act=8, observer="minmax"), QuantRule("out", weight=8)]
    qmodel = quantize_model(NormDrop(), rules)
    rngs = {"params": KEY, "dropout": jax.random.key(1)}
    v = qmodel.init(rngs, x, train=True)
    float_v = NormDrop().init(rngs, x, train=True)
    assert set(v) == {"params", "batch_stats", STATS}
    jax.tree.map(np.testing.assert_array_equal, v["batch_stats"], float_v["batch_stats"])
    # one key: dropout draws from the params stream, as in linen (abstract: no compute)
    init = functools.partial(qmodel.init, train=True)
    assert jax.eval_shape(init, KEY, x).keys() == v.keys()
    report = quantization_report(NormDrop(), rules, x, train=True, rngs=rngs)
    assert set(report.weights()) == {"fc/kernel", "out/kernel"} and not report.unmatched
    assert qmodel.report(v, x, train=True, rngs={"dropout": KEY}).ops == report.ops
    y, upd = qmodel.apply(v, x, train=True, mutable=["batch_stats", STATS],
                          rngs={"dropout": jax.random.key(2)})
    assert set(upd) == {"batch_stats", STATS} and count(upd[STATS], "fc", "kernel") == 1
    # the float model on the hand-quantized kernels and input (fc's input is x itself):
    # the same dropout mask, the same batch statistics
    p = v["params"]
    hand = {**p, **{k: {**p[k], "kernel": fq(p[k]["kernel"], channel_spec("dense"))}
                    for k in ("fc", "out")}}
    want, want_upd = NormDrop().apply({**float_v, "params": hand}, fq(x, A8), train=True,
                                      mutable=["batch_stats"], rngs={"dropout": jax.random.key(2)})
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 upd["batch_stats"], want_upd["batch_stats"])


# -- layers the old interceptors could not cover: any matmul on a parameter is a weight ------
class WithTranspose(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.ConvTranspose(2, (3, 3), name="up")(nn.Dense(3, name="fc")(x))


class RawParams(nn.Module):
    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.normal(1.0), (x.shape[-1], 2))
        return x @ w


class WithRaw(nn.Module):
    @nn.compact
    def __call__(self, x):
        return RawParams(name="custom")(nn.Dense(3, name="fc")(x))


#: (model, the other weight, its output channel axis): ConvTranspose (kh, kw, in, out)
@pytest.mark.parametrize("model, weight, axis", [(WithTranspose(), "up/kernel", 3),
                                                 (WithRaw(), "custom/w", 1)])
def test_linen_conv_transpose_and_raw_param_are_quantized_and_can_be_excluded(model, weight,
                                                                            axis):
    x = normal(1, (1, 4, 4, 3))
    qmodel = quantize_model(model, QuantRule(".*", weight=8))
    v = qmodel.init(KEY, x)
    p = v["params"]
    module, name = weight.split("/")
    hand = {"fc": {**p["fc"], "kernel": fq(p["fc"]["kernel"], channel_spec("dense"))},
            module: {**p[module], name: fq(p[module][name],
                                           pj.QuantSpec(bits=8, symmetric=True, axis=axis))}}
    np.testing.assert_allclose(qmodel.apply(v, x), model.apply({"params": hand}, x),
                               rtol=1e-5, atol=1e-5)
    assert not np.allclose(qmodel.apply(v, x), model.apply(v, x), atol=1e-4)
    # an earlier rule keeps it float
    rules = [QuantRule("up|custom"), QuantRule(".*", weight=8)]
    excluded = quantize_model(model, rules)
    np.testing.assert_allclose(excluded.apply(v, x),
                               model.apply({"params": {**p, "fc": hand["fc"]}}, x),
                               rtol=1e-5, atol=1e-5)
    report = quantization_report(model, rules, x)
    assert report.weights()[weight].rule == 0 and not report.weights()[weight].quantized
    assert report.weights()["fc/kernel"].quantized and report.unmatched == ()


# ==== nnx ======================================================================================
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
    kernel = np.asarray(layer.kernel[...])
    qmodel = quantize_model(model, QuantRule("layer", weight=W8, act=A8, observer="minmax"))
    assert qmodel.model is not model and qmodel.model.layer is not layer  # a copy
    w_spec = channel_spec(kind)
    np.testing.assert_allclose(qmodel(x1), nnx_reference(layer, x1, w_spec, A8),
                               rtol=1e-5, atol=1e-5)
    qmodel.eval()
    np.testing.assert_allclose(qmodel(x2), nnx_reference(layer, x2, w_spec, A8, calib=x1),
                               rtol=1e-5, atol=1e-5)
    assert count(qmodel.quant_stats.get_value(), "layer", "kernel") == 1
    np.testing.assert_array_equal(layer.kernel[...], kernel)  # the model is untouched
    np.testing.assert_array_equal(qmodel.model.layer.kernel[...], kernel)


def test_nnx_embed_lookup_and_attend():
    embed = nnx.Embed(11, 6, rngs=nnx.Rngs(0))
    ids = jnp.array([[0, 3, 10], [5, 5, 1]])
    query = normal(3, (2, 3, 6))
    rule = QuantRule("layer", weight=4, act=A8, observer="minmax")
    table = fq(embed.embedding[...], ROWS[4])
    look = quantize_model(NnxSingle(embed), rule)
    np.testing.assert_allclose(look(ids), jnp.take(table, ids, axis=0), rtol=1e-6)
    assert look.quant_stats.get_value() == {}  # ids: nothing observed
    attend = quantize_model(NnxSingle(embed, "attend"), rule)
    np.testing.assert_allclose(attend(query), fq(query, A8) @ table.T, rtol=1e-5, atol=1e-5)
    assert count(attend.quant_stats.get_value(), "layer", "embedding") == 1


NNX_RULES = [QuantRule(".*attn/out"), QuantRule(".*", weight=8, act=8),
             QuantRule("decoder/.*", weight=4)]


def fresh_nnx_lm():
    """The float NnxTinyLM (dropout off) and a quantized copy that has not run yet."""
    model = NnxTinyLM(nnx.Rngs(0))
    model.eval()  # no dropout
    return model, quantize_model(model, NNX_RULES)


@functools.cache
def _nnx_lm():
    model, qmodel = fresh_nnx_lm()
    qmodel.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nnx_forward(qmodel, IDS)  # the first call makes the state (and observes nothing)
    qmodel.train()
    qmodel.set_attributes(deterministic=True)  # observe, without dropout
    return model, qmodel


def nnx_lm():
    """The float model and a quantized copy with its state made, in training mode (a
    fresh copy per test: the tests train it)."""
    model, qmodel = _nnx_lm()
    return model, nnx.clone(qmodel)


def test_nnx_model_unchanged_and_params_kept():
    model = NnxTinyLM(nnx.Rngs(0))
    model.eval()
    before = nnx.state(model)
    y = nnx_forward(model, IDS)
    model2, qmodel = nnx_lm()  # quantized, called once
    np.testing.assert_array_equal(nnx_forward(model2, IDS), y)  # quantizing changes nothing
    nnx_forward(qmodel, IDS)  # nor does training the copy
    np.testing.assert_array_equal(nnx_forward(model2, IDS), y)
    assert jax.tree.structure(nnx.state(model2)) == jax.tree.structure(before)
    # the copy's params: the model's; the quantization state beside it (no LSQ here)
    params = nnx.state(qmodel.model, nnx.Param)
    assert jax.tree.structure(params) == jax.tree.structure(nnx.state(model2, nnx.Param))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(nnx.state(model2, nnx.Param)),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    assert qmodel.quant_params.get_value() == {}
    stats = qmodel.quant_stats.get_value()
    assert set(stats["blocks"]["0"]["attn"]) == {"query", "key", "value"}  # out is excluded


class NnxNorm(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(5, 4, rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)

    def __call__(self, x):
        return self.bn(self.fc(x))


def test_nnx_report_and_unmatched_warning_when_the_state_is_made():
    model, _ = _nnx_lm()
    check_lm_report(quantization_report(model, NNX_RULES, IDS), "/")
    x = normal(1, (3, 5))
    rules = [QuantRule("fc", weight=8, act=8), QuantRule("decoder/.*", weight=4)]
    match = "#1 'decoder/.\\*' matched no op"
    float_model = NnxNorm(nnx.Rngs(0))  # training mode: its calls update the batch stats
    with pytest.warns(UserWarning, match=match) as record:
        sampled = quantize_model(float_model, rules, x)  # the sample call makes the state
    assert len(record) == 1
    # ... and only that: the copy's batch statistics are the model's
    for name in ("mean", "var"):
        np.testing.assert_array_equal(getattr(sampled.model.bn, name)[...],
                                      getattr(float_model.bn, name)[...])
    assert count(sampled.quant_stats.get_value(), "fc", "kernel") == 0
    qmodel = quantize_model(float_model, rules)
    with pytest.warns(UserWarning, match=match) as record:
        qmodel(x)  # the first call makes the state
    assert len(record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qmodel(x)  # once


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
    assert len(kernels) == len(LM_WEIGHTS)
    for name, v in kernels:
        assert bool(jnp.any(v != 0)), name


def test_nnx_train_observes_and_eval_freezes():
    _, qmodel = fresh_nnx_lm()
    mlp_in = lambda: count(qmodel.quant_stats.get_value(), "blocks", "0", "mlp_in", "kernel")  # noqa: E731
    qmodel.eval()
    y_first = nnx_forward(qmodel, IDS)  # the first call makes the state, observes nothing
    assert mlp_in() == 0
    qmodel.train()
    qmodel.set_attributes(deterministic=True)  # observe, without dropout
    # nothing observed: evaluation used the batch's own range, as observing it does
    np.testing.assert_allclose(nnx_forward(qmodel, IDS), y_first, rtol=1e-5, atol=1e-5)
    assert mlp_in() == 1
    qmodel.eval()
    other = 5 * IDS % 32
    y_eval = nnx_forward(qmodel, other)
    assert mlp_in() == 1
    qmodel.train()
    qmodel.set_attributes(deterministic=True)
    assert not np.allclose(nnx_forward(qmodel, other), y_eval, atol=1e-4)
    assert mlp_in() == 2


class NnxTwoHeads(nnx.Module):
    """Which weights a call reaches depends on a Python argument."""

    def __init__(self, rngs):
        self.a = nnx.Linear(5, 3, rngs=rngs)
        self.b = nnx.Linear(5, 3, rngs=rngs)

    def __call__(self, x, head="a"):
        return getattr(self, head)(x)


def test_nnx_and_equinox_calls_keep_the_states_of_the_sites_they_do_not_reach():
    import equinox as eqx

    x = normal(1, (3, 5))
    rule = QuantRule(".*", weight=8, act=8, observer="minmax")
    qmodel = quantize_model(NnxTwoHeads(nnx.Rngs(0)), rule)
    qmodel(x, head="a")
    qmodel(x, head="b")  # observes b, keeps a's range
    qmodel(x, head="b")
    stats = qmodel.quant_stats.get_value()
    assert (count(stats, "a", "kernel"), count(stats, "b", "kernel")) == (1, 2)

    class EqxTwoHeads(eqx.Module):
        a: eqx.nn.Linear
        b: eqx.nn.Linear

        def __call__(self, x, head="a"):
            return jax.vmap(getattr(self, head))(x)

    keys = jax.random.split(KEY)
    model = EqxTwoHeads(eqx.nn.Linear(5, 3, key=keys[0]), eqx.nn.Linear(5, 3, key=keys[1]))
    qeqx, state = quantize_model(model, rule, x)  # the sample call reaches a only
    _, state = qeqx(x, head="a", state=state)
    _, state = qeqx(x, head="b", state=state)
    assert (count(state[STATS], "a", "weight"), count(state[STATS], "b", "weight")) == (1, 1)


def test_nnx_eager_calls_in_both_modes_leave_a_module_nnx_can_walk():
    """Eager calls in training and evaluation mode trace the model twice (two graphs);
    nnx's own walks (train / eval / clone / split) still work on the quantized model."""
    x = normal(1, (3, 5))
    qmodel = quantize_model(NnxDrop(nnx.Rngs(0)), QuantRule(".*", weight=8, act=8))
    qmodel(x)  # training: dropout on, the range observed
    qmodel.eval()
    y = qmodel(x)
    qmodel.train()
    qmodel.eval()
    np.testing.assert_array_equal(qmodel(x), y)
    np.testing.assert_array_equal(nnx.clone(qmodel)(x), y)
    graphdef, state = nnx.split(qmodel)
    np.testing.assert_array_equal(nnx.merge(graphdef, state)(x), y)
    assert count(qmodel.quant_stats.get_value(), "fc", "kernel") == 1


def test_nnx_lsq_step_sizes_from_the_kernel_and_the_first_call():
    layer, shape = nnx_layers()["dense"]
    x = normal(1, shape)
    rule = QuantRule("layer", weight=W8, act=A8, lsq=True)
    qmodel = quantize_model(NnxSingle(layer), rule, x)  # the sample call initialises
    lsq = qmodel.quant_params.get_value()["layer"]["kernel"]
    np.testing.assert_allclose(lsq["weight_scale"],
                               pj.lsq_init(layer.kernel[...], channel_spec("dense")).scale)
    np.testing.assert_allclose(lsq["input_scale"], pj.lsq_init(x, A8).scale.reshape(()))
    np.testing.assert_allclose(lsq["input_zero_point"],
                               pj.lsq_init(x, A8).zero_point.reshape(()))
    # without a sample call, the first call initialises from its data, once
    first = quantize_model(NnxSingle(layer), rule)
    np.testing.assert_array_equal(first(x), qmodel(x))
    first(3.0 * x)
    jax.tree.map(np.testing.assert_array_equal, first.quant_params.get_value(),
                 qmodel.quant_params.get_value())
    assert qmodel.quant_stats.get_value() == {}
    g = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(qmodel)
    leaves = jax.tree.leaves(g.quant_params.get_value())
    assert len(leaves) == 3
    for leaf in leaves:
        assert bool(jnp.all(jnp.isfinite(leaf))) and bool(jnp.any(leaf != 0))


class NnxRaw(nnx.Module):
    def __init__(self, rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (3, 2)))

    def __call__(self, x):
        return x @ self.w[...]


class NnxWithTransposeAndRaw(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(3, 3, rngs=rngs)
        self.up = nnx.ConvTranspose(3, 2, (3, 3), rngs=rngs)
        self.custom = NnxRaw(rngs)

    def __call__(self, x):
        h = self.fc(x)
        return self.up(h), self.custom(h)


def test_nnx_conv_transpose_and_raw_param_are_quantized_and_can_be_excluded():
    model = NnxWithTransposeAndRaw(nnx.Rngs(0))
    x = normal(1, (1, 4, 4, 3))
    per = lambda axis: pj.QuantSpec(bits=8, symmetric=True, axis=axis)  # noqa: E731

    def reference(quantize_up_and_custom):
        ref = nnx.clone(model)
        ref.fc.kernel[...] = fq(ref.fc.kernel[...], per(1))
        if quantize_up_and_custom:
            ref.up.kernel[...] = fq(ref.up.kernel[...], per(3))  # (kh, kw, in, out)
            ref.custom.w[...] = fq(ref.custom.w[...], per(1))
        return ref(x)

    qmodel = quantize_model(model, QuantRule(".*", weight=8))
    for got, want in zip(qmodel(x), reference(True), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    rules = [QuantRule("up|custom"), QuantRule(".*", weight=8)]
    excluded = quantize_model(model, rules)
    for got, want in zip(excluded(x), reference(False), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    report = quantization_report(model, rules, x)
    for path in ("up/kernel", "custom/w"):
        assert report.weights()[path].rule == 0 and not report.weights()[path].quantized
    assert report.weights()["fc/kernel"].quantized and report.unmatched == ()


def test_nnx_end_to_end_qat_training():
    _, qmodel = nnx_lm()
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

    losses = [float(step(qmodel, optimizer)) for _ in range(8)]  # dropout off (nnx_lm)
    assert losses[-1] < losses[0]
    assert count(qmodel.quant_stats.get_value(), "blocks", "1", "attn", "query", "kernel") == 8
    qmodel.eval()
    assert bool(jnp.all(jnp.isfinite(nnx_forward(qmodel, IDS))))


# -- apply(method=...) ----------------------------------------------------------------------
def test_linen_apply_method_quantizes_the_same_weights():
    qmodel = quantize_model(EncDec(), QuantRule(".*", weight=W8, act=A8, observer="minmax"))
    v = qmodel.init(KEY, IDS)
    h = qmodel.apply(v, IDS, method="encode")
    p = v["params"]
    table = p["embed"]["embedding"]
    # W8 on the (vocab, d) table: per row, the axis neither the lookup nor attend contracts
    emb = jnp.take(fq(table, ROWS[8]), IDS, axis=0)
    ref_h = fq(emb, A8) @ fq(p["enc"]["kernel"], W8) + p["enc"]["bias"]
    np.testing.assert_allclose(h, ref_h, rtol=1e-5, atol=1e-5)
    y = qmodel.apply(v, h, method=EncDec.decode)
    d = fq(h, A8) @ fq(p["dec"]["kernel"], W8) + p["dec"]["bias"]
    np.testing.assert_allclose(y, fq(d, A8) @ fq(table, ROWS[8]).T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(qmodel.apply(v, h, method=lambda m, h: m.decode(h)), y,
                               rtol=0, atol=0)
    np.testing.assert_allclose(qmodel.apply(v, IDS), y, rtol=1e-6, atol=1e-6)
    _, upd = qmodel.apply(v, IDS, method="encode", mutable=[STATS])
    # only the weights encode reaches observe; the collection comes back whole, as linen's
    counts = {k: count(s, name) for k, s in upd[STATS].items() for name in s}
    assert counts == {"embed": 0, "enc": 1, "dec": 0}
    assert qmodel.report(v, IDS, method="encode").unmatched == ()
    with pytest.raises(AttributeError, match='"EncDec" object has no attribute "decoder"'):
        qmodel.apply(v, h, method="decoder")
