"""A zoo of small float models written the way users write them, each with hand-written
facts about its weights, for the tests of whole-model quantization of arbitrary JAX code.

Nothing here imports ``pychop_jax``: these are "models the user wrote".  Every model is
built from a tiny config with random weights (no downloads): the parameter tree its own
init makes (``jax.eval_shape``), filled by :func:`random_like`.  ``build(name)`` returns a
cached :class:`ZooCase`; ``CASES`` lists the names, ``REQUIRES`` the optional package
(transformers, equinox: the ``test`` extra) a case needs.

The expected facts were derived by reading each model's code (ours below, and for
``gpt2`` / ``llama`` transformers' ``modeling_flax_gpt2.py`` / ``modeling_flax_llama.py``),
not by running any analysis:

* a *weight* is a parameter that reaches an operand of ``lax.dot_general`` or
  ``lax.conv_general_dilated`` (on either side, through transpose / reshape / astype /
  indexing / slicing / the per-iteration slice of a scan), or a table that is gathered
  (an embedding lookup);
* ``ExpectedWeight.contracted``: the axes of the parameter *as stored* that its matmul(s)
  contract (for a conv: the input-feature and spatial axes of the kernel); for a table
  that is only gathered, its feature axes (every axis but the gathered one).  The other
  axes, a stacked layer axis included, are its output channels;
* ``ExpectedWeight.uses``: the kinds of use, each once, in the order ``gather``,
  ``dot_general``, ``conv`` (compare as a set if you like);
* ``ZooCase.float_params``: every other parameter (norm scales, biases, ...).  Each
  parameter of a model is in exactly one of ``weights`` / ``float_params``.

Paths are the parameter's path joined by "/": linen: inside ``variables["params"]``
(for an ``nn.with_logical_partitioning`` box, the path of the box, without its ``value``
attribute); nnx: the attribute path of the ``nnx.Param`` (list indices as numbers);
function: the path in the params pytree; equinox: the attribute path.

``ZooCase.forward(state, *args)`` runs the float model the standard way for its framework,
where ``state`` is ``case.state``: the ``variables`` dict (linen), the params pytree
(function), or the model itself (nnx, equinox).  Jit it with ``jax.jit`` (linen,
function), ``nnx.jit`` (nnx) or ``eqx.filter_jit`` (equinox).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging
import math
import os
import sys
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

BATCH, SEQ = 2, 8
USES = ("gather", "dot_general", "conv")  # the order of ExpectedWeight.uses


@dataclasses.dataclass(frozen=True)
class ExpectedWeight:
    shape: tuple[int, ...]
    contracted: tuple[int, ...]
    uses: tuple[str, ...] = ("dot_general",)

    @property
    def output_channels(self) -> tuple[int, ...]:
        """The stored axes that are not contracted (a stacked layer axis included)."""
        return tuple(a for a in range(len(self.shape)) if a not in self.contracted)


@dataclasses.dataclass(frozen=True, eq=False)
class ZooCase:
    name: str
    framework: str  # "linen" | "nnx" | "function" | "equinox"
    model: Any  # an unbound nn.Module, an nnx.Module, a function f(params, *args), an eqx.Module
    params: Any  # linen: the variables dict from init; function: the params pytree; else None
    args: tuple
    forward: Callable  # forward(state, *args), state = self.state
    weights: dict[str, ExpectedWeight]
    float_params: tuple[str, ...]
    output_shape: tuple[int, ...]
    notes: str = ""
    #: linen: the keyword arguments ``forward`` passes to ``module.apply`` and how it reads
    #: the logits off its output (the same call through another ``apply``)
    apply_kwargs: dict = dataclasses.field(default_factory=dict)
    output: Callable = lambda y: y

    @property
    def state(self):
        """What ``forward`` takes first: the variables / params, or the model (nnx, eqx)."""
        return self.model if self.framework in ("nnx", "equinox") else self.params

    def run(self):
        return self.forward(self.state, *self.args)


# No model's init is compiled: each model's parameter tree is the one its own init makes,
# found with jax.eval_shape (traced, never run), and filled with NumPy random numbers
# (random_like).  On this 2-core CPU, compiling an init costs 1-2 s of CPU a model (XLA
# compiles the random bit generators slowly: a conv net's init took 8 s with threefry
# keys), running it eagerly is one compile per op, while tracing takes a fraction of a
# second.  Inputs come from NumPy too.


def _key(seed=0):
    return jax.random.key(seed, impl="rbg")  # traced only: its kind makes no difference


def _tokens(vocab, seed=1):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (BATCH, SEQ), np.int32))


def _np_normal(rng, shape, fan_in=1):
    return jnp.asarray(rng.standard_normal(shape, np.float32) / np.float32(math.sqrt(fan_in)))


def _leaf_name(path):
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", "")))) for k in path]
    while names and names[-1] == "value":  # an nn.Partitioned box's / nnx.Variable's value
        names.pop()
    return names[-1] if names else ""


def random_like(abstract, seed=0, std=0.1):
    """Arrays for the ``jax.ShapeDtypeStruct`` leaves of ``abstract``: a 1-D leaf named like
    a bias (``*bias*``, ``b_*``) zeros, any other 1-D leaf (a norm scale) ones, the rest
    normal(0, std).  Boxes, nnx Variables and eqx Modules around the leaves are kept."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        if not isinstance(leaf, jax.ShapeDtypeStruct):
            return leaf
        dtype = np.dtype(leaf.dtype)
        if len(leaf.shape) == 1:
            name = _leaf_name(path)
            bias = "bias" in name or name.startswith("b_")
            return jnp.asarray((np.zeros if bias else np.ones)(leaf.shape, dtype))
        return jnp.asarray((std * rng.standard_normal(leaf.shape)).astype(dtype))

    return jax.tree_util.tree_map_with_path(fill, abstract)


