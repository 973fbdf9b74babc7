"""Tracing a model to a function of its parameters, once per signature.

Every framework reaches the transform as a function ``fn(params, dynamic)``: its
parameters (a pytree of arrays: the candidate weights) and the rest of what varies
between calls (inputs, other variable collections, PRNG keys), a pytree of arrays.
Everything else a call takes (Python numbers, booleans, strings, ``None``) is static:
``split_static`` separates it, and it is part of the signature.

``Traces.get`` traces ``fn`` abstractly (``jax.make_jaxpr`` on shapes and dtypes, so
it works inside ``jit`` / ``grad`` with tracers as inputs), analyzes the jaxpr
(``dataflow.analyze``) and resolves the rules on it (``plan.make_plan``), once per
signature -- the cost of the transform is trace time.  ``Traces.run`` evaluates the
traced function on concrete (or traced) values with a handler (``interpret.run``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from ..core.qarray import QuantizedArray
from . import interpret
from .dataflow import analyze
from .plan import Plan, make_plan

__all__ = ["Traced", "Traces", "split_static", "join_static", "key_name", "leaf_paths",
           "is_array"]


def is_array(x) -> bool:
    """Whether a leaf varies between calls as data (an array, a tracer of one, its
    abstract ``jax.ShapeDtypeStruct``, or a ``QuantizedArray``: a quantized cache)."""
    return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct,
                          jax.core.Tracer, QuantizedArray))


def _is_quantized(x) -> bool:
    return isinstance(x, QuantizedArray)


@dataclasses.dataclass(frozen=True)
class _Static:
    """A call's non-array leaves (hashable: part of the signature)."""

    treedef: Any
    values: tuple


def split_static(tree):
    """``(arrays, static)``: the array leaves of ``tree`` (a list) and the rest."""
    leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=_is_quantized)
    arrays = [x for x in leaves if is_array(x)]
    values = tuple(None if is_array(x) else _hashable(x) for x in leaves)
    return arrays, _Static(treedef, values)


def join_static(arrays, static: _Static):
    """Inverse of ``split_static``."""
    it = iter(arrays)
    leaves = [next(it) if v is None else _unwrap(v) for v in static.values]
    return jax.tree_util.tree_unflatten(static.treedef, leaves)


@dataclasses.dataclass(frozen=True)
class _Unhashable:
    value: Any

    def __hash__(self):
        return id(self.value)

    def __eq__(self, other):
        return isinstance(other, _Unhashable) and other.value is self.value


def _hashable(x):
    try:
        hash(x)
    except TypeError:
        return _Unhashable(x)
    return ("v", x)


def _unwrap(v):
    return v.value if isinstance(v, _Unhashable) else v[1]


def key_name(k) -> str:
    """A pytree path key as a name (dict key, sequence index, attribute)."""
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def leaf_paths(tree, skip: Callable | None = None, is_leaf=None):
    """``"/"``-joined paths of ``tree``'s leaves; ``skip(key)`` drops keys (box
    attributes) from the names.  With ``is_leaf``: ``(paths of every leaf, paths of the
    array leaves only)`` (``is_array``; what ``split_static`` keeps)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    names = ["/".join(key_name(k) for k in path if skip is None or not skip(k))
             for path, _ in flat]
    if is_leaf is None:
        return names
    return names, [n for n, (_, x) in zip(names, flat, strict=True) if is_array(x)]


@dataclasses.dataclass(frozen=True)
class Traced:
    """One signature of a traced model: its plan and how to flatten its calls."""

    plan: Plan
    params_tree: Any
    dynamic_tree: Any
    out_tree: Any

    @property
    def graph(self):
        return self.plan.graph


def _aval(x):
    if isinstance(x, QuantizedArray):  # a quantized cache stands for float32 values
        return jax.ShapeDtypeStruct(x.shape, jax.numpy.float32)
    return jax.ShapeDtypeStruct(np.shape(x), jax.numpy.result_type(x),
                                weak_type=bool(getattr(x, "weak_type", False)))


class Traces:
    """The traces of one quantized model, by signature (see the module docstring)."""

    def __init__(self, rules):
        self.rules = tuple(rules)
        self._cache: dict = {}
        self.last: Traced | None = None

    def get(self, fn: Callable, params, dynamic, key, paths: list[str],
            state_paths: dict | None = None) -> Traced:
        """The trace of ``fn(params, dynamic)``; ``key``: the static part of the
        signature (method, static arguments, ...); ``paths``: the names of ``params``'
        leaves; ``state_paths``: ``{position among dynamic's leaves: name}`` of the
        model's state (caches)."""
        p_leaves, p_tree = jax.tree_util.tree_flatten(params)
        d_leaves, d_tree = jax.tree_util.tree_flatten(dynamic, is_leaf=_is_quantized)
        avals = tuple(_aval(x) for x in (*p_leaves, *d_leaves))
        cache_key = (key, p_tree, d_tree, tuple((a.shape, a.dtype, a.weak_type) for a in avals),
                     tuple(sorted((state_paths or {}).items())))
        traced = self._cache.get(cache_key)
        if traced is None:
            n = len(p_leaves)
            out_tree = {}

            def flat_out(*leaves):
                out = fn(jax.tree_util.tree_unflatten(p_tree, leaves[:n]),
                         jax.tree_util.tree_unflatten(d_tree, leaves[n:]))
                flat_leaves, out_tree["tree"] = jax.tree_util.tree_flatten(out)
                return flat_leaves

            closed = jax.make_jaxpr(flat_out)(*avals)
            states = {n + i: path for i, path in (state_paths or {}).items()}
            plan = make_plan(analyze(closed, paths, state_paths=states), self.rules)
            traced = Traced(plan, p_tree, d_tree, out_tree["tree"])
            self._cache[cache_key] = traced
        self.last = traced
        return traced

    @staticmethod
    def run(traced: Traced, handler, params, dynamic, scope=None):
        """``(outputs, scope)`` of the traced function with ``handler``."""
        leaves = [*jax.tree_util.tree_leaves(params, is_leaf=handler_leaf(handler)),
                  *jax.tree_util.tree_leaves(dynamic, is_leaf=_is_quantized)]
        outs, scope = interpret.run(traced.graph, handler, leaves, scope)
        return jax.tree_util.tree_unflatten(traced.out_tree, outs), scope


def handler_leaf(handler):
    """The ``is_leaf`` of a handler whose parameters are not plain arrays (served codes)."""
    return getattr(handler, "is_param_leaf", None)
