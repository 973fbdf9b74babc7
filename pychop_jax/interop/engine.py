"""The core's formulas on other frameworks' arrays: what the NumPy and Torch adapters share.

``interop.numpy`` and ``interop.torch`` are this module applied to a ``Framework``:
how to recognise that framework's arrays, how to hand them to XLA and back, and the
four operations a quantizer object delegates to (``interop.jax`` is the same concept
for JAX arrays, on the JAX API).  The rest
is written once here: the argument checks (the messages of ``validation``, the same as
``ops`` raises) and the *pipelines*, short compositions of ``numerics`` functions
written against an array namespace ``xp``.  No formula lives here.

Two engines run a pipeline, and give the same bits (tested):

* **XLA** (arrays JAX can read in place: NumPy arrays, Torch CPU tensors).  The buffer
  is handed to the jitted kernel as a NumPy array (a tensor's ``.numpy()`` view),
  which XLA:CPU reads without a copy when it is 64-byte aligned (Torch's allocations
  are; NumPy's are not, so large NumPy inputs are first copied into an aligned buffer,
  faster than XLA's own copy).  One kernel runs the whole pipeline (XLA fuses it
  into one pass over the data, two when a range is reduced first; for calibrate /
  quantize / dequantize it is the JAX API's own compiled kernel), and the results
  come back: zero-copy DLPack tensors for Torch, ordinary writable arrays (one copy of
  the output) for NumPy.  float64 (and int64) input runs under ``jax.enable_x64``,
  so it is computed in float64 whatever the global setting.
* **xp** (everything else, e.g. CUDA tensors): the pipeline called with
  ``array_api_compat``'s namespace on the array's own device.  Every formula step is
  then a pass over memory, slower on CPU than the fused XLA kernel
  (``docs/performance.md``).

Eager checks (``docs/numerics.md``, errors): wrong framework or non-float input ->
``TypeError``;
empty input, NaN / +-inf, a bad axis or a state that does not fit -> ``ValueError``.
The NaN / inf check costs nothing in calibration (``nonfinite='flag'`` makes the range
itself non-finite) and one fused reduction in ``quantize`` / ``fake_quant``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..core import encodings, numerics, ops, validation, xla_cpu
from ..core.spec import QuantSpec, join_bounds, split_bounds
from ..core.state import QuantState

__all__ = [
    "Framework",
    "prepare",
    "run",
    "check_range_input",
    "raise_nonfinite",
    "calibrate",
    "observe",
    "qparams",
    "quantize",
    "dequantize",
    "fake_quant",
    "range_is_finite",
    "all_finite",
    "calibrate_pipeline",
    "observe_pipeline",
    "qparams_pipeline",
    "quantize_pipeline",
    "dequantize_pipeline",
    "fake_quant_pipeline",
    "FLOAT_MASK_MAX",
]


@dataclasses.dataclass(frozen=True)
class Framework:
    """How the adapters see one array framework.

    Attributes:
      name: ``'numpy'`` or ``'torch'``, as ``validation.framework_of`` names it.
      xp: the framework's ``array_api_compat`` namespace (the xp engine).
      to_xla: an array as the XLA kernel takes it (a NumPy array or a ``jax.Array``).
      from_jax: a JAX result as the framework's array.
      on_xla: whether the XLA engine can read an array (else the xp engine runs).
      is_float / is_integer: dtype tests for the checks.
      is_wide: whether an array has a 64-bit dtype (run under ``jax.enable_x64``).
    """

    name: str
    xp: Any
    to_xla: Callable
    from_jax: Callable
    on_xla: Callable[[Any], bool]
    is_float: Callable[[Any], bool]
    is_integer: Callable[[Any], bool]
    is_wide: Callable[[Any], bool]

    def portable(self) -> Framework:
        """This framework with the XLA engine switched off (the xp engine always)."""
        return dataclasses.replace(self, on_xla=lambda a: False)

    # -- what a quantizer object (pychop's Chopi) delegates to ---------------------------
    def calibrate(self, x, spec: QuantSpec) -> QuantState:
        """``QuantState`` of this framework's arrays (``pychop_jax.calibrate``)."""
        return calibrate(self, x, spec)

    def quantize(self, x, state: QuantState, *, check: bool = True):
        """Integer codes (``pychop_jax.quantize``)."""
        return quantize(self, x, state, check=check)

    def dequantize(self, q, state: QuantState):
        """Floats in the scale's dtype (``pychop_jax.dequantize``)."""
        return dequantize(self, q, state)

    def fake_quant(self, x, state: QuantState, *, check: bool = True):
        """``dequantize(quantize(x))`` in ``x``'s dtype (``pychop_jax.fake_quant``)."""
        return fake_quant(self, x, state, check=check)[0]

    def is_traced(self, x) -> bool:
        """Whether ``x`` is a placeholder of a program being traced (JAX only)."""
        return False

    def current_trace(self):
        """The JAX trace being recorded now, or ``None`` (always ``None`` but for JAX)."""
        return None


