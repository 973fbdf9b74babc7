"""Served weights and the one place that chooses how a served matmul computes.

A served model's weights are codes + scales (``QuantizedArray``).  Inside the served
function a weight is a ``ServedWeight``: the ``QuantizedArray`` in its storage layout,
a pending transpose (``perm``), the float dtype its view has, and an AWQ /
SmoothQuant input factor.  Views (``view``) act on codes and scales, never on
dequantized floats: a transpose is kept pending and folded into the consuming
matmul's dimension numbers (GPT-2's ``(out, in)`` kernels, Equinox's ``W @ x``); a
reshape, slice or squeeze moves the codes (unpacked first only when it touches the
packed last axis) and their scales (``views.apply_to_companion``).

``served_dot_general`` / ``served_conv_general_dilated`` / ``served_gather`` decide,
per site, from the weight's and the input quantizer's formats:

* **weight only** (no input quantizer): integer codes of a matrix product (one
  contracted axis, no batch axes) go to ``xla_cpu.weight_only_matmul``, which at few
  rows reads each code once instead of writing a dequantized copy (decoding); otherwise,
  and for float-format codes, the weight is dequantized inside the jitted computation;
* **integer path** (``int_matmul.int_dot_general``, int8 x int8 -> int32, scales and
  zero points after): integer grids of at most 8 bits on both sides, an input quantized
  per tensor or per token (``formats.INT8_PER_TOKEN``), and weight scales constant
  along the contracted axes;
* **float codes** (``float_matmul.float_dot_general``): float element formats on both
  sides (fp8 x fp8, MX x MX);
* **float path** otherwise (int4 groups along the contraction with a quantized input,
  per-block inputs with integer weights, > 8-bit codes): the input fake-quantized with
  its quantizer, the weight dequantized, the float op.

All of them equal the fake-quantized evaluation (the same codes x scales) up to float
summation order; a lookup (``served_gather``) gathers codes and scales of the rows it
takes and equals ``take(fake_quant(table))`` bit for bit.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ..core import packing, xla_cpu
from ..core.ops import calibrate, fake_quant
from ..core.qarray import QuantizedArray, storage_state
from ..core.spec import QuantSpec
from ..transform import views
from .float_matmul import float_dot_general
from .int_matmul import int_conv_general_dilated, int_dot_general, is_integer_format

__all__ = ["ServedWeight", "InputQuant", "view", "dequantize", "served_dot_general",
           "served_conv_general_dilated", "served_gather", "scan_parts", "respec", "write"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ServedWeight:
    """A view of a served weight (see the module docstring).

    Attributes:
      qa: codes and state in storage layout.
      input_scale: ``None`` or the per-input-channel factor (storage layout, size 1
        along the weight's output channels).
      perm: the view's axis ``i`` is storage axis ``perm[i]`` (``None``: identity).
      dtype: the float dtype of the view.
    """

    qa: QuantizedArray
    input_scale: Any = None
    perm: tuple | None = dataclasses.field(default=None, metadata=dict(static=True))
    dtype: Any = dataclasses.field(default=jnp.float32, metadata=dict(static=True))

    @property
    def shape(self) -> tuple:
        s = self.qa.shape
        return s if self.perm is None else tuple(s[p] for p in self.perm)


@dataclasses.dataclass(frozen=True)
class InputQuant:
    """A served matmul's input quantizer: a frozen ``state`` (an observer's range, a
    learned step size), or calibrated on each call under ``spec`` (per-block inputs,
    and ranges that saw nothing)."""

    spec: QuantSpec
    state: Any = None

    def fake_quant(self, x):
        return fake_quant(x, self.state if self.state is not None else calibrate(x, self.spec))

    def quantize(self, x) -> QuantizedArray:
        if self.state is not None:
            return QuantizedArray.quantize(x, self.state.spec, state=self.state, pack=False)
        return QuantizedArray.quantize(x, self.spec, pack=False)

    @property
    def per_tensor(self) -> bool:
        spec = self.state.spec if self.state is not None else self.spec
        return spec.axis is None


# -- the spec of a view ----------------------------------------------------------------------
def respec(spec: QuantSpec, shape, scale_shape) -> tuple[QuantSpec, tuple | None]:
    """The spec whose scale shape is ``scale_shape`` for an array of ``shape`` (the same
    grid), and the axes along which the scale must first be expanded to full size
    (``None``: none) so that such a spec exists.

    Full-size scale axes (of length > 1) are kept axes; one axis with fewer scales than
    elements is the grouped axis, whose spec keeps every other axis (those the scale
    is constant along are expanded)."""
    shape, scale_shape = tuple(shape), tuple(scale_shape)
    grouped = [d for d, (s, n) in enumerate(zip(scale_shape, shape, strict=True)) if 1 < s < n]
    if not grouped:
        kept = tuple(d for d, (s, n) in enumerate(zip(scale_shape, shape, strict=True))
                     if s == n and n > 1)
        axis = None if not kept else kept[0] if len(kept) == 1 else kept
        return dataclasses.replace(spec, axis=axis, group_size=None), None
    g = grouped[-1]
    expand = tuple(d for d in range(len(shape)) if d != g and scale_shape[d] != shape[d])
    return (dataclasses.replace(spec, axis=g, group_size=shape[g] // scale_shape[g]),
            expand or None)


def _with_state(qa: QuantizedArray, shape, codes, scale, zero_point, packed) -> QuantizedArray:
    """A ``QuantizedArray`` of a view: codes, (compute) scale and zero point broadcastable
    to ``shape``, its spec recomputed (``respec``)."""
    state = qa.compute_state()
    spec, expand = respec(state.spec, shape, jnp.shape(scale))
    if expand:
        scale = views.expand_to(scale, shape, expand)
        zero_point = views.expand_to(jnp.broadcast_to(zero_point, jnp.shape(zero_point)), shape,
                                     expand)
    zero_point = jnp.broadcast_to(zero_point, jnp.shape(scale))
    tensor = None if state.tensor_scale is None else jnp.reshape(state.tensor_scale,
                                                                 (1,) * len(shape))
    new = dataclasses.replace(state, scale=scale, zero_point=zero_point, spec=spec,
                              tensor_scale=tensor)
    return QuantizedArray(codes, storage_state(new), tuple(int(n) for n in shape), packed)


# -- views ----------------------------------------------------------------------------------
def materialize(w: ServedWeight) -> ServedWeight:
    """``w`` with its pending transpose applied to codes and scales."""
    if w.perm is None or w.perm == tuple(range(len(w.perm))):
        return dataclasses.replace(w, perm=None)
    qa, perm = w.qa, w.perm
    packed = qa.packed and perm[-1] == qa.ndim - 1
    if not packed:
        qa = qa.unpack()
    state = qa.compute_state()
    shape = tuple(qa.shape[p] for p in perm)
    new = _with_state(qa, shape, jnp.transpose(qa.codes, perm),
                      jnp.transpose(state.scale, perm), jnp.transpose(state.zero_point, perm),
                      packed)
    scale = None if w.input_scale is None else jnp.transpose(w.input_scale, perm)
    return ServedWeight(new, scale, None, w.dtype)


def _touches_last(eqn, ndim: int) -> bool:
    """Whether a view changes the last axis (so packed codes must be unpacked first)."""
    name, p = eqn.primitive.name, eqn.params
    shape = tuple(eqn.invars[0].aval.shape)
    out = tuple(eqn.outvars[0].aval.shape)
    if name == "squeeze":
        return (ndim - 1) in {d % ndim for d in p["dimensions"]}
    if name in ("slice", "dynamic_slice"):
        return out[-1] != shape[-1]
    if name == "reshape":
        return not out or out[-1] != shape[-1]
    if name == "broadcast_in_dim":
        bd = p["broadcast_dimensions"]
        return not bd or bd[-1] != len(out) - 1 or out[-1] != shape[-1]
    return True


def _packed_eqn_codes(eqn, codes, qa: QuantizedArray, dynamic):
    """The view ``eqn`` applied to packed codes (it leaves the last axis whole)."""
    name, p = eqn.primitive.name, dict(eqn.params)
    width = codes.shape[-1]
    if name == "squeeze":
        return lax.squeeze(codes, p["dimensions"])
    if name == "slice":
        limit = tuple(p["limit_indices"][:-1]) + (width,)
        strides = p["strides"]
        return lax.slice(codes, p["start_indices"], limit, strides)
    if name == "dynamic_slice":
        sizes = tuple(p["slice_sizes"][:-1]) + (width,)
        return lax.dynamic_slice(codes, dynamic, sizes)
    if name == "reshape":
        return jnp.reshape(codes, tuple(p["new_sizes"][:-1]) + (width,))
    if name == "broadcast_in_dim":
        shape = tuple(p["shape"][:-1]) + (width,)
        return lax.broadcast_in_dim(codes, shape, p["broadcast_dimensions"])
    raise NotImplementedError(name)


def view(eqn, w: ServedWeight, dynamic) -> ServedWeight:
    """The ``ServedWeight`` of the view ``eqn`` makes of ``w`` (see the module
    docstring)."""
    name, p = eqn.primitive.name, eqn.params
    if name == "convert_element_type":
        return dataclasses.replace(w, dtype=p["new_dtype"])
    if name in views.IDENTITY:
        return w
    if name == "transpose":
        perm = w.perm or tuple(range(w.qa.ndim))
        return dataclasses.replace(w, perm=tuple(perm[a] for a in p["permutation"]))
    w = materialize(w)
    qa = w.qa
    out_shape = tuple(eqn.outvars[0].aval.shape)
    packed = qa.packed and not _touches_last(eqn, qa.ndim) and len(out_shape) > 0
    if packed:
        codes = _packed_eqn_codes(eqn, qa.codes, qa, dynamic)
    else:
        qa = qa.unpack()
        codes = eqn.primitive.bind(qa.codes, *dynamic, **p)
    state = qa.compute_state()
    scale = views.apply_to_companion(eqn, state.scale, dynamic)
    zero_point = views.apply_to_companion(eqn, jnp.broadcast_to(state.zero_point,
                                                                state.scale.shape), dynamic)
    factor = None if w.input_scale is None else \
        views.apply_to_companion(eqn, w.input_scale, dynamic)
    return ServedWeight(_with_state(qa, out_shape, codes, scale, zero_point, packed), factor,
                        None, w.dtype)


def dequantize(w: ServedWeight):
    """The view's float values (where an equation needs floats)."""
    w = materialize(w)
    return w.qa.dequantize(jnp.float32).astype(w.dtype)


