"""``QuantRule(attention=...)``: the operands of the activation x activation matmuls
(attention's q.k^T and probs.v) of stock attention modules fake-quantized, linen and
nnx, against a reference attention written here (the same module with
``attention_fn`` replaced by hand-applied ``pj.fake_quant`` at each einsum's
operands).

The transform quantizes the operands of the products as the module computes them:
linen's ``dot_product_attention`` scales q by 1/sqrt(d) before q.k^T, flax 0.12's
``nnx.dot_product_attention`` scales the logits after it, so nnx's first operand is
q itself.  Per-tensor minmax quantization commutes with a positive scale, so the two
skins agree up to float rounding (``test_linen_and_nnx_skins_agree``), and their
observed ranges of q differ by sqrt(d).  A product's state is at
``quant_stats/<module>/product_<n>/{lhs,rhs}``, ``<module>`` the longest common
module of the weights feeding its operands (``attn``), ``lhs`` / ``rhs`` the operands
of the ``dot_general`` as JAX lowers the einsum: ``product_0`` is (q, k),
``product_1`` (v, probs).
"""

import functools
import importlib.util
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import pychop_jax as pj

SPEC = pj.QuantSpec(bits=4)  # coarse, so that quantization visibly changes the output
D, HEADS = 16, 2
STATS = "quant_stats"


def fq(a):
    """Per-tensor fake quantization with the batch's own range (what a minmax observer
    applies on its first training batch)."""
    return pj.fake_quant(a, pj.calibrate(a, SPEC))


def masked_softmax(logits, mask):
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    return jax.nn.softmax(logits)


def linen_reference(q, k, v, mask=None, **_):
    """linen's dot_product_attention: q scaled before its q.k^T einsum."""
    q = q / jnp.sqrt(q.shape[-1]).astype(q.dtype)
    probs = masked_softmax(jnp.einsum("...qhd,...khd->...hqk", fq(q), fq(k)), mask)
    return jnp.einsum("...hqk,...khd->...qhd", fq(probs), fq(v))


def nnx_reference(q, k, v, mask=None, **_):
    """nnx's dot_product_attention: the logits scaled after q.k^T."""
    logits = jnp.einsum("...qhd,...khd->...hqk", fq(q), fq(k)) / jnp.sqrt(q.shape[-1])
    probs = masked_softmax(logits, mask)
    return jnp.einsum("...hqk,...khd->...qhd", fq(probs), fq(v))


class Block(nn.Module):
    attention_fn: object = nn.dot_product_attention

    @nn.compact
    def __call__(self, x):
        mask = nn.make_causal_mask(x[..., 0])
        y = nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=D, name="attn",
                                            attention_fn=self.attention_fn)(x, x, mask=mask)
        return nn.Dense(3, name="head")(y)


RULES = [pj.QuantRule(".*attn", attention=SPEC, observer="minmax"), pj.QuantRule(".*")]
PRODUCTS = {"product_0", "product_1"}  # q.k^T: (q, k); probs.v: (v, probs)


def data(seed=1, shape=(2, 6, D)):
    return jax.random.normal(jax.random.key(seed), shape)


@functools.cache
def linen_block():
    """The quantized Block, its variables (RULES) and the float params."""
    qmodel = pj.quantize_model(Block(), RULES)
    variables = qmodel.init(jax.random.key(0), data(1))
    return qmodel, variables


def test_linen_equals_hand_quantized_reference_and_freezes():
    x, x2 = data(1), data(2)
    qmodel, variables = linen_block()
    assert variables["params"].keys() == Block().init(jax.random.key(0), x)["params"].keys()
    stats = variables[STATS]
    assert set(stats) == {"attn"} and set(stats["attn"]) == PRODUCTS
    assert all(set(stats["attn"][p]) == {"lhs", "rhs"} for p in PRODUCTS)
    y, upd = qmodel.apply(variables, x, mutable=[STATS])
    ref = Block(attention_fn=linen_reference).apply({"params": variables["params"]}, x)
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6)
    float_y = Block().apply({"params": variables["params"]}, x)
    assert not np.allclose(y, float_y, atol=1e-3)  # the quantization did something
    probs = upd[STATS]["attn"]["product_1"]["rhs"]
    assert int(probs.count) == 1 and float(probs.lo) == 0.0 and 0 < float(probs.hi) <= 1.0
    assert all(int(upd[STATS]["attn"][p][s].count) == 1 for p in PRODUCTS for s in ("lhs", "rhs"))
    # frozen: a second batch is quantized with the first batch's ranges, not its own
    frozen = qmodel.apply({**variables, **upd}, x2)
    own = Block(attention_fn=linen_reference).apply({"params": variables["params"]}, x2)
    assert not np.allclose(frozen, own, atol=1e-6)


