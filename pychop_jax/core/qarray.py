"""``QuantizedArray``: integer codes together with the ``QuantState`` that decodes them.

A registered pytree (data: the codes and the state's arrays; static: the logical
shape and whether the codes are packed), so quantized parameters travel through
``jit``, ``tree_map`` and checkpoints like any array-holding tree.  It stores no float
copy of the values: ``nbytes`` counts the codes, the scales and the zero points.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import ops, packing
from .spec import QuantSpec
from .state import QuantState

__all__ = ["QuantizedArray"]


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
          pack: ``True`` to pack (bits <= 4 only), ``False`` to keep whole codes,
            ``'auto'`` (default) to pack whenever the grid has <= 4 bits.
          key: optional PRNG key for stochastic rounding.
          state: a precomputed state (e.g. from an observer).
        """
        shape = tuple(int(n) for n in jnp.shape(x))
        state = ops.calibrate(x, spec) if state is None else ops.fit_state(state, shape)
        codes = ops.quantize(x, state, key=key)
        out = cls(codes=codes, state=state, shape=shape)
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
        """``(q - zero_point) * scale`` as floats of ``shape`` (default: scale dtype)."""
        return ops.dequantize(self.unpacked_codes(), self.state, dtype=dtype)

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
        """Bytes stored: codes (packed or not) + scales + zero points."""
        return int(
            np.prod(jnp.shape(self.codes)) * jnp.dtype(jnp.asarray(self.codes).dtype).itemsize
            + self.state.scale.nbytes + self.state.zero_point.nbytes
        )

    def __getitem__(self, index):
        """Only ``qa[...]`` (itself), which is how ``nnx`` layers read a parameter."""
        if index is Ellipsis:
            return self
        raise TypeError("QuantizedArray supports only [...] indexing; dequantize() first.")

    def __repr__(self) -> str:
        kind = "packed " if self.packed else ""
        return (f"QuantizedArray(shape={self.shape}, {kind}{self.spec.bits}-bit "
                f"{self.spec.granularity}, nbytes={self.nbytes})")
