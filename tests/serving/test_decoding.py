"""Decoding with a KV cache (``pychop_jax.serving.decoding``, ``QuantRule(kv_cache=)``)
on the example's language model: the cache reproduces the full forward, a quantized
cache holds ``pj.quantize`` of the keys and values written into it, sampling follows
its key, served generation equals the fake-quantized model's, and bad inputs say how
to fix them."""

import functools
import os
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples"))
import transformer_lm_model as lm  # noqa: E402

import pychop_jax as pj  # noqa: E402
from pychop_jax import QuantRule  # noqa: E402

CONFIG = lm.Config(d_model=32, num_heads=2, num_layers=2, max_len=64)
INT8 = QuantRule(".*attn", kv_cache=8)
INT4_WEIGHTS = QuantRule(".*", weight=pj.QuantSpec(bits=4, symmetric=True, axis=0,
                                                   group_size=16))


@functools.cache
def trained():
    """The example's model, briefly trained on the byte corpus (peaked predictions, so
    greedy decoding has clear winners); its held-out bytes."""
    model, params = lm.init_linen(CONFIG, seed=1)
    train, held_out, _ = lm.load_corpus(max_bytes=200_000)
    tx = optax.adam(3e-3)

    @jax.jit
    def step(params, opt, x, y):
        def loss(p):
            logits = model.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        grads = jax.grad(loss)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt

    opt = tx.init(params)
    data = lm.batches(train, 16, 48, seed=0)
    for _ in range(120):
        x, y = next(data)
        params, opt = step(params, opt, x, y)
    return model, params, np.asarray(held_out[:4096], np.int32)


def decode_step(apply):
    """``step(cache, tokens) -> (logits, cache)`` of a linen-style decoding call."""
    def step(cache, tokens):
        logits, updates = apply(cache, tokens)
        return logits, updates["cache"]

    return step


def prompts(batch=2, length=16):
    _, _, text = trained()
    return jnp.asarray(text[:batch * length].reshape(batch, length))


def test_cached_decoding_equals_the_full_forward_linen_and_nnx():
    model, params, text = trained()
    tokens = jnp.asarray(text[:2 * 40].reshape(2, 40))
    full = model.apply({"params": params}, tokens)
    apply = jax.jit(lambda cache, t: model.apply({"params": params, "cache": cache}, t,
                                                 decode=True, mutable=["cache"]))
    cache = lm.init_cache(model, 2)
    logits, upd = apply(cache, tokens[:, :25])  # prefill
    outs, cache = [logits], upd["cache"]
    for t in range(25, 40):
        logits, upd = apply(cache, tokens[:, t:t + 1])
        outs.append(logits)
        cache = upd["cache"]
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=1e-5, atol=2e-5)
    m = lm.nnx_from_linen(params, CONFIG)
    m.init_cache(2)
    outs = [m(tokens[:, :25], decode=True)] + [m(tokens[:, t:t + 1], decode=True)
                                               for t in range(25, 40)]
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("kv", [8, pj.QuantSpec(dtype="float8_e4m3fn"),
                                pj.QuantSpec(bits=4, symmetric=True, axis=-1, group_size=8)])
