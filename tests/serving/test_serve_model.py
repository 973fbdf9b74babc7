"""pychop_jax.serve_model (``serving.deploy``): served linen / nnx models and plain
functions equal the QAT model's frozen evaluation (same codes x scales), and serve from
codes + scales only.

References: the QAT model's own frozen evaluation (what serving must reproduce), and,
independent of the library's model code, the float computation on weights (and inputs)
fake-quantized by hand (``pj.calibrate`` + ``pj.fake_quant``) with the op-relative specs
written out here: an Embed lookup is ``take(fake_quant(table), ids)``; a transposed
GPT-2 kernel and a ``lax.scan`` stack are written as their float functions."""

import dataclasses
import functools
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from quantize_model_fixtures import (
    IDS,
    KEY,
    LINEN_LAYERS,
    EncDec,
    NnxSingle,
    NnxTinyLM,
    Single,
    TinyLM,
    fq,
    nnx_forward,
    normal,
)

import pychop_jax as pj
from pychop_jax import QuantRule
from pychop_jax.serving.deploy import INPUTS
from pychop_jax.transform.plan import STATS

G4_IN = pj.QuantSpec(bits=4, symmetric=True, axis=0, group_size=32)  # groups along the input
A8 = pj.QuantSpec(bits=8)  # the act=8 shorthand: affine per tensor
SERVE_RULES = [
    QuantRule(".*mlp_out", weight=G4_IN),
    QuantRule(".*attn/out", weight=8),        # weight-only int8 per channel
    QuantRule(".*", weight=8, act=8),         # integer path (the tied attend too)
]


# -- helpers ----------------------------------------------------------------------------------
def sub_jaxprs(jaxpr):
    """``jaxpr`` and every sub-jaxpr inside it."""
    yield jaxpr
    for eqn in jaxpr.eqns:
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    yield from sub_jaxprs(sub)


def float_shapes(jaxpr) -> set:
    """Shapes of every floating intermediate of ``jaxpr``, sub-jaxprs included."""
    return {tuple(v.aval.shape) for j in sub_jaxprs(jaxpr) for e in j.eqns for v in e.outvars
            if jnp.issubdtype(v.aval.dtype, jnp.floating)}


def int_products(jaxpr) -> int:
    """How many dot_general / conv ops of ``jaxpr`` (sub-jaxprs included) give int32."""
    return sum(e.primitive.name in ("dot_general", "conv_general_dilated")
               and e.outvars[0].aval.dtype == jnp.int32
               for j in sub_jaxprs(jaxpr) for e in j.eqns)


def primitives(jaxpr) -> set:
    return {e.primitive.name for j in sub_jaxprs(jaxpr) for e in j.eqns}


def leaf(tree, *path):
    """The leaf at ``path`` of a served tree (an nnx State's ``Param`` boxes unwrapped)."""
    for k in path:
        tree = tree[k]
    return tree.get_value() if isinstance(tree, nnx.Variable) else tree


def served_jaxpr(served, *args):
    """The jaxpr of a served nnx model's call, its codes and scales as inputs."""
    graphdef, state = nnx.split(served)
    return jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(*args))(state).jaxpr


def assert_trees_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(x, y)


def observe(qmodel, v, *args, jit=False, **kwargs):
    """One training call of a linen / function model: the observers see ``args``
    (jitted for the larger models, where it beats running op by op)."""
    train = lambda v: qmodel.apply(v, *args, mutable=[STATS], **kwargs)  # noqa: E731
    _, upd = (jax.jit(train) if jit else train)(v)
    return {**v, **upd}


# -- the two-block LM: linen and nnx ------------------------------------------------------------
@functools.cache
def linen_lm():
    qmodel = pj.quantize_model(TinyLM(), SERVE_RULES)
    v = observe(qmodel, jax.jit(qmodel.init)(KEY, IDS), IDS, jit=True)
    return qmodel, v


