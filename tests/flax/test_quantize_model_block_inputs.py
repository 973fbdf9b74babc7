"""Block-scaled (MX / NVFP4 / per-group) layer inputs in quantize_model rules and serve_model.

A rule's ``act`` with ``group_size`` along the input's last axis is quantized on every
call: ``fake_quant(x, calibrate(x, act))``, training and evaluation alike, no observer
state.  A weight spec's ``group_size`` puts the blocks along the axis the matmul
contracts (its ``axis`` only says "not per tensor").  Blocks that do not fit a matmul
(along a free axis, not dividing it) are a ``ValueError`` at trace time naming the
weight, the op's input shape and the rule.

References: stock Flax computations written here with ``pj.calibrate`` +
``pj.fake_quant`` applied by hand to each layer's input and kernel (the core's MX /
NVFP4 grids are tested against ml_dtypes in tests/core), and an MX input quantizer
written in float64 NumPy + ml_dtypes from the OCP rule.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import pychop_jax as pj
from pychop_jax.flax.models import STATS, quantize_model
from pychop_jax.serving.deploy import INPUTS, serve_model

F = pj.formats
X = jax.random.normal(jax.random.key(0), (6, 64))
OTHER = 3.0 * jax.random.normal(jax.random.key(9), (6, 64))  # another batch, another range

# (weight spec: blocks along a Dense kernel's contracted axis 0, input spec: its last axis)
FORMATS = {
    "mxfp8": (dataclasses.replace(F.MXFP8_E4M3, axis=0), F.MXFP8_E4M3),
    "nvfp4": (dataclasses.replace(F.NVFP4, axis=0), F.NVFP4),
}


def fq(x, spec):
    """Calibrated on ``x`` itself, as a block-scaled input is on every call."""
    return pj.fake_quant(x, pj.calibrate(x, spec))


def rules_for(name):
    weight, act = FORMATS[name]
    return [pj.QuantRule(".*", weight=weight, act=act)]


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(32, name="fc1")(x))
        return nn.Dense(16, name="fc2")(x)


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(64, 32, rngs=rngs)
        self.fc2 = nnx.Linear(32, 16, rngs=rngs)

    def __call__(self, x):
        return self.fc2(nnx.relu(self.fc1(x)))


def reference(p, x, weight, act):
    """The MLP with each layer's input and kernel fake-quantized by hand, per call."""
    h = nn.relu(fq(x, act) @ fq(p["fc1"]["kernel"], weight) + p["fc1"]["bias"])
    return fq(h, act) @ fq(p["fc2"]["kernel"], weight) + p["fc2"]["bias"]


def nnx_params(model):
    return {name: {"kernel": layer.kernel[...], "bias": layer.bias[...]}
            for name, layer in (("fc1", model.fc1), ("fc2", model.fc2))}


# -- linen ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_linen_equals_hand_quantized_reference_no_state(name):
    weight, act = FORMATS[name]
    qmodel = quantize_model(MLP(), rules_for(name))
    v = qmodel.init(jax.random.key(1), X)
    assert set(v) == {"params"}  # no quant_stats: nothing is observed
    y_train, upd = qmodel.apply(v, OTHER, mutable=[STATS])
    assert not jax.tree.leaves(upd)
    y_eval = qmodel.apply(v, OTHER)
    np.testing.assert_array_equal(y_train, y_eval)
    want = reference(v["params"], OTHER, weight, act)
    np.testing.assert_allclose(y_eval, want, rtol=1e-6, atol=1e-6)
    # per call: the scales are this batch's, not the init batch's
    stale = nn.relu(pj.fake_quant(OTHER, pj.calibrate(X, act)) @ fq(v["params"]["fc1"]["kernel"],
                                                                     weight))
    fresh = nn.relu(fq(OTHER, act) @ fq(v["params"]["fc1"]["kernel"], weight))
    assert not np.allclose(stale, fresh)


def test_linen_gradients_reach_kernel_and_input():
    weight, act = FORMATS["mxfp8"]
    qmodel = quantize_model(MLP(), rules_for("mxfp8"))
    v = qmodel.init(jax.random.key(1), X)

    def loss(p, x):
        return (qmodel.apply({"params": p}, x) ** 2).sum()

    def ref_loss(p, x):
        return (reference(p, x, weight, act) ** 2).sum()

    gp, gx = jax.jit(jax.grad(loss, argnums=(0, 1)))(v["params"], X)
    rp, rx = jax.jit(jax.grad(ref_loss, argnums=(0, 1)))(v["params"], X)
    for layer in ("fc1", "fc2"):
        assert bool(jnp.any(gp[layer]["kernel"] != 0))
        np.testing.assert_allclose(gp[layer]["kernel"], rp[layer]["kernel"], rtol=1e-5,
                                   atol=1e-5)
    assert bool(jnp.any(gx != 0))  # straight through the input quantizer
    np.testing.assert_allclose(gx, rx, rtol=1e-5, atol=1e-5)


