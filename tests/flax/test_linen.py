"""pychop_jax.linen: drop-in layers, train/eval, collections, jit + optax, checkpoints, LSQ."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import serialization
from flax_reference import fake_quant_affine, fake_quant_per_channel_symmetric, lsq_scale

import pychop_jax as pj
import pychop_jax.linen as qnn
from pychop_jax import observers

KEY = jax.random.key(0)
X = np.asarray(jax.random.normal(jax.random.key(1), (4, 12)))
IMG = np.asarray(jax.random.normal(jax.random.key(2), (2, 6, 6, 3)))


def test_dense_is_drop_in_and_quantizes_the_kernel_per_channel():
    float_params = nn.Dense(5).init(KEY, X)
    layer = qnn.QuantDense(5, weight_bits=4)
    assert jax.tree.structure(layer.init(KEY, X)) == jax.tree.structure(float_params)
    y = layer.apply(float_params, X)  # a float checkpoint loads unchanged
    p = float_params["params"]
    expected = X @ fake_quant_per_channel_symmetric(p["kernel"], 4) + p["bias"]
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(y, nn.Dense(5).apply(float_params, X), atol=1e-3)


def test_conv_matches_nn_conv_on_the_quantized_kernel():
    conv = nn.Conv(4, (3, 3), strides=2, padding="VALID")
    params = conv.init(KEY, IMG)
    y = qnn.QuantConv(4, (3, 3), strides=2, padding="VALID", weight_bits=3).apply(params, IMG)
    ref_kernel = fake_quant_per_channel_symmetric(params["params"]["kernel"], 3)
    ref = conv.apply({"params": {**params["params"], "kernel": ref_kernel}}, IMG)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_train_updates_the_observer_and_eval_freezes_it():
    layer = qnn.QuantDense(3, act_bits=6, weight_bits=None,
                           observer=lambda s, x, spec: observers.ema(s, x, spec, momentum=0.5))
    variables = layer.init(KEY, X, train=True)
    stats = variables["quant_stats"]["input_quant"]["range"]
    assert isinstance(stats, observers.RangeState) and int(stats.count) == 0  # not during init
    _, upd = layer.apply(variables, X, train=True, mutable=["quant_stats"])
    first = upd["quant_stats"]["input_quant"]["range"]
    assert int(first.count) == 1
    assert (float(first.lo), float(first.hi)) == (min(X.min(), 0), max(X.max(), 0))
    variables = {**variables, **upd}
    _, upd = layer.apply(variables, 3 * X, train=True, mutable=["quant_stats"])
    second = upd["quant_stats"]["input_quant"]["range"]
    np.testing.assert_allclose(second.hi, 0.5 * X.max() + 0.5 * 3 * X.max(), rtol=1e-6)
    variables = {**variables, **upd}
    # eval: statistics unchanged, input quantized with the frozen range (3x saturates)
    y, upd = layer.apply(variables, 3 * X, mutable=["quant_stats"])
    frozen = upd["quant_stats"]["input_quant"]["range"]
    assert int(frozen.count) == 2 and float(frozen.hi) == float(second.hi)
    p = variables["params"]
    xq = fake_quant_affine(3 * X, second.lo, second.hi, 6)
    np.testing.assert_allclose(y, xq @ p["kernel"] + p["bias"], rtol=1e-5, atol=1e-5)


def test_eval_before_any_observation_uses_the_batch_range():
    layer = qnn.IntQuantizedLayer(bits=4)
    variables = layer.init(KEY, X)
    y = layer.apply(variables, X)
    np.testing.assert_array_equal(y, pj.fake_quant(X, pj.calibrate(X, pj.QuantSpec(bits=4))))


def test_per_channel_activations_and_collections():
    layer = qnn.IntQuantizedLayer(bits=8, axis=-1, observer=observers.minmax)
    variables = layer.init(KEY, X)
    assert set(variables) == {"quant_stats"}  # no params for an observed layer
    _, upd = layer.apply(variables, X, train=True, mutable=["quant_stats"])
    stats = upd["quant_stats"]["range"]
    assert stats.lo.shape == (12,)
    np.testing.assert_array_equal(stats.hi, np.maximum(X.max(0), 0))


def test_jit_optax_step_and_eval():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            x = nn.relu(qnn.QuantConv(4, (3, 3), act_bits=8)(x, train))
            return qnn.QuantDense(2, act_bits=4, weight_bits=4)(x.reshape(x.shape[0], -1), train)

    model = Net()
    variables = model.init(KEY, IMG)
    tx = optax.adam(1e-2)
    opt_state = tx.init(variables["params"])

    @jax.jit
    def step(variables, opt_state):
        def loss(params):
            out, upd = model.apply({**variables, "params": params}, IMG, train=True,
                                   mutable=["quant_stats"])
            return jnp.sum(out**2), upd

        (value, upd), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
        changes, opt_state = tx.update(grads, opt_state)
        return {"params": optax.apply_updates(variables["params"], changes), **upd}, opt_state

    new, _ = step(variables, opt_state)
    counts = jax.tree.leaves(jax.tree.map(lambda s: s.count, new["quant_stats"],
                                          is_leaf=lambda s: isinstance(s, observers.RangeState)))
    assert [int(c) for c in counts] == [1, 1]
    assert not np.allclose(new["params"]["QuantConv_0"]["kernel"],
                           variables["params"]["QuantConv_0"]["kernel"])
    np.testing.assert_allclose(jax.jit(model.apply)(new, IMG), model.apply(new, IMG), rtol=1e-6)


def test_checkpoint_round_trip_with_observer_state():
    layer = qnn.QuantDense(3, act_bits=8)
    variables = layer.init(KEY, X)
    _, upd = layer.apply(variables, X, train=True, mutable=["quant_stats"])
    variables = {**variables, **upd}
    blob = serialization.to_bytes(variables)
    restored = serialization.from_bytes(layer.init(jax.random.key(9), X), blob)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(restored["quant_stats"]["input_quant"]["range"].count) == 1
    np.testing.assert_array_equal(layer.apply(restored, X), layer.apply(variables, X))


def test_lsq_params_from_data_and_from_float_weights():
    layer = qnn.QuantDense(5, weight_bits=3, act_bits=4, lsq=True)
    variables = layer.init(KEY, X)
    assert "quant_stats" not in variables
    p = variables["params"]
    np.testing.assert_allclose(p["WeightQuant_0"]["lsq_scale"],
                               lsq_scale(p["kernel"], 3, True, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(p["input_quant"]["lsq_scale"], lsq_scale(X, 4, False), rtol=1e-5)
    assert p["input_quant"]["lsq_zero_point"].dtype == jnp.float32
    # starting from float params: the step sizes come from the float kernel
    float_params = nn.Dense(5).init(jax.random.key(5), X)
    variables = qnn.init_lsq(layer, float_params, X)
    np.testing.assert_array_equal(variables["params"]["kernel"], float_params["params"]["kernel"])
    np.testing.assert_allclose(variables["params"]["WeightQuant_0"]["lsq_scale"],
                               lsq_scale(float_params["params"]["kernel"], 3, True, -1), rtol=1e-5)
    grads = jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, X) ** 2))(variables["params"])
    assert float(jnp.abs(grads["WeightQuant_0"]["lsq_scale"]).sum()) > 0
    assert float(jnp.abs(grads["input_quant"]["lsq_scale"]).sum()) > 0


def test_bad_bits_name_the_option():
    with pytest.raises(ValueError, match=r"weight_bits=1: QuantSpec.bits must be in \[2, 16\]"):
        qnn.QuantDense(3, weight_bits=1).init(KEY, X)
    with pytest.raises(ValueError, match=r"act_bits=17"):
        qnn.QuantDense(3, act_bits=17).init(KEY, X)
