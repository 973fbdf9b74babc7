"""Block scales of the microscaling formats, written once against an array namespace ``xp``.

The scale of a block (per tensor, channel or group: any ``amax`` array) for the element grid
of a ``QuantSpec`` (``max_value`` = the element format's largest finite value, 1 for NF4,
``qmax`` for an integer grid):

* **E8M0** (``scale_dtype="float8_e8m0fnu"``; OCP Microscaling Formats (MX) v1.0, section
  6.3, the conversion that computes the shared exponent)::

      e     = floor(log2(amax))                        (exact: amax's exponent field)
      k     = e - emax_elem                            (emax_elem = floor(log2(max_value)))
      'ceil': k + 1  where amax > max_value * 2^k      (so amax / 2^k <= max_value: no clip)
      scale = 2^clip(k, kmin, 127)

  ``kmin = -127`` (E8M0's smallest, 2^-127) for float64 compute and ``-126`` for float32,
  where 2^-127 is subnormal and XLA:CPU would flush it to 0.  An all-zero block (and any
  ``amax`` below the compute dtype's smallest normal, which is flushed to 0) gets
  ``2^kmin``.  Under ``'floor'`` (the OCP rule) ``amax / scale`` lies in
  ``[2^emax_elem, 2^(emax_elem+1))``, which can exceed ``max_value``: those elements clip
  to ``+-max_value`` (MXFP4: a block whose ``amax`` is 7 gets scale 1 and 7 clips to 6).
  ``'ceil'`` is the smallest power of two that avoids the clip (it costs up to one
  binade of resolution).  Everything is integer arithmetic on the exponent bits, so all
  backends agree.

* **Two-level** (``scale_dtype`` a float8 format ``S``; NVFP4 with ``S = e4m3``, group
  16; NVIDIA's recipe)::

      tensor_scale = amax_tensor * fl(1 / (max(S) * max_value))     (float32, > 0)
      u            = amax_block * fl(1 / max_value)
      block_scale  = max(round_S(u / tensor_scale), min_positive(S))  (on S's grid)
      scale used   = max(block_scale * tensor_scale, tiny)

  ``round_S`` is ``floatgrid.round_to_format`` (nearest, saturating), and ``u /
  tensor_scale`` is ``numerics.to_grid``'s ``u * (1 / tensor_scale)``.  A block scale
  that would round to 0 (a block far below the tensor's maximum, or all zeros) is S's
  smallest positive value instead, so every scale is positive.
  ``amax_tensor = 0`` gives ``tensor_scale = 1`` (as ``numerics.qparams_from_range``).

* **MX values without a state** (``mx_fake_quant``, what ``pychop.mx_quantize`` runs): the
  E8M0 exponent of each block, clipped to E8M0's range and NaN for a block holding NaN /
  +-inf, applied by exact ``ldexp`` on the bits::

      k     = clip(floor(log2(amax)) - emax_elem, -127, 127)
      value = ldexp(round_elem(ldexp(x, -k)), k)

``amax`` arrays come from ``numerics.calibration_range`` (non-finite values left out,
subnormals flushed), in the compute dtype (float32, or float64).
"""

from __future__ import annotations

import numpy as np

from . import fixedpoint, floatgrid, xla_cpu

__all__ = [
    "floor_log2",
    "pow2",
    "mx_shared_exponent",
    "e8m0_scale",
    "e8m0_encode",
    "e8m0_decode",
    "tensor_scale",
    "two_level_scales",
    "min_scale_exponent",
    "ldexp",
    "mx_block_exponents",
    "mx_fake_quant_blocks",
    "mx_fake_quant",
]

# (fraction bits, bias, int type name) of the compute dtypes
_F = {"float32": (23, 127, "int32"), "float64": (52, 1023, "int64")}


def _name(x) -> str:
    return str(x.dtype).removeprefix("torch.")


def _bits(xp, x, int_name):
    if xp.__name__.startswith("jax"):
        from jax import lax

        return lax.bitcast_convert_type(x, getattr(xp, int_name))
    return x.view(getattr(xp, int_name))


def _from_bits(xp, b, float_name):
    if xp.__name__.startswith("jax"):
        from jax import lax

        return lax.bitcast_convert_type(b, getattr(xp, float_name))
    return b.view(getattr(xp, float_name))


