"""Integer matrix products: int8 codes multiplied with int32 accumulation.

For ``x = s_x (q_x - z_x)`` and ``w = s_w (q_w - z_w)`` with scales and zero points
constant along the contracted axis ``k`` (per-tensor, or per-channel on a free axis)::

    sum_k x w = s_x s_w [ sum_k q_x q_w  -  z_w sum_k q_x  -  z_x sum_k q_w
                          + K z_x z_w ]

The bracket is computed exactly in int32 (``lax.dot_general(...,
preferred_element_type=int32)`` for the first term; the others are rank-1
corrections that vanish for symmetric operands), then converted to float and
multiplied by ``s_x s_w`` once.  Unsigned (asymmetric) 8-bit codes are moved to int8
first, ``q - 128`` with ``z - 128``, because XLA:CPU's fast integer kernels are
int8 x int8 (uint8 x int8 measured ~50x slower).

Every operand may be a ``QuantizedArray`` or a float array; floats are quantized
on the fly, with a fixed ``state`` (static ranges, e.g. from an observer) or by
calibrating each call (dynamic ranges).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
from jax import lax

from .qarray import QuantizedArray
from .spec import QuantSpec
from .state import QuantState

__all__ = [
    "DEFAULT_INPUT_SPEC",
    "DEFAULT_WEIGHT_SPEC",
    "int_dot_general",
    "make_int_dot_general",
    "promote_dtype",
]

#: activations: 8-bit asymmetric, one scale per tensor (dynamic unless a state is given)
DEFAULT_INPUT_SPEC = QuantSpec(bits=8, symmetric=False)
#: weights: 8-bit symmetric per output channel (the last axis of a Dense kernel)
DEFAULT_WEIGHT_SPEC = QuantSpec(bits=8, symmetric=True, axis=-1)


def _as_quantized(x, spec: QuantSpec, state: QuantState | None, name: str) -> QuantizedArray:
    if isinstance(x, QuantizedArray):
        return x
    if state is not None:
        return QuantizedArray.quantize(x, state.spec, state=state, pack=False)
    return QuantizedArray.quantize(x, spec, pack=False)


def _int8_codes(qa: QuantizedArray, name: str):
    """(int8 codes, int32 zero point, was_symmetric) of a <= 8-bit operand."""
    spec = qa.spec
    if spec.bits > 8:
        raise ValueError(
            f"int_dot_general: the {name} has {spec.bits}-bit codes; the integer path "
            "takes at most 8 bits (int32 accumulation of 16-bit products can overflow). "
            "Dequantize it and use a float matmul instead."
        )
    codes = qa.unpacked_codes()
    zp = qa.state.zero_point.astype(jnp.int32)
    if codes.dtype == jnp.uint8:  # u - 128 in two's complement is u ^ 0x80
        codes = lax.bitcast_convert_type(codes ^ np.uint8(0x80), jnp.int8)
        zp = zp - 128
    return codes, zp, spec.symmetric


def _check_contracting(qa: QuantizedArray, axes, name: str) -> None:
    shape = qa.state.scale.shape
    if len(shape) != qa.ndim or any(shape[a] != 1 for a in axes):
        raise ValueError(
            f"int_dot_general: the {name}'s scale has shape {tuple(shape)}, which varies "
            f"along the contracted axes {tuple(axes)}; scales must be per-tensor or "
            "per-channel on a non-contracted axis to factor out of the sum. "
            "Quantize the operand with axis set to a free axis."
        )


def int_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                    *, lhs_spec: QuantSpec = DEFAULT_INPUT_SPEC,
                    rhs_spec: QuantSpec = DEFAULT_WEIGHT_SPEC,
                    lhs_state: QuantState | None = None, rhs_state: QuantState | None = None,
                    **unused):
    """``lax.dot_general`` of quantized operands with integer arithmetic.

    Args:
      lhs, rhs: ``QuantizedArray`` or float arrays (quantized here with
        ``*_state`` if given, else calibrated with ``*_spec``).
      dimension_numbers: as for ``lax.dot_general``.
      precision: ignored (integer products are exact); accepted so that this
        function can be passed as ``dot_general=`` to ``flax.linen.Dense`` /
        ``nnx.Linear``.
      preferred_element_type: float dtype of the result (default float32).

    Returns:
      floats ``s_l s_r (sum q_l q_r - corrections)`` in the ``dot_general`` layout.

    Raises:
      ValueError: codes wider than 8 bits, or scales that vary along a contracted
        axis.
    """
    del precision, unused
    (lc, rc), (lb, rb) = dimension_numbers
    ql = _as_quantized(lhs, lhs_spec, lhs_state, "lhs")
    qr = _as_quantized(rhs, rhs_spec, rhs_state, "rhs")
    _check_contracting(ql, lc, "lhs")
    _check_contracting(qr, rc, "rhs")
    cl, zl, sym_l = _int8_codes(ql, "lhs")
    cr, zr, sym_r = _int8_codes(qr, "rhs")

    def dot(a, b, dtype=jnp.int32):
        # zero points, scales and code sums (keepdims) are size 1 along contracted
        # axes, so their dot_general is the broadcastable product; batch axes must
        # match, so broadcast those to the operands' sizes first
        a = _broadcast_axes(a, lb, ql.shape)
        b = _broadcast_axes(b, rb, qr.shape)
        return lax.dot_general(a, b, dimension_numbers, preferred_element_type=dtype)

    acc, rhs_sums = _product_and_rhs_sums(cl, cr, dimension_numbers, with_sums=not sym_l)
    if not sym_r:
        acc = acc - dot(jnp.sum(cl, axis=lc, keepdims=True, dtype=jnp.int32), zr)
    if not sym_l:
        ones = jnp.ones(tuple(1 if d in rc else n for d, n in enumerate(qr.shape)), jnp.int32)
        acc = acc - dot(zl, ones) * rhs_sums
    if not (sym_l or sym_r):
        k = int(np.prod([ql.shape[a] for a in lc]))
        acc = acc + k * dot(zl, zr)
    out_dtype = preferred_element_type or jnp.float32
    if not jnp.issubdtype(out_dtype, jnp.floating):
        out_dtype = jnp.float32
    scale = dot(ql.state.scale, qr.state.scale, ql.state.scale.dtype)
    return (acc.astype(scale.dtype) * scale).astype(out_dtype)


def _product_and_rhs_sums(cl, cr, dimension_numbers, with_sums: bool, rows: int = 8):
    """``dot_general(cl, cr)`` in int32 and, if asked, ``sum_k cr`` in the output
    layout (size 1 along the lhs free axes).

    The sums come from the same product: ``rows`` rows of ones appended to ``cl``
    along its last free axis yield ``sum_k cr`` as extra output rows.  XLA:CPU's
    column reduction of int8 codes, or a separate one-row product, costs several
    times the whole int8 GEMM at serving sizes (measured 17 ms vs 4 ms for
    256x4096x4096); the extra rows cost ~3 %.
    """
    (lc, rc), (lb, rb) = dimension_numbers
    product = functools.partial(lax.dot_general, dimension_numbers=dimension_numbers,
                                preferred_element_type=jnp.int32)
    free = [d for d in range(cl.ndim) if d not in lc and d not in lb]
    if not with_sums:
        return product(cl, cr), None
    if not free:  # no row to append to: reduce directly
        sums = jnp.sum(cr, axis=rc, keepdims=True, dtype=jnp.int32)
        keep = jnp.ones((1,) * cl.ndim, jnp.int32)  # every lhs axis is contracted or batch
        return product(cl, cr), lax.dot_general(
            _broadcast_axes(keep, lb, cl.shape), _broadcast_axes(sums, rb, cr.shape),
            dimension_numbers, preferred_element_type=jnp.int32)
    f = free[-1]
    n = cl.shape[f]
    ones = jnp.ones(cl.shape[:f] + (rows,) + cl.shape[f + 1:], cl.dtype)
    out = product(jnp.concatenate([cl, ones], axis=f), cr)
    pos = len(lb) + free.index(f)  # where the lhs axis f lands in the output
    return lax.slice_in_dim(out, 0, n, axis=pos), lax.slice_in_dim(out, n, n + 1, axis=pos)


def _broadcast_axes(a, axes, full_shape):
    """``a`` broadcast to ``full_shape`` along ``axes`` (other axes unchanged)."""
    if not axes:
        return a
    shape = tuple(full_shape[d] if d in axes else n for d, n in enumerate(a.shape))
    return jnp.broadcast_to(a, shape)


def make_int_dot_general(*, lhs_spec: QuantSpec = DEFAULT_INPUT_SPEC,
                         rhs_spec: QuantSpec = DEFAULT_WEIGHT_SPEC,
                         lhs_state: QuantState | None = None):
    """An ``int_dot_general`` with its quantizers fixed, for ``dot_general=`` of Flax
    layers (``nn.Dense(n, dot_general=make_int_dot_general(), promote_dtype=promote_dtype)``).
    """
    return functools.partial(int_dot_general, lhs_spec=lhs_spec, rhs_spec=rhs_spec,
                             lhs_state=lhs_state)


def promote_dtype(*args, dtype=None, inexact=True):
    """Flax's ``promote_dtype`` that passes ``QuantizedArray`` operands through.

    Pass it as ``promote_dtype=`` to ``flax.linen.Dense`` (called with the operands
    as arguments) or ``nnx.Linear`` (called with one tuple of operands) whose kernel
    is a ``QuantizedArray``; the float operands are promoted as usual.
    """
    from flax.linen import dtypes

    as_tuple = len(args) == 1 and isinstance(args[0], tuple)
    operands = args[0] if as_tuple else args
    floats = [a for a in operands if a is not None and not isinstance(a, QuantizedArray)]
    promoted = iter(dtypes.promote_dtype(*floats, dtype=dtype, inexact=inexact))
    out = [a if a is None or isinstance(a, QuantizedArray) else next(promoted) for a in operands]
    return tuple(out) if as_tuple else out
