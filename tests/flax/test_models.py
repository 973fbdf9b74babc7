"""``quantize_model`` across frameworks: what it accepts, and the errors that say what
to pass instead (``pychop_jax.flax.models``)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import model_zoo as zoo
import numpy as np
import pytest
from flax import nnx

import pychop_jax as pj
from pychop_jax import QuantRule

RULE = QuantRule(".*", weight=8)


class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(x)


def test_a_transformers_wrapper_is_refused_with_what_to_pass():
    class FlaxPreTrainedModel:  # the duck type: a wrapper holding .module and .params
        module = Tiny()
        params = {}

    with pytest.raises(TypeError, match=r"model\.module.*model\.params"):
        pj.quantize_model(FlaxPreTrainedModel(), RULE)


@pytest.mark.parametrize("thing, message", [
    ({"w": jnp.ones(3)}, "got a dict"),
    (object(), "cannot trace"),
    (3.0, "cannot trace"),
])
def test_things_that_are_not_models_are_refused(thing, message):
    with pytest.raises(TypeError, match=message):
        pj.quantize_model(thing, RULE)
    with pytest.raises(TypeError, match=message):
        pj.quantization_report(thing, RULE)


def test_misused_arguments_say_how():
    x = jnp.ones((1, 4))
    with pytest.raises(TypeError, match="no sample call"):
        pj.quantize_model(Tiny(), RULE, x)
    with pytest.raises(TypeError, match="unbound"):
        pj.quantize_model(Tiny().bind(Tiny().init(jax.random.key(0), x)), RULE)
    with pytest.raises(TypeError, match="call=.*Equinox"):
        pj.quantize_model(Tiny(), RULE, call=lambda m, x: m(x))
    with pytest.raises(TypeError, match="not the float"):
        pj.calibrate_model(Tiny(), {}, [x])
    with pytest.raises(TypeError, match="quantize_model model"):
        pj.serve_model(Tiny(), {}, x)
    with pytest.raises(TypeError, match="takes no sample call"):
        pj.quantize_model(lambda p, x: x @ p, RULE, x)


@pytest.mark.skipif(zoo.missing("equinox_mlp") is not None, reason="needs equinox")
def test_equinox_needs_a_sample_call():
    case = zoo.build("equinox_mlp")
    with pytest.raises(TypeError, match="sample call"):
        pj.quantize_model(case.model, RULE)


def test_nnx_state_is_made_by_the_first_call_even_under_jit_and_the_model_is_not_modified():
    model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    before = np.asarray(model.kernel[...])
    qmodel = pj.quantize_model(model, QuantRule(".*", weight=8, act=8, observer="minmax"))
    with pytest.raises(TypeError, match="not been called"):
        pj.serve_model(qmodel)
    x = jax.random.normal(jax.random.key(1), (2, 4))
    y = nnx.jit(lambda m, x: m(x))(qmodel, x)
    stats = qmodel.quant_stats.get_value()
    assert int(stats["kernel"]["input"].count) == 1
    np.testing.assert_array_equal(model.kernel[...], before)
    w = pj.fake_quant(before, pj.calibrate(before, pj.QuantSpec(bits=8, symmetric=True, axis=1)))
    xq = pj.fake_quant(x, pj.calibrate(x, pj.QuantSpec(bits=8)))
    np.testing.assert_allclose(y, xq @ w + model.bias[...], rtol=1e-6, atol=1e-6)
