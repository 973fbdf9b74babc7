"""QAT-trained linen models -> integer-served models (pychop_jax.serving)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pychop_jax as pj
import pychop_jax.linen as qnn
from pychop_jax import serving

# to_served / to_served_nnx are deprecated (quantize_model + serve_model replace them);
# their behaviour stays tested until they are removed
pytestmark = pytest.mark.filterwarnings("ignore:pychop_jax.serving.to_served:DeprecationWarning")


def test_to_served_is_deprecated_with_its_replacement():
    model = nn.Dense(2)
    variables = model.init(jax.random.key(0), jnp.ones((1, 2)))
    with pytest.warns(DeprecationWarning, match="quantize_model.*serve_model"):
        serving.to_served(model, variables, jnp.ones((1, 2)))

X = jax.random.uniform(jax.random.key(0), (16, 6, 6, 2)) * 2 - 0.5
#: QAT settings every served model is checked under (linen and nnx)
CONFIGS = [
    dict(weight_bits=8, act_bits=8),
    dict(weight_bits=4, act_bits=4),
    dict(weight_bits=3, act_bits=6, act_symmetric=True),
    dict(weight_bits=4, act_bits=4, weight_symmetric=False),
    dict(weight_bits=2, act_bits=2, lsq=True),
]


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


@pytest.mark.parametrize("kw", CONFIGS)
def test_served_model_computes_the_fake_quant_evaluation(kw):
    model = QatNet(kw)
    variables = trained_variables(model, lsq=kw.get("lsq", False))
    params, report = serving.to_served(model, variables, X[:1])
    assert [r.path for r in report] == [("conv",), ("fc",), ("head",)]
    expected_source = "learned" if kw.get("lsq") else "observed"
    assert all(r.input_state == expected_source for r in report)
    kernel = params["fc"]["kernel"]
    assert isinstance(kernel, pj.QuantizedKernel) and kernel.weights.spec.bits == kw["weight_bits"]
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
        return isinstance(k, pj.QuantizedKernel)

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
    assert size < pj.serving.checkpoint.to_bytes(params).__len__()  # packing shrinks the file


# -- flax.nnx ---------------------------------------------------------------------------------
class NnxNet:
    """The same architecture from pychop_jax.nnx layers (built lazily: nnx import)."""

    def __new__(cls, **kw):
        from flax import nnx

        import pychop_jax.nnx as qnnx

        class Net(nnx.Module):
            def __init__(self, rngs):
                self.conv = qnnx.QuantConv(2, 4, (3, 3), rngs=rngs, **kw)
                self.fc = qnnx.QuantDense(4 * 6 * 6, 8, rngs=rngs, **kw)
                self.head = qnnx.QuantDense(8, 3, rngs=rngs, **kw)

            def __call__(self, x):
                x = nn.relu(self.conv(x))
                x = nn.relu(self.fc(x.reshape(x.shape[0], -1)))
                return self.head(x)

        return Net(nnx.Rngs(1))


def trained_nnx(kw):
    import pychop_jax.nnx as qnnx

    model = NnxNet(**kw)
    if kw.get("lsq"):
        qnnx.init_lsq(model, X)
    else:
        model.train()
        model(X)
    model.eval()
    return model


@pytest.mark.parametrize("kw", CONFIGS)
def test_served_nnx_model_computes_the_fake_quant_evaluation(kw):
    from flax import nnx

    import pychop_jax.nnx as qnnx

    model = trained_nnx(kw)
    fake = model(X)
    served, report = serving.to_served_nnx(model)
    assert [r.path for r in report] == [("conv",), ("fc",), ("head",)]
    expected_source = "learned" if kw.get("lsq") else "observed"
    assert all(r.input_state == expected_source for r in report)
    kernel = served.fc.kernel[...]
    assert isinstance(kernel, pj.QuantizedKernel) and kernel.weights.spec.bits == kw["weight_bits"]
    assert served.fc.input_quant is None
    # the QAT model is left as it was
    assert isinstance(model.fc.dot_general, qnnx.WeightQuant)
    np.testing.assert_array_equal(model(X), fake)
    for out in (served(X), nnx.jit(lambda m, x: m(x))(served, X)):
        np.testing.assert_array_equal(jnp.argmax(out, -1), jnp.argmax(fake, -1))
        np.testing.assert_allclose(out, fake, rtol=1e-5, atol=1e-5)


def test_nnx_layers_without_observed_data_calibrate_per_call():
    # (at 8 bits: with a few bits, float summation order can flip one code of a
    # later layer's input, which then moves that output by a whole grid step)
    model = NnxNet(weight_bits=4, act_bits=8)
    model.eval()  # observers have seen nothing
    served, report = serving.to_served_nnx(model)
    assert {r.input_state for r in report} == {"dynamic"}
    np.testing.assert_allclose(served(X), model(X), rtol=1e-5, atol=1e-5)


def test_nnx_float_weight_layers_cannot_be_served():
    with pytest.raises(ValueError, match="conv keeps float weights"):
        serving.to_served_nnx(trained_nnx(dict(weight_bits=None, act_bits=8)))


# -- float and block-scaled formats (weight_format / act_format) ------------------------------
FLOAT_CONFIGS = [
    # fp8 x fp8, per channel / per tensor: float_dot_general's code GEMM
    dict(weight_format="float8_e4m3fn", act_format="float8_e4m3fn"),
    # fp4 weights with power-of-two scales per channel, float inputs (weight-only)
    dict(weight_format=pj.QuantSpec(dtype="float4_e2m1fn", axis=-1,
                                    scale_dtype="float8_e8m0fnu")),
    # NF4 weights, MX fp8 inputs in blocks of 2 along the last axis (dynamic)
    dict(weight_format="nf4", act_format=pj.formats.mx("float8_e4m3fn", group_size=2)),
    # fp8 e5m2 weights, int8 inputs
    dict(weight_format="float8_e5m2", act_bits=8),
]


def _float_report_checks(report, kw, kernel):
    act = kw.get("act_format")
    if act is None and "act_bits" not in kw:
        expected = "dynamic"  # float input: no quantizer
    else:
        expected = "dynamic" if getattr(act, "group_size", None) else "observed"
    assert {r.input_state for r in report} == {expected}
    assert isinstance(kernel, pj.QuantizedKernel)
    spec = kw["weight_format"]
    spec = spec if isinstance(spec, pj.QuantSpec) else pj.QuantSpec(dtype=spec, axis=-1)
    assert kernel.weights.spec == spec
    assert kernel.weights.unpacked_codes().dtype == spec.code_dtype  # e.g. float8_e4m3fn


@pytest.mark.parametrize("kw", FLOAT_CONFIGS)
def test_float_format_layers_are_served(kw):
    model = QatNet(kw)
    variables = trained_variables(model)
    params, report = serving.to_served(model, variables, X[:1])
    _float_report_checks(report, kw, params["fc"]["kernel"])
    other = X * 1.5  # frozen input ranges clip some of it
    fake = model.apply(variables, other)
    for fn in (ServedNet().apply, jax.jit(ServedNet().apply)):
        served = fn({"params": params}, other)
        np.testing.assert_array_equal(jnp.argmax(served, -1), jnp.argmax(fake, -1))
        np.testing.assert_allclose(served, fake, rtol=1e-5, atol=1e-5)
    # the served codes are the ml_dtypes format itself, with the kernel's scales
    w = params["fc"]["kernel"].weights
    kernel = variables["params"]["fc"]["kernel"]
    np.testing.assert_array_equal(w.dequantize(),
                                  pj.fake_quant(kernel, pj.calibrate(kernel, w.spec)))


@pytest.mark.parametrize("kw", FLOAT_CONFIGS[:3])
def test_float_format_nnx_layers_are_served(kw):
    model = trained_nnx(kw)
    other = X * 1.5
    fake = model(other)
    served, report = serving.to_served_nnx(model)
    _float_report_checks(report, kw, served.fc.kernel[...])
    np.testing.assert_allclose(served(other), fake, rtol=1e-5, atol=1e-5)
