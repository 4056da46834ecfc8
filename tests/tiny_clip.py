"""A tiny open_clip CLIP (a few hundred kB, random weights) written as a user would have one: an open_clip
model-config JSON and a weights file. Its embeddings are 32-d."""
from __future__ import annotations

import json
from pathlib import Path

TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def write_tiny_clip(folder: Path, name: str = "tiny-clip", seed: int = 0, embed_dim: int = 32) -> tuple[Path, Path]:
    """-> (config .json, weights .safetensors)."""
    import lib_controlnet  # noqa: F401  (torchvision works only after the package's import-time fix)
    import open_clip
    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = dict(TINY_CLIP_CONFIG, embed_dim=embed_dim)
    config_path = folder / f"{name}.json"
    config_path.write_text(json.dumps(config), "utf-8")
    torch.manual_seed(seed)
    model = open_clip.CLIP(**config)
    weights = folder / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return config_path, weights