def mx_e4m3_reference(x):
    """OCP MX fake quantization of float64 rows in blocks of 32 along the last axis:
    shared exponent floor(log2(amax)) - 8 (e4m3's emax), elements rounded to e4m3
    (nearest even) after clipping to +-448."""
    x = np.asarray(x, np.float64)
    blocks = x.reshape(*x.shape[:-1], -1, 32)
    amax = np.abs(blocks).max(axis=-1, keepdims=True)
    scale = np.where(amax > 0, 2.0 ** (np.floor(np.log2(np.where(amax > 0, amax, 1.0))) - 8),
                     1.0)
    elems = np.clip(blocks / scale, -448, 448).astype(ml_dtypes.float8_e4m3fn)
    return (elems.astype(np.float64) * scale).reshape(x.shape)


def test_input_blocks_follow_the_last_axis():
    """An input-only rule on an identity Dense: the output is the input's MX fake
    quantization, block by block (a tiny block keeps its precision next to a huge one,
    which one scale per tensor would flush to zero)."""
    x = np.concatenate([1e3 * np.asarray(X[:, :32]), 1e-3 * np.asarray(X[:, 32:])], axis=1)
    qmodel = quantize_model(nn.Dense(64, use_bias=False),
                            [pj.QuantRule(".*", act=F.MXFP8_E4M3)])
    v = {"params": {"kernel": jnp.eye(64)}}
    y = np.asarray(qmodel.apply(v, x), np.float64)
    np.testing.assert_allclose(y, mx_e4m3_reference(x), rtol=1e-6, atol=0)
    # each row's second block is one block: its error stays below amax / 7 of its own
    # (OCP's floor rule clips amax in (448 s, 512 s) to 448 s), where one scale per
    # tensor, set by the 1e3 block, would round it all to 0
    err = np.abs(y[:, 32:] - x[:, 32:]).max(axis=1)
    assert np.all(err < np.abs(x[:, 32:]).max(axis=1) / 7)
    assert np.all(np.count_nonzero(y[:, 32:], axis=1) > 16)


def test_mixed_rules_only_per_tensor_inputs_keep_state():
    rules = [pj.QuantRule("fc1", weight=8, act=8, observer="minmax"),
             pj.QuantRule("fc2", weight=FORMATS["mxfp8"][0], act=F.MXINT8)]
    qmodel = quantize_model(MLP(), rules)
    v = qmodel.init(jax.random.key(1), X)
    _, upd = qmodel.apply(v, X, mutable=[STATS])
    assert set(upd[STATS]) == {"fc1"} and set(upd[STATS]["fc1"]["kernel"]) == {"input"}
    report = pj.quantization_report(MLP(), rules, X)
    text = report.summary()
    assert "#0 'fc1': weight int8 symmetric per output channel, input int8 affine per tensor " \
           "(minmax observer)" in text
    assert "#1 'fc2': weight float8_e4m3fn (E8M0 scales), groups of 32 along the contraction, " \
           "input int8 symmetric narrow (E8M0 scales), blocks of 32 along the last axis (per " \
           "block, calibrated on each call)" in text
    # per op, the specs laid on the weight: fc2's (32, 16) kernel in blocks along axis 0
    assert report.weights()["fc2/kernel"].what == (
        "weight float8_e4m3fn (E8M0 scales), axis 0, groups of 32, input int8 symmetric "
        "narrow (E8M0 scales), blocks of 32 along the last axis")


# -- nnx -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_nnx_equals_hand_quantized_reference_no_state(name):
    weight, act = FORMATS[name]
    qmodel = quantize_model(NnxMLP(nnx.Rngs(0)), rules_for(name))
    y_train = qmodel(OTHER)
    assert qmodel.quant_stats.get_value() == {} and qmodel.quant_params.get_value() == {}
    qmodel.eval()
    y_eval = qmodel(OTHER)
    np.testing.assert_array_equal(y_train, y_eval)
    want = reference(nnx_params(qmodel.model), OTHER, weight, act)
    np.testing.assert_allclose(y_eval, want, rtol=1e-6, atol=1e-6)
    # the linen model with the same params computes the same
    lin = quantize_model(MLP(), rules_for(name))
    np.testing.assert_allclose(lin.apply({"params": nnx_params(qmodel.model)}, OTHER), y_eval,
                               rtol=1e-6, atol=1e-6)


