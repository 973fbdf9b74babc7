"""A served ``Embed`` lookup: a gather of codes, dequantizing only the rows it takes.

A served embedding table is a ``QuantizedArray`` (or the ``weights`` of an
``IntKernel``) of shape ``(vocab, d)``.  Looking up ``ids`` gathers, along axis 0,

* the rows' codes (packed codes too: packing runs along the last axis, ``d``, so a
  packed row is the row's packed bytes, unpacked after the gather);
* the rows' scales and zero points, by the size ``s`` of the state along axis 0:
  ``s = 1`` (per tensor, or per feature column) -- broadcast, nothing to gather;
  ``s = vocab`` (per row, or per row and group of ``g`` features along ``d``) --
  row ``ids``; ``s = vocab / g`` (groups of ``g`` tokens along axis 0) -- row
  ``ids // g`` (the gathered rows then carry one scale per element: the spec's
  ``group_size`` becomes 1);

and dequantizes the ``(n, d)`` gathered codes with the gathered state,
``(q - z) * s`` (``QuantizedArray.dequantize``).  Every output element is the same
``(q - z) * s`` as in the dequantized table, so the lookup equals
``take(dequantize(table), ids, axis=0)`` -- and the QAT model's frozen evaluation,
``take(fake_quant(table), ids, axis=0)`` -- bit for bit, without a ``(vocab, d)``
float array.  Ids outside ``[0, vocab)`` follow ``jnp.take``'s default mode on the
codes (filled), as the float lookup does on the values; don't pass them.

``embed_lookup`` is the function; ``served_nnx_embed.ServedEmbed`` is the
``nnx.Embed`` whose ``__call__`` uses it (``serve_model`` gives a served nnx ``Embed``
that class), and ``serve_model``'s linen interceptor calls it for
``nn.Embed.__call__``.
``Embed.attend`` (a tied output projection, ``query @ table.T``) needs the whole
table: ``embed_attend`` serves an ``IntKernel`` table (a rule with ``weight`` and
``act``) with ``served_dot_general``, so per-row (per-token) scales take the integer
path; a weight-only table keeps the dequantize-in-matmul path.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax.linen import dtypes

from ..core.qarray import QuantizedArray
from .int_matmul import IntKernel
from .served_ops import served_dot_general

__all__ = ["gather_rows", "embed_lookup", "embed_attend"]


def _table(kernel) -> QuantizedArray:
    table = kernel.weights if isinstance(kernel, IntKernel) else kernel
    if not isinstance(table, QuantizedArray) or table.ndim != 2:
        raise TypeError(f"embed_lookup: expected a (vocab, d) QuantizedArray or IntKernel "
                        f"table; got {type(kernel).__name__}.")
    return table


def _take_rows(a, flat_ids, vocab: int, what: str):
    """``a`` (a state array, axis 0 of size 1, ``vocab`` or ``vocab / g``) at the rows
    of ``flat_ids``; ``(array, group)`` with ``group`` the tokens per row of ``a``."""
    s = a.shape[0]
    if s == 1:
        return a, None
    if s == vocab:
        return jnp.take(a, flat_ids, axis=0), 1
    if vocab % s == 0:
        g = vocab // s
        return jnp.take(a, flat_ids // g, axis=0), g
    raise ValueError(f"embed_lookup: the table's {what} has {s} rows for {vocab} tokens; "
                     "expected 1, vocab or vocab / group_size.")


def _zero_by_construction(spec) -> bool:
    """Whether ``spec``'s zero point is 0 by construction (a symmetric integer grid);
    its rows need no gather."""
    return spec.symmetric and not spec.is_float


def gather_rows(kernel, ids) -> QuantizedArray:
    """The rows ``ids`` (any integer shape, flattened) of a served table as a
    ``QuantizedArray`` of shape ``(ids.size, d)``: gathered codes (packed if the table
    is) on the gathered scales / zero points (see the module docstring)."""
    table = _table(kernel)
    vocab, d = table.shape
    flat = jnp.reshape(jnp.asarray(ids), (-1,))
    codes = jnp.take(table.codes, flat, axis=0)
    state = table.state
    scale, g_scale = _take_rows(jnp.asarray(state.scale), flat, vocab, "scale")
    zero_point = jnp.asarray(state.zero_point)
    if _zero_by_construction(state.spec) and zero_point.shape == jnp.shape(state.scale):
        zero_point = jnp.zeros(scale.shape, zero_point.dtype)  # 0 by construction
    else:
        zero_point, _ = _take_rows(zero_point, flat, vocab, "zero point")
    spec = state.spec
    if g_scale is not None and g_scale > 1:  # groups of tokens: one scale per gathered row
        spec = dataclasses.replace(spec, group_size=1)
    rows = state.replace(scale=scale, zero_point=zero_point)
    rows = dataclasses.replace(rows, spec=spec)
    return QuantizedArray(codes, rows, shape=(int(flat.shape[0]), d), packed=table.packed)


def embed_lookup(kernel, ids, *, dtype=None, num_embeddings: int | None = None):
    """``Embed.__call__`` on a served table: the dequantized rows ``ids``, shape
    ``ids.shape + (d,)``, in ``dtype`` (``None``: the dequantized float32, as Flax's
    ``promote_dtype(..., inexact=False)`` keeps it).

    Raises:
      ValueError: non-integer ``ids`` (as ``Embed`` does).
    """
    ids = jnp.asarray(ids)
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError("Input type must be an integer or unsigned integer.")
    table = _table(kernel)
    d = table.shape[1]
    if (num_embeddings or table.shape[0]) == 1:  # Embed broadcasts its single row
        ids = jnp.zeros_like(ids)
    rows = gather_rows(table, ids).dequantize()
    (rows,) = dtypes.promote_dtype(rows, dtype=dtype, inexact=False)
    return jnp.reshape(rows, ids.shape + (d,))


def embed_attend(kernel: IntKernel, query, *, dtype=None):
    """``Embed.attend`` on a served ``IntKernel`` table: ``query @ table.T`` by
    ``served_ops.served_dot_general`` (int8 x int8 -> int32 when the table's scales are
    constant along ``d``: per row or per tensor; else the float path), shape
    ``query.shape[:-1] + (vocab,)``.  The query is promoted as ``Embed.attend`` promotes
    it with the float32 table (to ``dtype`` if given)."""
    query = jnp.asarray(query)
    dtype = dtype or jnp.promote_types(query.dtype, jnp.float32)
    (query,) = dtypes.promote_dtype(query, dtype=dtype)
    dn = (((query.ndim - 1,), (1,)), ((), ()))
    return served_dot_general(query, kernel, dn, preferred_element_type=dtype)
