"""pychop compatibility surface (integer quantization), built on ``pychop_jax``.

The full surface (``backend``, ``Chopi``, ``NumpyChopi`` / ``TorchChopi`` /
``JaxChopi``, ``IntQuantizedLayer``) lands with its own issue; this stub keeps the
distribution's second import package in place.
"""