@functools.cache
def _on_cpu():
    """A context that makes JAX's CPU the default device (for the NumPy arguments of
    the XLA kernels).  A no-op where it already is: the default device is part of
    jit's cache key, and an unchanged one lets the adapters share the JAX API's
    compiled kernels."""
    if jax.default_backend() == "cpu":
        return contextlib.nullcontext
    return functools.partial(jax.default_device, jax.devices("cpu")[0])


# -- pipelines: compositions of numerics, run by either engine ---------------------------
# Each takes (xp, *arrays, spec, **options) and returns a tuple of arrays (or None);
# adapters compose them into their own pipelines (torch_backend's observer step).
range_is_finite = numerics.range_is_finite


def all_finite(xp, x, check: bool):
    """``numerics.all_finite`` when ``check``, else ``None``."""
    return numerics.all_finite(xp, x) if check else None


def calibrate_pipeline(xp, x, spec):
    """-> scale, zero_point, whether ``x`` was finite, tensor scale (``None`` but for
    two-level specs)."""
    lo, hi = numerics.calibration_range(xp, x, spec, nonfinite="flag")
    tensor_scale = numerics.tensor_scale_from_range(xp, lo, hi, spec)
    scale, zero_point = numerics.qparams_from_range(xp, lo, hi, spec, tensor_scale)
    return scale, zero_point, range_is_finite(xp, lo, hi), tensor_scale


def observe_pipeline(xp, x, spec):
    """-> lo, hi (state-shaped), whether ``x`` was finite."""
    lo, hi = numerics.observe_range(xp, x, spec, nonfinite="flag")
    return lo, hi, range_is_finite(xp, lo, hi)


def qparams_pipeline(xp, lo, hi, spec):
    """-> scale, zero_point of a range."""
    return numerics.qparams_from_range(xp, lo, hi, spec)


def quantize_pipeline(xp, x, scale, zero_point, spec, *, check):
    """-> codes, whether ``x`` was finite (``None`` without ``check``)."""
    return numerics.quantize(xp, x, scale, zero_point, spec), all_finite(xp, x, check)


def quantize_bits_pipeline(xp, x, scale, zero_point, spec, *, check):
    """-> codes as uint8 bit patterns (``encodings.codes_as_bits``: a float format the
    framework has no dtype for, fp4 in Torch), whether ``x`` was finite."""
    q = numerics.quantize(xp, x, scale, zero_point, spec)
    return encodings.codes_as_bits(xp, q, spec), all_finite(xp, x, check)


def dequantize_pipeline(xp, q, scale, zero_point, spec):
    """-> floats."""
    return (numerics.dequantize(xp, q, scale, zero_point, spec),)


#: clip masks of this many elements and more are uint8 instead of x's float dtype
FLOAT_MASK_MAX = 1 << 20