def test_linen_served_equals_frozen_qat_and_round_trips(tmp_path):
    qmodel, v = linen_lm()
    other = 7 * IDS % 32
    expected = jax.jit(qmodel.apply)(v, other)
    served_fn, served = pj.serve_model(qmodel, v, IDS)
    assert set(served) == {"params", INPUTS} and STATS not in served
    block = served["params"]["blocks_0"]
    for name, bits, packed in [("mlp_in", 8, False), ("mlp_out", 4, True)]:
        kernel = block[name]["kernel"]
        assert isinstance(kernel, pj.QuantizedArray)
        assert kernel.spec.bits == bits and kernel.packed == packed  # int4 codes packed
    assert isinstance(block["attn"]["out"]["kernel"], pj.QuantizedArray)
    assert isinstance(served["params"]["embed"]["embedding"], pj.QuantizedArray)
    assert not isinstance(block["LayerNorm_0"]["scale"], pj.QuantizedArray)  # not a weight
    # each quantized input's frozen quantizer: the observed range, at the weight's path
    inputs = served[INPUTS]
    stats = v[STATS]["blocks_0"]["mlp_in"]["kernel"]["input"]
    frozen = inputs["blocks_0"]["mlp_in"]["kernel"]["input"]
    want = pj.observers.quant_state(stats, A8)
    np.testing.assert_array_equal(frozen.scale, want.scale)
    np.testing.assert_array_equal(frozen.zero_point, want.zero_point)
    assert "input" in inputs["embed"]["embedding"]  # the tied projection's input
    assert "out" not in inputs["blocks_0"]["attn"]  # weight-only: no input quantizer
    assert "mlp_out" not in inputs["blocks_0"]
    run = jax.jit(served_fn)
    logits = run(served, other)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    assert bool(jnp.all(logits.argmax(-1) == expected.argmax(-1)))
    assert int_products(jax.make_jaxpr(served_fn)(served, other).jaxpr) > 0
    path = tmp_path / "served.msgpack"
    pj.save_quantized(path, served)
    loaded = pj.load_quantized(path)
    assert_trees_equal(loaded, served)
    np.testing.assert_array_equal(run(loaded, other), logits)


def test_nnx_served_equals_frozen_qat_and_round_trips(tmp_path):
    model = NnxTinyLM(nnx.Rngs(0))
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmodel = pj.quantize_model(model, SERVE_RULES)
    qmodel.train()
    qmodel.set_attributes(deterministic=True)  # no dropout while observing
    nnx_forward(qmodel, IDS)  # observe one batch
    qmodel.eval()
    other = 7 * IDS % 32
    expected = nnx_forward(qmodel, other)
    served = pj.serve_model(qmodel)
    params = served.served.get_value()["params"]
    assert isinstance(leaf(params, "blocks", 0, "mlp_in", "kernel"), pj.QuantizedArray)
    assert leaf(params, "blocks", 0, "mlp_out", "kernel").packed
    assert isinstance(leaf(params, "embed", "embedding"), pj.QuantizedArray)
    # the QAT model (and the float model) are untouched
    assert not isinstance(qmodel.model.blocks[0].mlp_in.kernel[...], pj.QuantizedArray)
    assert not isinstance(model.blocks[0].mlp_in.kernel[...], pj.QuantizedArray)
    stats = qmodel.quant_stats.get_value()["blocks"]["0"]["mlp_in"]["kernel"]["input"]
    frozen = served.served.get_value()[INPUTS]["blocks"]["0"]["mlp_in"]["kernel"]["input"]
    np.testing.assert_array_equal(frozen.scale, pj.observers.quant_state(stats, A8).scale)
    logits = nnx_forward(served, other)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    assert bool(jnp.all(logits.argmax(-1) == expected.argmax(-1)))
    assert int_products(served_jaxpr(served, other)) > 0
    path = tmp_path / "served.msgpack"
    pj.save_quantized(path, served)
    loaded = pj.load_quantized(path, like=served)
    assert_trees_equal(loaded.served.get_value(), served.served.get_value())
    np.testing.assert_array_equal(nnx_forward(loaded, other), logits)


# -- Embed: a gather of codes ---------------------------------------------------------------
VOCAB, DIM = 96, 64
EMBED_IDS = jax.random.randint(jax.random.key(3), (3, 5), 0, VOCAB)


def _on_d(spec):
    return dataclasses.replace(spec, axis=1)