def _linen_init(module, *args):
    return random_like(jax.eval_shape(module.init, _key(), *args))


def _per_layer(n_layers, template):
    """``template`` ({path with "{i}": value}) written out for layers 0..n_layers-1."""
    out = {}
    for i in range(n_layers):
        for path, value in template.items():
            out[path.format(i=i)] = value
    return out


# -- a. GPT-2 (transformers' Flax model) --------------------------------------------------


def _transformers():
    """``transformers``, imported (if this process has not yet) with ``USE_TORCH=0``
    unless USE_TORCH is set: with torch installed, its import pulls in its torch side and,
    through ``generation.candidate_generator``, sklearn and scipy (5 s of CPU against
    1.3 s).  transformers reads the variable once, at import; it is restored at once,
    so nothing else (subprocesses included) sees it."""
    if "transformers" not in sys.modules and "USE_TORCH" not in os.environ:
        os.environ["USE_TORCH"] = "0"
        try:
            import transformers  # noqa: F401
        finally:
            del os.environ["USE_TORCH"]
    import transformers

    return transformers


def _hf_quietly(build):
    """Build a transformers Flax model without its "TensorFlow and JAX classes are
    deprecated" log warning (logged once per process, by ``FlaxPreTrainedModel.__init__``;
    ``TRANSFORMERS_VERBOSITY=error`` silences it too)."""
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity(logging.ERROR)
    try:
        return build()
    finally:
        hf_logging.set_verbosity(old)


def _hf_model(cls, config):
    """``cls(config)`` with random weights: the module and its params.  Built with
    ``_do_init=False`` (as transformers builds big Flax models too: the constructor's own
    init runs eagerly, op by op) and the params its ``init_weights`` would make."""
    hf = _hf_quietly(lambda: cls(config, seed=0, _do_init=False))
    params = random_like(jax.eval_shape(lambda key: hf.init_weights(key, (1, 1)), _key()))
    return hf.module, params


HF_APPLY_KWARGS = {"deterministic": True, "return_dict": False}


def _hf_causal_lm_forward(module):
    def forward(variables, input_ids, attention_mask, position_ids):
        return module.apply(
            variables, input_ids, attention_mask, position_ids,
            deterministic=True, return_dict=False,
        )[0]

    return forward


def _hf_args(vocab):
    input_ids = _tokens(vocab)
    attention_mask = jnp.ones((BATCH, SEQ), jnp.int32)
    position_ids = jnp.asarray(np.broadcast_to(np.arange(SEQ, dtype=np.int32), (BATCH, SEQ)))
    return input_ids, attention_mask, position_ids


def gpt2() -> ZooCase:
    hf = _transformers()
    FlaxGPT2LMHeadModel, GPT2Config = hf.FlaxGPT2LMHeadModel, hf.GPT2Config

    d, layers, vocab, n_pos = 32, 2, 64, 16
    config = GPT2Config(n_embd=d, n_layer=layers, n_head=2, vocab_size=vocab, n_positions=n_pos)
    module, params = _hf_model(FlaxGPT2LMHeadModel, config)
    inner = 4 * d  # config.n_inner is None
    b = "transformer/h/{i}/"
    # FlaxConv1D stores its kernel (out, in) and runs dot_general(x, kernel.T) contracting
    # kernel.T's axis 0, i.e. the stored axis 1.
    weights = {
        # looked up (nn.Embed: jnp.take) and, tied, the LM head: lm_head.apply(
        # {"params": {"kernel": wte.T}}, h), a Dense contracting wte.T's axis 0 = wte's axis 1
        "transformer/wte/embedding": ExpectedWeight((vocab, d), (1,), ("gather", "dot_general")),
        "transformer/wpe/embedding": ExpectedWeight((n_pos, d), (1,), ("gather",)),
        **_per_layer(layers, {
            b + "attn/c_attn/kernel": ExpectedWeight((3 * d, d), (1,)),
            b + "attn/c_proj/kernel": ExpectedWeight((d, d), (1,)),
            b + "mlp/c_fc/kernel": ExpectedWeight((inner, d), (1,)),
            b + "mlp/c_proj/kernel": ExpectedWeight((d, inner), (1,)),
        }),
    }
    float_params = tuple(_per_layer(layers, dict.fromkeys([
        b + "attn/c_attn/bias", b + "attn/c_proj/bias", b + "mlp/c_fc/bias",
        b + "mlp/c_proj/bias", b + "ln_1/scale", b + "ln_1/bias", b + "ln_2/scale", b + "ln_2/bias",
    ]))) + ("transformer/ln_f/scale", "transformer/ln_f/bias")
    return ZooCase(
        name="gpt2", framework="linen", model=module, params={"params": params},
        args=_hf_args(vocab), forward=_hf_causal_lm_forward(module),
        weights=weights, float_params=float_params, output_shape=(BATCH, SEQ, vocab),
        apply_kwargs=HF_APPLY_KWARGS, output=lambda y: y[0],
        notes=(
            "hf.module.apply({'params': hf.params}, input_ids, attention_mask, position_ids, "
            "deterministic=True, return_dict=False)[0] -> logits; all three inputs int32 "
            "(batch, seq), positionally (the module has no defaults for attention_mask / "
            "position_ids); lm_head has no params (tied to wte)."
        ),
    )


