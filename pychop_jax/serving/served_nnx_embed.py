"""``ServedEmbed``: the served ``nnx.Embed`` (a module of its own so that importing
``pychop_jax.serving`` does not import ``flax.nnx``)."""

from __future__ import annotations

import jax
from flax import nnx

from .int_matmul import IntKernel
from .served_embed import embed_attend, embed_lookup

__all__ = ["ServedEmbed"]


class ServedEmbed(nnx.Embed):
    """An ``nnx.Embed`` whose table is a served kernel: ``__call__`` gathers codes
    (``embed_lookup``); ``attend`` serves an ``IntKernel`` table with ``embed_attend``
    (integer path), other tables with ``nnx.Embed.attend`` (its ``promote_dtype``
    dequantizes the table).  ``serve_model`` sets a served copy's ``Embed`` s to this
    class."""

    def __call__(self, inputs, out_sharding=None):
        if out_sharding is not None:
            raise ValueError("ServedEmbed: out_sharding is not supported by the served "
                             "lookup; shard the output with jax.lax.with_sharding_constraint.")
        return embed_lookup(self.embedding[...], inputs, dtype=self.dtype,
                            num_embeddings=self.num_embeddings)

    def attend(self, query, out_sharding=None):
        table = self.embedding[...]
        if not isinstance(table, IntKernel):
            return super().attend(query, out_sharding=out_sharding)
        y = embed_attend(table, query, dtype=self.dtype)
        if out_sharding is not None:
            y = jax.lax.with_sharding_constraint(y, out_sharding)
        return y