# name: (the rule's weight, the table's spec written out: a lookup contracts the table's
# feature axis (1), so an int or any axis is per row (axis 0), groups lie along d)
TABLE_SPECS = {
    "int4 per row (packed)": (4, pj.QuantSpec(bits=4, symmetric=True, axis=0)),
    "int8 per row": (8, pj.QuantSpec(bits=8, symmetric=True, axis=0)),
    "int4 rows x groups of 16 along d": (
        pj.QuantSpec(bits=4, symmetric=True, axis=1, group_size=16),
        pj.QuantSpec(bits=4, symmetric=True, axis=1, group_size=16)),
    "int4 groups of 16, rule axis 0: along d": (
        pj.QuantSpec(bits=4, symmetric=True, axis=0, group_size=16),
        pj.QuantSpec(bits=4, symmetric=True, axis=1, group_size=16)),
    "int8 affine per tensor": (pj.QuantSpec(bits=8, symmetric=False),
                               pj.QuantSpec(bits=8, symmetric=False)),
    "int8 affine, rule axis 1: per row": (pj.QuantSpec(bits=8, symmetric=False, axis=1),
                                          pj.QuantSpec(bits=8, symmetric=False, axis=0)),
    "MXFP4": (pj.formats.MXFP4, _on_d(pj.formats.MXFP4)),
    "NVFP4": (pj.formats.NVFP4, _on_d(pj.formats.NVFP4)),
    "NF4": (pj.formats.NF4, _on_d(pj.formats.NF4)),  # one group of 64 spans d
}


class LookupAttend(nn.Module):
    """An Embed used for a lookup and, with ``attend``, as the tied output projection."""

    attend: bool = False

    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(VOCAB, DIM, name="layer")
        x = embed(ids)
        return embed.attend(x) if self.attend else x


class NnxLookupAttend(nnx.Module):
    def __init__(self, attend=False):
        self.layer = nnx.Embed(VOCAB, DIM, rngs=nnx.Rngs(0))
        self.attend = attend

    def __call__(self, ids):
        x = self.layer(ids)
        return self.layer.attend(x) if self.attend else x


@pytest.mark.parametrize("name", list(TABLE_SPECS))
def test_linen_served_embed_gathers_codes_and_equals_qat_exactly(name):
    weight, spec = TABLE_SPECS[name]
    qmodel = pj.quantize_model(LookupAttend(), QuantRule("layer", weight=weight))
    v = qmodel.init(KEY, EMBED_IDS)
    expected = qmodel.apply(v, EMBED_IDS)
    table = v["params"]["layer"]["embedding"]
    reference = jnp.take(fq(table, spec), EMBED_IDS, axis=0)
    np.testing.assert_array_equal(expected, reference)  # QAT = the hand-quantized rows
    served_fn, served = pj.serve_model(qmodel, v, EMBED_IDS)
    stored = served["params"]["layer"]["embedding"]
    assert isinstance(stored, pj.QuantizedArray) and stored.spec == spec
    assert stored.packed == ("int8" not in name)
    np.testing.assert_array_equal(stored.dequantize(), fq(table, spec))
    np.testing.assert_array_equal(jax.jit(served_fn)(served, EMBED_IDS), expected)
    np.testing.assert_array_equal(served_fn(served, EMBED_IDS), expected)  # eager too
    # the lookup never builds the dequantized (vocab, d) table
    assert (VOCAB, DIM) not in float_shapes(jax.make_jaxpr(served_fn)(served, EMBED_IDS).jaxpr)


def test_linen_served_embed_attend_int_path_with_input_quantizer():
    """weight + act: the lookup gathers codes, attend (the tied projection, ``x @
    table.T``) multiplies int8 codes by the int4 per-row codes, building no (vocab, d)
    float table; weight-only, attend is the weight-only product (no integer product)."""
    qmodel = pj.quantize_model(LookupAttend(attend=True),
                               QuantRule("layer", weight=4, act=8, observer="minmax"))
    v = observe(qmodel, qmodel.init(KEY, EMBED_IDS), EMBED_IDS)
    other = (7 * EMBED_IDS + 1) % VOCAB
    expected = qmodel.apply(v, other)
    # the reference: the hand-quantized table, the input on the range of its one batch
    table = fq(v["params"]["layer"]["embedding"], pj.QuantSpec(bits=4, symmetric=True, axis=0))
    rows = jnp.take(table, EMBED_IDS, axis=0)
    x = pj.fake_quant(jnp.take(table, other, axis=0), pj.calibrate(rows, A8))
    np.testing.assert_allclose(expected, x @ table.T, rtol=1e-5, atol=1e-5)
    served_fn, served = pj.serve_model(qmodel, v, EMBED_IDS)
    assert isinstance(served["params"]["layer"]["embedding"], pj.QuantizedArray)
    assert "input" in served[INPUTS]["layer"]["embedding"]
    np.testing.assert_allclose(jax.jit(served_fn)(served, other), expected,
                               rtol=1e-5, atol=1e-5)
    jaxpr = jax.make_jaxpr(served_fn)(served, other).jaxpr
    assert int_products(jaxpr) > 0 and (VOCAB, DIM) not in float_shapes(jaxpr)
    weight_only = pj.quantize_model(LookupAttend(attend=True), QuantRule("layer", weight=4))
    v = weight_only.init(KEY, EMBED_IDS)
    served_fn, served = pj.serve_model(weight_only, v, EMBED_IDS)
    np.testing.assert_allclose(served_fn(served, other), weight_only.apply(v, other),
                               rtol=1e-5, atol=1e-5)
    jaxpr = jax.make_jaxpr(served_fn)(served, other).jaxpr
    assert int_products(jaxpr) == 0