# -- b. Llama (transformers' Flax model) --------------------------------------------------


def llama() -> ZooCase:
    hf = _transformers()
    FlaxLlamaForCausalLM, LlamaConfig = hf.FlaxLlamaForCausalLM, hf.LlamaConfig

    d, hidden, layers, heads, kv_heads, vocab = 32, 64, 2, 2, 1, 64
    head_dim = d // heads
    # max_position_embeddings=32, not 16: transformers' Flax rotary table,
    # create_sinusoidal_positions(num_pos, head_dim), slices its LAST axis (sin|cos, of
    # 2 * head_dim) with [:num_pos], so it only works when num_pos >= 2 * head_dim.
    config = LlamaConfig(
        hidden_size=d, intermediate_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
        max_position_embeddings=2 * head_dim,
    )
    module, params = _hf_model(FlaxLlamaForCausalLM, config)
    b = "model/layers/{i}/"
    # nn.Dense everywhere (kernel (in, out), contracting axis 0); no biases
    # (attention_bias=False, the MLP has none); LlamaConfig ties no embeddings.
    weights = {
        "model/embed_tokens/embedding": ExpectedWeight((vocab, d), (1,), ("gather",)),
        "lm_head/kernel": ExpectedWeight((d, vocab), (0,)),
        **_per_layer(layers, {
            b + "self_attn/q_proj/kernel": ExpectedWeight((d, heads * head_dim), (0,)),
            b + "self_attn/k_proj/kernel": ExpectedWeight((d, kv_heads * head_dim), (0,)),
            b + "self_attn/v_proj/kernel": ExpectedWeight((d, kv_heads * head_dim), (0,)),
            b + "self_attn/o_proj/kernel": ExpectedWeight((heads * head_dim, d), (0,)),
            b + "mlp/gate_proj/kernel": ExpectedWeight((d, hidden), (0,)),
            b + "mlp/up_proj/kernel": ExpectedWeight((d, hidden), (0,)),
            b + "mlp/down_proj/kernel": ExpectedWeight((hidden, d), (0,)),
        }),
    }
    float_params = tuple(_per_layer(layers, dict.fromkeys([
        b + "input_layernorm/weight", b + "post_attention_layernorm/weight",
    ]))) + ("model/norm/weight",)  # FlaxLlamaRMSNorm: self.weight * normed
    return ZooCase(
        name="llama", framework="linen", model=module, params={"params": params},
        args=_hf_args(vocab), forward=_hf_causal_lm_forward(module),
        weights=weights, float_params=float_params, output_shape=(BATCH, SEQ, vocab),
        apply_kwargs=HF_APPLY_KWARGS, output=lambda y: y[0],
        notes=(
            "hf.module.apply({'params': hf.params}, input_ids, attention_mask, position_ids, "
            "deterministic=True, return_dict=False)[0] -> logits; inputs int32 (batch, seq); "
            "pass all three (the signature defaults attention_mask / position_ids to None, "
            "which fails). RMSNorm scales are params named 'weight'. "
            "max_position_embeddings must be >= 2 * head_dim (transformers' Flax rotary "
            "table bug)."
        ),
    )


# -- c. gemma_style: raw self.param weights with jnp.einsum -------------------------------


class GemmaRMSNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.zeros_init(), (x.shape[-1],))
        var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        return x * lax.rsqrt(var + 1e-6) * (1 + scale)


class GemmaEmbedder(nn.Module):
    vocab_size: int
    embed_dim: int

    def setup(self):
        self.input_embedding = self.param(
            "input_embedding", nn.initializers.normal(), (self.vocab_size, self.embed_dim)
        )

    def encode(self, tokens):
        x = self.input_embedding[(tokens,)]
        return x * jnp.sqrt(self.embed_dim).astype(x.dtype)

    def decode(self, x):
        return jnp.dot(x, self.input_embedding.T)


class GemmaEinsum(nn.Module):
    shape: tuple[int, ...]

    @nn.compact
    def __call__(self, eqn, x):
        w = self.param("w", nn.initializers.normal(), self.shape)
        return jnp.einsum(eqn, x, w)


class GemmaAttention(nn.Module):
    num_heads: int
    features: int
    head_dim: int

    def setup(self):
        self.qkv_einsum = GemmaEinsum((3, self.num_heads, self.features, self.head_dim))
        self.attn_vec_einsum = GemmaEinsum((self.num_heads, self.head_dim, self.features))

    def __call__(self, x, mask):
        q, k, v = self.qkv_einsum("BTD,SNDH->SBTNH", x)
        logits = jnp.einsum("BTNH,BSNH->BTNS", q * self.head_dim**-0.5, k)
        logits = jnp.where(mask[:, :, None, :], logits, -1e30)
        enc = jnp.einsum("BTNS,BSNH->BTNH", jax.nn.softmax(logits, axis=-1), v)
        return self.attn_vec_einsum("BTNH,NHD->BTD", enc)


