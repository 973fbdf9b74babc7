"""Serving: served matmuls on codes (``served_ops``, ``int_matmul``, ``float_matmul``),
``serve_model`` (``deploy``), generation with a KV cache (``decoding``), post-training
quantization of parameter trees (``ptq``), compact checkpoints (``checkpoint``) and the
deprecated QAT-layer serving (``serve``: ``to_served``)."""

from .decoding import generate, sample
from .deploy import serve_model
from .serve import *  # noqa: F403
from .serve import __all__ as _serve_all

__all__ = ["generate", "sample", "serve_model", *_serve_all]
