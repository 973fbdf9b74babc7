"""Finding weights by dataflow (``pychop_jax.transform.dataflow``), against references
written in the test: an einsum's contracted letters, hand-derived axes of views, the
reasons matmuls stay float."""

import string

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax

from pychop_jax.transform.dataflow import analyze, common_module
from pychop_jax.transform.tracing import leaf_paths


def graph(f, params, *args):
    leaves, tree = jax.tree_util.tree_flatten(params)
    closed = jax.make_jaxpr(lambda ls, *a: f(jax.tree_util.tree_unflatten(tree, ls), *a))(
        leaves, *args)
    return analyze(closed, leaf_paths(params))


def weights(g):
    """path -> (contracted axes, kinds of use)."""
    return {w.path: (w.contracted, tuple(u.kind for u in w.uses)) for w in g.weights.values()}


@st.composite
def einsums(draw):
    """An einsum of an activation and a weight (on a drawn side): letters of the weight
    are contracted (absent from the output), free, or batch (in all three)."""
    letters = list(string.ascii_lowercase[:8])
    n = draw(st.integers(2, 6))
    chosen = letters[:n]
    roles = {c: draw(st.sampled_from(["x", "w", "contract", "batch"])) for c in chosen}
    if "contract" not in roles.values():
        roles[chosen[0]] = "contract"
    x = [c for c in chosen if roles[c] in ("x", "contract", "batch")]
    w = [c for c in chosen if roles[c] in ("w", "contract", "batch")]
    x = draw(st.permutations(x))
    w = draw(st.permutations(w))
    out = draw(st.permutations([c for c in chosen if roles[c] in ("x", "w", "batch")]))
    sizes = {c: draw(st.integers(1, 3)) for c in chosen}
    left = draw(st.booleans())
    return x, w, out, sizes, left


@settings(max_examples=60, deadline=None)
@given(einsums())
def test_einsum_weight_contracts_the_letters_missing_from_the_output(spec):
    x, w, out, sizes, left = spec
    eq = (f"{''.join(w)},{''.join(x)}->{''.join(out)}" if left
          else f"{''.join(x)},{''.join(w)}->{''.join(out)}")
    xv = jnp.ones([sizes[c] for c in x])
    wv = jnp.ones([sizes[c] for c in w])

    def f(p, xv):
        return jnp.einsum(eq, p["w"], xv) if left else jnp.einsum(eq, xv, p["w"])

    g = graph(f, {"w": wv}, xv)
    expected = tuple(i for i, c in enumerate(w) if c not in out)
    if not expected:  # nothing contracted with the weight: a batch-only product
        return
    assert weights(g)["w"][0] == expected, eq


def test_views_keep_the_weight_and_map_its_axes():
    def f(p, x):
        y = x @ p["t"].T                                   # GPT-2: stored (out, in)
        y = y @ jnp.reshape(p["r"], (4, 6))                # reshape (2, 2, 6) -> (4, 6)
        y = y @ p["a"].astype(jnp.bfloat16).astype(jnp.float32)
        y = y @ p["s"][:, 1:3]                             # a slice
        y = y @ jnp.broadcast_to(p["b"], (3, 2, 2))[0]     # a broadcast, then indexing
        y = jnp.einsum("bd,d->b", y, jnp.squeeze(p["q"], 0))
        return y

    params = {"t": jnp.ones((4, 3)), "r": jnp.ones((2, 2, 6)), "a": jnp.ones((6, 6)),
              "s": jnp.ones((6, 4)), "b": jnp.ones((2, 2)), "q": jnp.ones((1, 2))}
    got = weights(graph(f, params, jnp.ones((5, 3))))
    assert got == {"t": ((1,), ("weight",)), "r": ((0, 1), ("weight",)),
                   "a": ((0,), ("weight",)), "s": ((0,), ("weight",)),
                   "b": ((0,), ("weight",)), "q": ((1,), ("weight",))}


