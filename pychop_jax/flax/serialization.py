"""``flax.serialization`` (and orbax through it) for the core's pytrees.

``QuantState``, ``RangeState`` and ``QuantizedArray`` serialize as dicts of their
arrays; their static metadata (the ``QuantSpec``, the logical shape, packing) comes
from the target tree a checkpoint is restored into.  Importing ``pychop_jax``
registers them, so the core itself never imports flax.
"""

from __future__ import annotations

import dataclasses

from flax import serialization

from ..core.observers import RangeState
from ..core.qarray import QuantizedArray
from ..core.state import QuantState

__all__ = ["register"]


def _state_to_dict(state: QuantState) -> dict:
    d = {"scale": state.scale, "zero_point": state.zero_point}
    if state.tensor_scale is not None:  # two-level specs (NVFP4)
        d["tensor_scale"] = state.tensor_scale
    return d


def _state_from_dict(target: QuantState, data: dict) -> QuantState:
    return target.replace(scale=data["scale"], zero_point=data["zero_point"],
                          tensor_scale=data.get("tensor_scale", target.tensor_scale))


def _range_to_dict(stats: RangeState) -> dict:
    return {"lo": stats.lo, "hi": stats.hi, "count": stats.count}


def _range_from_dict(target: RangeState, data: dict) -> RangeState:
    return RangeState(data["lo"], data["hi"], data["count"])


def _qarray_to_dict(qa: QuantizedArray) -> dict:
    return {"codes": qa.codes, **_state_to_dict(qa.state)}


def _qarray_from_dict(target: QuantizedArray, data: dict) -> QuantizedArray:
    return dataclasses.replace(target, codes=data["codes"],
                               state=_state_from_dict(target.state, data))


def register() -> None:
    """Register the three pytrees (idempotent; done on import)."""
    for cls, to_dict, from_dict in ((QuantState, _state_to_dict, _state_from_dict),
                                    (RangeState, _range_to_dict, _range_from_dict),
                                    (QuantizedArray, _qarray_to_dict, _qarray_from_dict)):
        serialization.register_serialization_state(cls, to_dict, from_dict, override=True)


register()
