"""The ``pychop`` surface: backend selection, the Chopi classes' attributes, methods and
errors, pychop 0.6 aliases, and agreement of the three classes."""

import gc
import os
import re
import subprocess
import sys
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import find_top_trace

import pychop
import pychop_jax as pj

torch = pytest.importorskip("torch")

X = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CLASSES = {"numpy": pychop.NumpyChopi, "torch": pychop.TorchChopi, "jax": pychop.JaxChopi}
ARRAY = {"numpy": lambda a: a, "torch": torch.tensor, "jax": jnp.asarray}


def as_numpy(a):
    return a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


@pytest.fixture(autouse=True)
def restore_backend():
    before = pychop.get_backend()
    yield
    pychop.backend(before)


# -- backend() and Chopi() ---------------------------------------------------------------------
def test_backend_selects_the_class_chopi_returns():
    assert pychop.get_backend() == "auto"  # the default
    for name, cls in CLASSES.items():
        pychop.backend(name)
        assert pychop.get_backend() == name
        ch = pychop.Chopi(num_bits=6, symmetric=True, per_channel=True, channel_dim=1)
        assert type(ch) is cls
        assert (ch.num_bits, ch.symmetric, ch.per_channel, ch.channel_dim) == (6, True, True, 1)
    pychop.backend("auto")
    assert type(pychop.Chopi()) is pychop.AutoChopi


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="Unsupported backend 'tensorflow'"):
        pychop.backend("tensorflow")
    assert pychop.get_backend() == "auto"


def test_importing_pychop_does_not_import_torch():
    code = ("import sys, pychop, pychop_jax, pychop_jax.interop.numpy;"
            "assert 'torch' not in sys.modules;"
            "pychop.TorchChopi; assert 'torch' in sys.modules")
    env = dict(os.environ, PYTHONPATH=ROOT)
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT)


# -- attributes ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CLASSES))
def test_attributes_before_and_after_calibration(name):
    ch = CLASSES[name](num_bits=4)
    assert (ch.qmin, ch.qmax) == (0, 15)
    assert ch.scale is None and ch.zero_point is None
    ch.calibrate(ARRAY[name](X))
    assert as_numpy(ch.scale).shape == () and as_numpy(ch.scale).dtype == np.float32
    assert as_numpy(ch.zero_point).dtype == np.int32
    sym = CLASSES[name](num_bits=4, symmetric=True, narrow_range=True)
    assert (sym.qmin, sym.qmax) == (-7, 7)


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_symmetric_zero_point_is_zero_not_none(name):
    ch = CLASSES[name](num_bits=8, symmetric=True, per_channel=True)
    ch.calibrate(ARRAY[name](X))
    zp = as_numpy(ch.zero_point)
    assert zp.shape == (6,) and zp.dtype == np.int32 and not zp.any()


@pytest.mark.parametrize("channel_dim", [0, 1, -1, -2])
def test_per_channel_scale_is_one_per_channel_and_equal_across_classes(channel_dim):
    results = []
    for name, cls in CLASSES.items():
        ch = cls(num_bits=5, per_channel=True, channel_dim=channel_dim)
        q = ch.quantize(ARRAY[name](X))
        results.append((as_numpy(ch.scale), as_numpy(ch.zero_point), as_numpy(q)))
    assert results[0][0].shape == (X.shape[channel_dim],)
    # each channel's scale is that channel's own per-tensor scale
    for c in range(X.shape[channel_dim]):
        own = pj.calibrate(np.take(X, c, axis=channel_dim), pj.QuantSpec(bits=5))
        assert results[0][0][c] == np.asarray(own.scale).item()
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            np.testing.assert_array_equal(a, b)


