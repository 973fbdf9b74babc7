"""Post-training quantization of whole parameter trees.

``quantize_params(params, rules)`` walks a pytree (e.g. Flax ``params``), names each
leaf by its path (``"Dense_0/kernel"``: the keys joined with ``/``), and replaces
every floating leaf whose name matches a rule's regular expression
(``re.search``; first matching rule wins) by a ``QuantizedArray``.  Unmatched leaves
stay as they are.  The report lists which rule took which leaf and which rules
matched nothing, so a typo in a pattern does not silently leave a model in float.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from ..core.qarray import QuantizedArray
from ..core.spec import QuantSpec

__all__ = ["PTQReport", "leaf_name", "quantize_params", "dequantize_params"]


@dataclasses.dataclass(frozen=True)
class PTQReport:
    """What ``quantize_params`` did.

    Attributes:
      quantized: leaf name -> the pattern of the rule that quantized it.
      kept_float: names of leaves that no rule matched (or non-float leaves).
      unused_rules: patterns that matched no leaf.
    """

    quantized: dict[str, str]
    kept_float: tuple[str, ...]
    unused_rules: tuple[str, ...]

    def __str__(self) -> str:
        lines = [f"quantized {len(self.quantized)} leaves, kept {len(self.kept_float)} float"]
        lines += [f"  {name}  <- {pattern!r}" for name, pattern in self.quantized.items()]
        if self.unused_rules:
            lines.append(f"rules that matched nothing: {list(self.unused_rules)}")
        return "\n".join(lines)


def leaf_name(path) -> str:
    """``"a/b/0/c"`` for a ``jax.tree_util`` key path."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _compile(rules):
    compiled = []
    for i, rule in enumerate(rules):
        try:
            pattern, spec = rule
        except (TypeError, ValueError):
            raise TypeError(
                f"rule {i} must be a (path_regex, QuantSpec) pair; got {rule!r}"
            ) from None
        if not isinstance(spec, QuantSpec):
            raise TypeError(f"rule {i} ({pattern!r}) needs a QuantSpec; got {type(spec).__name__}")
        try:
            compiled.append((pattern, re.compile(pattern), spec))
        except re.error as err:
            raise ValueError(
                f"rule {i}: {pattern!r} is not a valid regular expression: {err}"
            ) from None
    return compiled


def quantize_params(params, rules: Sequence[tuple[str, QuantSpec]], *, pack: bool | str = "auto"):
    """Quantize the leaves of ``params`` that the rules select.

    Args:
      params: any pytree of arrays.
      rules: ``(path_regex, QuantSpec)`` pairs; the first whose regex is found
        (``re.search``) in a leaf's name (``leaf_name``) quantizes that leaf.
      pack: passed to ``QuantizedArray.quantize`` (``'auto'``: pack <= 4-bit codes).

    Returns:
      ``(tree, report)``: the same tree structure with ``QuantizedArray`` leaves,
      and a ``PTQReport``.

    Raises:
      ValueError: an invalid regex, or a spec that does not fit the leaf it matched
        (e.g. an axis the leaf does not have).
    """
    compiled = _compile(rules)
    used, quantized, kept = set(), {}, []

    def visit(path, leaf):
        name = leaf_name(path)
        floating = hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating)
        for pattern, regex, spec in compiled:
            if regex.search(name):
                if not floating:
                    break
                used.add(pattern)
                quantized[name] = pattern
                try:
                    return QuantizedArray.quantize(leaf, spec, pack=pack)
                except ValueError as err:
                    raise ValueError(f"{name} (rule {pattern!r}): {err}") from None
        kept.append(name)
        return leaf

    tree = jax.tree_util.tree_map_with_path(visit, params)
    unused = tuple(p for p, _, _ in compiled if p not in used)
    return tree, PTQReport(quantized, tuple(kept), unused)


def _is_quantized(x) -> bool:
    return isinstance(x, QuantizedArray)


def dequantize_params(tree, dtype=None):
    """Replace every ``QuantizedArray`` leaf by its dequantized floats."""
    return jax.tree_util.tree_map(
        lambda x: x.dequantize(dtype) if _is_quantized(x) else x, tree, is_leaf=_is_quantized
    )