def min_scale_exponent(dtype_name: str) -> int:
    """The smallest E8M0 exponent used in a compute dtype: -127 for float64, -126 for
    float32 (2^-127 is a float32 subnormal)."""
    return -127 if dtype_name == "float64" else -126


def _int_type(xp, x):
    name = _name(x)
    if name not in _F:
        raise TypeError(f"blockscale works on float32 / float64 arrays; got {name}. "
                        f"Widen float16 / bfloat16 input to float32 first.")
    M, B, ity = _F[name]
    return M, B, getattr(xp, ity), getattr(xp, name)


def _normalised(xp, a, M, B, F, Ity):
    """``(e, frac)`` with ``|x| = 2**(e - B) * (1 + frac / 2**M)`` for nonzero magnitude
    bits ``a`` of finite ``x``: ``e`` is the biased exponent field for normal numbers and
    ``floor(log2 a) + 1 - M`` (<= 0) for subnormals, read exactly from ``float(a)``
    (``a < 2**M`` is an integer a float holds exactly, and normal)."""
    E = a >> M
    fa = _bits(xp, xp.astype(a, F), _name(a).replace("uint", "int"))
    sub = E == 0
    e = xp.where(sub, (fa >> M) + (1 - B - M), E)
    frac = xp.where(sub, fa, a) & ((1 << M) - 1)
    return e, frac


def floor_log2(xp, a):
    """``floor(log2(|a|))`` of nonzero finite floats ``a`` (float32 / float64) as int32,
    exactly, subnormals included (read from the bits, no float arithmetic: XLA:CPU
    would flush them).  Zero gives a number below every subnormal's exponent."""
    M, B, Ity, F = _int_type(xp, a)
    W = 32 if F == xp.float32 else 64
    mag = _bits(xp, a, _name(a).replace("float", "int")) & ((1 << (W - 1)) - 1)
    e, _ = _normalised(xp, mag, M, B, F, Ity)
    return xp.astype(e - B, xp.int32)


def ldexp(xp, x, k):
    """``x * 2**k`` on the bit pattern, for float32 / float64 ``x`` and an integer array
    (or int) ``k`` broadcastable to it: the one power-of-two scaling of the MX rule.

    Exact whenever the result is a normal number, zero, or a subnormal whose bits fit;
    a subnormal result with more bits than the subnormal grid holds is truncated toward
    zero; beyond the largest finite value it is ``+-inf``.  Subnormal ``x`` is read
    exactly.  ``+-0``, ``+-inf`` and NaN are returned unchanged.  The same bits on every
    backend (no float arithmetic touches a subnormal).
    """
    M, B, Ity, F = _int_type(xp, x)
    W = 32 if F == xp.float32 else 64
    bits = _bits(xp, x, _name(x).replace("float", "int"))
    a = bits & ((1 << (W - 1)) - 1)
    inf = ((1 << (W - 1 - M)) - 1) << M
    e, frac = _normalised(xp, a, M, B, F, Ity)
    e2 = e + k if isinstance(k, int) else e + xp.astype(xp.asarray(k), Ity)
    normal = (e2 << M) | frac
    shift = xp.clip(1 - e2, 0, M + 1)
    subnormal = (frac | (1 << M)) >> shift
    out = xp.where(e2 >= 1, normal, subnormal)
    out = xp.where(e2 >= 2 * B + 1, inf, out)
    out = xp.where((a == 0) | (a >= inf), a, out)
    return _from_bits(xp, out | (bits & -(1 << (W - 1))), _name(x))


def pow2(xp, k, like):
    """``2^k`` in ``like``'s float dtype, exactly, for int32 ``k`` in the dtype's normal
    exponent range (built from the exponent bits)."""
    M, B, ity = _F[_name(like)]
    e = xp.astype(k, getattr(xp, ity)) + B
    return _from_bits(xp, e << M, _name(like))


