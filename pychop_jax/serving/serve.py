"""Deprecated: from a model built of ``QuantDense`` / ``QuantConv`` layers to an integer
model.  Build models from stock layers and use ``pychop_jax.quantize_model`` +
``pychop_jax.serve_model`` instead (one pipeline, every framework).

``to_served(model, variables, x)`` turns the variables of a ``flax.linen`` model built
from ``pychop_jax.linen`` layers into the params of the same architecture built from
*stock* Flax layers whose ops are integer (``IntDense`` / ``IntConv`` below);
``to_served_nnx(model)`` makes an integer-served copy of a ``flax.nnx`` model built
from ``pychop_jax.nnx`` layers.  Either way every ``QuantDense`` / ``QuantConv``
kernel becomes a ``QuantizedKernel`` holding

* the int8 codes and per-channel scales of the kernel, quantized exactly as the QAT
  layer fake-quantizes it (calibrated on the kernel, or its learned LSQ step size), and
* the static quantizer of the layer's input: the observer's frozen range (or the
  learned LSQ step size and zero point), i.e. what the layer uses at evaluation.

The served layer computes ``s_x s_w [sum q_x q_w - corrections] + b`` in int32, the
same codes as the fake-quant evaluation, which sums ``(q_x - z_x) s_x * q_w s_w`` in
float: the two agree up to float summation order (``tests/serving/test_serving.py``; the
digits example adds the served model as a row of its table).

Layers with float or block-scaled weights (``weight_format``: fp8, MX, NVFP4, NF4) get
a ``QuantizedKernel`` too -- the codes as the ml_dtypes dtype (uint8 indices for NF4) and
the scales -- which ``int_dot_general`` / ``int_conv_general_dilated`` serve on the
float path: ``float_dot_general`` of the input quantized by the layer's input
quantizer (``act_format`` / ``act_bits``; fp8 x fp8 codes with float32 accumulation,
scales after) and the kernel's codes, or float32 products of the dequantized kernel
with a float input (weight-only), the same as the QAT evaluation up to summation
order.  A dynamic (per-block, MX) input quantizer is stored as its spec and
calibrated per call.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ..core import numerics, observers, ops
from ..core.qarray import QuantizedArray
from ..core.spec import QuantSpec
from ..core.state import QuantState
from ..transform import qat
from .int_matmul import QuantizedKernel, int_conv_general_dilated, int_dot_general, promote_dtype

__all__ = ["IntDense", "IntConv", "ServedLayer", "to_served", "to_served_nnx"]

#: ``nn.Dense`` that serves a ``QuantizedKernel`` (any ``nn.Dense`` argument applies)
IntDense = functools.partial(nn.Dense, dot_general=int_dot_general, promote_dtype=promote_dtype)
#: ``nn.Conv`` that serves a ``QuantizedKernel``
IntConv = functools.partial(nn.Conv, conv_general_dilated=int_conv_general_dilated,
                            promote_dtype=promote_dtype)


def _deprecated(name: str) -> None:
    warnings.warn(f"pychop_jax.serving.{name} is deprecated: build the model from stock "
                  "Flax layers, quantize it with pychop_jax.quantize_model(model, rules) and "
                  "serve it with pychop_jax.serve_model.", DeprecationWarning, stacklevel=3)


@dataclasses.dataclass(frozen=True)
class ServedLayer:
    """What ``to_served`` found in one layer (for its report)."""

    path: tuple[str, ...]
    weight_spec: QuantSpec
    input_spec: QuantSpec | None
    learned: bool
    input_state: str  # "observed", "learned", or "dynamic" (no static range)


def _quant_layers(model: nn.Module, variables, args, kwargs) -> dict[tuple[str, ...], Any]:
    """Path -> module of every pychop_jax.linen QuantDense / QuantConv the model calls."""
    from ..flax import linen

    found = {}

    def interceptor(next_fun, call_args, call_kwargs, context):
        module = context.module
        if isinstance(module, linen._QuantLayer) and context.method_name == "__call__":
            found[tuple(module.path)] = module
        return next_fun(*call_args, **call_kwargs)

    with nn.intercept_methods(interceptor):
        model.apply(variables, *args, **kwargs)
    return found


def _subtree(tree, path):
    for key in path:
        if not isinstance(tree, dict) and not hasattr(tree, "get"):
            return None
        tree = tree.get(key)
        if tree is None:
            return None
    return tree


def _learned_state(params, spec: QuantSpec, shape) -> QuantState:
    """The learned (LSQ) state of a layer's kernel or input, with the integer zero
    point the grid uses."""
    state = qat.learned_state(shape, spec, jnp.asarray(params["lsq_scale"]),
                              params.get("lsq_zero_point"))
    return state.replace(
        zero_point=numerics.integer_zero_point(jnp, jnp.asarray(state.zero_point), spec))


def _int_kernel(path, kernel, w_spec, a_spec, *, weight_lsq=None, input_lsq=None,
                observed=None):
    """The ``QuantizedKernel`` of one QAT layer, and its ``ServedLayer`` report.

    ``weight_lsq`` / ``input_lsq``: the learned step sizes (``{"lsq_scale": ...[,
    "lsq_zero_point": ...]}``) of an ``lsq`` layer's kernel / input; ``observed``: the
    input observer's ``RangeState`` otherwise (``None`` or empty: dynamic input).
    """
    if w_spec is None:
        raise ValueError(f"layer {'/'.join(path)} keeps float weights (weight_bits=None); "
                         "an integer model needs quantized kernels.")
    lsq = weight_lsq is not None
    if lsq:
        w_state = _learned_state(weight_lsq, w_spec, kernel.shape)
    else:
        w_state = ops.calibrate(kernel, w_spec)
    weights = QuantizedArray.quantize(kernel, w_spec, state=w_state, pack=False)
    source, in_state = "dynamic", None
    if a_spec is not None and input_lsq is not None:
        source, in_state = "learned", _learned_state(input_lsq, a_spec, (1,))
    elif a_spec is not None and observed is not None and int(observed.count) > 0:
        source, in_state = "observed", observers.quant_state(observed, a_spec)
    return (QuantizedKernel(weights, in_state, a_spec),
            ServedLayer(path, w_spec, a_spec, lsq, source))


def to_served(model: nn.Module, variables, *args, **kwargs):
    """Params of the integer-served model, and a report of the layers converted.

    Deprecated: write the model with stock layers, quantize it with
    ``pychop_jax.quantize_model(model, rules)`` and serve it with
    ``pychop_jax.serve_model`` (one pipeline for linen, nnx, Equinox and functions).

    Args:
      model: a ``flax.linen`` model whose quantized layers are
        ``pychop_jax.linen.QuantDense`` / ``QuantConv``.
      variables: its trained variables (``params`` and, for observed inputs,
        ``quant_stats``).
      *args: a sample input for one evaluation call, which locates the quantized
        layers; its values do not matter.
      **kwargs: options of that call.

    Returns:
      ``(params, layers)``: the ``params`` collection with each quantized layer's
      ``kernel`` replaced by a ``QuantizedKernel`` (its ``lsq_*`` / ``input_quant``
      entries dropped), for the same architecture built from ``IntDense`` /
      ``IntConv``; and a list of ``ServedLayer``.  A layer whose observer saw no data
      gets ``input_state=None``: the served layer calibrates its input per call under
      the layer's input spec, as the QAT layer's evaluation does for the batch at hand
      (exactly so for the ``minmax`` and ``ema`` observers).  A layer whose input was
      never quantized (``act_bits=None``) is served with 8-bit dynamic inputs
      (``int_matmul.DEFAULT_INPUT_SPEC``): an integer product needs integer codes, so
      that layer's output only approximates the float-input evaluation.  Float and
      block-scale weight formats keep a float input float (see the module docstring).

    Raises:
      ValueError: a quantized layer that keeps float weights (``weight_bits=None``).
    """
    _deprecated('to_served')
    params = variables["params"]
    stats = variables.get("quant_stats", {})
    layers = _quant_layers(model, variables, args, kwargs)
    served = _copy(params)
    report = []
    for path, module in sorted(layers.items()):
        node = _subtree(params, path)
        lsq = module.lsq and module.weight_spec is not None
        kernel, layer = _int_kernel(
            path, jnp.asarray(node["kernel"]), module.weight_spec, module.act_spec,
            weight_lsq=node["WeightQuant_0"] if lsq else None,
            input_lsq=node["input_quant"] if lsq and module.act_spec is not None else None,
            observed=_subtree(stats, (*path, "input_quant", "range")))
        target = _subtree(served, path)
        target["kernel"] = kernel
        for key in ("WeightQuant_0", "input_quant"):
            target.pop(key, None)
        report.append(layer)
    return served, report


def to_served_nnx(model):
    """An integer-served copy of a ``flax.nnx`` model, and a report of the layers.

    Deprecated: see ``to_served``.

    ``model`` is built from ``pychop_jax.nnx.QuantDense`` / ``QuantConv`` (trained,
    its observers' ranges as they are now).  In the copy (``nnx.clone``; ``model``
    is left as it is) each such layer's ``kernel`` becomes a ``QuantizedKernel``, exactly
    as ``to_served`` builds it, its op slot ``int_dot_general`` /
    ``int_conv_general_dilated`` and its ``input_quant`` ``None``: the layer then
    runs as the stock ``nnx.Linear`` / ``nnx.Conv`` it extends, with integer ops.
    The rules for unobserved and unquantized inputs are ``to_served``'s.

    Returns:
      ``(served_model, layers)``, ``layers`` a list of ``ServedLayer``.

    Raises:
      ValueError: a quantized layer that keeps float weights (``weight_bits=None``).
    """
    _deprecated('to_served_nnx')
    from flax import nnx

    from ..flax import nnx as qnnx

    def lsq_params(module):
        if not module.lsq:
            return None
        params = {"lsq_scale": module.lsq_scale[...]}
        if module.lsq_zero_point is not None:
            params["lsq_zero_point"] = module.lsq_zero_point[...]
        return params

    served = nnx.clone(model)
    # listed first: the loop below changes the graph it would be walking
    layers = [(tuple(str(p) for p in path), layer) for path, layer in nnx.iter_modules(served)
              if isinstance(layer, qnnx._QuantLayer)]
    report = []
    for path, layer in layers:
        weight_quant, input_quant = getattr(layer, layer._op_slot), layer.input_quant
        kernel, entry = _int_kernel(
            path, layer.kernel[...], weight_quant.spec,
            None if input_quant is None else input_quant.spec,
            weight_lsq=lsq_params(weight_quant),
            input_lsq=None if input_quant is None else lsq_params(input_quant),
            observed=None if input_quant is None or input_quant.stats is None
            else input_quant.stats.get_value())
        layer.kernel = nnx.Param(kernel)
        # the slot held the WeightQuant module (data); a stock layer's op is static
        delattr(layer, layer._op_slot)
        setattr(layer, layer._op_slot, _INT_OPS[layer._op_slot])
        layer.promote_dtype = promote_dtype
        layer.input_quant = None
        report.append(entry)
    return served, report


_INT_OPS = {"dot_general": int_dot_general, "conv_general_dilated": int_conv_general_dilated}


def _copy(tree):
    """Plain nested dicts (flax FrozenDicts too), so that leaves can be replaced."""
    if hasattr(tree, "items"):
        return {k: _copy(v) for k, v in tree.items()}
    return tree
