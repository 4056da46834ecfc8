"""The index's own CLIP model: an open_clip architecture the user names (ViT-B-32, ViT-L-14, ViT-H-14, ... or a
path to an open_clip model-config JSON) plus a local weights file. Weights are read without unpickling code
(safetensors, or torch.load with weights_only=True): nothing is downloaded."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Optional

import numpy as np

from lib_controlnet.errors import UserError

_LOCK = threading.Lock()
_CACHE: dict = {}


class ClipModelError(UserError):
    """The CLIP model name, config or weights file cannot be used."""


def _architecture(name: str) -> str:
    """An open_clip model name; a .json path is registered as an extra config under its file stem."""
    import open_clip

    if name.endswith(".json"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ClipModelError(f"CLIP model config {path} does not exist.")
        open_clip.add_model_config(str(path))
        return path.stem
    if name not in open_clip.list_models():
        raise ClipModelError(f"Unknown CLIP model '{name}'; use an open_clip name such as ViT-B-32, ViT-L-14 or "
                             "ViT-H-14, or a model-config .json file.")
    return name


def _read_weights(path: Path) -> dict:
    import torch

    if not path.is_file():
        raise ClipModelError(f"CLIP weights file {path} does not exist.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # torch and safetensors raise many types; the user needs the reason
        raise ClipModelError(f"Cannot read CLIP weights {path}: {error}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ClipModelError(f"CLIP weights {path} hold no state dict.")
    # checkpoints saved from DistributedDataParallel prefix every key with "module."
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


class ClipEncoder:
    """encode_images / encode_texts -> L2-normalised float32 rows."""

    def __init__(self, model_name: str, weights: str):
        import open_clip
        import torch

        self.model_name, self.weights = model_name, str(Path(weights).expanduser().resolve())
        arch = _architecture(model_name)
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None)
        state = _read_weights(Path(self.weights))
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as error:
            first = str(error).splitlines()[1:2] or [str(error)]
            raise ClipModelError(f"CLIP weights {self.weights} do not fit {model_name}: {first[0].strip()}") from None
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.dim = int(model.text_projection.shape[1]) if getattr(model, "text_projection", None) is not None \
            else int(model.visual.output_dim)
        self.lock = threading.Lock()  # one forward at a time: the HTTP server answers from several threads
        self._torch = torch

    def _normalise(self, features) -> np.ndarray:
        features = features.float()
        features = features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return features.cpu().numpy().astype("float32")

    def encode_images(self, images: list) -> np.ndarray:
        """PIL images -> (n, dim)."""
        if not images:
            return np.zeros((0, self.dim), "float32")
        batch = self._torch.stack([self.preprocess(image.convert("RGB")) for image in images])
        with self.lock, self._torch.no_grad():
            return self._normalise(self.model.encode_image(batch))

    def encode_texts(self, texts: list) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), "float32")
        tokens = self.tokenizer([str(t) for t in texts])
        with self.lock, self._torch.no_grad():
            return self._normalise(self.model.encode_text(tokens))


def load_encoder(model_name: Optional[str], weights: Optional[str]) -> ClipEncoder:
    """One encoder per (model, weights file), kept for the life of the process."""
    if not model_name or not weights:
        raise ClipModelError("Name a CLIP model (--clip-model, e.g. ViT-L-14) and its local weights file (--clip-weights).")
    key = (model_name, str(Path(weights).expanduser().resolve()))
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = ClipEncoder(model_name, weights)
        return _CACHE[key]