def test_linen_gradients_reach_qkv_kernels():
    x = data(1)
    rules = [pj.QuantRule(".*attn", attention=8), pj.QuantRule(".*", weight=8)]
    qmodel = pj.quantize_model(Block(), rules)
    variables = qmodel.init(jax.random.key(0), x)

    def loss(params):
        y, _ = qmodel.apply({**variables, "params": params}, x, mutable=[STATS])
        return jnp.sum(y ** 2)

    grads = jax.jit(jax.grad(loss))(variables["params"])  # one compilation, not one per op
    for name in ("query", "key", "value", "out"):
        g = np.asarray(grads["attn"][name]["kernel"])
        assert np.all(np.isfinite(g)) and np.abs(g).sum() > 0, name


def test_report_and_rule_text():
    x = data(1)
    report = pj.quantization_report(Block(), RULES, x)
    products = [o for o in report.ops if o.kind == "product"]
    assert [(o.module, o.rule, o.quantized, o.primitive) for o in products] == [
        ("attn", 0, True, "dot_general")] * 2
    assert products[0].shape == ((2, 6, HEADS, D // HEADS),) * 2  # q, k: (b, t, h, d)
    assert products[0].what == "both operands int4 affine, per tensor"
    # the q / k / v / out / head kernels: rule 1 (first match), float
    weights = report.weights()
    assert set(weights) == {f"attn/{n}/kernel" for n in ("query", "key", "value", "out")} | {
        "head/kernel"}
    assert all(o.rule == 1 and not o.quantized for o in weights.values())
    assert "#0 '.*attn': activation products int4 affine, per tensor (minmax observer) -> " \
           "2 op(s): attn (product)" in report.summary()
    unmatched = pj.quantization_report(Block(), [pj.QuantRule(".*nothing", attention=8)], x)
    assert unmatched.unmatched == (0,)
    # products are found whatever their rule: float, with the reason
    float_products = [o for o in unmatched.ops if o.kind == "product"]
    assert len(float_products) == 2 and not any(o.quantized for o in float_products)
    assert float_products[0].what == "float (no rule matches)"
    with pytest.raises(ValueError, match="per tensor"):
        pj.QuantRule(".*", attention=pj.QuantSpec(axis=0))


def test_linen_custom_attention_fn_is_quantized_too():
    """Any attention function: the transform sees its einsums, not the module (the old
    interceptor refused a custom attention_fn)."""
    def custom(q, k, v, mask=None, **kwargs):  # the stock computation, spelled out
        q = q / jnp.sqrt(q.shape[-1]).astype(q.dtype)
        probs = masked_softmax(jnp.einsum("...qhd,...khd->...hqk", q, k), mask)
        return jnp.einsum("...hqk,...khd->...qhd", probs, v)

    x = data(1)
    _, variables = linen_block()
    qmodel = pj.quantize_model(Block(attention_fn=custom), RULES)
    v = qmodel.init_from({"params": variables["params"]}, x)
    assert set(v[STATS]["attn"]) == PRODUCTS
    y, _ = qmodel.apply(v, x, mutable=[STATS])
    ref = Block(attention_fn=linen_reference).apply({"params": variables["params"]}, x)
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6)


def test_linen_served_equals_frozen_evaluation(tmp_path):
    x, x2 = data(1), data(2)
    rules = [pj.QuantRule(".*attn", attention=8, observer="minmax"),
             pj.QuantRule(".*", weight=8)]
    qmodel = pj.quantize_model(Block(), rules)
    variables = qmodel.init(jax.random.key(0), x)
    _, upd = qmodel.apply(variables, x, mutable=[STATS])
    variables = {**variables, **upd}
    served_fn, served_vars = pj.serve_model(qmodel, variables, x)
    inputs = served_vars["quant_inputs"]["attn"]
    assert set(inputs) == PRODUCTS and all(set(inputs[p]) == {"lhs", "rhs"} for p in PRODUCTS)
    assert isinstance(inputs["product_1"]["lhs"], pj.QuantState)
    want = qmodel.apply(variables, x2)
    np.testing.assert_allclose(jax.jit(served_fn)(served_vars, x2), want, rtol=1e-5, atol=1e-5)
    pj.save_quantized(tmp_path / "s.msgpack", served_vars)
    back = pj.load_quantized(tmp_path / "s.msgpack")
    np.testing.assert_array_equal(served_fn(back, x2), served_fn(served_vars, x2))


# ---- nnx ------------------------------------------------------------------------------------
def nnx_block(seed=0, **kwargs):
    return nnx.MultiHeadAttention(num_heads=HEADS, in_features=D, qkv_features=D,
                                  decode=False, rngs=nnx.Rngs(seed), **kwargs)


def test_nnx_equals_hand_quantized_reference_and_leaves_the_model():
    x, x2 = data(1), data(2)
    mask = nnx.make_causal_mask(x[..., 0])
    model = nnx_block()
    before = model(x, mask=mask)
    # the attention module is the root: the q / k weights' common module is ""
    qmodel = pj.quantize_model(model, [pj.QuantRule("", attention=SPEC, observer="minmax")])
    assert model.attention_fn is nnx.dot_product_attention
    y = qmodel(x, mask=mask)  # train mode: observe, then quantize
    np.testing.assert_array_equal(model(x, mask=mask), before)
    ref_model = nnx.clone(model)
    ref_model.attention_fn = nnx_reference
    np.testing.assert_allclose(y, ref_model(x, mask=mask), rtol=1e-6, atol=1e-6)
    assert not np.allclose(y, before, atol=1e-3)
    stats = qmodel.quant_stats.get_value()
    assert set(stats) == PRODUCTS and int(stats["product_1"]["rhs"].count) == 1
    qmodel.eval()
    frozen = qmodel(x2, mask=mask)
    assert int(qmodel.quant_stats.get_value()["product_1"]["rhs"].count) == 1
    assert not np.allclose(frozen, ref_model(x2, mask=mask), atol=1e-6)
    # served: the frozen fake quantization, whatever mode the model was left in
    qmodel.train()
    served = pj.serve_model(qmodel)
    np.testing.assert_allclose(served(x2, mask=mask), frozen, rtol=1e-5, atol=1e-5)


def test_linen_and_nnx_skins_agree():
    """The same weights in linen's and nnx's stock attention: the same quantized output
    up to float rounding (the float skins already differ by ~1e-7), the same ranges of
    k, v and probs, and q's range scaled by 1/sqrt(d) in linen (see the module
    docstring)."""
    x = data(1)
    mask = nn.make_causal_mask(x[..., 0])
    model = nnx_block()
    params = {n: {"kernel": getattr(model, n).kernel[...], "bias": getattr(model, n).bias[...]}
              for n in ("query", "key", "value", "out")}
    rules = [pj.QuantRule("", attention=SPEC, observer="minmax")]
    linen = pj.quantize_model(nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=D),
                              rules)
    v = linen.init_from({"params": params}, x, x, mask=mask)
    y_linen, upd = linen.apply(v, x, x, mask=mask, mutable=[STATS])
    qnnx = pj.quantize_model(model, rules)
    y_nnx = qnnx(x, mask=mask)
    float_y = model(x, mask=mask)
    assert not np.allclose(y_nnx, float_y, atol=1e-2)
    np.testing.assert_allclose(y_linen, y_nnx, rtol=1e-5, atol=1e-5)
    lin, nx = upd[STATS], qnnx.quant_stats.get_value()
    assert set(lin) == set(nx) == PRODUCTS

    def bounds(r):
        return np.array([r.lo, r.hi])

    for p, side in (("product_0", "rhs"), ("product_1", "lhs")):  # k, v: the same arrays
        np.testing.assert_array_equal(bounds(lin[p][side]), bounds(nx[p][side]))
    np.testing.assert_allclose(bounds(lin["product_1"]["rhs"]), bounds(nx["product_1"]["rhs"]),
                               rtol=1e-5, atol=1e-6)  # probs
    np.testing.assert_allclose(bounds(lin["product_0"]["lhs"]) * np.sqrt(D // HEADS),
                               bounds(nx["product_0"]["lhs"]), rtol=1e-6)  # q / sqrt(d) vs q


def test_nnx_gradients_reach_qkv_kernels_and_report():
    x = data(1)
    rules = [pj.QuantRule(".*", weight=8, attention=8)]
    qmodel = pj.quantize_model(nnx_block(), rules)
    report = pj.quantization_report(nnx_block(), rules, x)
    products = [o for o in report.ops if o.kind == "product"]
    assert [(o.module, o.quantized) for o in products] == [("", True)] * 2
    assert report.weights()["query/kernel"].quantized

    def loss(m):
        return jnp.sum(m(x) ** 2)

    grads = nnx.grad(loss)(qmodel)
    for name in ("query", "key", "value", "out"):
        g = np.asarray(getattr(grads.model, name).kernel[...])
        assert np.all(np.isfinite(g)) and np.abs(g).sum() > 0, name


def test_nnx_custom_attention_fn_is_quantized_too():
    """linen's attention function (q scaled first) in nnx's module: its own operands."""
    x = data(1)
    mask = nnx.make_causal_mask(x[..., 0])
    rules = [pj.QuantRule("", attention=SPEC, observer="minmax")]
    def linen_attention(q, k, v, mask=None, **_):  # nnx passes is_causal= too
        return nn.dot_product_attention(q, k, v, mask=mask)

    qmodel = pj.quantize_model(nnx_block(attention_fn=linen_attention), rules)
    ref = nnx_block(attention_fn=linen_reference)  # the same weights (seed 0)
    np.testing.assert_allclose(qmodel(x, mask=mask), ref(x, mask=mask), rtol=1e-6, atol=1e-6)
    products = [o for o in qmodel.report(x, mask=mask).ops if o.kind == "product"]
    assert [(o.module, o.quantized) for o in products] == [("", True)] * 2


def test_nnx_sample_call_observes_nothing():
    x = data(1)
    qmodel = pj.quantize_model(nnx_block(), [pj.QuantRule(".*", weight=8, act=8, lsq=True,
                                                          attention=8)], x)
    products = qmodel.quant_stats.get_value()
    assert int(products["product_0"]["lhs"].count) == 0
    qmodel(x)
    assert int(qmodel.quant_stats.get_value()["product_0"]["lhs"].count) == 1
    assert set(qmodel.quant_params.get_value()["query"]["kernel"]) == {
        "weight_scale", "input_scale", "input_zero_point"}


def _example(name):
    if name not in sys.modules:
        root = os.path.join(os.path.dirname(__file__), "..", "..", "examples")
        spec = importlib.util.spec_from_file_location(name, os.path.join(root, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_lm_example_attention_rules_take_every_block():
    lm, ex = _example("transformer_lm_model"), _example("transformer_lm")
    config = lm.Config(d_model=16, num_heads=2, num_layers=2, mlp_ratio=2, max_len=12)
    model, params = lm.init_linen(config, seed=1)
    tokens = jnp.arange(16, dtype=jnp.int32).reshape(2, 8)
    report = pj.quantization_report(model, ex.attention_rules(config), tokens)
    took = [o.module for o in report.ops if o.rule == 0]
    assert took == ["blocks_0/attn"] * 2 + ["blocks_1/attn"] * 2 and not report.unmatched
    assert all(o.kind == "product" and o.quantized for o in report.ops if o.rule == 0)
    qmodel = pj.quantize_model(model, ex.attention_rules(config))

    @jax.jit  # one compilation instead of one per quantizing op
    def observe(params, tokens):
        variables = qmodel.init_from({"params": params}, tokens)
        return qmodel.apply(variables, tokens, mutable=[STATS])[1]

    upd = observe(params, tokens)
    ranges = upd[STATS]["blocks_1"]["attn"]
    assert all(int(ranges[p][s].count) == 1 for p in PRODUCTS for s in ("lhs", "rhs"))
