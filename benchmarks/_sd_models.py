"""Stable Diffusion parts with random weights for the GPU suite: full size from the configs the project ships
(lib_controlnet/configs), or tiny (lib_controlnet.tiny_models' configs) for the CPU run that keeps the suite
from rotting. Nothing is downloaded.

Full-size models are built on the meta device and their parameters drawn directly on the target device in the
target dtype, so an SDXL UNet (2.6B parameters) costs seconds and no fp32 copy on the CPU.
"""
from __future__ import annotations

import copy
import json
from typing import Callable

import torch

from lib_controlnet import tiny_models
from lib_controlnet.models import configs as controlnet_configs
from lib_controlnet.settings import SHIPPED_CONFIGS_DIR

BASE_DIR = SHIPPED_CONFIGS_DIR / "base"
FAMILIES = ("sd15", "sdxl")
IMAGE_SIZE = {("sd15", False): 512, ("sdxl", False): 1024, ("sd15", True): 64, ("sdxl", True): 64}


def _json(path) -> dict:
    return {k: v for k, v in json.loads(path.read_text(encoding="utf-8")).items() if not k.startswith("_")}


def _accepted(cls, config: dict) -> dict:
    import inspect

    names = set(inspect.signature(cls.__init__).parameters) - {"self"}
    return {k: v for k, v in config.items() if k in names}


def unet_config(family: str, tiny: bool) -> dict:
    """diffusers UNet2DConditionModel config. SDXL's base UNet config is not shipped; it is the shipped SDXL
    ControlNet's encoder (the same numbers by construction) plus the mirrored decoder."""
    from diffusers import UNet2DConditionModel

    if tiny:
        return tiny_models.unet_config(family)
    if family == "sd15":
        return _json(BASE_DIR / "sd15" / "unet" / "config.json")
    config = _accepted(UNet2DConditionModel, controlnet_configs.shipped_config("sdxl"))
    config.update(up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], out_channels=4,
                  sample_size=128)
    return config


def controlnet_config(family: str, tiny: bool, unet_cfg: dict) -> dict:
    from diffusers import ControlNetModel

    if not tiny:
        return controlnet_configs.clean_config(controlnet_configs.shipped_config(family))
    config = _accepted(ControlNetModel, unet_cfg)
    config["conditioning_embedding_out_channels"] = (16, 32, 96, 256)
    return config


def random_model(build: Callable[[], torch.nn.Module], device, dtype, seed: int = 0) -> torch.nn.Module:
    """`build()` on the meta device, then every parameter drawn N(0, 0.02) on `device` in `dtype`. Buffers
    (position ids and the like) are built for real and only moved. No output layer stays zero, so residuals
    and losses are real work."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = build()
    generator = torch.Generator(device=device).manual_seed(seed)
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            value = torch.empty(param.shape, device=device, dtype=dtype).normal_(0.0, 0.02, generator=generator)
            module._parameters[name] = torch.nn.Parameter(value, requires_grad=param.requires_grad)
    return model.to(device).eval()


def unet(family: str, tiny: bool, device, dtype, seed: int = 0):
    from diffusers import UNet2DConditionModel

    config = unet_config(family, tiny)
    return random_model(lambda: UNet2DConditionModel.from_config(config), device, dtype, seed)


def controlnet(family: str, tiny: bool, device, dtype, seed: int = 1):
    from diffusers import ControlNetModel

    config = controlnet_config(family, tiny, unet_config(family, tiny))
    return random_model(lambda: ControlNetModel.from_config(config), device, dtype, seed)


def vae(family: str, tiny: bool, device, dtype, seed: int = 2):
    from diffusers import AutoencoderKL

    if tiny:
        return tiny_models.tiny_vae(seed).to(device, dtype)
    config = _json(BASE_DIR / "sd15" / "vae" / "config.json")
    if family == "sdxl":  # the same network; SDXL's latents are scaled differently and it overflows in fp16
        config.update(scaling_factor=0.13025, force_upcast=True)
    return random_model(lambda: AutoencoderKL.from_config(config), device, dtype, seed)


def _clip_config(hidden: int, layers: int, heads: int, intermediate: int, projection: int, act: str):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=intermediate,
                          num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                          projection_dim=projection, hidden_act=act, bos_token_id=49406, eos_token_id=49407,
                          pad_token_id=49407)


def text_encoders(family: str, size: str, device, dtype, seed: int = 3) -> list:
    """[CLIP-L] for SD1.5, [CLIP-L, OpenCLIP bigG with projection] for SDXL. size "full" (real widths and
    depths), "slim" (real widths, 1 layer: for pipelines timed per step, where the encoders run once per job)
    or "tiny"."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    layers = {"full": None, "slim": 1, "tiny": 2}[size]
    if size == "tiny":
        first = _clip_config(32, layers, 2, 64, 32, "quick_gelu")
        second = _clip_config(32, layers, 2, 64, 32, "gelu")
    else:
        first = _clip_config(768, layers or 12, 12, 3072, 768, "quick_gelu")
        second = _clip_config(1280, layers or 32, 20, 5120, 1280, "gelu")
    encoders = [random_model(lambda: CLIPTextModel(first), device, dtype, seed)]
    if family == "sdxl":
        encoders.append(random_model(lambda: CLIPTextModelWithProjection(second), device, dtype, seed + 1))
    return encoders


def scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(tiny_models.scheduler().config, clip_sample=False)


def pipeline_parts(family: str, tiny: bool, unet_model, device, dtype) -> dict:
    """Everything a (ControlNet) pipeline needs besides the ControlNet, for the per-step timings: the UNet as
    given, one-layer text encoders of the real widths and the tiny VAE (they run once per job, outside the
    steps being timed)."""
    encoders = text_encoders(family, "tiny" if tiny else "slim", device, dtype)
    parts = dict(unet=unet_model, vae=tiny_models.tiny_vae().to(device, dtype), text_encoder=encoders[0],
                 tokenizer=tiny_models.tokenizer(), scheduler=scheduler())
    if family == "sdxl":
        parts.update(text_encoder_2=encoders[1], tokenizer_2=tiny_models.tokenizer())
    else:
        parts.update(safety_checker=None, feature_extractor=None)
    return parts


# ---------------------------------------------------------------------------------------------- the WebUI's UNet
def ldm_unet(family: str, tiny: bool, device, dtype, seed: int = 4):
    """The WebUI's own UNetModel class (stable-diffusion-sdkit's ldm) shaped like `family`'s diffusers UNet.

    SDXL's UNet is sgm's class, which cannot be installed beside the WebUI's stack; it has the same blocks,
    plus per-level transformer depths and the `label_emb` on the added-condition vector `y`. Both are given to
    the ldm class here: each level's SpatialTransformers get that level's number of transformer blocks (see
    _Blocks), and label_emb is sgm's Sequential(Sequential(Linear, SiLU, Linear))."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    cfg = unet_config(family, tiny)
    channels = list(cfg["block_out_channels"])
    attention = [2 ** i for i, kind in enumerate(cfg["down_block_types"]) if kind.startswith("CrossAttn")]
    if family == "sd15":
        heads = dict(num_heads=cfg["attention_head_dim"])
    else:
        heads = dict(num_head_channels=16 if tiny else 64)
    depths = cfg.get("transformer_layers_per_block", 1)
    depths = [depths] * len(channels) if isinstance(depths, int) else list(depths)

    def build():
        model = UNetModel(
            image_size=32, in_channels=4, model_channels=channels[0], out_channels=4,
            num_res_blocks=cfg["layers_per_block"], attention_resolutions=attention,
            channel_mult=[c // channels[0] for c in channels], use_spatial_transformer=True, transformer_depth=1,
            context_dim=cfg["cross_attention_dim"], use_linear_in_transformer=bool(cfg.get("use_linear_projection")),
            use_checkpoint=False, legacy=False, use_fp16=dtype == torch.float16,
            num_classes="continuous" if family == "sdxl" else None, **heads)
        if family == "sdxl":
            embed = channels[0] * 4
            model.label_emb = torch.nn.Sequential(torch.nn.Sequential(
                torch.nn.Linear(cfg["projection_class_embeddings_input_dim"], embed), torch.nn.SiLU(),
                torch.nn.Linear(embed, embed)))
            model.num_classes = "sequential"
        _deepen(model, depths, cfg["layers_per_block"])
        return model

    return random_model(build, device, dtype, seed)


class _Blocks(torch.nn.ModuleList):
    """Transformer blocks run in turn on the same context. sgm's SpatialTransformer does that for any depth;
    this ldm version indexes a per-block context list and so runs depth 1 only: the deeper stack sits in the
    first block's place."""

    def forward(self, x, context=None):
        for block in self:
            x = block(x, context=context)
        return x


def _deepen(model, depths: list[int], per_level: int) -> None:
    """Give each level's SpatialTransformers `depths[level]` blocks (the middle block the last level's)."""
    def grow(block, depth):
        for layer in block:
            if hasattr(layer, "transformer_blocks") and depth > 1:
                first = layer.transformer_blocks[0]
                layer.transformer_blocks[0] = _Blocks([first] + [copy.deepcopy(first) for _ in range(depth - 1)])

    levels = len(depths)
    for k, block in enumerate(model.input_blocks[1:]):
        grow(block, depths[k // (per_level + 1)])
    grow(model.middle_block, depths[-1])
    for j, block in enumerate(model.output_blocks):
        grow(block, depths[levels - 1 - j // (per_level + 1)])


def sdxl_added(batch: int, size: int, text_embeds_dim: int, device, dtype) -> dict:
    """SDXL's added conditions for a square image: pooled text and (original size, crop, target size)."""
    time_ids = torch.tensor([[size, size, 0, 0, size, size]] * batch, device=device, dtype=dtype)
    return dict(text_embeds=torch.randn(batch, text_embeds_dim, device=device, dtype=dtype), time_ids=time_ids)
