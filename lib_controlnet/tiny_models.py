"""Small random-weight Stable Diffusion parts built from configs: for tests, benchmarks and the offline demo.

Each family keeps the structure that matters to ControlNet (number of residuals, attention layout, linear
vs conv projections, SDXL's added embeddings) at a fraction of the size. Channels are multiples of 32
because the WebUI's ldm UNet hard-codes GroupNorm(32).
"""
from __future__ import annotations

import copy

import torch

from lib_controlnet.settings import SHIPPED_CONFIGS_DIR

TOKENIZER_DIR = SHIPPED_CONFIGS_DIR / "clip_tokenizer"

_UNET_BASE = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    cross_attention_dim=32,
    block_out_channels=(32, 32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=2,
)

UNET_CONFIGS = {
    # SD1.x: 12 + 1 residuals, 1x1 conv proj_in/out, fixed head count.
    "sd15": dict(_UNET_BASE),
    # SD2.x: linear proj_in/out, per-block head dims.
    "sd2": dict(_UNET_BASE, cross_attention_dim=64, use_linear_projection=True, attention_head_dim=(2, 2, 4, 4)),
    # SDXL: 3 levels (9 + 1 residuals), transformer depth per level, text_time added embedding.
    "sdxl": dict(
        _UNET_BASE,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        cross_attention_dim=64,
        use_linear_projection=True,
        attention_head_dim=(2, 4, 4),
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 32,  # 6 size/crop numbers + pooled text (32)
    ),
}

FAMILIES = tuple(UNET_CONFIGS)


def unet_config(family: str) -> dict:
    return copy.deepcopy(UNET_CONFIGS[family])


def _randomize_zero_layers(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter a non-zero random value, so zero-initialised outputs carry signal in tests."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.abs().sum() == 0:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)


def tiny_unet(family: str = "sd15", seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config(family))
    _randomize_zero_layers(unet, seed)
    return unet.eval()


def tiny_controlnet(family: str = "sd15", seed: int = 1, unet=None, randomize_zero_convs: bool = True):
    """A ControlNet shaped like `family`'s UNet encoder. Zero convs get random values unless asked not to,
    so that its residuals are not all zero."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    if unet is not None:
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 96, 256))
    else:
        config = unet_config(family)
        keep = {"in_channels", "block_out_channels", "down_block_types", "layers_per_block", "norm_num_groups",
                "cross_attention_dim", "attention_head_dim", "use_linear_projection", "transformer_layers_per_block",
                "addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim"}
        kwargs = {k: v for k, v in config.items() if k in keep}
        controlnet = ControlNetModel(conditioning_embedding_out_channels=(16, 32, 96, 256), **kwargs)
    if randomize_zero_convs:
        _randomize_zero_layers(controlnet, seed)
    return controlnet.eval()


def tiny_vae(seed: int = 2):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    # Four levels, so latents are 1/8 of the image as in SD and the ControlNet hint embedding fits.
    return AutoencoderKL(
        block_out_channels=(32, 32, 64, 64), layers_per_block=1, in_channels=3, out_channels=3, latent_channels=4,
        norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=128,
    ).eval()


def tiny_text_encoder(hidden_size: int = 32, seed: int = 3):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407, projection_dim=hidden_size,
    )
    return CLIPTextModel(config).eval()


def tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), local_files_only=True)


def scheduler():
    """SD1.5's own scheduler settings (PNDM, scaled-linear betas)."""
    from diffusers import PNDMScheduler

    return PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)


def tiny_sd_components(family: str = "sd15", seed: int = 0) -> dict:
    """Everything a StableDiffusion(ControlNet)Pipeline needs except the ControlNet, for sd15 / sd2."""
    if family == "sdxl":
        raise ValueError("tiny_sd_components builds SD1/SD2 pipelines; SDXL needs two text encoders")
    unet = tiny_unet(family, seed)
    return dict(
        unet=unet, vae=tiny_vae(seed + 2), text_encoder=tiny_text_encoder(unet.config.cross_attention_dim, seed + 3),
        tokenizer=tokenizer(), scheduler=scheduler(), safety_checker=None, feature_extractor=None,
    )