def test_quantized_cache_holds_the_codes_of_what_was_written(kv):
    model, params, _ = trained()
    prompt = prompts()
    cache = lm.init_cache(model, 2)
    _, float_cache = model.apply({"params": params, "cache": cache}, prompt, decode=True,
                                 mutable=["cache"])
    qmodel = pj.quantize_model(model, [QuantRule(".*attn", kv_cache=kv)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the weights have no rule
        variables = {"params": params, "cache": cache}
        served_fn, served = pj.serve_model(qmodel, variables, prompt, decode=True,
                                           mutable=["cache"])
    _, upd = served_fn({**served, "cache": cache}, prompt, decode=True, mutable=["cache"])
    spec = INT8.kv_cache_spec(4) if kv == 8 else QuantRule(".*", kv_cache=kv).kv_cache_spec(4)
    for name in ("cached_key", "cached_value"):
        written = float_cache["cache"]["blocks_0"]["attn"][name][:, :16]
        stored = upd["cache"]["blocks_0"]["attn"][name]
        assert isinstance(stored, pj.QuantizedArray)
        expected = pj.quantize(written, pj.calibrate(written, spec))
        np.testing.assert_array_equal(stored.unpack().codes[:, :16], expected)
        n = stored.size  # codes, one float32 scale per (token, head) or group, one zero
        per_scale = 16 if getattr(kv, "group_size", None) is None else kv.group_size
        code_bytes = n // 2 if getattr(kv, "bits", 8) == 4 else n
        assert stored.nbytes == code_bytes + n // per_scale * 4 + 4


def _generate(step, cache, n=32, **kw):
    return jax.jit(lambda c, p: pj.serving.generate(step, c, p, n, max_len=CONFIG.max_len,
                                                    **kw))(cache, prompts())


def test_sampling_follows_its_key():
    model, params, _ = trained()
    step = decode_step(lambda c, t: model.apply({"params": params, "cache": c}, t,
                                                decode=True, mutable=["cache"]))
    cache = lm.init_cache(model, 2)
    a, _ = _generate(step, cache, key=jax.random.key(1), temperature=1.0, top_k=8)
    b, _ = _generate(step, cache, key=jax.random.key(1), temperature=1.0, top_k=8)
    c, _ = _generate(step, cache, key=jax.random.key(2), temperature=1.0, top_k=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.shape == (2, 32) and a.dtype == jnp.int32


def test_served_generation_equals_fake_quantized_generation():
    model, params, _ = trained()
    rules = [INT8, INT4_WEIGHTS]
    qmodel = pj.quantize_model(model, rules)
    cache = lm.init_cache(model, 2)
    v = qmodel.init_from({"params": params}, prompts())
    fq_step = decode_step(lambda c, t: qmodel.apply({**v, "cache": c}, t, decode=True,
                                                    mutable=["cache"]))
    served_fn, served = pj.serve_model(qmodel, {**v, "cache": cache}, prompts(), decode=True,
                                       mutable=["cache"])
    sv_step = decode_step(lambda c, t: served_fn({**served, "cache": c}, t, decode=True,
                                                 mutable=["cache"]))
    fq_tokens, _ = _generate(fq_step, cache)
    sv_tokens, sv_cache = _generate(sv_step, cache)
    np.testing.assert_array_equal(sv_tokens, fq_tokens)
    key = sv_cache["blocks_0"]["attn"]["cached_key"]
    assert isinstance(key, pj.QuantizedArray) and key.spec.bits == 8


def test_bad_inputs_say_how_to_fix_them():
    model, params, _ = trained()
    step = decode_step(lambda c, t: model.apply({"params": params, "cache": c}, t,
                                                decode=True, mutable=["cache"]))
    cache = lm.init_cache(model, 2)
    with pytest.raises(ValueError, match="do not fit the cache's 64 positions"):
        pj.serving.generate(step, cache, prompts(length=40), 30, max_len=64)
    with pytest.raises(ValueError, match="built for batch \\[3\\].*build the cache for batch 2"):
        pj.serving.generate(step, lm.init_cache(model, 3), prompts(), 4, max_len=64)
    with pytest.raises(TypeError, match="integer token ids"):
        pj.serving.generate(step, cache, prompts().astype(jnp.float32), 4, max_len=64)
    with pytest.raises(ValueError, match="pass key"):
        pj.serving.generate(step, cache, prompts(), 4, max_len=64, temperature=1.0)
    # a cache built for another rule set
    qmodel = pj.quantize_model(model, [INT8, INT4_WEIGHTS])
    v = qmodel.init_from({"params": params}, prompts())
    served_fn, served = pj.serve_model(qmodel, {**v, "cache": cache}, prompts(), decode=True,
                                       mutable=["cache"])
    _, upd = served_fn({**served, "cache": cache}, prompts(), decode=True, mutable=["cache"])
    other = pj.quantize_model(model, [QuantRule(".*attn", kv_cache=pj.QuantSpec(
        bits=4, symmetric=True, axis=-1, group_size=8)), INT4_WEIGHTS])
    other_fn, other_vars = pj.serve_model(other, {**v, "cache": cache}, prompts(), decode=True,
                                          mutable=["cache"])
    with pytest.raises(ValueError, match="build the cache for this rule set"):
        other_fn({**other_vars, "cache": upd["cache"]}, prompts(), decode=True,
                 mutable=["cache"])
    with pytest.raises(ValueError, match="keep it float"):
        float_fn, float_vars = pj.serve_model(pj.quantize_model(model, [INT4_WEIGHTS]), v,
                                              prompts(), decode=True, mutable=["cache"])
        float_fn({**float_vars, "cache": upd["cache"]}, prompts(), decode=True,
                 mutable=["cache"])


def test_nnx_served_model_decodes_with_a_quantized_cache():
    _, params, _ = trained()
    m = lm.nnx_from_linen(params, CONFIG)
    m.init_cache(2)
    # the nnx blocks hold their caches themselves (module blocks_<i>)
    qmodel = pj.quantize_model(m, [QuantRule(r"blocks_\d+", kv_cache=8), INT4_WEIGHTS],
                               prompts(), decode=True)
    qmodel.eval()
    qmodel.model.init_cache(2)
    served = pj.serve_model(qmodel)
    fq = [qmodel(prompts(), decode=True)]
    fq += [qmodel(prompts()[:, i:i + 1], decode=True) for i in range(4)]
    served.set_state(_fresh(params))
    sv = [served(prompts(), decode=True)]
    sv += [served(prompts()[:, i:i + 1], decode=True) for i in range(4)]
    np.testing.assert_allclose(jnp.concatenate(sv, 1), jnp.concatenate(fq, 1), atol=2e-3)
    caches = [x for x in jax.tree_util.tree_leaves(served.rest.get_value(),
                                                   is_leaf=lambda x: isinstance(
                                                       x, pj.QuantizedArray))
              if isinstance(x, pj.QuantizedArray)]
    assert len(caches) == 2 * CONFIG.num_layers


def _fresh(params):
    m = lm.nnx_from_linen(params, CONFIG)
    m.init_cache(2)
    return m