@pytest.mark.parametrize("name", ["int4 per row (packed)",
                                  "int4 groups of 16, rule axis 0: along d",
                                  "int4 rows x groups of 16 along d", "NVFP4"])
def test_nnx_served_embed_gathers_codes_and_equals_qat_exactly(name):
    weight, spec = TABLE_SPECS[name]
    model = NnxLookupAttend()
    qmodel = pj.quantize_model(model, QuantRule("layer", weight=weight))
    qmodel.eval()
    expected = qmodel(EMBED_IDS)
    reference = jnp.take(fq(model.layer.embedding[...], spec), EMBED_IDS, axis=0)
    np.testing.assert_array_equal(expected, reference)
    served = pj.serve_model(qmodel)
    stored = leaf(served.served.get_value()["params"], "layer", "embedding")
    assert isinstance(stored, pj.QuantizedArray) and stored.packed and stored.spec == spec
    assert not isinstance(qmodel.model.layer.embedding[...], pj.QuantizedArray)  # untouched
    np.testing.assert_array_equal(nnx_forward(served, EMBED_IDS), expected)
    assert (VOCAB, DIM) not in float_shapes(served_jaxpr(served, EMBED_IDS))


@pytest.mark.parametrize("act", [None, 8])
def test_nnx_served_embed_attend(act):
    qmodel = pj.quantize_model(NnxLookupAttend(attend=True),
                               QuantRule("layer", weight=4, act=act, observer="minmax"))
    nnx_forward(qmodel, EMBED_IDS)  # observe
    qmodel.eval()
    other = (7 * EMBED_IDS + 1) % VOCAB
    expected = nnx_forward(qmodel, other)
    served = pj.serve_model(qmodel)
    np.testing.assert_allclose(nnx_forward(served, other), expected, rtol=1e-5, atol=1e-5)
    assert (int_products(served_jaxpr(served, other)) > 0) == (act is not None)


# -- integer path or float path, by what the kernel's quantizer allows -----------------------
SERVED_LAYERS = {  # name: (linen layer, nnx layer, input shape, rule weight, the kernel's
    # spec written out (int / axis: per output channel = every axis not contracted; groups
    # along the last contracted axis), integer path?)
    "dense int4 g32 (input groups)": (
        lambda: nn.Dense(8), lambda r: nnx.Linear(64, 8, rngs=r), (4, 64), G4_IN, G4_IN,
        False),
    "dense int8 per channel": (
        lambda: nn.Dense(8), lambda r: nnx.Linear(64, 8, rngs=r), (4, 64), 8,
        pj.QuantSpec(bits=8, symmetric=True, axis=1), True),
    "conv int4 g32 (input channels)": (
        lambda: nn.Conv(4, (3, 3)), lambda r: nnx.Conv(64, 4, (3, 3), rngs=r), (2, 5, 5, 64),
        pj.QuantSpec(bits=4, symmetric=True, axis=0, group_size=32),
        pj.QuantSpec(bits=4, symmetric=True, axis=2, group_size=32), False),
    "einsum int8 per (n, h)": (
        lambda: nn.Einsum((64, 2, 3), "btd,dnh->btnh"),
        lambda r: nnx.Einsum("btd,dnh->btnh", (64, 2, 3), (2, 3), rngs=r), (2, 4, 64),
        pj.QuantSpec(bits=8, symmetric=True, axis=2),
        pj.QuantSpec(bits=8, symmetric=True, axis=(1, 2)), True),
    "einsum transposed kernel, int8 per h": (
        lambda: nn.Einsum((3, 64), "btd,hd->bht"),
        lambda r: nnx.Einsum("btd,hd->bht", (3, 64), (3, 1), rngs=r), (2, 4, 64),
        8, pj.QuantSpec(bits=8, symmetric=True, axis=0), True),
    "einsum int4 g32 (input groups)": (
        lambda: nn.Einsum((64, 2, 3), "btd,dnh->btnh"),
        lambda r: nnx.Einsum("btd,dnh->btnh", (64, 2, 3), (2, 3), rngs=r), (2, 4, 64),
        G4_IN, G4_IN, False),
}


