"""Float and block-scaled formats downstream: QAT layers, observers, quantize_params,
checkpoints, quantize_model / serve_model and float_dot_general.

References: the stock Flax layer on a kernel fake-quantized by hand (``pj.calibrate`` +
``pj.fake_quant``, tested against ml_dtypes in tests/core/test_formats.py), and float64
NumPy products of dequantized operands.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import pychop_jax as pj
import pychop_jax.linen as qnn
import pychop_jax.nnx as qnnx
from pychop_jax import QuantRule, quantize_model, serve_model
from pychop_jax.serving.deploy import INPUTS
from pychop_jax.transform.plan import STATS

F = pj.formats
X = jax.random.normal(jax.random.key(0), (8, 64))
DN = (((1,), (0,)), ((), ()))
MXFP8_IN = dataclasses.replace(F.MXFP8_E4M3, axis=0)  # blocks along a Dense kernel's input


def fq(x, spec):
    return pj.fake_quant(x, pj.calibrate(x, spec))


@pytest.mark.parametrize("fmt", [MXFP8_IN, dataclasses.replace(F.NVFP4, axis=0),
                                 "float8_e4m3fn", "nf4"])
def test_quant_dense_weight_format_linen_and_nnx(fmt):
    spec = fmt if isinstance(fmt, pj.QuantSpec) else pj.QuantSpec(dtype=fmt, axis=-1)
    layer = qnn.QuantDense(16, weight_format=fmt)
    v = layer.init(jax.random.key(1), X)
    p = v["params"]
    want = X @ fq(p["kernel"], spec) + p["bias"]
    np.testing.assert_array_equal(layer.apply(v, X), want)
    g = jax.grad(lambda p: layer.apply({"params": p}, X).sum())(p)["kernel"]
    assert bool(jnp.any(g != 0))
    lin = qnnx.QuantDense(64, 16, weight_format=fmt, rngs=nnx.Rngs(0))
    lin.kernel[...] = p["kernel"]
    lin.bias[...] = p["bias"]
    np.testing.assert_array_equal(lin(X), want)


def test_weight_format_errors():
    with pytest.raises(ValueError, match="lsq=True"):
        qnn.QuantDense(4, weight_format="float8_e4m3fn", lsq=True).init(jax.random.key(0), X)
    with pytest.raises(ValueError, match="weight_format='fp8'"):
        qnn.QuantDense(4, weight_format="fp8").init(jax.random.key(0), X)


E4M3 = pj.QuantSpec(dtype="float8_e4m3fn")


@pytest.mark.parametrize("act", ["float8_e4m3fn", E4M3, F.MXFP8_E4M3, F.MXFP4])
def test_act_format_linen_and_nnx(act):
    """The input quantizer of act_format: observed per-tensor fp8 (minmax: the batch's
    own calibration while training, the frozen range at evaluation) or dynamic MX
    blocks along the input's last axis (calibrated on every call)."""
    spec = E4M3 if isinstance(act, str) else act
    dynamic = spec.group_size is not None
    wspec = pj.QuantSpec(dtype="float8_e4m3fn", axis=-1)
    layer = qnn.QuantDense(16, weight_format="float8_e4m3fn", act_format=act,
                           observer=pj.observers.minmax)
    v = layer.init(jax.random.key(1), X)
    assert ("quant_stats" in v) is not dynamic
    p = v["params"]
    w_hat = fq(p["kernel"], wspec)
    y, upd = layer.apply(v, X, train=True, mutable=["quant_stats"])
    np.testing.assert_array_equal(y, fq(X, spec) @ w_hat + p["bias"])
    v = {**v, **upd}
    other = 3.0 * X  # evaluation: observed specs keep X's range (and clip), MX follows
    frozen = pj.calibrate(other if dynamic else X, spec)
    want = pj.fake_quant(other, frozen) @ w_hat + p["bias"]
    np.testing.assert_array_equal(layer.apply(v, other), want)
    # gradient: the clipped STE of the input, through the fake-quantized kernel
    gx = jax.grad(lambda x: layer.apply(v, x).sum())(other)
    scale = np.asarray(frozen.scale)
    scale = np.repeat(scale, other.shape[-1] // scale.shape[-1], -1)  # one per element
    inside = np.abs(np.asarray(other) / scale) <= spec.max_value
    ref = np.where(inside, np.asarray(w_hat).sum(1)[None, :], 0.0)
    assert dynamic or not inside.all()  # the frozen range clips some of 3 * X
    np.testing.assert_allclose(gx, ref, rtol=1e-6, atol=1e-6)
    lin = qnnx.QuantDense(64, 16, weight_format="float8_e4m3fn", act_format=act,
                          observer=pj.observers.minmax, rngs=nnx.Rngs(0))
    lin.kernel[...] = p["kernel"]
    lin.bias[...] = p["bias"]
    lin.train()
    np.testing.assert_array_equal(lin(X), fq(X, spec) @ w_hat + p["bias"])
    lin.eval()
    np.testing.assert_array_equal(lin(other), want)
    assert (lin.input_quant.stats is None) is dynamic


def test_act_format_errors():
    with pytest.raises(ValueError, match="act_format='fp8'"):
        qnn.QuantDense(4, act_format="fp8").init(jax.random.key(0), X)
    with pytest.raises(ValueError, match="act_format='float8_e4m3fn' with lsq=True"):
        qnn.QuantDense(4, act_format="float8_e4m3fn", lsq=True).init(jax.random.key(0), X)
    with pytest.raises(ValueError, match="act_format"):
        qnnx.QuantDense(64, 4, act_format=3, rngs=nnx.Rngs(0))


def test_observer_state_equals_calibration():
    for spec in (F.MXFP4, F.NVFP4, pj.QuantSpec(dtype="float8_e5m2")):
        stats = pj.observers.minmax(pj.observers.init(spec, X.shape), X, spec)
        a, b = pj.observers.quant_state(stats, spec), pj.calibrate(X, spec)
        np.testing.assert_array_equal(a.scale, b.scale)
        np.testing.assert_array_equal(pj.fake_quant(X, a), pj.fake_quant(X, b))
    with pytest.raises(ValueError, match="observers.mse"):
        pj.observers.mse(pj.observers.init(F.MXFP4, X.shape), X, F.MXFP4)


@pytest.mark.parametrize("name", list(F.PRESETS))
def test_quantize_params_and_checkpoint(tmp_path, name):
    spec = dataclasses.replace(F.PRESETS[name], axis=0)
    params = {"dense": {"kernel": X.T, "bias": X[0, :8]}}
    qtree, _ = pj.quantize_params(params, [(".*kernel", spec)])
    qa = qtree["dense"]["kernel"]
    assert isinstance(qa, pj.QuantizedArray) and qa.spec == spec
    np.testing.assert_array_equal(qa.dequantize(), fq(X.T, spec))
    path = tmp_path / "q.msgpack"
    pj.save_quantized(path, qtree)
    back = pj.load_quantized(path)["dense"]["kernel"]
    assert back.spec == spec and back.packed == qa.packed and back.nbytes == qa.nbytes
    np.testing.assert_array_equal(back.codes, qa.codes)
    np.testing.assert_array_equal(back.dequantize(), qa.dequantize())
    dq = pj.dequantize_params(qtree)
    np.testing.assert_array_equal(dq["dense"]["kernel"], qa.dequantize())


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(32, name="fc1")(x))
        return nn.Dense(10, name="fc2")(x)


