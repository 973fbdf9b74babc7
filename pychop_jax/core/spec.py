"""``QuantSpec``: what a quantizer is, independent of any data.

A spec fixes the integer grid and the granularity of the scales:

===========  =====================================  ==================  ===========
mode         qmin                                   qmax                codes
===========  =====================================  ==================  ===========
symmetric    -2^(b-1)  (narrow_range: -2^(b-1)+1)   2^(b-1) - 1         int8 / int16
asymmetric   0                                      2^b - 1             uint8 / uint16
===========  =====================================  ==================  ===========

(8-bit codes for b <= 8, 16-bit codes for 9 <= b <= 16.)  Asymmetric codes are
*unsigned*: the range [0, 2^b - 1] of an asymmetric 8-bit quantizer does not fit in
int8, so it is stored as uint8.

Granularity, expressed as the shape of the scale (always the input's rank):

* ``axis=None``: per-tensor, one scale; every axis is reduced.
* ``axis=a``: per-channel along ``a``; every other axis is reduced, so the scale has
  shape ``(1, .., C, .., 1)``.
* ``axis=a, group_size=g``: per-group; one scale per block of ``g`` consecutive
  elements along ``a`` (every other axis is kept), so the scale has the input's shape
  with ``n_a`` replaced by ``n_a // g``.  ``n_a`` must be a multiple of ``g``.

The spec is a frozen, hashable dataclass, so it can be a static argument of
``jax.jit`` and the static metadata of the ``QuantState`` pytree.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers

import numpy as np

__all__ = ["QuantSpec", "MIN_BITS", "MAX_BITS", "split_bounds", "join_bounds"]

MIN_BITS = 2
MAX_BITS = 16


def _require_int(name: str, value, allowed: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ValueError(f"QuantSpec.{name} must be an integer {allowed}; got {value!r}.")
    return int(value)


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """Static description of an integer quantizer.

    Args:
      bits: code width b, ``2 <= b <= 16``.
      symmetric: ``True`` for a zero point fixed at 0 and signed codes; ``False``
        (default) for an affine grid ``[0, 2^b - 1]`` with a zero point.
      narrow_range: symmetric only; drop the most negative code so the grid is
        ``[-(2^(b-1) - 1), 2^(b-1) - 1]``.
      axis: ``None`` for per-tensor; an int (negative allowed) for per-channel, or
        the grouped axis when ``group_size`` is given.
      group_size: ``None``, or the block length g for per-group quantization along
        ``axis``.

    Raises:
      ValueError: a field outside its allowed values (the message names the field).
    """

    bits: int = 8
    symmetric: bool = False
    narrow_range: bool = False
    axis: int | None = None
    group_size: int | None = None

    def __post_init__(self):
        bits = _require_int("bits", self.bits, f"in [{MIN_BITS}, {MAX_BITS}]")
        if not MIN_BITS <= bits <= MAX_BITS:
            raise ValueError(
                f"QuantSpec.bits must be in [{MIN_BITS}, {MAX_BITS}]; got {bits}."
            )
        object.__setattr__(self, "bits", bits)
        for name in ("symmetric", "narrow_range"):
            value = getattr(self, name)
            if not isinstance(value, (bool, np.bool_)):
                raise ValueError(f"QuantSpec.{name} must be a bool; got {value!r}.")
            object.__setattr__(self, name, bool(value))
        if self.narrow_range and not self.symmetric:
            raise ValueError(
                "QuantSpec.narrow_range applies to symmetric quantization only; "
                "set symmetric=True or narrow_range=False."
            )
        if self.axis is not None:
            object.__setattr__(
                self, "axis", _require_int("axis", self.axis, "or None")
            )
        if self.group_size is not None:
            g = _require_int("group_size", self.group_size, ">= 1 or None")
            if g < 1:
                raise ValueError(f"QuantSpec.group_size must be >= 1; got {g}.")
            if self.axis is None:
                raise ValueError(
                    "QuantSpec.group_size needs the axis to group along; "
                    "pass axis=<int> as well."
                )
            object.__setattr__(self, "group_size", g)

    # -- the integer grid ---------------------------------------------------------
    @property
    def qmin(self) -> int:
        """Smallest code."""
        if not self.symmetric:
            return 0
        return -(2 ** (self.bits - 1)) + int(self.narrow_range)

    @property
    def qmax(self) -> int:
        """Largest code."""
        if self.symmetric:
            return 2 ** (self.bits - 1) - 1
        return 2**self.bits - 1

    @property
    def code_dtype(self) -> np.dtype:
        """NumPy dtype of the codes: (u)int8 for b <= 8, (u)int16 above."""
        width = 8 if self.bits <= 8 else 16
        return np.dtype(f"{'int' if self.symmetric else 'uint'}{width}")

    @property
    def granularity(self) -> str:
        """``'tensor'``, ``'channel'`` or ``'group'``."""
        if self.axis is None:
            return "tensor"
        return "channel" if self.group_size is None else "group"

    # -- axes ---------------------------------------------------------------------
    def resolve_axis(self, ndim: int) -> int | None:
        """The non-negative axis for an array of rank ``ndim`` (``None`` per-tensor).

        Raises:
          ValueError: the axis does not exist in an array of that rank.
        """
        if self.axis is None:
            return None
        if not -ndim <= self.axis < ndim:
            raise ValueError(
                f"QuantSpec.axis={self.axis} is out of range for an array with "
                f"{ndim} dimension(s); use an axis in [{-ndim}, {ndim - 1}] "
                "or axis=None for per-tensor quantization."
            )
        return self.axis % ndim

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the scale / zero point for an input of ``shape``.

        Raises:
          ValueError: bad axis, or a grouped axis whose length is not a multiple of
            ``group_size``.
        """
        shape = tuple(int(n) for n in shape)
        axis = self.resolve_axis(len(shape))
        if axis is None:
            return (1,) * len(shape)
        if self.group_size is None:
            return tuple(n if d == axis else 1 for d, n in enumerate(shape))
        n = shape[axis]
        if n % self.group_size:
            raise ValueError(
                f"axis {axis} has length {n}, which is not a multiple of "
                f"group_size={self.group_size}; pad the array or choose a group size "
                f"that divides {n}."
            )
        return tuple(n // self.group_size if d == axis else m for d, m in enumerate(shape))


# -- bounds as data -----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BoundSpec:
    """A spec whose ``qmin`` / ``qmax`` are array scalars instead of Python ints.

    ``numerics`` reads every other attribute from ``structure``.  The jitted JAX
    kernels use it so that one compilation serves every bit width: only the
    structure (signedness, code width, axis, group size) is static.
    """

    structure: QuantSpec
    qmin: object
    qmax: object

    def __getattr__(self, name):
        return getattr(self.structure, name)


@functools.lru_cache(maxsize=1024)
def split_bounds(spec: QuantSpec):
    """``spec`` -> (int32 ``[qmin, qmax]``, hashable structure with the same layout,
    signedness and code dtype).  Cached: eager calls pay for it once per spec."""
    structure = dataclasses.replace(spec, bits=8 if spec.bits <= 8 else 16, narrow_range=False)
    bounds = np.array([spec.qmin, spec.qmax], np.int32)
    bounds.flags.writeable = False
    return bounds, structure


def join_bounds(structure: QuantSpec, bounds) -> BoundSpec:
    """Inverse of ``split_bounds`` (``bounds`` may be traced)."""
    return BoundSpec(structure, bounds[0], bounds[1])