def save_tiny_diffusers_base(path, family: str = "sd15", seed: int = 0):
    """Write a complete diffusers folder (model_index.json and parts) that loads with from_pretrained offline."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**tiny_sd_components(family, seed), requires_safety_checker=False)
    pipe.save_pretrained(str(path), safe_serialization=True)
    return path


# ---------------------------------------------------------------------------------------------- SDXL base
# SDXL's UNet reads both text encoders' hidden states side by side (768 + 1280 in the real one) and the second
# encoder's pooled, projected output. The two tiny encoders must differ in width, as the real ones do: diffusers'
# single-file loader tells CLIP-L from OpenCLIP bigG by that width.
SDXL_TEXT_WIDTHS = (32, 64)
SDXL_POOLED_DIM = 32


def sdxl_unet_config() -> dict:
    return dict(unet_config("sdxl"), cross_attention_dim=sum(SDXL_TEXT_WIDTHS),
                projection_class_embeddings_input_dim=8 * 6 + SDXL_POOLED_DIM)


def tiny_sdxl_text_encoder_2(seed: int = 4):
    """OpenCLIP-bigG-shaped: CLIPTextModelWithProjection (pooled output through text_projection, GELU)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    width = SDXL_TEXT_WIDTHS[1]
    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
        projection_dim=SDXL_POOLED_DIM, hidden_act="gelu",
    )
    return CLIPTextModelWithProjection(config).eval()


def tokenizer_2():
    """SDXL's second tokenizer: CLIP's vocabulary, padded with "!" as OpenCLIP pads."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), local_files_only=True, pad_token="!")


def sdxl_scheduler():
    """SDXL base's own scheduler settings (Euler, scaled-linear betas, leading spacing)."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler.from_pretrained(str(SHIPPED_CONFIGS_DIR / "base" / "sdxl"), subfolder="scheduler")