class GemmaFeedForward(nn.Module):
    features: int
    hidden_dim: int

    @nn.compact
    def __call__(self, x):
        w_gating = self.param(
            "gating_einsum", nn.initializers.normal(), (2, self.features, self.hidden_dim)
        )
        gate = nn.gelu(jnp.dot(x, w_gating[0]))
        up = jnp.einsum("...d,dh->...h", x, w_gating[1])
        w_linear = self.param("linear", nn.initializers.normal(), (self.hidden_dim, self.features))
        return jnp.einsum("hd,...h->...d", w_linear, gate * up)  # the weight on the LEFT


class GemmaBlock(nn.Module):
    num_heads: int
    features: int
    head_dim: int
    hidden_dim: int

    def setup(self):
        self.pre_attention_norm = GemmaRMSNorm()
        self.attn = GemmaAttention(self.num_heads, self.features, self.head_dim)
        self.pre_ffw_norm = GemmaRMSNorm()
        self.mlp = GemmaFeedForward(self.features, self.hidden_dim)

    def __call__(self, x, mask):
        x = x + self.attn(self.pre_attention_norm(x), mask)
        return x + self.mlp(self.pre_ffw_norm(x))


class GemmaStyleLM(nn.Module):
    vocab_size: int = 64
    features: int = 32
    num_heads: int = 2
    head_dim: int = 8
    hidden_dim: int = 64  # int4 g32 groups divide it
    num_layers: int = 2

    def setup(self):
        self.embedder = GemmaEmbedder(self.vocab_size, self.features)
        self.layers = [
            GemmaBlock(self.num_heads, self.features, self.head_dim, self.hidden_dim,
                       name=f"layer_{i}")
            for i in range(self.num_layers)
        ]
        self.final_norm = GemmaRMSNorm()

    def __call__(self, tokens):
        x = self.embedder.encode(tokens)
        t = tokens.shape[1]
        mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (tokens.shape[0], t, t))
        for layer in self.layers:
            x = layer(x, mask)
        return self.embedder.decode(self.final_norm(x))


def gemma_style() -> ZooCase:
    m = GemmaStyleLM()
    v, d, n, h, f = m.vocab_size, m.features, m.num_heads, m.head_dim, m.hidden_dim
    tokens = _tokens(v)
    variables = _linen_init(m, tokens)
    b = "layer_{i}/"
    weights = {
        # looked up with table[(tokens,)], decoded with jnp.dot(x, table.T): tied
        "embedder/input_embedding": ExpectedWeight((v, d), (1,), ("gather", "dot_general")),
        **_per_layer(m.num_layers, {
            # einsum BTD,SNDH->SBTNH: contracts D
            b + "attn/qkv_einsum/w": ExpectedWeight((3, n, d, h), (2,)),
            # einsum BTNH,NHD->BTD: contracts N, H
            b + "attn/attn_vec_einsum/w": ExpectedWeight((n, h, d), (0, 1)),
            # w[0] / w[1], each contracted on its axis 0 = the stored axis 1
            b + "mlp/gating_einsum": ExpectedWeight((2, d, f), (1,)),
            # einsum hd,...h->...d with the weight on the left: contracts h
            b + "mlp/linear": ExpectedWeight((f, d), (0,)),
        }),
    }
    float_params = tuple(_per_layer(m.num_layers, dict.fromkeys([
        b + "pre_attention_norm/scale", b + "pre_ffw_norm/scale",
    ]))) + ("final_norm/scale",)
    return ZooCase(
        name="gemma_style", framework="linen", model=m, params=variables, args=(tokens,),
        forward=lambda variables, tokens: m.apply(variables, tokens),
        weights=weights, float_params=float_params, output_shape=(BATCH, SEQ, v),
        notes="m.apply(variables, tokens) -> logits; tokens int32 (batch, seq).",
    )


# -- d. maxtext_style: lax.dot_general kernels in boxes, nn.remat blocks under nn.scan ----


@dataclasses.dataclass(frozen=True)
class MtConfig:
    vocab_size: int = 48
    emb_dim: int = 16
    num_heads: int = 2
    head_dim: int = 8
    mlp_dim: int = 64  # int4 g32 groups divide it
    num_layers: int = 2


def _mt_init(axes):
    return nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes)


class MtDenseGeneral(nn.Module):
    """MaxText's DenseGeneral: a raw kernel (contracted axes first) and lax.dot_general."""

    features: tuple[int, ...]
    kernel_axes: tuple[str, ...]
    axis: tuple[int, ...] = (-1,)

    @nn.compact
    def __call__(self, x):
        axis = tuple(a % x.ndim for a in self.axis)
        shape = tuple(x.shape[a] for a in axis) + self.features
        kernel = self.param("kernel", _mt_init(self.kernel_axes), shape)
        kernel = jnp.asarray(kernel, x.dtype)
        contract = tuple(range(len(axis)))
        y = lax.dot_general(x, kernel, ((axis, contract), ((), ())))
        # MaxText annotates activations with logical axes (a sharding constraint under
        # nn.logical_axis_rules and a mesh; nothing otherwise)
        names = ("activation_batch", "activation_length") + (None,) * (y.ndim - 2)
        return nn.with_logical_constraint(y, names)


class MtRMSNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
            (x.shape[-1],),
        )
        x32 = x.astype(jnp.float32)
        normed = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6)
        return normed.astype(x.dtype) * scale


