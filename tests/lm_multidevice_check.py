"""Run by tests/test_multidevice.py in a fresh process with 8 simulated CPU devices:
a QAT training step of the example LM, data-parallel and with kernels sharded along
their output dimension, against the same step on one device; then serving."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)

import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import transformer_lm as ex  # noqa: E402
import transformer_lm_model as lm  # noqa: E402

import pychop_jax as pj  # noqa: E402

CONFIG = lm.Config(d_model=32, num_heads=2, num_layers=1, mlp_ratio=4, max_len=16)
STATS = "quant_stats"


def kernel_spec(path, leaf, model_axis=4):
    """Shard a kernel / embedding table along its last (output) axis over 'model'."""
    name = jax.tree_util.keystr(path)
    if leaf.ndim >= 2 and ("kernel" in name or "embedding" in name) \
            and leaf.shape[-1] % model_axis == 0:
        return P(*([None] * (leaf.ndim - 1)), "model")
    return P()


def main():
    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    model, params = lm.init_linen(CONFIG, seed=3)
    # int4 weights in groups of 16 along the inputs + int8 inputs (EMA observers)
    rules = [*ex.group_rules(CONFIG, group=16)[:-1],
             pj.QuantRule(".*", weight=ex.group_rules(CONFIG, group=16)[-1].weight, act=8)]
    qmodel = pj.quantize_model(model, rules)
    rng = np.random.default_rng(0)
    batches = [(jnp.asarray(rng.integers(0, 256, (8, 16)), jnp.int32),
                jnp.asarray(rng.integers(0, 256, (8, 16)), jnp.int32)) for _ in range(3)]
    stats = jax.jit(qmodel.init)(jax.random.key(0), batches[0][0][:1])[STATS]
    # SGD, not Adam: Adam scales a gradient of float noise (a parameter that barely
    # matters) up to a step of the learning rate, whatever its summation order
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.5, momentum=0.9))

    @jax.jit
    def step(params, stats, opt_state, x, y):
        def loss_fn(params):
            logits, upd = qmodel.apply({"params": params, STATS: stats}, x, mutable=[STATS])
            return ex.cross_entropy(logits, y), upd[STATS]

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, loss

    def run(params, stats, put=lambda a, spec: a):
        opt_state = tx.init(params)
        losses = []
        for x, y in batches:
            params, stats, opt_state, loss = step(params, stats, opt_state,
                                                  put(x, P("data")), put(y, P("data")))
            losses.append(float(loss))
        return params, stats, losses

    ref_params, ref_stats, ref_losses = run(params, stats)

    shardings = jax.tree_util.tree_map_with_path(
        lambda p, a: NamedSharding(mesh, kernel_spec(p, a)), params)
    sharded = jax.device_put(params, shardings)
    n_sharded = sum(s.spec != P() for s in jax.tree.leaves(shardings))
    assert n_sharded == 9, n_sharded  # 2 embeddings, q, k, v, out, mlp_in, mlp_out, head
    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))  # noqa: E731
    new_params, new_stats, losses = run(sharded, stats, put)
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    assert losses[-1] != losses[0]
    # the kernels stay sharded along their outputs through the optimizer step
    for path, leaf in jax.tree_util.tree_flatten_with_path(new_params)[0]:
        want = kernel_spec(path, leaf)
        if want == P():
            continue  # XLA may shard a bias like its kernel's output: left to it
        assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, want), leaf.ndim), \
            (jax.tree_util.keystr(path), leaf.sharding)
    for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(ref_params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)  # lr 0.5, 3 steps
    for a, b in zip(jax.tree.leaves(new_stats), jax.tree.leaves(ref_stats), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    # serving: w8a8 rules, ranges from the batches; the sharded served params keep the
    # kernels' output sharding and compute what the single-device served model does
    w8a8 = pj.quantize_model(model, ex.per_channel_rules(CONFIG, act=8))
    observe = jax.jit(lambda v, x: w8a8.apply(v, x, mutable=[STATS])[1])
    variables = {"params": ref_params, STATS: jax.jit(w8a8.init)(jax.random.key(0),
                                                                  batches[0][0][:1])[STATS]}
    for x, _ in batches:
        variables = {**variables, **observe(variables, x)}
    served_fn, served = pj.serve_model(w8a8, variables, batches[0][0][:1])
    sharded_vars = {**variables, "params": jax.device_put(variables["params"], shardings)}
    s_fn, s_served = pj.serve_model(w8a8, sharded_vars, batches[0][0][:1])
    kernel = s_served["params"]["blocks_0"]["mlp_in"]["kernel"]
    assert isinstance(kernel, pj.QuantizedArray)
    for a in (kernel.codes, kernel.state.scale):
        assert a.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "model")), 2), \
            a.sharding
    qkv = s_served["params"]["blocks_0"]["attn"]["query"]["kernel"]
    assert qkv.codes.sharding.is_equivalent_to(NamedSharding(mesh, P(None, None, "model")), 3)
    x = put(batches[0][0], P("data"))
    np.testing.assert_allclose(jax.jit(s_fn)(s_served, x),
                               jax.jit(served_fn)(served, batches[0][0]), rtol=1e-5, atol=1e-5)
    print(f"OK sharded QAT losses {losses} match one device {ref_losses}; served sharded")
    scanned(mesh)


#: MaxText-style logical axis rules for the zoo's scanned model on the (data, model) mesh
LOGICAL_RULES = (("activation_batch", "data"), ("activation_length", None), ("mlp", "model"),
                 ("heads", None), ("vocab", "model"), ("embed", None), ("kv", None),
                 ("layers", None), ("norm", None), ("num_activations", None))


def scanned(mesh):
    """The same QAT step on the zoo's MaxText-style model (nn.scan over stacked layers,
    boxed kernels with logical axis names, nn.with_logical_constraint on activations):
    sharded by its own logical annotations, against one device."""
    import flax.linen as nn

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import model_zoo as zoo

    case = zoo.build("maxtext_style")
    rules = [pj.QuantRule("token_embedder", weight=8),
             pj.QuantRule(".*", weight=8, act=8)]
    qmodel = pj.quantize_model(case.model, rules)
    (tokens,) = case.args
    variables = qmodel.init_from(case.params, tokens)
    params = nn.unbox(variables["params"])
    stats = variables[STATS]
    assert jax.tree.leaves(stats["decoder"]["layers"])[0].shape[0] == 2  # one range a layer
    rng = np.random.default_rng(1)
    batches = [(jnp.asarray(rng.integers(0, 48, (8, 8)), jnp.int32),
                jnp.asarray(rng.integers(0, 48, (8, 8)), jnp.int32)) for _ in range(3)]
    tx = optax.sgd(0.5, momentum=0.9)

    @jax.jit
    def step(params, stats, opt_state, x, y):
        def loss_fn(params):
            with nn.logical_axis_rules(LOGICAL_RULES):
                logits, upd = qmodel.apply({"params": params, STATS: stats}, x,
                                           mutable=[STATS])
            return ex.cross_entropy(logits, y), upd[STATS]

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, loss

    def run(params, put=lambda a, spec: a):
        opt_state, s, losses = tx.init(params), stats, []
        for x, y in batches:
            params, s, opt_state, loss = step(params, s, opt_state, put(x, P("data")),
                                              put(y, P("data")))
            losses.append(float(loss))
        return params, losses

    ref_params, ref_losses = run(params)
    specs = nn.get_partition_spec(variables["params"])
    shardings = nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_RULES)
    assert sum(s.spec != P() for s in jax.tree.leaves(shardings)) >= 4
    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))  # noqa: E731
    with jax.set_mesh(mesh):  # the logical constraints become sharding constraints
        new_params, losses = run(jax.device_put(params, shardings), put)
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    assert losses[-1] != losses[0]
    wo = new_params["decoder"]["layers"]["mlp"]["wo"]["kernel"]  # (layers, mlp, embed)
    assert wo.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "model", None)), 3), \
        wo.sharding
    for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(ref_params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
    print(f"OK scanned sharded QAT losses {losses} match one device {ref_losses}")


if __name__ == "__main__":
    main()
