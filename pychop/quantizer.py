"""The pychop quantizer object (``Chopi``), written once for every backend.

A ``Quantizer`` holds a ``QuantSpec`` and, once calibrated, a scale and zero point; an
interop ``Framework`` (``pychop_jax.interop``: the JAX API, or the NumPy / Torch
adapters) does the arithmetic.  ``NumpyChopi`` / ``JaxChopi`` (and ``TorchChopi`` in
``pychop.torch_modules``) are this class bound to one framework; ``AutoChopi`` binds
to the framework of the first array it sees.

Attributes as the pychop docs show them:

* ``num_bits``, ``qmin``, ``qmax`` (``QuantSpec``'s grid; asymmetric codes are
  unsigned, ``[0, 2^b - 1]``);
* ``scale``: ``None`` before calibration, then a 0-d array (per-tensor) or a 1-D array
  of length C (``per_channel=True``: one per index of ``channel_dim``), float32
  (float64 for float64 input), in the backend's array type;
* ``zero_point``: ``None`` before calibration, then int32 like ``scale``.  A symmetric
  quantizer's zero point is **0** (an int32 zero array), not ``None``: the same on every
  backend, the same as the JAX ``QuantState``, and ``(q - zero_point) * scale`` holds
  for both grids.

Methods: ``calibrate(x)``; ``quantize(x)`` (calibrates on first use, then keeps the
scale); ``dequantize(q)`` (``ValueError`` before calibration); ``q(x)`` = fake
quantization ``dequantize(quantize(x))`` (``TorchChopi``: its ``forward``).  An array
of another framework raises ``TypeError``.

Under ``jax.jit`` (or ``vmap``, ``grad``, a ``lax`` control-flow body: any JAX trace) a
``JaxChopi`` that is not calibrated yet calibrates on the first traced input it gets
and keeps that calibration for the rest of **that trace only**, so a traced function
behaves as the same code run eagerly on a fresh quantizer:
``jax.jit(lambda v: ch.dequantize(ch.quantize(v)))(x)`` dequantizes with the scale
and zero point its ``quantize`` calibrated, and bit for bit equals the eager round
trip.  The object never keeps a tracer:

* ``scale`` / ``zero_point`` (and ``state``, ``calibrated``) describe the eager
  calibration only; they stay ``None`` / ``False`` during and after a traced call;
* the traced calibration is filed under the trace that made it
  (``pychop_jax.core.ops.current_trace``) and is looked up only while that same trace
  is the one being recorded: another jitted function, a nested trace (an inner
  ``jit``, ``vmap``, ``grad`` or loop body: each calibrates for itself, and the outer
  trace never sees the inner's) and later eager calls never see it.  After the
  trace, ``dequantize`` raises ``ValueError`` and ``quantize`` calibrates on concrete
  data, as before any call;
* it is held only weakly: the module's registry references the trace and the
  calibration through weak references, and what keeps the calibration alive is the
  arrays computed with it (a ``weakref.finalize`` on each result), so it lives as
  long as the trace's own results and a leak check (``jax.checking_leaks``) finds
  nothing left.  A traced ``quantize`` whose results were all dropped may leave no
  calibration behind (the next traced call calibrates again).

An eager calibration (``calibrate``, or a first eager ``quantize``) serves every later
call, traced or not.  A jitted function keeps the program it traced, so calling it
again with the same shapes does not see a calibration made since.  ``calibrate(x)``
itself refuses a traced ``x``.

pychop 0.6's names are accepted: ``bits=`` for ``num_bits``, ``axis=`` for
``channel_dim``.
"""

from __future__ import annotations

import weakref
from typing import ClassVar

from pychop_jax.core import validation
from pychop_jax.core.spec import QuantSpec
from pychop_jax.core.state import QuantState
from pychop_jax.interop import Framework, framework_named

__all__ = ["make_spec", "Quantizer", "JaxChopi", "NumpyChopi", "AutoChopi"]