class MtAttention(nn.Module):
    cfg: MtConfig

    @nn.compact
    def __call__(self, x, mask):
        c = self.cfg
        qkv = (c.num_heads, c.head_dim)
        q = MtDenseGeneral(qkv, ("embed", "heads", "kv"), name="query")(x)
        k = MtDenseGeneral(qkv, ("embed", "heads", "kv"), name="key")(x)
        v = MtDenseGeneral(qkv, ("embed", "heads", "kv"), name="value")(x)
        logits = jnp.einsum("btnh,bsnh->bnts", q, k) / math.sqrt(c.head_dim)
        probs = jax.nn.softmax(jnp.where(mask, logits, -1e30), axis=-1)
        enc = jnp.einsum("bnts,bsnh->btnh", probs, v)
        return MtDenseGeneral((c.emb_dim,), ("heads", "kv", "embed"), axis=(-2, -1),
                              name="out")(enc)


class MtMlp(nn.Module):
    cfg: MtConfig

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        # MaxText's fused_mlp: one kernel (embed, 2, mlp) for the gate and the up projection
        h = MtDenseGeneral((2, c.mlp_dim), ("embed", "num_activations", "mlp"), name="wi")(x)
        h = nn.silu(h[..., 0, :]) * h[..., 1, :]
        return MtDenseGeneral((c.emb_dim,), ("mlp", "embed"), name="wo")(h)


class MtDecoderLayer(nn.Module):
    cfg: MtConfig

    @nn.compact
    def __call__(self, x, mask):
        h = MtRMSNorm(name="pre_self_attention_norm")(x)
        x = x + MtAttention(self.cfg, name="self_attention")(h, mask)
        x = x + MtMlp(self.cfg, name="mlp")(MtRMSNorm(name="post_self_attention_norm")(x))
        return x, None


class MtDecoder(nn.Module):
    cfg: MtConfig

    @nn.compact
    def __call__(self, x, mask):
        c = self.cfg
        block = nn.remat(MtDecoderLayer, prevent_cse=False,
                         policy=jax.checkpoint_policies.nothing_saveable)
        layers = nn.scan(
            block, variable_axes={"params": 0}, split_rngs={"params": True},
            in_axes=(nn.broadcast,), length=c.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = layers(c, name="layers")(x, mask)
        x = MtRMSNorm(name="decoder_norm")(x)
        return MtDenseGeneral((c.vocab_size,), ("embed", "vocab"), name="logits_dense")(x)


class MtEmbed(nn.Module):
    num_embeddings: int
    features: int

    @nn.compact
    def __call__(self, tokens):
        embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
            (self.num_embeddings, self.features),
        )
        return jnp.asarray(embedding, jnp.float32)[tokens]


class MaxTextStyleLM(nn.Module):
    cfg: MtConfig = MtConfig()

    @nn.compact
    def __call__(self, tokens):
        c = self.cfg
        x = MtEmbed(c.vocab_size, c.emb_dim, name="token_embedder")(tokens)
        t = tokens.shape[1]
        mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
        return MtDecoder(c, name="decoder")(x, mask)


def maxtext_style() -> ZooCase:
    c = MtConfig()
    m = MaxTextStyleLM(c)
    tokens = _tokens(c.vocab_size)
    variables = _linen_init(m, tokens)  # params are nn.LogicallyPartitioned boxes
    L, d, n, h, f = c.num_layers, c.emb_dim, c.num_heads, c.head_dim, c.mlp_dim
    lay = "decoder/layers/"
    # every block weight is stacked (layer axis 0, from nn.scan), so contracted axes shift by 1
    weights = {
        "token_embedder/embedding": ExpectedWeight((c.vocab_size, d), (1,), ("gather",)),
        lay + "self_attention/query/kernel": ExpectedWeight((L, d, n, h), (1,)),
        lay + "self_attention/key/kernel": ExpectedWeight((L, d, n, h), (1,)),
        lay + "self_attention/value/kernel": ExpectedWeight((L, d, n, h), (1,)),
        lay + "self_attention/out/kernel": ExpectedWeight((L, n, h, d), (1, 2)),
        lay + "mlp/wi/kernel": ExpectedWeight((L, d, 2, f), (1,)),
        lay + "mlp/wo/kernel": ExpectedWeight((L, f, d), (1,)),
        "decoder/logits_dense/kernel": ExpectedWeight((d, c.vocab_size), (0,)),
    }
    float_params = (
        lay + "pre_self_attention_norm/scale", lay + "post_self_attention_norm/scale",
        "decoder/decoder_norm/scale",
    )
    return ZooCase(
        name="maxtext_style", framework="linen", model=m, params=variables, args=(tokens,),
        forward=lambda variables, tokens: m.apply(variables, tokens),
        weights=weights, float_params=float_params, output_shape=(BATCH, SEQ, c.vocab_size),
        notes=(
            "m.apply(variables, tokens) -> logits. variables['params'] leaves are "
            "nn.LogicallyPartitioned boxes (apply takes them boxed); the scanned ones carry "
            "the 'layers' axis name first (metadata_params)."
        ),
    )


# -- e. stock_scan: stock nn.Dense / nn.MultiHeadDotProductAttention under nn.scan --------


class StockBlock(nn.Module):
    num_heads: int
    qkv_features: int
    mlp_dim: int

    @nn.compact
    def __call__(self, x, mask):
        h = nn.LayerNorm(name="ln_attn")(x)
        h = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads, qkv_features=self.qkv_features, name="attn"
        )(h, mask=mask)
        x = x + h
        h = nn.Dense(self.mlp_dim, name="fc_in")(nn.LayerNorm(name="ln_mlp")(x))
        x = x + nn.Dense(x.shape[-1], name="fc_out")(nn.gelu(h))
        return x, None


