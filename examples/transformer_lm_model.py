"""Reusable pieces of the byte-level language-model example (``transformer_lm.py``).

Nothing here imports ``pychop_jax``: this is the fp32 model "the user wrote", built only
from stock Flax layers, so that the example can later show quantizing a model whose
code the quantization library never saw.

Corpus
------
The byte stream of the Python standard library's own ``.py`` files that ship with the
running interpreter (``sysconfig.get_paths()["stdlib"]``; about 12 MB in ~730 files for
CPython 3.11).  Exactly which files:

* every regular file whose name ends in ``.py`` anywhere under the stdlib directory,
* except anything below a directory named ``site-packages``, ``dist-packages``
  (third-party code), ``__pycache__``, ``test``, ``tests`` or ``idle_test`` (the test
  suites: twice the size of the library, and full of generated data),
* and except ``_sysconfigdata_*.py`` (machine-generated build configuration, different
  on every installation).

Files are visited in the order of their sorted relative POSIX paths and their bytes are
concatenated as they are (no separator, no decoding).  The held-out split is fixed per
file: a file is held out when the first 8 hex digits of the SHA-1 of its relative POSIX
path, as an integer, are divisible by 20 (about 5 % of the files, and of the bytes); the
rest is the training stream.  The split therefore depends only on the file names, not on
the order of traversal or on the interpreter's hash seed.  The vocabulary is the 256
byte values.

Model
-----
A small decoder-only transformer, in two stock-Flax versions with the same
architecture and the same parameter paths:

* ``TransformerLM`` (``flax.linen``), parameters ``params[...]``::

      tok_embed/embedding                 (256, d)       nn.Embed
      pos_embed/embedding                 (max_len, d)   nn.Embed (learned positions)
      blocks_{i}/ln_1/{scale,bias}        (d,)           nn.LayerNorm (pre-norm)
      blocks_{i}/attn/{query,key,value}/kernel (d, h, d/h)  nn.MultiHeadDotProductAttention
      blocks_{i}/attn/{query,key,value}/bias   (h, d/h)
      blocks_{i}/attn/out/kernel          (h, d/h, d)
      blocks_{i}/attn/out/bias            (d,)
      blocks_{i}/ln_2/{scale,bias}        (d,)
      blocks_{i}/mlp_in/{kernel,bias}     (d, 4d), (4d,)  nn.Dense, then gelu
      blocks_{i}/mlp_out/{kernel,bias}    (4d, d), (d,)   nn.Dense
      ln_f/{scale,bias}                   (d,)           final nn.LayerNorm
      head/{kernel,bias}                  (d, 256), (256,)  nn.Dense (not tied)

* ``NNXTransformerLM`` (``flax.nnx``): the same paths as attributes (``model.blocks_0.
  attn.query`` is an ``nnx.LinearGeneral``, ``model.head`` an ``nnx.Linear``, ...); the
  blocks are attributes ``blocks_0``, ``blocks_1``, ... rather than an ``nnx.List`` so
  that ``nnx.state(model, nnx.Param)`` has exactly the linen paths.
  ``nnx_from_linen(params, config)`` builds one from linen parameters.

Both take int tokens ``(batch, seq)`` with ``seq <= max_len`` and return float32 logits
``(batch, seq, 256)``; attention is causal (``make_causal_mask``), with no dropout.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import sysconfig

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

VOCAB = 256
EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
)
HELDOUT_MODULUS = 20  # 1 file in 20 is held out


# -- corpus -------------------------------------------------------------------------------------
def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def corpus_files(root: str | None = None) -> list[str]:
    """The corpus's files as sorted relative POSIX paths (see the module docstring)."""
    root = root or stdlib_root()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]
        for name in filenames:
            if not name.endswith(".py") or name.startswith("_sysconfigdata_"):
                continue
            path = os.path.join(dirpath, name)
            if os.path.isfile(path) and not os.path.islink(path):
                out.append(os.path.relpath(path, root).replace(os.sep, "/"))
    return sorted(out)


def is_heldout(relpath: str) -> bool:
    """The fixed split: held out when int(sha1(path)[:8], 16) % 20 == 0."""
    digest = hashlib.sha1(relpath.encode("utf-8")).hexdigest()
    return int(digest[:8], 16) % HELDOUT_MODULUS == 0


