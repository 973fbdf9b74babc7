"""The ops of served layers with an ``IntKernel``: the integer path when the kernel's
quantizer allows it, else the float path with the same quantized values.

``serve_model`` puts these in a served layer's op slot (``dot_general``,
``conv_general_dilated``, nnx ``einsum_op``; linen ``Einsum``, which has no op slot,
is computed by its interceptor with ``served_einsum``).  Each one, given an
``IntKernel`` ``rhs``:

* **integer path** (``int_dot_general`` / ``int_conv_general_dilated``: int8 codes x
  int8 codes -> int32, scales and zero points applied once) when ``int_ready``: codes
  of at most 8 bits on integer grids with float32 scales (input and kernel), the
  input not per block, and the kernel's scales constant along the contracted
  axes (per tensor, or per channel / group on free axes only), so that they factor
  out of the sum;
* **float codes** (``float_codes_ready``, ``dot_general`` only): float element formats
  for the weights and the input (fp8, MX, NVFP4, ...): ``int_dot_general`` hands them
  to ``float_dot_general``, which multiplies the codes (fp8 x fp8 with float32
  accumulation; MX x MX through ``jax.nn.scaled_matmul`` on GPU, emulated elsewhere);
* **float path** otherwise -- e.g. int4 kernels with groups along the contracted
  (input) axis, kernels of more than 8 bits, per-block inputs (MX / NVFP4 /
  ``group_size``, calibrated on each call): the input fake-quantized with the
  kernel's stored input quantizer (``input_state``; calibrated on this input when the
  observer saw nothing, as the QAT evaluation does), the kernel dequantized
  (``(q - z) * s``), then the float op with the layer's ``precision`` /
  ``preferred_element_type``.

Both equal the QAT model's frozen evaluation (the same codes x scales) up to float
summation order.  A plain float ``rhs`` goes to the float op unchanged.

Einsum: ``einsum_dimension_numbers("btd,dnh->btnh", ...)`` turns a two-operand
explicit einsum without repeated or summed-out indices into ``lax.dot_general``
dimension numbers plus the transpose from ``dot_general``'s output layout (batch,
lhs free, rhs free) to the einsum's; other einsums (``...``, a diagonal, an index
summed out of one operand) take the float path with ``jnp.einsum``.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from ..core.ops import calibrate, fake_quant
from .int_matmul import (
    IntKernel,
    int_conv_general_dilated,
    int_dot_general,
    is_float_kernel,
    is_integer_format,
)

__all__ = ["int_ready", "float_codes_ready", "quantized_input", "served_dot_general",
           "served_conv_general_dilated", "einsum_dimension_numbers", "served_einsum"]


def _integer_codes(spec) -> bool:
    return spec is not None and is_integer_format(spec) and spec.bits <= 8


def int_ready(kernel: IntKernel, contracted) -> bool:
    """Whether ``kernel`` can take the integer path when its axes ``contracted`` are
    summed over (see the module docstring)."""
    weights = kernel.weights
    input_spec = kernel.input_quant_spec
    if not (_integer_codes(weights.spec) and _integer_codes(input_spec)):
        return False
    if input_spec.group_size is not None:  # per-block inputs: scales along the contraction
        return False
    shape = tuple(weights.state.scale.shape)
    return len(shape) == weights.ndim and all(shape[a] == 1 for a in contracted)


def float_codes_ready(kernel: IntKernel) -> bool:
    """Whether a ``dot_general`` with ``kernel`` runs on the float-format codes
    (``int_dot_general`` hands it to ``float_dot_general``: fp8 x fp8 codes with float32
    accumulation, MX x MX through ``jax.nn.scaled_matmul`` on GPU, emulated elsewhere):
    float element formats for both the weights and the input."""
    input_spec = kernel.input_quant_spec
    return is_float_kernel(kernel) and input_spec is not None and input_spec.is_float


def quantized_input(x, kernel: IntKernel):
    """``x`` fake-quantized with ``kernel``'s input quantizer: its stored
    ``input_state``, else calibrated on ``x`` under ``input_spec`` (as the QAT evaluation
    does when the observer saw nothing)."""
    return fake_quant(x, kernel.input_state or calibrate(x, kernel.input_spec))


def _float_operands(lhs, kernel: IntKernel):
    """The input fake-quantized with the kernel's input quantizer, the kernel dequantized."""
    return quantized_input(lhs, kernel), kernel.weights.dequantize()