def scan_parts(w: ServedWeight):
    """``(arrays, rebuild)``: ``w`` as arrays a scan slices along axis 0 (every scale
    full along it), and ``rebuild(sliced)`` -> the ``ServedWeight`` of one slice."""
    w = materialize(w)
    qa = w.qa
    state = qa.compute_state()
    lead = qa.shape[0]
    full0 = lambda a: None if a is None else views.expand_to(a, (lead,) + jnp.shape(a)[1:], (0,))  # noqa: E731
    parts = (qa.codes, full0(state.scale), full0(jnp.broadcast_to(state.zero_point,
                                                                  state.scale.shape)),
             full0(w.input_scale))
    shape = qa.shape[1:]

    def rebuild(sliced):
        codes, scale, zero_point, factor = sliced
        return ServedWeight(_with_state(qa, shape, codes, scale, zero_point, qa.packed),
                            factor, None, w.dtype)

    return parts, rebuild


def write(cache: QuantizedArray, update: QuantizedArray, indices) -> QuantizedArray:
    """``dynamic_update_slice`` of a quantized cache: ``update``'s codes, scales and zero
    points written at ``indices`` (a state array constant along an axis -- size 1 there
    -- is left as it is; a symmetric grid's zero point is)."""
    def put(a, b):
        if jnp.shape(a) == jnp.shape(b) and all(n == 1 for n in jnp.shape(a)):
            return a
        at = [i if n > 1 else 0 for i, n in zip(indices, jnp.shape(a), strict=True)]
        return lax.dynamic_update_slice(a, b.astype(a.dtype), at)

    if cache.packed != update.packed:
        cache, update = cache.unpack(), update.unpack()
    state = dataclasses.replace(cache.state, scale=put(cache.state.scale, update.state.scale),
                                zero_point=put(cache.state.zero_point,
                                               update.state.zero_point))
    return dataclasses.replace(cache, codes=put(cache.codes, update.codes), state=state)