def test_scan_slice_higher_order_and_control_flow():
    def f(p, x, flag):
        def body(c, w):
            return jnp.tanh(c @ w), None

        x, _ = lax.scan(body, x, p["stack"])                       # (layers, in, out)
        x = jax.checkpoint(lambda h: h @ p["remat"])(x)
        x = jax.jit(lambda h: h @ p["jit"])(x)
        x = lax.cond(flag, lambda h: h @ p["cond"], lambda h: h, x)
        x = lax.fori_loop(0, 2, lambda i, h: h @ p["stacked_loop"][i], x)
        x = lax.while_loop(lambda c: c[0] < 2, lambda c: (c[0] + 1, c[1] @ p["loop"]),
                           (0, x))[1]
        return x

    params = {k: jnp.ones((4, 4)) for k in ("remat", "jit", "cond", "loop")}
    params["stack"] = jnp.ones((3, 4, 4))
    params["stacked_loop"] = jnp.ones((2, 4, 4))
    g = graph(f, params, jnp.ones((2, 4)), True)
    got = weights(g)
    assert got["stack"] == ((1,), ("weight",))
    assert got["stacked_loop"][0] == (1,)
    for k in ("remat", "jit", "cond", "loop"):
        assert got[k] == ((0,), ("weight",)), k
    (scan_site,) = [u for u in g.weights[list(g.paths).index("stack")].uses]
    assert scan_site.stack == (3,) and scan_site.scanned == (0,)
    (indexed,) = g.weights[list(g.paths).index("stacked_loop")].uses
    assert indexed.scanned == ()  # indexed by the loop counter, not sliced by the scan
    loop_sites = [s for s in g.sites if s.weight == list(g.paths).index("loop")]
    assert all(s.loop for s in loop_sites)
    assert not [s for s in g.sites if s.kind == "float"]


def test_tied_embedding_is_one_weight_with_two_uses_and_norms_are_not_weights():
    def f(p, ids):
        h = jnp.take(p["embed"], ids, axis=0)
        h = h * p["norm"]["scale"] + p["norm"]["bias"]
        return h @ p["embed"].T

    params = {"embed": jnp.ones((10, 4)), "norm": {"scale": jnp.ones(4), "bias": jnp.zeros(4)}}
    got = weights(graph(f, params, jnp.array([[1, 2]])))
    assert got == {"embed": ((1,), ("lookup", "weight"))}


def test_matmuls_that_stay_float_say_why():
    @jax.custom_vjp
    def opaque(x):
        return x

    opaque.defvjp(lambda x: (x, None), lambda _, g: (g,))

    def f(p, x):
        y = x @ (p["masked"] * 0.5)                # computed from a parameter
        y = y @ (p["lora_a"] @ p["lora_b"])        # both operands parameters
        return y @ p["w"]

    params = {"masked": jnp.ones((4, 4)), "lora_a": jnp.ones((4, 2)),
              "lora_b": jnp.ones((2, 4)), "w": jnp.ones((4, 4))}
    g = graph(f, params, jnp.ones((2, 4)))
    reasons = [s.reason for s in g.sites if s.kind == "float"]
    assert any("masked reach it through mul" in r for r in reasons), reasons
    assert any("both operands are parameters" in r for r in reasons), reasons
    assert set(weights(g)) == {"w"}


def test_activation_products_belong_to_the_deepest_module_feeding_them():
    def f(p, x):
        q = x @ p["attn"]["query"]["kernel"]
        k = x @ p["attn"]["key"]["kernel"]
        probs = jax.nn.softmax(q @ k.T)
        v = x @ p["attn"]["value"]["kernel"]
        return probs @ v

    params = {"attn": {n: {"kernel": jnp.ones((4, 4))} for n in ("query", "key", "value")}}
    g = graph(f, params, jnp.ones((3, 4)))
    products = [s for s in g.sites if s.kind == "product"]
    assert [(s.module, s.index) for s in products] == [("attn", 0), ("attn", 1)]


@pytest.mark.parametrize("modules, common", [
    (["a/b/c", "a/b/d"], "a/b"), (["a/b", "a/bc"], "a"), (["x"], "x"), (["a", "b"], ""),
    (["blocks_0/attn/query", "blocks_0/attn/key", "blocks_0/attn"], "blocks_0/attn")])
def test_common_module(modules, common):
    assert common_module(modules) == common


def test_parameters_that_are_not_floats_are_not_weights():
    def f(p, x):
        return x @ p["w"] + p["step"].astype(jnp.float32)

    g = graph(f, {"w": jnp.ones((3, 2)), "step": np.int32(3)}, jnp.ones((1, 3)))
    assert set(weights(g)) == {"w"}
