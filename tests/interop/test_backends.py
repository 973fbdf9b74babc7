"""NumPy and Torch adapters: bit-identical to the JAX ops, and the same errors.

Every backend is run on the same input: the JAX ops (the core), the NumPy and Torch
adapters on their XLA engine (what users get on CPU), and both adapters on their
portable engine (``numerics`` called with the NumPy / Torch namespace op by op, what
Torch tensors on other devices get).  All five must give the same bits.
"""

import re

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from strategies import array_and_spec

import pychop_jax as pj
from pychop_jax.core import xla_cpu
from pychop_jax.interop import engine as eng
from pychop_jax.interop import numpy as np_ops

torch = pytest.importorskip("torch")
from pychop_jax.interop import torch as torch_ops  # noqa: E402

SPEC = pj.QuantSpec(bits=8)
X = np.array([[0.1, -0.2, 0.3], [0.4, -0.5, 0.6]], np.float32)

NP, TORCH = np_ops.FRAMEWORK, torch_ops.FRAMEWORK


def _jax_run(x, spec):
    state = pj.calibrate(x, spec)
    q = pj.quantize(x, state)
    return state.scale, state.zero_point, q, pj.dequantize(q, state), pj.fake_quant(x, state)


def _adapter_run(fw, x, spec):
    """The same pipeline through an adapter; results as NumPy arrays."""
    if fw.name == "torch":
        x = torch.tensor(x)
    state = eng.calibrate(fw, x, spec)
    q = eng.quantize(fw, x, state)
    out = (state.scale, state.zero_point, q, eng.dequantize(fw, q, state),
           eng.fake_quant(fw, x, state)[0])
    return tuple(o.numpy() if isinstance(o, torch.Tensor) else o for o in out)


def _assert_same_bits(got, want):
    names = ("scale", "zero_point", "codes", "dequantized", "fake_quant")
    for name, a, b in zip(names, got, want, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype, (name, a.dtype, b.dtype)
        assert a.shape == b.shape, (name, a.shape, b.shape)
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8), err_msg=name)


ENGINES = {"numpy": NP, "numpy-xp": NP.portable(), "torch": TORCH, "torch-xp": TORCH.portable()}


@settings(max_examples=100)
@given(array_and_spec(subnormal=True, extremes=True))
def test_float32_bit_identical_to_jax(case):
    """bits 2..16, symmetric / asymmetric, narrow range, per-tensor / per-channel on any
    axis (negative included), extremes and subnormals; every engine on every case."""
    x, spec = case
    want = _jax_run(x, spec)
    for fw in ENGINES.values():
        _assert_same_bits(_adapter_run(fw, x, spec), want)


@settings(max_examples=50)
@given(array_and_spec(dtype=np.float64, extremes=True))
def test_float64_computed_in_float64_equal_to_jax_x64(case):
    x, spec = case
    with jax.enable_x64(True):
        want = _jax_run(x, spec)
    for fw in ENGINES.values():
        got = _adapter_run(fw, x, spec)  # with jax_enable_x64 off
        assert got[0].dtype == np.float64 and got[3].dtype == np.float64
        _assert_same_bits(got, want)


def test_per_group_specs_work_too():
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    spec = pj.QuantSpec(bits=4, symmetric=True, axis=1, group_size=4)
    for fw in ENGINES.values():
        _assert_same_bits(_adapter_run(fw, x, spec), _jax_run(x, spec))


@pytest.mark.parametrize("dtype", [np.float16, "bfloat16"])
def test_half_precision_computed_in_float32(dtype):
    import ml_dtypes  # noqa: F401  (numpy's bfloat16 comes from ml_dtypes, with jax)

    x = X.astype(dtype)
    state = np_ops.calibrate(x, SPEC)
    assert state.scale.dtype == np.float32
    want = pj.calibrate(x, SPEC)
    np.testing.assert_array_equal(state.scale, want.scale)
    y = np_ops.fake_quant(x, state)
    assert y.dtype == x.dtype
    np.testing.assert_array_equal(y.astype(np.float32),
                                  np.asarray(pj.fake_quant(x, want)).astype(np.float32))
    t = torch.tensor(X).to(torch.bfloat16)
    tstate = torch_ops.calibrate(t, SPEC)
    assert tstate.scale.dtype == torch.float32
    assert torch_ops.fake_quant(t, tstate).dtype == torch.bfloat16


def test_numpy_results_are_ordinary_writable_arrays():
    state = np_ops.calibrate(X, SPEC)
    q = np_ops.quantize(X, state)
    assert isinstance(q, np.ndarray) and q.flags.writeable
    q[0, 0] = 0  # no "assignment destination is read-only"


def test_unaligned_and_strided_numpy_input():
    big = np.random.default_rng(1).standard_normal(1 << 17).astype(np.float32)
    for x in (big[1:], big[::2], big.reshape(256, -1).T):  # unaligned, strided, transposed
        spec = pj.QuantSpec(bits=8, axis=-1) if x.ndim == 2 else SPEC
        state = np_ops.calibrate(x, spec)
        want = pj.calibrate(np.ascontiguousarray(x), spec)
        np.testing.assert_array_equal(state.scale, want.scale)
        np.testing.assert_array_equal(np_ops.quantize(x, state), pj.quantize(x, want))


