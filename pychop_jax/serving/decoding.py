"""Generating tokens with a KV cache: prefill, then one token a step.

::

    def step(cache, tokens):  # the served model's decoding call
        logits, updates = served_fn({**served_vars, "cache": cache}, tokens, decode=True,
                                    mutable=["cache"])
        return logits, updates["cache"]

    tokens, cache = pj.serving.generate(step, cache, prompt, 32, max_len=256, key=key,
                                        temperature=0.8, top_k=40)

``generate(step, cache, prompt, n, max_len=...)`` runs ``step(cache, prompt)`` once (the
prefill: every prompt token's keys and values written at once), then ``n - 1`` decoding
steps of one token each in a ``lax.scan``, so the whole generation jits into one
program.  ``step(cache, tokens) -> (logits, cache)`` is any model's decoding call: the
fp32 model's, a quantization-aware model's, a served model's (whose cache may hold
codes and scales: ``QuantRule(kv_cache=...)``).  The cache is a pytree; its leaves of
rank >= 2 lead with the batch.

Sampling (``sample``): greedy (``temperature=0``, the default), or from
``softmax(logits / temperature)`` restricted to the ``top_k`` largest, with an explicit
PRNG ``key`` -- the same key, the same tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["generate", "sample"]


def sample(logits, key=None, *, temperature: float = 0.0, top_k: int | None = None):
    """Token ids ``(batch,)`` from ``logits`` ``(batch, vocab)``: the argmax when
    ``temperature == 0``, else a draw from ``softmax(logits / temperature)`` over the
    ``top_k`` largest logits (all when ``None``) with ``key``.

    Raises:
      ValueError: a negative temperature, ``top_k < 1``, or sampling without a key.
    """
    if temperature < 0:
        raise ValueError(f"sample: temperature must be >= 0; got {temperature}.")
    if top_k is not None and top_k < 1:
        raise ValueError(f"sample: top_k must be >= 1 (or None); got {top_k}.")
    logits = jnp.asarray(logits, jnp.float32)
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if key is None:
        raise ValueError("sample: temperature > 0 draws tokens; pass key=jax.random.key(...).")
    if top_k is not None and top_k < logits.shape[-1]:
        kth = lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)


def _batch_sizes(cache) -> set[int]:
    return {int(x.shape[0]) for x in jax.tree_util.tree_leaves(cache) if jnp.ndim(x) >= 2}


def generate(step: Callable, cache, prompt, max_new_tokens: int, *, max_len: int, key=None,
             temperature: float = 0.0, top_k: int | None = None):
    """``(tokens, cache)``: ``max_new_tokens`` tokens ``(batch, max_new_tokens)`` after
    ``prompt`` ``(batch, prompt_len)``, and the cache after them (see the module
    docstring).  ``max_len``: the cache's capacity in positions.

    Raises:
      TypeError: a prompt that is not integer token ids.
      ValueError: a prompt of another rank, a cache built for another batch size, or
        a prompt plus new tokens longer than the cache.
    """
    prompt = jnp.asarray(prompt)
    if not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise TypeError(f"generate: the prompt must be integer token ids; got {prompt.dtype}. "
                        "Tokenize it first (e.g. jnp.asarray(ids, jnp.int32)).")
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"generate: the prompt must be (batch, length >= 1); got shape "
                         f"{prompt.shape}. Add a batch axis: prompt[None].")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1; got {max_new_tokens}.")
    batch, length = prompt.shape
    sizes = _batch_sizes(cache)
    if sizes and sizes != {batch}:
        raise ValueError(f"generate: the cache was built for batch {sorted(sizes)}, the prompt "
                         f"has {batch} sequences; build the cache for batch {batch}.")
    if length + max_new_tokens > max_len:
        raise ValueError(f"generate: {length} prompt + {max_new_tokens} new tokens do not fit "
                         f"the cache's {max_len} positions; shorten the prompt, generate fewer "
                         "tokens, or build a longer cache.")
    if temperature > 0 and key is None:
        raise ValueError("generate: temperature > 0 draws tokens; pass key=jax.random.key(...).")
    keys = jax.random.split(key, max_new_tokens) if key is not None else \
        jnp.zeros((max_new_tokens,), jnp.uint32)
    draw = lambda logits, k: sample(logits[:, -1], k if key is not None else None,  # noqa: E731
                                    temperature=temperature, top_k=top_k)
    logits, cache = step(cache, prompt.astype(jnp.int32))
    first = draw(logits, keys[0])

    def body(carry, k):
        token, cache = carry
        logits, cache = step(cache, token[:, None])
        return (draw(logits, k), cache), token

    (last, cache), tokens = lax.scan(body, (first, cache), keys[1:])
    return jnp.concatenate([tokens.T, last[:, None]], axis=1), cache
