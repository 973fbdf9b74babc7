"""Error policy shared by every backend (``docs/numerics.md``, errors).

Each check takes plain Python facts (dtype names, shapes, counts) so that the JAX,
NumPy and Torch entry points raise the same exception with the same message.  These
run only in eager calls; under ``jit`` nothing raises (see ``pychop_jax.check_finite``
for a ``checkify`` check).
"""

from __future__ import annotations

__all__ = [
    "require_spec",
    "require_float",
    "require_integer_codes",
    "require_codes",
    "require_nonempty",
    "require_finite",
    "require_state_fits",
    "framework_of",
    "require_framework",
    "fitted_state",
]


def require_spec(spec, what: str) -> None:
    """``TypeError`` unless ``spec`` is a ``QuantSpec``."""
    from .spec import QuantSpec

    if not isinstance(spec, QuantSpec):
        raise TypeError(f"{what} needs a QuantSpec; got {type(spec).__name__}.")


def require_float(is_float: bool, dtype, what: str) -> None:
    """``TypeError`` unless the input of ``what`` is a floating-point array."""
    if not is_float:
        raise TypeError(
            f"{what} needs a floating-point array; got dtype {dtype}. "
            "Convert it first, e.g. x.astype(float32)."
        )


def require_integer_codes(is_integer: bool, dtype, what: str = "dequantize") -> None:
    """``TypeError`` unless ``what`` received integer codes."""
    if not is_integer:
        raise TypeError(
            f"{what} needs integer codes (the output of quantize); got dtype {dtype}. "
            "To round-trip floats use fake_quant."
        )


def require_codes(dtype, spec, what: str = "dequantize") -> None:
    """``TypeError`` unless ``dtype`` is the codes' dtype kind for ``spec``: integer codes
    for integer grids and NF4, the element format's own dtype for float grids."""
    import numpy as np

    if spec is None or not spec.is_float or spec.dtype == "nf4":
        require_integer_codes(np.issubdtype(np.dtype(dtype), np.integer), dtype, what)
        return
    if np.dtype(dtype) != spec.code_dtype:
        raise TypeError(
            f"{what} needs {spec.code_dtype.name} codes for QuantSpec(dtype={spec.dtype!r}) "
            f"(the output of quantize); got dtype {dtype}. To round-trip floats use fake_quant.")


def require_nonempty(size: int, what: str) -> None:
    """``ValueError`` for an empty array."""
    if size == 0:
        raise ValueError(
            f"{what} got an empty array; there is no range to calibrate from. "
            "Pass at least one element."
        )


def require_finite(n_nan: int, n_inf: int, what: str) -> None:
    """``ValueError`` naming how many NaN / inf values were found."""
    if n_nan or n_inf:
        found = " and ".join(
            f"{n} {kind}" for n, kind in ((n_nan, "NaN"), (n_inf, "+-inf")) if n
        )
        raise ValueError(
            f"{what} got {found} value(s); quantization needs finite input. "
            "Replace them (e.g. nan_to_num) before calling, or call it inside jax.jit, "
            "where non-finite values are ignored by calibration, +-inf saturate and "
            "NaN maps to the zero point."
        )


def require_state_fits(x_shape, state_shape, expected_shape, what: str) -> None:
    """``ValueError`` when a state calibrated for another shape meets ``x``."""
    if tuple(state_shape) != tuple(expected_shape):
        raise ValueError(
            f"{what}: the state's scale has shape {tuple(state_shape)}, but an array "
            f"of shape {tuple(x_shape)} needs {tuple(expected_shape)} under its spec. "
            "Calibrate on an array of this shape (or with a matching axis)."
        )


def framework_of(x) -> str | None:
    """``'jax'``, ``'numpy'``, ``'torch'`` or ``None`` for other objects.

    Decided from the type's module, so it never imports a framework.
    """
    module = type(x).__module__.split(".")[0]
    if module in ("jax", "jaxlib"):
        return "jax"
    if module == "numpy":
        return "numpy"
    if module == "torch":
        return "torch"
    return None


_CONVERT_HINT = {
    "jax": "jnp.asarray(x)",
    "numpy": "np.asarray(x)",
    "torch": "torch.as_tensor(x)",
}


def require_framework(x, expected: str, what: str, accept=()) -> None:
    """``TypeError`` when ``x`` is an array of a framework other than ``expected``.

    ``accept`` lists further frameworks that are converted silently (the JAX entry
    points take NumPy arrays, for example).
    """
    found = framework_of(x)
    if found == expected or found in accept:
        return
    if found:
        got = f"a {found} array; use the {found} backend for it, or convert it"
    else:
        got = f"an object of type {type(x).__name__}; convert it"
    raise TypeError(
        f"{what} expects a {expected} array but got {got} with {_CONVERT_HINT[expected]}."
    )


def fitted_state(state, shape, what: str, reshape, is_valid=None, widen=None):
    """``(scale, zero_point)`` of ``state`` shaped for an input of ``shape``.

    A per-tensor state fits any rank (``reshape(array, shape)`` of the caller's
    framework); other states must have ``state.spec.scale_shape(shape)``.  ``widen``
    (``scale -> scale``) converts scales stored in a narrow scale format.  With
    ``is_valid`` (``scale -> bool``; eager callers) a scale that is not finite and
    positive everywhere is rejected: it would quantize silently to garbage (NaN
    scales give the zero point everywhere, negative ones reverse the grid).

    Raises:
      TypeError: ``state`` is not a ``QuantState``.
      ValueError: the state does not fit, or its scale is invalid.
    """
    from .state import QuantState

    if not isinstance(state, QuantState):
        raise TypeError(f"{what} needs a QuantState (from calibrate); got {type(state).__name__}.")
    expected = state.spec.scale_shape(tuple(shape))
    scale, zero_point = state.scale, state.zero_point
    if widen is not None:  # scales stored in their scale format (E8M0, float8)
        scale = widen(scale)
    if state.spec.two_level and state.tensor_scale is None:
        raise ValueError(
            f"{what}: a two-level spec (scale_dtype={state.spec.scale_dtype!r}) needs the "
            "state's tensor_scale; build the state with calibrate (or an observer).")
    actual = tuple(scale.shape)
    if actual != expected and state.spec.axis is None and all(n == 1 for n in actual):
        scale, zero_point = reshape(scale, expected), reshape(zero_point, expected)
    require_state_fits(shape, tuple(scale.shape), expected, what)
    if is_valid is not None and not is_valid(scale):
        raise ValueError(
            f"{what}: the state's scale must be finite and > 0 everywhere (a diverged "
            "learned step size, or a hand-made state?). Recalibrate, or re-initialise "
            "it with lsq_init."
        )
    return scale, zero_point