def tiny_sdxl_components(seed: int = 0, **unet_overrides) -> dict:
    """Everything a StableDiffusionXL(ControlNet)Pipeline needs except the ControlNet."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**dict(sdxl_unet_config(), **unet_overrides))
    _randomize_zero_layers(unet, seed)
    vae = tiny_vae(seed + 2)
    vae.register_to_config(scaling_factor=0.13025)
    return dict(unet=unet.eval(), vae=vae, text_encoder=tiny_text_encoder(SDXL_TEXT_WIDTHS[0], seed + 3),
                text_encoder_2=tiny_sdxl_text_encoder_2(seed + 4), tokenizer=tokenizer(), tokenizer_2=tokenizer_2(),
                scheduler=sdxl_scheduler())


def save_tiny_sdxl_diffusers_base(path, seed: int = 0):
    from diffusers import StableDiffusionXLPipeline

    StableDiffusionXLPipeline(**tiny_sdxl_components(seed)).save_pretrained(str(path), safe_serialization=True)
    return path


def random_ip_adapter_state(unet, variant: str = "plus", embed_dim: int = 32, seed: int = 6, tokens: int = 4,
                            hidden_dims: int = 64) -> dict:
    """A random IP-Adapter in the original file layout ({"image_proj": ..., "ip_adapter": ...}) for a diffusers
    or ldm `unet`: `to_k_ip`/`to_v_ip` for each cross-attention (numbered 1, 3, 5, ...), and a base
    (`proj` + `norm`), plus (4-block resampler, 64-wide heads) or full-face (`proj.0/2/3`) image projection taking
    `embed_dim`-wide CLIP features; "faceid": an MLP over an `embed_dim`-wide identity embedding plus its LoRA."""
    from lib_controlnet.ip_attention import attention_layers
    from lib_controlnet.models.kinds.base_unet import ldm_modules

    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.2):
        return torch.randn(*shape, generator=generator) * scale

    modules = ldm_modules(unet)
    attentions = attention_layers(modules)
    cross = attentions[0].to_k.in_features
    ip = {}
    for i, attention in enumerate(attentions):
        ip[f"{2 * i + 1}.to_k_ip.weight"] = rand(attention.to_k.out_features, cross)
        ip[f"{2 * i + 1}.to_v_ip.weight"] = rand(attention.to_v.out_features, cross)
    ones = lambda n: 1 + rand(n, scale=0.05)  # noqa: E731  (LayerNorm weights near 1)
    if variant == "base":
        proj = {"proj.weight": rand(tokens * cross, embed_dim), "proj.bias": rand(tokens * cross),
                "norm.weight": ones(cross), "norm.bias": rand(cross)}
    elif variant == "faceid":  # MLP over the identity embedding, and a rank-4 LoRA on every attention
        proj = {"proj.0.weight": rand(2 * embed_dim, embed_dim), "proj.0.bias": rand(2 * embed_dim),
                "proj.2.weight": rand(tokens * cross, 2 * embed_dim), "proj.2.bias": rand(tokens * cross),
                "norm.weight": ones(cross), "norm.bias": rand(cross)}
        for n, attention in enumerate(attention_layers(modules, ("attn1", "attn2"))):
            for part, linear in (("q", attention.to_q), ("k", attention.to_k), ("v", attention.to_v),
                                 ("out", attention.to_out[0])):
                ip[f"{n}.to_{part}_lora.down.weight"] = rand(4, linear.in_features)
                ip[f"{n}.to_{part}_lora.up.weight"] = rand(linear.out_features, 4)
    elif variant == "full-face":
        proj = {"proj.0.weight": rand(embed_dim, embed_dim), "proj.0.bias": rand(embed_dim),
                "proj.2.weight": rand(cross, embed_dim), "proj.2.bias": rand(cross),
                "proj.3.weight": ones(cross), "proj.3.bias": rand(cross)}
    else:
        d = hidden_dims
        proj = {"latents": rand(1, tokens, d, scale=1.0), "proj_in.weight": rand(d, embed_dim), "proj_in.bias": rand(d),
                "proj_out.weight": rand(cross, d), "proj_out.bias": rand(cross),
                "norm_out.weight": ones(cross), "norm_out.bias": rand(cross)}
        for i in range(4):
            proj.update({f"layers.{i}.0.norm1.weight": ones(d), f"layers.{i}.0.norm1.bias": rand(d),
                         f"layers.{i}.0.norm2.weight": ones(d), f"layers.{i}.0.norm2.bias": rand(d),
                         f"layers.{i}.0.to_q.weight": rand(d, d), f"layers.{i}.0.to_kv.weight": rand(2 * d, d),
                         f"layers.{i}.0.to_out.weight": rand(d, d),
                         f"layers.{i}.1.0.weight": ones(d), f"layers.{i}.1.0.bias": rand(d),
                         f"layers.{i}.1.1.weight": rand(4 * d, d), f"layers.{i}.1.3.weight": rand(d, 4 * d)})
    return {"image_proj": proj, "ip_adapter": ip}


def union_from_controlnet(controlnet, n_types: int = 8, seed: int = 0, union_scale: float = 0.05):
    """A ControlNet-Union (ProMax with 8 types) holding `controlnet`'s weights plus random union parts (condition
    transformer, type embeddings); `union_scale` 0 makes the parts add nothing, so it runs as `controlnet` does."""
    from lib_controlnet.models.kinds.union import union_class

    config = controlnet.config
    width = config.block_out_channels[0]
    model = union_class().from_config(dict(config))
    model.add_union_parts(n_types=n_types, width=width, heads=8, layers=1, proj=width,
                          time_dim=config.addition_time_embed_dim)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".ln_" in name:  # layer norms as initialised: weight 1, bias 0
                param.copy_(torch.ones_like(param) if name.endswith("weight") else torch.zeros_like(param))
            elif name.startswith(("spatial_ch_projs.", "control_add_embedding.linear_2")):
                param.copy_(torch.randn(param.shape, generator=generator) * union_scale)
            elif name.startswith(("task_embedding", "transformer_layes.", "control_add_embedding.")):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    missing, unexpected = model.load_state_dict(controlnet.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(("task_embedding", "transformer_layes.", "spatial_ch_projs.",
                                                "control_add_embedding.")) for k in missing)
    return model.eval()


def random_ip_adapter_faceid_plus_state(unet, clip_dim: int = 32, seed: int = 7) -> dict:
    """A random IP-Adapter FaceID plus (v1 and v2 share the layout) for `unet`: FaceID's identity MLP (512 wide,
    4 tokens) and LoRA, then a 4-block `perceiver_resampler` (64-wide heads, no latents) as wide as the UNet's
    cross-attention, reading `clip_dim`-wide CLIP hidden states."""
    state = random_ip_adapter_state(unet, "faceid", embed_dim=512, seed=seed, tokens=4)
    generator = torch.Generator().manual_seed(seed + 1)

    def rand(*shape, scale=0.2):
        return torch.randn(*shape, generator=generator) * scale

    d = state["image_proj"]["norm.weight"].shape[0]
    resampler = {"proj_in.weight": rand(d, clip_dim), "proj_in.bias": rand(d), "proj_out.weight": rand(d, d),
                 "proj_out.bias": rand(d), "norm_out.weight": 1 + rand(d, scale=0.05), "norm_out.bias": rand(d)}
    for i in range(4):
        resampler.update({f"layers.{i}.0.norm1.weight": 1 + rand(d, scale=0.05), f"layers.{i}.0.norm1.bias": rand(d),
                          f"layers.{i}.0.norm2.weight": 1 + rand(d, scale=0.05), f"layers.{i}.0.norm2.bias": rand(d),
                          f"layers.{i}.0.to_q.weight": rand(64, d), f"layers.{i}.0.to_kv.weight": rand(128, d),
                          f"layers.{i}.0.to_out.weight": rand(d, 64),
                          f"layers.{i}.1.0.weight": 1 + rand(d, scale=0.05), f"layers.{i}.1.0.bias": rand(d),
                          f"layers.{i}.1.1.weight": rand(4 * d, d), f"layers.{i}.1.3.weight": rand(d, 4 * d)})
    state["image_proj"].update({f"perceiver_resampler.{k}": v for k, v in resampler.items()})
    return state
