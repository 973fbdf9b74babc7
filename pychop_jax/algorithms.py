"""The post-training algorithms' public import path (``import pychop_jax.algorithms``),
a re-export of ``pychop_jax.serving.algorithms``: ``GPTQ``, ``AWQ``, ``SmoothQuant``,
``HQQ`` for ``QuantRule(method=...)``, ``calibrate_model``, and the algorithms as
array functions."""

from .serving.algorithms import *  # noqa: F403
from .serving.algorithms import __all__  # noqa: F401
