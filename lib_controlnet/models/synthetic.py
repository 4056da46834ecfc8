"""Full-size ControlNet files with random weights, for tests and benchmarks (no downloads possible here).

The weights are drawn directly in the target dtype from the shapes of a model built on the meta device,
so a 361M-parameter SD1.5 ControlNet costs a few seconds and no fp32 copy.
"""
from __future__ import annotations

from pathlib import Path

import torch

from lib_controlnet.models import configs
from lib_controlnet.models.controlnet_loader import parse_dtype


def random_state_dict(base: str = "sd15", dtype="fp16", seed: int = 0) -> dict[str, torch.Tensor]:
    """diffusers-named random weights for the shipped config of `base`."""
    from accelerate import init_empty_weights
    from diffusers import ControlNetModel

    with init_empty_weights():
        model = ControlNetModel.from_config(configs.clean_config(configs.shipped_config(base)))
    generator = torch.Generator().manual_seed(seed)
    target = parse_dtype(dtype)
    # Drawing 361M normal numbers takes many seconds on a small CPU; windows of one random pool at random
    # offsets give every tensor distinct random values in a fraction of the time.
    pool = torch.randn(1 << 22, generator=generator).mul_(0.02).to(target)
    state = {}
    for key, param in model.state_dict().items():
        numel = param.numel()
        repeats = -(-numel // pool.numel())
        source = pool if repeats == 1 else pool.repeat(repeats)
        start = int(torch.randint(0, max(1, source.numel() - numel + 1), (1,), generator=generator))
        state[key] = source[start:start + numel].clone().reshape(param.shape)
    return state


def write_random_controlnet(path, base: str = "sd15", dtype="fp16", layout: str = "ldm", seed: int = 0) -> Path:
    """Write a random full-size ControlNet: layout "ldm" (control_model.* safetensors, as released) or
    "diffusers" (a folder with config.json)."""
    from safetensors.torch import save_file

    from lib_controlnet.models.keymap import LDM_CONTROL_PREFIX, diffusers_to_ldm

    path = Path(path)
    state = random_state_dict(base, dtype, seed)
    if layout == "ldm":
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(diffusers_to_ldm(state, prefix=LDM_CONTROL_PREFIX), str(path), metadata={"format": "pt"})
    elif layout == "diffusers":
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(configs._shipped(base), encoding="utf-8")
        save_file(state, str(path / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    else:
        raise ValueError(f"unknown layout {layout!r}")
    return path