# -- methods -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CLASSES))
def test_quantize_calibrates_on_first_use_only(name):
    ch = CLASSES[name](num_bits=8)
    q = ch.quantize(ARRAY[name](X))
    first = as_numpy(ch.scale).copy()
    assert as_numpy(q).dtype == np.uint8
    ch.quantize(ARRAY[name](3 * X))  # values beyond the range saturate
    np.testing.assert_array_equal(as_numpy(ch.scale), first)
    assert as_numpy(ch.quantize(ARRAY[name](3 * X))).max() == 255


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_call_is_fake_quantization(name):
    ch = CLASSES[name](num_bits=3, symmetric=True)
    x = ARRAY[name](X)
    y = ch(x)
    expected = ch.dequantize(ch.quantize(x))
    np.testing.assert_array_equal(as_numpy(y), as_numpy(expected))
    assert as_numpy(y).dtype == np.float32 and len(np.unique(as_numpy(y))) <= 8


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_dequantize_before_calibration_is_a_value_error(name):
    ch = CLASSES[name]()
    with pytest.raises(ValueError, match=f"{CLASSES[name].__name__}.dequantize: the "
                                         "quantizer is not calibrated"):
        ch.dequantize(ARRAY[name](np.zeros(3, np.uint8)))


@pytest.mark.parametrize("name", sorted(CLASSES))
@pytest.mark.parametrize("other", sorted(CLASSES))
def test_array_of_another_framework_is_a_type_error(name, other):
    if other == name:
        return
    ch = CLASSES[name]()
    x = ARRAY[other](X)
    message = re.escape(f"expects a {name} array but got a {other} array")
    for method in ("calibrate", "quantize"):
        with pytest.raises(TypeError, match=f"{method} {message}"):
            getattr(ch, method)(x)
    ch.calibrate(ARRAY[name](X))
    with pytest.raises(TypeError, match=f"dequantize {message}"):
        ch.dequantize(ARRAY[other](np.zeros(3, np.uint8)))


def test_channel_count_mismatch_is_a_value_error():
    ch = pychop.NumpyChopi(per_channel=True, channel_dim=1)
    ch.calibrate(X)  # 4 channels
    with pytest.raises(ValueError, match=r"the state's scale has shape \(1, 4\), but an "
                                         r"array of shape \(4, 5\) needs \(1, 5\)"):
        ch.quantize(np.ones((4, 5), np.float32))


# -- aliases -----------------------------------------------------------------------------------
def test_pychop_06_names():
    ch = pychop.NumpyChopi(bits=4, per_channel=True, axis=1)
    assert (ch.num_bits, ch.bits, ch.channel_dim, ch.axis) == (4, 4, 1, 1)
    with pytest.raises(ValueError, match="num_bits=6 and bits=4 disagree"):
        pychop.NumpyChopi(num_bits=6, bits=4)
    assert pychop.ChopiSTE is pychop.TorchChopi
    assert pychop.ChopiSTE(bits=3).num_bits == 3
    assert pychop.IQuantizedDense is pychop.IQuantizedLinear
    assert issubclass(pychop.IQuantizedConv2d, torch.nn.Conv2d)
    with pytest.raises(ValueError, match=r"bits must be in \[2, 16\]; got 17"):
        pychop.Chopi(num_bits=17)


# -- JaxChopi into jit -------------------------------------------------------------------------
def test_jax_chopi_state_goes_into_jitted_code():
    ch = pychop.JaxChopi(num_bits=8, per_channel=True, channel_dim=0)
    assert ch.state is None
    x = jnp.asarray(X)
    q = ch.quantize(x)
    state = ch.state
    assert isinstance(state, pj.QuantState) and state.scale.shape == (6, 1)
    np.testing.assert_array_equal(jax.jit(pj.quantize)(x, state), q)
    np.testing.assert_array_equal(as_numpy(ch.scale), np.asarray(state.scale).ravel())


