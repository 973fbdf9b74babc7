"""Float, fixed-point and MX grids on NumPy, Torch and JAX arrays.

The pipelines compose ``core.floatgrid`` / ``core.fixedpoint`` / ``core.blockscale``
(``mx_fake_quant``, the core's MX rule) against ``xp``; ``engine.run`` runs them as one
jitted XLA kernel on NumPy arrays and Torch CPU tensors (or with ``array_api_compat`` op by
op elsewhere), and the JAX functions call the same pipelines jitted with ``jax.numpy``
(traceable: they work inside ``jax.jit``).  Every framework gets the same bits.

* ``round_float(fw, x, fmt, rounding=, overflow=, key=)``: ``floatgrid.round_to_format``
  (``fmt`` a ``FloatFormat``) or ``fixedpoint.round_to_fixed`` (``fmt`` a
  ``FixedFormat``), returned in ``x``'s dtype.  Every value of the format must be a value
  of ``x``'s dtype (``ValueError`` otherwise, naming the dtype to convert to): no double
  rounding.
* ``mx(fw, x, grid)``: flatten, pad with zeros to a multiple of ``grid.block_size``,
  ``blockscale.mx_fake_quant`` with the grid's MX spec (``grid.spec``: blocks along the last
  axis, E8M0 scales) and element format, back to ``x``'s shape; float32 for float16 /
  bfloat16 input (an MX value needs float32's range), else ``x``'s dtype.

Stochastic roundings draw their uint32 noise from a JAX PRNG key inside the kernel:
``jax.random.bits(key, x.shape, uint32)``, so a key gives the same bits on every
framework (the ``xp`` engine computes the same bits with JAX on the CPU and moves them
to the array's device).  There is no hidden generator: a key is always passed.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import array_api_compat
import jax
import jax.numpy as jnp
import numpy as np

from ..core import blockscale, fixedpoint, floatgrid, validation
from ..core.spec import QuantSpec
from . import engine

__all__ = [
    "MXGrid",
    "round_pipeline",
    "mx_pipeline",
    "key_data",
    "round_float",
    "mx",
    "format_fits",
]

_DTYPE_GRID = {  # dtype -> (fraction bits, emax, emin): every value k * 2**q with
    "float16": (10, 15, -14),  # q >= emin - fraction bits and k < 2**(fraction bits + 1)
    "bfloat16": (7, 127, -126),
    "float32": (23, 127, -126),
    "float64": (52, 1023, -1022),
}


@dataclasses.dataclass(frozen=True)
class MXGrid:
    """An MX configuration: element grid, block size, scale exponent bits (E8M0: 8)."""

    element: floatgrid.FloatFormat | fixedpoint.FixedFormat
    block_size: int = 32
    scale_bits: int = 8

    def __post_init__(self):
        bs, sb = self.block_size, self.scale_bits
        if not isinstance(bs, (int, np.integer)) or isinstance(bs, bool) or bs < 1:
            raise ValueError(f"block_size must be a positive integer; got {bs!r}.")
        if not isinstance(sb, (int, np.integer)) or isinstance(sb, bool) or not 2 <= sb <= 10:
            raise ValueError(f"scale exponent bits must be an integer in [2, 10] (E8M0: 8); "
                             f"got {sb!r}.")

    @property
    def spec(self) -> QuantSpec:
        """The core's MX ``QuantSpec`` of this grid (blocks of ``block_size`` along the last
        axis, E8M0 scales); a named OCP element format is its ``dtype``, any other
        element is passed to ``blockscale.mx_fake_quant`` as ``element=``."""
        name = getattr(self.element, "name", None)
        if name in floatgrid.FORMATS and floatgrid.FORMATS[name] == self.element:
            return QuantSpec(dtype=name, axis=-1, group_size=int(self.block_size),
                             scale_dtype="float8_e8m0fnu")
        return QuantSpec(bits=8, symmetric=True, axis=-1, group_size=int(self.block_size),
                         scale_dtype="float8_e8m0fnu")


def _grid(fmt):
    """(fraction bits, emax, finest exponent) of a float or fixed format."""
    if isinstance(fmt, fixedpoint.FixedFormat):
        return fmt.bits - 1, fmt.ibits - 1, -fmt.fbits
    m = fmt.man_bits
    return m, fmt.emax, fmt.emin - m


def format_fits(fmt, dtype_name: str) -> bool:
    """Whether every finite value of ``fmt`` (a ``FloatFormat`` or ``FixedFormat``) is a
    value of the float dtype ``dtype_name``."""
    m, emax, q = _grid(fmt)
    dm, demax, demin = _DTYPE_GRID[dtype_name]
    return m <= dm and emax <= demax and q >= demin - dm


def _is_jax(xp) -> bool:
    return getattr(xp, "__name__", "").startswith("jax")


def _noise(xp, seed, x):
    """uint32 bits of ``x``'s shape from a threefry key's data ``seed`` (int32, (2,))."""
    if _is_jax(xp):
        key = jax.random.wrap_key_data(jax.lax.bitcast_convert_type(seed, jnp.uint32))
        return jax.random.bits(key, tuple(x.shape), jnp.uint32)
    # the xp engine: the same bits, computed by JAX on the CPU, then on x's device
    host = np.asarray(seed.cpu() if hasattr(seed, "cpu") else seed).astype(np.int32)
    with jax.default_device(jax.devices("cpu")[0]):
        bits = np.asarray(jax.random.bits(
            jax.random.wrap_key_data(jnp.asarray(host.view(np.uint32))), tuple(x.shape),
            jnp.uint32))
    if hasattr(x, "device") and not isinstance(x, np.ndarray):  # torch: int64 noise
        return xp.asarray(bits.astype(np.int64), device=x.device)
    return bits


def _compute_dtype(xp, x):
    name = str(x.dtype).removeprefix("torch.")
    return x if name in ("float32", "float64") else xp.astype(x, xp.float32)


def round_pipeline(xp, x, *rest, rounding, overflow):
    """-> ``x`` rounded to the format (the last positional argument) in ``x``'s dtype;
    ``rest`` = (key data, format) for the stochastic roundings, else (format,)."""
    *seed, fmt = rest
    noise = _noise(xp, seed[0], x) if seed else None
    if isinstance(fmt, fixedpoint.FixedFormat):
        y = fixedpoint.round_to_fixed(xp, x, fmt, rounding=rounding, noise=noise)
    else:
        y = floatgrid.round_to_format(xp, x, fmt, rounding=rounding, overflow=overflow,
                                      noise=noise)
    return (y if y.dtype == x.dtype else xp.astype(y, x.dtype),)


def mx_pipeline(xp, x, grid: MXGrid):
    """-> MX-quantized values of ``x`` (blocks of the flattened array, zero-padded)."""
    shape, n, bs = tuple(x.shape), math.prod(x.shape), grid.block_size
    flat = xp.reshape(_compute_dtype(xp, x), (-1,))
    pad = -n % bs
    if pad:
        flat = xp.concat([flat, xp.zeros((pad,), dtype=flat.dtype)])
    blocks = xp.reshape(flat, (-1, bs))
    spec = grid.spec
    element = None if spec.dtype is not None else grid.element
    y = blockscale.mx_fake_quant(xp, blocks, spec, element=element, scale_bits=grid.scale_bits)
    y = xp.reshape(y, (-1,))
    if pad:
        y = y[:n]
    return (xp.reshape(y, shape),)


# -- JAX: the pipelines jitted with jax.numpy ---------------------------------------------
@functools.partial(jax.jit, static_argnames=("pipeline", "spec", "options"))
def _jax_kernel(arrays, pipeline, spec, options):
    return pipeline(jnp, *arrays, spec, **dict(options))


def _run(fw: engine.Framework, pipeline, arrays, spec, **options):
    if fw.name == "jax":
        return _jax_kernel(tuple(arrays), pipeline, spec, tuple(sorted(options.items())))
    return engine.run(fw, pipeline, tuple(arrays), spec, **options)


def key_data(key):
    """A JAX PRNG key (typed, or raw uint32 ``(2,)`` threefry data) as int32 ``(2,)`` data
    (a JAX array, or NumPy for NumPy key data)."""
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    if not isinstance(key, (jax.Array, np.ndarray)):
        raise TypeError(f"key must be a JAX PRNG key (jax.random.key(seed)); got an object "
                        f"of type {type(key).__name__}.")
    if tuple(key.shape) != (2,) or str(key.dtype) not in ("uint32", "int32"):
        raise ValueError(f"key must be a JAX threefry PRNG key (jax.random.key(seed), or "
                         f"the uint32 data of one, shape (2,)); got shape "
                         f"{tuple(key.shape)}, dtype {key.dtype}.")
    if isinstance(key, jax.Array):
        return jax.lax.bitcast_convert_type(key, jnp.int32)
    return key.view(np.int32)


def _check_input(fw: engine.Framework, x, what: str) -> None:
    validation.require_framework(x, fw.name, what)
    validation.require_float(fw.is_float(x), x.dtype, what)


def round_float(fw: engine.Framework, x, fmt, *, rounding: str = "nearest_even",
                overflow: str = "ieee", key=None):
    """``x`` rounded to ``fmt`` (``FloatFormat`` / ``FixedFormat``), in ``x``'s dtype.

    Raises:
      TypeError: ``x`` is not a float array of ``fw``.
      ValueError: an unknown rounding / overflow, a stochastic rounding without ``key``,
        or a format with values ``x``'s dtype does not have.
    """
    _check_input(fw, x, "round_float")
    if rounding not in floatgrid.ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}; use one of {floatgrid.ROUNDINGS}.")
    if overflow not in floatgrid.OVERFLOWS:
        raise ValueError(f"unknown overflow {overflow!r}; use one of {floatgrid.OVERFLOWS}.")
    dtype = str(x.dtype).removeprefix("torch.")
    if dtype not in _DTYPE_GRID:
        raise TypeError(f"round_float needs float16, bfloat16, float32 or float64 input; "
                        f"got {dtype}.")
    if not format_fits(fmt, dtype):
        wider = "float64" if dtype == "float32" or format_fits(fmt, "float32") is False \
            else "float32"
        raise ValueError(f"the format {getattr(fmt, 'name', None) or fmt} has values that "
                         f"{dtype} cannot hold (the result keeps x's dtype); convert x to "
                         f"{wider} first.")
    arrays = [x]
    if rounding in ("stochastic", "stochastic_equal"):
        if key is None:
            raise ValueError(f"rounding={rounding!r} needs a key (jax.random.key(seed)).")
        seed = key_data(key)
        if fw.name != "jax":  # the framework's own array (concrete key data)
            seed = fw.xp.asarray(np.array(seed), device=array_api_compat.device(x))
        arrays.append(seed)
    return _run(fw, round_pipeline, arrays, fmt, rounding=rounding, overflow=overflow)[0]


def mx(fw: engine.Framework, x, grid: MXGrid):
    """MX quantize-dequantize of ``x`` (see ``mx_pipeline``); float32 for float16 /
    bfloat16 input, else ``x``'s dtype."""
    _check_input(fw, x, "mx_quantize")
    if not isinstance(grid, MXGrid):
        raise TypeError(f"mx needs an MXGrid; got {type(grid).__name__}.")
    return _run(fw, mx_pipeline, [x], grid)[0]
