"""pychop_jax.serving.serve_model: served linen / nnx models equal the QAT model's
frozen evaluation (same codes x scales), and serve from codes + scales only.

References: the QAT model's own frozen evaluation (what serving must reproduce), and
for the Embed lookup also ``take(fake_quant(table), ids)`` with the table quantized
by hand (``pj.calibrate`` + ``pj.fake_quant``)."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from pychop_jax.flax.nnx_model import OperandQuant
from pychop_jax.flax.quantize_model import STATS, quantize_model
from pychop_jax.flax.rules import QuantRule
from pychop_jax.serving.serve_model import serve_model
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
from pychop_jax.serving.served_ops import einsum_dimension_numbers, served_dot_general

SERVE_RULES = [
    QuantRule(".*mlp_out", weight=pj.QuantSpec(bits=4, symmetric=True, axis=0, group_size=32)),
    QuantRule(".*attn/out", weight=8),        # weight-only int8 per channel
    QuantRule(".*", weight=8, act=8),         # integer path (Embed.attend: float)
]
IS_Q = (pj.IntKernel, pj.QuantizedArray)


def test_linen_served_equals_frozen_qat_and_round_trips(tmp_path):
    qmodel = quantize_model(TinyLM(), SERVE_RULES)
    v = jax.jit(qmodel.init)(KEY, IDS)
    _, upd = jax.jit(lambda v: qmodel.apply(v, IDS, mutable=[STATS]))(v)
    v = {**v, **upd}
    other = 7 * IDS % 32
    expected = jax.jit(lambda v: qmodel.apply(v, other))(v)
    served_fn, served = serve_model(qmodel, v, IDS)
    block = served["params"]["blocks_0"]
    assert isinstance(block["mlp_in"]["kernel"], pj.IntKernel)
    assert block["mlp_in"]["kernel"].input_state is not None  # the observed range
    assert isinstance(block["attn"]["out"]["kernel"], pj.QuantizedArray)
    assert block["mlp_out"]["kernel"].packed  # int4 codes stored packed
    assert isinstance(served["params"]["embed"]["embedding"], pj.IntKernel)
    assert STATS not in served
    logits = jax.jit(served_fn)(served, other)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    assert bool(jnp.all(logits.argmax(-1) == expected.argmax(-1)))
    path = tmp_path / "served.msgpack"
    pj.save_quantized(path, served)
    loaded = pj.load_quantized(path)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(served), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(jax.jit(served_fn)(loaded, other), logits)


def test_nnx_served_equals_frozen_qat():
    model = NnxTinyLM(nnx.Rngs(0))
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmodel = quantize_model(model, SERVE_RULES)
    qmodel.train()
    qmodel.set_attributes(deterministic=True)
    nnx_forward(qmodel, IDS)  # observe one batch
    qmodel.eval()
    other = 7 * IDS % 32
    expected = nnx_forward(qmodel, other)
    served = serve_model(qmodel)
    assert isinstance(served.blocks[0].mlp_in.kernel[...], pj.IntKernel)
    assert served.blocks[0].mlp_in.dot_general is served_dot_general  # int path when it can
    assert served.blocks[0].mlp_out.kernel[...].packed
    assert isinstance(qmodel.blocks[0].mlp_in.promote_dtype, OperandQuant)  # untouched
    logits = nnx_forward(served, other)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    assert bool(jnp.all(logits.argmax(-1) == expected.argmax(-1)))


def test_serving_an_input_only_rule_raises():
    layer, shape = LINEN_LAYERS["dense"]
    x = normal(1, shape)
    qmodel = quantize_model(Single(layer), QuantRule("layer", act=8))
    v = qmodel.init(KEY, x)
    with pytest.raises(ValueError, match="'layer' quantizes only its input"):
        serve_model(qmodel, v, x)


# -- Embed: a gather of codes ---------------------------------------------------------------
VOCAB, DIM = 96, 64
EMBED_IDS = jax.random.randint(jax.random.key(3), (3, 5), 0, VOCAB)
TABLE_SPECS = {
    "int4 per row (packed)": 4,
    "int8 per row": 8,
    "int4 rows x groups of 16 along d": pj.QuantSpec(bits=4, symmetric=True, axis=1,
                                                     group_size=16),
    "int4 groups of 16 tokens": pj.QuantSpec(bits=4, symmetric=True, axis=0, group_size=16),
    "int8 affine per tensor": pj.QuantSpec(bits=8, symmetric=False),
    "int8 affine per feature": pj.QuantSpec(bits=8, symmetric=False, axis=1),
    "MXFP4": pj.formats.MXFP4,
    "NVFP4": pj.formats.NVFP4,
    "NF4": pj.formats.NF4,
}


def table_spec(weight):
    """The rule's table spec as a QuantSpec (the int shorthand: symmetric per row)."""
    if isinstance(weight, int):
        return pj.QuantSpec(bits=weight, symmetric=True, axis=0)
    return weight


