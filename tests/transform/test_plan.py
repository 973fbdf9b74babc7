"""Rules laid on traced weights (``pychop_jax.transform.plan``): what ``weight=`` means
whatever the storage layout, configuration errors named all at once, and where each
state lives."""

import jax
import jax.numpy as jnp
import pytest

import pychop_jax as pj
from pychop_jax import QuantRule, QuantSpec


def report(f, rules, params, *args):
    return pj.quantization_report(f, rules, params, *args)


def specs(rep):
    return {path: op.weight_spec for path, op in rep.weights().items()}


def layers(p, x):
    y = x @ p["dense"]                                   # (in, out)
    y = y @ p["gpt2"].T                                  # (out, in), transposed
    y = jnp.einsum("bd,dnh->bnh", y, p["einsum"])        # (d, heads, head_dim)
    y = jnp.einsum("bnh,nhd->bd", y, p["out"])           # (heads, head_dim, d)

    def body(h, w):
        return h @ w, None

    y, _ = jax.lax.scan(body, y, p["stack"])            # (layers, in, out)
    return y


PARAMS = {"dense": jnp.ones((8, 16)), "gpt2": jnp.ones((64, 16)),
          "einsum": jnp.ones((64, 2, 32)), "out": jnp.ones((2, 32, 64)),
          "stack": jnp.ones((3, 64, 64))}
X = jnp.ones((1, 8))


def test_int_weight_is_per_output_channel_whatever_the_layout():
    got = specs(report(layers, QuantRule(".*", weight=8), PARAMS, X))
    expected_axes = {"dense": 1, "gpt2": 0, "einsum": (1, 2), "out": 2, "stack": (0, 2)}
    for path, axis in expected_axes.items():
        assert got[path] == QuantSpec(bits=8, symmetric=True, axis=axis), path


def test_groups_lie_along_the_last_contracted_axis():
    rule = QuantRule(".*", weight=QuantSpec(bits=4, symmetric=True, axis=0, group_size=16))
    got = specs(report(layers, rule, PARAMS, X))
    # (axis, group): one group spans an axis no longer than the group
    expected = {"dense": (0, 8), "gpt2": (1, 16), "einsum": (0, 16), "out": (1, 16),
                "stack": (1, 16)}
    for path, (axis, group) in expected.items():
        assert (got[path].axis, got[path].group_size) == (axis, group), path
    per_tensor = specs(report(layers, QuantRule(".*", weight=QuantSpec(bits=4, symmetric=True)),
                              PARAMS, X))
    assert all(s.axis is None for s in per_tensor.values())


def test_configuration_errors_are_all_named_at_once():
    rule = QuantRule(".*", weight=QuantSpec(bits=4, symmetric=True, axis=0, group_size=24))
    with pytest.raises(ValueError) as e:
        report(layers, rule, PARAMS, X)
    message = str(e.value)
    for path in ("'einsum'", "'out'", "'stack'"):  # 64, 32 and 64 long: 24 divides none
        assert path in message
    assert "'gpt2'" not in message and "'dense'" not in message  # 16, 8 <= 24: one group
    assert "shape (2, 32, 64)" in message and "dot_general" in message and "24" in message


def test_block_inputs_must_lie_along_the_contraction():
    def f(p, x):
        return jnp.einsum("bd,de->be", x.T, p["w"])  # contracts x.T's last axis: fine

    def g(p, x):
        return jnp.einsum("db,de->be", x, p["w"])    # x's last axis is free

    x, params = jnp.ones((32, 32)), {"w": jnp.ones((32, 32))}
    rule = QuantRule(".*", weight=8, act=pj.formats.MXFP8_E4M3)
    report(f, rule, params, x)
    with pytest.raises(ValueError, match="does not contract the input's last axis"):
        report(g, rule, params, x)


def test_state_keys_mirror_the_parameter_tree():
    def f(p, ids):
        h = jnp.take(p["embed"]["table"], ids, axis=0)
        h = h @ p["mlp"]["w"]
        h = h @ p["mlp"]["w"]                         # the same weight twice
        h = (h @ h.swapaxes(-1, -2)) @ h              # two products
        return h @ p["embed"]["table"].T              # tied output projection

    params = {"embed": {"table": jnp.ones((10, 4))}, "mlp": {"w": jnp.ones((4, 4))}}
    ids = jnp.array([[1, 2, 3]])
    qf = pj.quantize_model(f, QuantRule(".*", weight=8, act=8, attention=8))
    v = qf.init(params, ids)
    stats = jax.tree_util.tree_map(jnp.shape, v["quant_stats"])
    assert set(stats["mlp"]["w"]) == {"input", "input_1"}
    assert set(stats["embed"]["table"]) == {"input"}  # the lookup's input is ids
    # the products' operands come from mlp/w's matmuls: they belong to module "mlp"
    assert set(stats) == {"embed", "mlp"}
    assert set(stats["mlp"]) == {"w", "product_0", "product_1"}
    assert set(stats["mlp"]["product_0"]) == {"lhs", "rhs"}


def test_lsq_state_and_method_results_are_per_weight():
    qf = pj.quantize_model(lambda p, x: x @ p["w"], QuantRule(".*", weight=4, act=8, lsq=True))
    v = qf.init({"w": jnp.ones((4, 6)) * jnp.arange(6.0)}, jnp.ones((2, 4)))
    learned = jax.tree_util.tree_map(jnp.shape, v["quant_params"])
    assert learned == {"w": {"weight_scale": (1, 6), "input_scale": (),
                             "input_zero_point": ()}}