def served_dot_general(lhs, rhs, dimension_numbers, precision=None,
                       preferred_element_type=None, out_sharding=None):
    """``lax.dot_general`` for a served layer (``dot_general=`` of ``Dense`` /
    ``DenseGeneral`` / ``nnx.Linear`` / ``LinearGeneral``): an ``IntKernel`` ``rhs`` on
    the integer path when ``int_ready`` (its contracting axes), else on the float path."""
    if isinstance(rhs, IntKernel):
        if int_ready(rhs, dimension_numbers[0][1]) or float_codes_ready(rhs):
            return int_dot_general(lhs, rhs, dimension_numbers,
                                   preferred_element_type=preferred_element_type,
                                   out_sharding=out_sharding)
        lhs, rhs = _float_operands(lhs, rhs)
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type,
                           out_sharding=out_sharding)


def served_conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                                rhs_dilation=None, dimension_numbers=None,
                                feature_group_count=1, batch_group_count=1, precision=None,
                                preferred_element_type=None, out_sharding=None):
    """``lax.conv_general_dilated`` for a served ``Conv``: an ``IntKernel`` ``rhs`` on the
    integer path when ``int_ready`` (every kernel axis but the output feature is
    contracted), else on the float path."""
    args = (window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, batch_group_count)
    if isinstance(rhs, IntKernel):
        dn = lax.conv_dimension_numbers(jnp.shape(lhs), rhs.shape, dimension_numbers)
        contracted = [d for d in range(len(rhs.shape)) if d != dn.rhs_spec[0]]
        if int_ready(rhs, contracted):
            return int_conv_general_dilated(lhs, rhs, *args,
                                            preferred_element_type=preferred_element_type,
                                            out_sharding=out_sharding)
        lhs, rhs = _float_operands(lhs, rhs)
    return lax.conv_general_dilated(lhs, rhs, *args, precision=precision,
                                    preferred_element_type=preferred_element_type,
                                    out_sharding=out_sharding)


def einsum_dimension_numbers(einsum_str: str, lhs_ndim: int, rhs_ndim: int):
    """``(dimension_numbers, perm)`` for ``lax.dot_general`` equal to the einsum
    ``einsum_str`` (``"lhs,rhs->out"``): ``transpose(dot_general(lhs, rhs, dn), perm)``
    has the einsum's output layout.  ``None`` for an einsum that is not a plain
    contraction (``...``, a repeated index in one operand, an index of one operand
    absent from the other and from the output)."""
    spec = einsum_str.replace(" ", "")
    if "..." in spec or "->" not in spec or spec.count(",") != 1:
        return None
    inputs, out = spec.split("->")
    a, b = inputs.split(",")
    if len(a) != lhs_ndim or len(b) != rhs_ndim:
        return None
    if any(len(set(s)) != len(s) for s in (a, b, out)):
        return None
    if any(c not in b and c not in out for c in a) or any(c not in a and c not in out for c in b):
        return None
    if any(c not in a and c not in b for c in out):
        return None
    contract = [c for c in a if c in b and c not in out]
    batch = [c for c in a if c in b and c in out]
    lhs_free = [c for c in a if c not in b]
    rhs_free = [c for c in b if c not in a]
    dn = (([a.index(c) for c in contract], [b.index(c) for c in contract]),
          ([a.index(c) for c in batch], [b.index(c) for c in batch]))
    layout = batch + lhs_free + rhs_free
    perm = tuple(layout.index(c) for c in out)
    return dn, perm


def served_einsum(einsum_str, lhs, rhs, *, precision=None, preferred_element_type=None,
                  out_sharding=None):
    """``jnp.einsum(einsum_str, lhs, rhs)`` for a served ``Einsum`` (nnx ``einsum_op``):
    an ``IntKernel`` ``rhs`` as ``served_dot_general`` (integer path when the einsum is
    a plain contraction and ``int_ready``), else the float path."""
    if isinstance(rhs, IntKernel):
        parsed = einsum_dimension_numbers(einsum_str, jnp.ndim(lhs), len(rhs.shape))
        if parsed is not None and int_ready(rhs, parsed[0][0][1]):
            dn, perm = parsed
            y = int_dot_general(lhs, rhs, dn, preferred_element_type=preferred_element_type)
            y = jnp.transpose(y, perm)
            if out_sharding is not None:
                y = lax.with_sharding_constraint(y, out_sharding)
            return y
        lhs, rhs = _float_operands(lhs, rhs)
    kwargs = {} if out_sharding is None else {"out_sharding": out_sharding}
    return jnp.einsum(einsum_str, lhs, rhs, precision=precision,
                      preferred_element_type=preferred_element_type, **kwargs)
