"""Layer-level quantization-aware training: the pure functions both Flax skins call.

``pychop_jax.linen`` and ``pychop_jax.nnx`` only declare and store variables; every
computation of their modules is one of the functions here, built on ``ops`` and
``observers``.  They are plain JAX, so they also serve hand-written layers::

    y, stats = qat.observed_fake_quant(x, stats, spec, observers.ema, train=True)
    w_hat = qat.fake_quant_weight(w, qat.QuantOptions().weight_spec)

Three ways a tensor is fake-quantized in a layer:

* **weights, calibrated** (default): per output channel (the kernel's last axis),
  symmetric; the range is the current kernel's min/max, recomputed every step
  (``calibrate`` + ``fake_quant`` with the clipped straight-through gradient).
* **activations, observed**: an observer (``pychop_jax.observers``) tracks the range
  while training; at evaluation the range is frozen.  A layer that has observed
  nothing yet (``count == 0``) quantizes with the observer's estimate of the batch at
  hand instead of an empty range.
* **learned** (``lsq=True``, weights and activations): step size, and for asymmetric
  grids zero point, are trainable parameters (LSQ / LSQ+: ``fake_quant(...,
  grad='lsq')``), initialised from data by ``init_lsq`` (Esser et al., 2019).

Variables are stored in a *compact* shape that does not depend on the batch: ``()``
per tensor, ``(C,)`` per channel.  The functions reshape them to the state's shape
(``QuantSpec.scale_shape``) of the tensor at hand.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from ..core import observers, ops
from ..core.observers import RangeState
from ..core.spec import QuantSpec
from ..core.state import QuantState

__all__ = [
    "QuantOptions",
    "compact_shape",
    "init_stats",
    "observed_fake_quant",
    "input_fake_quant",
    "format_spec",
    "is_dynamic",
    "init_lsq",
    "lsq_placeholder",
    "learned_state",
    "learned_fake_quant",
    "fake_quant_weight",
]


def _spec(option: str, bits, **fields) -> QuantSpec:
    try:
        return QuantSpec(bits=bits, **fields)
    except ValueError as err:
        raise ValueError(f"{option}={bits!r}: {err}") from None


@dataclasses.dataclass(repr=False, eq=False)
class QuantOptions:
    """The quantization options of ``QuantDense`` / ``QuantConv`` (linen and nnx).

    Attributes:
      weight_bits: bits of the kernel's codes, per output channel; ``None`` keeps the
        kernel in float.
      weight_symmetric: symmetric (default) or affine grid for the kernel.
      act_bits: bits of the layer's *input*; ``None`` (default) leaves the input alone.
      act_symmetric: symmetric or affine (default) grid for the input.
      observer: how the input range is tracked while training, any
        ``pychop_jax.observers`` function (default ``observers.ema``, momentum 0.9;
        ``functools.partial`` sets options).  Unused with ``lsq=True``.
      lsq: learn the step sizes (and affine zero points) of kernel and input by LSQ.
      weight_format: overrides ``weight_bits`` / ``weight_symmetric``: a ``QuantSpec``
        used as it is (e.g. ``dataclasses.replace(pj.formats.MXFP8_E4M3, axis=0)``:
        blocks of 32 along a Dense kernel's input axis, the contraction), or an element
        format name (``"float8_e4m3fn"``, ``"nf4"``, ...: per output channel, float32
        scales).  The kernel is calibrated every call (no LSQ for these formats).
      act_format: overrides ``act_bits`` / ``act_symmetric`` the same way: a
        ``QuantSpec`` or an element format name (per tensor, float32 scale).  A spec
        with one scale per tensor or per channel is *observed* like ``act_bits``
        (``observer``; e.g. fp8 e4m3 per tensor with a frozen range at evaluation);
        a per-block spec (``group_size``: MX / NVFP4 on the input's last axis,
        ``pj.formats.MXFP8_E4M3`` as it is) is *dynamic*: calibrated on each call,
        training and evaluation alike, as block-scaled hardware computes its scales.
        No LSQ for float or block-scale formats.
    """

    weight_bits: int | None = 8
    weight_symmetric: bool = True
    act_bits: int | None = None
    act_symmetric: bool = False
    observer: Callable = observers.ema
    lsq: bool = False
    weight_format: QuantSpec | str | None = None
    act_format: QuantSpec | str | None = None

    @property
    def weight_spec(self) -> QuantSpec | None:
        """Per output channel (axis -1), or ``None`` for float weights; ``weight_format``
        when given.

        Raises:
          ValueError: ``weight_format`` is not a spec or format name, or is a float /
            block-scaled format together with ``lsq=True``.
        """
        if self.weight_format is not None:
            return format_spec("weight_format", self.weight_format, axis=-1, lsq=self.lsq)
        if self.weight_bits is None:
            return None
        return _spec("weight_bits", self.weight_bits, symmetric=self.weight_symmetric, axis=-1)

    @property
    def act_spec(self) -> QuantSpec | None:
        """Per tensor, or ``None`` when the input is not quantized; ``act_format`` when
        given.

        Raises:
          ValueError: as ``weight_spec``, for ``act_format``.
        """
        if self.act_format is not None:
            return format_spec("act_format", self.act_format, axis=None, lsq=self.lsq)
        if self.act_bits is None:
            return None
        return _spec("act_bits", self.act_bits, symmetric=self.act_symmetric)


def format_spec(option: str, value: QuantSpec | str, *, axis: int | None,
                lsq: bool) -> QuantSpec:
    """The spec of a ``weight_format`` / ``act_format`` option: a ``QuantSpec`` as it is,
    or an element format name on ``axis`` (float32 scales).

    Raises:
      ValueError: ``value`` is neither, or a float / block-scale format with ``lsq``.
    """
    spec = value
    if isinstance(spec, str):
        try:
            spec = QuantSpec(dtype=spec, axis=axis)
        except ValueError as err:
            raise ValueError(f"{option}={value!r}: {err}") from None
    if not isinstance(spec, QuantSpec):
        raise ValueError(f"{option} must be a QuantSpec or an element format name; "
                         f"got {value!r}.")
    if lsq and (spec.is_float or spec.block_scaled):
        raise ValueError(f"{option}={spec.dtype or spec.scale_dtype!r} with lsq=True: LSQ "
                         "learns integer-grid step sizes; drop lsq or use an integer spec.")
    return spec


def is_dynamic(spec: QuantSpec) -> bool:
    """Whether an input quantizer of ``spec`` calibrates on each call instead of
    observing a range: per-block specs (``group_size``), whose scales follow the
    blocks of the batch at hand (MX, NVFP4)."""
    return spec.group_size is not None


def compact_shape(spec: QuantSpec, num_features: int | None = None) -> tuple[int, ...]:
    """Shape of a layer's stored state: ``()`` per tensor, ``(num_features,)`` per channel.

    Raises:
      ValueError: a per-group spec (layers keep per-tensor or per-channel state), or a
        per-channel spec without ``num_features``.
    """
    if spec.group_size is not None:
        raise ValueError(
            "quantization layers keep per-tensor or per-channel state; per-group specs "
            "(group_size) are for pychop_jax.calibrate / fake_quant. Drop group_size."
        )
    if spec.axis is None:
        return ()
    if num_features is None:
        raise ValueError(
            f"a per-channel quantizer (axis={spec.axis}) needs the number of channels; "
            "pass num_features=<length of that axis>."
        )
    return (int(num_features),)


def _num_features(spec: QuantSpec, shape) -> int | None:
    return None if spec.axis is None else shape[spec.resolve_axis(len(shape))]


def _full(array, spec: QuantSpec, shape):
    """A compact state array reshaped to ``spec.scale_shape(shape)``."""
    return jnp.reshape(array, spec.scale_shape(shape))


# -- observed activations ------------------------------------------------------------------
def init_stats(spec: QuantSpec, num_features: int | None = None) -> RangeState:
    """Empty observer statistics in the compact shape."""
    return RangeState.empty(compact_shape(spec, num_features))


def observed_fake_quant(x, stats: RangeState, spec: QuantSpec, observer: Callable, *,
                        train: bool):
    """Fake-quantize ``x`` with an observed range; returns ``(y, stats)``.

    ``train=True``: ``stats = observer(stats, x, spec)`` first, then ``x`` is quantized
    with the updated range (as torch's ``FakeQuantize``).  ``train=False``: ``stats``
    is returned unchanged and used as it is, unless it has seen nothing
    (``count == 0``), in which case this batch's ``observer`` estimate is used.
    ``x`` gets the clipped straight-through gradient; no gradient reaches the range.
    """
    full = stats.reshape(spec.scale_shape(x.shape))
    if train:
        full = used = observer(full, x, spec)
    else:
        used = jax.lax.cond(full.count > 0, lambda: full, lambda: observer(full, x, spec))
    y = ops.fake_quant(x, observers.quant_state(used, spec))
    return y, full.reshape(jnp.shape(stats.lo))


def input_fake_quant(x, stats: RangeState | None, spec: QuantSpec, observer: Callable, *,
                     train: bool):
    """An input quantizer's ``(y, stats)``: ``observed_fake_quant``, or for a dynamic
    spec (``is_dynamic``; ``stats`` is ``None``) ``fake_quant_weight``'s calibration
    on ``x`` itself, with ``stats`` returned as it came."""
    if is_dynamic(spec):
        return fake_quant_weight(x, spec), stats
    return observed_fake_quant(x, stats, spec, observer, train=train)


# -- learned step sizes --------------------------------------------------------------------
def init_lsq(x, spec: QuantSpec):
    """LSQ's initial ``(scale, zero_point)`` from ``x``, compact; ``zero_point`` is
    ``None`` for symmetric grids (fixed at 0, not a parameter).

    A per-group spec (a kernel's, ``quantize_model``) keeps the state's own shape,
    ``spec.scale_shape(x.shape)``: one step size per group and per other index."""
    state = ops.lsq_init(x, spec)
    if spec.group_size is not None:
        shape = spec.scale_shape(x.shape)
    else:
        shape = compact_shape(spec, _num_features(spec, x.shape))
    zero_point = None if spec.symmetric else jnp.reshape(state.zero_point, shape)
    return jnp.reshape(state.scale, shape), zero_point


def lsq_placeholder(spec: QuantSpec, num_features: int | None = None):
    """``(scale, zero_point)`` to hold the place of a step size that data will set:
    NaN scale (so that a forgotten initialisation cannot pass unnoticed), zero point
    0 (``None`` when symmetric)."""
    shape = compact_shape(spec, num_features)
    zero_point = None if spec.symmetric else jnp.zeros(shape, jnp.float32)
    return jnp.full(shape, jnp.nan, jnp.float32), zero_point


def learned_state(shape, spec: QuantSpec, scale, zero_point=None) -> QuantState:
    """The ``QuantState`` of a compact learned ``scale`` (and float ``zero_point``;
    ``None`` means 0) for an input of ``shape``."""
    scale = _full(scale, spec, shape)
    if zero_point is None:
        zero_point = jnp.zeros(scale.shape, jnp.int32)
    return QuantState(scale, _full(zero_point, spec, shape), spec)


def learned_fake_quant(x, spec: QuantSpec, scale, zero_point=None):
    """``fake_quant(x, state, grad='lsq')`` with a compact learned ``scale`` (and float
    ``zero_point``; ``None`` means 0).  Gradients flow into both."""
    return ops.fake_quant(x, learned_state(x.shape, spec, scale, zero_point), grad="lsq")


# -- weights -----------------------------------------------------------------------------------
def fake_quant_weight(w, spec: QuantSpec | None, scale=None, zero_point=None):
    """The kernel as the layer uses it.

    ``spec is None``: ``w`` unchanged.  ``scale is None``: calibrated on ``w`` itself
    every call (``calibrate`` + clipped-STE ``fake_quant``).  Otherwise learned
    (``learned_fake_quant``).
    """
    if spec is None:
        return w
    if scale is None:
        return ops.fake_quant(w, ops.calibrate(w, spec))
    return learned_fake_quant(w, spec, scale, zero_point)
