"""Serving: integer matmuls (``int_matmul``), post-training quantization of parameter
trees (``ptq``), compact checkpoints (``checkpoint``) and QAT -> served models
(``serve``, whose names are re-exported here: ``pychop_jax.serving.to_served``)."""

from .serve import *  # noqa: F403
from .serve import __all__  # noqa: F401
