"""pychop_jax.nnx: drop-in layers, model.train()/eval(), variable types, nnx.jit + optax,
checkpoints, LSQ, and agreement with the linen skin (one implementation underneath)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, serialization
from flax_reference import fake_quant_affine, fake_quant_per_channel_symmetric, lsq_scale

import pychop_jax.linen as qnn
import pychop_jax.nnx as qnnx
from pychop_jax import observers

X = np.asarray(jax.random.normal(jax.random.key(1), (4, 12)))
IMG = np.asarray(jax.random.normal(jax.random.key(2), (2, 6, 6, 3)))


class Net(nnx.Module):
    def __init__(self, rngs, **quant):
        self.conv = qnnx.QuantConv(3, 4, (3, 3), act_bits=8, rngs=rngs, **quant)
        self.fc = qnnx.QuantDense(144, 2, act_bits=4, weight_bits=4, rngs=rngs, **quant)

    def __call__(self, x):
        return self.fc(nnx.relu(self.conv(x)).reshape(x.shape[0], -1))


def _count(model):
    stats = nnx.to_flat_state(nnx.state(model, qnnx.QuantStats))
    return [int(v.get_value().count) for _, v in stats]


def test_drop_in_for_linear_and_conv():
    layer = qnnx.QuantDense(12, 5, weight_bits=4, rngs=nnx.Rngs(0))
    plain = nnx.Linear(12, 5, rngs=nnx.Rngs(0))
    assert isinstance(layer, nnx.Linear)
    np.testing.assert_array_equal(layer.kernel[...], plain.kernel[...])
    expected = X @ fake_quant_per_channel_symmetric(plain.kernel[...], 4) + plain.bias[...]
    np.testing.assert_allclose(layer(X), expected, rtol=1e-5, atol=1e-6)
    conv = qnnx.QuantConv(3, 4, (3, 3), strides=2, padding="VALID", weight_bits=3,
                          rngs=nnx.Rngs(0))
    ref = nnx.Conv(3, 4, (3, 3), strides=2, padding="VALID", rngs=nnx.Rngs(0))
    assert isinstance(conv, nnx.Conv)
    ref.kernel[...] = fake_quant_per_channel_symmetric(ref.kernel[...], 3).astype(np.float32)
    np.testing.assert_allclose(conv(IMG), ref(IMG), rtol=1e-5, atol=1e-5)


def test_train_observes_eval_freezes():
    model = Net(nnx.Rngs(0))
    assert _count(model) == [0, 0]
    model(IMG)  # modules start in training mode, like nnx.Dropout / BatchNorm
    assert _count(model) == [1, 1]
    stats = model.conv.input_quant.stats.get_value()
    assert (float(stats.lo), float(stats.hi)) == (min(IMG.min(), 0), max(IMG.max(), 0))
    model.eval()
    assert model.conv.input_quant.use_running_average
    y = model(3 * IMG)
    assert _count(model) == [1, 1]
    np.testing.assert_array_equal(model.conv.input_quant.stats.get_value().hi, stats.hi)
    # the frozen range saturates the 3x input, exactly as the reference does
    xq = fake_quant_affine(3 * IMG, stats.lo, stats.hi, 8)
    assert np.abs(np.asarray(y)).sum() > 0
    np.testing.assert_allclose(model.conv.input_quant(3 * IMG), xq, rtol=1e-6, atol=1e-6)
    model.train()
    model(IMG)
    assert _count(model) == [2, 2]


def test_variable_types():
    model = Net(nnx.Rngs(0))
    stats = nnx.state(model, qnnx.QuantStats)
    paths = sorted(p for p, _ in nnx.to_flat_state(stats))
    assert paths == [("conv", "input_quant", "stats"), ("fc", "input_quant", "stats")]
    assert all(isinstance(v.get_value(), observers.RangeState)
               for _, v in nnx.to_flat_state(stats))
    params = sorted(p for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert params == [("conv", "bias"), ("conv", "kernel"), ("fc", "bias"), ("fc", "kernel")]
    lsq = Net(nnx.Rngs(0), lsq=True)
    assert ("fc", "dot_general", "lsq_scale") in {p for p, _ in nnx.to_flat_state(
        nnx.state(lsq, nnx.Param))}
    assert not nnx.to_flat_state(nnx.state(lsq, qnnx.QuantStats))


def test_nnx_jit_optax_step_updates_params_and_stats():
    model = Net(nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    kernel = np.array(model.fc.kernel[...])

    @nnx.jit
    def step(model, opt, x):
        loss, grads = nnx.value_and_grad(lambda m: jnp.sum(m(x) ** 2))(model)
        opt.update(model, grads)
        return loss

    step(model, opt, IMG)
    step(model, opt, IMG)
    assert _count(model) == [2, 2]
    assert not np.allclose(model.fc.kernel[...], kernel)
    model.eval()
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(model, IMG), model(IMG), rtol=1e-6)
    assert _count(model) == [2, 2]


def test_checkpoint_round_trip_with_observer_state():
    model = Net(nnx.Rngs(0))
    model(IMG)
    blob = serialization.to_bytes(nnx.to_pure_dict(nnx.state(model)))
    fresh = Net(nnx.Rngs(7))
    state = nnx.state(fresh)
    nnx.replace_by_pure_dict(state, serialization.from_bytes(nnx.to_pure_dict(state), blob))
    nnx.update(fresh, state)
    assert _count(fresh) == [1, 1]
    model.eval()
    fresh.eval()
    np.testing.assert_array_equal(fresh(IMG), model(IMG))


def test_lsq_needs_data_init():
    model = Net(nnx.Rngs(0), lsq=True)
    with pytest.raises(ValueError, match=r"call pychop_jax.nnx.init_lsq\(model, x\)"):
        model(IMG)
    model.fc.kernel[...] = 2 * model.fc.kernel[...]  # e.g. float weights loaded afterwards
    qnnx.init_lsq(model, IMG)
    np.testing.assert_allclose(model.conv.input_quant.lsq_scale[...], lsq_scale(IMG, 8, False),
                               rtol=1e-5)
    np.testing.assert_allclose(model.fc.dot_general.lsq_scale[...],
                               lsq_scale(model.fc.kernel[...], 4, True, axis=-1), rtol=1e-5)
    grads = nnx.grad(lambda m: jnp.sum(m(IMG) ** 2))(model)
    assert float(jnp.abs(grads["fc"]["dot_general"]["lsq_scale"][...]).sum()) > 0
    assert float(jnp.abs(grads["fc"]["input_quant"]["lsq_scale"][...]).sum()) > 0


def test_per_channel_layer_needs_num_features():
    with pytest.raises(ValueError, match="pass num_features"):
        qnnx.IntQuantizedLayer(8, axis=-1)
    layer = qnnx.IntQuantizedLayer(8, axis=-1, num_features=12, observer=observers.minmax)
    layer(X)
    np.testing.assert_array_equal(layer.stats.get_value().hi, np.maximum(X.max(0), 0))


@pytest.mark.parametrize("lsq", [False, True])
def test_linen_and_nnx_compute_the_same(lsq):
    """Same params and statistics in, same outputs out: one implementation underneath."""
    nn_layer = nnx.Linear(12, 5, rngs=nnx.Rngs(3))  # float weights for both skins
    params = {"kernel": nn_layer.kernel[...], "bias": nn_layer.bias[...]}
    opts = dict(weight_bits=3, act_bits=5, lsq=lsq)
    linen_layer = qnn.QuantDense(5, **opts)
    variables = qnn.init_lsq(linen_layer, {"params": params}, X)
    nnx_layer = qnnx.QuantDense(12, 5, rngs=nnx.Rngs(0), **opts)
    nnx_layer.kernel[...] = params["kernel"]
    nnx_layer.bias[...] = params["bias"]
    if lsq:
        qnnx.init_lsq(nnx_layer, X)
        y_linen = linen_layer.apply(variables, 2 * X)
    else:
        y_linen, _ = linen_layer.apply(variables, X, train=True, mutable=["quant_stats"])
    np.testing.assert_array_equal(nnx_layer(X if not lsq else 2 * X), y_linen)


def test_bad_option_is_reported():
    with pytest.raises(ValueError, match=r"act_bits=1: QuantSpec.bits"):
        qnnx.QuantDense(3, 2, act_bits=1, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError):
        qnnx.QuantDense(3, 2, weight_bit=4, rngs=nnx.Rngs(0))
