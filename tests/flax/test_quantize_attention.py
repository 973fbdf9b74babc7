"""``QuantRule(attention=...)``: the q.k^T and probs.v operands of stock attention
modules fake-quantized, linen and nnx, against a reference attention written here
(the same module with ``attention_fn`` replaced by hand-applied ``pj.fake_quant``)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import pychop_jax as pj

SPEC = pj.QuantSpec(bits=4)  # coarse, so that quantization visibly changes the output
D, HEADS = 16, 2


def fq(a):
    """Per-tensor fake quantization with the batch's own range (what a minmax observer
    applies on its first training batch)."""
    return pj.fake_quant(a, pj.calibrate(a, SPEC))


def softmax_attention(q, k, v, mask):
    logits = jnp.einsum("...qhd,...khd->...hqk", fq(q), fq(k))
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    probs = jax.nn.softmax(logits)
    return jnp.einsum("...hqk,...khd->...qhd", fq(probs), fq(v))


def linen_reference(q, k, v, mask=None, **_):
    """Flax's dot_product_attention scales the query before its q.k^T einsum."""
    return softmax_attention(q / jnp.sqrt(q.shape[-1]).astype(q.dtype), k, v, mask)


def nnx_reference(q, k, v, mask=None, **_):
    """nnx quantizes q and k in the promote_dtype hook, before the 1/sqrt(d) scaling."""
    q, k = fq(q), fq(k)
    return softmax_attention(q / jnp.sqrt(q.shape[-1]).astype(q.dtype), k, v, mask)


class Block(nn.Module):
    attention_fn: object = nn.dot_product_attention

    @nn.compact
    def __call__(self, x):
        mask = nn.make_causal_mask(x[..., 0])
        y = nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=D, name="attn",
                                            attention_fn=self.attention_fn)(x, x, mask=mask)
        return nn.Dense(3, name="head")(y)


RULES = [pj.QuantRule(".*attn", attention=SPEC, observer="minmax"), pj.QuantRule(".*")]


def data(seed=1, shape=(2, 6, D)):
    return jax.random.normal(jax.random.key(seed), shape)


def test_linen_equals_hand_quantized_reference_and_freezes():
    x, x2 = data(1), data(2)
    qmodel = pj.quantize_model(Block(), RULES)
    variables = qmodel.init(jax.random.key(0), x)
    assert variables["params"].keys() == Block().init(jax.random.key(0), x)["params"].keys()
    stats = variables["quant_stats"]["attn"]
    assert set(stats) == {f"attn_{n}_range" for n in ("query", "key", "probs", "value")}
    y, upd = qmodel.apply(variables, x, mutable=["quant_stats"])
    ref = Block(attention_fn=linen_reference).apply({"params": variables["params"]}, x)
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6)
    float_y = Block().apply({"params": variables["params"]}, x)
    assert not np.allclose(y, float_y, atol=1e-3)  # the quantization did something
    probs = upd["quant_stats"]["attn"]["attn_probs_range"]
    assert int(probs.count) == 1 and float(probs.lo) == 0.0 and 0 < float(probs.hi) <= 1.0
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
        y, _ = qmodel.apply({**variables, "params": params}, x, mutable=["quant_stats"])
        return jnp.sum(y ** 2)

    grads = jax.jit(jax.grad(loss))(variables["params"])  # one compilation, not one per op
    for name in ("query", "key", "value", "out"):
        g = np.asarray(grads["attn"][name]["kernel"])
        assert np.all(np.isfinite(g)) and np.abs(g).sum() > 0, name


def test_report_and_rule_text():
    x = data(1)
    report = pj.quantization_report(Block(), RULES, x)
    by_path = report.by_path()
    assert by_path["attn"].layer == "MultiHeadDotProductAttention" and by_path["attn"].rule == 0
    assert by_path["attn/query"].rule == 1 and not by_path["attn/query"].quantized
    assert "attention q.k^T and probs.v operands int4 affine" in report.summary()
    unmatched = pj.quantization_report(Block(), [pj.QuantRule(".*nothing", attention=8)], x)
    assert unmatched.unmatched == (0,)
    with pytest.raises(ValueError, match="per tensor"):
        pj.QuantRule(".*", attention=pj.QuantSpec(axis=0))


def test_linen_custom_attention_fn_is_an_error():
    def custom(q, k, v, mask=None, **_):
        return nn.dot_product_attention(q, k, v, mask=mask)

    qmodel = pj.quantize_model(Block(attention_fn=custom), RULES)
    with pytest.raises(ValueError, match="attention_fn"):
        qmodel.init(jax.random.key(0), data(1))


