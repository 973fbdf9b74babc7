"""Models rebuilt on every call -- an Equinox model (its arrays are a pytree), the
served copies of nnx and Equinox models -- find their traces again: a second call with
the same shapes does not trace the model's Python code again, and gives the same
result."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pychop_jax as pj
from pychop_jax import QuantRule

RULES = [QuantRule(".*", weight=8, act=8, observer="minmax")]
X = jax.random.normal(jax.random.key(1), (4, 8))


def test_equinox_model_and_its_served_copy_trace_once():
    eqx = pytest.importorskip("equinox")
    traced = []

    def call(m, x):
        traced.append(x.shape)  # runs when the model's code is traced
        return jax.vmap(m)(x)

    mlp = eqx.nn.MLP(8, 4, 16, 1, key=jax.random.key(4))
    qm, state = pj.quantize_model(mlp, RULES, X, call=call)
    y, state = qm(X, state=state)
    before = len(traced)
    y2, _ = qm(X, state=state)
    assert len(traced) == before
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y2))
    served = pj.serve_model(qm, state, X)
    first = served(X)
    before = len(traced)
    np.testing.assert_array_equal(np.asarray(served(X)), np.asarray(first))
    assert len(traced) == before
    qm(2 * X[:2], state=state)  # another shape: traced again
    assert len(traced) == before + 1


def test_nnx_served_copy_traces_once():
    from flax import nnx

    traced = []

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(8, 16, rngs=rngs)
            self.b = nnx.Linear(16, 4, rngs=rngs)

        def __call__(self, x):
            traced.append(x.shape)
            return self.b(jnp.tanh(self.a(x)))

    qm = pj.quantize_model(Net(nnx.Rngs(0)), RULES, X)
    qm(X)
    served = pj.serve_model(qm)
    y = served(X)
    before = len(traced)
    np.testing.assert_array_equal(np.asarray(served(X)), np.asarray(y))
    assert len(traced) == before
    qm.eval()
    np.testing.assert_allclose(np.asarray(y), np.asarray(qm(X)), rtol=1e-4, atol=1e-4)
