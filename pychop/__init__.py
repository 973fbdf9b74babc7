"""pychop compatibility surface, built on ``pychop_jax``: integer quantization (``Chopi``)
and pychop 0.6.2's float / fixed-point / MX emulators (``Chop``, ``Chopf``,
``mx_quantize``; ``pychop.floats``).

    import pychop
    pychop.backend('numpy')                  # or 'torch', 'jax', 'auto' (the default)
    ch = pychop.Chopi(num_bits=8, symmetric=False, per_channel=False, channel_dim=0)
    q = ch.quantize(x)                       # uint8 codes (int8 when symmetric)
    xhat = ch.dequantize(q)

``Chopi(...)`` returns the quantizer of the current backend: ``NumpyChopi``,
``TorchChopi`` (an ``nn.Module``), ``JaxChopi``, or under ``'auto'`` an ``AutoChopi``
that binds to the framework of the first array it sees.  All of them compute with
``pychop_jax.core.numerics`` and agree bit for bit.  A symmetric quantizer's
``zero_point`` is 0 (not ``None``).  Torch is imported only when a Torch name is used.

pychop 0.6 names: ``bits=`` / ``axis=`` keywords, ``ChopiSTE``,
``IQuantizedLinear`` (= ``IQuantizedDense``), ``IQuantizedConv1d/2d/3d``.
"""

import importlib.util
import sys

from .floats import MX_FORMATS, Chop, Chopf, MXSpec, create_mx_spec, mx_quantize
from .quantizer import AutoChopi, JaxChopi, NumpyChopi

_TORCH_NAMES = ("TorchChopi", "IntQuantizedLayer", "ChopiSTE", "IQuantizedLinear",
                "IQuantizedDense", "IQuantizedConv1d", "IQuantizedConv2d", "IQuantizedConv3d")


def _torch_installed() -> bool:
    if "torch" in sys.modules:
        return sys.modules["torch"] is not None  # None: imports of torch are blocked
    return importlib.util.find_spec("torch") is not None


# ``from pychop import *`` must work without torch: list its names only where it is
__all__ = ["backend", "get_backend", "Chopi", "NumpyChopi", "JaxChopi", "AutoChopi",
           "Chop", "Chopf", "mx_quantize", "MX_FORMATS", "MXSpec", "create_mx_spec",
           *(_TORCH_NAMES if _torch_installed() else ())]

_BACKENDS = ("numpy", "torch", "jax", "auto")
_current = "auto"


def backend(lib: str = "auto", verbose: int = 0) -> None:
    """Choose the framework ``Chopi`` builds quantizers for: 'numpy', 'torch', 'jax' or
    'auto' (bind to the type of the first array seen)."""
    global _current
    if lib not in _BACKENDS:
        raise ValueError(f"Unsupported backend {lib!r}; choose one of {_BACKENDS}.")
    _current = lib
    if verbose:
        print(f"pychop backend: {lib}")


def get_backend() -> str:
    """The name set by ``backend()`` ('auto' until then)."""
    return _current


def Chopi(num_bits=8, symmetric=False, per_channel=False, channel_dim=0, **kwargs):
    """The current backend's integer quantizer (see ``pychop.quantizer.Quantizer``)."""
    classes = {"numpy": NumpyChopi, "jax": JaxChopi, "auto": AutoChopi}
    cls = classes.get(_current) or __getattr__("TorchChopi")
    return cls(num_bits, symmetric, per_channel, channel_dim, **kwargs)


def __getattr__(name):
    # Torch names load torch_modules (and torch) on first use
    if name in _TORCH_NAMES:
        from . import torch_modules

        return getattr(torch_modules, name)
    raise AttributeError(f"module 'pychop' has no attribute {name!r}")
