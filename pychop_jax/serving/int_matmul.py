"""Integer matrix products: int8 codes multiplied with int32 accumulation.

For ``x = s_x (q_x - z_x)`` and ``w = s_w (q_w - z_w)`` with scales and zero points
constant along the contracted axis ``k`` (per-tensor, or per-channel on a free axis)::

    sum_k x w = s_x s_w [ sum_k q_x q_w  -  z_w sum_k q_x  -  z_x sum_k q_w
                          + K z_x z_w ]

The bracket is computed exactly in int32 (``lax.dot_general(...,
preferred_element_type=int32)`` for the first term; the others are rank-1
corrections that vanish for symmetric operands), then converted to float and
multiplied by ``s_x s_w`` once.  Exact while ``K * max|q_x - z_x| * max|q_w - z_w|``
fits in int32 (``K <= 65793`` for 8-bit inputs and 8-bit symmetric weights); longer
contractions are rejected with a ``ValueError`` rather than left to wrap around.

Unsigned (asymmetric) 8-bit codes are moved to int8 first, ``q - 128`` with
``z - 128``, because XLA:CPU's fast integer kernels are int8 x int8 (uint8 x int8 is
far slower, ``docs/performance.md``).

Every operand may be a ``QuantizedArray`` or a float array; floats are quantized
on the fly, with a fixed ``state`` (static ranges, e.g. from an observer) or by
calibrating each call (dynamic ranges).  A stock layer's kernel is a ``QuantizedKernel``:
its quantized weights together with the static quantizer of the layer's input, so
that a stock ``flax`` ``Dense`` / ``Conv`` whose op is ``int_dot_general`` /
``int_conv_general_dilated`` finds both in its ``kernel`` parameter.

Convolutions follow the same algebra over each window.  The input is padded
explicitly with the code of 0.0 (its zero point), so every window holds
``K = kh * kw * c_in`` codes and the corrections stay per output channel.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ..core import numerics, xla_cpu
from ..core.qarray import QuantizedArray
from ..core.spec import QuantSpec
from ..core.state import QuantState
from .float_matmul import float_dot_general

__all__ = [
    "DEFAULT_INPUT_SPEC",
    "DEFAULT_WEIGHT_SPEC",
    "QuantizedKernel",
    "KernelWrapper",
    "float_kernel_input",
    "is_float_kernel",
    "is_integer_format",
    "int_dot_general",
    "int_conv_general_dilated",
    "make_int_dot_general",
    "promote_dtype",
]

#: activations: 8-bit asymmetric, one scale per tensor (dynamic unless a state is given)
DEFAULT_INPUT_SPEC = QuantSpec(bits=8, symmetric=False)
#: weights: 8-bit symmetric per output channel (the last axis of a Dense kernel)
DEFAULT_WEIGHT_SPEC = QuantSpec(bits=8, symmetric=True, axis=-1)


class KernelWrapper:
    """What a served kernel parameter that wraps a quantized array (the field named
    by ``wrapped``) shows Flax: that array's ``shape`` and ``dtype``, ``pack`` /
    ``unpack`` of it, and ``k[...]`` (itself), which is how ``nnx`` layers read a
    parameter."""

    wrapped: ClassVar[str]

    @property
    def shape(self):
        return getattr(self, self.wrapped).shape

    @property
    def dtype(self):
        return getattr(self, self.wrapped).dtype

    def pack(self):
        """The wrapped array packed for storage (2- and 4-bit codes); ``unpack()``
        before serving: Flax checks a kernel parameter's shape against the layer's."""
        return dataclasses.replace(self, **{self.wrapped: getattr(self, self.wrapped).pack()})

    def unpack(self):
        return dataclasses.replace(self, **{self.wrapped: getattr(self, self.wrapped).unpack()})

    def __getitem__(self, index):
        if index is Ellipsis:
            return self
        raise TypeError(f"{type(self).__name__} supports only [...] indexing.")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedKernel(KernelWrapper):
    """A kernel for a stock layer's quantized op: quantized weights (integer, fp8, MX,
    NVFP4 or NF4 codes with their scales) and the static quantizer of the layer's input.
    (``IntKernel`` is its deprecated name.)

    Pass it as the ``kernel`` parameter of a ``flax.linen.Dense`` / ``Conv`` (or
    ``nnx.Linear`` / ``Conv``) whose op is ``int_dot_general`` /
    ``int_conv_general_dilated`` and whose ``promote_dtype`` is this module's.
    ``input_state=None`` quantizes the input with a range calibrated per call under
    ``input_spec`` (default: the op's ``lhs_spec``).
    """

    weights: QuantizedArray
    input_state: QuantState | None = None
    input_spec: QuantSpec | None = dataclasses.field(default=None, metadata=dict(static=True))

    wrapped = "weights"

    @property
    def input_quant_spec(self) -> QuantSpec | None:
        """The spec the input is quantized with: the stored state's, else
        ``input_spec`` (``None``: the op's ``lhs_spec``)."""
        return self.input_state.spec if self.input_state is not None else self.input_spec


def __getattr__(name):
    if name == "IntKernel":
        import warnings

        warnings.warn("pychop_jax.IntKernel is now QuantizedKernel (it holds float-format "
                      "codes too); IntKernel will be removed.", DeprecationWarning, stacklevel=2)
        return QuantizedKernel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_float_kernel(rhs) -> bool:
    """Whether ``rhs`` is a ``QuantizedKernel`` of float element or block-scale weights (fp8,
    MX, NVFP4, NF4, ...), which the integer ops serve on the float path
    (``float_kernel_input``)."""
    return isinstance(rhs, QuantizedKernel) and not is_integer_format(rhs.weights.spec)


def is_integer_format(spec: QuantSpec) -> bool:
    """Integer codes with float32 scales (or float16 / bfloat16 ones, widened): what the
    integer path multiplies."""
    return not (spec.is_float or spec.block_scaled)


def float_kernel_input(lhs, kernel: QuantizedKernel):
    """The input of a float-format ``QuantizedKernel``'s layer: a ``QuantizedArray`` under its
    stored quantizer (``input_state``; calibrated per call under ``input_spec`` when it
    has none), or ``lhs`` itself when the layer's input stays float."""
    if kernel.input_state is not None:
        state = kernel.input_state
        return QuantizedArray.quantize(lhs, state.spec, state=state, pack=False)
    if kernel.input_spec is not None:
        return QuantizedArray.quantize(lhs, kernel.input_spec, pack=False)
    return lhs


def _float_kernel_dot_general(lhs, kernel: QuantizedKernel, dimension_numbers,
                              preferred_element_type, out_sharding):
    """``int_dot_general`` of a float-format ``QuantizedKernel``: ``float_dot_general`` of the
    quantized input and the weights' codes (fp8 codes with float32 accumulation, MX
    blocks, ...), or, for a float input, the dequantized weights in one float32
    ``dot_general``."""
    x = float_kernel_input(lhs, kernel)
    if isinstance(x, QuantizedArray):
        return float_dot_general(x, kernel.weights, dimension_numbers,
                                 preferred_element_type=preferred_element_type,
                                 out_sharding=out_sharding)
    out = lax.dot_general(jnp.asarray(x, jnp.float32), kernel.weights.dequantize(jnp.float32),
                          dimension_numbers, precision=lax.Precision.HIGHEST,
                          preferred_element_type=jnp.float32)
    return _as_output(out, preferred_element_type, out_sharding)


def _operands(lhs, rhs, lhs_spec, rhs_spec, lhs_state, rhs_state):
    """Both operands as ``QuantizedArray``s (a ``QuantizedKernel`` brings the lhs state)."""
    if isinstance(rhs, QuantizedKernel):
        lhs_state = rhs.input_state if lhs_state is None else lhs_state
        lhs_spec = rhs.input_spec or lhs_spec
        rhs = rhs.weights
    operands = (_as_quantized(lhs, lhs_spec, lhs_state), _as_quantized(rhs, rhs_spec, rhs_state))
    for qa, name in zip(operands, ("lhs", "rhs"), strict=True):
        _require_integer_format(qa, name)
    return operands


def _require_integer_format(qa: QuantizedArray, name: str, op: str = "the integer matmul"):
    spec = qa.spec
    if not is_integer_format(spec):
        raise ValueError(
            f"{op}: the {name} is a {spec.dtype or spec.scale_dtype} format; the integer path "
            "takes integer codes with float32 scales. Use pychop_jax.float_dot_general "
            "(fp8 codes, MX blocks) or dequantize it.")


def _as_quantized(x, spec: QuantSpec, state: QuantState | None) -> QuantizedArray:
    if isinstance(x, QuantizedArray):
        return x
    if state is not None:
        return QuantizedArray.quantize(x, state.spec, state=state, pack=False)
    return QuantizedArray.quantize(x, spec, pack=False)


def _int8_codes(qa: QuantizedArray, name: str, op: str = "int_dot_general"):
    """(int8 codes, int32 zero point, was_symmetric) of a <= 8-bit operand."""
    spec = qa.spec
    _require_integer_format(qa, name, op)
    if spec.bits > 8:
        raise ValueError(
            f"{op}: the {name} has {spec.bits}-bit codes; the integer path "
            "takes at most 8 bits (int32 accumulation of 16-bit products can overflow). "
            "Dequantize it and use a float matmul instead."
        )
    codes = qa.unpacked_codes()
    zp = numerics.integer_zero_point(jnp, jnp.asarray(qa.state.zero_point), spec)
    if codes.dtype == jnp.uint8:  # u - 128 in two's complement is u ^ 0x80
        codes = lax.bitcast_convert_type(codes ^ np.uint8(0x80), jnp.int8)
        zp = zp - 128
    return codes, zp, spec.symmetric


def _max_step(spec: QuantSpec) -> int:
    """The largest ``|q - z|`` of a spec's codes: ``2^b - 1`` on an affine grid (a zero
    point at one end), ``2^(b-1)`` on a symmetric one."""
    return 2 ** (spec.bits - 1) if spec.symmetric else 2**spec.bits - 1


def _check_accumulator(ql: QuantizedArray, qr: QuantizedArray, k: int, op: str) -> None:
    """Reject a contraction whose bracket ``sum_k (q_l - z_l)(q_r - z_r)`` could leave
    int32: ``|bracket| <= K * max|q_l - z_l| * max|q_r - z_r|``.  Below that bound every
    term of the int32 computation fits too (the code products, the code sums and the
    zero-point corrections are each bounded by it), so the result is exact; above it
    a long contraction over extreme codes would wrap around silently.  8-bit inputs
    against 8-bit symmetric weights allow ``K <= 65793``."""
    worst = k * _max_step(ql.spec) * _max_step(qr.spec)
    if worst > np.iinfo(np.int32).max:
        raise ValueError(
            f"{op}: contracting K={k} codes of up to |q - z| = {_max_step(ql.spec)} "
            f"(lhs) and {_max_step(qr.spec)} (rhs) can exceed the int32 accumulator "
            f"(K * {_max_step(ql.spec)} * {_max_step(qr.spec)} = {worst} > 2^31 - 1). "
            "Split the contraction into shorter ones, quantize symmetrically or with "
            "fewer bits, or use a float matmul."
        )


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
                    out_sharding=None):
    """``lax.dot_general`` of quantized operands with integer arithmetic.

    Args:
      lhs: a ``QuantizedArray`` or a float array (quantized here with ``lhs_state``
        if given, else calibrated with ``lhs_spec``).
      rhs: the same with ``rhs_state`` / ``rhs_spec``, or a ``QuantizedKernel``,
        whose ``input_state`` then quantizes ``lhs``.
      dimension_numbers: as for ``lax.dot_general``.
      precision: ignored (integer products are exact); accepted so that this
        function can be passed as ``dot_general=`` to ``flax.linen.Dense`` /
        ``nnx.Linear``.
      preferred_element_type: float dtype of the result (default float32).
      out_sharding: as for ``lax.dot_general`` (``nnx.Linear`` passes it): a
        sharding constraint on the result, or ``None``.

    Returns:
      floats ``s_l s_r (sum q_l q_r - corrections)`` in the ``dot_general`` layout.
      Unknown keywords raise ``TypeError`` (a misspelled ``lhs_state=`` must not be
      dropped silently).  An ``QuantizedKernel`` of float / block-scale weights (fp8, MX,
      NVFP4, NF4: ``to_served`` of a ``weight_format`` layer) is served on the float
      path instead: ``float_dot_general`` of its input, quantized by the kernel's
      input quantizer, and its codes; or the dequantized weights against a float
      input when the layer has no input quantizer.

    Raises:
      ValueError: codes wider than 8 bits, scales that vary along a contracted axis,
        a contraction too long for the int32 accumulator (``_check_accumulator``), or
        a float-format ``QuantizedArray`` operand (not wrapped in a ``QuantizedKernel``).
    """
    del precision
    if is_float_kernel(rhs):
        return _float_kernel_dot_general(lhs, rhs, dimension_numbers, preferred_element_type,
                                         out_sharding)
    (lc, rc), (lb, rb) = dimension_numbers
    ql, qr = _operands(lhs, rhs, lhs_spec, rhs_spec, lhs_state, rhs_state)
    _check_contracting(ql, lc, "lhs")
    _check_contracting(qr, rc, "rhs")
    cl, zl, sym_l = _int8_codes(ql, "lhs")
    cr, zr, sym_r = _int8_codes(qr, "rhs")
    _check_accumulator(ql, qr, int(np.prod([ql.shape[a] for a in lc])), "int_dot_general")

    def dot(a, b, dtype=jnp.int32):
        # zero points, scales and code sums (keepdims) are size 1 along contracted
        # axes, so their dot_general is the broadcastable product; batch axes must
        # match, so broadcast those to the operands' sizes first
        a = _broadcast_axes(a, lb, ql.shape)
        b = _broadcast_axes(b, rb, qr.shape)
        return lax.dot_general(a, b, dimension_numbers, preferred_element_type=dtype,
                               precision=lax.Precision.HIGHEST)

    acc, rhs_sums = _product_and_rhs_sums(cl, cr, dimension_numbers, with_sums=not sym_l)
    if not sym_r:
        acc = acc - dot(jnp.sum(cl, axis=lc, keepdims=True, dtype=jnp.int32), zr)
    if not sym_l:
        ones = jnp.ones(tuple(1 if d in rc else n for d, n in enumerate(qr.shape)), jnp.int32)
        acc = acc - dot(zl, ones) * rhs_sums
    if not (sym_l or sym_r):
        acc = acc + int(np.prod([ql.shape[a] for a in lc])) * dot(zl, zr)
    # exact: one product per output element (HIGHEST keeps TF32 / bf16 passes away)
    sl, sr = ql.compute_state().scale, qr.compute_state().scale  # float16 scales widened
    scale = dot(sl, sr, sl.dtype)
    return _rescale(acc, scale, preferred_element_type, out_sharding)


def _rescale(acc, scale, preferred_element_type, out_sharding):
    """``acc * scale`` in float, cast to the requested float type (default float32),
    constrained to ``out_sharding`` when one is given."""
    return _as_output(acc.astype(scale.dtype) * scale, preferred_element_type, out_sharding)


def _as_output(out, preferred_element_type, out_sharding):
    """``out`` cast to the requested float type (default float32), constrained to
    ``out_sharding`` when one is given."""
    out_dtype = preferred_element_type or jnp.float32
    if not jnp.issubdtype(out_dtype, jnp.floating):
        out_dtype = jnp.float32
    out = out.astype(out_dtype)
    if out_sharding is not None:
        out = jax.lax.with_sharding_constraint(out, out_sharding)
    return out


def _product_and_rhs_sums(cl, cr, dimension_numbers, with_sums: bool, rows: int = 8):
    """``dot_general(cl, cr)`` in int32 and, if asked, ``sum_k cr`` in the output
    layout (size 1 along the lhs free axes).

    The sums come from the same product: ``rows`` rows of ones appended to ``cl``
    along its last free axis yield ``sum_k cr`` as extra output rows.  XLA:CPU's
    column reduction of int8 codes, or a separate one-row product, costs several
    times the whole int8 GEMM at serving sizes; the extra rows cost little
    (``docs/performance.md``).
    """
    (lc, rc), (lb, rb) = dimension_numbers
    product = functools.partial(_int_product, dimension_numbers=dimension_numbers)
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


def _int_product(cl, cr, dimension_numbers):
    """``dot_general(cl, cr)`` of int8 codes in int32: a matrix product (one contracted
    axis, no batch axes, a 2-D rhs) through ``xla_cpu.int8_matmul``, fast at few rows
    (XLA's own int8 dot converts the whole rhs first at one row); else XLA's."""
    (lc, rc), (lb, _) = dimension_numbers
    if len(lc) == 1 and not lb and cr.ndim == 2:
        xm = jnp.moveaxis(cl, lc[0], -1)
        y = xla_cpu.int8_matmul(jnp.reshape(xm, (-1, xm.shape[-1])), cr, b_k_axis=rc[0])
        return jnp.reshape(y, xm.shape[:-1] + y.shape[-1:])
    return lax.dot_general(cl, cr, dimension_numbers, preferred_element_type=jnp.int32)


def _broadcast_axes(a, axes, full_shape):
    """``a`` broadcast to ``full_shape`` along ``axes`` (other axes unchanged)."""
    if not axes:
        return a
    shape = tuple(full_shape[d] if d in axes else n for d, n in enumerate(a.shape))
    return jnp.broadcast_to(a, shape)


def _scale_axes_must_be(qa: QuantizedArray, allowed: tuple[int, ...], name: str, what: str):
    shape = qa.state.scale.shape
    if len(shape) != qa.ndim or any(n != 1 for d, n in enumerate(shape) if d not in allowed):
        raise ValueError(
            f"int_conv_general_dilated: the {name}'s scale has shape {tuple(shape)}; "
            f"it must be {what} to factor out of the convolution."
        )


def int_conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                             rhs_dilation=None, dimension_numbers=None,
                             feature_group_count=1, batch_group_count=1, precision=None,
                             preferred_element_type=None, *,
                             lhs_spec: QuantSpec = DEFAULT_INPUT_SPEC,
                             rhs_spec: QuantSpec | None = None,
                             lhs_state: QuantState | None = None,
                             rhs_state: QuantState | None = None, out_sharding=None):
    """``lax.conv_general_dilated`` of quantized operands with integer arithmetic.

    The input must be quantized per tensor and the kernel per output feature (or per
    tensor); ``rhs`` may be a ``QuantizedKernel``.  With ``x = s_x (q_x - z_x)`` and
    ``w = s_w q_w``, each output is ``s_x s_w [conv(q_x, q_w) - z_x sum q_w]`` (plus
    the ``z_w`` terms for an affine kernel), exact in int32; the input is padded with
    ``z_x``, the code of 0.0.  Arguments as for ``lax.conv_general_dilated``
    (``lhs_dilation`` is not supported); ``rhs_spec`` defaults to 8-bit symmetric
    per output feature.  Windows of more codes than the int32 accumulator holds
    exactly raise ``ValueError`` (see ``int_dot_general``).  An ``QuantizedKernel`` of float
    / block-scale weights is served as ``lax.conv_general_dilated`` in float32 of the
    input fake-quantized by the kernel's input quantizer (if any) and the dequantized
    weights (XLA:CPU has no fp8 convolution).
    """
    del precision
    if is_float_kernel(rhs):
        x = float_kernel_input(lhs, rhs)
        x = x.dequantize(jnp.float32) if isinstance(x, QuantizedArray) else x
        out = lax.conv_general_dilated(
            jnp.asarray(x, jnp.float32), rhs.weights.dequantize(jnp.float32), window_strides,
            padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
            batch_group_count, precision=lax.Precision.HIGHEST,
            preferred_element_type=jnp.float32)
        return _as_output(out, preferred_element_type, out_sharding)
    if lhs_dilation is not None and any(d != 1 for d in lhs_dilation):
        raise ValueError("int_conv_general_dilated: lhs_dilation (transposed convolution) "
                         "is not supported on the integer path.")
    if batch_group_count != 1:
        raise ValueError("int_conv_general_dilated: batch_group_count must be 1.")
    raw_rhs = rhs.weights if isinstance(rhs, QuantizedKernel) else rhs
    dn = lax.conv_dimension_numbers(jnp.shape(lhs), raw_rhs.shape, dimension_numbers)
    out_feature = dn.rhs_spec[0]
    if rhs_spec is None:
        rhs_spec = QuantSpec(bits=8, symmetric=True, axis=out_feature)
    ql, qr = _operands(lhs, rhs, lhs_spec, rhs_spec, lhs_state, rhs_state)
    _scale_axes_must_be(ql, (), "input", "per tensor")
    _scale_axes_must_be(qr, (out_feature,), "kernel", "per tensor or per output feature")
    cl, zl, sym_l = _int8_codes(ql, "input", "int_conv_general_dilated")
    cr, zr, sym_r = _int8_codes(qr, "kernel", "int_conv_general_dilated")
    if not sym_r and feature_group_count != 1:
        raise ValueError("int_conv_general_dilated: an affine (asymmetric) kernel needs "
                         "feature_group_count=1; quantize the kernel symmetrically.")
    reduce_k = tuple(d for d in range(cr.ndim) if d != out_feature)
    window = int(np.prod([cr.shape[d] for d in reduce_k]))  # K: codes per output
    _check_accumulator(ql, qr, window, "int_conv_general_dilated")

    spatial_in = [ql.shape[d] for d in dn.lhs_spec[2:]]
    spatial_k = [qr.shape[d] for d in dn.rhs_spec[2:]]
    dil = rhs_dilation or (1,) * len(spatial_k)
    effective = [(k - 1) * d + 1 for k, d in zip(spatial_k, dil, strict=True)]
    pads = (lax.padtype_to_pads(spatial_in, effective, window_strides, padding)
            if isinstance(padding, str) else padding)
    config = [(0, 0, 0)] * cl.ndim
    for d, (lo, hi) in zip(dn.lhs_spec[2:], pads, strict=True):
        config[d] = (lo, hi, 0)
    zl_code = jnp.reshape(zl, ()).astype(jnp.int8)  # zl is in int8 range after the shift
    cl = lax.pad(cl, zl_code, config)

    conv = functools.partial(lax.conv_general_dilated, window_strides=window_strides,
                             padding="VALID", rhs_dilation=rhs_dilation, dimension_numbers=dn,
                             feature_group_count=feature_group_count,
                             preferred_element_type=jnp.int32)
    acc = conv(cl, cr)
    out_shape = [1] * acc.ndim
    out_shape[dn.out_spec[1]] = acc.shape[dn.out_spec[1]]
    per_out = lambda a: jnp.reshape(a, out_shape)  # noqa: E731 (kernel-feature -> output)
    if not sym_l:
        acc = acc - jnp.reshape(zl, ()) * per_out(jnp.sum(cr, axis=reduce_k, dtype=jnp.int32))
    if not sym_r:
        ones_shape = list(cr.shape)
        ones_shape[out_feature] = 1
        window_sums = conv(cl, jnp.ones(ones_shape, jnp.int8))  # sum of q_x per window
        acc = acc - window_sums * per_out(jnp.reshape(zr, -1))
        if not sym_l:
            acc = acc + window * jnp.reshape(zl, ()) * per_out(jnp.reshape(zr, -1))
    scale = (jnp.reshape(ql.compute_state().scale, ())
             * per_out(jnp.reshape(qr.compute_state().scale, -1)))
    return _rescale(acc, scale, preferred_element_type, out_sharding)


