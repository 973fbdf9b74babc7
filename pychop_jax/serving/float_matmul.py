"""Matmuls of float-format operands: fp8 codes with float32 accumulation, MX x MX blocks.

``float_dot_general(lhs, rhs, dimension_numbers)`` is ``lax.dot_general`` of two quantized
operands (``QuantizedArray`` s of float element formats, or floats quantized here):

* **fp8 x fp8, scales outside the sum** (per tensor, or per channel on free axes; float32
  or E8M0 scales)::

      out = dot_general(q_l, q_r, preferred_element_type=float32) * (s_l (x) s_r)

  The products of two fp8 values are exact in float32 (4 + 4 significant bits); XLA:CPU
  converts the codes to float32 and runs a float32 GEMM, accelerators with fp8 units
  multiply the codes directly.  The scale product is formed in the output layout
  (one product per output element).
* **block scales along the contraction** (MX x MX: ``group_size`` on the contracted axis
  of both, the same block length): ``jax.nn.scaled_matmul`` where the platform has
  it (cuDNN on NVIDIA GPUs; ``use_scaled_matmul=None`` asks for it on GPU only: JAX 0.10
  has no CPU lowering), otherwise emulated by its definition -- both operands
  dequantized (``q * s`` is exact for power-of-two scales) and one float32
  ``dot_general`` at ``Precision.HIGHEST``.
* anything else (NF4, fp4 / fp6 with a per-channel scale, mixed formats): the same
  dequantize-then-float32 path.

Results agree with ``dot_general(dequantize(lhs), dequantize(rhs))`` up to float32
summation order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from ..core.qarray import QuantizedArray
from ..core.spec import QuantSpec

__all__ = ["float_dot_general", "FP8_INPUT_SPEC", "FP8_WEIGHT_SPEC"]

#: how float ``lhs`` operands are quantized by default: fp8 e4m3, per tensor
FP8_INPUT_SPEC = QuantSpec(dtype="float8_e4m3fn")
#: how float ``rhs`` operands are quantized by default: fp8 e4m3, per output channel
FP8_WEIGHT_SPEC = QuantSpec(dtype="float8_e4m3fn", axis=-1)

_FP8 = ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")


def _quantized(x, spec: QuantSpec, name: str) -> QuantizedArray:
    if isinstance(x, QuantizedArray):
        return x
    if not spec.is_float:
        raise ValueError(f"float_dot_general: {name}_spec must be a float element format; "
                         f"got {spec}. Use int_dot_general for integer grids.")
    return QuantizedArray.quantize(x, spec, pack=False)


def _scale_outside(qa: QuantizedArray, contracted) -> bool:
    """Whether the scale is constant along the contracted axes (and single-level)."""
    shape = qa.state.scale.shape
    return (not qa.spec.two_level and len(shape) == qa.ndim
            and all(shape[a] == 1 for a in contracted))


def _blocked_on(qa: QuantizedArray, contracted) -> int | None:
    """The block length when ``qa`` is grouped along its single contracted axis."""
    spec = qa.spec
    if spec.group_size is None or len(contracted) != 1 or spec.two_level:
        return None
    return spec.group_size if spec.resolve_axis(qa.ndim) == contracted[0] else None


def _scale_product(sl, sr, dimension_numbers, lshape, rshape):
    """``s_l (x) s_r`` in the output layout: the dot_general of the keepdims scales
    (size 1 along the contracted axes), batch axes broadcast to the operands' sizes."""
    (_, _), (lb, rb) = dimension_numbers
    sl = jnp.broadcast_to(sl, tuple(lshape[d] if d in lb else n for d, n in enumerate(sl.shape)))
    sr = jnp.broadcast_to(sr, tuple(rshape[d] if d in rb else n for d, n in enumerate(sr.shape)))
    return lax.dot_general(sl, sr, dimension_numbers, precision=lax.Precision.HIGHEST,
                           preferred_element_type=jnp.float32)


