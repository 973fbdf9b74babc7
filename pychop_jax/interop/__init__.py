"""The core's numerics on other frameworks' arrays, one ``Framework`` per library.

``engine`` (pipelines of ``numerics`` and the two engines that run them), ``numpy``
and ``torch`` (the adapters' functions), ``jax`` (JAX arrays behind the same
interface).  ``framework_named`` imports torch only when asked for it.
"""

from __future__ import annotations

import importlib

from .engine import Framework

__all__ = ["Framework", "framework_named", "FRAMEWORK_NAMES"]

FRAMEWORK_NAMES = ("jax", "numpy", "torch")


def framework_named(name: str) -> Framework:
    """``'jax'``, ``'numpy'`` or ``'torch'`` -> its ``Framework`` (torch imported here).

    Raises:
      ValueError: another name.
    """
    if name not in FRAMEWORK_NAMES:
        raise ValueError(f"unknown framework {name!r}; choose one of {FRAMEWORK_NAMES}.")
    return importlib.import_module(f".{name}", __name__).FRAMEWORK
