"""The core: what a quantizer is (``spec``), the formulas once against an array
namespace (``numerics``), the state pytree, the checks, the straight-through
gradients, the jitted JAX entry points (``ops``), observers, packing and
``QuantizedArray``; ``xla_cpu`` holds how XLA:CPU runs them.  No flax, no torch."""
