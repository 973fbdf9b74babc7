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

``amax`` arrays come from ``numerics.calibration_range`` (non-finite values left out,
subnormals flushed), in the compute dtype (float32, or float64).
"""

from __future__ import annotations

import numpy as np

from . import floatgrid

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


def floor_log2(xp, a):
    """``floor(log2(a))`` of positive normal floats ``a`` (float32 / float64), exactly,
    as int32: the unbiased exponent field.  (Zero and subnormals give ``-bias``.)"""
    M, B, ity = _F[_name(a)]
    e = (_bits(xp, a, ity) >> M) & ((1 << (63 - M if ity == "int64" else 31 - M)) - 1)
    return xp.astype(e - B, xp.int32)


def pow2(xp, k, like):
    """``2^k`` in ``like``'s float dtype, exactly, for int32 ``k`` in the dtype's normal
    exponent range (built from the exponent bits)."""
    M, B, ity = _F[_name(like)]
    e = xp.astype(k, getattr(xp, ity)) + B
    return _from_bits(xp, e << M, _name(like))


def mx_shared_exponent(xp, amax, emax_elem: int, *, rounding: str = "floor",
                       max_value: float | None = None):
    """The MX shared exponent ``k`` (int32, ``amax``'s shape), see the module docstring.

    Args:
      amax: block maxima ``max|x| >= 0`` (float32 / float64; 0 and subnormals count as 0).
      emax_elem: ``floor(log2(max_value))`` of the element grid (``QuantSpec.emax_elem``).
      rounding: ``'floor'`` (OCP MX v1.0) or ``'ceil'`` (no element clips).
      max_value: the element grid's largest value; needed by ``'ceil'``.

    Returns:
      ``clip(k, kmin, 127)`` (``kmin`` = ``min_scale_exponent``); zero blocks get ``kmin``.
    """
    if rounding not in ("floor", "ceil"):
        raise ValueError("mx_shared_exponent: rounding must be 'floor' or 'ceil'; "
                         f"got {rounding!r}.")
    name = _name(amax)
    M, B, ity = _F[name]
    bits = _bits(xp, amax, ity)
    e = xp.astype((bits >> M) - B, xp.int32)
    k = e - emax_elem
    if rounding == "ceil":
        if max_value is None:
            raise ValueError("mx_shared_exponent(rounding='ceil') needs max_value.")
        # amax and max_value * 2^k share the binade: compare the fraction fields
        frac_max = int(np.array(max_value, name).view(ity)) & ((1 << M) - 1)
        k = k + xp.astype((bits & ((1 << M) - 1)) > frac_max, xp.int32)
    kmin = min_scale_exponent(name)
    zero = (bits >> M) == 0  # 0 (and subnormals, flushed by the callers)
    k = xp.where(zero, xp.asarray(kmin, dtype=xp.int32, **_device(xp, amax)), k)
    return xp.clip(k, kmin, 127)


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
