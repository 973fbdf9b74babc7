"""Views of a weight (``pychop_jax.transform.views``): reshape grouping against a brute
force, and companions (scales, zero points, input factors) through every view against
the view of the fully expanded companion (NumPy repeats written in the test)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax

from pychop_jax.transform import views


def numpy_expand(comp, shape):
    """The companion as one value per element: size-1 axes broadcast, groups repeated."""
    comp = np.asarray(comp)
    for d, (c, n) in enumerate(zip(comp.shape, shape, strict=True)):
        if c != n:
            comp = np.repeat(comp, n // c, axis=d) if c != 1 else \
                np.broadcast_to(comp, comp.shape[:d] + (n,) + comp.shape[d + 1:])
    return comp


def structural_eqn(fn, x):
    """The view equation ``fn`` applies to ``x`` (the first that consumes ``x``), and the
    values of its other operands; ``None`` when ``fn`` is no equation (an identity)."""
    closed = jax.make_jaxpr(fn)(x)
    env = dict(zip(closed.jaxpr.invars, [x], strict=True))
    env.update(zip(closed.jaxpr.constvars, closed.consts, strict=True))
    read = lambda v: v.val if hasattr(v, "val") else env[v]  # noqa: E731
    for eqn in closed.jaxpr.eqns:
        vals = [read(v) for v in eqn.invars]
        if eqn.invars and eqn.invars[0] is closed.jaxpr.invars[0]:
            return eqn, vals[1:]
        out = eqn.primitive.bind(*vals, **eqn.params)
        env.update(zip(eqn.outvars, out if eqn.primitive.multiple_results else [out],
                       strict=True))
    return None, None


@st.composite
def shapes_and_companions(draw):
    ndim = draw(st.integers(1, 4))
    shape, comp_shape = [], []
    for _ in range(ndim):
        n = draw(st.sampled_from([1, 2, 3, 4, 6, 8]))
        kind = draw(st.sampled_from(["one", "full", "group"]))
        divisors = [g for g in (2, 3, 4) if n % g == 0 and g < n]
        if kind == "group" and divisors:
            comp_shape.append(n // draw(st.sampled_from(divisors)))
        else:
            comp_shape.append(1 if kind == "one" else n)
        shape.append(n)
    values = np.arange(1, math.prod(comp_shape) + 1, dtype=np.float32).reshape(comp_shape)
    return tuple(shape), values


def ops_for(shape, draw):
    """A structural op applicable to an array of ``shape``."""
    ndim = len(shape)
    choices = ["transpose", "reshape_merge", "reshape_split", "broadcast", "slice",
               "dynamic_slice", "expand_dims"]
    if 1 in shape:
        choices.append("squeeze")
    kind = draw(st.sampled_from(choices))
    if kind == "transpose":
        perm = tuple(draw(st.permutations(range(ndim))))
        return kind, lambda x: jnp.transpose(x, perm)
    if kind == "reshape_merge" and ndim >= 2:
        d = draw(st.integers(0, ndim - 2))
        new = shape[:d] + (shape[d] * shape[d + 1],) + shape[d + 2:]
        return kind, lambda x: jnp.reshape(x, new)
    if kind == "reshape_split":
        d = draw(st.integers(0, ndim - 1))
        n = shape[d]
        f = next((f for f in (2, 3) if n % f == 0 and n > f), None)
        if f is not None:
            new = shape[:d] + (f, n // f) + shape[d + 1:]
            return kind, lambda x: jnp.reshape(x, new)
    if kind == "broadcast":
        return kind, lambda x: lax.broadcast_in_dim(x, (3,) + shape, tuple(range(1, ndim + 1)))
    if kind == "squeeze":
        d = shape.index(1)
        return kind, lambda x: jnp.squeeze(x, d)
    if kind == "slice":
        d = draw(st.integers(0, ndim - 1))
        lo = draw(st.integers(0, shape[d] - 1))
        hi = draw(st.integers(lo + 1, shape[d]))
        return kind, lambda x: lax.slice_in_dim(x, lo, hi, axis=d)
    if kind == "dynamic_slice":
        d = draw(st.integers(0, ndim - 1))
        size = draw(st.integers(1, shape[d]))
        start = draw(st.integers(0, shape[d] - size))
        return kind, lambda x: lax.dynamic_slice_in_dim(x, jnp.int32(start), size, axis=d)
    d = draw(st.integers(0, ndim))
    return "expand_dims", lambda x: jnp.expand_dims(x, d)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_companion_follows_every_view(data):
    shape, comp = data.draw(shapes_and_companions())
    _, op = ops_for(shape, data.draw)
    eqn, dynamic = structural_eqn(op, jnp.zeros(shape, jnp.float32))
    if eqn is None:  # an identity view: no equation
        return
    assert views.is_structural(eqn), eqn
    out = views.apply_to_companion(eqn, jnp.asarray(comp), dynamic)
    out_shape = tuple(eqn.outvars[0].aval.shape)
    expected = np.asarray(eqn.primitive.bind(jnp.asarray(numpy_expand(comp, shape)),
                                             *dynamic, **eqn.params))
    got = numpy_expand(np.asarray(out), out_shape)
    np.testing.assert_array_equal(got, expected)
    # what stays compact stays compact: no axis grows beyond the output's
    assert all(c <= n for c, n in zip(np.shape(out), out_shape, strict=True))


def brute_force_groups(src, dst):
    """The minimal groups of a reshape, by prefix products (size-1 axes apart)."""
    src_p = [math.prod(src[:i]) for i in range(len(src) + 1)]
    dst_p = [math.prod(dst[:i]) for i in range(len(dst) + 1)]
    cuts = sorted(set(src_p) & set(dst_p))
    return cuts


@pytest.mark.parametrize("src, dst", [((4, 6), (2, 2, 6)), ((1, 4, 6), (24,)), ((4, 6), (1, 24, 1)),
                                      ((2, 3, 4), (6, 4)), ((6, 4), (2, 12)), ((3,), (3,)),
                                      ((2, 1, 3), (2, 3)), ((8,), (2, 2, 2))])
def test_reshape_groups_pair_equal_products(src, dst):
    groups = views.reshape_groups(src, dst)
    assert sorted(a for si, _ in groups for a in si) == list(range(len(src)))
    assert sorted(b for _, dj in groups for b in dj) == list(range(len(dst)))
    for si, dj in groups:
        assert math.prod(src[a] for a in si) == math.prod(dst[b] for b in dj)
    # minimal: a group of several non-1 axes on both sides spans no interior cut
    cuts = brute_force_groups([n for n in src if n != 1], [n for n in dst if n != 1])
    assert len([g for g in groups if g[0] and g[1]]) == len(cuts) - 1


def test_map_axes_through_views():
    eqn, _ = structural_eqn(lambda x: jnp.reshape(x, (4, 6)), jnp.zeros((4, 2, 3)))
    assert views.map_axes(eqn, ((2,), (0,), (1,))) == ((2,), (0, 1))
    eqn, _ = structural_eqn(lambda x: jnp.broadcast_to(x, (5, 2, 3)), jnp.zeros((2, 3)))
    assert views.map_axes(eqn, ((0,), (1,))) == ((), (0,), (1,))