def make_spec(num_bits=8, symmetric=False, per_channel=False, channel_dim=0, *,
              bits=None, axis=None, narrow_range=False) -> QuantSpec:
    """The ``QuantSpec`` of pychop's arguments (``bits`` / ``axis``: pychop 0.6 aliases
    of ``num_bits`` / ``channel_dim``)."""
    num_bits = _alias("num_bits", num_bits, 8, "bits", bits)
    channel_dim = _alias("channel_dim", channel_dim, 0, "axis", axis)
    return QuantSpec(bits=num_bits, symmetric=symmetric, narrow_range=narrow_range,
                     axis=channel_dim if per_channel else None)


def _alias(name, value, default, alias, alias_value):
    if alias_value is None:
        return value
    if value != default and value != alias_value:
        raise ValueError(f"{name}={value!r} and {alias}={alias_value!r} disagree; "
                         f"pass only one of them ({alias} is pychop 0.6's name).")
    return alias_value


class _TracedCalibration:
    """A calibration made inside one trace: ``scale`` / ``zero_point`` in pychop's
    shapes (values of that trace).  Only the arrays computed with it hold it strongly."""

    __slots__ = ("scale", "zero_point", "__weakref__")

    def __init__(self, scale, zero_point):
        self.scale = scale
        self.zero_point = zero_point


#: trace -> {quantizer: weak reference to the ``_TracedCalibration`` it made in that
#: trace}; weak in all three, so nothing here outlives the trace or extends a tracer.
_TRACED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _hold(_calibration):
    """The no-op callback of the finalizer that keeps a calibration alive."""


def _kept(out, calibration):
    """``out``, which keeps ``calibration`` (if any) alive for as long as it lives."""
    if calibration is not None:
        try:
            weakref.finalize(out, _hold, calibration).atexit = False
        except TypeError:  # not weakly referenceable: the calibration may go sooner
            pass
    return out


