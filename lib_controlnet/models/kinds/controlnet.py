"""Plain ControlNet (SD1.x / SD2.x / SDXL; ldm, diffusers file or folder): residuals onto the decoder's skips."""
from __future__ import annotations

from pathlib import Path

from lib_controlnet.models.kinds.base import RESIDUALS, FileKeys, Kind


class ControlNetKind(Kind):
    name = "ControlNet"
    control = RESIDUALS

    def recognises(self, keys: FileKeys) -> bool:
        # The fallback of the registry too: formats.classify_keys words the sentence for files nobody claims.
        return (keys.any_startswith("control_model.", "input_hint_block.", "controlnet_cond_embedding.")
                or (keys.folder_config or {}).get("_class_name") == "ControlNetModel")

    def load(self, path: Path, keys: FileKeys, dtype=None, device="cpu"):
        from lib_controlnet.models.controlnet_loader import load_controlnet

        return load_controlnet(path, dtype=dtype, device=device)

    def n_outputs(self, model) -> int:
        return len(model.controlnet_down_blocks) + 1  # one per UNet input block, then the middle block

    def owns(self, model) -> bool:
        from diffusers import ControlNetModel

        return isinstance(model, ControlNetModel)


CONTROLNET = ControlNetKind()