def test_linen_served_equals_frozen_evaluation(tmp_path):
    x, x2 = data(1), data(2)
    rules = [pj.QuantRule(".*attn", attention=8, observer="minmax"),
             pj.QuantRule(".*", weight=8)]
    qmodel = pj.quantize_model(Block(), rules)
    variables = qmodel.init(jax.random.key(0), x)
    _, upd = qmodel.apply(variables, x, mutable=["quant_stats"])
    variables = {**variables, **upd}
    served_fn, served_vars = pj.serve_model(qmodel, variables, x)
    assert set(served_vars["quant_attention"]["attn"]) == {
        "attn_query", "attn_key", "attn_probs", "attn_value"}
    want = qmodel.apply(variables, x2)
    np.testing.assert_allclose(jax.jit(served_fn)(served_vars, x2), want, rtol=1e-5, atol=1e-5)
    pj.save_quantized(tmp_path / "s.msgpack", served_vars)
    back = pj.load_quantized(tmp_path / "s.msgpack")
    np.testing.assert_array_equal(served_fn(back, x2), served_fn(served_vars, x2))


# ---- nnx ------------------------------------------------------------------------------------
def nnx_block(seed=0):
    return nnx.MultiHeadAttention(num_heads=HEADS, in_features=D, qkv_features=D,
                                  decode=False, rngs=nnx.Rngs(seed))


def test_nnx_equals_hand_quantized_reference_and_leaves_the_model():
    x, x2 = data(1), data(2)
    mask = nnx.make_causal_mask(x[..., 0])
    model = nnx_block()
    before = model(x, mask=mask)
    qmodel = pj.quantize_model(model, [pj.QuantRule("", attention=SPEC, observer="minmax")])
    assert model.attention_fn is nnx.dot_product_attention
    np.testing.assert_array_equal(model(x, mask=mask), before)
    y = qmodel(x, mask=mask)  # train mode: observe, then quantize
    ref_model = nnx.clone(model)
    ref_model.attention_fn = nnx_reference
    np.testing.assert_allclose(y, ref_model(x, mask=mask), rtol=1e-6, atol=1e-6)
    assert not np.allclose(y, before, atol=1e-3)
    assert int(qmodel.attention_fn.attn_probs_range.get_value().count) == 1
    qmodel.eval()
    frozen = qmodel(x2, mask=mask)
    assert int(qmodel.attention_fn.attn_probs_range.get_value().count) == 1
    assert not np.allclose(frozen, ref_model(x2, mask=mask), atol=1e-6)
    # served: the frozen fake quantization, whatever mode the model was left in
    qmodel.train()
    served = pj.serve_model(qmodel)
    np.testing.assert_allclose(served(x2, mask=mask), frozen, rtol=1e-5, atol=1e-5)


def test_nnx_gradients_reach_qkv_kernels_and_report():
    x = data(1)
    rules = [pj.QuantRule(".*", weight=8, attention=8)]
    qmodel = pj.quantize_model(nnx_block(), rules)
    report = pj.quantization_report(nnx_block(), rules)
    assert report.by_path()[""].layer == "MultiHeadAttention"
    assert report.by_path()["query"].quantized

    def loss(m):
        return jnp.sum(m(x) ** 2)

    grads = nnx.grad(loss)(qmodel)
    for name in ("query", "key", "value", "out"):
        g = np.asarray(getattr(grads, name).kernel[...])
        assert np.all(np.isfinite(g)) and np.abs(g).sum() > 0, name


def test_nnx_custom_attention_fn_is_an_error():
    model = nnx.MultiHeadAttention(num_heads=HEADS, in_features=D, qkv_features=D, decode=False,
                                   attention_fn=nnx_reference, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="custom attention_fn"):
        pj.quantize_model(model, [pj.QuantRule(".*", attention=8)])


def test_nnx_sample_call_observes_nothing():
    x = data(1)
    qmodel = pj.quantize_model(nnx_block(), [pj.QuantRule(".*", weight=8, act=8, lsq=True,
                                                          attention=8)], x)
    assert int(qmodel.attention_fn.attn_query_range.get_value().count) == 0
    qmodel(x)
    assert int(qmodel.attention_fn.attn_query_range.get_value().count) == 1


def test_lm_example_attention_rules_take_every_block():
    import importlib.util
    import os
    import sys

    root = os.path.join(os.path.dirname(__file__), "..", "..", "examples")
    for name in ("transformer_lm_model", "transformer_lm"):
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(name, os.path.join(root, f"{name}.py"))
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
    lm, ex = sys.modules["transformer_lm_model"], sys.modules["transformer_lm"]
    config = lm.Config(d_model=16, num_heads=2, num_layers=2, mlp_ratio=2, max_len=12)
    model, params = lm.init_linen(config, seed=1)
    tokens = jnp.arange(16, dtype=jnp.int32).reshape(2, 8)
    report = pj.quantization_report(model, ex.attention_rules(config), tokens)
    took = [m.path for m in report.layers if m.rule == 0]
    assert took == ["blocks_0/attn", "blocks_1/attn"] and not report.unmatched
    qmodel = pj.quantize_model(model, ex.attention_rules(config))
    # jitted: one compilation each instead of one per quantizing op
    variables = {**jax.jit(qmodel.init)(jax.random.key(0), tokens), "params": params}
    _, upd = jax.jit(lambda v, t: qmodel.apply(v, t, mutable=["quant_stats"]))(variables,
                                                                               tokens)
    ranges = upd["quant_stats"]["blocks_1"]["attn"]
    assert all(int(ranges[f"attn_{n}_range"].count) == 1
               for n in ("query", "key", "probs", "value"))
