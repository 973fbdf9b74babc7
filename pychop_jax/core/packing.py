"""Packing of low-bit codes: two 4-bit or four 2-bit codes per byte.

Codes of a ``b``-bit grid (``b <= 4``) are stored as unsigned offsets ``u = q - qmin``
in ``w``-bit fields, ``w = 2`` for ``b <= 2`` and ``w = 4`` for ``b <= 4``, along the
last axis: byte ``i`` of a row holds codes ``k*i ... k*i + k - 1`` (``k = 8 // w``),
code ``k*i + j`` in bits ``[j*w, (j+1)*w)``.  A last axis that is not a multiple of
``k`` is padded with zero fields; ``unpack`` is told the original length, so packing
round-trips exactly for every shape.

Float element grids store their bit patterns (ml_dtypes' layout) instead of
``q - qmin``: fp4 and NF4 (table indices) in 4-bit fields as above; fp6 in 6-bit fields,
four codes in three bytes (code ``4*i + j`` in bits ``[6*j, 6*j + 6)`` of the
little-endian 24-bit word made of bytes ``3*i .. 3*i + 2``; a last axis that is not a
multiple of 4 is padded with zero fields).

Packing pays off for storage (checkpoints, memory); computation unpacks first.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from . import encodings
from .spec import QuantSpec

__all__ = ["field_bits", "pack", "unpack", "packed_shape"]


def field_bits(spec: QuantSpec) -> int | None:
    """Bits per packed field for ``spec`` (2, 4 or 6), or ``None`` when codes stay whole."""
    if spec.bits == 6 and spec.element_format is not None:
        return 6
    if spec.bits <= 2:
        return 2
    if spec.bits <= 4:
        return 4
    return None


def packed_shape(shape: tuple[int, ...], spec: QuantSpec) -> tuple[int, ...]:
    """Shape of the packed uint8 array for codes of ``shape`` (rank >= 1)."""
    w = field_bits(spec)
    if w is None:
        raise ValueError(f"{spec.bits}-bit codes are not packed; packing needs bits <= 4 "
                         "(or an fp6 / fp4 / NF4 element format).")
    shape = tuple(shape) or (1,)
    if w == 6:
        return shape[:-1] + (3 * -(-shape[-1] // 4),)
    k = 8 // w
    return shape[:-1] + (-(-shape[-1] // k),)


def _fields(codes, spec: QuantSpec):
    """The unsigned field value of each code (uint8): ``q - qmin``, or a float
    format's bit pattern."""
    fmt = spec.element_format
    if fmt is None:
        return (codes.astype(jnp.int32) - spec.qmin).astype(jnp.uint8)
    if codes.dtype == jnp.uint8:  # fp6: already bit patterns
        return codes
    return encodings.encode_float_bits(jnp, codes.astype(jnp.float32), fmt)


def _codes(fields, spec: QuantSpec):
    """Inverse of ``_fields``: codes of ``spec.code_dtype``."""
    fmt = spec.element_format
    if fmt is None:
        return (fields.astype(jnp.int32) + spec.qmin).astype(spec.code_dtype)
    if spec.code_dtype == np.uint8:
        return fields.astype(jnp.uint8)
    return encodings.decode_float_bits(jnp, fields, fmt, jnp.float32).astype(spec.code_dtype)


def _pad_last(u, k):
    pad = -u.shape[-1] % k
    return jnp.pad(u, [(0, 0)] * (u.ndim - 1) + [(0, pad)]) if pad else u


def pack(codes, spec: QuantSpec):
    """Pack ``codes`` (of ``spec``'s grid and ``spec.code_dtype``) into uint8 along the
    last axis.

    A 0-d array is packed as shape ``(1,)``.  Raises ``ValueError`` for codes that are
    not packed (``field_bits`` is ``None``).
    """
    w = field_bits(spec)
    packed_shape(jnp.shape(codes), spec)  # validates bits
    codes = jnp.asarray(codes)
    if codes.ndim == 0:
        codes = codes.reshape(1)
    u = _fields(codes, spec)
    if w == 6:
        u = _pad_last(u, 4).astype(jnp.uint32)
        u = u.reshape(u.shape[:-1] + (u.shape[-1] // 4, 4))
        word = u[..., 0] | (u[..., 1] << 6) | (u[..., 2] << 12) | (u[..., 3] << 18)
        b = jnp.stack([word & 0xFF, (word >> 8) & 0xFF, word >> 16], axis=-1)
        return b.reshape(b.shape[:-2] + (-1,)).astype(jnp.uint8)
    k = 8 // w
    u = _pad_last(u, k)
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
    n = shape[-1] if shape else 1
    if w == 6:
        b = jnp.asarray(packed, jnp.uint8).astype(jnp.uint32)
        b = b.reshape(b.shape[:-1] + (b.shape[-1] // 3, 3))
        word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
        fields = (word[..., None] >> jnp.asarray([0, 6, 12, 18], jnp.uint32)) & 0x3F
        flat = fields.reshape(fields.shape[:-2] + (-1,)).astype(jnp.uint8)
        return _codes(flat[..., :n], spec).reshape(shape)
    k = 8 // w
    shifts = jnp.asarray(np.arange(k, dtype=np.uint8) * w)
    fields = (jnp.asarray(packed, jnp.uint8)[..., None] >> shifts) & np.uint8(2**w - 1)
    flat = fields.reshape(fields.shape[:-2] + (-1,))
    return _codes(flat[..., :n], spec).reshape(shape)
