"""Quantize stock Flax models by rules over module paths (``quantize_model``)."""