# -- matmuls ----------------------------------------------------------------------------------
def _weight_as_rhs(dn, operand: int, ndim_x: int, ndim_w: int):
    """``(dn', out_perm)``: ``dot_general(x, w, dn')`` transposed by ``out_perm`` is the
    original ``dot_general`` (whose weight was operand ``operand``)."""
    (lc, rc), (lb, rb) = dn
    if operand == 1:
        return dn, None
    swapped = ((rc, lc), (rb, lb))
    nb = len(lb)
    n_w = ndim_w - len(lc) - len(lb)  # the weight's free axes (originally lhs)
    n_x = ndim_x - len(rc) - len(rb)
    perm = list(range(nb)) + list(range(nb + n_x, nb + n_x + n_w)) + list(range(nb, nb + n_x))
    return swapped, tuple(perm)


def _storage_dn(dn, perm, ndim: int):
    """A rhs weight's dimension numbers on its storage axes, and the permutation of the
    output's rhs-free block from storage order back to the view's order."""
    if perm is None:
        return dn, None
    (lc, rc), (lb, rb) = dn
    rc_s, rb_s = tuple(perm[d] for d in rc), tuple(perm[d] for d in rb)
    free = [d for d in range(ndim) if d not in rc and d not in rb]
    storage = [perm[d] for d in free]
    order = sorted(storage)
    block = [order.index(s) for s in storage]
    return ((lc, rc_s), (lb, rb_s)), block