def _scaled_matmul_2d(ql: QuantizedArray, qr: QuantizedArray, dimension_numbers):
    """``jax.nn.scaled_matmul`` for lhs ``(..., K)`` x rhs ``(K, N)`` (Dense layout)."""
    lhs_codes, rhs_codes = ql.unpacked_codes(), qr.unpacked_codes()
    k = lhs_codes.shape[-1]
    a = lhs_codes.reshape(1, -1, k)
    b = jnp.moveaxis(rhs_codes, 0, -1).reshape(1, -1, k)
    sa = ql.compute_state().scale.reshape(1, a.shape[1], -1).astype(ql.spec.storage_scale_dtype)
    sb = jnp.moveaxis(qr.compute_state().scale, 0, -1).reshape(1, b.shape[1], -1)
    sb = sb.astype(qr.spec.storage_scale_dtype)
    out = jax.nn.scaled_matmul(a, b, sa, sb, preferred_element_type=jnp.float32)
    return out.reshape(lhs_codes.shape[:-1] + rhs_codes.shape[1:])


def float_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                      *, lhs_spec: QuantSpec = FP8_INPUT_SPEC,
                      rhs_spec: QuantSpec = FP8_WEIGHT_SPEC,
                      use_scaled_matmul: bool | None = None, out_sharding=None):
    """``lax.dot_general`` of float-format operands (see the module docstring).

    Args:
      lhs: a ``QuantizedArray`` of a float element format, or a float array
        (quantized here with ``lhs_spec``: fp8 e4m3 per tensor by default).
      rhs: the same with ``rhs_spec`` (fp8 e4m3 per output channel by default).
      dimension_numbers: as for ``lax.dot_general``.
      precision: ignored (the float paths run at ``Precision.HIGHEST``); accepted so
        that this function can be a Flax layer's ``dot_general``.
      preferred_element_type: float dtype of the result (default float32).
      use_scaled_matmul: for MX x MX operands, call ``jax.nn.scaled_matmul`` (``True``),
        emulate it (``False``), or decide by platform (``None``: GPU only).
      out_sharding: a sharding constraint on the result, or ``None``.

    Raises:
      ValueError: a float operand whose spec is not a float element format.
    """
    del precision
    (lc, rc), (lb, rb) = dimension_numbers
    ql, qr = _quantized(lhs, lhs_spec, "lhs"), _quantized(rhs, rhs_spec, "rhs")
    fp8 = ql.spec.dtype in _FP8 and qr.spec.dtype in _FP8
    if fp8 and _scale_outside(ql, lc) and _scale_outside(qr, rc):
        acc = lax.dot_general(ql.unpacked_codes(), qr.unpacked_codes(), dimension_numbers,
                              preferred_element_type=jnp.float32)
        sl, sr = ql.compute_state().scale, qr.compute_state().scale
        out = acc * _scale_product(sl.astype(jnp.float32), sr.astype(jnp.float32),
                                   dimension_numbers, ql.shape, qr.shape)
    else:
        g = _blocked_on(ql, lc)
        mx = (g is not None and g == _blocked_on(qr, rc) and not (lb or rb)
              and ql.spec.scale_dtype == qr.spec.scale_dtype == "float8_e8m0fnu"
              and tuple(lc) == (ql.ndim - 1,) and tuple(rc) == (0,) and qr.ndim == 2)
        if use_scaled_matmul is None:
            use_scaled_matmul = jax.default_backend() == "gpu"
        if mx and use_scaled_matmul:
            out = _scaled_matmul_2d(ql, qr, dimension_numbers)
        else:
            out = lax.dot_general(ql.dequantize(jnp.float32), qr.dequantize(jnp.float32),
                                  dimension_numbers, precision=lax.Precision.HIGHEST,
                                  preferred_element_type=jnp.float32)
    out_dtype = preferred_element_type or jnp.float32
    if not jnp.issubdtype(out_dtype, jnp.floating):
        out_dtype = jnp.float32
    out = out.astype(out_dtype)
    if out_sharding is not None:
        out = lax.with_sharding_constraint(out, out_sharding)
    return out