def test_nnx_gradients_reach_kernel():
    weight, act = FORMATS["nvfp4"]
    qmodel = quantize_model(NnxMLP(nnx.Rngs(0)), rules_for("nvfp4"))

    def loss(model):
        return (model(X) ** 2).sum()

    grads = nnx.grad(loss)(qmodel)
    ref = jax.grad(lambda p: (reference(p, X, weight, act) ** 2).sum())(nnx_params(qmodel.model))
    for layer in ("fc1", "fc2"):
        g = getattr(grads.model, layer).kernel[...]
        assert bool(jnp.any(g != 0))
        np.testing.assert_allclose(g, ref[layer]["kernel"], rtol=1e-5, atol=1e-5)


# -- serving ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_linen_served_equals_qat_eval(name):
    weight, act = FORMATS[name]
    qmodel = quantize_model(MLP(), rules_for(name))
    v = qmodel.init(jax.random.key(1), X)
    expected = qmodel.apply(v, OTHER)
    served_fn, served = serve_model(qmodel, v, X)
    kernel = served["params"]["fc1"]["kernel"]
    assert isinstance(kernel, pj.QuantizedArray) and kernel.spec == weight
    assert served[INPUTS] == {}  # the inputs are quantized per call: no frozen quantizer
    np.testing.assert_allclose(jax.jit(served_fn)(served, OTHER), expected, rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_nnx_served_equals_qat_eval(name):
    qmodel = quantize_model(NnxMLP(nnx.Rngs(0)), rules_for(name))
    qmodel.eval()
    expected = qmodel(OTHER)
    served = serve_model(qmodel)
    variables = served.served.get_value()
    kernel = variables["params"]["fc2"]["kernel"].get_value()
    assert isinstance(kernel, pj.QuantizedArray) and kernel.spec == FORMATS[name][0]
    assert variables[INPUTS] == {}
    np.testing.assert_allclose(served(OTHER), expected, rtol=1e-5, atol=1e-5)


class Blocks(nn.Module):
    """A Conv (blocks along input channels) and a DenseGeneral contracting two axes."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(32, (3, 3), name="conv")(x))
        return nn.DenseGeneral(8, axis=(-2, -1), name="head")(x.reshape(x.shape[0], 36, 32))


def test_conv_and_dense_general_integer_blocks_served():
    """Integer per-group inputs: the served layers take the float path (the input's
    scales vary along the contraction), equal to the QAT evaluation."""
    act = pj.QuantSpec(bits=8, symmetric=True, axis=-1, group_size=16)
    rules = [pj.QuantRule("conv", weight=dataclasses.replace(F.MXFP8_E4M3, axis=2), act=act),
             pj.QuantRule("head", weight=8, act=act)]
    x = jax.random.normal(jax.random.key(3), (2, 6, 6, 32))
    qmodel = quantize_model(Blocks(), rules)
    v = qmodel.init(jax.random.key(1), x)
    assert set(v) == {"params"}
    p = v["params"]
    h = nn.relu(jax.lax.conv_general_dilated(
        fq(x, act), fq(p["conv"]["kernel"], rules[0].weight), (1, 1), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["conv"]["bias"])
    h = fq(h.reshape(2, 36, 32), act)
    # the int shorthand on the (36, 32, 8) kernel contracting (0, 1): per output, axis 2
    w = fq(p["head"]["kernel"], pj.QuantSpec(bits=8, symmetric=True, axis=2))
    want = jnp.einsum("bsc,sco->bo", h, w) + p["head"]["bias"]
    expected = qmodel.apply(v, x)
    np.testing.assert_allclose(expected, want, rtol=1e-5, atol=1e-5)
    served_fn, served = serve_model(qmodel, v, x)
    np.testing.assert_allclose(served_fn(served, x), expected, rtol=1e-5, atol=1e-5)


# -- errors ----------------------------------------------------------------------------------------
def test_block_axis_other_than_last_names_the_weight_at_trace_time():
    act = dataclasses.replace(F.MXFP8_E4M3, axis=0, group_size=2)
    rules = [pj.QuantRule(".*", weight=8, act=act)]
    # every misfit at once: both weights, their input shapes
    match = ("weight 'fc1/kernel': its dot_general input of shape \\(6, 64\\).*blocks of 2 "
             "along axis 0: .*axis=-1(.|\n)*weight 'fc2/kernel': its dot_general input of shape "
             "\\(6, 32\\)")
    with pytest.raises(ValueError, match=match):
        quantize_model(MLP(), rules).init(jax.random.key(0), X)
    with pytest.raises(ValueError, match=match):
        pj.quantization_report(MLP(), rules, X)
    qmodel = quantize_model(NnxMLP(nnx.Rngs(0)), rules)  # nnx: at the first call
    with pytest.raises(ValueError, match=match):
        qmodel(X)


def test_layer_not_contracting_the_last_axis_is_an_error():
    class Mix(nn.Module):
        @nn.compact
        def __call__(self, x):  # contracts the batch axis, keeps the features
            return nn.Einsum((6, 4), "bd,bh->dh", name="mix")(x)

    qmodel = quantize_model(Mix(), [pj.QuantRule(".*", weight=8, act=F.MXFP8_E4M3)])
    with pytest.raises(ValueError, match="weight 'mix/kernel': its dot_general input of shape "
                       "\\(6, 64\\).*does not contract the input's last axis \\(it "
                       "contracts \\(0,\\)\\)"):
        qmodel.init(jax.random.key(0), X)

    class Ellipsis_(nnx.Module):
        def __init__(self, rngs):
            self.mix = nnx.Einsum("...d,dh->...h", (64, 4), rngs=rngs)

        def __call__(self, x):
            return self.mix(x)

    ok = quantize_model(Ellipsis_(nnx.Rngs(0)),
                        [pj.QuantRule(".*", weight=8, act=F.MXFP8_E4M3)])
    assert ok(X).shape == (6, 4)


def test_rule_errors():
    with pytest.raises(ValueError, match="axis=-1 without group_size"):
        pj.QuantRule(".*", act=pj.QuantSpec(bits=8, axis=-1))
    with pytest.raises(ValueError, match="lsq=True"):
        pj.QuantRule(".*", weight=8, act=F.MXINT8, lsq=True)
    with pytest.raises(ValueError, match="per tensor"):
        pj.QuantRule(".*", attention=F.MXFP8_E4M3)
    qmodel = quantize_model(nn.Dense(4), [pj.QuantRule(".*", weight=8, act=F.MXFP8_E4M3)])
    with pytest.raises(ValueError, match="weight 'kernel': its dot_general input of shape "
                       "\\(2, 40\\).*blocks of 32 do not divide the last axis \\(40\\)"):
        qmodel.init(jax.random.key(0), jnp.ones((2, 40)))
    # a row no longer than a block is one block (as a weight's axis no longer than a group)
    report = qmodel.report(qmodel.init(jax.random.key(0), jnp.ones((2, 20))), jnp.ones((2, 20)))
    assert report.weights()["kernel"].input_spec.group_size == 20
    # a weight's groups along its contracted axis: the same error, naming the weight
    qmodel = quantize_model(nn.Dense(4), [pj.QuantRule(".*", weight=F.MXFP4)])
    with pytest.raises(ValueError, match="weight 'kernel' of shape \\(40, 4\\) \\("
                       "dot_general contracting axes \\(0,\\)\\): groups of 32 along its "
                       "contracted axis 0 \\(length 40\\) do not divide it"):
        qmodel.init(jax.random.key(0), jnp.ones((2, 40)))


# -- with a post-training method, and Embed.attend ------------------------------------------------
def test_gptq_with_block_inputs_served():
    rules = [pj.QuantRule(".*", weight=pj.QuantSpec(bits=4, symmetric=True, axis=0, group_size=32),
                          act=F.MXFP8_E4M3, method=pj.algorithms.GPTQ())]
    qmodel = quantize_model(MLP(), rules)
    v = qmodel.init(jax.random.key(1), X)
    v, _ = pj.calibrate_model(qmodel, v, [X, OTHER])
    assert STATS not in v
    expected = qmodel.apply(v, OTHER)
    served_fn, served = serve_model(qmodel, v, X)
    np.testing.assert_allclose(served_fn(served, OTHER), expected, rtol=1e-5, atol=1e-5)


class Tied(nn.Module):
    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(16, 64, name="embed")
        return embed.attend(nn.Dense(64, name="proj")(embed(ids)))


def test_embed_attend_query_blocks():
    rules = [pj.QuantRule(".*", weight=8, act=F.MXFP8_E4M3)]
    ids = jnp.arange(12).reshape(3, 4)
    qmodel = quantize_model(Tied(), rules)
    v = qmodel.init(jax.random.key(1), ids)
    assert set(v) == {"params"}
    p = v["params"]
    # the table per row (the int shorthand), looked up and attended to
    # (its rows: the axis neither the lookup nor attend contracts)
    table = fq(p["embed"]["embedding"], pj.QuantSpec(bits=8, symmetric=True, axis=0))
    h = fq(table[ids], F.MXFP8_E4M3) @ fq(p["proj"]["kernel"], pj.QuantSpec(
        bits=8, symmetric=True, axis=-1)) + p["proj"]["bias"]
    want = fq(h, F.MXFP8_E4M3) @ table.T
    expected = qmodel.apply(v, ids)
    np.testing.assert_allclose(expected, want, rtol=1e-5, atol=1e-5)
    served_fn, served = serve_model(qmodel, v, ids)
    np.testing.assert_allclose(served_fn(served, ids), expected, rtol=1e-5, atol=1e-5)