def load_corpus(max_bytes: int | None = None, root: str | None = None):
    """``(train, heldout, info)``: two uint8 byte streams and a description.

    ``max_bytes`` (for tests and quick runs) truncates each stream to its first
    ``max_bytes`` bytes; the split itself does not change.  ``info["sha256"]`` digests
    the two whole streams: the corpus is whatever stdlib the running interpreter ships
    (another CPython patch release, or a distribution's split-up stdlib, is another
    corpus), so a printed figure is only comparable under the same digest.
    """
    root = root or stdlib_root()
    files = corpus_files(root)
    train_parts, held_parts, held_files = [], [], []
    for rel in files:
        with open(os.path.join(root, *rel.split("/")), "rb") as f:
            data = f.read()
        if is_heldout(rel):
            held_parts.append(data)
            held_files.append(rel)
        else:
            train_parts.append(data)
    train = np.frombuffer(b"".join(train_parts), dtype=np.uint8)
    heldout = np.frombuffer(b"".join(held_parts), dtype=np.uint8)
    digest = hashlib.sha256(train.tobytes())
    digest.update(heldout.tobytes())
    info = {
        "root": root,
        "files": len(files),
        "heldout_files": held_files,
        "train_bytes_total": int(train.size),
        "heldout_bytes_total": int(heldout.size),
        "sha256": digest.hexdigest(),  # of the whole train stream, then the held-out one
    }
    if max_bytes is not None:
        train, heldout = train[:max_bytes], heldout[:max_bytes]
    info["train_bytes"], info["heldout_bytes"] = int(train.size), int(heldout.size)
    return train, heldout, info


def batches(data: np.ndarray, batch: int, seq_len: int, seed: int):
    """Endless deterministic batches ``(x, y)`` of int32 ``(batch, seq_len)``.

    Window starts are drawn uniformly from ``np.random.default_rng(seed)``; ``y`` is ``x``
    shifted by one byte.  The same ``(data, batch, seq_len, seed)`` always yields the same
    sequence of batches.
    """
    if data.size < seq_len + 1:
        raise ValueError(f"{data.size} bytes are too few for windows of {seq_len + 1}")
    rng = np.random.default_rng(seed)
    offsets = np.arange(seq_len + 1)
    while True:
        starts = rng.integers(0, data.size - seq_len, size=batch)
        windows = data[starts[:, None] + offsets].astype(np.int32)
        yield windows[:, :-1], windows[:, 1:]


def eval_windows(data: np.ndarray, seq_len: int, n_windows: int | None = None) -> np.ndarray:
    """Fixed held-out windows, int32 ``(n, seq_len + 1)``: non-overlapping, evenly spread.

    All non-overlapping windows when ``n_windows`` is None (or larger than their number),
    otherwise ``n_windows`` of them at evenly spaced window indices.
    """
    total = (data.size - 1) // seq_len  # window i covers bytes [i*L, i*L + L]
    if total < 1:
        raise ValueError(f"{data.size} bytes are too few for a window of {seq_len + 1}")
    if n_windows is None or n_windows >= total:
        index = np.arange(total)
    else:
        index = np.linspace(0, total - 1, n_windows).round().astype(np.int64)
    starts = index * seq_len
    return data[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)


# -- model configuration ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Config:
    d_model: int = 128
    num_heads: int = 4
    num_layers: int = 4
    mlp_ratio: int = 4
    max_len: int = 256
    vocab: int = VOCAB

    def __post_init__(self):
        if self.d_model % self.num_heads:
            raise ValueError("d_model must be a multiple of num_heads")


def count_params(tree) -> int:
    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(tree)))


def tree_bytes(tree) -> int:
    return int(sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(tree)))


# -- flax.linen ---------------------------------------------------------------------------------
class CachedAttention(nn.Module):
    """``nn.MultiHeadDotProductAttention``'s projections and parameters (``query`` /
    ``key`` / ``value`` / ``out`` ``DenseGeneral`` s) with a KV cache for decoding: the
    keys and values of every position seen so far live in the ``cache`` collection
    (``cached_key`` / ``cached_value``, ``(batch, max_len, heads, head_dim)``, and
    ``cache_index``), written with ``lax.dynamic_update_slice`` for any number of new
    tokens -- the whole prompt at once (prefill), then one token a step.  Each new
    query attends to every cached position up to its own."""

    num_heads: int
    features: int
    max_len: int

    @nn.compact
    def __call__(self, x):
        batch, new, _ = x.shape
        head_dim = self.features // self.num_heads
        dense = functools.partial(nn.DenseGeneral, features=(self.num_heads, head_dim),
                                  axis=-1)
        q, k, v = dense(name="query")(x), dense(name="key")(x), dense(name="value")(x)
        shape = (batch, self.max_len, self.num_heads, head_dim)
        cached_key = self.variable("cache", "cached_key", jnp.zeros, shape, k.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, shape, v.dtype)
        index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        start = index.value
        at = (0, start, 0, 0)
        keys = jax.lax.dynamic_update_slice(cached_key.value, k, at)
        values = jax.lax.dynamic_update_slice(cached_value.value, v, at)
        cached_key.value, cached_value.value = keys, values
        index.value = start + new
        visible = jnp.arange(self.max_len)[None, :] <= (start + jnp.arange(new))[:, None]
        q = q / jnp.sqrt(head_dim).astype(q.dtype)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, keys)
        logits = jnp.where(visible[None, None], logits, jnp.finfo(logits.dtype).min)
        probs = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, values)
        return nn.DenseGeneral(self.features, axis=(-2, -1), name="out")(out)