def _int_ready(x: InputQuant, qa: QuantizedArray, contracted, x_shape=None,
               x_contracted=None) -> bool:
    """Whether the integer path applies: <= 8-bit integer grids on both sides, the
    weight's scales constant along its contracted axes, the input's too (per tensor, or
    one scale per token: blocks spanning the contracted last axis)."""
    spec_x = x.state.spec if x.state is not None else x.spec
    ok = lambda s: is_integer_format(s) and s.bits <= 8  # noqa: E731
    if not (ok(spec_x) and ok(qa.spec)):
        return False
    if spec_x.group_size is not None:
        per_token = (x_shape is not None and spec_x.group_size == x_shape[-1]
                     and tuple(d % len(x_shape) for d in x_contracted) == (len(x_shape) - 1,))
        if not per_token:
            return False
    shape = qa.state.scale.shape
    return len(shape) == qa.ndim and all(shape[a] == 1 for a in contracted)


def _float_codes_ready(x: InputQuant, qa: QuantizedArray) -> bool:
    spec_x = x.state.spec if x.state is not None else x.spec
    return qa.spec.is_float and spec_x.is_float


def _weight_only(x, qa: QuantizedArray, dn, out_dtype):
    """``dot_general(x, dequantize(qa), dn)`` of a float input and a served weight: a
    matrix product of integer codes (one contracted axis, no batch axes, scales per
    column or per group along the contraction) goes to ``xla_cpu.weight_only_matmul``,
    which reads the codes once at few rows; the rest dequantizes, then multiplies."""
    (lc, rc), (lb, _) = dn
    spec = qa.spec
    if (is_integer_format(spec) and spec.bits <= 8 and qa.ndim == 2 and len(rc) == 1
            and not lb and len(lc) == 1):
        k_axis = rc[0]
        state = qa.compute_state()
        grouped = spec.group_size is not None and spec.resolve_axis(2) == k_axis
        if grouped or state.scale.shape[k_axis] == 1:
            xm = jnp.moveaxis(x, lc[0], -1)
            y = xla_cpu.weight_only_matmul(
                jnp.reshape(xm, (-1, xm.shape[-1])), qa.codes, state.scale,
                None if spec.symmetric else state.zero_point, k_axis=k_axis,
                group_size=spec.group_size if grouped else None, bits=spec.bits,
                packed=qa.packed, n=qa.shape[-1], out_dtype=jnp.float32, qmin=spec.qmin)
            return jnp.reshape(y, xm.shape[:-1] + y.shape[-1:]).astype(out_dtype)
    return lax.dot_general(x, qa.dequantize(jnp.float32).astype(x.dtype), dn,
                           preferred_element_type=jnp.float32).astype(out_dtype)


