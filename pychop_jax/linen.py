"""``import pychop_jax.linen as qnn``: the flax.linen QAT layers (``pychop_jax.flax.linen``)."""

from .flax.linen import *  # noqa: F403
from .flax.linen import __all__  # noqa: F401