@pytest.mark.parametrize("name", list(SERVED_LAYERS))
def test_linen_weight_and_input_rules_serve_on_the_right_path(name):
    make, _, shape, weight, spec, integer = SERVED_LAYERS[name]
    x1, x2 = normal(1, shape), normal(2, shape, 1.5)
    qmodel = pj.quantize_model(Single(make()), QuantRule("layer", weight=weight, act=8))
    v = observe(qmodel, qmodel.init(KEY, x1), x1)
    expected = qmodel.apply(v, x2)  # frozen range of x1
    served_fn, served = pj.serve_model(qmodel, v, x1)
    kernel = served["params"]["layer"]["kernel"]
    assert isinstance(kernel, pj.QuantizedArray) and kernel.spec == spec
    assert kernel.packed == (spec.bits == 4)
    np.testing.assert_array_equal(kernel.dequantize(), fq(v["params"]["layer"]["kernel"], spec))
    frozen = served[INPUTS]["layer"]["kernel"]["input"]
    np.testing.assert_array_equal(frozen.scale, pj.calibrate(x1, A8).scale)  # one batch seen
    np.testing.assert_allclose(served_fn(served, x2), expected, rtol=1e-5, atol=1e-5)
    products = int_products(jax.make_jaxpr(served_fn)(served, x2).jaxpr)
    assert (products > 0) == integer


@pytest.mark.parametrize("name", list(SERVED_LAYERS))
def test_nnx_weight_and_input_rules_serve_on_the_right_path(name):
    _, make, shape, weight, spec, integer = SERVED_LAYERS[name]
    x1, x2 = normal(1, shape), normal(2, shape, 1.5)
    qmodel = pj.quantize_model(NnxSingle(make(nnx.Rngs(0))),
                               QuantRule("layer", weight=weight, act=8))
    nnx_forward(qmodel, x1)  # observe x1
    qmodel.eval()
    expected = nnx_forward(qmodel, x2)
    served = pj.serve_model(qmodel)
    kernel = leaf(served.served.get_value()["params"], "layer", "kernel")
    assert isinstance(kernel, pj.QuantizedArray) and kernel.spec == spec
    np.testing.assert_allclose(nnx_forward(served, x2), expected, rtol=1e-5, atol=1e-5)
    assert (int_products(served_jaxpr(served, x2)) > 0) == integer


# -- another method of the model, another call signature -----------------------------------------
@functools.cache
def encdec():
    qmodel = pj.quantize_model(EncDec(), QuantRule(".*", weight=8, act=8, observer="minmax"))
    return qmodel, observe(qmodel, qmodel.init(KEY, IDS), IDS)


def test_linen_serve_a_method_and_every_method_from_one_serving():
    qmodel, v = encdec()
    h = normal(4, (4, 8, 16))
    expected = qmodel.apply(v, h, method="decode")
    served_fn, served = pj.serve_model(qmodel, v, h, method="decode")
    assert isinstance(served["params"]["dec"]["kernel"], pj.QuantizedArray)
    assert not isinstance(served["params"]["enc"]["kernel"], pj.QuantizedArray)  # not reached
    np.testing.assert_allclose(served_fn(served, h, method="decode"), expected,
                               rtol=1e-5, atol=1e-5)
    # served from __call__ (which reaches every weight): the served function is traced per
    # call signature, so other methods (by name or function) run on the same variables
    served_fn, served = pj.serve_model(qmodel, v, IDS)
    for method in ("decode", EncDec.decode):
        np.testing.assert_allclose(served_fn(served, h, method=method), expected,
                                   rtol=1e-5, atol=1e-5)


