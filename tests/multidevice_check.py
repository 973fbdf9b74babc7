"""Run by tests/test_multidevice.py in a fresh process with 8 simulated CPU devices."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import pychop_jax as pj  # noqa: E402


def bits(a):
    return np.asarray(a).view(np.uint8)


def main():
    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, 32)) * rng.uniform(0.1, 10, (1, 32))).astype(np.float32)
    checked = 0
    for layout in (P("data", "model"), P(None, "model"), P("data", None), P(("data", "model"))):
        xs = jax.device_put(x, NamedSharding(mesh, layout))
        for spec in (
            pj.QuantSpec(bits=8),
            pj.QuantSpec(bits=4, symmetric=True),
            pj.QuantSpec(bits=8, axis=1),
            pj.QuantSpec(bits=3, symmetric=True, axis=0),
            pj.QuantSpec(bits=4, axis=1, group_size=4),
        ):
            ref_state = pj.calibrate(x, spec)
            ref_q = pj.quantize(x, ref_state)
            eager = pj.calibrate(xs, spec)
            jitted = jax.jit(pj.calibrate, static_argnums=1)(xs, spec)
            for state in (eager, jitted):
                assert np.array_equal(bits(state.scale), bits(ref_state.scale)), (layout, spec)
                assert np.array_equal(state.zero_point, ref_state.zero_point), (layout, spec)
                q = jax.jit(pj.quantize)(xs, state)
                assert np.array_equal(q, ref_q), (layout, spec)
                assert np.array_equal(pj.quantize(xs, state), ref_q)
                assert np.array_equal(pj.dequantize(q, state), pj.dequantize(ref_q, ref_state))
                checked += 1

    # a per-channel state of a channel-sharded array stays sharded along the channel
    xs = jax.device_put(x, NamedSharding(mesh, P(None, "model")))
    for state in (pj.calibrate(xs, pj.QuantSpec(bits=8, axis=1)),
                  jax.jit(lambda a: pj.calibrate(a, pj.QuantSpec(bits=8, axis=1)))(xs)):
        sharding = state.scale.sharding
        assert len(state.scale.addressable_shards) == 8
        shard_shapes = {s.data.shape for s in state.scale.addressable_shards}
        assert shard_shapes == {(1, 32 // 4)}, shard_shapes
        assert sharding.is_equivalent_to(NamedSharding(mesh, P(None, "model")), 2), sharding
        q = jax.jit(pj.quantize)(xs, state)
        assert {s.data.shape for s in q.addressable_shards} == {(64, 8)}
    print(f"OK {checked} sharded runs bit-identical; per-channel state sharded")


if __name__ == "__main__":
    main()
