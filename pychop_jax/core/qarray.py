"""``QuantizedArray``: integer codes together with the ``QuantState`` that decodes them.

A registered pytree (data: the codes and the state's arrays; static: the logical
shape and whether the codes are packed), so quantized parameters travel through
``jit``, ``tree_map`` and checkpoints like any array-holding tree.  It stores no float
copy of the values: ``nbytes`` counts the codes, the scales and the zero points.

Float element grids and block-scale formats (``QuantSpec.dtype`` / ``scale_dtype``,
``pychop_jax.formats``): codes are the ml_dtypes dtype (fp4 / fp6 / NF4 packed by
default), the scales are stored in ``spec.scale_dtype`` (one byte per block for E8M0 and
float8; the entry points widen them exactly), a two-level spec's ``tensor_scale`` is one
float32, and the zero point, 0 by construction, is stored once (shape ``(1,) * ndim``).
So MXFP4 costs 4.25 bits per element plus a few bytes, NVFP4 4.5.

Integer grids with ``scale_dtype="float16"`` / ``"bfloat16"`` store their scales in that
dtype (rounded up onto its grid by ``numerics.round_scale``, which the calibrated ones
already are): int4 per group of 32 costs 4 + 16/32 = 4.5 bits per weight instead of
4 + 32/32.  Every symmetric grid stores its zero point (0) once.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import numerics, ops, packing
from .spec import QuantSpec
from .state import QuantState

__all__ = ["QuantizedArray", "storage_state"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
    """Codes of ``shape`` on ``state``'s grid, optionally packed (bits <= 4).

    Build one with ``QuantizedArray.quantize(x, spec)``; read it back with
    ``dequantize()``.

    Attributes:
      codes: ``state.spec.code_dtype`` codes of ``shape``, or, when ``packed``, the
        uint8 array of ``packing.pack``.
      state: the ``QuantState`` (scale and zero point, same rank as ``shape``).
      shape: logical shape of the quantized array (static); defaults to
        ``codes.shape`` when the codes are not packed.
      packed: whether ``codes`` is packed (static).

    Raises:
      ValueError: packed codes without their logical ``shape``.
    """

    codes: Any
    state: QuantState
    shape: tuple[int, ...] | None = dataclasses.field(default=None, metadata=dict(static=True))
    packed: bool = dataclasses.field(default=False, metadata=dict(static=True))

    def __post_init__(self):
        if self.shape is None:
            if self.packed:
                raise ValueError(
                    "QuantizedArray: packed codes do not show the array's shape; pass "
                    "shape=<logical shape> (or build it with QuantizedArray.quantize).")
            object.__setattr__(self, "shape", tuple(np.shape(self.codes)))

    @classmethod
    def quantize(cls, x, spec: QuantSpec, *, pack: bool | str = "auto", key=None,
                 state: QuantState | None = None) -> QuantizedArray:
        """Calibrate ``x`` under ``spec`` (unless ``state`` is given) and quantize it.

        Args:
          x: floating array.
          spec: the quantizer (ignored when ``state`` is given).
          pack: ``True`` to pack (bits <= 4, fp6, fp4, NF4), ``False`` to keep whole
            codes, ``'auto'`` (default) to pack whenever ``packing.field_bits`` allows.
          key: optional PRNG key for stochastic rounding.
          state: a precomputed state (e.g. from an observer).
        """
        shape = tuple(int(n) for n in jnp.shape(x))
        state = ops.calibrate(x, spec) if state is None else ops.fit_state(state, shape)
        codes = ops.quantize(x, state, key=key)
        out = cls(codes=codes, state=storage_state(state), shape=shape)
        want = packing.field_bits(state.spec) is not None if pack == "auto" else bool(pack)
        return out.pack() if want else out

    # -- packing ----------------------------------------------------------------------
    def pack(self) -> QuantizedArray:
        """Packed copy (two 4-bit or four 2-bit codes per byte)."""
        if self.packed:
            return self
        return dataclasses.replace(self, codes=packing.pack(self.codes, self.spec), packed=True)

    def unpack(self) -> QuantizedArray:
        """Copy with whole codes of ``spec.code_dtype``."""
        if not self.packed:
            return self
        return dataclasses.replace(
            self, codes=packing.unpack(self.codes, self.spec, self.shape), packed=False
        )

    def unpacked_codes(self):
        """The codes as an array of ``shape`` and ``code_dtype``."""
        return self.unpack().codes

    # -- values -----------------------------------------------------------------------
    def dequantize(self, dtype=None):
        """``(q - zero_point) * scale`` as floats of ``shape`` (default: float32, or
        the scale's dtype when it is float64)."""
        return ops.dequantize(self.unpacked_codes(), self.compute_state(), dtype=dtype)

    def compute_state(self) -> QuantState:
        """The state with float32 scales and a full zero point (what the entry points
        take; the stored one may hold E8M0 / float8 scales and one zero)."""
        state = self.state
        if not _compact(state.spec):
            return state
        scale = ops.widen_scale(state.scale)
        if not state.spec.symmetric:  # an affine grid keeps its zero points
            return state.replace(scale=scale)
        return state.replace(scale=scale, zero_point=jnp.zeros(scale.shape, jnp.int32))

    @property
    def spec(self) -> QuantSpec:
        return self.state.spec

    @property
    def dtype(self) -> np.dtype:
        """Dtype of the (unpacked) codes."""
        return self.spec.code_dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes stored: codes (packed or not) + scales + zero points (+ the tensor
        scale of a two-level spec)."""
        extra = 0 if self.state.tensor_scale is None else self.state.tensor_scale.nbytes
        return int(
            np.prod(jnp.shape(self.codes)) * jnp.dtype(jnp.asarray(self.codes).dtype).itemsize
            + self.state.scale.nbytes + self.state.zero_point.nbytes + extra
        )

    def __getitem__(self, index):
        """Only ``qa[...]`` (itself), which is how ``nnx`` layers read a parameter."""
        if index is Ellipsis:
            return self
        raise TypeError("QuantizedArray supports only [...] indexing; dequantize() first.")

    def __repr__(self) -> str:
        kind = "packed " if self.packed else ""
        grid = self.spec.dtype or f"{self.spec.bits}-bit"
        scales = f" {self.spec.scale_dtype} scales" if self.spec.scale_dtype else ""
        return (f"QuantizedArray(shape={self.shape}, {kind}{grid} "
                f"{self.spec.granularity}{scales}, nbytes={self.nbytes})")


def _compact(spec: QuantSpec) -> bool:
    """Whether ``QuantizedArray`` stores this spec's state compactly (scales in their
    scale format, one zero point when the grid is symmetric)."""
    return spec.is_float or spec.scale_dtype is not None or spec.symmetric


def storage_state(state: QuantState) -> QuantState:
    """The state as a ``QuantizedArray`` stores it (see the module docstring): for
    float element grids, block-scale formats and float16 / bfloat16 scales the scales in
    ``spec.scale_dtype`` and (symmetric grids) one zero point; other states unchanged."""
    spec = state.spec
    if not _compact(spec):
        return state
    scale = jnp.asarray(state.scale)
    if spec.rounded_scale_format is not None and scale.dtype != spec.storage_scale_dtype:
        scale = numerics.round_scale(jnp, scale, spec)  # a learned / hand-made scale
    if spec.storage_scale_dtype is not None:
        scale = scale.astype(spec.storage_scale_dtype)  # exact: the scales lie on its grid
    if not spec.symmetric:
        return state.replace(scale=scale)
    zero = jnp.zeros((1,) * scale.ndim, jnp.int32)
    return state.replace(scale=scale, zero_point=zero)
