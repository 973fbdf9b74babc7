"""The bit patterns of float element codes, written once against an array namespace ``xp``.

A code of a float element format of at most 8 bits (fp8 / fp6 / fp4; ``floatgrid``'s
``FloatFormat``) is stored as one uint8 holding the format's encoding in ml_dtypes' layout:
sign, exponent, fraction in the low ``1 + e + m`` bits.  With ``F`` the compute dtype
(float32: ``M = 23``, ``B = 127``; float64: ``52``, ``1023``) and ``v`` a finite value on
the format's grid, ``E`` its unbiased exponent and ``f`` its top ``m`` fraction bits::

    normal     (E >= emin):  bits = ((E + bias) << m) | f
    subnormal  (E <  emin):  bits = v / min_subnormal            (the significand, shifted)
    sign:                    bit e + m

and back, with ``Ef`` the exponent field and ``f`` the fraction field::

    Ef > 0:   v = (2^m + f) * 2^(Ef - bias - m)
    Ef == 0:  v = f * 2^(emin - m)

All of it is integer arithmetic on the bits (and products of small integers and powers
of two, exact), so every backend gives the same bits.  ``codes_as_bits`` and
``bits_as_codes`` reinterpret codes held in the format's own dtype (ml_dtypes' float8 /
float4 types) as these bytes and back.
"""

from __future__ import annotations

from . import blockscale, floatgrid
from .spec import QuantSpec

__all__ = ["encode_float_bits", "decode_float_bits", "codes_as_bits", "bits_as_codes"]


def _is_jax(xp) -> bool:
    return xp.__name__.startswith("jax")


def _const(xp, value, dtype, like):
    """A 0-d array of ``dtype`` on ``like``'s device."""
    device = {} if _is_jax(xp) else {"device": like.device}
    return xp.asarray(value, dtype=dtype, **device)


def _int_bits(xp, v):
    ity = xp.int64 if v.dtype == xp.float64 else xp.int32
    if _is_jax(xp):
        from jax import lax

        return lax.bitcast_convert_type(v, ity)
    return v.view(ity)


def encode_float_bits(xp, v, fmt):
    """uint8 encodings (ml_dtypes' bit layout, ``fmt``'s sign / exponent / fraction in
    the low ``1 + e + m`` bits) of values ``v`` that lie on ``fmt``'s grid (finite,
    float32 / float64; e.g. ``floatgrid.round_to_format``'s output).  For formats of
    at most 8 bits; exact integer arithmetic on the bits of ``v``.

    A normal value ``2^E * 1.f`` is ``((E + bias) << m) | f``; a subnormal one is
    ``v / min_subnormal``; the sign goes to bit ``e + m``."""
    fmt = floatgrid.get_format(fmt)
    wide = v.dtype == xp.float64
    M, B = (52, 1023) if wide else (23, 127)
    e_bits, m = fmt.exp_bits, fmt.man_bits
    b = _int_bits(xp, v)
    a = b & ((1 << (63 if wide else 31)) - 1)
    sign = xp.astype(b < 0, xp.int32)
    E = xp.astype(a >> M, xp.int32) - B  # unbiased exponent (-B for zero)
    frac = xp.astype((a >> (M - m)) & ((1 << m) - 1), xp.int32)
    normal = ((E + fmt.bias) << m) | frac
    sig = (a & ((1 << M) - 1)) | (1 << M)  # significand with the implicit bit
    shift = xp.clip(M + fmt.emin - m - E, 0, M + 1)
    sub = xp.astype(sig >> xp.astype(shift, sig.dtype), xp.int32)
    mag = xp.where(E >= fmt.emin, normal, xp.where(a == 0, xp.zeros_like(sub), sub))
    return xp.astype(mag | (sign << (e_bits + m)), xp.uint8)


def decode_float_bits(xp, codes, fmt, F):
    """Values (dtype ``F``) of uint8 encodings of ``fmt`` (inverse of
    ``encode_float_bits``; formats without inf / NaN codes)."""
    fmt = floatgrid.get_format(fmt)
    e_bits, m = fmt.exp_bits, fmt.man_bits
    c = xp.astype(codes, xp.int32)
    Ef = (c >> m) & ((1 << e_bits) - 1)
    f = xp.astype(c & ((1 << m) - 1), F)
    like = f
    one = _const(xp, 1.0, F, like)
    # 2^(Ef - bias) * (1 + f / 2^m) for Ef > 0, f * 2^(emin - m) for Ef == 0: products
    # of small integers and powers of two, exact
    step = xp.where(Ef > 0, blockscale.pow2(xp, Ef - fmt.bias - m, like),
                    _const(xp, 2.0 ** (fmt.emin - m), F, like))
    lead = xp.where(Ef > 0, _const(xp, float(1 << m), F, like), _const(xp, 0.0, F, like))
    mag = (lead + f) * step
    return xp.where(((c >> (e_bits + m)) & 1) == 1, -one, one) * mag


def codes_as_bits(xp, q, spec: QuantSpec):
    """Codes of a float element format as uint8 holding the format's bit pattern
    (ml_dtypes' layout in the low ``spec.bits`` bits: sign, exponent, fraction), the
    form ``numerics.quantize`` gives where the namespace has no code dtype; uint8 codes
    (fp6, NF4) as they are.  ``numerics.dequantize`` takes either form."""
    if q.dtype == xp.uint8:
        return q
    if _is_jax(xp):
        from jax import lax

        width = xp.uint4 if spec.bits == 4 else xp.uint8
        return xp.astype(lax.bitcast_convert_type(q, width), xp.uint8)
    if spec.bits == 4:
        raise TypeError(f"codes_as_bits: {spec.dtype} codes of this namespace have no "
                        "bit view; quantize to uint8 codes instead.")
    return q.view(xp.uint8)


def bits_as_codes(xp, u, spec: QuantSpec, dtype):
    """uint8 encodings as codes of ``dtype`` (the code dtype of ``spec``'s format in
    ``xp``'s terms), a reinterpretation of the bytes: the inverse of ``codes_as_bits``."""
    if _is_jax(xp):
        from jax import lax

        if spec.bits == 4:  # bitcasts need equal widths
            u = xp.astype(u, xp.uint4)
        return lax.bitcast_convert_type(u, dtype)
    return u.view(dtype)