def make_int_dot_general(*, lhs_spec: QuantSpec = DEFAULT_INPUT_SPEC,
                         rhs_spec: QuantSpec = DEFAULT_WEIGHT_SPEC,
                         lhs_state: QuantState | None = None):
    """An ``int_dot_general`` with its quantizers fixed, for ``dot_general=`` of Flax
    layers (``nn.Dense(n, dot_general=make_int_dot_general(), promote_dtype=promote_dtype)``).
    """
    return functools.partial(int_dot_general, lhs_spec=lhs_spec, rhs_spec=rhs_spec,
                             lhs_state=lhs_state)


def promote_dtype(*args, dtype=None, inexact=True):
    """Flax's ``promote_dtype`` that passes ``QuantizedArray`` / ``QuantizedKernel`` through.

    Pass it as ``promote_dtype=`` to ``flax.linen.Dense`` (called with the operands
    as arguments) or ``nnx.Linear`` (called with one tuple of operands) whose kernel
    is a ``QuantizedArray``; the float operands are promoted as usual.
    """
    from flax.linen import dtypes

    as_tuple = len(args) == 1 and isinstance(args[0], tuple)
    operands = args[0] if as_tuple else args
    kept = (QuantizedArray, QuantizedKernel)
    floats = [a for a in operands if a is not None and not isinstance(a, kept)]
    promoted = iter(dtypes.promote_dtype(*floats, dtype=dtype, inexact=inexact))
    out = [a if a is None or isinstance(a, kept) else next(promoted) for a in operands]
    return tuple(out) if as_tuple else out