# -- errors: the same exception and message from every backend -----------------------------
def _as(name, a):
    return torch.tensor(a) if name == "torch" else a


BACKENDS = {"jax": pj, "numpy": np_ops, "torch": torch_ops}


@pytest.mark.parametrize("name", sorted(BACKENDS))
@pytest.mark.parametrize(
    "bad, message",
    [
        ([1.0, np.nan], "calibrate got 1 NaN value"),
        ([np.inf, -np.inf, 1.0], "calibrate got 2 +-inf value"),
        ([np.nan, np.inf], "calibrate got 1 NaN and 1 +-inf value"),
    ],
)
def test_non_finite_input_raises(name, bad, message):
    x = _as(name, np.array(bad, np.float32))
    with pytest.raises(ValueError, match=re.escape(message)):
        BACKENDS[name].calibrate(x, SPEC)


@pytest.mark.parametrize("name", sorted(BACKENDS))
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_one_non_finite_value_in_a_large_array_is_caught(name, bad):
    x = np.random.default_rng(2).standard_normal(1 << 18).astype(np.float32)
    x[12345] = bad
    be = BACKENDS[name]
    with pytest.raises(ValueError, match="calibrate got 1"):
        be.calibrate(_as(name, x), SPEC)
    clean = be.calibrate(_as(name, np.nan_to_num(x, posinf=0.0)), SPEC)
    with pytest.raises(ValueError, match="quantize got 1"):
        be.quantize(_as(name, x), clean)
    with pytest.raises(ValueError, match="fake_quant got 1"):
        be.fake_quant(_as(name, x), clean)


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_shape_and_dtype_errors(name):
    be = BACKENDS[name]
    with pytest.raises(ValueError, match="calibrate got an empty array"):
        be.calibrate(_as(name, np.zeros((0, 3), np.float32)), SPEC)
    with pytest.raises(TypeError, match="calibrate needs a floating-point array; got dtype"):
        be.calibrate(_as(name, np.ones(3, np.int32)), SPEC)
    with pytest.raises(ValueError, match="axis=2 is out of range for an array with 2"):
        be.calibrate(_as(name, X), pj.QuantSpec(axis=2))
    with pytest.raises(TypeError, match="calibrate needs a QuantSpec"):
        be.calibrate(_as(name, X), 8)
    state = be.calibrate(_as(name, X), pj.QuantSpec(axis=0))  # scale (2, 1)
    with pytest.raises(ValueError, match=r"needs \(3, 1\)"):
        be.quantize(_as(name, np.ones((3, 3), np.float32)), state)
    with pytest.raises(TypeError, match="dequantize needs integer codes"):
        be.dequantize(_as(name, X), state)
    with pytest.raises(TypeError, match="quantize needs a floating-point array"):
        be.quantize(_as(name, np.ones(X.shape, np.int32)), state)


@pytest.mark.parametrize("name, other", [("numpy", "torch"), ("numpy", "jax"),
                                         ("torch", "numpy"), ("torch", "jax"),
                                         ("jax", "torch")])
def test_array_of_another_framework_is_a_type_error(name, other):
    x = {"numpy": X, "torch": torch.tensor(X), "jax": jax.numpy.asarray(X)}[other]
    be = BACKENDS[name]
    pattern = f"expects a {name} array but got a {other} array; use the {other} backend"
    with pytest.raises(TypeError, match=re.escape(pattern)):
        be.calibrate(x, SPEC)
    state = be.calibrate({"numpy": X, "torch": torch.tensor(X), "jax": X}[name], SPEC)
    with pytest.raises(TypeError, match=re.escape(pattern)):
        be.quantize(x, state)


def test_portable_engine_raises_the_same_errors():
    for fw in (NP.portable(), TORCH.portable()):
        x = np.array([1.0, np.nan, np.inf], np.float32)
        with pytest.raises(ValueError, match=re.escape("calibrate got 1 NaN and 1 +-inf")):
            eng.calibrate(fw, _as(fw.name, x), SPEC)
        state = eng.calibrate(fw, _as(fw.name, X), SPEC)
        with pytest.raises(ValueError, match="quantize got 1 NaN"):
            eng.quantize(fw, _as(fw.name, np.where(X > 0.5, np.nan, X)), state)


def test_numpy_dequantize_of_extreme_range_does_not_warn():
    # a 2-bit grid over [-max, max] puts its top code beyond float32's max; the
    # formulas clip it, and NumPy's overflow warning must not reach the user
    x = np.array([np.finfo(np.float32).max, -np.finfo(np.float32).max], np.float32)
    spec = pj.QuantSpec(bits=2)
    for fw in (NP, NP.portable()):
        with np.errstate(all="raise"):
            state = eng.calibrate(fw, x, spec)
            xhat = eng.dequantize(fw, eng.quantize(fw, x, state), state)
        assert np.isfinite(xhat).all()