def fake_quant_pipeline(xp, x, scale, zero_point, spec, *, check, mask):
    """-> fake-quantized ``x`` (its dtype), clip mask (or ``None``), finiteness.

    The mask is 1 / 0 in a dtype Torch multiplies a gradient by quickly (a bool mask
    takes Torch's slow type-promoting path): ``x``'s float dtype below
    ``FLOAT_MASK_MAX`` elements, uint8 from there on (a quarter of the bytes; large
    float masks made whole processes fall into slow fresh-page allocation).
    Measurements: ``docs/performance.md``.
    """
    y = numerics.fake_quant(xp, x, scale, zero_point, spec)
    inside = None
    if mask:
        dtype = y.dtype if math.prod(x.shape) < FLOAT_MASK_MAX else xp.uint8
        inside = xp.astype(numerics.clip_mask(xp, x, scale, zero_point, spec), dtype)
    return y, inside, all_finite(xp, x, check)


# -- engines ----------------------------------------------------------------------------------
def _pipeline_kernel(arrays, bounds, pipeline, structure, options):
    # bounds as data: one compilation per spec *structure* serves every bit width
    # (a spec that is not a QuantSpec, e.g. a FloatFormat, is static as a whole)
    spec = structure if bounds is None else join_bounds(structure, bounds)
    return pipeline(jnp, *arrays, spec, **dict(options))


#: the compiled pipeline kernel for some arrays: one XLA task below
#: ``xla_cpu.ONE_TASK_MAX`` elements (these kernels run inside other frameworks'
#: programs, whose thread pools still spin on the other cores)
_kernel_for = xla_cpu.jit_by_size(_pipeline_kernel, ("pipeline", "structure", "options"))


# Pipelines the JAX API has compiled kernels for (the same numerics calls in the same
# order): the XLA engine runs those, so pychop_jax.* and the adapters share compiled
# executables instead of compiling twice per spec structure.
_OPS_KERNELS = {
    calibrate_pipeline: lambda x, bounds, structure: ops.calibrate_kernel(
        x, bounds, structure, nonfinite="flag"),
    quantize_pipeline: lambda x, scale, zero_point, bounds, structure, check: (
        ops.quantize_kernel(x, scale, zero_point, None, bounds, structure, check)),
    dequantize_pipeline: lambda q, scale, zero_point, bounds, structure: (
        ops.dequantize_kernel(q, scale, zero_point, bounds, structure, scale.dtype),),
}


def prepare(fw: Framework, pipeline, arrays, spec, *, to_host=(), **options):
    """``run`` for arrays like ``arrays`` (the same engine, shapes and dtypes), with all
    that depends only on those worked out once: a callable ``(*arrays) -> results``.

    ``spec`` is a ``QuantSpec`` (its bounds go to the kernel as data) or any other
    hashable description of the pipeline's grid (a ``FloatFormat``), static in the kernel.

    For callers that run the same pipeline many times (``TorchChopi``'s training step
    keeps one per input signature): inside a training step, where the caches are full
    of the model's data, each Python operation around the kernel costs more than in a
    loop of its own (``docs/performance.md``), and this leaves only the conversions and
    the kernel call.
    """
    if not all(fw.on_xla(a) for a in arrays):
        def call_xp(*arrays):
            # NumPy warns about the saturating products the formulas clip on purpose
            with np.errstate(all="ignore"):
                return pipeline(fw.xp, *arrays, spec, **options)
        return call_xp

    if isinstance(spec, QuantSpec):
        bounds, structure = split_bounds(spec)
    else:  # any other hashable description (a float format) is a static argument
        bounds, structure = None, spec
    if pipeline in _OPS_KERNELS:
        ops_kernel = _OPS_KERNELS[pipeline]

        def launch(args):
            return ops_kernel(*args, bounds, structure, **options)
    else:
        kernel, static = _kernel_for(arrays), tuple(sorted(options.items()))

        def launch(args):
            return kernel(args, bounds, pipeline, structure, static)

    wide = any(fw.is_wide(a) for a in arrays)
    on_cpu = _on_cpu()
    to_xla, from_jax = fw.to_xla, fw.from_jax

    def call_xla(*arrays):
        # (no block_until_ready: a DLPack export and np.asarray wait for the result)
        with jax.enable_x64(True) if wide else contextlib.nullcontext(), on_cpu():
            out = launch(tuple(map(to_xla, arrays)))
        return tuple(None if o is None else np.asarray(o) if i in to_host else from_jax(o)
                     for i, o in enumerate(out))
    return call_xla