def mx_shared_exponent(xp, amax, emax_elem: int, *, rounding: str = "floor",
                       max_value: float | None = None, kmin: int | None = None,
                       kmax: int = 127):
    """The MX shared exponent ``k`` (int32, ``amax``'s shape), see the module docstring.

    Args:
      amax: block maxima ``max|x| >= 0`` (float32 / float64, finite; subnormals are read
        exactly, zero gets ``kmin``).
      emax_elem: ``floor(log2(max_value))`` of the element grid (``QuantSpec.emax_elem``).
      rounding: ``'floor'`` (OCP MX v1.0) or ``'ceil'`` (no element clips).
      max_value: the element grid's largest value; needed by ``'ceil'``.
      kmin, kmax: the scale's exponent range (default ``min_scale_exponent`` of
        ``amax``'s dtype and E8M0's 127).

    Returns:
      ``clip(floor(log2(amax)) - emax_elem (+1 for 'ceil' where needed), kmin, kmax)``.
    """
    if rounding not in ("floor", "ceil"):
        raise ValueError("mx_shared_exponent: rounding must be 'floor' or 'ceil'; "
                         f"got {rounding!r}.")
    name = _name(amax)
    M, B, Ity, F = _int_type(xp, amax)
    k = floor_log2(xp, amax) - emax_elem
    if rounding == "ceil":
        if max_value is None:
            raise ValueError("mx_shared_exponent(rounding='ceil') needs max_value.")
        # amax and max_value * 2^k share the binade: compare the fraction fields
        frac_max = int(np.array(max_value, name).view(_F[name][2])) & ((1 << M) - 1)
        mag = _bits(xp, amax, _F[name][2]) & ((1 << (31 if M == 23 else 63)) - 1)
        _, frac = _normalised(xp, mag, M, B, F, Ity)
        k = k + xp.astype(frac > frac_max, xp.int32)
    if kmin is None:
        kmin = min_scale_exponent(name)
    return xp.clip(k, kmin, kmax)


def _device(xp, like) -> dict:
    return {} if xp.__name__.startswith("jax") else {"device": like.device}


def e8m0_scale(xp, amax, emax_elem: int, *, rounding: str = "floor",
               max_value: float | None = None):
    """``2^mx_shared_exponent(amax, ...)`` in ``amax``'s dtype: the power-of-two scale of
    each block (OCP MX v1.0 with ``rounding='floor'``)."""
    return pow2(xp, mx_shared_exponent(xp, amax, emax_elem, rounding=rounding,
                                       max_value=max_value), amax)


def e8m0_encode(xp, scale):
    """uint8 E8M0 codes (biased exponent ``k + 127``) of power-of-two scales."""
    k = floor_log2(xp, scale)
    return xp.astype(k + 127, xp.uint8)


def e8m0_decode(xp, codes, like):
    """Power-of-two scales in ``like``'s dtype from uint8 E8M0 codes (0..254; 255 is NaN
    in E8M0 and is not produced here).  Code 0 (2^-127) needs float64."""
    return pow2(xp, xp.astype(codes, xp.int32) - 127, like)


def tensor_scale(xp, amax, spec):
    """NVFP4's per-tensor scale: ``max(amax) * fl(1 / (max(S) * max_value))`` over all
    of ``amax`` (block maxima; keepdims), 1 when that is 0, at least the smallest
    normal."""
    F = amax.dtype
    fi = np.finfo(np.float64 if _name(amax) == "float64" else np.float32)
    a = xp.max(amax, axis=tuple(range(amax.ndim)), keepdims=True) if amax.ndim else amax
    one = xp.asarray(1.0, dtype=F, **_device(xp, amax))
    denom = xp.asarray(spec.scale_format.max_finite * spec.max_value, dtype=F,
                       **_device(xp, amax))
    s = a * (one / denom)
    tiny = xp.asarray(fi.tiny, dtype=F, **_device(xp, amax))
    return xp.where(a == xp.zeros_like(a), one, xp.maximum(s, tiny))


def two_level_scales(xp, amax, spec, to_grid):
    """``(block_scale, tensor_scale)`` of a two-level spec (module docstring).

    ``to_grid(xp, u, s)`` is ``numerics.to_grid`` (``u / s`` in the contract's order;
    passed in because ``numerics`` imports this module).  ``block_scale`` lies on the
    grid of ``spec.scale_dtype`` (returned in the compute dtype), ``tensor_scale`` is
    all-ones-shaped.
    """
    F = amax.dtype
    t = tensor_scale(xp, amax, spec)
    one = xp.asarray(1.0, dtype=F, **_device(xp, amax))
    u = amax * (one / xp.asarray(spec.max_value, dtype=F, **_device(xp, amax)))
    fmt = spec.scale_format
    s = floatgrid.round_to_format(xp, to_grid(xp, u, t), fmt, rounding="nearest_even",
                                  overflow="saturate")
    smallest = xp.asarray(fmt.min_subnormal, dtype=F, **_device(xp, amax))
    return xp.maximum(s, smallest), t


