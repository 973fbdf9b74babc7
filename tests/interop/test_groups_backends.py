"""Per-group (and per-channel) numerics are bit-identical across JAX, NumPy and Torch."""

import jax
import numpy as np
import pytest
from array_api_compat import numpy as xnp
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import float_arrays

import pychop_jax as pj
from pychop_jax.core import numerics

torch = pytest.importorskip("torch")
from array_api_compat import torch as xtorch  # noqa: E402


@st.composite
def grouped_case(draw, dtype=np.float32):
    shape = draw(st.sampled_from([(8, 6), (4, 3, 8)]))
    axis = draw(st.sampled_from([a for a in range(-len(shape), len(shape)) if shape[a] % 2 == 0]))
    group = draw(st.sampled_from([g for g in (1, 2, 4, 8) if shape[axis] % g == 0]))
    spec = pj.QuantSpec(bits=draw(st.integers(2, 16)), symmetric=draw(st.booleans()),
                        axis=axis, group_size=group)
    x = draw(float_arrays(shape, dtype, subnormal=True, extremes=draw(st.booleans())))
    return x, spec


def bits(a):
    return np.asarray(a).view(np.uint8)


def check_all_backends(x, spec):
    state = pj.calibrate(x, spec)
    q = pj.quantize(x, state)
    s_np, z_np = numerics.calibrate(xnp, x, spec)
    xt = torch.from_numpy(x.copy())
    s_t, z_t = numerics.calibrate(xtorch, xt, spec)
    q_np = numerics.quantize(xnp, x, s_np, z_np, spec)
    q_t = numerics.quantize(xtorch, xt, s_t, z_t, spec)
    for s in (s_np, s_t.numpy()):
        np.testing.assert_array_equal(bits(state.scale), bits(s))
    for z in (z_np, z_t.numpy()):
        np.testing.assert_array_equal(state.zero_point, z)
    for codes in (q_np, q_t.numpy()):
        assert codes.dtype == spec.code_dtype
        np.testing.assert_array_equal(q, codes)
    with np.errstate(over="ignore"):
        d_np = numerics.dequantize(xnp, q_np, s_np, z_np, spec)
    np.testing.assert_array_equal(bits(pj.dequantize(q, state)), bits(d_np))


@settings(max_examples=75)
@given(grouped_case())
def test_per_group_float32_identical_across_backends(case):
    check_all_backends(*case)


@settings(max_examples=50)
@given(grouped_case(np.float64))
def test_per_group_float64_identical_across_backends(case):
    with jax.enable_x64(True):
        check_all_backends(*case)