def run(fw: Framework, pipeline, arrays, spec, *, to_host=(), **options):
    """``pipeline(xp, *arrays, spec, **options)`` on the engine that can read ``arrays``.

    ``pipeline`` returns a tuple of arrays (or ``None``s); they come back as ``fw``'s
    arrays, except that the XLA engine returns the outputs at the positions in
    ``to_host`` as read-only NumPy arrays: small results the caller reads on the
    host (each Torch DLPack import has a fixed cost).  ``options`` must be
    hashable (they are static in the XLA kernel).
    """
    return prepare(fw, pipeline, arrays, spec, to_host=to_host, **options)(*arrays)


# -- checks -----------------------------------------------------------------------------------
def _require_float_input(fw: Framework, x, what: str) -> None:
    validation.require_framework(x, fw.name, what)
    validation.require_float(fw.is_float(x), x.dtype, what)


def raise_nonfinite(fw: Framework, x, what: str):
    """``ValueError`` naming the NaN / inf counts of ``x`` (call when a check failed)."""
    xp = fw.xp
    validation.require_finite(int(xp.sum(xp.isnan(x))), int(xp.sum(xp.isinf(x))), what)


def _fitted(fw: Framework, shape, state: QuantState, what: str):
    """The state's arrays, checked (and for per-tensor, reshaped) to fit ``shape``; a
    non-finite or non-positive scale is rejected (``validation.fitted_state``).  A
    two-level state's scale comes back as its ``numerics.effective_scale`` (the same
    bits the JAX kernels compute), so the pipelines see one scale."""
    if isinstance(state, QuantState):
        validation.require_framework(state.scale, fw.name, f"{what} (the state's scale)")
    xp = fw.xp

    def widen(s):
        return s if s.dtype in (xp.float32, xp.float64) else xp.astype(s, xp.float32)

    scale, zero_point = validation.fitted_state(
        state, tuple(shape), what, xp.reshape,
        is_valid=lambda s: bool(numerics.valid_scale(xp, s)), widen=widen)
    if state.tensor_scale is not None:
        t = xp.reshape(widen(state.tensor_scale), (1,) * len(shape))
        scale = numerics.effective_scale(xp, scale, t)
    return scale, zero_point


def _require_codes(fw: Framework, q, spec: QuantSpec) -> None:
    """``TypeError`` unless ``q`` holds ``spec``'s codes (integer codes; a float element
    format's own dtype, or its uint8 bit patterns where the framework has no such dtype)."""
    if spec.element_format is not None and not numerics.has_code_dtype(fw.xp, spec):
        if str(q.dtype).removeprefix("torch.") != "uint8":
            raise TypeError(f"dequantize: {fw.name} has no {spec.code_dtype.name} dtype, so "
                            f"its {spec.dtype} codes are uint8 bit patterns (what quantize "
                            f"returns); got {q.dtype} codes.")
    elif spec.element_format is None or spec.code_dtype.name == "uint8":
        validation.require_integer_codes(fw.is_integer(q), q.dtype)
    elif str(q.dtype).removeprefix("torch.") != spec.code_dtype.name:
        validation.require_codes(np.float32, spec)  # raises with the expected dtype


def check_range_input(fw: Framework, x, spec: QuantSpec, what: str) -> None:
    """The checks of calibration input: a spec, a float array of ``fw``, not empty,
    an axis (and group size) that fits."""
    validation.require_spec(spec, what)
    _require_float_input(fw, x, what)
    validation.require_nonempty(math.prod(x.shape), what)
    spec.scale_shape(tuple(x.shape))  # axis and group-size errors