def test_served_call_reaching_a_weight_the_sample_call_missed_raises():
    """Served from ``decode``, the served variables hold ``enc`` in float: a call that
    reaches it raises (naming it and the rule) rather than running it unquantized --
    with an input quantizer, and weight-only, where a float matmul would silently
    differ from the QAT model."""
    h = normal(4, (4, 8, 16))
    for rule in (QuantRule(".*", weight=8, act=8, observer="minmax"), QuantRule(".*", weight=8)):
        qmodel = pj.quantize_model(EncDec(), rule)
        v = observe(qmodel, qmodel.init(KEY, IDS), IDS)
        served_fn, served = pj.serve_model(qmodel, v, h, method="decode")
        with pytest.raises(ValueError, match="reaches 'enc/kernel', which rule #0.*sample call "
                                             "did not reach it"):
            served_fn(served, IDS)


def test_serving_an_input_only_rule_raises_at_serve_model():
    layer, shape = LINEN_LAYERS["dense"]
    x = normal(1, shape)
    qmodel = pj.quantize_model(Single(layer), QuantRule("layer", act=8))
    v = qmodel.init(KEY, x)
    with pytest.raises(ValueError, match="'layer/kernel' quantizes only its input"):
        pj.serve_model(qmodel, v, x)
    with pytest.raises(ValueError, match="'layer/kernel' quantizes only its input"):
        pj.serve_model(pj.quantize_model(NnxSingle(nnx.Linear(5, 6, rngs=nnx.Rngs(0))),
                                         QuantRule("layer", act=8), x))


class Branchy(nn.Module):
    """A Python branch on a static argument: ``head=False`` skips the quantized head,
    ``float_tail=True`` adds a layer no rule quantizes."""

    @nn.compact
    def __call__(self, x, head: bool = True, float_tail: bool = False):
        x = nn.Dense(16, name="body")(x)
        if head:
            x = nn.Dense(16, name="head")(nn.relu(x))
        if float_tail:
            x = nn.Dense(4, name="tail")(x)
        return x


def test_served_function_follows_each_call_signature():
    rules = [QuantRule("tail"), QuantRule(".*", weight=8, act=8, observer="minmax")]
    x = normal(5, (3, 12))
    qmodel = pj.quantize_model(Branchy(), rules)
    float_vars = Branchy().init(KEY, x, float_tail=True)  # every layer's params
    v = observe(qmodel, qmodel.init_from(float_vars, x, float_tail=True), x, float_tail=True)
    served_fn, served = pj.serve_model(qmodel, v, x, float_tail=True)
    assert not isinstance(served["params"]["tail"]["kernel"], pj.QuantizedArray)  # no rule
    x2 = 1.5 * x
    for kwargs in (dict(head=False), dict(), dict(float_tail=True)):
        np.testing.assert_allclose(served_fn(served, x2, **kwargs), qmodel.apply(v, x2, **kwargs),
                                   rtol=1e-5, atol=1e-5, err_msg=str(kwargs))
    # the unquantized tail is the float layer on the served head's output
    p = v["params"]["tail"]
    np.testing.assert_allclose(served_fn(served, x2, float_tail=True),
                               served_fn(served, x2) @ p["kernel"] + p["bias"],
                               rtol=1e-5, atol=1e-5)


# -- what the new design enables: transposed kernels, scanned stacks -------------------------------
def gpt2_proj(params, x):
    """GPT-2's Conv1D as transformers' Flax port writes it: an ``(out, in)`` kernel used
    as ``x @ w.T``."""
    p = params["c_proj"]
    return x @ p["weight"].T + p["bias"]


GPT2_PARAMS = {"c_proj": {"weight": normal(6, (24, 64)), "bias": normal(7, (24,))}}
GPT2_X = normal(8, (5, 64))


