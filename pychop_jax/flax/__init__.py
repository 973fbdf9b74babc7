"""Flax on the core: layer-level QAT functions (``qat``), the linen and nnx skins, the
``flax.serialization`` registrations.  Importing this package loads neither skin."""
