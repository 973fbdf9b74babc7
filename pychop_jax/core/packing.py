"""Packing of low-bit codes: two 4-bit or four 2-bit codes per byte.

Codes of a ``b``-bit grid (``b <= 4``) are stored as unsigned offsets ``u = q - qmin``
in ``w``-bit fields, ``w = 2`` for ``b <= 2`` and ``w = 4`` for ``b <= 4``, along the
last axis: byte ``i`` of a row holds codes ``k*i ... k*i + k - 1`` (``k = 8 // w``),
code ``k*i + j`` in bits ``[j*w, (j+1)*w)``.  A last axis that is not a multiple of
``k`` is padded with zero fields; ``unpack`` is told the original length, so packing
round-trips exactly for every shape.

Packing pays off for storage (checkpoints, memory); computation unpacks first.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from .spec import QuantSpec

__all__ = ["field_bits", "pack", "unpack", "packed_shape"]


def field_bits(spec: QuantSpec) -> int | None:
    """Bits per packed field for ``spec`` (2 or 4), or ``None`` when codes stay whole."""
    if spec.bits <= 2:
        return 2
    if spec.bits <= 4:
        return 4
    return None


def packed_shape(shape: tuple[int, ...], spec: QuantSpec) -> tuple[int, ...]:
    """Shape of the packed uint8 array for codes of ``shape`` (rank >= 1)."""
    w = field_bits(spec)
    if w is None:
        raise ValueError(f"{spec.bits}-bit codes are not packed; packing needs bits <= 4.")
    k = 8 // w
    shape = tuple(shape) or (1,)
    return shape[:-1] + (-(-shape[-1] // k),)


def pack(codes, spec: QuantSpec):
    """Pack ``codes`` (integer array of ``spec``'s grid) into uint8 along the last axis.

    A 0-d array is packed as shape ``(1,)``.  Raises ``ValueError`` for bits > 4.
    """
    w = field_bits(spec)
    packed_shape(jnp.shape(codes), spec)  # validates bits
    k = 8 // w
    codes = jnp.asarray(codes)
    if codes.ndim == 0:
        codes = codes.reshape(1)
    n = codes.shape[-1]
    pad = -n % k
    u = (codes.astype(jnp.int32) - spec.qmin).astype(jnp.uint8)
    if pad:
        u = jnp.pad(u, [(0, 0)] * (u.ndim - 1) + [(0, pad)])
    u = u.reshape(u.shape[:-1] + (u.shape[-1] // k, k))
    shifts = jnp.asarray(np.arange(k, dtype=np.uint8) * w)
    return jnp.bitwise_or.reduce(u << shifts, axis=-1).astype(jnp.uint8)


def unpack(packed, spec: QuantSpec, shape: tuple[int, ...]):
    """Inverse of ``pack``: codes of ``shape`` and ``spec.code_dtype``."""
    w = field_bits(spec)
    expected = packed_shape(shape, spec)
    if tuple(jnp.shape(packed)) != expected:
        raise ValueError(
            f"packed codes have shape {tuple(jnp.shape(packed))}, but codes of shape "
            f"{tuple(shape)} pack into {expected}."
        )
    k = 8 // w
    shifts = jnp.asarray(np.arange(k, dtype=np.uint8) * w)
    fields = (jnp.asarray(packed, jnp.uint8)[..., None] >> shifts) & np.uint8(2**w - 1)
    flat = fields.reshape(fields.shape[:-2] + (-1,))
    n = shape[-1] if shape else 1
    codes = flat[..., :n].astype(jnp.int32) + spec.qmin
    return codes.astype(spec.code_dtype).reshape(shape)
