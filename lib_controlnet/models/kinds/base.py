"""What every control-model kind says about itself, and the keys of a file as kinds look at them."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from lib_controlnet.models.errors import ModelFileError
from lib_controlnet.models.loading import read_header, weights_file_of

RESIDUALS = "residuals onto the decoder's skips and middle block"
ENCODER_FEATURES = "features added to the encoder"
ATTENTION = "modules on attention"
REFERENCE = "self-attention and block statistics read from a reference pass"


@dataclasses.dataclass
class FileKeys:
    """Names and shapes of a file's tensors (no tensor data), the groups of a nested pickle, a folder's config."""

    path: Path
    shapes: dict[str, tuple[int, ...]]
    nested: tuple[str, ...] = ()
    folder_config: dict | None = None   # a diffusers folder's config.json
    weights_path: Path | None = None

    def has(self, key: str) -> bool:
        return key in self.shapes

    def any_startswith(self, *prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in self.shapes)

    def any_contains(self, part: str) -> bool:
        return any(part in k for k in self.shapes)


def file_keys(path: Path) -> FileKeys:
    path = Path(path)
    if path.is_dir():
        weights = weights_file_of(path)
        try:
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            raise ModelFileError(f"The config.json of folder {path.name} is not valid JSON.") from None
        header = read_header(weights)
        return FileKeys(path, header.shapes, header.nested, config if isinstance(config, dict) else {}, weights)
    header = read_header(path)
    return FileKeys(path, header.shapes, header.nested, None, path)


@dataclasses.dataclass
class AttentionCall:
    """What an ATTENTION kind's hooks need during one UNet call, from the controller."""

    embeddings: object        # the kind's `embed` output for the job's hint at this size
    images: list              # for each row acted on, the index of the image (hint) it belongs to
    selection: object         # those rows in the UNet's batch: a slice, or a LongTensor of row indices
    scale: float
    mask: object = None       # (N images, 1, H, W) in [0, 1] where the unit acts, or None
    cond: tuple = ()          # for each row of the UNet's batch, whether it is conditional (IP-Adapter's tokens)


class Kind:
    """One kind of control model. Subclasses fill in the three answers."""

    name: str = "control model"        # as users call it: "ControlNet", "T2I-Adapter", ...
    control: str = RESIDUALS           # the host hook point it uses
    runs: bool = True                  # False: recognised and named, but this version cannot run it yet

    def recognises(self, keys: FileKeys) -> bool:
        raise NotImplementedError

    def load(self, path: Path, keys: FileKeys, dtype=None, device="cpu"):
        raise NotImplementedError

    def n_outputs(self, model) -> int:
        """How many tensors a loaded model gives per call (residuals, or encoder features)."""
        raise NotImplementedError

    def owns(self, model) -> bool:
        """Whether a loaded model object is of this kind."""
        return False

    def made_for(self, keys: FileKeys) -> str | None:
        """The base family (sd15 / sd2 / sdxl) a file of this kind is for, when its keys tell; checked against the
        loaded checkpoint before a job. Plain ControlNets answer through models.inspect_model instead."""
        return None

    def for_base(self, model, unet, dtype=None, device=None):
        """The model to run on this base UNet. Most kinds' files are complete models (returned as they are);
        a kind built from the base's own weights (Control-LoRA) makes its runnable model here."""
        return model

    # --- ATTENTION kinds: modules hooked onto the UNet's attention layers ---------------------------------
    def embed(self, model, hint):
        """The per-image conditioning of `hint` (N, 3, H, W) in [0, 1], computed once per job and size."""
        raise NotImplementedError

    # True: the unit's images together make one conditioning (IP-Adapter's multi-inputs), not one per batch image
    averages_images: bool = False

    def embed_unit(self, prepared, width: int, height: int):
        """The unit's conditioning for the job at this size: `embed` of its hints, unless the kind reads the unit
        itself (its preprocessor, its images as given)."""
        return self.embed(prepared.model, prepared.hint(width, height))

    def attach(self, model, modules: dict, current) -> list:
        """Hook `model` onto the UNet's layers (`modules`: ldm name -> module); each hook reads `current()`, the
        unit's `AttentionCall` for the UNet call under way, or None while the unit is inactive. Returns the
        hook handles, which the host removes with its own."""
        raise NotImplementedError

    def panel_types(self, keys: FileKeys) -> tuple[str, ...] | None:
        """The panel's control types ("Canny", "Depth", ...) a file of this kind fits, when its keys tell (a union
        model: every type it has); None: its file name tells, as users name plain ControlNets."""
        return None

    def __repr__(self) -> str:
        return f"<kind {self.name}>"