# -- the eager entry points -----------------------------------------------------------------
def calibrate(fw: Framework, x, spec: QuantSpec) -> QuantState:
    """``QuantState`` (arrays of ``fw``) of ``x``; see ``pychop_jax.calibrate``."""
    check_range_input(fw, x, spec, "calibrate")
    scale, zero_point, ok, tensor_scale = run(fw, calibrate_pipeline, (x,), spec)
    if not bool(ok):
        raise_nonfinite(fw, x, "calibrate")
    return QuantState(scale=scale, zero_point=zero_point, spec=spec, tensor_scale=tensor_scale)


def observe(fw: Framework, x, spec: QuantSpec, what: str = "observe"):
    """``(lo, hi)`` of ``x`` (state-shaped, compute dtype): ``numerics.observe_range``
    over finite input (non-finite input raises)."""
    check_range_input(fw, x, spec, what)
    lo, hi, ok = run(fw, observe_pipeline, (x,), spec)
    if not bool(ok):
        raise_nonfinite(fw, x, what)
    return lo, hi


def qparams(fw: Framework, lo, hi, spec: QuantSpec):
    """``(scale, zero_point)`` of a range with ``lo <= 0 <= hi``:
    ``numerics.qparams_from_range`` (two-level specs: the block scales relative to the
    range's own tensor scale, ``numerics.tensor_scale_from_range``)."""
    return run(fw, qparams_pipeline, (lo, hi), spec)


def quantize(fw: Framework, x, state: QuantState, *, check: bool = True):
    """Integer codes of ``x``; see ``pychop_jax.quantize``.  ``check=False`` skips the
    NaN / inf check (for input that was just calibrated on).  A float format the
    framework has no dtype for (fp4 in Torch) gives uint8 codes holding its bit
    patterns, the same bits as the JAX codes (``encodings.codes_as_bits``)."""
    _require_float_input(fw, x, "quantize")
    pipeline = quantize_pipeline
    if isinstance(state, QuantState) and not numerics.has_code_dtype(fw.xp, state.spec):
        pipeline = quantize_bits_pipeline  # Torch's fp4 codes: uint8 bit patterns
    scale, zero_point = _fitted(fw, tuple(x.shape), state, "quantize")
    q, ok = run(fw, pipeline, (x, scale, zero_point), state.spec, check=check)
    if check and not bool(ok):
        raise_nonfinite(fw, x, "quantize")
    return q


def dequantize(fw: Framework, q, state: QuantState):
    """Floats ``(q - zero_point) * scale`` in the scale's dtype; see
    ``pychop_jax.dequantize``."""
    validation.require_framework(q, fw.name, "dequantize")
    if isinstance(state, QuantState):
        _require_codes(fw, q, state.spec)
    else:
        validation.require_integer_codes(fw.is_integer(q), q.dtype)
    scale, zero_point = _fitted(fw, tuple(q.shape), state, "dequantize")
    return run(fw, dequantize_pipeline, (q, scale, zero_point), state.spec)[0]


def fake_quant(fw: Framework, x, state: QuantState, *, check: bool = True, mask: bool = False):
    """``(dequantize(quantize(x)) in x's dtype, clip mask or None)``.

    The mask (``numerics.clip_mask`` as 1 / 0, see ``fake_quant_pipeline`` for its
    dtype, computed in the same pass when ``mask=True``) is where the clipped
    straight-through gradient passes.
    """
    _require_float_input(fw, x, "fake_quant")
    scale, zero_point = _fitted(fw, tuple(x.shape), state, "fake_quant")
    y, inside, ok = run(fw, fake_quant_pipeline, (x, scale, zero_point), state.spec,
                         check=check, mask=mask)
    if check and not bool(ok):
        raise_nonfinite(fw, x, "fake_quant")
    return y, inside