def _as_framework(fw, a):
    return torch.tensor(np.asarray(a)) if fw.name == "torch" else np.asarray(a)


def _to_numpy(a):
    return a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("symmetric", [False, True])
def test_learned_float_zero_point_rounds_the_same_everywhere(engine, symmetric):
    # an LSQ+ state: float scale and a float zero point in code units
    fw = ENGINES[engine]
    spec = pj.QuantSpec(bits=4, symmetric=symmetric)
    x = np.array([-1.0, 0.3, 2.0, 5.0, -0.21], np.float32)
    zp = 0.0 if symmetric else 3.6  # rounds half-to-even to 4
    state_jax = pj.QuantState(np.full((1,), 0.4, np.float32), np.full((1,), zp, np.float32),
                              spec)
    state = pj.QuantState(_as_framework(fw, state_jax.scale),
                          _as_framework(fw, state_jax.zero_point), spec)
    q = eng.quantize(fw, _as_framework(fw, x), state)
    np.testing.assert_array_equal(_to_numpy(q), pj.quantize(x, state_jax))
    # independent reference: codes with the rounded zero point
    z = 0 if symmetric else 4
    np.testing.assert_array_equal(_to_numpy(q), np.clip(np.round(x / np.float32(0.4)) + z,
                                                        spec.qmin, spec.qmax))
    np.testing.assert_array_equal(_to_numpy(eng.dequantize(fw, q, state)),
                                  pj.dequantize(np.asarray(_to_numpy(q)), state_jax))
    np.testing.assert_array_equal(_to_numpy(eng.fake_quant(fw, _as_framework(fw, x),
                                                               state)[0]),
                                  pj.fake_quant(x, state_jax))


@pytest.mark.parametrize("engine", ["jax", *ENGINES])
@pytest.mark.parametrize("bad_scale", [np.nan, np.inf, -0.1, 0.0])
def test_invalid_scale_is_rejected(engine, bad_scale):
    scale = np.array([0.1, bad_scale], np.float32).reshape(1, 2)
    zp = np.zeros((1, 2), np.int32)
    x = np.ones((3, 2), np.float32)
    message = "the state's scale must be finite and > 0"
    spec = pj.QuantSpec(bits=8, axis=1)
    if engine == "jax":
        state = pj.QuantState(scale, zp, spec)
        for call in (lambda: pj.quantize(x, state), lambda: pj.fake_quant(x, state),
                     lambda: pj.dequantize(np.ones((3, 2), np.uint8), state)):
            with pytest.raises(ValueError, match=message):
                call()
        # under jit nothing can raise: the documented garbage-in stays possible there
        jax.jit(pj.quantize)(x, state)
        return
    fw = ENGINES[engine]
    state = pj.QuantState(_as_framework(fw, scale), _as_framework(fw, zp), spec)
    with pytest.raises(ValueError, match=message):
        eng.quantize(fw, _as_framework(fw, x), state)
    with pytest.raises(ValueError, match=message):
        eng.fake_quant(fw, _as_framework(fw, x), state)


# -- the XLA engine's kernels ----------------------------------------------------------------
@pytest.mark.parametrize("one_task", [False, True])
def test_one_task_and_split_kernels_give_the_same_bits(one_task, monkeypatch):
    """Below ``xla_cpu.ONE_TASK_MAX`` elements the pipelines run in one XLA task, from
    there on XLA splits them; both compilations must agree (checked on one array,
    forcing the other kernel by moving the threshold)."""
    x = torch.from_numpy(np.random.default_rng(0).standard_normal(3 * 4096, np.float32))
    state = torch_ops.calibrate(x, SPEC)
    reference = eng.fake_quant(TORCH, x, state, mask=True)
    kernel_for = xla_cpu.jit_by_size(lambda a: a, ())
    small = kernel_for((x.numpy(),))
    monkeypatch.setattr(xla_cpu, "ONE_TASK_MAX", 1 << 30 if one_task else 1)
    assert (kernel_for((x.numpy(),)) is small) == (x.numel() < (1 << 20) and one_task
                                                   or x.numel() >= (1 << 20) and not one_task)
    y, inside = eng.fake_quant(TORCH, x, state, mask=True)
    assert torch.equal(y, reference[0]) and torch.equal(inside, reference[1])


@pytest.mark.parametrize("portable", [False, True])
def test_prepared_pipeline_reruns_and_brings_small_results_to_the_host(portable):
    fw = TORCH.portable() if portable else TORCH
    x = torch.tensor(X)
    call = eng.prepare(fw, eng.observe_pipeline, (x,), SPEC, to_host=(0, 1))
    for scale in (1.0, 3.0):  # the same prepared call, new data each time
        lo, hi, finite = call(x * scale)
        assert bool(finite)
        # the XLA engine returns the outputs named in to_host as NumPy arrays
        assert isinstance(lo, np.ndarray) != portable and isinstance(finite, torch.Tensor)
        assert float(lo.min()) == pytest.approx(-0.5 * scale)
        assert float(hi.max()) == pytest.approx(0.6 * scale)