def float_shapes(jaxpr) -> set:
    """Shapes of every floating intermediate of ``jaxpr``, sub-jaxprs included."""
    shapes = set()
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            if jnp.issubdtype(var.aval.dtype, jnp.floating):
                shapes.add(tuple(var.aval.shape))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    shapes |= float_shapes(sub)
    return shapes


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
    weight = TABLE_SPECS[name]
    qmodel = quantize_model(LookupAttend(), QuantRule("layer", weight=weight))
    v = qmodel.init(KEY, EMBED_IDS)
    expected = jax.jit(qmodel.apply)(v, EMBED_IDS)
    table = v["params"]["layer"]["embedding"]
    reference = jnp.take(fq(table, table_spec(weight)), EMBED_IDS, axis=0)
    np.testing.assert_array_equal(expected, reference)  # QAT = the hand-quantized rows
    served_fn, served = serve_model(qmodel, v, EMBED_IDS)
    stored = served["params"]["layer"]["embedding"]
    assert isinstance(stored, pj.QuantizedArray)
    assert stored.packed == (name != "int8 per row" and "int8" not in name)
    np.testing.assert_array_equal(jax.jit(served_fn)(served, EMBED_IDS), expected)
    np.testing.assert_array_equal(served_fn(served, EMBED_IDS), expected)  # eager too
    # the lookup never builds the dequantized (vocab, d) table
    assert (VOCAB, DIM) not in float_shapes(jax.make_jaxpr(served_fn)(served, EMBED_IDS).jaxpr)


def test_linen_served_embed_attend_int_path_with_input_quantizer():
    """weight + act: the lookup gathers codes, attend (the tied projection) multiplies
    int8 codes; weight-only, attend dequantizes the table in its matmul -- which the
    (vocab, d) detector sees."""
    qmodel = quantize_model(LookupAttend(attend=True),
                            QuantRule("layer", weight=4, act=8, observer="minmax"))
    v = qmodel.init(KEY, EMBED_IDS)
    _, upd = qmodel.apply(v, EMBED_IDS, mutable=[STATS])
    v = {**v, **upd}
    other = (7 * EMBED_IDS + 1) % VOCAB
    expected = jax.jit(qmodel.apply)(v, other)
    served_fn, served = serve_model(qmodel, v, EMBED_IDS)
    assert isinstance(served["params"]["layer"]["embedding"], pj.IntKernel)
    np.testing.assert_allclose(jax.jit(served_fn)(served, other), expected,
                               rtol=1e-5, atol=1e-5)
    jaxpr = jax.make_jaxpr(served_fn)(served, other).jaxpr
    assert int_products(jaxpr) > 0 and (VOCAB, DIM) not in float_shapes(jaxpr)
    weight_only = quantize_model(LookupAttend(attend=True), QuantRule("layer", weight=4))
    v = weight_only.init(KEY, EMBED_IDS)
    served_fn, served = serve_model(weight_only, v, EMBED_IDS)
    np.testing.assert_allclose(served_fn(served, other), weight_only.apply(v, other),
                               rtol=1e-5, atol=1e-5)
    jaxpr = jax.make_jaxpr(served_fn)(served, other).jaxpr
    assert int_products(jaxpr) == 0 and (VOCAB, DIM) in float_shapes(jaxpr)


@pytest.mark.parametrize("name", ["int4 per row (packed)", "int4 groups of 16 tokens",
                                  "int4 rows x groups of 16 along d", "NVFP4"])
