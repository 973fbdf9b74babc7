"""Block scaling with a shared power-of-two scale (OCP Microscaling, MX v1.0), written once
against an array namespace ``xp``.

The rule (OCP Microscaling Formats (MX) Specification v1.0, section 6.3), for one block
``V`` of ``block_size`` (32) values and an element format with largest finite value
``max_elem`` (``emax_elem = floor(log2(max_elem))``)::

    shared_exp = floor(log2(max_i |V_i|)) - emax_elem
    X          = 2**shared_exp                     (stored as E8M0: biased code
                                                    shared_exp + 127, 0..254)
    P_i        = round_to_element(V_i / X)         (nearest, ties to even; saturating
                                                    to +-max_elem)
    value_i    = P_i * X

So the largest magnitude of the block lands in the element format's top binade
(``[2**emax_elem, 2**(emax_elem+1))``); values above ``max_elem * X`` (possible when that
binade is only partly finite, e.g. FP4's 6.0) saturate.  Choices made where the rule is
silent, as the OCP authors' reference implementation (``microsoft/microxcaling``):

* an all-zero block (``amax == 0``) and exponents below the scale's range get the
  smallest scale ``2**-127``;
* a block holding NaN or +-inf, or whose exponent exceeds ``127``, gets the NaN scale
  (code 255): every value of the block is NaN.

Exactness.  Division and multiplication by ``X`` are done on the bit pattern
(``ldexp``): XLA:CPU flushes float32 subnormals, so ``V_i * 2**-k`` in floats would
lose subnormal inputs (a block of values near ``2**-130`` has ``X = 2**-127`` and
representable elements) and subnormal results of ``P_i * X``.  Integer exponent
arithmetic gives the same bits on every backend.

``scale_bits`` generalises E8M0 to E<scale_bits>M0 (bias ``2**(scale_bits-1) - 1``,
exponents ``-bias .. bias``, code ``2**scale_bits - 1`` = NaN), as pychop's
``scale_exp_bits``.
"""

from __future__ import annotations

from . import fixedpoint, floatgrid, xla_cpu

__all__ = [
    "E8M0_BIAS",
    "E8M0_NAN",
    "ldexp",
    "floor_log2",
    "shared_exponent_codes",
    "quantize_blocks",
    "dequantize_blocks",
    "fake_quantize_blocks",
]

E8M0_BIAS = 127
E8M0_NAN = 255

# float type -> (width, fraction bits M, bias B)
_PARAMS = {"float32": (32, 23, 127), "float64": (64, 52, 1023)}


def _params(xp, x):
    name = str(x.dtype).removeprefix("torch.")
    if name not in _PARAMS:
        raise TypeError(f"mx_blocks works on float32 / float64 arrays; got {name}. "
                        f"Widen float16 / bfloat16 input to float32 first.")
    W, M, B = _PARAMS[name]
    F, Ity = (xp.float32, xp.int32) if W == 32 else (xp.float64, xp.int64)
    return W, M, B, F, Ity


def _bitcast(xp, x, dtype):
    if getattr(xp, "__name__", "").startswith("jax"):
        from jax import lax
        return lax.bitcast_convert_type(x, dtype)
    return x.view(dtype)


def _normalised(xp, a, M, B, F, Ity):
    """``(e, frac)`` with ``|x| = 2**(e - B) * (1 + frac / 2**M)`` for nonzero magnitude
    bits ``a`` of finite ``x``: ``e`` is the biased exponent field for normal numbers and
    ``floor(log2 a) + 1 - B - M + B`` (<= 0) for subnormals, read exactly from
    ``float(a)`` (``a < 2**M``)."""
    E = a >> M
    fa = _bitcast(xp, xp.astype(a, F), Ity)
    sub = E == 0
    e = xp.where(sub, (fa >> M) + (1 - B - M), E)
    frac = xp.where(sub, fa, a) & ((1 << M) - 1)
    return e, frac


def ldexp(xp, x, k):
    """``x * 2**k`` on the bit pattern, for float32 / float64 ``x`` and an integer array
    (or int) ``k`` broadcastable to it.

    Exact whenever the result is a normal number, zero, or a subnormal whose bits fit;
    a subnormal result with more bits than the subnormal grid holds is truncated toward
    zero; beyond the largest finite value it is ``+-inf``.  Subnormal ``x`` is read
    exactly.  ``+-0``, ``+-inf`` and NaN are returned unchanged.  The same bits on every
    backend (no float arithmetic touches a subnormal).
    """
    W, M, B, F, Ity = _params(xp, x)
    bits = _bitcast(xp, x, Ity)
    a = bits & ((1 << (W - 1)) - 1)
    inf = ((1 << (W - 1 - M)) - 1) << M
    e, frac = _normalised(xp, a, M, B, F, Ity)
    e2 = e + xp.astype(xp.asarray(k), Ity) if not isinstance(k, int) else e + k
    normal = (e2 << M) | frac
    shift = xp.clip(1 - e2, 0, M + 1)
    subnormal = (frac | (1 << M)) >> shift
    out = xp.where(e2 >= 1, normal, subnormal)
    out = xp.where(e2 >= 2 * B + 1, inf, out)
    out = xp.where((a == 0) | (a >= inf), a, out)
    return _bitcast(xp, out | (bits & -(1 << (W - 1))), F)


def floor_log2(xp, a, M, B, F, Ity):
    """``floor(log2(v))`` (int) of the values whose magnitude bits are ``a`` (finite, > 0),
    exact for subnormals too; a very negative number for ``a == 0``."""
    e, _ = _normalised(xp, a, M, B, F, Ity)
    return e - B