class Quantizer:
    """pychop's ``Chopi``: a calibrated integer quantizer over one backend.

    Eagerly it calibrates once (``calibrate``, or the first ``quantize`` /
    ``fake_quant``) and keeps ``scale`` / ``zero_point``.  Inside a JAX trace, while
    not calibrated eagerly, the first traced call calibrates for that trace only (see
    the module docstring): later calls in the same trace use it, nothing is stored on
    the object.

    Args:
      num_bits: code width, 2..16 (``bits=`` is accepted too).
      symmetric: zero point 0 and signed codes; else an affine grid ``[0, 2^b - 1]``.
      per_channel: one scale per index of ``channel_dim`` instead of one in all.
      channel_dim: the channel axis (negative allowed; ``axis=`` is accepted too).
      narrow_range: symmetric only: drop the most negative code.
    """

    backend: ClassVar[Framework | None] = None

    def __init__(self, num_bits=8, symmetric=False, per_channel=False, channel_dim=0, *,
                 bits=None, axis=None, narrow_range=False):
        self.spec = make_spec(num_bits, symmetric, per_channel, channel_dim,
                              bits=bits, axis=axis, narrow_range=narrow_range)
        self._calibrated_shape = None
        self.scale = None
        self.zero_point = None

    # -- configuration -------------------------------------------------------------------
    num_bits = property(lambda self: self.spec.bits, doc="Code width b.")
    bits = num_bits  # pychop 0.6
    symmetric = property(lambda self: self.spec.symmetric)
    narrow_range = property(lambda self: self.spec.narrow_range)
    per_channel = property(lambda self: self.spec.axis is not None)
    qmin = property(lambda self: self.spec.qmin, doc="Smallest code.")
    qmax = property(lambda self: self.spec.qmax, doc="Largest code.")

    @property
    def channel_dim(self) -> int:
        return 0 if self.spec.axis is None else self.spec.axis

    axis = channel_dim  # pychop 0.6

    @property
    def config(self) -> dict:
        """The constructor arguments (to build another quantizer like this one)."""
        return dict(num_bits=self.num_bits, symmetric=self.symmetric,
                    per_channel=self.per_channel, channel_dim=self.channel_dim,
                    narrow_range=self.narrow_range)

    def _config_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config.items())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._config_repr()})"

    @property
    def calibrated(self) -> bool:
        return self.scale is not None

    # -- the pychop methods ------------------------------------------------------------------
    def calibrate(self, x) -> None:
        """Set ``scale`` and ``zero_point`` from the range of ``x`` (see
        ``pychop_jax.calibrate`` for the formulas).

        Raises:
          TypeError: an array of another framework, or a traced JAX array (an object
            must not keep a tracer: calibrate eagerly, or use the functional API,
            ``pychop_jax.calibrate``, inside ``jax.jit``).
        """
        self._require_array(x, "calibrate")
        if self.backend.is_traced(x):
            raise TypeError(
                f"{type(self).__name__}.calibrate got a traced array (inside jax.jit / "
                "vmap / grad); the quantizer would keep a tracer. Calibrate on concrete "
                "data before tracing, or use pychop_jax.calibrate(x, spec), which returns "
                "the state instead of storing it.")
        self._store(self.backend.calibrate(x, self.spec), x.shape)

    def quantize(self, x):
        """Integer codes of ``x`` (calibrates on ``x`` first if not calibrated yet;
        inside a JAX trace: if that trace has no calibration yet, for that trace)."""
        self._require_array(x, "quantize")
        state, fresh, traced = self._state_or_calibrate(x, "quantize")
        return _kept(self.backend.quantize(x, state, check=not fresh), traced)

    def dequantize(self, q):
        """Floats ``(q - zero_point) * scale`` (inside a JAX trace, with the calibration
        that trace made if the quantizer is not calibrated eagerly).

        Raises:
          ValueError: not calibrated yet (nor by an earlier call in the current trace).
        """
        traced = None
        if not self.calibrated:
            traced = self._traced_calibration()
            if traced is None:
                raise ValueError(
                    f"{type(self).__name__}.dequantize: the quantizer is not calibrated; "
                    "call calibrate(x) or quantize(x) first (a quantize inside jax.jit / "
                    "vmap / grad calibrates for that trace only, not for later calls).")
        self._require_array(q, "dequantize")
        state = self._state_for(q.shape, "dequantize", traced)
        return _kept(self.backend.dequantize(q, state), traced)

    def fake_quant(self, x):
        """``dequantize(quantize(x))`` in ``x``'s dtype (calibrates first if needed, as
        ``quantize``)."""
        self._require_array(x, "fake_quant")
        state, fresh, traced = self._state_or_calibrate(x, "fake_quant")
        return _kept(self.backend.fake_quant(x, state, check=not fresh), traced)

    def __call__(self, x):
        return self.fake_quant(x)

    def _state_or_calibrate(self, x, what: str):
        """``(state, fresh, traced)``: the state for ``x``, calibrated on ``x`` first
        unless calibrated; ``fresh``: whether it was (then ``x`` is known to be finite
        and the backend can skip its NaN / inf check); ``traced``: the current trace's
        calibration it came from, which the result must keep alive, or ``None``.

        A traced ``x`` uses the eager calibration if there is one, else the current
        trace's, else calibrates for the current trace (not stored on the object)."""
        if self.calibrated:
            return self._state_for(x.shape, what), False, None
        if self.backend.is_traced(x):
            traced = self._traced_calibration()
            if traced is not None:
                return self._state_for(x.shape, what, traced), False, traced
            state = self.backend.calibrate(x, self.spec)
            return state, True, self._remember_traced(state)
        self.calibrate(x)
        return self._state_for(x.shape, what), True, None

    # -- calibration for one trace -----------------------------------------------------------
    def _traced_calibration(self) -> _TracedCalibration | None:
        """The calibration this quantizer made in the trace being recorded now, if any
        (and still held by a result of that trace)."""
        if self.backend is None:
            return None
        trace = self.backend.current_trace()
        if trace is None:
            return None
        try:
            ref = _TRACED.get(trace, {}).get(self)
        except TypeError:  # an unhashable trace: see _remember_traced
            return None
        return None if ref is None else ref()

    def _remember_traced(self, state: QuantState) -> _TracedCalibration | None:
        """File ``state`` (just calibrated on a traced input) under the current trace;
        ``None`` where no trace is being recorded (a tracer met outside its trace, e.g.
        under ``jax.ensure_compile_time_eval``): the state then serves this call only."""
        trace = self.backend.current_trace()
        if trace is None:
            return None
        traced = _TracedCalibration(self._squeeze(state.scale), self._squeeze(state.zero_point))
        try:
            mine = _TRACED.get(trace)
            if mine is None:
                mine = _TRACED[trace] = weakref.WeakKeyDictionary()
            mine[self] = weakref.ref(traced)
        except TypeError:  # a trace (or quantizer) that cannot be a key: this call only
            return None
        return traced

    # -- state in pychop's shapes ----------------------------------------------------------
    def _require_array(self, x, what: str) -> None:
        validation.require_framework(x, self.backend.name, what)

    def _squeeze(self, a):
        """State-shaped (input's rank) -> pychop's shape: 0-d, or (C,) per channel."""
        return self.backend.xp.reshape(a, (-1,) if self.per_channel else ())

    def _store(self, state: QuantState, shape) -> None:
        self.scale = self._squeeze(state.scale)
        self.zero_point = self._squeeze(state.zero_point)
        self._calibrated_shape = tuple(shape)

    def _state_shaped(self, arrays, shape, what: str) -> list:
        """pychop-shaped ``arrays`` reshaped to the state shape of an array of ``shape``
        (which must have as many channels along ``channel_dim``)."""
        shape = tuple(shape)
        expected = self.spec.scale_shape(shape)  # axis errors
        if self.per_channel:
            axis = self.spec.resolve_axis(len(shape))
            have = tuple(arrays[0].shape[0] if d == axis else 1 for d in range(len(shape)))
            validation.require_state_fits(shape, have, expected, what)
        return [self.backend.xp.reshape(a, expected) for a in arrays]

    def _state_for(self, shape, what: str, source=None) -> QuantState:
        """The ``QuantState`` that applies ``scale`` / ``zero_point`` (of ``source``: a
        ``_TracedCalibration``; default: this object's) to ``shape``."""
        source = self if source is None else source
        scale, zero_point = self._state_shaped((source.scale, source.zero_point), shape,
                                               what)
        return QuantState(scale, zero_point, self.spec)