def test_nnx_served_embed_gathers_codes_and_equals_qat_exactly(name):
    weight = TABLE_SPECS[name]
    model = NnxLookupAttend()
    qmodel = quantize_model(model, QuantRule("layer", weight=weight))
    qmodel.eval()
    expected = qmodel(EMBED_IDS)
    reference = jnp.take(fq(model.layer.embedding[...], table_spec(weight)), EMBED_IDS, axis=0)
    np.testing.assert_array_equal(expected, reference)
    served = serve_model(qmodel)
    assert isinstance(served.layer.embedding[...], pj.QuantizedArray)
    assert served.layer.embedding[...].packed
    assert type(qmodel.layer) is nnx.Embed  # the QAT copy is untouched
    np.testing.assert_array_equal(nnx_forward(served, EMBED_IDS), expected)
    graphdef, state = nnx.split(served)
    jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(EMBED_IDS))(state).jaxpr
    assert (VOCAB, DIM) not in float_shapes(jaxpr)


@pytest.mark.parametrize("act", [None, 8])
def test_nnx_served_embed_attend(act):
    qmodel = quantize_model(NnxLookupAttend(attend=True),
                            QuantRule("layer", weight=4, act=act, observer="minmax"))
    nnx_forward(qmodel, EMBED_IDS)  # observe
    qmodel.eval()
    other = (7 * EMBED_IDS + 1) % VOCAB
    expected = nnx_forward(qmodel, other)
    served = serve_model(qmodel)
    np.testing.assert_allclose(nnx_forward(served, other), expected, rtol=1e-5, atol=1e-5)
    graphdef, state = nnx.split(served)
    jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(other))(state).jaxpr
    assert (int_products(jaxpr) > 0) == (act is not None)


# -- integer path or float path, by what the kernel's quantizer allows -----------------------
G4_IN = pj.QuantSpec(bits=4, symmetric=True, axis=0, group_size=32)  # groups along the input


def int_products(jaxpr) -> int:
    """How many dot_general / conv ops of ``jaxpr`` (sub-jaxprs included) give int32."""
    count = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("dot_general", "conv_general_dilated") \
                and eqn.outvars[0].aval.dtype == jnp.int32:
            count += 1
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    count += int_products(sub)
    return count


SERVED_LAYERS = {  # name: (linen layer, nnx layer, input shape, weight spec, integer path?)
    "dense int4 g32 (input groups)": (lambda: nn.Dense(8),
                                      lambda r: nnx.Linear(64, 8, rngs=r), (4, 64), G4_IN, False),
    "dense int8 per channel": (lambda: nn.Dense(8),
                               lambda r: nnx.Linear(64, 8, rngs=r), (4, 64), 8, True),
    "conv int4 g32 (input channels)": (
        lambda: nn.Conv(4, (3, 3)), lambda r: nnx.Conv(64, 4, (3, 3), rngs=r), (2, 5, 5, 64),
        pj.QuantSpec(bits=4, symmetric=True, axis=2, group_size=32), False),
    "einsum int8 per (n, h)": (
        lambda: nn.Einsum((64, 2, 3), "btd,dnh->btnh"),
        lambda r: nnx.Einsum("btd,dnh->btnh", (64, 2, 3), (2, 3), rngs=r), (2, 4, 64),
        pj.QuantSpec(bits=8, symmetric=True, axis=2), True),
    "einsum transposed kernel, int8 per h": (
        lambda: nn.Einsum((3, 64), "btd,hd->bht"),
        lambda r: nnx.Einsum("btd,hd->bht", (3, 64), (3, 1), rngs=r), (2, 4, 64),
        pj.QuantSpec(bits=8, symmetric=True, axis=0), True),
    "einsum int4 g32 (input groups)": (
        lambda: nn.Einsum((64, 2, 3), "btd,dnh->btnh"),
        lambda r: nnx.Einsum("btd,dnh->btnh", (64, 2, 3), (2, 3), rngs=r), (2, 4, 64),
        G4_IN, False),
}


@pytest.mark.parametrize("name", list(SERVED_LAYERS))
def test_linen_weight_and_input_rules_serve_on_the_right_path(name):
    make, _, shape, weight, integer = SERVED_LAYERS[name]
    x1, x2 = normal(1, shape), normal(2, shape, 1.5)
    qmodel = quantize_model(Single(make()), QuantRule("layer", weight=weight, act=8))
    v = qmodel.init(KEY, x1)
    _, upd = qmodel.apply(v, x1, mutable=[STATS])
    v = {**v, **upd}
    expected = qmodel.apply(v, x2)  # frozen range of x1
    served_fn, served = serve_model(qmodel, v, x1)
    kernel = served["params"]["layer"]["kernel"]
    assert isinstance(kernel, pj.IntKernel) and kernel.input_state is not None
    assert kernel.weights.packed == (kernel.weights.spec.bits == 4)
    np.testing.assert_allclose(jax.jit(served_fn)(served, x2), expected, rtol=1e-5, atol=1e-5)
    products = int_products(jax.make_jaxpr(served_fn)(served, x2).jaxpr)
    assert (products > 0) == integer