class Block(nn.Module):
    config: Config

    @nn.compact
    def __call__(self, x, mask, decode: bool = False):
        c = self.config
        h = nn.LayerNorm(name="ln_1")(x)
        if decode:
            h = CachedAttention(c.num_heads, c.d_model, c.max_len, name="attn")(h)
        else:
            h = nn.MultiHeadDotProductAttention(
                num_heads=c.num_heads, qkv_features=c.d_model, out_features=c.d_model,
                deterministic=True, name="attn")(h, mask=mask)
        x = x + h
        h = nn.LayerNorm(name="ln_2")(x)
        h = nn.Dense(c.mlp_ratio * c.d_model, name="mlp_in")(h)
        h = nn.gelu(h)
        h = nn.Dense(c.d_model, name="mlp_out")(h)
        return x + h


class TransformerLM(nn.Module):
    """Logits ``(batch, seq, vocab)`` of int tokens ``(batch, seq)``.

    ``decode=True`` continues from the ``cache`` collection (``init_cache``): the
    tokens are the next ``seq`` positions (a prompt, then one token a step), the cache
    comes back updated (``apply(..., mutable=["cache"])``)."""

    config: Config

    @nn.compact
    def __call__(self, tokens, decode: bool = False):
        c = self.config
        seq = tokens.shape[-1]
        if seq > c.max_len:
            raise ValueError(f"sequence length {seq} > max_len {c.max_len}")
        positions = jnp.arange(seq)
        if decode:
            start = self.variable("cache", "position", lambda: jnp.array(0, jnp.int32))
            positions = positions + start.value
            start.value = start.value + seq
        x = nn.Embed(c.vocab, c.d_model, name="tok_embed")(tokens)
        x = x + nn.Embed(c.max_len, c.d_model, name="pos_embed")(positions)
        mask = None if decode else nn.make_causal_mask(tokens)
        for i in range(c.num_layers):
            x = Block(c, name=f"blocks_{i}")(x, mask, decode)
        x = nn.LayerNorm(name="ln_f")(x)
        return nn.Dense(c.vocab, name="head")(x)


def init_cache(model: TransformerLM, batch: int):
    """An empty KV cache (``model``'s ``cache`` collection) for ``batch`` sequences of
    up to ``max_len`` tokens: zeros, made without running the model."""
    tokens = jnp.zeros((batch, 1), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, decode=True))
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])


def init_linen(config: Config, seed: int = 0):
    """``(model, params)`` for the linen model."""
    model = TransformerLM(config)
    tokens = jnp.zeros((1, min(8, config.max_len)), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(seed), tokens)["params"]
    return model, params


# -- flax.nnx -----------------------------------------------------------------------------------
class NNXBlock(nnx.Module):
    def __init__(self, config: Config, *, rngs: nnx.Rngs):
        c = self.config = config
        self.ln_1 = nnx.LayerNorm(c.d_model, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            c.num_heads, c.d_model, qkv_features=c.d_model, out_features=c.d_model,
            deterministic=True, decode=False, keep_rngs=False, rngs=rngs)
        self.ln_2 = nnx.LayerNorm(c.d_model, rngs=rngs)
        self.mlp_in = nnx.Linear(c.d_model, c.mlp_ratio * c.d_model, rngs=rngs)
        self.mlp_out = nnx.Linear(c.mlp_ratio * c.d_model, c.d_model, rngs=rngs)
        self.cached_key = self.cached_value = self.cache_index = nnx.data(None)

    def init_cache(self, batch: int) -> None:
        """An empty KV cache (``nnx.Cache`` variables) for ``batch`` sequences."""
        c = self.config
        shape = (batch, c.max_len, c.num_heads, c.d_model // c.num_heads)
        self.cached_key = nnx.Cache(jnp.zeros(shape))
        self.cached_value = nnx.Cache(jnp.zeros(shape))
        self.cache_index = nnx.Cache(jnp.array(0, jnp.int32))

    def cached_attention(self, x):
        """``self.attn``'s projections with the KV cache (``CachedAttention``'s math)."""
        new = x.shape[1]
        head_dim = self.config.d_model // self.config.num_heads
        q, k, v = self.attn.query(x), self.attn.key(x), self.attn.value(x)
        start = self.cache_index[...]
        at = (0, start, 0, 0)
        keys = jax.lax.dynamic_update_slice(self.cached_key[...], k, at)
        values = jax.lax.dynamic_update_slice(self.cached_value[...], v, at)
        self.cached_key[...], self.cached_value[...] = keys, values
        self.cache_index[...] = start + new
        visible = (jnp.arange(self.config.max_len)[None, :]
                   <= (start + jnp.arange(new))[:, None])
        q = q / jnp.sqrt(head_dim).astype(q.dtype)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, keys)
        logits = jnp.where(visible[None, None], logits, jnp.finfo(logits.dtype).min)
        probs = jax.nn.softmax(logits, axis=-1)
        return self.attn.out(jnp.einsum("bhqk,bkhd->bqhd", probs, values))

    def __call__(self, x, mask, decode: bool = False):
        h = self.ln_1(x)
        x = x + (self.cached_attention(h) if decode else self.attn(h, mask=mask))
        return x + self.mlp_out(nnx.gelu(self.mlp_in(self.ln_2(x))))


