"""Rounding to a signed fixed-point grid, written once against an array namespace ``xp``.

``FixedFormat(ibits, fbits)`` is the two's-complement format ``Q<ibits>.<fbits>``: codes
``k`` with ``-2**(n-1) <= k <= 2**(n-1) - 1``, ``n = ibits + fbits``, meaning ``k * 2**-fbits``.
So the values are the multiples of ``2**-fbits`` in ``[-2**(ibits-1), 2**(ibits-1) - 2**-fbits]``
(``ibits`` counts the sign bit, as pychop's ``Chopf``).

``round_to_fixed(xp, x, fmt, rounding=..., noise=...)`` rounds by ``fmt``'s rounding rule
and saturates::

    y = clip(round(x * 2**fbits) * 2**-fbits, -2**(ibits-1), 2**(ibits-1) - 2**-fbits)

How: on ``[0, 2**(ibits-1))`` the fixed grid is the subnormal grid of the float format
with ``m = n - 1`` fraction bits and min_normal ``2**(ibits-1)`` (spacing
``2**(emin - m) = 2**-fbits``); ``floatgrid.round_to_format`` rounds onto it on the integer
bit pattern (every rounding mode, subnormal inputs, exact stochastic rounding; the same
bits on every backend), and a clip to the fixed range saturates.  NaN stays NaN; ``+-inf``
saturate to the range's ends.  The result is in the compute dtype of ``round_to_format``
(float64 for float64 input, float32 otherwise), which must hold every value of the format:
``n <= 24`` for float32 compute, ``n <= 53`` for float64.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from . import floatgrid

__all__ = ["FixedFormat", "round_to_fixed"]


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


@dataclasses.dataclass(frozen=True)
class FixedFormat:
    """Signed fixed point ``Q<ibits>.<fbits>``: ``ibits >= 1`` integer bits (with the sign),
    ``fbits >= 0`` fraction bits; values ``k * 2**-fbits``, ``-2**(n-1) <= k < 2**(n-1)``."""

    ibits: int
    fbits: int

    def __post_init__(self):
        i, f = self.ibits, self.fbits
        if not _is_int(i) or i < 1:
            raise ValueError(f"FixedFormat: ibits (integer bits, the sign bit included) must "
                             f"be an integer >= 1; got {i!r}.")
        if not _is_int(f) or f < 0:
            raise ValueError(f"FixedFormat: fbits (fraction bits) must be an integer >= 0; "
                             f"got {f!r}.")
        if i + f > 53:
            raise ValueError(f"FixedFormat: Q{i}.{f} has {i + f} bits; at most 53 (float64's "
                             f"significand) are supported.")
        object.__setattr__(self, "ibits", int(i))
        object.__setattr__(self, "fbits", int(f))

    @property
    def bits(self) -> int:
        return self.ibits + self.fbits

    @property
    def resolution(self) -> float:
        """The spacing ``2**-fbits``."""
        return 2.0 ** -self.fbits

    @property
    def max_finite(self) -> float:
        return 2.0 ** (self.ibits - 1) - 2.0 ** -self.fbits

    @property
    def min_value(self) -> float:
        return -(2.0 ** (self.ibits - 1))

    @property
    def emax(self) -> int:
        """``floor(log2(max_finite))`` (for block scaling: MXINT8 = Q2.6 has emax 0)."""
        return self.ibits - 2 if self.bits > 1 else -1

    def float_format(self) -> floatgrid.FloatFormat:
        """The float format whose subnormal grid is this grid on ``[0, 2**(ibits-1))``."""
        return _as_float(self)


@functools.cache
def _as_float(fmt: FixedFormat) -> floatgrid.FloatFormat:
    # one exponent bit, no specials: codes 0 (subnormals) and 1 (the binade from 2**(ibits-1))
    return floatgrid.FloatFormat(1, fmt.bits - 1, bias=2 - fmt.ibits, specials="finite",
                                 name=f"Q{fmt.ibits}.{fmt.fbits}")


def round_to_fixed(xp, x, fmt: FixedFormat, *, rounding: str = "nearest_even", noise=None):
    """Round ``x`` to the fixed-point grid ``fmt`` and saturate to its range.

    Args:
      xp: the array namespace (``jax.numpy``, ``array_api_compat.numpy`` / ``.torch``).
      x: float16 / bfloat16 / float32 / float64 array.
      fmt: a ``FixedFormat``.
      rounding: one of ``floatgrid.ROUNDINGS`` (the same meanings, on the fixed grid).
      noise: uint32 random bits of ``x``'s shape for the stochastic roundings.

    Returns:
      ``x``'s shape in the compute dtype (float64 for float64 input, else float32).

    Raises:
      ValueError: ``fmt`` needs more significand bits than the compute dtype has.
    """
    if not isinstance(fmt, FixedFormat):
        raise TypeError(f"round_to_fixed needs a FixedFormat; got {type(fmt).__name__}.")
    name = str(x.dtype).removeprefix("torch.")
    if name != "float64" and fmt.bits > 24:
        raise ValueError(f"Q{fmt.ibits}.{fmt.fbits} needs {fmt.bits} significand bits; "
                         f"float32 has 24: pass float64 input.")
    y = floatgrid.round_to_format(xp, x, _as_float(fmt), rounding=rounding,
                                  overflow="saturate", noise=noise)
    return xp.clip(y, fmt.min_value, fmt.max_finite)