class NumpyChopi(Quantizer):
    """pychop's integer quantizer for ``np.ndarray``.

    ``NumpyChopi(num_bits=8, symmetric=False, per_channel=False, channel_dim=0)``;
    ``ch(x)`` is fake quantization, ``dequantize(quantize(x))``.
    """

    backend = framework_named("numpy")


class JaxChopi(Quantizer):
    """pychop's integer quantizer for ``jax.Array`` (calls the jitted ``pychop_jax`` ops).

    ``state`` is the ``QuantState`` (input-rank shapes) to take into jitted code::

        ch = JaxChopi(num_bits=8); ch.calibrate(x)
        jax.jit(pychop_jax.quantize)(x, ch.state)
    """

    backend = framework_named("jax")

    @property
    def state(self) -> QuantState | None:
        """The calibrated ``QuantState``, shaped for the last calibrated array."""
        if not self.calibrated:
            return None
        return self._state_for(self._calibrated_shape, "state")


class AutoChopi(Quantizer):
    """A quantizer for ``pychop.backend('auto')``: it binds to the backend of the first
    array it is given (NumPy, JAX or Torch) and then accepts only that framework.

    Under Torch it is a plain quantizer, not an ``nn.Module``; use ``TorchChopi`` (or
    ``pychop.backend('torch')``) for training modules.
    """

    def _require_array(self, x, what: str) -> None:
        if self.backend is None:
            found = validation.framework_of(x)
            if found is None:
                raise TypeError(f"{what} expects a NumPy, JAX or Torch array; got an object "
                                f"of type {type(x).__name__}.")
            self.backend = framework_named(found)
        super()._require_array(x, what)