# -- MX values: the OCP rule on blocks, exact ---------------------------------------------
def _scale_range(scale_bits: int):
    bias = (1 << (scale_bits - 1)) - 1
    return -bias, bias


def mx_block_exponents(xp, blocks, emax_elem: int, *, scale_bits: int = 8):
    """``(k, nan_block)`` of each block (the last axis; int32 and bool of shape
    ``blocks.shape[:-1] + (1,)``): the OCP MX v1.0 shared exponent
    ``clip(floor(log2(amax)) - emax_elem, -bias, bias)`` (``bias = 2**(scale_bits-1) - 1``:
    E8M0's -127..127), and whether the scale is NaN (E8M0 code 255): the block holds
    NaN / +-inf, or its exponent exceeds ``bias`` (the OCP rule's "X = NaN"; as the
    authors' reference, ``microsoft/microxcaling``).

    ``amax`` is an integer max of the magnitude bits: exact (NaN's bits lie above
    inf's, subnormals are read as they are) on every backend.
    """
    M, B, Ity, F = _int_type(xp, blocks)
    W = 32 if F == xp.float32 else 64
    kmin, kmax = _scale_range(scale_bits)
    inf = ((1 << (W - 1 - M)) - 1) << M
    abits = xp.max(_bits(xp, blocks, _F[_name(blocks)][2]) & ((1 << (W - 1)) - 1), axis=-1,
                   keepdims=True)
    finite = xp.where(abits >= inf, xp.zeros_like(abits), abits)
    amax = _from_bits(xp, finite, _name(blocks))
    k = floor_log2(xp, amax) - emax_elem
    nan_block = (abits >= inf) | (k > kmax)
    return xp.clip(k, kmin, kmax), nan_block


def mx_fake_quant_blocks(xp, blocks, element, emax_elem: int, *, scale_bits: int = 8,
                         round_elements):
    """The MX value of every element of ``blocks`` (float32 / float64, the last axis is
    the block; same shape and dtype)::

        k, nan = mx_block_exponents(blocks)
        value  = ldexp(round_elements(ldexp(V, -k)), k)      (NaN where nan)

    ``round_elements(xp, v)`` rounds onto the element grid (nearest-even, saturating);
    ``element`` is its ``FloatFormat`` / ``FixedFormat`` (for the cheap branch below).
    Both scalings are exact (``ldexp``): subnormal inputs and results keep their value
    on every backend.

    On XLA:CPU a cheaper form runs when no block needs the exact ``ldexp`` (a
    ``lax.cond`` on the smallest shared exponent; the same bits): with ``q`` the
    exponent of the element format's smallest positive value, every block whose shared
    exponent ``k >= 2 - B - q`` has its scaled elements either normal (``bits - (k << M)``
    is exact) or below ``Q/2`` (they round to 0 whatever their low bits), and its
    results ``P * 2**k`` normal (``bits + (k << M)``).
    """
    M, B, Ity, F = _int_type(xp, blocks)
    W = 32 if F == xp.float32 else 64
    iname = _F[_name(blocks)][2]
    k, nan_block = mx_block_exponents(xp, blocks, emax_elem, scale_bits=scale_bits)
    k = xp.astype(k, Ity)
    q = (-element.fbits if hasattr(element, "fbits")
         else element.emin - (element.man_bits if element.subnormals else 0))

    def exact():
        return ldexp(xp, round_elements(xp, ldexp(xp, blocks, -k)), k)

    def cheap():
        bits = _bits(xp, blocks, iname)
        E = (bits & ((1 << (W - 1)) - 1)) >> M
        shift = k << M
        y = xp.where((E >= 1) & (E > k), bits - shift, bits & -(1 << (W - 1)))
        pb = _bits(xp, round_elements(xp, _from_bits(xp, y, _name(blocks))), iname)
        out = xp.where((pb & ((1 << (W - 1)) - 1)) == 0, pb, pb + shift)
        return _from_bits(xp, out, _name(blocks))

    if xp.__name__.startswith("jax") and q >= 2 - B:
        needs_exact = xp.min(xp.where(nan_block, xp.full_like(k, B), k)) < 2 - B - q
        out = xla_cpu.cond(needs_exact, exact, cheap)
    else:
        out = exact()
    return xp.where(nan_block, xp.full_like(out, float("nan")), out)


