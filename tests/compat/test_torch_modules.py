"""TorchChopi, IntQuantizedLayer and the IQuantized layers: buffers, the observer,
train vs eval, the straight-through gradient, and agreement with PyTorch's reference
quantization (MinMaxObserver, quantize_per_tensor)."""

import os
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pychop
import pychop_jax as pj
from pychop_jax.interop import engine

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.ao.quantization import MinMaxObserver  # noqa: E402

from pychop_jax.interop import torch as torch_ops  # noqa: E402

warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")


def _data(*shape, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


# -- buffers and state_dict ------------------------------------------------------------------
@pytest.mark.parametrize("config", [dict(num_bits=8), dict(num_bits=4, symmetric=True),
                                    dict(num_bits=6, per_channel=True, channel_dim=1),
                                    dict(num_bits=8, per_channel=True, channel_dim=-1)])
def test_state_dict_round_trip_into_a_fresh_instance(config):
    x = _data(5, 3)
    ch = pychop.TorchChopi(**config)
    fresh = pychop.TorchChopi(**config)
    assert ch.scale is None and ch.zero_point is None and ch.state_dict() == {}
    ch.calibrate(x)
    expected_shape = (3,) if config.get("per_channel") else ()
    assert ch.scale.shape == expected_shape and ch.zero_point.shape == expected_shape
    state = ch.state_dict()
    assert set(state) == {"scale", "zero_point", "running_min", "running_max"}
    fresh.load_state_dict(state)  # strict: every key must fit
    for name in state:
        assert torch.equal(getattr(fresh, name), state[name])
        assert getattr(fresh, name).dtype == state[name].dtype
    fresh.eval()
    assert torch.equal(fresh.quantize(x), ch.quantize(x))
    assert torch.equal(fresh(x), ch.eval()(x))


def test_state_dict_of_a_model_with_layers():
    model = nn.Sequential(nn.Linear(4, 6), pychop.IntQuantizedLayer(8), nn.ReLU(),
                          pychop.IQuantizedLinear(6, 2, chop=pychop.ChopiSTE(bits=4)))
    model(_data(16, 4))  # training: every observer sees a batch
    again = nn.Sequential(nn.Linear(4, 6), pychop.IntQuantizedLayer(8), nn.ReLU(),
                          pychop.IQuantizedLinear(6, 2, chop=pychop.ChopiSTE(bits=4)))
    again.load_state_dict(model.state_dict())
    model.eval()
    again.eval()
    x = _data(7, 4, seed=1)
    assert torch.equal(again(x), model(x))
    assert "3.output_quant.scale" in model.state_dict()


# -- train vs eval ---------------------------------------------------------------------------
def test_training_updates_the_range_with_a_moving_average():
    ch = pychop.TorchChopi(num_bits=8, averaging_constant=0.25)
    a, b = _data(100, seed=1), 3 * _data(100, seed=2)
    ch(a)  # first batch: its own range
    assert float(ch.running_min) == float(a.min()) and float(ch.running_max) == float(a.max())
    ch(b)
    lo1, hi1, lo2, hi2 = (np.float32(v) for v in (a.min(), a.max(), b.min(), b.max()))
    # float32: old + (new - old) / (1 / momentum), i.e. old + momentum * (new - old)
    four = np.float32(4.0)
    assert float(ch.running_min) == lo1 + (lo2 - lo1) / four
    assert float(ch.running_max) == hi1 + (hi2 - hi1) / four
    assert float(ch.running_min) == pytest.approx(0.75 * lo1 + 0.25 * lo2, rel=1e-6)
    # the qparams are those of the averaged range
    lo, hi = ch.running_min.reshape(1), ch.running_max.reshape(1)
    scale, zero_point = torch_ops.qparams(lo, hi, ch.spec)
    assert torch.equal(ch.scale.reshape(1), scale) and torch.equal(ch.zero_point.reshape(1),
                                                                   zero_point)


def test_observer_gives_the_same_bits_on_both_engines(monkeypatch):
    """XLA would contract old + m * (new - old) into a fused multiply-add; the
    portable engine rounds the product first.  Both must agree (512 channels)."""
    batches = [_data(8, 512, seed=s) * (s + 1) for s in range(4)]

    def observe_all():
        ch = pychop.TorchChopi(num_bits=8, per_channel=True, channel_dim=1, averaging_constant=0.3)
        outputs = [ch(x) for x in batches]
        return ch.state_dict(), outputs

    state, outputs = observe_all()
    portable = torch_ops.FRAMEWORK.portable()
    monkeypatch.setattr(torch_ops, "FRAMEWORK", portable)
    monkeypatch.setattr(pychop.TorchChopi, "backend", portable)
    portable_state, portable_outputs = observe_all()
    for name in state:
        assert torch.equal(state[name], portable_state[name]), name
    for a, b in zip(outputs, portable_outputs, strict=True):
        assert torch.equal(a, b)


def test_momentum_one_uses_each_batch_range():
    ch = pychop.TorchChopi(num_bits=8, averaging_constant=1.0)
    for seed in range(3):
        x = _data(30, seed=seed) * 1e15 ** seed
        ch(x)
        assert float(ch.running_min) == float(x.min())
        assert float(ch.running_max) == float(x.max())


def test_eval_freezes_the_range_and_returns_dequantized_floats():
    ch = pychop.TorchChopi(num_bits=4)
    ch(_data(50))
    frozen = {k: v.clone() for k, v in ch.state_dict().items()}
    ch.eval()
    x = 10 * _data(50, seed=3)  # far outside the observed range
    y = ch(x)
    for k, v in ch.state_dict().items():
        assert torch.equal(v, frozen[k])
    assert y.dtype == torch.float32  # floats, never raw codes
    assert torch.equal(y, ch.dequantize(ch.quantize(x)))
    # saturated: the output spans exactly the frozen grid's end points
    scale, zp = float(ch.scale), int(ch.zero_point)
    assert float(y.min()) == pytest.approx((0 - zp) * scale)
    assert float(y.max()) == pytest.approx((15 - zp) * scale)


def test_training_argument_overrides_the_module_mode():
    ch = pychop.TorchChopi(num_bits=8).eval()
    ch(_data(20))  # eval and uncalibrated: calibrates once
    before = ch.scale.clone()
    ch(3 * _data(20, seed=1))
    assert torch.equal(ch.scale, before)
    ch(3 * _data(20, seed=1), training=True)
    assert not torch.equal(ch.scale, before)
    ch.train()
    after = ch.scale.clone()
    ch(_data(20, seed=2), training=False)
    assert torch.equal(ch.scale, after)


def test_observer_rejects_non_finite_batches_and_keeps_its_range():
    ch = pychop.IntQuantizedLayer(8)
    ch(_data(10))
    kept = ch.scale.clone()
    x = _data(10, seed=1)
    x[3] = float("nan")
    with pytest.raises(ValueError, match="forward got 1 NaN value"):
        ch(x)
    assert torch.equal(ch.scale, kept)


def test_observers_are_per_instance():
    model = nn.Sequential(pychop.IntQuantizedLayer(8), nn.Linear(4, 4),
                          pychop.IntQuantizedLayer(8))
    with torch.no_grad():
        model[1].weight.mul_(50)
    model(_data(8, 4))
    assert float(model[0].scale) != float(model[2].scale)


# -- the straight-through gradient ----------------------------------------------------------
def test_clipped_ste_gradient_matches_jax():
    x = torch.linspace(-3, 3, 61)
    ch = pychop.TorchChopi(num_bits=3)
    ch.calibrate(x[20:40])  # values beyond +-1 saturate
    xg = x.clone().requires_grad_(True)
    weights = torch.arange(61.0)
    (ch(xg, training=False) * weights).sum().backward()
    # gradient passes where round(x / scale) + zp is inside [0, 7]: no value here is
    # near a rounding tie, so float64 decides it
    v = x.double().numpy() / float(ch.scale) + int(ch.zero_point)
    assert _tie_distance(v).min() > 1e-3
    inside = torch.from_numpy((v >= -0.5) & (v <= 7.5))
    assert 0 < int(inside.sum()) < 61
    assert torch.equal(xg.grad, torch.where(inside, weights, torch.zeros(())))
    # the same mask as the JAX op's clipped gradient, on the same state
    state = pj.QuantState(jnp.asarray(ch.scale.numpy()).reshape(1),
                          jnp.asarray(ch.zero_point.numpy()).reshape(1), ch.spec)
    g = jax.grad(lambda v: jnp.sum(pj.fake_quant(v, state) * jnp.arange(61.0)))(x.numpy())
    np.testing.assert_array_equal(xg.grad.numpy(), np.asarray(g))


def test_gradient_in_training_mode_and_through_layers():
    layer = pychop.IQuantizedConv2d(2, 3, 3, padding=1, chop=pychop.TorchChopi(8))
    x = _data(2, 2, 5, 5).requires_grad_(True)
    layer(x).square().sum().backward()
    assert x.grad is not None and torch.count_nonzero(x.grad) > 0
    assert layer.weight.grad is not None and torch.count_nonzero(layer.weight.grad) > 0
    assert layer.bias.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("large", [False, True])
def test_clip_mask_comes_back_as_ones_and_zeros(dtype, large, monkeypatch, request):
    # the backward pass multiplies by it: x's float dtype, uint8 for large inputs,
    # exactly 0 / 1 either way, and the gradient keeps x's dtype
    from array_api_compat import numpy as xnp

    from pychop_jax.core import numerics

    monkeypatch.setattr(engine, "FLOAT_MASK_MAX", 64 if large else 1 << 20)
    jax.clear_caches()  # the threshold is read when the kernel is traced
    request.addfinalizer(jax.clear_caches)
    x = (_data(64) * 3).to(dtype)
    spec = pj.QuantSpec(bits=3)
    state = torch_ops.calibrate(x[:32], spec)  # the other half partly saturates
    y, inside = engine.fake_quant(torch_ops.FRAMEWORK, x, state, mask=True)
    assert y.dtype == dtype and inside.dtype == (torch.uint8 if large else dtype)
    expected = numerics.clip_mask(xnp, x.double().numpy(), state.scale.double().numpy(),
                                  state.zero_point.numpy(), spec)
    assert 0 < int(expected.sum()) < 64
    np.testing.assert_array_equal(inside.double().numpy(), expected.astype(np.float64))
    xg = x.clone().requires_grad_(True)
    torch_ops.fake_quant(xg, state).backward(torch.full_like(x, 2.0))
    assert xg.grad.dtype == dtype
    np.testing.assert_array_equal(xg.grad.double().numpy(), 2.0 * expected)


def test_no_mask_is_kept_without_gradients():
    ch = pychop.TorchChopi(8)
    with torch.no_grad():
        y = ch(_data(10).requires_grad_(True))
    assert y.grad_fn is None


# -- IQuantized layers ---------------------------------------------------------------------
def test_iquantized_linear_has_three_quantizers_and_composes_them():
    torch.manual_seed(0)
    chop = pychop.TorchChopi(num_bits=4, symmetric=True, per_channel=True)
    layer = pychop.IQuantizedLinear(5, 3, chop=chop)
    x = _data(8, 5)
    y = layer(x)
    w, b, out = layer.weight_quant, layer.bias_quant, layer.output_quant
    assert len({id(w), id(b), id(out), id(chop)}) == 4
    assert w.scale.shape == (3,) and b.scale.shape == () and out.scale.shape == ()
    assert w.averaging_constant == 1.0 and out.averaging_constant == chop.averaging_constant
    # the same computation by hand, from fresh quantizers with those settings
    wq = pychop.TorchChopi(**chop.config)(layer.weight)
    bq = pychop.TorchChopi(num_bits=4, symmetric=True)(layer.bias)
    expected = pychop.TorchChopi(num_bits=4, symmetric=True)(x @ wq.T + bq)
    assert torch.equal(y, expected)


def test_iquantized_without_chop_is_the_plain_layer():
    torch.manual_seed(0)
    plain = nn.Linear(5, 3)
    torch.manual_seed(0)
    layer = pychop.IQuantizedDense(5, 3)
    x = _data(4, 5)
    assert torch.equal(layer(x), plain(x))


def test_int_quantized_layer_accepts_a_pychop_06_quantizer():
    layer = pychop.IntQuantizedLayer(pychop.ChopiSTE(bits=5, symmetric=True))
    assert layer.num_bits == 5 and layer.symmetric and isinstance(layer, pychop.TorchChopi)


# -- PyTorch's reference -------------------------------------------------------------------
def _tie_distance(v):
    """Distance of ``v`` (float64) from the nearest half-integer."""
    return np.abs(np.abs(v - np.floor(v)) - 0.5)


@pytest.mark.parametrize("seed", range(6))
def test_qparams_equal_minmax_observer(seed):
    rng = np.random.default_rng(seed)
    scale_of_data = 10.0 ** rng.uniform(-3, 3)
    x = torch.from_numpy((rng.standard_normal(4096) * scale_of_data
                          + rng.uniform(-2, 2) * scale_of_data).astype(np.float32))
    ch = pychop.TorchChopi(num_bits=8)
    ch.calibrate(x)
    observer = MinMaxObserver(dtype=torch.quint8)
    observer(x)
    ref_scale, ref_zp = observer.calculate_qparams()
    scale = ch.scale.numpy()
    ulp = np.spacing(np.float32(ref_scale.item()))
    assert abs(np.float64(scale) - ref_scale.item()) <= ulp
    if int(ch.zero_point) != int(ref_zp):
        lo = min(float(x.min()), 0.0)
        assert _tie_distance(-lo / ref_scale.item()) < 1e-5  # only at a tie


@pytest.mark.parametrize("seed", range(4))
def test_codes_equal_quantize_per_tensor_except_at_ties(seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(200_000).astype(np.float32)
    ch = pychop.TorchChopi(num_bits=8)
    ch.calibrate(torch.from_numpy(x))
    scale, zp = float(ch.scale), int(ch.zero_point)
    # add exact ties: values whose x / scale is k + 1/2 in float32 arithmetic
    k = rng.integers(-zp, 255 - zp, 2000)
    ties = ((k + 0.5) * np.float64(scale)).astype(np.float32)
    x = np.concatenate([x, ties])
    t = torch.from_numpy(x)
    ours = ch.quantize(t).numpy().astype(np.int64)
    ref = torch.quantize_per_tensor(t, scale, zp, torch.quint8).int_repr().numpy()
    differ = ours != ref
    assert differ.mean() < 1e-2  # mostly identical ...
    assert np.all(np.abs(ours - ref.astype(np.int64)) <= 1)
    # ... and a differing code sits at a tie of x * (1/scale), the product torch rounds
    inv = np.float64(np.float32(1.0) / np.float32(scale))
    exact = x[differ].astype(np.float64) * inv  # exact: 24 x 24 bits fit in float64
    assert np.all(_tie_distance(exact) <= np.spacing(np.float32(np.abs(exact).max())))


# -- a short training run of the example's kind ----------------------------------------------
@pytest.mark.slow
def test_qat_on_digits_learns():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples"))
    try:
        import torch_qat_digits as example
    finally:
        sys.path.pop(0)
    x_tr, y_tr, x_te, y_te = example.load_data()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the example does: tiny matrices
    try:
        model = example.train(example.make_model(bits=4, weights=True), x_tr, y_tr, epochs=8)
    finally:
        torch.set_num_threads(threads)
    assert example.accuracy(model, x_te, y_te) > 0.85
    # in eval each IntQuantizedLayer outputs values on its own 4-bit grid
    layer = model[0]
    codes = torch.round(layer(x_te) / layer.scale) + layer.zero_point
    assert len(torch.unique(codes)) <= 16


def test_iquantized_layer_quantizes_current_weights_in_eval():
    layer = pychop.IQuantizedLinear(4, 3, chop=pychop.ChopiSTE(bits=8))
    layer(torch.randn(5, 4))  # one training step observes the weights
    with torch.no_grad():
        layer.weight.mul_(3.0)  # the optimizer moved them
    layer.eval()
    x = torch.randn(5, 4)
    out = layer(x)  # before anything else touches the quantizers
    w_hat = layer.weight_quant(layer.weight, training=True)
    atol = float(layer.weight.detach().abs().max()) / 127
    assert torch.allclose(w_hat, layer.weight, atol=atol)
    expected = layer.output_quant(torch.nn.functional.linear(
        x, w_hat, layer.bias_quant(layer.bias, training=True)))
    torch.testing.assert_close(out, expected)


def test_sliced_bfloat16_tensors_are_accepted():
    x = torch.randn(6, 8, dtype=torch.bfloat16)[:, 1:]  # non-compact strides
    state = torch_ops.calibrate(x, pj.QuantSpec(bits=8))
    q = torch_ops.quantize(x, state)
    np.testing.assert_array_equal(q.numpy(),
                                  torch_ops.quantize(x.contiguous(), state).numpy())


# -- the prepared training step ----------------------------------------------------------------
def _observe_sequence(ch):
    """Training steps whose input signature changes: shape, rank, dtype (float64
    input turns the state into float64 and back), momentum, and buffers replaced by
    ``load_state_dict`` from another instance's (grown) range."""
    outputs = []
    for seed, shape in enumerate([(32, 16), (32, 16), (8, 16), (8, 4, 4)]):
        outputs.append(ch(_data(*shape, seed=seed) * (seed + 1)))
    for seed in (10, 11):
        outputs.append(ch(_data(32, 16, seed=seed).double()))
    assert ch.scale.dtype == torch.float64
    outputs.append(ch(_data(32, 16, seed=12)))
    ch.averaging_constant = 0.5
    outputs.append(ch(_data(32, 16, seed=7)))
    other = pychop.IntQuantizedLayer(8)
    other(_data(32, 16, seed=8) * 10)
    ch.load_state_dict(other.state_dict())
    outputs.append(ch(_data(32, 16, seed=9)))
    return ch.state_dict(), outputs


def test_prepared_steps_follow_their_inputs_on_both_engines(monkeypatch):
    """The XLA engine keeps a prepared kernel call per input signature and writes a
    per-tensor state back as four scalars; the portable engine takes neither
    shortcut.  Both must agree bit for bit through every change of signature."""
    state, outputs = _observe_sequence(pychop.IntQuantizedLayer(8, averaging_constant=0.1))
    portable = torch_ops.FRAMEWORK.portable()
    monkeypatch.setattr(torch_ops, "FRAMEWORK", portable)
    monkeypatch.setattr(pychop.TorchChopi, "backend", portable)
    portable_state, portable_outputs = _observe_sequence(
        pychop.IntQuantizedLayer(8, averaging_constant=0.1))
    for name in state:
        assert torch.equal(state[name], portable_state[name]), name
        assert state[name].shape == portable_state[name].shape == ()
    for a, b in zip(outputs, portable_outputs, strict=True):
        assert torch.equal(a, b)


def test_momentum_changed_after_the_first_steps_is_used():
    ch = pychop.IntQuantizedLayer(8, averaging_constant=0.5)
    ch(_data(64, seed=0))
    ch(_data(64, seed=1))
    ch.averaging_constant = 1.0  # from now on: each batch's own range
    x = 5 * _data(64, seed=2)
    ch(x)
    assert float(ch.running_min) == float(x.min()) and float(ch.running_max) == float(x.max())


def test_a_trained_layer_can_be_copied_and_pickled():
    import copy
    import io

    layer = pychop.IntQuantizedLayer(8)
    layer(_data(16, 8))
    layer(_data(16, 8, seed=2))  # prepares the steady-state kernel call
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    twin = copy.deepcopy(layer)
    # a layer pickled before the prepared step existed has no such attribute
    state = copy.deepcopy(layer).__getstate__()
    del state["_prepared_step"]
    older = pychop.IntQuantizedLayer.__new__(pychop.IntQuantizedLayer)
    older.__setstate__(state)
    x = _data(16, 8, seed=1)
    expected = layer(x)
    for other in (loaded, twin, older):
        assert torch.equal(other(x), expected)
        assert torch.equal(other.scale, layer.scale)


def test_checks_still_apply_once_a_step_is_prepared():
    """The checks run when the input signature changes; an input that differs only
    in shape from a prepared one must still be checked."""
    ch = pychop.IntQuantizedLayer(8)
    ch(_data(8, 16))
    ch(_data(8, 16, seed=1))  # prepared for (8, 16), not the first step
    with pytest.raises(ValueError, match="empty array"):
        ch(torch.zeros(0, 16))
    per_channel = pychop.TorchChopi(8, per_channel=True, channel_dim=1)
    per_channel(_data(8, 16))
    per_channel(_data(8, 16, seed=1))
    with pytest.raises(ValueError, match=r"needs \(1, 12\)"):
        per_channel(_data(8, 12))


def test_averaging_constant_and_the_deprecated_momentum_name():
    # averaging_constant is the weight of the new batch (torch.ao's name); pychop's
    # momentum= still works, with a warning that names both meanings
    x1, x2 = _data(64, 8, seed=1), _data(64, 8, seed=2) * 3
    new = pychop.TorchChopi(num_bits=8, averaging_constant=0.25)
    with pytest.warns(DeprecationWarning, match="averaging_constant"):
        old = pychop.TorchChopi(num_bits=8, momentum=0.25)
    for ch in (new, old):
        ch(x1, training=True)
        ch(x2, training=True)
    assert torch.equal(new.running_max, old.running_max)
    with pytest.warns(DeprecationWarning):
        assert old.momentum == 0.25
    with pytest.raises(ValueError, match="averaging_constant must be in"):
        pychop.TorchChopi(averaging_constant=0.0)
    with pytest.raises(ValueError, match="disagree"), pytest.warns(DeprecationWarning):
        pychop.TorchChopi(averaging_constant=0.5, momentum=0.25)
