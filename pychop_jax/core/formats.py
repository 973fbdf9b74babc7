"""Presets: the microscaling and 4-bit formats as ``QuantSpec`` s (``pychop_jax.formats``).

=============  ===============================  ======================  ==========  =======
preset         elements                         scales                  block       bits/el
=============  ===============================  ======================  ==========  =======
MXFP8_E4M3     float8_e4m3fn                    E8M0 (power of two)     32          8.25
MXFP8_E5M2     float8_e5m2                      E8M0                    32          8.25
MXFP6_E2M3     float6_e2m3fn                    E8M0                    32          6.25
MXFP6_E3M2     float6_e3m2fn                    E8M0                    32          6.25
MXFP4          float4_e2m1fn                    E8M0                    32          4.25
MXINT8         int8, [-127, 127] (narrow)       E8M0                    32          8.25
NVFP4          float4_e2m1fn                    float8_e4m3fn x fp32    16          4.5
NF4            NormalFloat4 table (uint8 idx)   float32 absmax          64          4.5
=============  ===============================  ======================  ==========  =======

The MX formats follow the OCP Microscaling Formats (MX) Specification v1.0 (2023): a shared
E8M0 scale ``2^(floor(log2(amax)) - emax_elem)`` per block of 32 (``blockscale``).
MXINT8's elements are int8 with an implicit ``2^-6``; here the state's ``scale`` is the
step ``X * 2^-6`` (``X`` the OCP shared scale), so codes are the int8 elements themselves.
NVFP4 (NVIDIA, Blackwell): fp4 elements, e4m3 scales per block of 16, and a per-tensor
float32 scale ``amax / (448 * 6)`` (``QuantState.tensor_scale``).  NF4: QLoRA
(Dettmers et al., 2023), absmax per block of 64 (no double quantization).

Blocks run along the last axis (``axis=-1``); ``dataclasses.replace(preset, axis=0)``
moves them, e.g. to a Flax kernel's contraction axis (``Dense`` kernels are
``(in, out)``: blocks of inputs are ``axis=0``).  Everything downstream takes these
specs: ``calibrate`` / ``quantize`` / ``fake_quant``, ``QuantizedArray``,
``quantize_params``, ``QuantRule(weight=...)`` and the QAT layers' ``weight_format``.
"""

from __future__ import annotations

from .spec import QuantSpec

__all__ = ["INT8_PER_TOKEN", "MXFP8_E4M3", "MXFP8_E5M2", "MXFP6_E2M3", "MXFP6_E3M2", "MXFP4",
           "MXINT8", "NVFP4", "NF4", "PRESETS", "mx"]

_E8M0 = "float8_e8m0fnu"


def mx(dtype: str, *, axis: int = -1, group_size: int = 32, scale_rounding: str = "floor"):
    """An MX spec for an element ``dtype`` (a float name, or ``"int8"`` for MXINT8)."""
    if dtype == "int8":
        return QuantSpec(bits=8, symmetric=True, narrow_range=True, axis=axis,
                         group_size=group_size, scale_dtype=_E8M0, scale_rounding=scale_rounding)
    return QuantSpec(dtype=dtype, axis=axis, group_size=group_size, scale_dtype=_E8M0,
                     scale_rounding=scale_rounding)


MXFP8_E4M3 = mx("float8_e4m3fn")
MXFP8_E5M2 = mx("float8_e5m2")
MXFP6_E2M3 = mx("float6_e2m3fn")
MXFP6_E3M2 = mx("float6_e3m2fn")
MXFP4 = mx("float4_e2m1fn")
MXINT8 = mx("int8")
NVFP4 = QuantSpec(dtype="float4_e2m1fn", axis=-1, group_size=16, scale_dtype="float8_e4m3fn")
NF4 = QuantSpec(dtype="nf4", axis=-1, group_size=64)

#: the presets by name
PRESETS: dict[str, QuantSpec] = {
    "MXFP8_E4M3": MXFP8_E4M3, "MXFP8_E5M2": MXFP8_E5M2, "MXFP6_E2M3": MXFP6_E2M3,
    "MXFP6_E3M2": MXFP6_E3M2, "MXFP4": MXFP4, "MXINT8": MXINT8, "NVFP4": NVFP4, "NF4": NF4,
}

#: dynamic per-token int8 inputs (w8a8 as LLM.int8 / torchao's dynamic activations): one
#: symmetric scale per row, calibrated on each call; as a rule's ``act``, the block spans
#: the input's whole last axis (``QuantRule``: a block at least that long is one block)
INT8_PER_TOKEN = QuantSpec(bits=8, symmetric=True, axis=-1, group_size=1 << 30)