def shared_exponent_codes(xp, blocks, emax_elem: int, *, scale_bits: int = 8):
    """The E<scale_bits>M0 code of each block's shared scale (OCP MX v1.0, see the module
    docstring): ``clip(floor(log2(amax)) - emax_elem, -bias, ...) + bias`` as int32 of shape
    ``blocks.shape[:-1] + (1,)``; ``2**scale_bits - 1`` (NaN) for blocks with NaN / +-inf or
    an exponent above ``bias``.

    Args:
      blocks: float32 / float64, the last axis is the block.
      emax_elem: ``floor(log2(max_finite))`` of the element format (>= 0 in MX).

    ``amax`` is an integer reduction of the magnitude bits: exact (NaN's bits lie above
    inf's, subnormals are read as they are) on every backend.
    """
    W, M, B, F, Ity = _params(xp, blocks)
    bias = (1 << (scale_bits - 1)) - 1
    inf = ((1 << (W - 1 - M)) - 1) << M
    abits = xp.max(_bitcast(xp, blocks, Ity) & ((1 << (W - 1)) - 1), axis=-1, keepdims=True)
    if bias <= B and emax_elem >= 0:  # a subnormal amax gets the smallest scale anyway
        exp = (abits >> M) - B - emax_elem
    else:
        exp = floor_log2(xp, abits, M, B, F, Ity) - emax_elem
    code = xp.clip(exp, -bias, bias) + bias
    code = xp.where((abits >= inf) | (exp > bias), 2 * bias + 1, code)
    return xp.astype(code, xp.int32)


def _round_elements(xp, v, element):
    if isinstance(element, fixedpoint.FixedFormat):
        return fixedpoint.round_to_fixed(xp, v, element)
    return floatgrid.round_to_format(xp, v, element, overflow="saturate")


def _element(element):
    if isinstance(element, fixedpoint.FixedFormat):
        return element, -element.fbits
    element = floatgrid.get_format(element)
    return element, element.emin - (element.man_bits if element.subnormals else 0)


def quantize_blocks(xp, blocks, element, *, scale_bits: int = 8):
    """``(P, codes)``: the elements of each block on ``element``'s grid and the blocks'
    scale codes (``shared_exponent_codes``).

    Args:
      blocks: float32 / float64, the last axis is the block.
      element: a ``floatgrid.FloatFormat`` (or a name ``get_format`` knows) or a
        ``fixedpoint.FixedFormat`` (MXINT8: ``FixedFormat(2, 6)``, emax 0).

    Returns:
      ``P`` (``blocks``' shape and dtype; NaN in NaN-scaled blocks), int32 ``codes`` of
      shape ``blocks.shape[:-1] + (1,)``.
    """
    element, _ = _element(element)
    _, _, _, F, Ity = _params(xp, blocks)
    bias = (1 << (scale_bits - 1)) - 1
    codes = shared_exponent_codes(xp, blocks, element.emax, scale_bits=scale_bits)
    scaled = ldexp(xp, blocks, bias - xp.astype(codes, Ity))
    p = _round_elements(xp, scaled, element)
    return xp.where(codes == 2 * bias + 1, xp.nan, p), codes


def dequantize_blocks(xp, elements, codes, *, scale_bits: int = 8):
    """``P * 2**(code - bias)`` (exact, ``ldexp``), NaN where the code is NaN."""
    _, _, _, F, Ity = _params(xp, elements)
    bias = (1 << (scale_bits - 1)) - 1
    out = ldexp(xp, elements, xp.astype(codes, Ity) - bias)
    return xp.where(codes == 2 * bias + 1, xp.nan, out)


def fake_quantize_blocks(xp, blocks, element, *, scale_bits: int = 8):
    """``dequantize_blocks(*quantize_blocks(blocks, element))`` in one pass: the MX value
    of every element (``blocks``' shape and dtype).

    On XLA:CPU a cheaper form runs when no block needs the exact ``ldexp`` (a
    ``lax.cond`` on the smallest shared exponent; the same bits): with ``q`` the
    exponent of the element format's smallest positive value, every block whose shared
    exponent ``k >= 2 - B - q`` has its scaled elements either normal (``bits - (k << M)``
    is exact) or below ``Q/2`` (they round to 0 whatever their low bits), and its
    results ``P * 2**k`` normal (``bits + (k << M)``).
    """
    element, q = _element(element)
    W, M, B, F, Ity = _params(xp, blocks)
    bias = (1 << (scale_bits - 1)) - 1
    codes = shared_exponent_codes(xp, blocks, element.emax, scale_bits=scale_bits)
    k = xp.astype(codes, Ity) - bias
    nan_block = codes == 2 * bias + 1

    def exact():
        return ldexp(xp, _round_elements(xp, ldexp(xp, blocks, -k), element), k)

    def cheap():
        bits = _bitcast(xp, blocks, Ity)
        E = (bits & ((1 << (W - 1)) - 1)) >> M
        shift = k << M
        y = xp.where((E >= 1) & (E > k), bits - shift, bits & -(1 << (W - 1)))
        pb = _bitcast(xp, _round_elements(xp, _bitcast(xp, y, F), element), Ity)
        return _bitcast(xp, xp.where((pb & ((1 << (W - 1)) - 1)) == 0, pb, pb + shift), F)

    if getattr(xp, "__name__", "").startswith("jax") and q >= 2 - B:
        needs_exact = xp.min(xp.where(nan_block, bias, k)) < 2 - B - q
        out = xla_cpu.cond(needs_exact, exact, cheap)
    else:
        out = exact()
    return xp.where(nan_block, xp.nan, out)
