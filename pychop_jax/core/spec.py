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
* ``axis=(a, b, ..)``: per channel over several axes, one scale per element of the
  kept axes (every other axis is reduced): a weight's output channels when its
  matmul keeps more than one axis free (an einsum kernel ``(d, heads, head_dim)``:
  ``axis=(1, 2)``; a stacked ``(layers, in, out)``: ``axis=(0, 2)``).  A one-element
  tuple is the same spec as the int.
* ``axis=a, group_size=g``: per-group; one scale per block of ``g`` consecutive
  elements along ``a`` (every other axis is kept), so the scale has the input's shape
  with ``n_a`` replaced by ``n_a // g``.  ``n_a`` must be a multiple of ``g``.

Element formats (``dtype``).  ``None`` (default) is the integer grid above;
``"int<b>"`` / ``"uint<b>"`` are shorthands for it (symmetric / affine ``b``-bit, the same
spec as ``bits=b``).  A floating-point name (``"float8_e4m3fn"``, ``"float8_e5m2"``,
``"float8_e4m3fnuz"``, ``"float8_e5m2fnuz"``, ``"float6_e2m3fn"``, ``"float6_e3m2fn"``,
``"float4_e2m1fn"``, any other ml_dtypes float of ``floatgrid.FORMATS`` but float32) puts the
scaled values on that format's grid; ``"nf4"`` on QLoRA's 16-value NormalFloat table
(``NF4_VALUES``).  These grids are symmetric (zero point 0) and their scale is
``amax / max_value`` (``max_value``: the format's largest finite value, 1 for NF4); codes
are stored as the ml_dtypes dtype (NF4: uint8 indices into the table).

Scale formats (``scale_dtype``):

* ``None``: the compute dtype (float32 / float64), any positive value.
* ``"float8_e8m0fnu"``: powers of two, the OCP MX v1.0 shared scale
  ``2^(floor(log2(amax)) - emax_elem)`` (``emax_elem = floor(log2(max_value))``), or with
  ``scale_rounding="ceil"`` the smallest power of two that keeps ``amax`` on the grid
  (``blockscale.e8m0_scale``).  Integer grids too: ``bits=8, symmetric=True,
  narrow_range=True`` with it is MXINT8.
* a float8 name (``"float8_e4m3fn"``: NVFP4): two levels, a per-tensor float32 scale
  ``amax_tensor / (max(scale_dtype) * max_value)`` and block scales on the scale format's
  grid (``blockscale.two_level_scales``).
* ``"float16"`` / ``"bfloat16"`` (integer grids only; GGUF Q4_0's and GPTQ / AWQ
  checkpoints' fp16 scales): the integer grid's scale ``amax / qmax`` (or the affine
  span's) rounded **up** onto that format's grid (``numerics.round_scale``), so the
  calibrated ``amax`` never clips (``amax / scale <= qmax``); scales above the format's
  largest finite value saturate to it (values beyond then clip).  Every op applies
  ``round_scale`` to the scale it is given (idempotent on rounded scales), so a learned
  (LSQ) or hand-made scale is on the grid too; ``QuantizedArray`` and checkpoints store
  the scales in that dtype (2 bytes each).

The spec is a frozen, hashable dataclass, so it can be a static argument of
``jax.jit`` and the static metadata of the ``QuantState`` pytree.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers

import ml_dtypes
import numpy as np

from . import floatgrid

__all__ = ["QuantSpec", "MIN_BITS", "MAX_BITS", "NF4_VALUES", "ELEMENT_DTYPES", "SCALE_DTYPES",
           "ROUNDED_SCALE_DTYPES", "SCALE_ROUNDINGS", "split_bounds", "join_bounds"]

MIN_BITS = 2
MAX_BITS = 16

#: QLoRA's NormalFloat4 table (Dettmers et al., 2023, appendix E; bitsandbytes'
#: ``create_normal_map``), as float32, index = code
NF4_VALUES = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)
NF4_VALUES.flags.writeable = False

#: non-integer element grids ``QuantSpec(dtype=...)`` accepts
ELEMENT_DTYPES = tuple(n for n in floatgrid.FORMATS if n != "float32") + ("nf4",)
#: block-scale formats ``QuantSpec(scale_dtype=...)`` accepts (``None``: float32 scales)
SCALE_DTYPES = ("float8_e8m0fnu", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                "float8_e5m2fnuz", "float16", "bfloat16")
#: scale formats of an integer grid's rounded scales (the others are block-scale formats)
ROUNDED_SCALE_DTYPES = ("float16", "bfloat16")
#: how an E8M0 scale rounds ``log2(amax / max_value)``: OCP's floor, or up
SCALE_ROUNDINGS = ("floor", "ceil")


def _dtype_name(value) -> str | None:
    if value is None or isinstance(value, str):
        return value
    name = getattr(value, "__name__", None)
    if name is None:
        try:
            name = np.dtype(value).name
        except TypeError:
            name = None
    return name


def _int_dtype(name: str):
    """``(bits, symmetric)`` of ``"int<b>"`` / ``"uint<b>"``, else ``None``."""
    for prefix, symmetric in (("uint", False), ("int", True)):
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            return int(name[len(prefix):]), symmetric
    return None


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
        the grouped axis when ``group_size`` is given; a tuple of distinct ints for
        per channel over several axes (not with ``group_size``).
      group_size: ``None``, or the block length g for per-group quantization along
        ``axis``.
      dtype: element grid: ``None`` (the integer grid of ``bits``), ``"int<b>"`` /
        ``"uint<b>"`` (shorthand for ``bits=b`` symmetric / affine; normalised to
        ``dtype=None``), a float format name (``ELEMENT_DTYPES``) or ``"nf4"``.  Float
        grids set ``bits`` to the format's width and ``symmetric=True``.
      scale_dtype: ``None``, ``"float8_e8m0fnu"`` (power-of-two MX scales), a float8
        name (two-level scales, NVFP4), or ``"float16"`` / ``"bfloat16"`` (an integer
        grid's scales rounded up to that format); see the module docstring.
      scale_rounding: E8M0 only: ``"floor"`` (OCP MX v1.0, default) or ``"ceil"``.

    Raises:
      ValueError: a field outside its allowed values (the message names the field).
    """

    bits: int = 8
    symmetric: bool = False
    narrow_range: bool = False
    axis: int | tuple[int, ...] | None = None
    group_size: int | None = None
    dtype: str | None = None
    scale_dtype: str | None = None
    scale_rounding: str = "floor"

    def __post_init__(self):
        self._init_formats()
        self._init_grid()

    def _init_formats(self):
        name = _dtype_name(self.dtype)
        if self.dtype is not None and not isinstance(name, str):
            raise ValueError(f"QuantSpec.dtype must be a dtype name; got {self.dtype!r}.")
        if name is not None:
            as_int = _int_dtype(name)
            if as_int is not None:
                bits, symmetric = as_int
                if self.bits not in (8, bits):
                    raise ValueError(f"QuantSpec(dtype={name!r}) has {bits} bits; got bits="
                                     f"{self.bits!r} as well. Pass one of them.")
                object.__setattr__(self, "bits", bits)
                object.__setattr__(self, "symmetric", symmetric)
                name = None
            elif name not in ELEMENT_DTYPES:
                raise ValueError(
                    f"QuantSpec.dtype={name!r} is not a known element format; use None or "
                    f"'int<b>' / 'uint<b>' for integer grids, or one of {list(ELEMENT_DTYPES)}.")
            else:
                width = 4 if name == "nf4" else np.dtype(_ml_dtype(name)).itemsize * 8
                if name.startswith(("float6", "float4")):
                    width = int(name[5])
                if self.bits not in (8, width):
                    raise ValueError(f"QuantSpec(dtype={name!r}) has {width}-bit codes; got "
                                     f"bits={self.bits!r}. Leave bits out.")
                if self.narrow_range:
                    raise ValueError(f"QuantSpec.narrow_range applies to integer grids; "
                                     f"dtype={name!r} is symmetric by construction.")
                object.__setattr__(self, "bits", width)
                object.__setattr__(self, "symmetric", True)
        object.__setattr__(self, "dtype", name)
        scale = _dtype_name(self.scale_dtype)
        if scale is not None and scale not in SCALE_DTYPES:
            raise ValueError(f"QuantSpec.scale_dtype={self.scale_dtype!r}: use None (float32 "
                             f"scales) or one of {list(SCALE_DTYPES)}.")
        object.__setattr__(self, "scale_dtype", scale)
        if self.scale_rounding not in SCALE_ROUNDINGS:
            raise ValueError(f"QuantSpec.scale_rounding={self.scale_rounding!r}: use one of "
                             f"{list(SCALE_ROUNDINGS)}.")
        if self.scale_rounding != "floor" and scale != "float8_e8m0fnu":
            raise ValueError("QuantSpec.scale_rounding applies to power-of-two scales only; "
                             "set scale_dtype='float8_e8m0fnu' or leave scale_rounding out.")
        if scale in ROUNDED_SCALE_DTYPES and name is not None:
            raise ValueError(f"QuantSpec(scale_dtype={scale!r}) rounds an integer grid's "
                             f"scales; dtype={name!r} is a float element grid. Leave "
                             "scale_dtype out (float32 scales) or use a float8 scale_dtype.")
        if self.block_scaled and name is None and not self.symmetric:
            raise ValueError(f"QuantSpec(scale_dtype={scale!r}) needs a symmetric grid (block "
                             "scales have no zero point); set symmetric=True.")

    def _init_grid(self):
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
        if isinstance(self.axis, (tuple, list)):
            axes = tuple(_require_int("axis", a, "(or a tuple of them), or None")
                         for a in self.axis)
            if not axes:
                raise ValueError("QuantSpec.axis=(): use axis=None for per-tensor "
                                 "quantization, or name the kept axes.")
            object.__setattr__(self, "axis", axes[0] if len(axes) == 1 else axes)
        elif self.axis is not None:
            object.__setattr__(
                self, "axis", _require_int("axis", self.axis, "(or a tuple of them), or None")
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
            if isinstance(self.axis, tuple):
                raise ValueError(
                    f"QuantSpec.group_size groups along one axis; got axis={self.axis}. "
                    "Pass the one axis to group along."
                )
            object.__setattr__(self, "group_size", g)

    # -- element and scale formats --------------------------------------------------
    @property
    def is_float(self) -> bool:
        """Whether the element grid is a float format or NF4 (not the integer grid)."""
        return self.dtype is not None

    @property
    def element_format(self) -> floatgrid.FloatFormat | None:
        """The ``FloatFormat`` of a float element grid (``None`` for integer and NF4)."""
        if self.dtype is None or self.dtype == "nf4":
            return None
        return floatgrid.FORMATS[self.dtype]

    @property
    def max_value(self) -> float:
        """Largest magnitude on the element grid in scale units: the format's max_finite,
        1.0 for NF4, ``qmax`` for an integer grid (``scale = amax / max_value``)."""
        if self.dtype is None:
            return float(self.qmax)
        if self.dtype == "nf4":
            return 1.0
        return self.element_format.max_finite

    @property
    def emax_elem(self) -> int:
        """``floor(log2(max_value))``: the element's largest exponent, OCP MX's
        ``emax_elem`` (fp8 e4m3: 8, fp4: 2, int8 (qmax 127): 6, NF4: 0)."""
        return math.frexp(self.max_value)[1] - 1

    @property
    def two_level(self) -> bool:
        """Whether the scales are two-level (a per-tensor float32 scale times block
        scales of a float8 ``scale_dtype``, as NVFP4)."""
        return self.block_scaled and self.scale_dtype != "float8_e8m0fnu"

    @property
    def block_scaled(self) -> bool:
        """Whether ``scale_dtype`` is a block-scale format (E8M0 or two-level float8), whose
        scales follow ``blockscale``'s rules rather than the integer grid's."""
        return self.scale_dtype is not None and self.scale_dtype not in ROUNDED_SCALE_DTYPES

    @property
    def rounded_scale_format(self) -> floatgrid.FloatFormat | None:
        """The ``FloatFormat`` an integer grid's scales are rounded up to
        (``scale_dtype="float16"`` / ``"bfloat16"``), else ``None``."""
        if self.scale_dtype in ROUNDED_SCALE_DTYPES:
            return floatgrid.FORMATS[self.scale_dtype]
        return None

    @property
    def scale_format(self) -> floatgrid.FloatFormat | None:
        """The ``FloatFormat`` of a two-level spec's block scales."""
        return floatgrid.FORMATS[self.scale_dtype] if self.two_level else None

    @property
    def storage_scale_dtype(self) -> np.dtype | None:
        """The dtype a ``QuantizedArray`` stores the scales in (``None``: as computed)."""
        return None if self.scale_dtype is None else np.dtype(_ml_dtype(self.scale_dtype))

    # -- the integer grid ---------------------------------------------------------
    @property
    def qmin(self) -> int:
        """Smallest code (NF4: index 0).

        Raises:
          ValueError: float element grids have no integer bounds.
        """
        self._require_integer_codes("qmin")
        if self.dtype == "nf4":
            return 0
        if not self.symmetric:
            return 0
        return -(2 ** (self.bits - 1)) + int(self.narrow_range)

    @property
    def qmax(self) -> int:
        """Largest code (NF4: index 15)."""
        self._require_integer_codes("qmax")
        if self.dtype == "nf4":
            return 15
        if self.symmetric:
            return 2 ** (self.bits - 1) - 1
        return 2**self.bits - 1

    def _require_integer_codes(self, what):
        if self.dtype is not None and self.dtype != "nf4":
            raise ValueError(f"QuantSpec(dtype={self.dtype!r}) has float codes, no {what}; "
                             "use max_value for the grid's range.")

    @property
    def code_dtype(self) -> np.dtype:
        """NumPy dtype of the codes: (u)int8 for b <= 8, (u)int16 above; the ml_dtypes
        dtype of a float element format; uint8 for NF4 (table indices) and for fp6
        (XLA has no fp6 type: the ml_dtypes bit pattern, ``codes.view(ml_dtypes.<name>)``
        in NumPy reads it)."""
        if self.dtype == "nf4" or (self.dtype or "").startswith("float6"):
            return np.dtype(np.uint8)
        if self.dtype is not None:
            return np.dtype(_ml_dtype(self.dtype))
        width = 8 if self.bits <= 8 else 16
        return np.dtype(f"{'int' if self.symmetric else 'uint'}{width}")

    @property
    def granularity(self) -> str:
        """``'tensor'``, ``'channel'`` or ``'group'``."""
        if self.axis is None:
            return "tensor"
        return "channel" if self.group_size is None else "group"

    # -- axes ---------------------------------------------------------------------
    @property
    def multi_axis(self) -> bool:
        """Whether the spec is per channel over several axes (``axis`` a tuple)."""
        return isinstance(self.axis, tuple)

    def resolve_axis(self, ndim: int) -> int | None:
        """The non-negative axis for an array of rank ``ndim`` (``None`` per-tensor).

        Raises:
          ValueError: the axis does not exist in an array of that rank, or the spec
            keeps several axes (``resolve_axes``).
        """
        if self.axis is None:
            return None
        if self.multi_axis:
            raise ValueError(
                f"QuantSpec.axis={self.axis} keeps several axes; this operation takes "
                "a spec with one axis (per tensor, per channel along one axis, or per "
                "group).")
        return self._axis_in(self.axis, ndim)

    def resolve_axes(self, ndim: int) -> tuple[int, ...]:
        """The non-negative axes along which the scale varies for an array of rank
        ``ndim``: ``()`` per tensor, the kept axes per channel (sorted), the grouped
        axis per group.

        Raises:
          ValueError: an axis that does not exist in an array of that rank, or the
            same axis twice.
        """
        if self.axis is None:
            return ()
        axes = self.axis if self.multi_axis else (self.axis,)
        resolved = tuple(sorted(self._axis_in(a, ndim) for a in axes))
        if len(set(resolved)) != len(resolved):
            raise ValueError(f"QuantSpec.axis={self.axis} names the same axis twice for "
                             f"an array with {ndim} dimension(s).")
        return resolved

    def _axis_in(self, axis: int, ndim: int) -> int:
        if not -ndim <= axis < ndim:
            raise ValueError(
                f"QuantSpec.axis={self.axis} is out of range for an array with "
                f"{ndim} dimension(s); use an axis in [{-ndim}, {ndim - 1}] "
                "or axis=None for per-tensor quantization."
            )
        return axis % ndim

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the scale / zero point for an input of ``shape``.

        Raises:
          ValueError: bad axis, or a grouped axis whose length is not a multiple of
            ``group_size``.
        """
        shape = tuple(int(n) for n in shape)
        if self.group_size is None:
            kept = self.resolve_axes(len(shape))
            return tuple(n if d in kept else 1 for d, n in enumerate(shape))
        axis = self.resolve_axis(len(shape))
        n = shape[axis]
        if n % self.group_size:
            raise ValueError(
                f"axis {axis} has length {n}, which is not a multiple of "
                f"group_size={self.group_size}; pad the array or choose a group size "
                f"that divides {n}."
            )
        return tuple(n // self.group_size if d == axis else m for d, m in enumerate(shape))


def _ml_dtype(name: str):
    return getattr(ml_dtypes, name, None) or np.dtype(name)


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
    signedness and code dtype).  Cached: eager calls pay for it once per spec.

    Only integer grids (float32 or float16 / bfloat16 scales) share a structure between
    bit widths; a spec with an element format or a block-scale format is its own
    structure (float grids get ``[0, 0]``, unused)."""
    if spec.is_float or spec.block_scaled:
        bounds = np.array([0, 0] if spec.element_format else [spec.qmin, spec.qmax], np.int32)
        bounds.flags.writeable = False
        return bounds, spec
    structure = dataclasses.replace(spec, bits=8 if spec.bits <= 8 else 16, narrow_range=False)
    bounds = np.array([spec.qmin, spec.qmax], np.int32)
    bounds.flags.writeable = False
    return bounds, structure


def join_bounds(structure: QuantSpec, bounds) -> BoundSpec:
    """Inverse of ``split_bounds`` (``bounds`` may be traced)."""
    return BoundSpec(structure, bounds[0], bounds[1])