@pytest.mark.parametrize("rules", [
    [QuantRule("fc1", weight=dataclasses.replace(F.MXFP4, axis=0)),
     QuantRule("fc2", weight=dataclasses.replace(F.NVFP4, axis=0))],
    [QuantRule(".*", weight=MXFP8_IN, act=pj.QuantSpec(dtype="float8_e4m3fn"),
               observer="minmax")],
    [QuantRule(".*", weight=pj.QuantSpec(dtype="nf4", axis=0, group_size=32))],
])
def test_quantize_model_and_serve_model(rules):
    qmodel = quantize_model(MLP(), rules)
    v = qmodel.init(jax.random.key(2), X)
    _, upd = qmodel.apply(v, X, mutable=[STATS])
    v = {**v, **upd}
    other = X * 1.5
    expected = qmodel.apply(v, other)
    # the reference: stock layers on hand-quantized kernels (and inputs)
    p = v["params"]
    rule = rules[0]
    w1 = fq(p["fc1"]["kernel"], rule.weight)
    w2 = fq(p["fc2"]["kernel"], rules[-1].weight)
    h_in = other
    if rule.act is not None:
        h_in = pj.fake_quant(other, pj.calibrate(X, rule.act))
    h = nn.relu(h_in @ w1 + p["fc1"]["bias"])
    if rule.act is not None:
        calib = nn.relu(pj.fake_quant(X, pj.calibrate(X, rule.act)) @ w1 + p["fc1"]["bias"])
        h = pj.fake_quant(h, pj.calibrate(calib, rule.act))
    np.testing.assert_allclose(expected, h @ w2 + p["fc2"]["bias"], rtol=1e-5, atol=1e-5)
    served_fn, served = serve_model(qmodel, v, X)
    qa = served["params"]["fc1"]["kernel"]
    # a Dense kernel (64, 32) contracts axis 0: the rules' specs lie on it as written
    assert isinstance(qa, pj.QuantizedArray) and qa.spec == rule.weight
    np.testing.assert_array_equal(qa.dequantize(), w1)
    assert ("fc1" in served[INPUTS]) == (rule.act is not None)  # the frozen input range
    logits = jax.jit(served_fn)(served, other)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


