"""Flax on the transform: the linen and nnx QAT layers (``linen``, ``nnx``),
``quantize_model`` for linen, nnx, Equinox and plain functions (``models``), and the
``flax.serialization`` registrations.  Importing this package loads neither skin."""