# -- auto --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CLASSES))
def test_auto_binds_to_the_first_array(name):
    pychop.backend("auto")
    ch = pychop.Chopi(num_bits=8)
    with pytest.raises(ValueError, match="not calibrated"):
        ch.dequantize(ARRAY[name](np.zeros(2, np.uint8)))
    q = ch.quantize(ARRAY[name](X))
    reference = CLASSES[name](num_bits=8).quantize(ARRAY[name](X))
    np.testing.assert_array_equal(as_numpy(q), as_numpy(reference))
    assert type(q) is type(reference)
    other = "numpy" if name != "numpy" else "torch"
    with pytest.raises(TypeError, match=f"expects a {name} array but got a {other} array"):
        ch.quantize(ARRAY[other](X))


def test_auto_rejects_non_arrays():
    with pytest.raises(TypeError, match="expects a NumPy, JAX or Torch array; got an object "
                                        "of type list"):
        pychop.AutoChopi().quantize([1.0, 2.0])


def test_jax_chopi_never_keeps_a_tracer():
    # an uncalibrated quantizer under jit calibrates for that call only
    ch = pychop.JaxChopi(num_bits=8)
    x = jnp.asarray(X)
    q = jax.jit(lambda v: ch.quantize(v))(x)
    assert ch.scale is None and ch.zero_point is None
    np.testing.assert_array_equal(q, pj.quantize(x, pj.calibrate(x, ch.spec)))
    np.testing.assert_array_equal(jax.jit(ch.fake_quant)(x),
                                  pj.fake_quant(x, pj.calibrate(x, ch.spec)))
    with pytest.raises(ValueError, match="calibrates for that trace only"):
        ch.dequantize(q)
    # an explicit calibrate on a tracer is refused, with the way out
    with pytest.raises(TypeError, match="pychop_jax.calibrate"):
        jax.jit(ch.calibrate)(x)
    # calibrated eagerly, the stored state serves jitted calls
    ch.calibrate(x)
    np.testing.assert_array_equal(jax.jit(ch.quantize)(x), q)
    np.testing.assert_array_equal(ch.dequantize(q), pj.dequantize(q, pj.calibrate(x, ch.spec)))


# -- JaxChopi inside one trace -----------------------------------------------------------------
CHOPI_CONFIGS = [dict(), dict(per_channel=True, channel_dim=1),
                 dict(symmetric=True, per_channel=True, channel_dim=0)]
NOT_CALIBRATED = "JaxChopi.dequantize: the quantizer is not calibrated"


def eager_round_trip(x, **config):
    ch = pychop.JaxChopi(num_bits=8, **config)
    return ch.dequantize(ch.quantize(x))


def assert_trace_freed(traces):
    """The traces recorded by ``traced`` are gone: nothing (a tracer in a calibration
    among them) outlived them."""
    gc.collect()
    assert traces and all(ref() is None for ref in traces)


def traced(fn, traces):
    """``fn``, recording a weak reference to each trace it runs in."""
    def wrapper(*args):
        traces.append(weakref.ref(find_top_trace(())))
        return fn(*args)
    return wrapper


@pytest.mark.parametrize("config", CHOPI_CONFIGS, ids=str)
def test_jitted_round_trip_uses_the_calibration_its_trace_made(config):
    # pychop users write jit(lambda v: ch.dequantize(ch.quantize(v))) on a fresh quantizer
    ch = pychop.JaxChopi(num_bits=8, **config)
    x = jnp.asarray(X)
    traces = []
    with jax.checking_leaks():  # raises if a tracer outlives its trace
        y = jax.jit(traced(lambda v: ch.dequantize(ch.quantize(v)), traces))(x)
    expected = eager_round_trip(x, **config)
    assert y.dtype == expected.dtype
    np.testing.assert_array_equal(np.asarray(y), np.asarray(expected))  # bit for bit
    # nothing stored on the object, nothing kept past the trace
    assert ch.scale is None and ch.zero_point is None and ch.state is None
    assert not ch.calibrated
    assert_trace_freed(traces)
    # the eager calls afterwards behave as on a fresh quantizer
    with pytest.raises(ValueError, match=NOT_CALIBRATED):
        ch.dequantize(jnp.zeros(X.shape, jnp.uint8 if not ch.symmetric else jnp.int8))
    q = ch.quantize(3 * x)  # calibrates on first eager use, on this input
    reference = pychop.JaxChopi(num_bits=8, **config)
    np.testing.assert_array_equal(q, reference.quantize(3 * x))
    np.testing.assert_array_equal(ch.scale, reference.scale)
    # and the stored calibration now serves new traces
    np.testing.assert_array_equal(jax.jit(lambda v: ch.dequantize(ch.quantize(v)))(x),
                                  reference.dequantize(reference.quantize(x)))


