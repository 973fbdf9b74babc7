"""Compact checkpoints of quantized parameter trees.

``save_quantized(path, tree)`` writes a msgpack file (``flax.serialization``'s
encoding) that holds, for every ``QuantizedArray`` leaf (also inside a served
``QuantizedKernel``), only its codes (packed or not), scale and (asymmetric only) zero
point plus the few fields of its spec (element and scale formats included; E8M0 /
float8 scales stay one byte each) —
no float copy of the weights — and float leaves as they are (a ``ScaledKernel``:
its kernel so, and its ``input_scale``).
``load_quantized(path)`` rebuilds the tree without needing a target structure.
Trees are nested ``dict``s (string keys) and ``list``s / ``tuple``s of arrays, which
is what Flax parameters are.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from ..core.qarray import QuantizedArray, storage_state
from ..core.spec import QuantSpec
from ..core.state import QuantState
from .int_matmul import QuantizedKernel
from .scaled_kernel import ScaledKernel

__all__ = ["save_quantized", "load_quantized", "to_bytes", "from_bytes"]

_FORMAT = "pychop-jax/quantized-tree/1"
_QA = "__quantized_array__"
_KERNEL = "__int_kernel__"
_SEQ = "__sequence__"
_SCALED = "__scaled_kernel__"
_STATE = "__quant_state__"
_BOXED = "__boxed__"


def _encode_spec(spec: QuantSpec) -> list:
    """The spec's fields as a list; the element / scale formats are appended (as ``""``
    when absent), so checkpoints of integer specs written before them still load."""
    axis = -1 if spec.axis is None else list(spec.axis) if spec.multi_axis else spec.axis
    return [spec.bits, spec.symmetric, spec.narrow_range, axis, spec.axis is None,
            0 if spec.group_size is None else spec.group_size,
            spec.dtype or "", spec.scale_dtype or "", spec.scale_rounding]


def _decode_spec(fields) -> QuantSpec:
    bits, symmetric, narrow, axis, per_tensor, group = fields[:6]
    dtype, scale_dtype, scale_rounding = (list(fields[6:9]) + ["", "", "floor"])[:3]
    if not per_tensor:
        axis = tuple(int(a) for a in axis) if isinstance(axis, (list, tuple)) else int(axis)
    return QuantSpec(bits=int(bits), symmetric=bool(symmetric), narrow_range=bool(narrow),
                     axis=None if per_tensor else axis, group_size=int(group) or None,
                     dtype=str(dtype) or None, scale_dtype=str(scale_dtype) or None,
                     scale_rounding=str(scale_rounding))


def _encode_state(state: QuantState) -> dict:
    """Scale (in the dtype it is held in: E8M0 / float8 for a ``QuantizedArray`` of a
    block-scale spec), spec fields, (asymmetric only: a symmetric one is 0) the zero
    point and a two-level spec's tensor scale."""
    stored = {"scale": np.asarray(state.scale), "spec": _encode_spec(state.spec)}
    if not state.spec.symmetric:
        stored["zero_point"] = np.asarray(state.zero_point)
    if state.tensor_scale is not None:
        stored["tensor_scale"] = np.asarray(state.tensor_scale)
    return stored


def _decode_state(d: dict) -> QuantState:
    spec = _decode_spec(d["spec"])
    scale = jnp.asarray(d["scale"])
    zero_point = (jnp.zeros(scale.shape, jnp.int32) if spec.symmetric
                  else jnp.asarray(d["zero_point"]))
    tensor_scale = jnp.asarray(d["tensor_scale"]) if "tensor_scale" in d else None
    return QuantState(scale, zero_point, spec, tensor_scale)


