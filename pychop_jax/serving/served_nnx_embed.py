"""``ServedEmbed``: the served ``nnx.Embed`` (a module of its own so that importing
``pychop_jax.serving`` does not import ``flax.nnx``)."""

from __future__ import annotations

from flax import nnx

from .served_embed import embed_lookup

__all__ = ["ServedEmbed"]


class ServedEmbed(nnx.Embed):
    """An ``nnx.Embed`` whose table is a served kernel: ``__call__`` gathers codes
    (``embed_lookup``); ``attend`` is ``nnx.Embed.attend`` (its ``promote_dtype``
    dequantizes the table).  ``serve_model`` sets a served copy's ``Embed`` s to this
    class."""

    def __call__(self, inputs, out_sharding=None):
        if out_sharding is not None:
            raise ValueError("ServedEmbed: out_sharding is not supported by the served "
                             "lookup; shard the output with jax.lax.with_sharding_constraint.")
        return embed_lookup(self.embedding[...], inputs, dtype=self.dtype,
                            num_embeddings=self.num_embeddings)
