"""float16 / bfloat16 scales through quantize_model -> serve_model -> save_quantized:
served logits equal the QAT model's frozen evaluation on both serving paths, and the
checkpoint holds 2-byte scales."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pychop_jax as pj


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(8, name="out")(nn.relu(nn.Dense(64, name="hidden")(x)))


def spec(scale_dtype, bits=4, group=32):
    return pj.QuantSpec(bits=bits, symmetric=True, axis=0, group_size=group,
                        scale_dtype=scale_dtype)


@pytest.mark.parametrize("scale_dtype", ["float16", "bfloat16"])
def test_weight_only_and_int_path_serve_the_frozen_evaluation(scale_dtype, tmp_path):
    x = jax.random.normal(jax.random.key(1), (4, 64))
    weight_only = [pj.QuantRule(".*", weight=spec(scale_dtype))]
    w8a8 = [pj.QuantRule(".*", weight=pj.QuantSpec(bits=8, symmetric=True, axis=-1,
                                                   scale_dtype=scale_dtype),
                         act=pj.QuantSpec(bits=8, scale_dtype=scale_dtype), observer="minmax")]
    for rules in (weight_only, w8a8):
        qmodel = pj.quantize_model(MLP(), rules)
        variables = qmodel.init(jax.random.key(0), x)
        if "quant_stats" in variables:
            _, upd = qmodel.apply(variables, x, mutable=["quant_stats"])
            variables = {**variables, **upd}
        want = qmodel.apply(variables, x)
        served_fn, served = pj.serve_model(qmodel, variables, x)
        weights = served["params"]["hidden"]["kernel"]
        assert isinstance(weights, pj.QuantizedArray)
        assert weights.state.scale.dtype == jnp.dtype(scale_dtype)
        if "quant_stats" in variables:  # the frozen input quantizer keeps its scale dtype
            frozen = served["quant_inputs"]["hidden"]["kernel"]["input"]
            assert frozen.spec.scale_dtype == scale_dtype
        np.testing.assert_allclose(jax.jit(served_fn)(served, x), want, rtol=1e-5, atol=1e-5)
        pj.save_quantized(tmp_path / "m.msgpack", served)
        back = pj.load_quantized(tmp_path / "m.msgpack")
        np.testing.assert_array_equal(served_fn(back, x), served_fn(served, x))


def test_float16_scales_shrink_the_int4_checkpoint(tmp_path):
    x = jnp.ones((1, 64))
    params = MLP().init(jax.random.key(0), x)
    sizes = {}
    for sd in (None, "float16"):
        qmodel = pj.quantize_model(MLP(), [pj.QuantRule("hidden", weight=spec(sd)),
                                           pj.QuantRule("out", weight=spec(sd, group=64))])
        _, served = pj.serve_model(qmodel, params, x)
        sizes[sd] = pj.save_quantized(tmp_path / f"{sd}.msgpack", served)
    n_scales = 64 * 64 // 32 + 8  # hidden (64, 64) in groups of 32, out (64, 8) in one group
    assert sizes[None] - sizes["float16"] == pytest.approx(2 * n_scales, abs=32)


@pytest.mark.parametrize("method", ["GPTQ", "HQQ", "AWQ"])
def test_algorithms_work_on_the_rounded_grid(method):
    """The algorithms' kernels lie on the float16-scale grid the served model uses, so
    the served logits equal the calibrated model's evaluation."""
    x = jax.random.normal(jax.random.key(1), (32, 64))
    rule = pj.QuantRule(".*", weight=spec("float16"), method=getattr(pj.algorithms, method)())
    qmodel = pj.quantize_model(MLP(), [rule])
    variables, _ = pj.calibrate_model(qmodel, qmodel.init(jax.random.key(0), x), [x])
    served_fn, served = pj.serve_model(qmodel, variables, x)
    kernel = served["params"]["hidden"]["kernel"]
    assert isinstance(kernel, pj.ScaledKernel) == (method == "AWQ")
    kernel = getattr(kernel, "kernel", kernel)  # AWQ: a ScaledKernel around it
    assert kernel.state.scale.dtype == jnp.float16
    np.testing.assert_allclose(served_fn(served, x), qmodel.apply(variables, x),
                               rtol=1e-5, atol=1e-5)
