"""Models and helpers shared by the quantize_model and serve_model tests
(tests/flax/test_quantize_model.py, tests/serving/test_serve_model.py): one stock layer
at path ``layer`` (linen ``Single``, nnx ``NnxSingle``), a two-block transformer of
stock layers with a tied embedding (``TinyLM`` / ``NnxTinyLM``), and the hand-made
reference quantizer ``fq``.

``OUTPUT_AXES``: each stock layer's kernel axes that its matmul does not contract,
read off the layer's code -- what a rule's per-output-channel weight spec (an int, or
a ``QuantSpec`` with an axis) means on that layer (``channel_spec``)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

import pychop_jax as pj

KEY = jax.random.key(0)
W8 = pj.QuantSpec(bits=8, symmetric=True, axis=-1)
A8 = pj.QuantSpec(bits=8)


def fq(x, spec):
    """Reference fake quantization: calibrated on ``x`` itself."""
    return pj.fake_quant(x, pj.calibrate(x, spec))

def normal(seed, shape, scale=1.0):
    return scale * jax.random.normal(jax.random.key(seed), shape)

class Single(nn.Module):
    """The layer under test at path ``layer`` (method ``attend`` for Embed.attend)."""

    layer: nn.Module
    method: str = "__call__"

    @nn.compact
    def __call__(self, x):
        return getattr(self.layer, self.method)(x)  # a Module field: the child "layer"


LINEN_LAYERS = {
    "dense": (nn.Dense(6), (3, 5)),
    "dense_general": (nn.DenseGeneral((2, 3), axis=-1), (2, 4, 5)),
    "einsum": (nn.Einsum((5, 2, 3), "btd,dnh->btnh"), (2, 4, 5)),
    "conv": (nn.Conv(4, (3, 3), padding="SAME"), (2, 6, 6, 3)),
}

#: per kind (both skins: the same kernel layouts), the kernel axes the matmul keeps:
#: Dense (in, out); DenseGeneral / LinearGeneral and Einsum "dnh" (d, heads, head_dim)
#: contract d only; Conv (kh, kw, in, out) contracts the window and the input channels
OUTPUT_AXES = {"dense": 1, "dense_general": (1, 2), "einsum": (1, 2), "conv": 3}


def channel_spec(kind, bits=8):
    """``bits``-bit symmetric, one scale per output channel of a ``kind`` kernel."""
    return pj.QuantSpec(bits=bits, symmetric=True, axis=OUTPUT_AXES[kind])


class Block(nn.Module):
    heads: int = 2

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
        h = nn.MultiHeadDotProductAttention(self.heads, dropout_rate=0.1, name="attn")(
            nn.LayerNorm()(x), mask=mask, deterministic=deterministic)
        x = x + h
        h = nn.Dense(4 * x.shape[-1], name="mlp_in")(nn.LayerNorm()(x))
        return x + nn.Dense(x.shape[-1], name="mlp_out")(nn.gelu(h))


class TinyLM(nn.Module):
    vocab: int = 32
    dim: int = 16

    @nn.compact
    def __call__(self, ids, deterministic: bool = True):
        embed = nn.Embed(self.vocab, self.dim, name="embed")
        x = embed(ids)
        for i in range(2):
            x = Block(name=f"blocks_{i}")(x, deterministic)
        return embed.attend(nn.LayerNorm(name="ln_f")(x))


IDS = jax.random.randint(jax.random.key(5), (4, 8), 0, 32)

class NnxSingle(nnx.Module):
    """The layer under test at path ``layer``."""

    def __init__(self, layer, method="__call__"):
        self.layer = layer
        self.method = method

    def __call__(self, x):
        return getattr(self.layer, self.method)(x)


def nnx_layers():
    rngs = nnx.Rngs(0)
    return {
        "dense": (nnx.Linear(5, 6, rngs=rngs), (3, 5)),
        "dense_general": (nnx.LinearGeneral(5, (2, 3), rngs=rngs), (2, 4, 5)),
        "einsum": (nnx.Einsum("btd,dnh->btnh", (5, 2, 3), (2, 3), rngs=rngs), (2, 4, 5)),
        "conv": (nnx.Conv(3, 4, (3, 3), padding="SAME", rngs=rngs), (2, 6, 6, 3)),
    }

class NnxBlock(nnx.Module):
    def __init__(self, dim, rngs):
        self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(2, dim, dropout_rate=0.1, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(dim, rngs=rngs)
        self.mlp_in = nnx.Linear(dim, 4 * dim, rngs=rngs)
        self.mlp_out = nnx.Linear(4 * dim, dim, rngs=rngs)

    def __call__(self, x):
        mask = nnx.make_causal_mask(jnp.ones(x.shape[:2]))
        x = x + self.attn(self.ln1(x), mask=mask)
        return x + self.mlp_out(nnx.gelu(self.mlp_in(self.ln2(x))))


class NnxTinyLM(nnx.Module):
    def __init__(self, rngs, vocab=32, dim=16):
        self.embed = nnx.Embed(vocab, dim, rngs=rngs)
        self.blocks = nnx.List([NnxBlock(dim, rngs) for _ in range(2)])
        self.ln_f = nnx.LayerNorm(dim, rngs=rngs)

    def __call__(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.embed.attend(self.ln_f(x))

@nnx.jit
def nnx_forward(model, ids):
    return model(ids)


class EncDec(nn.Module):
    """A model with methods besides __call__ (the Embed is also the tied projection)."""

    def setup(self):
        self.embed = nn.Embed(32, 16)
        self.enc = nn.Dense(16)
        self.dec = nn.Dense(16)

    def encode(self, ids):
        return self.enc(self.embed(ids))

    def decode(self, h):
        return self.embed.attend(self.dec(h))

    def __call__(self, ids):
        return self.decode(self.encode(ids))


class NnxDrop(nnx.Module):
    """Linear then dropout: its graph changes with the mode (the dropout's
    ``deterministic``)."""

    def __init__(self, rngs):
        self.fc = nnx.Linear(5, 4, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        return self.drop(self.fc(x))