class StockScanLM(nn.Module):
    vocab_size: int = 48
    features: int = 24
    num_heads: int = 2
    qkv_features: int = 16
    mlp_dim: int = 64  # int4 g32 groups divide it
    num_layers: int = 2

    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(self.vocab_size, self.features, name="embed")
        x = embed(tokens)
        mask = nn.make_causal_mask(tokens)
        blocks = nn.scan(
            StockBlock, variable_axes={"params": 0}, split_rngs={"params": True},
            in_axes=(nn.broadcast,), length=self.num_layers,
        )
        x, _ = blocks(self.num_heads, self.qkv_features, self.mlp_dim, name="blocks")(x, mask)
        return embed.attend(nn.LayerNorm(name="ln_f")(x))


def stock_scan() -> ZooCase:
    m = StockScanLM()
    tokens = _tokens(m.vocab_size)
    variables = _linen_init(m, tokens)
    L, d, n, f = m.num_layers, m.features, m.num_heads, m.mlp_dim
    h = m.qkv_features // n
    a = "blocks/attn/"
    weights = {
        # nn.Embed: jnp.take to look up, Embed.attend: jnp.dot(x, embedding.T) (tied)
        "embed/embedding": ExpectedWeight((m.vocab_size, d), (1,), ("gather", "dot_general")),
        # DenseGeneral kernels (d, heads, head_dim) / (heads, head_dim, d), stacked by nn.scan
        a + "query/kernel": ExpectedWeight((L, d, n, h), (1,)),
        a + "key/kernel": ExpectedWeight((L, d, n, h), (1,)),
        a + "value/kernel": ExpectedWeight((L, d, n, h), (1,)),
        a + "out/kernel": ExpectedWeight((L, n, h, d), (1, 2)),
        "blocks/fc_in/kernel": ExpectedWeight((L, d, f), (1,)),
        "blocks/fc_out/kernel": ExpectedWeight((L, f, d), (1,)),
    }
    float_params = (
        a + "query/bias", a + "key/bias", a + "value/bias", a + "out/bias",
        "blocks/fc_in/bias", "blocks/fc_out/bias",
        "blocks/ln_attn/scale", "blocks/ln_attn/bias", "blocks/ln_mlp/scale",
        "blocks/ln_mlp/bias", "ln_f/scale", "ln_f/bias",
    )
    return ZooCase(
        name="stock_scan", framework="linen", model=m, params=variables, args=(tokens,),
        forward=lambda variables, tokens: m.apply(variables, tokens),
        weights=weights, float_params=float_params, output_shape=(BATCH, SEQ, m.vocab_size),
        notes="m.apply(variables, tokens) -> logits (tied: nn.Embed.attend).",
    )


# -- f. nnx_raw: raw nnx.Params with @ and jnp.einsum, nnx.Embed, norms, a bias -------------


class NnxBlock(nnx.Module):
    def __init__(self, d, hidden, *, rngs):
        self.norm = nnx.RMSNorm(d, rngs=rngs)
        self.w_in = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (d, hidden)))
        self.b_in = nnx.Param(jnp.zeros((hidden,)))
        self.w_out = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (hidden, d)))

    def __call__(self, x):
        h = self.norm(x) @ self.w_in + self.b_in
        return x + jnp.einsum("bth,hd->btd", nnx.gelu(h), self.w_out)


class NnxRawLM(nnx.Module):
    def __init__(self, vocab=48, d=16, hidden=64, num_layers=2, *, rngs):  # g32 divides 64
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.layers = nnx.List([NnxBlock(d, hidden, rngs=rngs) for _ in range(num_layers)])
        self.final_norm = nnx.LayerNorm(d, rngs=rngs)
        # (vocab, d), untied from the embedding
        self.head = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (vocab, d)))
        self.head_bias = nnx.Param(jnp.zeros((vocab,)))

    def __call__(self, tokens):
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        x = self.final_norm(x)
        return jnp.einsum("btd,vd->btv", x, self.head) + self.head_bias


