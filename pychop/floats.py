"""pychop 0.6.2's float, fixed-point and MX emulators: ``Chop``, ``Chopf``, ``mx_quantize``.

Computed by ``pychop_jax.core`` (``floatgrid.round_to_format`` on integer bit patterns,
``fixedpoint``, ``blockscale.mx_fake_quant``) through ``pychop_jax.interop.formats``: one
jitted XLA kernel for NumPy arrays and Torch CPU tensors, the same pipeline jitted with
``jax.numpy`` for JAX arrays (so ``Chop`` works inside ``jax.jit``).  NumPy, Torch and
JAX give the same bits.  Differences from pychop 0.6.2 (where it does not follow
IEEE 754 / the OCP MX rule): ``docs/pychop_differences.md``.

    ch = pychop.Chop(5, 10)                 # IEEE half: exp_bits=5, sig_bits=10
    y = ch(x)                               # x's array type and dtype
    ch = pychop.Chop('h')                   # the same, by pychop's precision name
    sr = pychop.Chop(4, 3, rmode=5, random_state=0)
    y = sr(x)                               # NumPy / Torch / eager JAX: the instance's
    y = sr(x_jax, key=jax.random.key(1))    #   stream from random_state; or a key
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from pychop_jax.core import fixedpoint, floatgrid, validation
from pychop_jax.interop import formats, framework_named

__all__ = ["Chop", "Chopf", "mx_quantize", "MXSpec", "MX_FORMATS", "create_mx_spec",
           "PRECISIONS", "RMODES"]

#: pychop's precision names (``Chop_(prec=...)``) -> (exp_bits, sig_bits)
PRECISIONS = {
    "q43": (4, 3), "fp8-e4m3": (4, 3), "q52": (5, 2), "fp8-e5m2": (5, 2),
    "h": (5, 10), "half": (5, 10), "fp16": (5, 10),
    "b": (8, 7), "bfloat16": (8, 7), "bf16": (8, 7),
    "s": (8, 23), "single": (8, 23), "fp32": (8, 23),
    "d": (11, 52), "double": (11, 52), "fp64": (11, 52),
}
_NO_SUBNORMALS = ("b", "bfloat16", "bf16")  # pychop's default subnormal=False for these

#: rounding mode numbers accepted by ``Chop`` (pychop 0.6.2's) -> floatgrid names
RMODES = dict(floatgrid.PYCHOP_RMODES)
#: ``Chopf``'s modes; pychop 0.6.2 also spells them with these names (0, ties to odd,
#: is not implemented there; here it is round-to-odd, 'odd')
_CHOPF_NAMES = {"nearest": 1, "plus_inf": 2, "minus_inf": 3, "towards_zero": 4,
                "toward_zero": 4, "stoc_prop": 5, "stoc_equal": 6}
_STOCHASTIC = ("stochastic", "stochastic_equal")


def _rounding(rmode, what: str, extra=None) -> str:
    """pychop's ``rmode`` (a number, or one of floatgrid's rounding names) -> a name."""
    if isinstance(rmode, str):
        if rmode in floatgrid.ROUNDINGS:
            return rmode
        if extra and rmode in extra:
            return RMODES[extra[rmode]]
    elif isinstance(rmode, (int, np.integer)) and not isinstance(rmode, bool):
        if int(rmode) in RMODES:
            return RMODES[int(rmode)]
    raise ValueError(f"{what}: unknown rmode {rmode!r}; use 1 (nearest, ties to even), "
                     f"2 (toward +inf), 3 (toward -inf), 4 (toward zero), 5 (stochastic, "
                     f"proportional), 6 (stochastic, equal), 7 (nearest, ties toward zero), "
                     f"8 (nearest, ties away), 9 (round to odd), 10 (CADNA random directed "
                     f"= 6), or a name in {floatgrid.ROUNDINGS}.")


def _framework(x, what: str):
    """The interop Framework of ``x`` (the current ``pychop.backend`` must allow it);
    Python scalars and lists become NumPy arrays, as in pychop."""
    from . import get_backend

    found = validation.framework_of(x)
    if found is None and isinstance(x, (int, float, list, tuple)):
        x, found = np.asarray(x, dtype=np.float64), "numpy"
    if isinstance(x, np.generic):
        x = np.asarray(x)
    chosen = get_backend()
    expected = found if chosen == "auto" else chosen
    if found is None and expected not in ("numpy", "torch", "jax"):
        expected = "numpy"
    validation.require_framework(x, expected, what)
    return framework_named(found), x


class _Stream:
    """The noise keys of one object: ``fold_in(key(random_state), n)`` for its n-th
    stochastic call without an explicit key (pychop's per-instance generator, made of JAX
    keys so every framework draws the same bits)."""

    def __init__(self, random_state):
        if not isinstance(random_state, (int, np.integer)) or isinstance(random_state, bool):
            raise ValueError(f"random_state must be an integer seed; got {random_state!r}.")
        self.random_state = int(random_state)
        self.calls = 0

    def key(self, fw, x, key, what: str):
        if key is not None:
            return key
        if fw.is_traced(x):
            raise ValueError(f"{what}: a stochastic rounding inside jax.jit needs an explicit "
                             f"key: call it as ch(x, key=key) (an object cannot keep a "
                             f"random state across traced calls).")
        with jax.default_device(jax.devices("cpu")[0]):
            k = jax.random.fold_in(jax.random.key(self.random_state), self.calls)
        self.calls += 1
        return jax.random.key_data(k)


class Chop:
    """pychop's floating-point emulator: ``Chop(exp_bits, sig_bits, rmode=1,
    subnormal=True, chunk_size=800, random_state=42, verbose=0)``.

    ``ch(x)`` returns ``x`` rounded to the binary format with ``exp_bits`` exponent bits
    and ``sig_bits`` fraction bits (IEEE 754-like: bias ``2**(exp_bits-1) - 1``, the top
    exponent reserved for inf / NaN, subnormals unless ``subnormal=False``), in ``x``'s
    array type and dtype (which must hold every value of the format: ``ValueError``
    otherwise).  Overflow follows IEEE 754 (``round_to_format(..., overflow='ieee')``):
    ``inf`` for the nearest and stochastic modes, ``+-max`` for the directed modes where
    they round toward zero.  NaN stays NaN.

    Args:
      exp_bits: exponent bits (>= 2), or a pychop precision name (``PRECISIONS``:
        'q43', 'q52', 'h', 'b', 's', 'd', ...), which sets both widths.
      sig_bits: fraction bits (without the implicit bit); omitted with a name.
      rmode: 1 nearest (ties to even), 2 toward +inf, 3 toward -inf, 4 toward zero,
        5 stochastic (up with probability proportional to the distance from the lower
        neighbour), 6 stochastic with probability 1/2, 7 nearest with ties toward zero,
        8 nearest with ties away from zero, 9 round to odd, 10 CADNA random directed
        rounding (the same distribution as 6); or a ``floatgrid.ROUNDINGS`` name.
      subnormal: keep the subnormals (default; ``False``: the grid below min_normal is
        ``{0}``, and each mode rounds onto it).  ``None``: pychop's default (False for
        the bfloat16 names, else True).
      chunk_size: accepted and ignored (pychop's Dask chunking).
      random_state: seed of the stochastic modes' stream (see ``__call__``).
      verbose: print the unit roundoff.
      prec: a precision name, as keyword.

    Attributes: ``exp_bits``, ``sig_bits``, ``rmode``, ``subnormal``, ``random_state``,
    ``u`` (unit roundoff ``2**-(sig_bits+1)``), ``t`` (``sig_bits + 1``), ``emax``,
    ``emin``, ``bias``, ``xmax`` (largest finite value), ``xmin`` (smallest normal),
    ``xmins`` (smallest subnormal), ``format`` (the ``FloatFormat``), ``rounding``.
    """

    def __init__(self, exp_bits=None, sig_bits=None, rmode=1, subnormal=None, chunk_size=800,
                 random_state=42, verbose=0, *, prec=None):
        if isinstance(exp_bits, str):
            if prec is not None:
                raise ValueError("Chop: give the precision once (a name as exp_bits, or prec=).")
            exp_bits, prec = None, exp_bits
        if prec is not None:
            if prec not in PRECISIONS:
                raise ValueError(f"Chop: unknown precision {prec!r}; use one of "
                                 f"{sorted(PRECISIONS)}, or exp_bits and sig_bits.")
            if exp_bits is not None or sig_bits is not None:
                raise ValueError("Chop: pass a precision name or exp_bits / sig_bits, not both.")
            exp_bits, sig_bits = PRECISIONS[prec]
            if subnormal is None:
                subnormal = prec not in _NO_SUBNORMALS
        if exp_bits is None or sig_bits is None:
            raise TypeError("Chop needs exp_bits and sig_bits (e.g. Chop(5, 10)), or a "
                            "precision name (e.g. Chop('h')).")
        for name, v, lo in (("exp_bits", exp_bits, 2), ("sig_bits", sig_bits, 0)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo:
                raise ValueError(f"Chop: {name} must be an integer >= {lo}; got {v!r}.")
        if exp_bits > 11 or sig_bits > 52:
            raise ValueError(f"Chop: exp_bits <= 11 and sig_bits <= 52 (float64's widths, "
                             f"the widest input); got {exp_bits}, {sig_bits}.")
        if subnormal is None:
            subnormal = True
        self.exp_bits, self.sig_bits, self.rmode = int(exp_bits), int(sig_bits), rmode
        self.subnormal = bool(subnormal)
        self.prec = prec
        self.rounding = _rounding(rmode, "Chop")
        self.format = floatgrid.FloatFormat(self.exp_bits, self.sig_bits,
                                            subnormals=self.subnormal)
        self.chunk_size = chunk_size
        self._stream = _Stream(random_state)
        self.verbose = verbose
        if verbose:
            print(f"The floating point format is with unit-roundoff of {self.u:e} "
                  f"(≈2^{int(np.log2(self.u))}).")

    random_state = property(lambda self: self._stream.random_state)
    t = property(lambda self: self.sig_bits + 1, doc="Significand bits with the implicit one.")
    u = property(lambda self: 2.0 ** -(self.sig_bits + 1), doc="Unit roundoff 2**-t.")
    emax = property(lambda self: self.format.emax)
    emin = property(lambda self: self.format.emin)
    bias = property(lambda self: self.format.bias)
    xmax = property(lambda self: self.format.max_finite, doc="Largest finite value.")
    xmin = property(lambda self: self.format.min_normal, doc="Smallest normal value.")
    xmins = property(lambda self: self.format.min_subnormal, doc="Smallest positive value.")

    def __repr__(self) -> str:
        return (f"Chop(exp_bits={self.exp_bits}, sig_bits={self.sig_bits}, rmode={self.rmode!r}, "
                f"subnormal={self.subnormal}, random_state={self.random_state})")

    def __call__(self, x, *, key=None):
        """``x`` rounded to the format, in ``x``'s array type and dtype.

        Stochastic modes (5, 6, 10) draw ``jax.random.bits(key, x.shape, uint32)``:
        ``key`` if given (any framework), else the object's stream (``fold_in(
        key(random_state), n)`` for its n-th such call: pychop's per-instance
        generator, the same bits on every framework).  Inside ``jax.jit`` pass ``key``.

        Raises:
          TypeError: not a float array (or one of another framework than
            ``pychop.backend``'s).
          ValueError: ``x``'s dtype cannot hold the format's values (convert first).
        """
        fw, x = _framework(x, "Chop")
        if self.rounding in _STOCHASTIC:
            key = self._stream.key(fw, x, key, "Chop")
        return formats.round_float(fw, x, self.format, rounding=self.rounding,
                                   overflow="ieee", key=key)

    quantize = __call__


class Chopf:
    """pychop's fixed-point emulator: ``Chopf(ibits=4, fbits=4, rmode=1)``.

    Signed two's complement ``Q<ibits>.<fbits>`` (``ibits`` includes the sign): ``ch(x)``
    rounds ``x`` to a multiple of ``2**-fbits`` and saturates to
    ``[-2**(ibits-1), 2**(ibits-1) - 2**-fbits]`` (``+-inf`` too; NaN stays NaN), in
    ``x``'s array type and dtype (which must hold ``ibits + fbits`` significand bits).

    ``rmode``: as ``Chop`` (1-10 or a rounding name) plus pychop's names 'nearest',
    'plus_inf', 'minus_inf', 'towards_zero', 'stoc_prop', 'stoc_equal'; 0 (pychop:
    ties to odd, not implemented there) is round to odd.  Stochastic modes: as ``Chop``
    (``random_state=`` seeds the stream; ``key=`` per call).
    """

    def __init__(self, ibits=4, fbits=4, rmode=1, *, random_state=42):
        self.ibits, self.fbits, self.rmode = ibits, fbits, rmode
        self.rounding = "odd" if rmode == 0 and not isinstance(rmode, bool) else \
            _rounding(rmode, "Chopf", _CHOPF_NAMES)
        self.format = fixedpoint.FixedFormat(ibits, fbits)
        self._stream = _Stream(random_state)

    random_state = property(lambda self: self._stream.random_state)
    total_bits = property(lambda self: self.format.bits)
    max_value = property(lambda self: self.format.max_finite)
    min_value = property(lambda self: self.format.min_value)
    resolution = property(lambda self: self.format.resolution)

    def get_format_info(self) -> dict:
        return {"format": f"Q{self.ibits}.{self.fbits}", "total_bits": self.total_bits,
                "range": (self.min_value, self.max_value), "resolution": self.resolution}

    def __repr__(self) -> str:
        return f"Chopf(ibits={self.ibits}, fbits={self.fbits}, rmode={self.rmode!r})"

    def __call__(self, x, *, key=None):
        """``x`` on the fixed-point grid (see the class docstring)."""
        fw, x = _framework(x, "Chopf")
        if self.rounding in _STOCHASTIC:
            key = self._stream.key(fw, x, key, "Chopf")
        return formats.round_float(fw, x, self.format, rounding=self.rounding, key=key)

    quantize = __call__


# -- MX ------------------------------------------------------------------------------------
@dataclasses.dataclass
class MXSpec:
    """pychop's MX format description (``exp_bits == 0``: MXINT, two's complement with
    ``sig_bits`` fraction bits)."""

    name: str
    exp_bits: int
    sig_bits: int
    block_size: int = 32
    scale_exp_bits: int = 8
    scale_sig_bits: int = 0

    @property
    def element_bits(self) -> int:
        return 1 + self.exp_bits + self.sig_bits

    @property
    def total_bits_per_block(self) -> int:
        return self.element_bits * self.block_size + self.scale_exp_bits + self.scale_sig_bits

    @property
    def compression_vs_fp32(self) -> float:
        return 32 * self.block_size / self.total_bits_per_block

    @property
    def compression_vs_fp16(self) -> float:
        return 16 * self.block_size / self.total_bits_per_block


#: pychop 0.6.2's registry (OCP MX v1.0's concrete formats)
MX_FORMATS = {
    "mxfp8_e5m2": MXSpec("MXFP8_E5M2", 5, 2),
    "mxfp8_e4m3": MXSpec("MXFP8_E4M3", 4, 3),
    "mxfp6_e3m2": MXSpec("MXFP6_E3M2", 3, 2),
    "mxfp6_e2m3": MXSpec("MXFP6_E2M3", 2, 3),
    "mxfp4_e2m1": MXSpec("MXFP4_E2M1", 2, 1),
    "mxint8": MXSpec("MXINT8", 0, 7),
}
_OCP_ELEMENTS = {  # the concrete formats' element grids (OCP MX v1.0 section 5.3)
    "MXFP8_E5M2": floatgrid.FORMATS["float8_e5m2"],
    "MXFP8_E4M3": floatgrid.FORMATS["float8_e4m3fn"],
    "MXFP6_E3M2": floatgrid.FORMATS["float6_e3m2fn"],
    "MXFP6_E2M3": floatgrid.FORMATS["float6_e2m3fn"],
    "MXFP4_E2M1": floatgrid.FORMATS["float4_e2m1fn"],
}


def create_mx_spec(exp_bits: int, sig_bits: int, block_size: int = 32,
                   scale_exp_bits: int = 8, name: str | None = None) -> MXSpec:
    """A custom ``MXSpec`` (pychop's): elements with ``exp_bits`` / ``sig_bits`` and no
    special values (every exponent is finite), or MXINT when ``exp_bits == 0``."""
    if name is None:
        name = f"CUSTOM_MX{1 + exp_bits + sig_bits}_E{exp_bits}M{sig_bits}"
    return MXSpec(name, exp_bits, sig_bits, block_size, scale_exp_bits)


def _element(spec: MXSpec):
    if spec.exp_bits == 0:  # MXINT: k * 2**-(element_bits - 2), k in [-2**(b-1), 2**(b-1) - 1]
        return fixedpoint.FixedFormat(2, spec.sig_bits - 1)
    if spec.name.upper() in _OCP_ELEMENTS:
        return _OCP_ELEMENTS[spec.name.upper()]
    return floatgrid.FloatFormat(spec.exp_bits, spec.sig_bits, specials="finite")


def mx_quantize(data, format="mxfp8_e4m3", block_size: int = 32, scale_exp_bits=None,
                scale_sig_bits=None, backend=None):
    """pychop's ``mx_quantize``: MX quantize-dequantize of ``data`` (OCP MX v1.0).

    The flattened array is cut into blocks of ``block_size`` (the last one padded with
    zeros); each block gets the scale ``2**(floor(log2(amax)) - emax_elem)`` (E8M0:
    exponents -127..127) and its elements are rounded to the element format (nearest,
    ties to even, saturating): ``pychop_jax.core.blockscale.mx_fake_quant`` with the
    matching MX ``QuantSpec`` (blocks along the last axis of the flattened array).
    Returns the values ``element * scale`` in ``data``'s array type and shape (float32 for float16 /
    bfloat16 input, else ``data``'s dtype).  A block holding NaN or +-inf is all NaN.

    Args:
      data: a NumPy / Torch / JAX float array (Python lists become NumPy).
      format: a name of ``MX_FORMATS``, an ``MXSpec``, or ``(exp_bits, sig_bits)``.
      block_size: elements per scale (a name's spec takes this one).
      scale_exp_bits: exponent bits of the scale (default the spec's, 8).
      scale_sig_bits: must be 0 / None: MX scales are powers of two.
      backend: 'numpy' / 'torch' / 'jax' to insist on a framework, or None.
    """
    if isinstance(format, str):
        if format.lower() not in MX_FORMATS:
            raise ValueError(f"mx_quantize: unknown format {format!r}; use one of "
                             f"{sorted(MX_FORMATS)}, an MXSpec or (exp_bits, sig_bits).")
        spec = dataclasses.replace(MX_FORMATS[format.lower()], block_size=block_size)
    elif isinstance(format, tuple) and len(format) == 2:
        spec = create_mx_spec(format[0], format[1], block_size)
    elif isinstance(format, MXSpec):
        spec = format
    else:
        raise TypeError(f"mx_quantize: format must be a name, an MXSpec or (exp_bits, "
                        f"sig_bits); got {type(format).__name__}.")
    if scale_sig_bits not in (None, 0) or spec.scale_sig_bits != 0:
        raise ValueError("mx_quantize: MX scales are powers of two (E8M0): scale_sig_bits "
                         "must be 0.")
    if spec.exp_bits == 0 and spec.sig_bits < 1:
        raise ValueError(f"mx_quantize: an MXINT spec needs sig_bits >= 1; got {spec.sig_bits}.")
    sb = spec.scale_exp_bits if scale_exp_bits is None else scale_exp_bits
    grid = formats.MXGrid(_element(spec), spec.block_size, sb)
    fw, data = _framework(data, "mx_quantize")
    if backend is not None and backend != fw.name:
        raise TypeError(f"mx_quantize: backend={backend!r} but data is a {fw.name} array; "
                        f"convert it, or drop backend=.")
    return formats.mx(fw, data, grid)
