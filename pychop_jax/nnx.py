"""``import pychop_jax.nnx as qnnx``: the flax.nnx QAT layers (``pychop_jax.flax.nnx``)."""

from .flax.nnx import *  # noqa: F403
from .flax.nnx import __all__  # noqa: F401
