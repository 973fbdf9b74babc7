"""Every public name has an entry in the API reference (docs/api/*.md): a ``::: path``
directive of the object under any of its public paths, or of a module exporting it.
Static: reads the pages' directives, builds nothing (CI's ``mkdocs build --strict``
renders them)."""

import importlib
import pathlib
import re
import types

import pytest

API = pathlib.Path(__file__).resolve().parents[1] / "docs" / "api"
#: the modules users import, and so the public surface the reference must cover
PUBLIC = ["pychop_jax", "pychop_jax.linen", "pychop_jax.nnx", "pychop_jax.serving",
          "pychop_jax.algorithms", "pychop_jax.formats", "pychop_jax.observers",
          "pychop_jax.qat", "pychop_jax.interop.numpy", "pychop_jax.interop.torch", "pychop"]


def resolve(dotted: str):
    """``pychop_jax.formats`` is an attribute (``core.formats``), not an import path."""
    head, *rest = dotted.split(".")
    obj = importlib.import_module(head)
    for part in rest:
        try:
            obj = getattr(obj, part)
        except AttributeError:
            obj = importlib.import_module(f"{obj.__name__}.{part}")
    return obj


def documented_objects() -> set[int]:
    """ids of what the pages' ``::: path`` directives document: the objects, and the
    ``__all__`` of the modules among them (a module's page lists its public names)."""
    text = "\n".join(p.read_text() for p in API.glob("*.md"))
    ids = set()
    for path in re.findall(r"^::: ([\w.]+)$", text, flags=re.M):
        obj = resolve(path)
        ids.add(id(obj))
        if isinstance(obj, types.ModuleType):
            ids.update(id(getattr(obj, n)) for n in getattr(obj, "__all__", ()))
    return ids


def documented(obj, found: set[int]) -> bool:
    if isinstance(obj, types.ModuleType) and id(obj) not in found:
        return all(documented(getattr(obj, n), found) for n in obj.__all__)
    return id(obj) in found


@pytest.mark.parametrize("module", PUBLIC)
def test_every_public_name_has_a_reference_entry(module):
    pytest.importorskip("torch")  # pychop's torch names and interop.torch
    found = documented_objects()
    mod = resolve(module)
    names = list(mod.__all__)
    if module == "pychop":
        names += [n for n in mod._TORCH_NAMES if n not in names]
    missing = [n for n in names if not documented(getattr(mod, n), found)]
    assert not missing, f"{module}: no ::: entry in docs/api/ for {missing}"
