"""Views of a weight: the primitives that move a parameter's elements without computing
with them, and how they act on the axes and on scale-like arrays.

A parameter reaches a matmul through *structural* primitives -- ``transpose``,
``reshape``, ``broadcast_in_dim``, ``squeeze``, ``convert_element_type``, ``copy``,
``slice``, ``dynamic_slice``, a single-slice ``gather`` (``w[i]``), sharding and
checkpoint-name annotations -- and the value at the matmul is a *view* of it.  Two
things follow a weight through its views:

* its **axis map** (``map_axes``): for every axis of the view, the tuple of parameter
  axes it spans (``()`` for an axis a broadcast added; several for axes a reshape
  merged).  The matmul's dimension numbers, read through it, say which parameter axes
  are contracted, whatever the storage layout (GPT-2's transposed ``(out, in)``
  kernels, einsum kernels, stacked ``(layers, in, out)`` kernels);
* its **companions** (``apply_to_companion``): arrays broadcastable against the weight
  -- scales and zero points ``(1, n)``, per-group scales ``(k / g, n)``, an AWQ input
  factor ``(k, 1)`` -- that must follow the same view.  Each companion axis is either
  size 1 (constant along it), full (one value per element) or grouped (one value per
  block of ``g`` consecutive elements); the view keeps it that way where it can and
  expands a group to full elements only where a view cuts through groups.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

__all__ = ["STRUCTURAL", "IDENTITY", "is_structural", "map_axes", "reshape_groups",
           "gathered_axes", "apply_to_companion", "expand_to"]

#: primitives whose output is their (first) input, element for element
IDENTITY = frozenset({"convert_element_type", "copy", "copy_p", "reduce_precision",
                      "sharding_constraint", "name", "mesh_cast", "pvary", "device_put",
                      "optimization_barrier"})
#: primitives that move elements: the identity ones and these
STRUCTURAL = IDENTITY | {"transpose", "reshape", "broadcast_in_dim", "squeeze", "slice",
                         "dynamic_slice", "gather", "expand_dims"}


def gathered_axes(params, operand_shape) -> set:
    """The operand axes a ``gather`` picks rows along: collapsed ones, and indexed ones it
    does not take whole (an index on an axis taken whole is 0: ``vmap`` of
    ``dynamic_slice`` makes such gathers)."""
    dn, sizes = params["dimension_numbers"], params["slice_sizes"]
    return set(dn.collapsed_slice_dims) | {d for d in dn.start_index_map
                                           if sizes[d] < operand_shape[d]}


def is_structural(eqn) -> bool:
    """Whether ``eqn`` is a view of its first operand (see the module docstring).  A
    ``gather`` is one too (``w[i]``, ``table[ids]``); an indexing whose result is then
    used as a value rather than a matmul's weight is a lookup
    (``dataflow``)."""
    return eqn.primitive.name in STRUCTURAL


def reshape_groups(src, dst):
    """Pair the axes of a reshape from ``src`` to ``dst``: a list of ``(src axes, dst
    axes)`` groups of equal element counts, minimal, in order.  Size-1 axes form groups
    of their own (``((i,), ())`` dropped, ``((), (j,))`` added)."""
    src, dst = tuple(int(n) for n in src), tuple(int(n) for n in dst)
    groups, i, j = [], 0, 0
    while i < len(src) or j < len(dst):
        if i < len(src) and src[i] == 1:
            groups.append(((i,), ()))
            i += 1
            continue
        if j < len(dst) and dst[j] == 1:
            groups.append(((), (j,)))
            j += 1
            continue
        si, dj = [i], [j]
        ps, pd = src[i], dst[j]
        i, j = i + 1, j + 1
        while ps != pd:
            if ps < pd:
                ps *= src[i]
                si.append(i)
                i += 1
            else:
                pd *= dst[j]
                dj.append(j)
                j += 1
        groups.append((tuple(si), tuple(dj)))
    return groups


def map_axes(eqn, axes):
    """The axis map of ``eqn``'s output, given its first operand's (``axes``: a tuple
    of parameter-axis tuples, one per operand axis); ``eqn`` is structural."""
    name, p = eqn.primitive.name, eqn.params
    if name in IDENTITY or name in ("slice", "dynamic_slice"):
        return axes
    if name == "transpose":
        return tuple(axes[a] for a in p["permutation"])
    if name == "squeeze":
        dims = {d % len(axes) for d in p["dimensions"]}
        return tuple(a for d, a in enumerate(axes) if d not in dims)
    if name == "expand_dims":
        out = list(axes)
        for d in sorted(p["dimensions"]):
            out.insert(d, ())
        return tuple(out)
    if name == "broadcast_in_dim":
        out = [()] * len(p["shape"])
        for k, d in enumerate(p["broadcast_dimensions"]):
            out[d] = axes[k]
        return tuple(out)
    if name == "reshape":
        src = eqn.invars[0].aval.shape
        out = [()] * len(p["new_sizes"])
        for si, dj in reshape_groups(src, p["new_sizes"]):
            spanned = tuple(sorted({a for s in si for a in axes[s]}))
            for d in dj:
                out[d] = spanned
        return tuple(out)
    if name == "gather":  # the offset axes are the uncollapsed ones; the rest index rows
        dn = p["dimension_numbers"]
        kept = [d for d in range(len(axes)) if d not in dn.collapsed_slice_dims
                and d not in dn.operand_batching_dims]
        out = [()] * len(eqn.outvars[0].aval.shape)
        for d, od in zip(kept, dn.offset_dims, strict=True):
            out[od] = axes[d]
        return tuple(out)
    raise NotImplementedError(name)


# -- companions ---------------------------------------------------------------------------
def expand_to(comp, shape, axes=None):
    """``comp`` with the axes ``axes`` (default: all) expanded to one value per element
    of ``shape``: a size-1 axis broadcast, a group of ``g`` repeating its value ``g``
    times."""
    comp = jnp.asarray(comp)
    for d in range(len(shape)) if axes is None else sorted(axes):
        c, n = comp.shape[d], shape[d]
        if c == n:
            continue
        if c == 1:
            comp = jnp.broadcast_to(comp, comp.shape[:d] + (n,) + comp.shape[d + 1:])
        else:
            comp = jnp.repeat(comp, n // c, axis=d)
    return comp


def apply_to_companion(eqn, comp, dynamic=()):
    """The companion ``comp`` (broadcastable against ``eqn``'s first operand) of the
    view ``eqn`` makes: broadcastable against ``eqn``'s output.  ``dynamic``: the
    values of ``eqn``'s other operands (``dynamic_slice`` / ``gather`` indices)."""
    name, p = eqn.primitive.name, eqn.params
    shape = tuple(eqn.invars[0].aval.shape)
    out_shape = tuple(eqn.outvars[0].aval.shape)
    comp = jnp.asarray(comp)
    if name in IDENTITY:
        return comp
    if name == "transpose":
        return jnp.transpose(comp, p["permutation"])
    if name == "squeeze":
        return jnp.squeeze(comp, tuple(d % len(shape) for d in p["dimensions"]))
    if name == "expand_dims":
        return jnp.reshape(comp, _with_ones(comp.shape, out_shape, p["dimensions"]))
    if name == "broadcast_in_dim":  # broadcast_dimensions increase: a reshape adding 1s
        sizes = [1] * len(out_shape)
        for k, d in enumerate(p["broadcast_dimensions"]):
            sizes[d] = comp.shape[k]
        return jnp.reshape(comp, sizes)
    if name == "reshape":
        return _reshape_companion(comp, shape, tuple(p["new_sizes"]))
    if name == "slice":
        return _slice_companion(comp, shape, p["start_indices"], p["limit_indices"],
                                p["strides"])
    if name == "dynamic_slice":
        return _dynamic_slice_companion(comp, shape, dynamic, p["slice_sizes"])
    if name == "gather":
        full = expand_to(comp, shape)
        return eqn.primitive.bind(full, *dynamic, **p)
    raise NotImplementedError(name)


def _with_ones(shape, out_shape, dims):
    out = list(shape)
    for d in sorted(dims):
        out.insert(d, 1)
    assert len(out) == len(out_shape)
    return out


def _reshape_companion(comp, shape, new):
    """A reshape of a companion, group by group of the reshape (``reshape_groups``):
    size 1 where it is constant over the whole group, kept as it is where the group
    renames one axis, else expanded to one value per element and reshaped."""
    groups = reshape_groups(shape, new)
    sizes, expand = [1] * len(new), set()
    for si, dj in groups:
        if all(comp.shape[s] == 1 for s in si):
            continue
        if len(si) == 1 and len(dj) == 1:
            sizes[dj[0]] = comp.shape[si[0]]
            continue
        expand.update(si)
        for d in dj:
            sizes[d] = new[d]
    if expand:
        comp = expand_to(comp, shape, axes=expand)
    return jnp.reshape(comp, sizes)


def _slice_companion(comp, shape, start, limit, strides):
    strides = strides or (1,) * len(shape)
    for d, (c, n) in enumerate(zip(comp.shape, shape, strict=True)):
        lo, hi, st = start[d], limit[d], strides[d]
        if c == 1 or (lo, hi, st) == (0, n, 1):
            continue
        if c != n:
            g = n // c
            if st == 1 and lo % g == 0 and hi % g == 0:
                comp = lax.slice_in_dim(comp, lo // g, hi // g, axis=d)
                continue
            comp = jnp.repeat(comp, g, axis=d)
        comp = lax.slice_in_dim(comp, lo, hi, st, axis=d)
    return comp


def _dynamic_slice_companion(comp, shape, starts, sizes):
    for d, (c, n) in enumerate(zip(comp.shape, shape, strict=True)):
        if c == 1 or sizes[d] == n:
            continue
        if c != n:
            comp = jnp.repeat(comp, n // c, axis=d)
        start = jnp.clip(jnp.asarray(starts[d], jnp.int32), 0, n - sizes[d])
        comp = lax.dynamic_slice_in_dim(comp, start, sizes[d], axis=d)
    return comp
