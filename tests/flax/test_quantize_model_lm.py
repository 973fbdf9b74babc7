"""quantize_model pieces the transformer LM example relies on: learned (LSQ) step sizes
of per-group kernels, one scale per (head, head_dim) of a q/k/v kernel (the int
shorthand, or a group that spans the whole input axis as the example spells it) on the
integer path, and the report as text.

References are independent: NumPy float64 step sizes and grids written here, or the
stock layer on a kernel quantized by hand."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import pychop_jax as pj
from pychop_jax.flax.models import LSQ_PARAMS, STATS
from pychop_jax.serving.deploy import serve_model
from pychop_jax.transform.rules import describe_spec

KEY = jax.random.key(0)
G4 = pj.QuantSpec(bits=4, symmetric=True, axis=0, group_size=4)


class Single(nn.Module):
    layer: nn.Module

    @nn.compact
    def __call__(self, x):
        return self.layer(x)


def lsq_group_reference(w, group):
    """Esser et al.'s initial step, 2 mean|w| / sqrt(Q_P), per group of ``group`` rows
    and per column, in float64 (Q_P = 7 for int4 symmetric)."""
    w = np.asarray(w, np.float64)
    blocks = w.reshape(w.shape[0] // group, group, *w.shape[1:])
    return 2 * np.abs(blocks).mean(axis=1) / np.sqrt(7)


def fake_quant_symmetric(w, scale, qmin=-8, qmax=7):
    """``clip(round(w / s)) * s`` with ``s`` repeated over its group (float64)."""
    s = np.repeat(np.asarray(scale, np.float64), w.shape[0] // scale.shape[0], axis=0)
    return np.clip(np.round(np.asarray(w, np.float64) / s), qmin, qmax) * s


def test_linen_lsq_per_group_kernel_step_sizes_learn_and_serve():
    x = jax.random.normal(jax.random.key(1), (3, 8))
    qmodel = pj.quantize_model(Single(nn.Dense(6)), pj.QuantRule("layer", weight=G4, lsq=True))
    v = qmodel.init(KEY, x)
    kernel = v["params"]["layer"]["kernel"]
    scale = v[LSQ_PARAMS]["layer"]["kernel"]["weight_scale"]
    assert scale.shape == (2, 6) and set(v[LSQ_PARAMS]["layer"]["kernel"]) == {"weight_scale"}
    np.testing.assert_allclose(scale, lsq_group_reference(kernel, 4), rtol=1e-6)
    want = x @ fake_quant_symmetric(kernel, scale) + v["params"]["layer"]["bias"]
    np.testing.assert_allclose(qmodel.apply(v, x), want, rtol=1e-5, atol=1e-6)

    grads = jax.grad(lambda lsq: jnp.sum(qmodel.apply({**v, LSQ_PARAMS: lsq}, x) ** 2))(
        v[LSQ_PARAMS])
    g = grads["layer"]["kernel"]["weight_scale"]
    assert g.shape == (2, 6) and bool(jnp.all(jnp.isfinite(g))) and bool(jnp.any(g != 0))

    served_fn, served = serve_model(qmodel, v, x)
    weights = served["params"]["layer"]["kernel"]
    assert isinstance(weights, pj.QuantizedArray) and weights.packed
    np.testing.assert_allclose(weights.state.scale, scale)
    np.testing.assert_allclose(weights.dequantize(), fake_quant_symmetric(kernel, scale),
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(served_fn(served, x), qmodel.apply(v, x), rtol=1e-5, atol=1e-6)


def test_nnx_lsq_per_group_kernel_step_sizes():
    class Holder(nnx.Module):
        def __init__(self):
            self.layer = nnx.Linear(8, 6, rngs=nnx.Rngs(0))

        def __call__(self, x):
            return self.layer(x)

    x = jax.random.normal(jax.random.key(1), (3, 8))
    model = Holder()
    qmodel = pj.quantize_model(model, pj.QuantRule("layer", weight=G4, lsq=True))
    y = qmodel(x)  # the first call makes the step sizes, from the kernel
    steps = qmodel.quant_params.get_value()["layer"]["kernel"]
    kernel = model.layer.kernel[...]
    assert set(steps) == {"weight_scale"} and steps["weight_scale"].shape == (2, 6)
    np.testing.assert_allclose(steps["weight_scale"], lsq_group_reference(kernel, 4), rtol=1e-6)
    want = x @ fake_quant_symmetric(kernel, steps["weight_scale"]) + model.layer.bias[...]
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
    g = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(qmodel).quant_params.get_value()
    g = g["layer"]["kernel"]["weight_scale"]
    assert g.shape == (2, 6) and bool(jnp.all(jnp.isfinite(g))) and bool(jnp.any(g != 0))
    served = serve_model(qmodel)
    np.testing.assert_allclose(served(x), qmodel(x), rtol=1e-5, atol=1e-6)


D, HEADS, HD = 16, 2, 4


@pytest.mark.parametrize("spec", [8, pj.QuantSpec(bits=8, symmetric=True, axis=0, group_size=D)],
                         ids=["int", "group_spanning_d"])
def test_qkv_kernel_one_scale_per_head_and_head_dim_on_the_integer_path(spec):
    """A (d, heads, head_dim) kernel, per output channel (the int shorthand: every axis
    the matmul keeps) or with one group spanning d (the example's spelling): scale (1,
    heads, head_dim), an int8 x int8 product, equal to the fake-quant evaluation."""
    d, heads, hd = D, HEADS, HD
    layer = nn.DenseGeneral((heads, hd), axis=-1)
    x = jax.random.normal(jax.random.key(2), (2, 5, d))
    qmodel = pj.quantize_model(Single(layer), pj.QuantRule("layer", weight=spec, act=8,
                                                           observer="minmax"))
    v = qmodel.init(KEY, x)
    # one head's kernel 10x larger: a scale shared by heads would crush the other head
    kernel = v["params"]["layer"]["kernel"].at[:, 0].multiply(10.0)
    v = {**v, "params": {"layer": {**v["params"]["layer"], "kernel": kernel}}}
    _, upd = qmodel.apply(v, x, mutable=[STATS])
    v = {**v, **upd}
    served_fn, served = serve_model(qmodel, v, x)
    weights = served["params"]["layer"]["kernel"]
    assert isinstance(weights, pj.QuantizedArray) and weights.state.scale.shape == (1, heads, hd)
    w64 = np.asarray(kernel, np.float64)
    np.testing.assert_allclose(weights.state.scale,
                               np.abs(w64).max(axis=0, keepdims=True) / 127, rtol=1e-6)
    y_fake = qmodel.apply(v, x)
    # the integer path: an int8 x int8 dot_general accumulating in int32
    assert "preferred_element_type=int32" in str(jax.make_jaxpr(served_fn)(served, x))
    y_int = jax.jit(served_fn)(served, x)
    np.testing.assert_allclose(y_int, y_fake, rtol=1e-5, atol=1e-5)
    # the small head's weights keep ~8 bits: close to the float layer
    y_float = layer.apply({"params": v["params"]["layer"]}, x)
    err = np.abs(np.asarray(y_int - y_float))[..., 1, :].max()
    assert err < 0.02 * float(np.abs(y_float[..., 1, :]).max())


def test_report_summary_names_rules_specs_and_ops():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, ids):
            x = nn.Embed(10, 8, name="embed")(ids)
            x = nn.LayerNorm(name="ln")(x)
            for i in range(4):
                x = nn.Dense(8, name=f"fc_{i}")(x)
            return nn.Dense(10, name="head")(x)

    rules = [pj.QuantRule("head"), pj.QuantRule("embed", weight=8),
             pj.QuantRule("fc_.*|ln", weight=G4, act=8, observer="percentile"),
             pj.QuantRule("nothing", weight=4, lsq=True)]
    report = pj.quantization_report(Net(), rules, jnp.zeros((1, 3), jnp.int32))
    lines = report.summary().splitlines()
    assert lines[0] == "#0 'head': float (excluded) -> 1 op(s): head/kernel"
    assert lines[1] == ("#1 'embed': weight int8 symmetric per output channel, input float "
                        "-> 1 op(s): embed/embedding")
    assert lines[2] == ("#2 'fc_.*|ln': weight int4 symmetric, groups of 4 along the "
                        "contraction, input int8 affine per tensor (percentile observer) -> "
                        "4 op(s): fc_0/kernel, fc_1/kernel, fc_2/kernel, ... (+1)")
    assert lines[3] == ("#3 'nothing': weight int4 symmetric per output channel, input "
                        "float, LSQ -> no op (unmatched)")
    assert len(lines) == 4  # the norm's scale and bias are not weights: no line, no op
    # per op, the specs laid on the weight
    what = {path: o.what for path, o in report.weights().items()}
    assert what == {
        "embed/embedding": "weight int8 symmetric, per channel (axis 0), input ids",
        **{f"fc_{i}/kernel": "weight int4 symmetric, axis 0, groups of 4, input int8 affine, "
           "per tensor" for i in range(4)},
        "head/kernel": "float (excluded by rule #0)"}


#: (spec, as a rule's weight: relative to the matmul, as laid on a weight: its axes)
@pytest.mark.parametrize("spec, rule_words, resolved_words", [
    (None, "float", "float"),
    (pj.QuantSpec(bits=8), "int8 affine, per tensor", "int8 affine, per tensor"),
    (pj.QuantSpec(bits=3, symmetric=True, narrow_range=True, axis=-1),
     "int3 symmetric narrow, per output channel", "int3 symmetric narrow, per channel (axis -1)"),
    (pj.QuantSpec(bits=8, symmetric=True, axis=(1, 2)), "int8 symmetric, per output channel",
     "int8 symmetric, per channel (axes (1, 2))"),
    (pj.QuantSpec(dtype="float8_e4m3fn"), "float8_e4m3fn, per tensor",
     "float8_e4m3fn, per tensor"),
    (pj.formats.MXFP4, "float4_e2m1fn (E8M0 scales), groups of 32 along the contraction",
     "float4_e2m1fn (E8M0 scales), axis -1, groups of 32"),
    (pj.formats.NVFP4,
     "float4_e2m1fn (float8_e4m3fn x float32 scales), groups of 16 along the contraction",
     "float4_e2m1fn (float8_e4m3fn x float32 scales), axis -1, groups of 16"),
    (pj.formats.MXINT8, "int8 symmetric narrow (E8M0 scales), groups of 32 along the contraction",
     "int8 symmetric narrow (E8M0 scales), axis -1, groups of 32"),
    (8, "int8 symmetric per output channel", "int8 symmetric per output channel"),
])
def test_describe_spec(spec, rule_words, resolved_words):
    assert describe_spec(spec) == rule_words
    assert describe_spec(spec, resolved=True) == resolved_words


@pytest.mark.parametrize("spec, words", [
    (None, "float"),
    (8, "int8 affine per tensor"),
    (pj.QuantSpec(bits=8), "int8 affine, per tensor"),
    (pj.formats.MXFP8_E4M3, "float8_e4m3fn (E8M0 scales), blocks of 32 along the last axis"),
    (pj.QuantSpec(bits=8, symmetric=True, axis=0, group_size=2),
     "int8 symmetric, blocks of 2 along axis 0"),
])
def test_describe_act_spec(spec, words):
    assert describe_spec(spec, act=True) == words