@pytest.mark.parametrize("act", [None, 8])
def test_transposed_kernel_served_with_packed_int4_codes(act):
    """``x @ w.T`` with ``w (out, in)``: its contraction is w's LAST axis, so int4 g32
    groups lie along it and the codes pack along it; the served matmul reads the codes
    in storage order (the transpose folded into its dimension numbers)."""
    weight = G4_IN if act is None else 4  # act: per output channel, the integer path
    spec = pj.QuantSpec(bits=4, symmetric=True, axis=1, group_size=32) if act is None \
        else pj.QuantSpec(bits=4, symmetric=True, axis=0)
    qf = pj.quantize_model(gpt2_proj, QuantRule("c_proj", weight=weight, act=act,
                                                observer="minmax"))
    v = qf.init(GPT2_PARAMS, GPT2_X)
    if act is not None:
        v = observe(qf, v, GPT2_X)
    x2 = 1.5 * GPT2_X
    expected = qf.apply(v, x2)
    w, b = GPT2_PARAMS["c_proj"]["weight"], GPT2_PARAMS["c_proj"]["bias"]
    xq = x2 if act is None else pj.fake_quant(x2, pj.calibrate(GPT2_X, A8))
    np.testing.assert_allclose(expected, xq @ fq(w, spec).T + b, rtol=1e-5, atol=1e-5)
    served_fn, served = pj.serve_model(qf, v, GPT2_X)
    stored = served["params"]["c_proj"]["weight"]
    assert isinstance(stored, pj.QuantizedArray) and stored.spec == spec
    assert stored.packed and stored.codes.shape == (24, 32)  # two codes a byte, along `in`
    y = jax.jit(served_fn)(served, x2)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    jaxpr = jax.make_jaxpr(served_fn)(served, x2).jaxpr
    assert "transpose" not in primitives(jaxpr)  # neither codes nor floats transposed
    assert (int_products(jaxpr) > 0) == (act is not None)


L, D = 3, 32


def scanned(params, x):
    """A residual stack of ``L`` layers under ``jax.lax.scan`` over stacked ``(L, D, D)``
    kernels."""
    def layer(h, p):
        return h + jnp.tanh(h @ p["w"]), None

    return jax.lax.scan(layer, x, params["layers"])[0]


def test_scan_stack_served_per_layer(tmp_path):
    """One input range and one set of weight scales per layer: the served scan equals the
    stack written out layer by layer on hand-quantized weights and inputs."""
    params = {"layers": {"w": normal(9, (L, D, D), 0.25)}}
    x = normal(10, (6, D))
    qf = pj.quantize_model(scanned, QuantRule(".*", weight=4, act=8, observer="minmax"))
    v = observe(qf, qf.init(params, x), x)
    x2 = 1.3 * x
    expected = qf.apply(v, x2)
    served_fn, served = pj.serve_model(qf, v, x)
    stored = served["params"]["layers"]["w"]
    assert stored.shape == (L, D, D) and stored.packed and stored.state.scale.shape == (L, 1, D)
    frozen = served[INPUTS]["layers"]["w"]["input"]
    assert frozen.scale.shape == (L,)
    w_spec = pj.QuantSpec(bits=4, symmetric=True, axis=1)  # per output channel of a layer
    h, h2 = x, x2
    for layer in range(L):  # the reference, written out
        state = pj.calibrate(h, A8)  # the range this layer's input had in the observed call
        np.testing.assert_allclose(frozen.scale[layer], state.scale.ravel()[0], rtol=1e-6)
        w = fq(params["layers"]["w"][layer], w_spec)
        h = h + jnp.tanh(pj.fake_quant(h, state) @ w)
        h2 = h2 + jnp.tanh(pj.fake_quant(h2, state) @ w)
    np.testing.assert_allclose(expected, h2, rtol=1e-5, atol=1e-5)
    run = jax.jit(served_fn)
    y = run(served, x2)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    jaxpr = jax.make_jaxpr(served_fn)(served, x2).jaxpr
    assert "scan" in {e.primitive.name for e in jaxpr.eqns}  # still one loop over layers
    assert int_products(jaxpr) > 0
    pj.save_quantized(tmp_path / "stack.msgpack", served)
    loaded = pj.load_quantized(tmp_path / "stack.msgpack")
    np.testing.assert_array_equal(run(loaded, x2), y)


def test_quantization_report_and_served_layout_agree_on_lm_layers():
    """The report names the weights the served params hold as codes, by param path."""
    qmodel, v = linen_lm()
    report = qmodel.report(v, IDS)
    _, served = pj.serve_model(qmodel, v, IDS)
    codes = {"/".join(str(getattr(k, "key", k)) for k in path)
             for path, x in jax.tree_util.tree_flatten_with_path(
                 served["params"], is_leaf=lambda x: isinstance(x, pj.QuantizedArray))[0]
             if isinstance(x, pj.QuantizedArray)}
    assert codes == {o.weight for o in report.quantized if o.weight is not None}
    assert len(codes) == 1 + 2 * 6  # the tied table, q/k/v/out + mlp_in/out per block