@pytest.mark.parametrize("name", list(SERVED_LAYERS))
def test_nnx_weight_and_input_rules_serve_on_the_right_path(name):
    _, make, shape, weight, integer = SERVED_LAYERS[name]
    x1, x2 = normal(1, shape), normal(2, shape, 1.5)
    qmodel = quantize_model(NnxSingle(make(nnx.Rngs(0))),
                            QuantRule("layer", weight=weight, act=8))
    nnx_forward(qmodel, x1)  # observe x1
    qmodel.eval()
    expected = nnx_forward(qmodel, x2)
    served = serve_model(qmodel)
    assert isinstance(served.layer.kernel[...], pj.IntKernel)
    np.testing.assert_allclose(nnx_forward(served, x2), expected, rtol=1e-5, atol=1e-5)
    graphdef, state = nnx.split(served)
    jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(x2))(state).jaxpr
    assert (int_products(jaxpr) > 0) == integer


# -- another method of the model ------------------------------------------------------------
def test_linen_serve_a_method_and_refuse_layers_its_sample_call_missed():
    qmodel = quantize_model(EncDec(), QuantRule(".*", weight=8, act=8, observer="minmax"))
    v = qmodel.init(KEY, IDS)
    _, upd = qmodel.apply(v, IDS, mutable=[STATS])
    v = {**v, **upd}
    h = normal(4, (4, 8, 16))
    expected = qmodel.apply(v, h, method="decode")
    served_fn, served = serve_model(qmodel, v, h, method="decode")
    assert isinstance(served["params"]["dec"]["kernel"], pj.IntKernel)
    assert not isinstance(served["params"]["enc"]["kernel"], pj.IntKernel)  # not reached
    np.testing.assert_allclose(served_fn(served, h, method="decode"), expected,
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="reached 'enc', which rule #0 quantizes"):
        served_fn(served, IDS)
    served_fn, served = serve_model(qmodel, v, IDS)  # __call__ reaches every layer
    np.testing.assert_allclose(served_fn(served, h, method=EncDec.decode), expected,
                               rtol=1e-5, atol=1e-5)


# -- einsum -> dot_general ------------------------------------------------------------------
@st.composite
def einsums(draw):
    """A random plain two-operand einsum and operand shapes."""
    letters = iter("abcdefgh")
    groups = {k: [next(letters) for _ in range(draw(st.integers(lo, 2)))]
              for k, lo in (("contract", 1), ("batch", 0), ("lhs", 0), ("rhs", 0))}
    lhs = draw(st.permutations(groups["contract"] + groups["batch"] + groups["lhs"]))
    rhs = draw(st.permutations(groups["contract"] + groups["batch"] + groups["rhs"]))
    out = draw(st.permutations(groups["batch"] + groups["lhs"] + groups["rhs"]))
    sizes = {c: draw(st.integers(1, 3)) for g in groups.values() for c in g}
    spec = f"{''.join(lhs)},{''.join(rhs)}->{''.join(out)}"
    return spec, tuple(sizes[c] for c in lhs), tuple(sizes[c] for c in rhs)


@settings(max_examples=30, deadline=None)
@given(einsums())
def test_einsum_dimension_numbers_equal_jnp_einsum(case):
    spec, lhs_shape, rhs_shape = case
    a = np.random.default_rng(0).normal(size=lhs_shape)
    b = np.random.default_rng(1).normal(size=rhs_shape)
    dn, perm = einsum_dimension_numbers(spec, a.ndim, b.ndim)
    got = np.transpose(jax.lax.dot_general(a, b, dn, precision="highest"), perm)
    np.testing.assert_allclose(got, np.einsum(spec, a, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", ["...d,dh->...h", "bii,ih->bh", "btd,dh->h", "bd,dh->bhx",
                                  "btd,dh"])
def test_einsum_dimension_numbers_refuse_what_is_not_a_plain_contraction(spec):
    assert einsum_dimension_numbers(spec, 3 if spec.startswith(("bii", "btd")) else 2, 2) \
        is None
