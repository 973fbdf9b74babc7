"""Whole-tree post-training quantization and compact checkpoints."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

import pychop_jax as pj

MODEL = nn.Sequential([nn.Dense(64), nn.relu, nn.Dense(64), nn.relu, nn.Dense(10)])
PARAMS = MODEL.init(jax.random.key(0), jnp.ones((1, 32)))
W8 = pj.QuantSpec(8, symmetric=True, axis=-1)
W4 = pj.QuantSpec(4, symmetric=True, axis=-1)


def is_qa(x):
    return isinstance(x, pj.QuantizedArray)


def test_rules_first_match_wins_and_unmatched_stay_float():
    rules = [(r"layers_4/kernel$", W8), (r"kernel$", W4), (r"bias$", W8), (r"nothing", W8)]
    tree, report = pj.quantize_params(PARAMS, rules)
    p = tree["params"]
    assert p["layers_4"]["kernel"].spec == W8  # first rule, not the later 4-bit one
    assert p["layers_0"]["kernel"].spec == W4 and p["layers_0"]["kernel"].packed
    assert is_qa(p["layers_2"]["bias"])
    assert report.quantized["params/layers_4/kernel"] == r"layers_4/kernel$"
    assert report.unused_rules == ("nothing",)
    assert "rules that matched nothing: ['nothing']" in str(report)
    # the same structure comes back, with float leaves where no rule matched
    tree2, report2 = pj.quantize_params(PARAMS, [(r"layers_0/kernel", W8)])
    assert not is_qa(tree2["params"]["layers_2"]["kernel"])
    assert "params/layers_2/kernel" in report2.kept_float
    assert jax.tree_util.tree_structure(tree2, is_leaf=is_qa) == \
        jax.tree_util.tree_structure(PARAMS)


def test_dequantize_params_round_trip_error():
    tree, _ = pj.quantize_params(PARAMS, [("kernel", W8)])
    back = pj.dequantize_params(tree)
    for name in ("layers_0", "layers_2", "layers_4"):
        w = PARAMS["params"][name]["kernel"]
        wh = back["params"][name]["kernel"]
        scale = tree["params"][name]["kernel"].state.scale
        assert wh.shape == w.shape and wh.dtype == jnp.float32
        assert bool(jnp.all(jnp.abs(wh - w) <= scale / 2 * (1 + 1e-5)))
        np.testing.assert_array_equal(back["params"][name]["bias"], PARAMS["params"][name]["bias"])


def test_bad_rules_raise():
    with pytest.raises(ValueError, match=r"rule 0: '\(kernel' is not a valid regular expression"):
        pj.quantize_params(PARAMS, [("(kernel", W8)])
    with pytest.raises(TypeError, match="rule 0 must be a \\(path_regex, QuantSpec\\) pair"):
        pj.quantize_params(PARAMS, ["kernel"])
    with pytest.raises(TypeError, match="needs a QuantSpec"):
        pj.quantize_params(PARAMS, [("kernel", 8)])
    with pytest.raises(ValueError, match=r"params/layers_0/bias \(rule 'bias'\): .*axis=1"):
        pj.quantize_params(PARAMS, [("bias", pj.QuantSpec(axis=1))])


def test_non_float_leaves_are_left_alone():
    tree, report = pj.quantize_params({"step": jnp.int32(3), "w": jnp.ones((4, 4))},
                                      [(".*", W8)])
    assert tree["step"].dtype == jnp.int32 and is_qa(tree["w"])
    assert report.kept_float == ("step",)


def test_checkpoint_round_trip_is_bit_exact(tmp_path):
    tree, _ = pj.quantize_params(PARAMS, [("layers_0/kernel", W4), ("kernel", W8),
                                          ("bias", pj.QuantSpec(8))])
    path = tmp_path / "model.msgpack"
    n = pj.save_quantized(path, tree)
    assert n == path.stat().st_size
    loaded = pj.load_quantized(path)
    flat_a = jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_qa)
    flat_b = jax.tree_util.tree_leaves_with_path(loaded, is_leaf=is_qa)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (_, a), (_, b) in zip(flat_a, flat_b, strict=True):
        assert is_qa(a) and is_qa(b)
        assert a.spec == b.spec and a.shape == b.shape and a.packed == b.packed
        for x, y in ((a.codes, b.codes), (a.state.scale, b.state.scale),
                     (a.state.zero_point, b.state.zero_point)):
            assert x.dtype == y.dtype
            np.testing.assert_array_equal(np.asarray(x).view(np.uint8),
                                          np.asarray(y).view(np.uint8))


def test_checkpoint_sizes_follow_the_bit_width():
    keys = jax.random.split(jax.random.key(1), 3)
    kernels = {f"w{i}": jax.random.normal(k, (256, 256)) for i, k in enumerate(keys)}
    fp32 = len(serialization.to_bytes(kernels))
    q8, _ = pj.quantize_params(kernels, [("", W8)])
    q4, _ = pj.quantize_params(kernels, [("", W4)])
    r8 = fp32 / len(pj.serving.checkpoint.to_bytes(q8))
    r4 = fp32 / len(pj.serving.checkpoint.to_bytes(q4))
    # codes are 1/4 (int8) or 1/8 (packed int4) of float32; 256 scales per kernel cost
    # 1/256 of the codes' count in float32 words, and no zero points (symmetric)
    assert 3.9 < r8 <= 4.0, r8
    assert 7.5 < r4 <= 8.0, r4


def test_checkpoint_keeps_sequences_and_rejects_other_objects(tmp_path):
    tree = {"layers": [pj.QuantizedArray.quantize(jnp.ones((2, 3)), W8), jnp.arange(3.0)]}
    back = pj.serving.checkpoint.from_bytes(pj.serving.checkpoint.to_bytes(tree))
    assert isinstance(back["layers"], list) and is_qa(back["layers"][0])
    np.testing.assert_array_equal(back["layers"][1], [0.0, 1.0, 2.0])
    with pytest.raises(TypeError, match="root/f: cannot store a function"):
        pj.serving.checkpoint.to_bytes({"f": lambda: 0})
    with pytest.raises(ValueError, match="not a pychop-jax quantized checkpoint"):
        pj.serving.checkpoint.from_bytes(serialization.msgpack_serialize({"a": 1}))
