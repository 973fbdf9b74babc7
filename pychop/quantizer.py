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

Under ``jax.jit`` a ``JaxChopi`` that is not calibrated yet calibrates on the traced
input for that call only: an object never keeps a tracer (its ``scale`` stays
``None``, so a later eager call calibrates on concrete data).  ``calibrate(x)`` itself
refuses a traced ``x``.

pychop 0.6's names are accepted: ``bits=`` for ``num_bits``, ``axis=`` for
``channel_dim``.
"""

from __future__ import annotations

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


class Quantizer:
    """pychop's ``Chopi``: a calibrated integer quantizer over one backend.

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
        """Integer codes of ``x`` (calibrates on ``x`` first if not calibrated yet)."""
        self._require_array(x, "quantize")
        state, fresh = self._state_or_calibrate(x, "quantize")
        return self.backend.quantize(x, state, check=not fresh)

    def dequantize(self, q):
        """Floats ``(q - zero_point) * scale``.

        Raises:
          ValueError: not calibrated yet.
        """
        if not self.calibrated:
            raise ValueError(f"{type(self).__name__}.dequantize: the quantizer is not "
                             "calibrated; call calibrate(x) or quantize(x) first (eagerly: "
                             "inside jax.jit a quantize does not store its calibration).")
        self._require_array(q, "dequantize")
        return self.backend.dequantize(q, self._state_for(q.shape, "dequantize"))

    def fake_quant(self, x):
        """``dequantize(quantize(x))`` in ``x``'s dtype (calibrates first if needed)."""
        self._require_array(x, "fake_quant")
        state, fresh = self._state_or_calibrate(x, "fake_quant")
        return self.backend.fake_quant(x, state, check=not fresh)

    def __call__(self, x):
        return self.fake_quant(x)

    def _state_or_calibrate(self, x, what: str) -> tuple[QuantState, bool]:
        """The state for ``x``, calibrated on ``x`` first unless calibrated, and whether
        it was (then ``x`` is known to be finite and the backend can skip its NaN /
        inf check).  A traced ``x`` gets a state of its own that is not stored."""
        if self.calibrated:
            return self._state_for(x.shape, what), False
        if self.backend.is_traced(x):
            return self.backend.calibrate(x, self.spec), True
        self.calibrate(x)
        return self._state_for(x.shape, what), True

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

    def _state_for(self, shape, what: str) -> QuantState:
        """The ``QuantState`` that applies ``scale`` / ``zero_point`` to ``shape``."""
        scale, zero_point = self._state_shaped((self.scale, self.zero_point), shape, what)
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
