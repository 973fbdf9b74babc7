"""Rounding to a binary floating-point grid, written once against an array namespace ``xp``.

``round_to_format(xp, x, fmt, ...)`` rounds every element of ``x`` to the nearest-by-mode
value of a binary floating-point format ``fmt`` (fp8 / fp6 / fp4, OCP MX elements, float16,
bfloat16, or any custom ``e<E>m<M>``) and returns it in the *compute dtype* ``F``:
float64 for float64 input, float32 for every other float (float16 / bfloat16 are widened
exactly to float32 first).  ``xp`` is ``jax.numpy`` (jitted or eager),
``array_api_compat.numpy`` or ``array_api_compat.torch``; all give the same bits.

Numerics contract
-----------------
Why integers.  XLA:CPU flushes float32 subnormals to zero in every float operation
(inputs and results), NumPy and Torch keep them; XLA also contracts ``a*b + c`` into an
FMA and rewrites divisions.  Every float trick (magic-constant add, scaling by powers of
two) therefore breaks somewhere: for grids below 2**-126, for subnormal inputs, or for
``'up'`` of a tiny value, whose answer is the format's smallest subnormal.  So the whole
rounding is done on the integer bit pattern; the only float operations are the exact
bitcasts in and out (and, for formats whose exponent range reaches below ``F``'s, one
exact int -> float conversion of a subnormal's fraction, used only to read its exponent).

Notation.  ``F`` has ``M`` fraction bits and bias ``B`` (float32: 23, 127; float64: 52,
1023); its bits are read as a signed integer ``I`` (int32 / int64).  The format has
``m`` fraction bits, ``bias`` and ``emin = 1 - bias``.  ``z = m`` when the format has
subnormals and ``z = 0`` when it does not; ``Q = 2**(emin - z)`` is the smallest positive
value of the format (min_subnormal, or min_normal without subnormals).
``T = emin + B`` is the biased ``F``-exponent of the format's min_normal.

1. ``bits = bitcast(x, I)``; ``a = bits & (2**(W-1) - 1)`` is the magnitude, ``E = a >> M``
   its biased exponent.  ``a`` is monotone in ``|x|``, so every comparison against a
   value ``v`` is the integer comparison against ``bitcast(v)``.
2. Shift.  ``s`` is the number of low bits of ``a`` that lie below the format's quantum at
   ``|x|`` (``log2`` of format ulp / ``F`` ulp)::

       T >= 1:  s = (M - m) + clip(T - max(E, 1), 0, z)
       T <= 0:  s = M - m                                        for E >= 1 (F normals)
                s = fe - m  if fe - M + 1 >= T  else  M + T - z - 1,  clipped to [0, M]
                                                                 for E == 0 (F subnormals)

   where ``fe = floor(log2(a))`` is read from ``bitcast(float(a))`` (exact: ``a < 2**M``).
   Rounding ``a`` to a multiple of ``2**s`` (``s <= M``) is rounding ``|x|`` to the
   format's grid: the exponent field sits above the fraction, so a carry out of the kept
   bits is the step to the next binade (and from a subnormal to min_normal).
3. Tiny values ``|x| < Q`` that would need ``s > M`` have the neighbours 0 and ``Q``;
   they are decided on their own (step 5) and give ``0`` or ``bitcast(Q)``.
4. With ``step = 1 << s``, ``trunc = a & -step``, ``rem = a - trunc`` (``0 <= rem < step``)
   and ``lsb`` the last bit of the *format's* encoding of ``trunc`` (bit ``s`` of ``a``,
   with a constant correction where bit ``s`` is an exponent bit: ``m == 0``, or the
   lowest subnormal binade)::

       nearest_even      out = (a + (step/2 - 1) + lsb) & -step     (= trunc + step iff
                                                                      rem + lsb > step/2)
       nearest_toward_zero  out = trunc + step  iff  2 rem > step   (ties to the smaller
                                                                   magnitude)
       nearest_away      out = trunc + step  iff  2 rem >= step  (ties away from zero)
       toward_zero       out = trunc
       up / down         out = trunc + step  iff rem != 0 and x > 0 / x < 0
       odd               out = trunc + step  iff rem != 0 and lsb == 0   (round to odd)
       stochastic        out = trunc + step  iff  r / 2**32 < rem / step
       stochastic_equal  out = trunc + step  iff  rem != 0 and r < 2**31

   ``r`` is the caller's ``noise``: uint32 random bits, one per element.  The stochastic
   test is exact integer arithmetic: ``r < (rem << (32 - s))`` when ``s <= 32``, and
   ``r < ceil(rem / 2**(s - 32))`` when ``s > 32``; so the probability of rounding up is
   ``ceil(2**32 * rem / step) / 2**32`` (exactly ``rem / step`` whenever ``s <= 32``).
5. Tiny values: nearest rounds up iff ``|x| > Q/2`` (a tie goes to 0, the even multiple
   of ``Q``; ``nearest_away``: iff ``|x| >= Q/2``); up/down/odd/stochastic_equal as above
   with ``rem = a``; stochastic with
   ``rem / step = sig / 2**(T - z + M - max(E, 1))`` (``sig`` the significand of ``a``
   with its implicit bit), i.e. ``|x| / Q``, through the same exact test.
   Without subnormals this rounds onto the grid ``{0, min_normal}``: every mode keeps its
   rule (up never goes below x, stochastic stays unbiased, odd gives min_normal).
   pychop's ``Chop_(subnormal=False)`` differs: it rounds on the subnormal grid first and then
   sends results in ``(0, min_normal)`` to 0 or min_normal (nearest: ``>= min_normal/2``
   goes up, so the tie and values that first rounded up to ``min_normal/2`` do; stochastic
   and toward-zero: 0, so its stochastic rounding is biased there); pychop 0.6.2's
   ``Chop(subnormal=False)`` flushes every ``|x| < min_normal`` to 0 before rounding.
6. Overflow: ``out > bitcast(max_finite)`` (the grid continued above max_finite with the
   top binade's step, so nearest overflows iff ``|x| >= max_finite + ulp/2`` with ties to
   even, as IEEE 754).  ``overflow='saturate'`` gives ``max_finite`` (also for infinite
   input).  ``overflow='ieee'`` gives what the format says: ``inf`` where the format has
   one, NaN for the ``fn``/``fnuz`` formats (as ml_dtypes' casts), ``max_finite`` for the
   ``finite`` formats; the directed modes follow IEEE 754: toward_zero and odd give
   ``max_finite``, up gives ``-max_finite`` for negative overflow, down ``+max_finite``
   for positive overflow.  Infinite input is exact: ``inf`` (or NaN / max_finite, as
   above).
7. NaN in gives a quiet NaN (``F``'s canonical quiet NaN with the sign of ``x``), also for
   the ``finite`` formats, which have no NaN (ml_dtypes casts NaN there to +-0).
8. The sign bit of ``x`` is put back (``-0.0`` for a negative value that rounds to zero),
   except for ``fnuz`` formats, which have no ``-0`` and give ``+0.0``.

Format requirement: every finite value of the format must be an ``F`` number
(``m <= M`` and ``emax <= emax(F)``); otherwise pass float64 input.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

__all__ = [
    "FloatFormat",
    "FORMATS",
    "ROUNDINGS",
    "OVERFLOWS",
    "SPECIALS",
    "PYCHOP_RMODES",
    "get_format",
    "round_to_format",
]

ROUNDINGS = ("nearest_even", "up", "down", "toward_zero", "stochastic", "stochastic_equal", "odd",
             "nearest_toward_zero", "nearest_away")
OVERFLOWS = ("saturate", "ieee")
SPECIALS = ("ieee", "fn", "fnuz", "finite")
#: pychop's ``rmode`` numbers as rounding names (as pychop 0.6.2's ``Chop`` documents them).
#: 10, CADNA's random directed rounding (toward +inf or -inf with probability 1/2 each),
#: is ``stochastic_equal`` in distribution: an inexact value goes to either neighbour with
#: probability 1/2, an exact one stays.
PYCHOP_RMODES = {1: "nearest_even", 2: "up", 3: "down", 4: "toward_zero", 5: "stochastic",
                 6: "stochastic_equal", 7: "nearest_toward_zero", 8: "nearest_away", 9: "odd",
                 10: "stochastic_equal"}


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


@dataclasses.dataclass(frozen=True)
class FloatFormat:
    """A binary floating-point format: sign bit, ``exp_bits`` exponent, ``man_bits`` fraction.

    ``bias`` defaults to ``2**(exp_bits-1) - 1`` (``2**(exp_bits-1)`` for ``'fnuz'``).
    ``specials`` says what the top encodings mean:

    * ``'ieee'``: the all-ones exponent is reserved for inf / NaN (float16, float8_e5m2);
    * ``'fn'``: no inf; only all-ones exponent *and* fraction is NaN (float8_e4m3fn);
    * ``'fnuz'``: no inf, no -0; NaN is the negative-zero pattern (float8_e4m3fnuz);
    * ``'finite'``: no inf, no NaN at all (float6_e2m3fn, float4_e2m1fn; MX elements).

    ``subnormals=False`` removes the subnormals: the grid below min_normal is ``{0}``.
    ``name`` is informational (not compared).  Two formats are equal iff they round alike.
    """

    exp_bits: int
    man_bits: int
    bias: int | None = None
    specials: str = "ieee"
    subnormals: bool = True
    name: str | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self):
        e, m = self.exp_bits, self.man_bits
        if not _is_int(e) or not 1 <= e <= 11:
            raise ValueError(f"FloatFormat: exp_bits must be an integer in [1, 11]; got {e!r}.")
        if not _is_int(m) or not 0 <= m <= 52:
            raise ValueError(f"FloatFormat: man_bits (fraction bits, without the implicit "
                             f"bit) must be an integer in [0, 52]; got {m!r}.")
        if self.specials not in SPECIALS:
            raise ValueError(f"FloatFormat: specials must be one of {SPECIALS}; "
                             f"got {self.specials!r}.")
        if self.specials == "ieee" and e < 2:
            raise ValueError("FloatFormat: an 'ieee' format needs exp_bits >= 2 (its top "
                             "exponent is reserved for inf/NaN); use specials='finite'.")
        if not isinstance(self.subnormals, (bool, np.bool_)):
            raise ValueError(f"FloatFormat: subnormals must be True or False; "
                             f"got {self.subnormals!r}.")
        default_bias = 2 ** (e - 1) - (0 if self.specials == "fnuz" else 1)
        bias = default_bias if self.bias is None else self.bias
        if not _is_int(bias):
            raise ValueError(f"FloatFormat: bias must be an integer; got {bias!r}.")
        object.__setattr__(self, "exp_bits", int(e))
        object.__setattr__(self, "man_bits", int(m))
        object.__setattr__(self, "bias", int(bias))
        object.__setattr__(self, "subnormals", bool(self.subnormals))
        if self.emax > 1023 or self.emin - (m if self.subnormals else 0) < -1074:
            raise ValueError(f"FloatFormat: bias {bias} puts the format's range outside "
                             f"float64's (emax {self.emax}, emin {self.emin}); choose a "
                             f"bias near {default_bias}.")
        if self.name is None:
            name = f"e{e}m{m}" + ("" if self.specials == "ieee" else self.specials)
            if bias != default_bias:
                name += f"_b{bias}"
            if not self.subnormals:
                name += "_nosub"
            object.__setattr__(self, "name", name)

    # -- encodings -------------------------------------------------------------------------
    @property
    def bits(self) -> int:
        """Total width of an encoding: sign + exponent + fraction."""
        return 1 + self.exp_bits + self.man_bits

    @property
    def max_code(self) -> int:
        """Largest finite magnitude encoding (exponent and fraction fields, no sign)."""
        e, m = self.exp_bits, self.man_bits
        if self.specials == "ieee":
            return (((1 << e) - 1) << m) - 1
        if self.specials == "fn":
            return (1 << (e + m)) - 2
        return (1 << (e + m)) - 1

    # -- values ----------------------------------------------------------------------------
    @property
    def emax(self) -> int:
        """Unbiased exponent of max_finite."""
        return (self.max_code >> self.man_bits) - self.bias

    @property
    def emin(self) -> int:
        """Unbiased exponent of min_normal: ``1 - bias``."""
        return 1 - self.bias

    @property
    def max_finite(self) -> float:
        m = self.man_bits
        return math.ldexp((1 << m) + (self.max_code & ((1 << m) - 1)), self.emax - m)

    @property
    def min_normal(self) -> float:
        return math.ldexp(1.0, self.emin)

    @property
    def min_subnormal(self) -> float:
        """Smallest positive value (min_normal when the format has no subnormals)."""
        return math.ldexp(1.0, self.emin - (self.man_bits if self.subnormals else 0))

    @property
    def has_inf(self) -> bool:
        return self.specials == "ieee"

    @property
    def has_nan(self) -> bool:
        return self.specials != "finite"


def _fmt(name, e, m, specials="ieee", **kw):
    return name, FloatFormat(e, m, specials=specials, name=name, **kw)


#: The named formats: ml_dtypes' floating types (same names) plus float16, bfloat16, float32.
FORMATS: dict[str, FloatFormat] = dict([
    _fmt("float8_e4m3fn", 4, 3, "fn"),
    _fmt("float8_e5m2", 5, 2),
    _fmt("float8_e4m3fnuz", 4, 3, "fnuz"),
    _fmt("float8_e5m2fnuz", 5, 2, "fnuz"),
    _fmt("float8_e4m3b11fnuz", 4, 3, "fnuz", bias=11),
    _fmt("float8_e4m3", 4, 3),
    _fmt("float8_e3m4", 3, 4),
    _fmt("float6_e2m3fn", 2, 3, "finite"),
    _fmt("float6_e3m2fn", 3, 2, "finite"),
    _fmt("float4_e2m1fn", 2, 1, "finite"),
    _fmt("float16", 5, 10),
    _fmt("bfloat16", 8, 7),
    _fmt("float32", 8, 23),
])


def get_format(fmt) -> FloatFormat:
    """A ``FloatFormat`` from itself, a name in ``FORMATS``, a dtype with such a name
    (``ml_dtypes.float8_e4m3fn``, ``jnp.bfloat16``, ``np.float16``), or ``'e<E>m<M>'``
    (an IEEE-style custom format with default bias)."""
    if isinstance(fmt, FloatFormat):
        return fmt
    name = fmt if isinstance(fmt, str) else getattr(fmt, "__name__", None)
    if name is None:
        try:
            name = np.dtype(fmt).name
        except TypeError:
            name = None
    if isinstance(name, str):
        if name in FORMATS:
            return FORMATS[name]
        parts = name[1:].split("m") if name.startswith("e") else ()
        if len(parts) == 2 and all(p.isdigit() for p in parts):
            return FloatFormat(int(parts[0]), int(parts[1]))
    raise ValueError(f"unknown float format {fmt!r}: pass a FloatFormat, one of "
                     f"{sorted(FORMATS)}, or 'e<exp_bits>m<man_bits>'.")


# -- namespace helpers -------------------------------------------------------------------

def _kind(xp) -> str:
    name = getattr(xp, "__name__", "")
    if name.startswith("jax"):
        return "jax"
    if "torch" in name:
        return "torch"
    if "numpy" in name:
        return "numpy"
    raise TypeError(f"unsupported array namespace {name!r}: use jax.numpy, "
                    f"array_api_compat.numpy or array_api_compat.torch.")


def _bitcast(xp, x, dtype):
    """Reinterpret the bits of ``x`` as ``dtype`` (same width)."""
    if _kind(xp) == "jax":
        from jax import lax
        return lax.bitcast_convert_type(x, dtype)
    return x.view(dtype)


def _dtype_name(x) -> str:
    return str(x.dtype).removeprefix("torch.")


# -- the plan: every constant of one (format, compute dtype) pair, as Python ints -------------

_F_PARAMS = {32: (23, 127, np.float32, np.int32), 64: (52, 1023, np.float64, np.int64)}


def _f_bits(v: float, width: int) -> int:
    _, _, f, i = _F_PARAMS[width]
    return int(np.array(v, f).view(i))


@dataclasses.dataclass(frozen=True)
class _Plan:
    width: int
    M: int          # F fraction bits
    B: int          # F bias
    m: int          # format fraction bits
    z: int          # m with subnormals, else 0
    T: int          # F biased exponent of the format's min_normal
    shift: str      # 'const' | 'var' | 'low'
    eeff: bool      # 'var': use max(E, 1) (else E gives the same clipped shift)
    flip: int       # xor into a so that bit s is the format encoding's last bit
    tiny: bool      # some |x| < Q need the separate 0-or-Q decision
    p_q: int        # bits of Q
    p_halfq: int    # bits of Q / 2
    p_max: int      # bits of max_finite
    inf: int
    qnan: int
    sign: int
    mag: int


@functools.cache
def _plan(fmt: FloatFormat, width: int) -> _Plan:
    M, B = _F_PARAMS[width][:2]
    W = width
    m = fmt.man_bits
    fname = "float32" if width == 32 else "float64"
    if m > M or fmt.emax > B:
        why = (f"its {m} fraction bits exceed {fname}'s {M}" if m > M
               else f"its largest value 2**{fmt.emax} exceeds {fname}'s range")
        raise ValueError(f"format {fmt.name} is not representable in {fname} ({why}); "
                         f"pass float64 input.")
    z = m if fmt.subnormals else 0
    T = B + fmt.emin
    if T <= 0:
        shift = "low"
    elif T >= 2 and z > 0:
        shift = "var"
    else:
        shift = "const"
    eeff = shift == "var" and T <= m
    if m == 0:
        flip = ((T - 1) & 1) << M
    elif shift == "var" and T - m >= 2 and (T - m) % 2 == 0:
        flip = 1 << M
    else:
        flip = 0
    tiny = T - z >= 2 or (T - z == 1 and z == 0)
    p_q = (T - z) << M if tiny else 0
    if not tiny:
        p_halfq = 0
    elif T - z >= 2:
        p_halfq = (T - z - 1) << M
    else:
        p_halfq = 1 << (M - 1)
    return _Plan(
        width=W, M=M, B=B, m=m, z=z, T=T, shift=shift, eeff=eeff, flip=flip, tiny=tiny,
        p_q=p_q, p_halfq=p_halfq, p_max=_f_bits(fmt.max_finite, W),
        inf=((1 << (W - 1 - M)) - 1) << M, qnan=((1 << (W - M)) - 1) << (M - 1),
        sign=-(1 << (W - 1)), mag=(1 << (W - 1)) - 1,
    )


# -- the routine -------------------------------------------------------------------------

def _noise_bits(xp, kind, noise, x, width):
    """The caller's uint32 noise as an integer array in which ``>>`` is a logical shift:
    uint32 (JAX / NumPy, float32 compute) or int64 (float64 compute, and Torch, whose
    uint32 has no arithmetic)."""
    if noise is None:
        raise ValueError("stochastic rounding needs noise: uint32 random bits of x's shape, "
                         "e.g. noise=jax.random.bits(key, x.shape, jnp.uint32).")
    noise = xp.asarray(noise)
    name = _dtype_name(noise)
    ok = name == "uint32" or (kind == "torch" and name == "int64")
    if not ok:
        raise TypeError(f"noise must be uint32 random bits (torch: torch.uint32, or int64 "
                        f"holding values in [0, 2**32)); got dtype {name}.")
    if tuple(noise.shape) != tuple(x.shape):
        raise ValueError(f"noise must have x's shape {tuple(x.shape)}; "
                         f"got {tuple(noise.shape)}.")
    if kind == "torch" or width == 64:
        return xp.astype(noise, xp.int64)
    return noise


def _noise_up(xp, r, num, sh, sh_over_32: bool):
    """``r / 2**32 < num / 2**sh``, exactly, for ``0 <= num < 2**sh``.

    ``r`` is the noise array (``_noise_bits``); ``num`` and ``sh`` are arrays of the
    compute's signed integer type (``sh`` may be a Python int); ``sh_over_32`` says whether
    ``sh`` can exceed 32.  For ``sh <= 32`` the test is ``r < num << (32 - sh)``; above,
    ``r < ceil(num / 2**(sh - 32))``.  Shift counts are clipped to the type's width, which
    changes no result (``num == 0`` is never up; ``num >> 31`` is 0 for float32's ``num``)."""
    nd = r.dtype
    numu = xp.astype(num, nd)
    lim = 31 if _dtype_name(r) == "uint32" else 63
    if isinstance(sh, int):
        c = numu << min(32 - sh, 31) if sh <= 32 else ((numu - 1) >> min(sh - 32, lim)) + 1
        return (num != 0) & (r < c)
    c = numu << xp.astype(xp.clip(32 - sh, 0, 31), nd)
    if sh_over_32:
        c2 = ((numu - 1) >> xp.astype(xp.clip(sh - 32, 0, lim), nd)) + 1
        c = xp.where(sh <= 32, c, c2)
    return (num != 0) & (r < c)


def round_to_format(xp, x, fmt, *, rounding: str = "nearest_even", overflow: str = "saturate",
                    noise=None):
    """Round ``x`` to the grid of the floating-point format ``fmt``.

    Args:
      xp: the array namespace (``jax.numpy``, ``array_api_compat.numpy`` or
        ``array_api_compat.torch``).
      x: float16 / bfloat16 / float32 / float64 array.
      fmt: a ``FloatFormat`` or anything ``get_format`` accepts (``'float8_e4m3fn'``).
      rounding: one of ``ROUNDINGS``: ``'nearest_even'``, ``'up'`` (toward +inf),
        ``'down'`` (toward -inf), ``'toward_zero'``, ``'stochastic'`` (up with probability
        proportional to the distance from the lower neighbour; pychop rmode 5),
        ``'stochastic_equal'`` (either neighbour with probability 1/2 when x is not on
        the grid; pychop rmode 6), ``'odd'`` (round to odd: if inexact, the neighbour
        whose encoding is odd), ``'nearest_toward_zero'`` / ``'nearest_away'`` (nearest,
        ties to the smaller / larger magnitude; pychop rmodes 7 and 8).
      overflow: ``'saturate'`` (beyond max_finite, inf included, gives +-max_finite) or
        ``'ieee'`` (what the format says, see the module docstring).
      noise: for the stochastic roundings, uint32 random bits of ``x``'s shape
        (``jax.random.bits(key, x.shape, jnp.uint32)``; torch: ``torch.uint32`` or int64
        in ``[0, 2**32)``).  Ignored by the other roundings.

    Returns:
      An array of ``x``'s shape in the compute dtype (float64 for float64 input, float32
      otherwise) whose values lie on ``fmt``'s grid (or are +-inf / NaN as above).
    """
    fmt = get_format(fmt)
    if rounding not in ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}; use one of {ROUNDINGS}.")
    if overflow not in OVERFLOWS:
        raise ValueError(f"unknown overflow {overflow!r}; use one of {OVERFLOWS}.")
    kind = _kind(xp)
    x = xp.asarray(x)
    name = _dtype_name(x)
    if name in ("float16", "bfloat16"):
        x = xp.astype(x, xp.float32)
    elif name not in ("float32", "float64"):
        raise TypeError(f"round_to_format needs a floating-point array (float16, bfloat16, "
                        f"float32 or float64); got dtype {name}. Convert it first, "
                        f"e.g. x.astype(float32).")
    width = 64 if name == "float64" else 32
    p = _plan(fmt, width)
    F = xp.float64 if width == 64 else xp.float32
    Ity = xp.int64 if width == 64 else xp.int32
    M, m = p.M, p.m
    stochastic = rounding in ("stochastic", "stochastic_equal")
    r = _noise_bits(xp, kind, noise, x, width) if stochastic else None

    bits = _bitcast(xp, x, Ity)
    a = bits & p.mag
    neg = bits < 0

    # -- step 2: the shift ------------------------------------------------------------------
    E = None
    if p.shift == "const":
        s = M - m
    elif p.shift == "var":
        E = a >> M
        Ee = xp.maximum(E, 1) if p.eeff else E
        s = xp.clip(p.T - Ee, 0, m) + (M - m)
    else:  # 'low': only F subnormals (E == 0) can lie below the format's min_normal
        E = a >> M
        fe = (_bitcast(xp, xp.astype(a, F), Ity) >> M) - p.B
        s_sub = xp.where(fe - M + 1 >= p.T, fe - m, M + p.T - p.z - 1)
        s = xp.where(E == 0, xp.clip(s_sub, 0, M), M - m)
    const = isinstance(s, int)

    # -- step 4: the increment on the grid ----------------------------------------------------
    step = 1 << s
    lsb = None
    if rounding in ("nearest_even", "odd"):
        if p.shift == "low" and m == 0:
            # exponent parity of the format's encoding for E == 0 values in its normal range
            fe_par = (fe - M + 1 - p.T + 1) & 1
            bit = ((a ^ p.flip) >> s) & 1
            lsb = xp.where((E == 0) & (fe - M + 1 >= p.T), fe_par, bit)
        else:
            lsb = (((a ^ p.flip) if p.flip else a) >> s) & 1
    if rounding == "nearest_even":
        if const and s == 0:
            out = a
        elif not const and m == M:  # s can be 0: the rem comparison form
            rem = a & (step - 1)
            out = xp.where(2 * rem + lsb > step, (a - rem) + step, a - rem)
        else:
            out = (a + ((step >> 1) - 1) + lsb) & -step
    else:
        trunc = a & -step
        if rounding == "toward_zero":
            out = trunc
        else:
            rem = a - trunc
            if rounding == "up":
                inc = (rem != 0) & ~neg
            elif rounding == "down":
                inc = (rem != 0) & neg
            elif rounding == "odd":
                inc = (rem != 0) & (lsb == 0)
            elif rounding == "nearest_toward_zero":
                inc = 2 * rem > step
            elif rounding == "nearest_away":
                inc = 2 * rem >= step
            elif rounding == "stochastic_equal":
                inc = (rem != 0) & ((r >> 31) == 0)
            else:
                inc = _noise_up(xp, r, rem, s, M > 32)
            out = xp.where(inc, trunc + step, trunc)

    # -- steps 3 and 5: |x| < Q -------------------------------------------------------------
    if p.tiny:
        tiny = a < p.p_q
        if rounding in ("nearest_even", "nearest_toward_zero"):
            up_t = a > p.p_halfq
        elif rounding == "nearest_away":
            up_t = a >= p.p_halfq
        elif rounding == "toward_zero":
            up_t = None
        elif rounding == "up":
            up_t = (a != 0) & ~neg
        elif rounding == "down":
            up_t = (a != 0) & neg
        elif rounding == "odd":
            up_t = a != 0
        elif rounding == "stochastic_equal":
            up_t = (a != 0) & ((r >> 31) == 0)
        else:
            if E is None:
                E = a >> M
            sig = xp.where(E != 0, (a & ((1 << M) - 1)) | (1 << M), a)
            s_true = (p.T - p.z + M) - xp.maximum(E, 1)
            up_t = _noise_up(xp, r, sig, s_true, True)
        if up_t is None:
            out = xp.where(tiny, 0, out)
        else:
            out = xp.where(tiny & up_t, p.p_q, xp.where(tiny, 0, out))

    # -- step 6: overflow -------------------------------------------------------------------
    ovf = out > p.p_max
    if overflow == "saturate" or fmt.specials == "finite":
        out = xp.where(ovf, p.p_max, out)
    else:
        special = p.inf if fmt.specials == "ieee" else p.qnan
        if rounding in ("nearest_even", "nearest_toward_zero", "nearest_away", "stochastic",
                        "stochastic_equal"):
            out = xp.where(ovf, special, out)
        else:
            if rounding == "up":
                to_special = ~neg | (a == p.inf)
            elif rounding == "down":
                to_special = neg | (a == p.inf)
            else:  # toward_zero, odd: only an infinite input stays infinite
                to_special = a == p.inf
            out = xp.where(ovf & to_special, special, xp.where(ovf, p.p_max, out))

    # -- steps 7 and 8: NaN, sign -------------------------------------------------------------
    out = xp.where(a > p.inf, p.qnan, out)
    res = out | (bits & p.sign)
    if fmt.specials == "fnuz":
        res = xp.where(out == 0, out, res)
    return _bitcast(xp, res, F)
