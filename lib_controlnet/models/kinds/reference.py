"""Reference-only (`reference_only`, `reference_adain`, `reference_adain+attn`): a kind with no file.

The unit's preprocessor picks it (model "None"); lib_controlnet.reference runs it through the host's attention
and block hooks. It recognises no file, so the registry's key lookup never picks it.
"""
from __future__ import annotations

from pathlib import Path

from lib_controlnet.models.errors import ModelFileError
from lib_controlnet.models.kinds.base import REFERENCE, FileKeys, Kind


class ReferenceKind(Kind):
    name = "Reference"
    control = REFERENCE

    def recognises(self, keys: FileKeys) -> bool:
        return False

    def load(self, path: Path, keys: FileKeys, dtype=None, device="cpu"):
        raise ModelFileError("Reference units need no model file: choose a reference preprocessor and model None.")

    def n_outputs(self, model) -> int:
        return 0  # it adds nothing to the UNet's features; it changes how its layers read them

    def owns(self, model) -> bool:
        from lib_controlnet.reference import ReferenceModel

        return isinstance(model, ReferenceModel)


REFERENCE_KIND = ReferenceKind()