def _matrix_form(x, qa: QuantizedArray, dn):
    """The product as a matrix product when it is one in disguise: ``(x2, qa2, dn2,
    out_shape)`` with ``x2 (M, K)`` and a 2-D weight (its contracted and its free axes
    each a contiguous run, merged: an einsum kernel ``(d, heads, head_dim)`` is ``(d,
    heads * head_dim)``; codes, scales and zero points reshaped, packed codes too), or
    ``None``.  Matrix products take the decoding kernels at few rows."""
    (lc, rc), (lb, _) = dn
    nd = qa.ndim
    if lb or nd == 2 or not rc:
        return None
    order = sorted(range(len(rc)), key=lambda i: rc[i])
    rc_s = [rc[i] for i in order]
    free = [d for d in range(nd) if d not in rc]
    if rc_s == list(range(len(rc))):
        k_axis = 0
    elif rc_s == list(range(nd - len(rc), nd)):
        k_axis = 1
    else:
        return None
    spec = qa.spec
    if spec.group_size is not None and spec.resolve_axis(nd) != rc_s[-1]:
        return None
    shape = qa.shape
    k = int(np.prod([shape[d] for d in rc_s]))
    n = int(np.prod([shape[d] for d in free]))
    matrix = (k, n) if k_axis == 0 else (n, k)
    state = qa.compute_state()
    split = len(rc) if k_axis == 0 else len(free)

    def merged(a):  # a state array: size 1 along a block of axes, or not
        lead, rest = a.shape[:split], a.shape[split:]
        return jnp.reshape(a, (int(np.prod(lead)), int(np.prod(rest))))

    if qa.packed and (shape[-1] * packing.field_bits(spec)) % 8:
        qa = qa.unpack()  # the last axis's padding byte would land inside the merged row
    codes = qa.codes
    if qa.packed:
        codes = jnp.reshape(codes, (matrix[0], -1))
    else:
        codes = jnp.reshape(codes, matrix)
    two = _with_state(qa, matrix, codes, merged(state.scale),
                      merged(jnp.broadcast_to(state.zero_point, state.scale.shape)), qa.packed)
    xm = jnp.moveaxis(x, [lc[i] for i in order], list(range(x.ndim - len(lc), x.ndim)))
    lead = xm.shape[:x.ndim - len(lc)]
    x2 = jnp.reshape(xm, (int(np.prod(lead)), k))
    out_shape = lead + tuple(shape[d] for d in free)
    return x2, two, (((1,), (k_axis,)), ((), ())), out_shape


def served_dot_general(x, w: ServedWeight, params: dict, operand: int,
                       quant: InputQuant | None, out_dtype):
    """The served ``dot_general`` of input ``x`` and weight ``w`` (operand ``operand``
    of the original equation, whose ``params`` these are); see the module docstring."""
    dn = params["dimension_numbers"]
    dn, out_perm = _weight_as_rhs(dn, operand, jnp.ndim(x), len(w.shape))
    dn, block = _storage_dn(dn, w.perm, len(w.shape))
    qa = w.qa
    out_shape = None
    if quant is None or quant.per_tensor or quant.spec.group_size is not None:
        form = _matrix_form(x, qa, dn)
        if form is not None:
            x, qa, dn, out_shape = form
    (lc, rc), _ = dn
    if quant is None:
        y = _weight_only(x, qa, dn, out_dtype)
    elif _int_ready(quant, qa, rc, jnp.shape(x), lc):
        y = int_dot_general(quant.quantize(x), qa, dn, preferred_element_type=jnp.float32)
    elif _float_codes_ready(quant, qa):
        y = float_dot_general(quant.quantize(x), qa, dn, preferred_element_type=jnp.float32)
    else:
        y = lax.dot_general(quant.fake_quant(x), qa.dequantize(jnp.float32).astype(x.dtype),
                            dn, preferred_element_type=jnp.float32)
    y = y.astype(out_dtype)
    if out_shape is not None:
        y = jnp.reshape(y, out_shape)
    if block is not None:
        n_free = len(block)
        lead = y.ndim - n_free
        y = jnp.transpose(y, tuple(range(lead)) + tuple(lead + b for b in block))
    if out_perm is not None:
        y = jnp.transpose(y, out_perm)
    return y