def _encode(node, path="root"):
    if isinstance(node, QuantizedArray):
        return {_QA: {**_encode_state(node.state), "codes": np.asarray(node.codes),
                      "shape": list(node.shape), "packed": node.packed}}
    if isinstance(node, QuantizedKernel):
        stored = {"weights": _encode(node.weights, f"{path}/weights")}
        if node.input_state is not None:
            stored["input_state"] = _encode_state(node.input_state)
        if node.input_spec is not None:
            stored["input_spec"] = _encode_spec(node.input_spec)
        return {_KERNEL: stored}
    if isinstance(node, ScaledKernel):
        return {_SCALED: {"kernel": _encode(node.kernel, f"{path}/kernel"),
                          "input_scale": np.asarray(node.input_scale)}}
    if isinstance(node, QuantState):
        return {_STATE: _encode_state(node)}
    box = _box_class(node)
    if box is not None:
        return {_BOXED: {"class": box, "names": [n if n is None else str(n) for n in node.names],
                         "value": _encode(node.value, f"{path}/value")}}
    if isinstance(node, dict):
        for k in node:
            if not isinstance(k, str):
                raise TypeError(f"{path}: checkpoint keys must be strings; got {k!r}")
        return {k: _encode(v, f"{path}/{k}") for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return {_SEQ: {str(i): _encode(v, f"{path}/{i}") for i, v in enumerate(node)}}
    if isinstance(node, (jax.Array, np.ndarray, np.generic, int, float, bool)):
        return np.asarray(node)
    raise TypeError(
        f"{path}: cannot store a {type(node).__name__} in a quantized checkpoint; "
        "trees of dicts, lists and arrays are supported."
    )


def _decode(node):
    if isinstance(node, dict) and _QA in node:
        d = node[_QA]
        return QuantizedArray(codes=jnp.asarray(d["codes"]), state=storage_state(_decode_state(d)),
                              shape=tuple(int(n) for n in d["shape"]), packed=bool(d["packed"]))
    if isinstance(node, dict) and _KERNEL in node:
        d = node[_KERNEL]
        state = _decode_state(d["input_state"]) if "input_state" in d else None
        spec = _decode_spec(d["input_spec"]) if "input_spec" in d else None
        return QuantizedKernel(_decode(d["weights"]), state, spec)
    if isinstance(node, dict) and _SCALED in node:
        d = node[_SCALED]
        return ScaledKernel(_decode(d["kernel"]), jnp.asarray(d["input_scale"]))
    if isinstance(node, dict) and _STATE in node:
        return _decode_state(node[_STATE])
    if isinstance(node, dict) and _BOXED in node:
        d = node[_BOXED]
        import flax.linen as nn
        from flax.core import meta

        cls = {"LogicallyPartitioned": nn.LogicallyPartitioned,
               "Partitioned": meta.Partitioned}[d["class"]]
        return cls(_decode(d["value"]), tuple(d["names"]))
    if isinstance(node, dict) and _SEQ in node:
        items = node[_SEQ]
        return [_decode(items[str(i)]) for i in range(len(items))]
    if isinstance(node, dict):
        return {k: _decode(v) for k, v in node.items()}
    return jnp.asarray(node)


def _box_class(node) -> str | None:
    """The name of a Flax partitioning box (``nn.LogicallyPartitioned`` /
    ``nn.Partitioned``: the value and its axis names are stored), else ``None``."""
    import sys

    meta = sys.modules.get("flax.core.meta")
    if meta is None or not isinstance(node, meta.Partitioned):
        return None
    return type(node).__name__ if type(node).__name__ in ("LogicallyPartitioned",
                                                          "Partitioned") else None


def to_bytes(tree) -> bytes:
    """Serialize a tree with ``QuantizedArray`` leaves (codes and scales only)."""
    from flax import serialization

    return serialization.msgpack_serialize({"format": _FORMAT, "tree": _encode(tree)})


def from_bytes(data: bytes):
    """Inverse of ``to_bytes`` (sequences come back as lists)."""
    from flax import serialization

    payload = serialization.msgpack_restore(data)
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise ValueError(f"not a pychop-jax quantized checkpoint (expected format {_FORMAT!r})")
    return _decode(payload["tree"])


def save_quantized(path: str | os.PathLike, tree) -> int:
    """Write ``tree`` -- served variables, or a served nnx / Equinox model (its
    ``served_variables()``) -- to ``path``; returns the number of bytes written."""
    if hasattr(tree, "served_variables"):
        tree = tree.served_variables()
    data = to_bytes(tree)
    with open(path, "wb") as f:
        f.write(data)
    return len(data)


def load_quantized(path: str | os.PathLike, like=None):
    """Read a tree written by ``save_quantized``; with ``like`` (a served nnx / Equinox
    model of the same structure, e.g. ``serve_model`` of a freshly built model), that
    model with the stored codes, scales and input quantizers."""
    with open(path, "rb") as f:
        tree = from_bytes(f.read())
    if like is None:
        return tree
    if not hasattr(like, "with_served_variables"):
        raise TypeError(f"load_quantized(like=...) takes a served nnx or Equinox model; got "
                        f"{type(like).__name__}.")
    return like.with_served_variables(tree)