class NNXTransformerLM(nnx.Module):
    def __init__(self, config: Config, *, rngs: nnx.Rngs):
        c = self.config = config
        self.tok_embed = nnx.Embed(c.vocab, c.d_model, rngs=rngs)
        self.pos_embed = nnx.Embed(c.max_len, c.d_model, rngs=rngs)
        for i in range(c.num_layers):
            setattr(self, f"blocks_{i}", NNXBlock(c, rngs=rngs))
        self.ln_f = nnx.LayerNorm(c.d_model, rngs=rngs)
        self.head = nnx.Linear(c.d_model, c.vocab, rngs=rngs)
        self.position = nnx.data(None)  # a cache variable once init_cache is called

    def blocks(self):
        return [getattr(self, f"blocks_{i}") for i in range(self.config.num_layers)]

    def init_cache(self, batch: int) -> None:
        """Empty KV caches for ``batch`` sequences (``decode=True`` calls continue them)."""
        for block in self.blocks():
            block.init_cache(batch)
        self.position = nnx.Cache(jnp.array(0, jnp.int32))

    def __call__(self, tokens, decode: bool = False):
        c = self.config
        seq = tokens.shape[-1]
        if seq > c.max_len:
            raise ValueError(f"sequence length {seq} > max_len {c.max_len}")
        positions = jnp.arange(seq)
        if decode:
            positions = positions + self.position[...]
            self.position[...] = self.position[...] + seq
        x = self.tok_embed(tokens) + self.pos_embed(positions)
        mask = None if decode else nnx.make_causal_mask(tokens)
        for block in self.blocks():
            x = block(x, mask, decode)
        return self.head(self.ln_f(x))


def nnx_from_linen(params, config: Config) -> NNXTransformerLM:
    """An ``NNXTransformerLM`` holding (copies of) the linen ``params``.

    The two versions have the same parameter paths and shapes, so this is a plain
    ``nnx.update``; a missing, extra or mis-shaped parameter raises ``ValueError``.
    """
    model = nnx.eval_shape(lambda: NNXTransformerLM(config, rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    want = {k: v.shape for k, v in _flat(nnx.to_pure_dict(state)).items()}
    got = {k: np.shape(v) for k, v in _flat(params).items()}
    if want != got:
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        shapes = sorted(k for k in set(want) & set(got) if want[k] != got[k])
        raise ValueError(f"params do not fit: missing {missing}, extra {extra}, "
                         f"mis-shaped {shapes}")
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map(jnp.array, _unfreeze(params)))
    nnx.update(model, state)
    return model


def _unfreeze(tree):
    if hasattr(tree, "items"):
        return {k: _unfreeze(v) for k, v in tree.items()}
    return tree


def _flat(tree, prefix=()):
    out = {}
    for k, v in tree.items():
        if hasattr(v, "items"):
            out.update(_flat(v, prefix + (str(k),)))
        else:
            out["/".join(prefix + (str(k),))] = v
    return out


def param_paths(params) -> dict[str, tuple[int, ...]]:
    """``{"blocks_0/attn/query/kernel": (128, 4, 32), ...}`` for a linen params tree or an
    nnx ``State`` / pure dict."""
    if isinstance(params, nnx.State):
        params = nnx.to_pure_dict(params)
    return {k: tuple(np.shape(v)) for k, v in _flat(params).items()}