def served_conv_general_dilated(x, w: ServedWeight, params: dict, quant: InputQuant | None,
                                out_dtype):
    """The served convolution of input ``x`` with kernel ``w``: the integer path for a
    per-tensor integer input quantizer and kernel scales per output feature, else the
    float convolution of the (fake-quantized) input and the dequantized kernel."""
    w = materialize(w)
    qa = w.qa.unpack()
    p = {k: v for k, v in params.items() if k != "preferred_element_type"}
    dn = lax.conv_dimension_numbers(jnp.shape(x), qa.shape, p["dimension_numbers"])
    contracted = [d for d in range(qa.ndim) if d != dn.rhs_spec[0]]
    plain = (p.get("lhs_dilation") is None or all(d == 1 for d in p["lhs_dilation"])) and \
        p.get("batch_group_count", 1) == 1
    if quant is not None and plain and _int_ready(quant, qa, contracted) and quant.per_tensor:
        y = int_conv_general_dilated(
            quant.quantize(x), qa, p["window_strides"], p["padding"], p.get("lhs_dilation"),
            p.get("rhs_dilation"), p["dimension_numbers"], p.get("feature_group_count", 1),
            p.get("batch_group_count", 1), preferred_element_type=jnp.float32)
    else:
        xf = x if quant is None else quant.fake_quant(x)
        y = lax.conv_general_dilated(
            xf, qa.dequantize(jnp.float32).astype(xf.dtype), p["window_strides"], p["padding"],
            p.get("lhs_dilation"), p.get("rhs_dilation"), p["dimension_numbers"],
            p.get("feature_group_count", 1), p.get("batch_group_count", 1),
            precision=p.get("precision"), preferred_element_type=jnp.float32)
    return y.astype(out_dtype)


def served_gather(eqn, w: ServedWeight, indices):
    """A lookup of rows of a served table: the rows' codes and scales gathered, only
    they dequantized (``take(fake_quant(table))`` bit for bit)."""
    w = materialize(w)
    qa = w.qa
    p = dict(eqn.params)
    dn = p["dimension_numbers"]
    gathered = views.gathered_axes(p, qa.shape)
    sizes = tuple(p["slice_sizes"])
    packed = qa.packed and (qa.ndim - 1) not in gathered and sizes[-1] == qa.shape[-1]
    if not packed:
        qa = qa.unpack()
    codes_sizes = sizes[:-1] + (qa.codes.shape[-1],) if packed else sizes
    codes = lax.gather(qa.codes, indices, dn, codes_sizes, mode=p["mode"],
                       indices_are_sorted=p["indices_are_sorted"],
                       unique_indices=p["unique_indices"])
    state = qa.compute_state()

    def take(a):
        a = views.expand_to(a, qa.shape, gathered)
        a_sizes = tuple(1 if d in gathered else a.shape[d] for d in range(qa.ndim))
        return lax.gather(a, indices, dn, a_sizes, mode=p["mode"],
                          indices_are_sorted=p["indices_are_sorted"],
                          unique_indices=p["unique_indices"])

    out_shape = tuple(eqn.outvars[0].aval.shape)
    rows = _with_state(qa, out_shape, codes, take(state.scale),
                       take(jnp.broadcast_to(state.zero_point, state.scale.shape)), packed)
    return rows.dequantize(jnp.float32).astype(eqn.outvars[0].aval.dtype)
