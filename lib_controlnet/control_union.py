"""The controller's side of ControlNet-Union units: which control type each unit gives the model, and which units
share one forward.

A union model takes several conditions in one forward (its type one-hot marks them all, its condition transformer
sees them together), so enabled units that use the same loaded union model at the same weight and control mode,
without masks and with different control types, run as one forward, as xinsir's pipeline runs several conditions; any other union unit runs alone
and its residuals add up like two ControlNets'.
"""
from __future__ import annotations

from typing import Optional

import torch

from lib_controlnet.control_units import ControlError, PreparedUnit
from lib_controlnet.models.kinds.union import UNION, UNION_TYPES, union_residuals, union_type_of_panel_type
from lib_controlnet.unit import UnionControlType


def is_union(prepared: PreparedUnit) -> bool:
    return prepared.kind is UNION


def type_index(prepared: PreparedUnit) -> int:
    """The task index the unit's condition gets: its `union_control_type`, else its preprocessor's control type."""
    unit = prepared.unit
    if unit.union_control_type is not UnionControlType.UNKNOWN:
        name = unit.union_control_type.value
    else:
        from lib_controlnet import preprocess

        control_type = preprocess.get_preprocessor(unit.module).control_type if unit.module.lower() != "none" else None
        name = union_type_of_panel_type(control_type) if control_type else None
        if name is None:
            why = f"its preprocessor {unit.module!r} has no union control type" if control_type else "it has no preprocessor"
            raise ControlError(f"Unit with ControlNet-Union model '{unit.model}' needs a union control type, as {why}; "
                               f"set union_control_type to one of {', '.join(UNION_TYPES)}.")
    index = UNION_TYPES.index(name)
    n_types = prepared.model.n_control_types
    if index >= n_types:
        raise ControlError(f"'{unit.model}' is a ControlNet-Union model with {n_types} control types, which has no "
                           f"{name} type; use the ProMax model for Tile and Inpaint.")
    return index


def check_units(units: list[PreparedUnit]) -> None:
    """Say before sampling which union unit lacks a control type the model has."""
    for prepared in units:
        if is_union(prepared):
            type_index(prepared)


def groups(active: list[PreparedUnit]) -> list[tuple[PreparedUnit, Optional[list[PreparedUnit]]]]:
    """The step's active units in order as (unit, union group): the group lists every union unit that runs in
    this unit's forward (itself first); None for other kinds. Units folded into an earlier group are left out."""
    out, taken = [], set()
    for i, prepared in enumerate(active):
        if id(prepared) in taken:
            continue
        if not is_union(prepared):
            out.append((prepared, None))
            continue
        group, types = [prepared], {type_index(prepared)}
        if prepared.mask is None:
            for other in active[i + 1:]:
                if (id(other) not in taken and is_union(other) and other.model is prepared.model
                        and other.mask is None and other.unit.weight == prepared.unit.weight
                        and other.unit.control_mode == prepared.unit.control_mode
                        and type_index(other) not in types):  # one token per type in a forward
                    group.append(other)
                    types.add(type_index(other))
                    taken.add(id(other))
        out.append((prepared, group))
    return out


def residuals(group: list[PreparedUnit], sample: torch.Tensor, timestep, context: torch.Tensor,
              embedded: list[torch.Tensor], y) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One union forward for a group's conditions (`embedded`: each unit's hint embedding for these rows)."""
    indices = [type_index(prepared) for prepared in group]
    return union_residuals(group[0].model, sample, timestep, context, embedded, indices, y)
