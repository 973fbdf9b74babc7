"""QAT-trained linen models -> integer-served models (pychop_jax.serving)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pychop_jax as pj
import pychop_jax.linen as qnn
from pychop_jax import serving

X = jax.random.uniform(jax.random.key(0), (16, 6, 6, 2)) * 2 - 0.5


def architecture(x, conv, dense, call):
    x = nn.relu(call(conv(4, (3, 3), name="conv"), x))
    x = nn.relu(call(dense(8, name="fc"), x.reshape(x.shape[0], -1)))
    return call(dense(3, name="head"), x)


class QatNet(nn.Module):
    kw: dict

    @nn.compact
    def __call__(self, x, train: bool = False):
        return architecture(x, lambda *a, **k: qnn.QuantConv(*a, **k, **self.kw),
                            lambda *a, **k: qnn.QuantDense(*a, **k, **self.kw),
                            lambda layer, x: layer(x, train))


class ServedNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return architecture(x, serving.IntConv, serving.IntDense, lambda layer, x: layer(x))


def trained_variables(model, lsq=False):
    variables = model.init(jax.random.key(1), X)
    if lsq:
        return variables
    _, stats = model.apply(variables, X, train=True, mutable=["quant_stats"])
    return {**variables, **stats}


@pytest.mark.parametrize("kw", [
    dict(weight_bits=8, act_bits=8),
    dict(weight_bits=4, act_bits=4),
    dict(weight_bits=3, act_bits=6, act_symmetric=True),
    dict(weight_bits=4, act_bits=4, weight_symmetric=False),
    dict(weight_bits=2, act_bits=2, lsq=True),
])
def test_served_model_computes_the_fake_quant_evaluation(kw):
    model = QatNet(kw)
    variables = trained_variables(model, lsq=kw.get("lsq", False))
    params, report = serving.to_served(model, variables, X[:1])
    assert [r.path for r in report] == [("conv",), ("fc",), ("head",)]
    expected_source = "learned" if kw.get("lsq") else "observed"
    assert all(r.input_state == expected_source for r in report)
    kernel = params["fc"]["kernel"]
    assert isinstance(kernel, pj.IntKernel) and kernel.weights.spec.bits == kw["weight_bits"]
    assert set(params["fc"]) == {"kernel", "bias"}
    served = jax.jit(ServedNet().apply)({"params": params}, X)
    fake = model.apply(variables, X)
    np.testing.assert_array_equal(jnp.argmax(served, -1), jnp.argmax(fake, -1))
    np.testing.assert_allclose(served, fake, rtol=1e-5, atol=1e-5)


def test_unquantized_inputs_are_served_with_dynamic_ranges():
    model = QatNet(dict(weight_bits=8, act_bits=None))
    variables = trained_variables(model)
    params, report = serving.to_served(model, variables, X[:1])
    assert {r.input_state for r in report} == {"dynamic"}
    assert params["conv"]["kernel"].input_state is None
    served = ServedNet().apply({"params": params}, X)
    # dynamic 8-bit inputs: close to, not equal to, the float-input evaluation
    np.testing.assert_allclose(served, model.apply(variables, X), atol=0.05)


@pytest.mark.parametrize("act_bits", [3, 8])
def test_layers_without_observed_data_calibrate_per_call_at_their_bit_width(act_bits):
    # the QAT layer's evaluation quantizes an unobserved input with this batch's range
    # (count == 0); the served layer must do the same, at the layer's bit width
    model = QatNet(dict(weight_bits=4, act_bits=act_bits))
    variables = model.init(jax.random.key(1), X)  # observers have seen nothing
    params, report = serving.to_served(model, variables, X[:1])
    assert {r.input_state for r in report} == {"dynamic"}
    assert params["fc"]["kernel"].input_spec.bits == act_bits
    served = ServedNet().apply({"params": params}, X)
    np.testing.assert_allclose(served, model.apply(variables, X), rtol=1e-5, atol=1e-5)


def test_float_weight_layers_cannot_be_served():
    model = QatNet(dict(weight_bits=None, act_bits=8))
    with pytest.raises(ValueError, match="conv keeps float weights"):
        serving.to_served(model, trained_variables(model), X[:1])


def test_served_params_checkpoint_round_trip(tmp_path):
    model = QatNet(dict(weight_bits=4, act_bits=8))
    params, _ = serving.to_served(model, trained_variables(model), X[:1])
    def is_kernel(k):
        return isinstance(k, pj.IntKernel)

    packed = jax.tree_util.tree_map(lambda k: k.pack() if is_kernel(k) else k, params,
                                    is_leaf=is_kernel)
    size = pj.save_quantized(tmp_path / "m.msgpack", packed)
    loaded = pj.load_quantized(tmp_path / "m.msgpack")
    assert loaded["fc"]["kernel"].weights.packed
    assert loaded["fc"]["kernel"].input_state.spec == params["fc"]["kernel"].input_state.spec
    assert loaded["fc"]["kernel"].input_spec == params["fc"]["kernel"].input_spec
    unpacked = jax.tree_util.tree_map(lambda k: k.unpack() if is_kernel(k) else k, loaded,
                                      is_leaf=is_kernel)
    np.testing.assert_array_equal(ServedNet().apply({"params": unpacked}, X),
                                  ServedNet().apply({"params": params}, X))
    assert size < pj.checkpoint.to_bytes(params).__len__()  # packing shrinks the file
