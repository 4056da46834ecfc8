"""CLIP vision encoders for image prompts (IP-Adapter): ViT-H/14, ViT-bigG/14 and ViT-L/14 from local files.

The files are the ones users already have from the other WebUI ControlNet extension, in
`<annotator dir>/clip_vision/`: `clip_h.pth` (h94/IP-Adapter models/image_encoder), `clip_g.pth`
(lllyasviel/Annotators), `clip_vitl.pth` (openai/clip-vit-large-patch14); ComfyUI's names for the same weights
are found too. Each holds the state dict of transformers' `CLIPVisionModelWithProjection`; the config is read
from the tensors' shapes (width, depth, MLP width, patch and image size, projection width), so a tiny encoder
saved under a real name loads through the same code. Every released tower has 16 heads; OpenAI's ViT-L uses
quick-GELU, the LAION towers GELU.

Encoding runs once per job (the controller caches the tokens): images are squashed to the tower's input size,
as that extension does, and normalised with CLIP's mean and std. The unconditional side is the tower's output
for an all-zero (after normalisation) image, as diffusers' pipelines and the original IP-Adapter code do.
"""
from __future__ import annotations

import dataclasses
import re
import threading
from pathlib import Path

import cv2
import numpy as np
import torch

from annotators.weights import AnnotatorWeightsError, _search, annotator_dir, find_weight, WEIGHTS, WeightFile

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HEADS = 16


@dataclasses.dataclass(frozen=True)
class Encoder:
    name: str  # clip_h, clip_g, clip_vitl
    label: str
    files: tuple[str, ...]  # the other extension's name first (the one the missing-file sentence gives)


ENCODERS = {e.name: e for e in (
    Encoder("clip_h", "CLIP ViT-H/14", ("clip_h.pth", "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors")),
    Encoder("clip_g", "CLIP ViT-bigG/14", ("clip_g.pth", "CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors")),
    Encoder("clip_vitl", "CLIP ViT-L/14", ("clip_vitl.pth",)),
)}
# Where each file is published (for the sentence and the optional download), in the shared weights table.
WEIGHTS.setdefault("clip_h.pth", WeightFile("clip_h.pth", "clip_vision", repo="h94/IP-Adapter",
                                            repo_path="models/image_encoder/pytorch_model.bin"))
WEIGHTS.setdefault("clip_g.pth", WeightFile("clip_g.pth", "clip_vision"))
WEIGHTS.setdefault("clip_vitl.pth", WeightFile("clip_vitl.pth", "clip_vision", repo="openai/clip-vit-large-patch14",
                                               repo_path="pytorch_model.bin"))

_LAYER = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.")


def find_encoder_file(name: str) -> Path:
    encoder = ENCODERS[name]
    root = annotator_dir()
    for filename in encoder.files[1:]:
        found = _search(root, WeightFile(filename, "clip_vision"))
        if found is not None:
            return found
    return find_weight(encoder.files[0], label=f"{encoder.label} image encoder of this")


def vision_config(shapes: dict, name: str):
    from transformers import CLIPVisionConfig

    try:
        patch = shapes["vision_model.embeddings.patch_embedding.weight"]
        positions = shapes["vision_model.embeddings.position_embedding.weight"][0]
        layers = 1 + max(int(m.group(1)) for k in shapes if (m := _LAYER.match(k)))
        intermediate = shapes["vision_model.encoder.layers.0.mlp.fc1.weight"][0]
        projection = shapes["visual_projection.weight"][0]
    except (KeyError, ValueError):
        raise AnnotatorWeightsError(f"{name} is not a CLIP vision tower with a projection "
                                    "(CLIPVisionModelWithProjection weights).") from None
    hidden = patch[0]
    side = round((positions - 1) ** 0.5)
    return CLIPVisionConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                            num_attention_heads=HEADS, patch_size=patch[-1], image_size=side * patch[-1],
                            projection_dim=projection, hidden_act="quick_gelu" if hidden == 1024 else "gelu",
                            layer_norm_eps=1e-5)


def load_encoder(path: Path):
    from transformers import CLIPVisionModelWithProjection

    from lib_controlnet.models.errors import ModelFileError
    from lib_controlnet.models.loading import read_tensors

    try:
        tensors = read_tensors(path)  # pickles load with weights_only: tensors, never code
    except ModelFileError as error:
        raise AnnotatorWeightsError(str(error)) from None
    config = vision_config({k: tuple(v.shape) for k, v in tensors.items()}, path.name)
    model = CLIPVisionModelWithProjection(config)
    result = model.load_state_dict(tensors, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing:
        raise AnnotatorWeightsError(f"{path.name} lacks tensors of a CLIP vision tower ({', '.join(missing[:3])}).")
    return model.eval().requires_grad_(False)


class _Cache:
    """One encoder at a time: a job needs one, and the towers are large (ViT-bigG ~3.7 GB in fp32)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._key, self._model = None, None

    def get(self, name: str):
        path = find_encoder_file(name)
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if key != self._key:
                self._key, self._model = None, None
                self._model, self._key = load_encoder(path), key
            return self._model

    def clear(self) -> None:
        with self._lock:
            self._key, self._model = None, None


_cache = _Cache()


def get_encoder(name: str):
    return _cache.get(name)


def pixel_values(images, size: int) -> torch.Tensor:
    """(N, 3, size, size) CLIP input from HxWx3 uint8 arrays (or an (N, 3, H, W) float tensor in [0, 1])."""
    if torch.is_tensor(images):
        batch = torch.nn.functional.interpolate(images.float(), size=(size, size), mode="bicubic",
                                                align_corners=False).clamp(0, 1)
    else:
        arrays = []
        for image in images:
            image = np.asarray(image)[..., :3]
            shrink = image.shape[0] * image.shape[1] >= size * size
            resized = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
            arrays.append(torch.from_numpy(np.ascontiguousarray(resized)).permute(2, 0, 1).float() / 255.0)
        batch = torch.stack(arrays)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (batch - mean) / std


@torch.no_grad()
def encode(model, images, hidden_states: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond, uncond): per image, the projected `image_embeds` (N, D) or the penultimate hidden states
    (N, 1 + patches, width) when `hidden_states`; uncond is the same for one all-zero input."""
    pixels = pixel_values(images, model.config.image_size)
    parameter = next(model.parameters())
    pixels = torch.cat([pixels, torch.zeros_like(pixels[:1])]).to(device=parameter.device, dtype=parameter.dtype)
    output = model(pixel_values=pixels, output_hidden_states=hidden_states)
    if hidden_states:
        features = output.hidden_states[-2]
        return features[:-1], features[-1:]
    return output.image_embeds[:-1], torch.zeros_like(output.image_embeds[-1:])


def preview(img: np.ndarray, params) -> np.ndarray:
    """What the panel shows for an image-encoder preprocessor: the image itself (the encoding is not a map)."""
    return img


def random_encoder_file(directory: Path, name: str = "clip_h", seed: int = 0, **config) -> Path:
    """A tiny random CLIP vision tower saved under the real file name (tests, demos)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    settings = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=HEADS,
                    patch_size=14, image_size=28, projection_dim=24, hidden_act="gelu", layer_norm_eps=1e-5)
    settings.update(config)
    torch.manual_seed(seed)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**settings))
    path = Path(directory) / "clip_vision" / ENCODERS[name].files[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path