def mx_fake_quant(xp, x, spec, *, element=None, scale_bits: int = 8):
    """The OCP MX v1.0 value of every element of ``x`` for an E8M0 ``spec`` (a
    ``QuantSpec``; blocks of ``spec.group_size`` along ``spec.axis``; ``x``'s shape,
    float32 / float64), in one pass without a state: ``mx_fake_quant_blocks``::

        k     = clip(floor(log2(amax)) - emax_elem, -127, 127)   (exact, subnormals too)
        value = round_elem(x * 2^-k) * 2^k                        (exact ldexp on bits)

    and a block holding NaN / +-inf, or whose exponent exceeds 127, is all NaN (E8M0's
    NaN scale; ``microsoft/microxcaling``).  This is the rule ``pychop.mx_quantize`` runs.
    It differs from ``numerics.calibrate`` + ``numerics.fake_quant`` (whose state keeps
    the scale as a float) only where that path flushes: float32 blocks below ``2^-126``
    (there ``kmin = -126``, subnormal inputs and results are 0) and non-finite input
    (left out of ``amax``, NaN -> 0, +-inf saturate).

    Args:
      spec: ``scale_dtype="float8_e8m0fnu"`` with ``group_size``: the element grid
        (float format, or the integer grid ``[qmin, qmax]`` with ``emax_elem =
        floor(log2(qmax))``, MXINT8's ``[-127, 127] * 2^-6``), ``axis``, ``group_size``.
      element: optional ``floatgrid.FloatFormat`` / ``fixedpoint.FixedFormat`` that
        replaces the spec's element grid (pychop's custom formats; its two's complement
        MXINT, ``[-128, 127] * 2^-6``); ``emax_elem`` is then its ``emax``.
      scale_bits: exponent bits of the scale (E8M0: 8; ``2**(scale_bits-1) - 1`` bounds
        ``|k|``).
    """
    if spec.scale_dtype != "float8_e8m0fnu" or spec.group_size is None:
        raise ValueError("blockscale.mx_fake_quant needs an MX spec: scale_dtype="
                         "'float8_e8m0fnu' and a group_size (e.g. pychop_jax.formats.MXFP4).")
    if spec.dtype == "nf4" and element is None:
        raise ValueError("blockscale.mx_fake_quant: nf4 has no power-of-two grid; use an "
                         "MX float or integer element format.")
    element, emax, round_elements = _mx_elements(spec, element)
    shape = tuple(x.shape)
    spec.scale_shape(shape)  # validates the axis and the divisibility by group_size
    axis = spec.resolve_axis(len(shape))
    moved = xp.moveaxis(x, axis, -1)  # blocks along the last axis (a no-op when it is)
    g = spec.group_size
    blocks = xp.reshape(moved, moved.shape[:-1] + (moved.shape[-1] // g, g))
    y = mx_fake_quant_blocks(xp, blocks, element, emax, scale_bits=scale_bits,
                             round_elements=round_elements)
    return xp.moveaxis(xp.reshape(y, moved.shape), -1, axis)


def _mx_elements(spec, element):
    """``(element, emax_elem, round_elements)`` of ``mx_fake_quant``'s element grid."""
    if isinstance(element, fixedpoint.FixedFormat):
        return element, element.emax, lambda xp, v: fixedpoint.round_to_fixed(xp, v, element)
    if element is None and spec.dtype is None:  # the integer grid [qmin, qmax]
        lo, hi = float(spec.qmin), float(spec.qmax)

        def round_integers(xp, v):
            bounds = (xp.asarray(b, dtype=v.dtype, **_device(xp, v)) for b in (lo, hi))
            return xp.clip(xp.round(v), *bounds)
        # the integers as a fixed-point format (for mx_fake_quant_blocks' cheap path)
        return fixedpoint.FixedFormat(spec.emax_elem + 2, 0), spec.emax_elem, round_integers
    if element is None:
        element, emax = spec.element_format, spec.emax_elem
    else:
        element = floatgrid.get_format(element)
        emax = element.emax
    return element, emax, lambda xp, v: floatgrid.round_to_format(xp, v, element,
                                                                   overflow="saturate")