def test_a_trace_keeps_its_first_calibration_as_eager_code_does():
    # eagerly the second quantize saturates with the first input's scale; so it does
    # inside one jitted function (and fake_quant shares the calibration too)
    x = jnp.asarray(X)
    ch = pychop.JaxChopi(num_bits=8)
    q1, q2, y = jax.jit(lambda v: (ch.quantize(v), ch.quantize(3 * v), ch(v)))(x)
    reference = pychop.JaxChopi(num_bits=8)
    np.testing.assert_array_equal(q1, reference.quantize(x))
    np.testing.assert_array_equal(q2, reference.quantize(3 * x))
    assert q2.max() == 255
    np.testing.assert_array_equal(y, reference(x))
    assert ch.scale is None


def test_traces_do_not_share_a_calibration():
    ch = pychop.JaxChopi(num_bits=8)
    x = jnp.asarray(X)
    q = jax.jit(ch.quantize)(x)
    # another jitted function (another trace) does not see the first one's calibration
    with pytest.raises(ValueError, match=NOT_CALIBRATED):
        jax.jit(ch.dequantize)(q)
    # two traces of one function each calibrate on their own input
    round_trip = jax.jit(lambda v: ch.dequantize(ch.quantize(v)))
    np.testing.assert_array_equal(round_trip(x), eager_round_trip(x))
    np.testing.assert_array_equal(round_trip(x[:3] * 5), eager_round_trip(x[:3] * 5))

    # nested: an inner trace calibrates for itself, and neither sees the other's
    def outer(v):
        codes = ch.quantize(v)  # the outer trace's calibration
        with pytest.raises(ValueError, match=NOT_CALIBRATED):
            jax.jit(ch.dequantize)(codes)
        inner = jax.jit(lambda w: ch.dequantize(ch.quantize(w)))(2 * v)  # its own
        return ch.dequantize(codes), inner

    traces = []
    with jax.checking_leaks():
        y, inner = jax.jit(traced(outer, traces))(x)
    np.testing.assert_array_equal(y, eager_round_trip(x))
    np.testing.assert_array_equal(inner, eager_round_trip(2 * x))
    assert ch.scale is None
    assert_trace_freed(traces)


def test_round_trip_under_vmap_and_grad():
    x = jnp.asarray(X)
    ch = pychop.JaxChopi(num_bits=8, per_channel=True, channel_dim=0)
    # vmap: each example is the traced input, so each calibrates on its own row
    traces = []
    with jax.checking_leaks():
        y = jax.vmap(traced(lambda v: ch.dequantize(ch.quantize(v)), traces))(x)
    rows = [eager_round_trip(row, per_channel=True, channel_dim=0) for row in x]
    np.testing.assert_array_equal(y, jnp.stack(rows))
    assert ch.scale is None
    assert_trace_freed(traces)
    # grad: the codes are integers, so no gradient flows through the round trip
    traces = []
    value, grad = jax.value_and_grad(
        traced(lambda v: ch.dequantize(ch.quantize(v)).sum(), traces))(x)
    expected = eager_round_trip(x, per_channel=True, channel_dim=0)
    np.testing.assert_array_equal(value, expected.sum())
    np.testing.assert_array_equal(grad, np.zeros_like(X))
    assert ch.scale is None
    assert_trace_freed(traces)
