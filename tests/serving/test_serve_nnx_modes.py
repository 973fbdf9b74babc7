"""serve_model of a quantized nnx model serves its evaluation, whatever mode the model
was left in and whichever modes it was called in (each mode is another graph: the
dropout's ``deterministic``).  Reference: the quantized model's own evaluation."""

import jax
import numpy as np
from flax import nnx
from quantize_model_fixtures import NnxDrop

import pychop_jax as pj

X = jax.random.normal(jax.random.key(1), (3, 5))
RULE = pj.QuantRule(".*", weight=8, act=8, observer="minmax")


def test_served_copy_is_the_evaluation_of_a_model_left_in_training():
    qmodel = pj.quantize_model(NnxDrop(nnx.Rngs(0)), RULE)
    qmodel(X)  # training: dropout on, the range observed
    served = pj.serve_model(qmodel)
    assert not qmodel.use_running_average and not qmodel.model.drop.deterministic  # left so
    y = served(X)
    np.testing.assert_array_equal(served(X), y)  # no dropout
    qmodel.eval()
    np.testing.assert_allclose(y, qmodel(X), rtol=1e-5, atol=1e-5)


def test_a_model_called_in_one_mode_is_served_in_another():
    qmodel = pj.quantize_model(NnxDrop(nnx.Rngs(0)), RULE)
    qmodel.eval()
    want = qmodel(X)  # evaluation only: nothing observed, the batch's own range
    qmodel.train()
    np.testing.assert_allclose(pj.serve_model(qmodel)(X), want, rtol=1e-5, atol=1e-5)