# -- float_dot_general -----------------------------------------------------------------------
def test_fp8_dot_general_per_channel():
    w = jax.random.normal(jax.random.key(3), (64, 16))
    y = pj.float_dot_general(X, w, DN)
    xq = np.asarray(fq(X, pj.QuantSpec(dtype="float8_e4m3fn")), np.float64)
    wq = np.asarray(fq(w, pj.QuantSpec(dtype="float8_e4m3fn", axis=-1)), np.float64)
    np.testing.assert_allclose(y, xq @ wq, rtol=2e-6, atol=1e-5)
    ql = pj.QuantizedArray.quantize(X, pj.QuantSpec(dtype="float8_e5m2", axis=0))
    qr = pj.QuantizedArray.quantize(w, pj.QuantSpec(dtype="float8_e4m3fn"))
    y2 = jax.jit(lambda a, b: pj.float_dot_general(a, b, DN))(ql, qr)
    ref = np.asarray(ql.dequantize(), np.float64) @ np.asarray(qr.dequantize(), np.float64)
    np.testing.assert_allclose(y2, ref, rtol=2e-6, atol=1e-5)


@pytest.mark.parametrize("fmt", ["MXFP8_E4M3", "MXFP4", "NVFP4"])
def test_block_scaled_dot_general(fmt):
    w = jax.random.normal(jax.random.key(4), (64, 16))
    spec = F.PRESETS[fmt]
    ql = pj.QuantizedArray.quantize(X, spec)
    qr = pj.QuantizedArray.quantize(w, dataclasses.replace(spec, axis=0))
    y = pj.float_dot_general(ql, qr, DN, use_scaled_matmul=False)
    ref = np.asarray(ql.dequantize(), np.float64) @ np.asarray(qr.dequantize(), np.float64)
    np.testing.assert_allclose(y, ref, rtol=2e-6, atol=1e-5)


def test_integer_path_rejects_float_formats():
    qa = pj.QuantizedArray.quantize(X.T, dataclasses.replace(F.MXFP8_E4M3, axis=0))
    with pytest.raises(ValueError, match="float_dot_general"):
        pj.int_dot_general(X, qa, DN)
    with pytest.raises(ValueError, match="float element format"):
        pj.float_dot_general(X, X.T, DN, rhs_spec=pj.QuantSpec(bits=8, symmetric=True))


def _dot_operand_dtypes(jaxpr) -> set:
    """The operand dtypes of every dot_general of ``jaxpr``, sub-jaxprs included."""
    found = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.add(tuple(str(v.aval.dtype) for v in eqn.invars))
        for param in eqn.params.values():
            for sub in (param if isinstance(param, (list, tuple)) else [param]):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    found |= _dot_operand_dtypes(sub)
    return found


def test_served_fp8_layers_multiply_fp8_codes():
    """serve_model: fp8 weights (per output channel) and fp8 inputs (per tensor) are
    multiplied as fp8 codes with float32 accumulation (float_dot_general), and equal the
    QAT model's frozen evaluation; fp8 weights with float inputs stay a float32 product."""
    fp8 = pj.QuantSpec(dtype="float8_e4m3fn")
    rules = [QuantRule("fc1", weight=dataclasses.replace(fp8, axis=-1), act=fp8,
                       observer="minmax"),
             QuantRule("fc2", weight=dataclasses.replace(fp8, axis=-1))]
    qmodel = quantize_model(MLP(), rules)
    v = qmodel.init(jax.random.key(2), X)
    _, upd = qmodel.apply(v, X, mutable=[STATS])
    v = {**v, **upd}
    other = X * 1.5
    served_fn, served = serve_model(qmodel, v, X)
    np.testing.assert_allclose(jax.jit(served_fn)(served, other), qmodel.apply(v, other),
                               rtol=1e-5, atol=1e-5)
    dtypes = _dot_operand_dtypes(jax.make_jaxpr(served_fn)(served, other).jaxpr)
    assert ("float8_e4m3fn", "float8_e4m3fn") in dtypes  # fc1: the codes
    assert ("float32", "float32") in dtypes  # fc2: weight-only, dequantized