def nnx_raw() -> ZooCase:
    vocab, d, hidden, layers = 48, 16, 64, 2
    abstract = nnx.eval_shape(lambda: NnxRawLM(vocab, d, hidden, layers, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    m = nnx.merge(graphdef, random_like(state))
    b = "layers/{i}/"
    weights = {
        "embed/embedding": ExpectedWeight((vocab, d), (1,), ("gather",)),
        **_per_layer(layers, {
            b + "w_in": ExpectedWeight((d, hidden), (0,)),  # x @ w_in
            b + "w_out": ExpectedWeight((hidden, d), (0,)),  # einsum bth,hd->btd
        }),
        "head": ExpectedWeight((vocab, d), (1,)),  # einsum btd,vd->btv
    }
    float_params = tuple(_per_layer(layers, dict.fromkeys([b + "norm/scale", b + "b_in"]))) + (
        "final_norm/scale", "final_norm/bias", "head_bias",
    )
    return ZooCase(
        name="nnx_raw", framework="nnx", model=m, params=None, args=(_tokens(vocab),),
        forward=lambda model, tokens: model(tokens),
        weights=weights, float_params=float_params, output_shape=(BATCH, SEQ, vocab),
        notes="model(tokens) -> logits; jit with nnx.jit.",
    )


# -- g. equinox_mlp: eqx.nn.Embedding + eqx.nn.MLP (weights (out, in), used weight @ x) ----


def equinox_mlp() -> ZooCase:
    import equinox as eqx

    vocab, d, width, out = 48, 16, 24, 10

    class EqxTokenMLP(eqx.Module):
        embed: eqx.nn.Embedding
        norm: eqx.nn.LayerNorm
        mlp: eqx.nn.MLP

        def __init__(self, key):
            k_embed, k_mlp = jax.random.split(key)
            self.embed = eqx.nn.Embedding(vocab, d, key=k_embed)
            self.norm = eqx.nn.LayerNorm(d)
            self.mlp = eqx.nn.MLP(d, out, width_size=width, depth=1, key=k_mlp)

        def __call__(self, tokens):  # one sequence: (seq,) -> (seq, out)
            x = jax.vmap(self.embed)(tokens)  # self.weight[token]
            return jax.vmap(self.mlp)(jax.vmap(self.norm)(x))

    m = random_like(eqx.filter_eval_shape(EqxTokenMLP, _key()))
    weights = {
        "embed/weight": ExpectedWeight((vocab, d), (1,), ("gather",)),
        # eqx.nn.Linear: weight (out, in), y = weight @ x (the weight on the left)
        "mlp/layers/0/weight": ExpectedWeight((width, d), (1,)),
        "mlp/layers/1/weight": ExpectedWeight((out, width), (1,)),
    }
    float_params = ("norm/weight", "norm/bias", "mlp/layers/0/bias", "mlp/layers/1/bias")
    return ZooCase(
        name="equinox_mlp", framework="equinox", model=m, params=None, args=(_tokens(vocab),),
        forward=lambda model, tokens: jax.vmap(model)(tokens),
        weights=weights, float_params=float_params, output_shape=(BATCH, SEQ, out),
        notes="jax.vmap(model)(tokens) -> (batch, seq, 10); jit with eqx.filter_jit.",
    )


# -- h. plain_function: a function over a nested dict of arrays -----------------------------


def plain_mlp(params, x):
    layer0, layer1 = params["layers"]
    h = jax.nn.gelu(jnp.dot(x, layer0["w"]) + layer0["b"])
    h = jnp.tensordot(h, layer1["w"], axes=([2], [0]))  # (b, t, 4, 5)
    h = h.reshape(h.shape[:2] + (-1,)) + layer1["b"]
    mu = h.mean(-1, keepdims=True)
    h = (h - mu) * lax.rsqrt(((h - mu) ** 2).mean(-1, keepdims=True) + 1e-5)
    h = h * params["ln"]["scale"]
    out = h @ params["head"]["w"].T
    return out + h @ params["aux"]["w"][..., :12]  # only the first 12 columns of aux


def plain_function() -> ZooCase:
    rng = np.random.default_rng(0)
    params = {
        "layers": [
            {"w": _np_normal(rng, (16, 32), 16), "b": jnp.asarray(np.zeros(32, np.float32))},
            {"w": _np_normal(rng, (32, 4, 5), 32), "b": jnp.asarray(np.zeros(20, np.float32))},
        ],
        "ln": {"scale": jnp.asarray(np.ones(20, np.float32))},
        "head": {"w": _np_normal(rng, (12, 20), 20)},
        "aux": {"w": _np_normal(rng, (20, 16), 20)},
    }
    x = _np_normal(rng, (BATCH, SEQ, 16))
    weights = {
        "layers/0/w": ExpectedWeight((16, 32), (0,)),  # jnp.dot(x, w)
        "layers/1/w": ExpectedWeight((32, 4, 5), (0,)),  # tensordot axes ([2], [0])
        "head/w": ExpectedWeight((12, 20), (1,)),  # h @ w.T
        "aux/w": ExpectedWeight((20, 16), (0,)),  # h @ w[..., :12]
    }
    float_params = ("layers/0/b", "layers/1/b", "ln/scale")
    return ZooCase(
        name="plain_function", framework="function", model=plain_mlp, params=params,
        args=(x,), forward=plain_mlp, weights=weights, float_params=float_params,
        output_shape=(BATCH, SEQ, 12),
        notes="plain_mlp(params, x) -> (batch, seq, 12); params['layers'] is a list.",
    )


# -- i. control_flow: cond, while_loop, checkpoint, an inner jit, custom_vjp / custom_jvp ---


@jax.custom_vjp
def custom_vjp_linear(h, w):
    return h @ w


def _custom_vjp_linear_fwd(h, w):
    return h @ w, (h, w)


def _custom_vjp_linear_bwd(res, g):
    h, w = res
    return g @ w.T, jnp.einsum("...i,...o->io", h, g)


custom_vjp_linear.defvjp(_custom_vjp_linear_fwd, _custom_vjp_linear_bwd)


@jax.custom_jvp
def custom_jvp_tanh_proj(h, w):
    return jnp.tanh(jnp.dot(h, w))


@custom_jvp_tanh_proj.defjvp
def _custom_jvp_tanh_proj_jvp(primals, tangents):
    (h, w), (dh, dw) = primals, tangents
    y = jnp.tanh(jnp.dot(h, w))
    return y, (1 - y**2) * (jnp.dot(dh, w) + jnp.dot(h, dw))


@jax.jit
def jitted_projection(w, h):
    return jnp.einsum("btd,de->bte", h, w)


def control_flow_fn(params, x, flag):
    h = jax.checkpoint(lambda w, h: jnp.tanh(h @ w))(params["ckpt"]["w"], x)
    h = jitted_projection(params["jit"]["w"], h)
    # the weight is used in the true branch only
    h = lax.cond(flag, lambda h: h @ params["cond"]["w"], lambda h: h[..., :20] * 0.5, h)

    def body(carry):
        i, h = carry
        y = jnp.einsum("btd,dnh->btnh", h, params["loop"]["w"])
        return i + 1, jnp.tanh(y.reshape(h.shape))

    _, h = lax.while_loop(lambda carry: carry[0] < 2, body, (0, h))
    h = custom_vjp_linear(h, params["custom_vjp"]["w"])
    h = custom_jvp_tanh_proj(h, params["custom_jvp"]["w"])
    return h * params["out_scale"]


def control_flow() -> ZooCase:
    shapes = {
        "ckpt": (16, 24), "jit": (24, 32), "cond": (32, 20), "loop": (20, 2, 10),
        "custom_vjp": (20, 12), "custom_jvp": (12, 6),
    }
    rng = np.random.default_rng(0)
    params = {name: {"w": _np_normal(rng, shape, shape[0])} for name, shape in shapes.items()}
    params["out_scale"] = jnp.asarray(np.ones(6, np.float32))
    x = _np_normal(rng, (BATCH, SEQ, 16))
    weights = {f"{name}/w": ExpectedWeight(shape, (0,)) for name, shape in shapes.items()}
    return ZooCase(
        name="control_flow", framework="function", model=control_flow_fn, params=params,
        args=(x, jnp.array(True)), forward=control_flow_fn,
        weights=weights, float_params=("out_scale",), output_shape=(BATCH, SEQ, 6),
        notes=(
            "control_flow_fn(params, x, flag) -> (batch, seq, 6); flag a bool scalar "
            "(lax.cond). Weights reach: jax.checkpoint, an inner jax.jit, one cond branch, "
            "a while_loop body (closed over), a custom_vjp and a custom_jvp function."
        ),
    )


# -- j. conv: nn.Conv (dense and depthwise) and a raw lax.conv_general_dilated kernel -------


class ConvNet(nn.Module):
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):  # NHWC
        x = nn.relu(nn.Conv(8, (3, 3), name="conv_in")(x))
        x = nn.Conv(8, (3, 3), feature_group_count=8, use_bias=False, name="depthwise")(x)
        kernel = self.param(
            "raw_kernel", nn.initializers.lecun_normal(in_axis=(1, 2, 3), out_axis=0),
            (16, 8, 3, 2),
        )  # OIHW
        x = lax.conv_general_dilated(
            x, kernel, window_strides=(1, 1), padding="SAME",
            dimension_numbers=("NHWC", "OIHW", "NHWC"),
        )
        x = nn.relu(x + self.param("raw_bias", nn.initializers.zeros_init(), (16,)))
        return nn.Dense(self.num_classes, name="head")(x.mean(axis=(1, 2)))


def conv() -> ZooCase:
    m = ConvNet()
    x = _np_normal(np.random.default_rng(1), (BATCH, 8, 8, 4))
    variables = _linen_init(m, x)
    weights = {
        # nn.Conv kernels are HWIO: contracted H, W, I
        "conv_in/kernel": ExpectedWeight((3, 3, 4, 8), (0, 1, 2), ("conv",)),
        # feature_group_count=8: I per group is 1; still contracted H, W, I
        "depthwise/kernel": ExpectedWeight((3, 3, 1, 8), (0, 1, 2), ("conv",)),
        # OIHW: contracted I, H, W
        "raw_kernel": ExpectedWeight((16, 8, 3, 2), (1, 2, 3), ("conv",)),
        "head/kernel": ExpectedWeight((16, 10), (0,)),
    }
    float_params = ("conv_in/bias", "raw_bias", "head/bias")
    return ZooCase(
        name="conv", framework="linen", model=m, params=variables, args=(x,),
        forward=lambda variables, x: m.apply(variables, x),
        weights=weights, float_params=float_params, output_shape=(BATCH, m.num_classes),
        notes="m.apply(variables, images) -> (batch, 10); images NHWC (2, 8, 8, 4).",
    )


# -- the registry ---------------------------------------------------------------------------

_BUILDERS: dict[str, Callable[[], ZooCase]] = {
    "gpt2": gpt2,
    "llama": llama,
    "gemma_style": gemma_style,
    "maxtext_style": maxtext_style,
    "stock_scan": stock_scan,
    "nnx_raw": nnx_raw,
    "equinox_mlp": equinox_mlp,
    "plain_function": plain_function,
    "control_flow": control_flow,
    "conv": conv,
}
CASES = tuple(_BUILDERS)
# the optional (test-only) package each case needs beyond jax / flax
REQUIRES = {"gpt2": "transformers", "llama": "transformers", "equinox_mlp": "equinox"}


def missing(name: str) -> str | None:
    """The optional package case ``name`` needs and this environment lacks, if any
    (looked up without importing it: see ``_transformers``)."""
    package = REQUIRES.get(name)
    return package if package and importlib.util.find_spec(package) is None else None


@functools.cache
def build(name: str) -> ZooCase:
    """The case ``name``, built once per process (the models are read-only fixtures)."""
    return _BUILDERS[name]()
