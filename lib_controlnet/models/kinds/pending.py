"""Kinds recognised by their keys and named in one sentence, but not run by this version yet.

Each moves to its own module (recognise, load, control) when it can run; until then a user who picks such a
file learns what it is instead of reading a shape mismatch.
"""
from __future__ import annotations

from pathlib import Path

from lib_controlnet.models.errors import ModelFileError
from lib_controlnet.models.kinds.base import RESIDUALS, FileKeys, Kind


class PendingKind(Kind):
    runs = False

    def __init__(self, name: str, control: str, recognise):
        self.name, self.control, self._recognise = name, control, recognise

    def recognises(self, keys: FileKeys) -> bool:
        return bool(self._recognise(keys))

    def load(self, path: Path, keys: FileKeys, dtype=None, device="cpu"):
        raise ModelFileError(f"{Path(path).name} is a {self.name} model, which this version cannot run yet; "
                             "use a ControlNet or a T2I-Adapter.")


def _is_union(keys: FileKeys) -> bool:
    # xinsir's union / ProMax: a control-type embedding added to the time embedding, a task embedding per type
    return (keys.any_contains("control_add_embedding.linear_1.bias") and keys.any_contains("task_embedding")) or (
        (keys.folder_config or {}).get("_class_name") == "ControlNetUnionModel")


UNION = PendingKind("ControlNet-Union", RESIDUALS, _is_union)
