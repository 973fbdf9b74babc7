"""The model zoo's own checks (tests/model_zoo.py): each case builds, its float forward
runs jitted to finite outputs of the expected shape, and its hand-written facts name every
parameter exactly once, with the stored shapes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import model_zoo as zoo
import numpy as np
import pytest
from flax import nnx
from jax.tree_util import DictKey, FlattenedIndexKey, GetAttrKey, SequenceKey


def _case(name):
    if zoo.missing(name):
        pytest.skip(f"{zoo.missing(name)} is not installed (pip install -r requirements-test.txt)")
    return zoo.build(name)


def _key(k):
    if isinstance(k, DictKey):
        return str(k.key)
    if isinstance(k, SequenceKey):
        return str(k.idx)
    if isinstance(k, GetAttrKey):
        return k.name
    if isinstance(k, FlattenedIndexKey):
        return str(k.key)
    raise TypeError(f"unexpected key {k!r}")


def _paths(tree, is_leaf=None):
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
    return {"/".join(_key(k) for k in path): leaf for path, leaf in leaves}


def param_shapes(case):
    """Every parameter of the case's model: path (the zoo's convention) -> stored shape."""
    if case.framework == "linen":
        assert set(case.params) == {"params"}, set(case.params)
        boxed = lambda x: isinstance(x, nn.meta.AxisMetadata)
        leaves = _paths(case.params["params"], is_leaf=boxed)  # a box's path, not its .value
        return {p: tuple(nn.meta.unbox(v).shape) for p, v in leaves.items()}
    if case.framework == "function":
        return {p: tuple(v.shape) for p, v in _paths(case.params).items()}
    if case.framework == "nnx":
        variables = _paths(nnx.state(case.model), is_leaf=lambda x: isinstance(x, nnx.Variable))
        assert all(type(v) is nnx.Param for v in variables.values()), variables
        return {p: tuple(v.get_value().shape) for p, v in variables.items()}
    if case.framework == "equinox":
        import equinox as eqx

        return {p: tuple(v.shape) for p, v in _paths(eqx.filter(case.model, eqx.is_array)).items()}
    raise ValueError(case.framework)


def _jit(case):
    if case.framework == "nnx":
        return nnx.jit(case.forward)
    if case.framework == "equinox":
        import equinox as eqx

        return eqx.filter_jit(case.forward)
    return jax.jit(case.forward)


@pytest.mark.parametrize("name", zoo.CASES)
def test_forward_runs_jitted(name):
    case = _case(name)
    assert case.name == name
    assert case.framework in ("linen", "nnx", "function", "equinox")
    out = _jit(case)(case.state, *case.args)
    assert out.shape == case.output_shape
    assert jnp.issubdtype(out.dtype, jnp.floating)
    assert np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize("name", zoo.CASES)
def test_facts_cover_every_parameter_once(name):
    case = _case(name)
    shapes = param_shapes(case)
    float_params = set(case.float_params)
    assert len(float_params) == len(case.float_params), "a float param listed twice"
    assert not float_params & set(case.weights), float_params & set(case.weights)
    assert set(case.weights) | float_params == set(shapes), (
        sorted(set(shapes) - set(case.weights) - float_params),
        sorted(set(case.weights) | float_params - set(shapes)),
    )
    for path, w in case.weights.items():
        assert w.shape == shapes[path], (path, w.shape, shapes[path])
        assert w.contracted and tuple(sorted(set(w.contracted))) == w.contracted, path
        assert all(0 <= a < len(w.shape) for a in w.contracted), path
        assert w.output_channels, path
        assert w.uses and tuple(u for u in zoo.USES if u in w.uses) == w.uses, path
