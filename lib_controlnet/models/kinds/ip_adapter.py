"""IP-Adapter (tencent-ailab / h94): image tokens that join every cross-attention of the UNet.

A file holds two groups (`.bin`: a dict {"image_proj": {...}, "ip_adapter": {...}}; `.safetensors`: the same
keys with the group name as a prefix):
- `image_proj`: turns a CLIP vision encoder's output into tokens of the UNet's cross-attention width:
  base: `proj` (Linear embed -> tokens * width) + `norm` (LayerNorm), fed the encoder's projected `image_embeds`;
  full-face: `proj.0` / `proj.2` (MLP) + `proj.3` (LayerNorm), fed the penultimate hidden states (one token each);
  plus: a perceiver resampler (`latents`, `proj_in`, `layers.{i}.0` attention, `layers.{i}.1` feed-forward,
  `proj_out`, `norm_out`), fed the penultimate hidden states.
- `ip_adapter`: `{n}.to_k_ip.weight` / `{n}.to_v_ip.weight` for each cross-attention layer, n = 1, 3, 5, ...
  (the odd slots of diffusers' attention-processor order: down blocks, up blocks, then the middle block).
  The keys' input width is the UNet's cross-attention width: 768 SD1.5, 1024 SD2, 2048 SDXL.
Which CLIP encoder a file needs follows from the width its projection takes (1024: ViT-H/14, 1280: ViT-bigG,
also the hidden width of ViT-H for plus files).
The projections are diffusers' own modules; `to_k_ip` / `to_v_ip` are plain linear layers the attention hooks
(lib_controlnet/ip_attention.py) read.
FaceID (`proj.0` / `proj.2` MLP + `norm` over a 512-wide insightface identity embedding) also carries a LoRA
for every attention of the UNet in its `ip_adapter` group: `{n}.to_{q,k,v,out}_lora.{down,up}.weight`, n
counting self- and cross-attentions alike (attn1 = 0, attn2 = 1, ...); it is applied with the image prompt.
FaceID plus and plus v2 (`proj.0` / `proj.2` / `norm` as FaceID, then `perceiver_resampler.*`: a plus
resampler without `latents`) turn the identity embedding into the resampler's queries, which then attend to the
CLIP ViT-H penultimate hidden states of the face aligned to 224x224; v2 adds those queries back to the result
("shortcut", scale 1 as the other extension uses). v1 and v2 files hold the same keys, so v2 is the one fact
read from the file name ("v2" in it, as the released `ip-adapter-faceid-plusv2_*` files and the other extension
have it). Their LoRA is in the `ip_adapter` group as FaceID's.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path

import torch

from lib_controlnet.models.errors import ModelFileError
from lib_controlnet.models.kinds.base import ATTENTION, FileKeys, Kind
from lib_controlnet.models.loading import read_tensors

BASE, PLUS, FULL_FACE, FACE_ID, FACE_ID_PLUS = "base", "plus", "full-face", "FaceID", "FaceID plus"
_LORA_KEY = re.compile(r"^(\d+)\.to_(q|k|v|out)_lora\.(down|up)\.weight$")
_IP_KEY = re.compile(r"^(\d+)\.(to_k_ip|to_v_ip)\.weight$")
_PLUS_ATTENTION = re.compile(r"^layers\.(\d+)\.0\.(to_q|to_kv|to_out|norm1|norm2)\.(weight|bias)$")
_PLUS_FEED_FORWARD = {"0": "ff.0", "1": "ff.1.net.0.proj", "3": "ff.1.net.2"}
_PLUS_HEAD_DIM = 64  # the resampler's attention heads are 64 wide in every released file


def _groups(keys: FileKeys) -> tuple[dict, dict]:
    proj = {k[len("image_proj."):]: s for k, s in keys.shapes.items() if k.startswith("image_proj.")}
    ip = {k[len("ip_adapter."):]: s for k, s in keys.shapes.items() if k.startswith("ip_adapter.")}
    return proj, ip


def variant_of(proj_shapes: dict, name: str = "The file") -> str:
    if "perceiver_resampler.proj_in.weight" in proj_shapes:
        return FACE_ID_PLUS
    if "norm.weight" in proj_shapes and "proj.2.weight" in proj_shapes:
        return FACE_ID
    if "latents" in proj_shapes:
        return PLUS
    if "proj.3.weight" in proj_shapes:
        return FULL_FACE
    if "proj.weight" in proj_shapes and "norm.weight" in proj_shapes:
        return BASE
    raise ModelFileError(f"{name} is an IP-Adapter whose image projection has a layout this version does not know.")


class IPAdapter(torch.nn.Module):
    """A loaded IP-Adapter: `image_proj` (CLIP output -> tokens) and one (to_k_ip, to_v_ip) per cross-attention
    layer, in diffusers' attention-processor order."""

    def __init__(self, variant: str, image_proj: torch.nn.Module, layer_shapes: list[tuple[int, int]],
                 embed_dim: int, n_tokens: int, lora_shapes: list | None = None, clip_dim: int | None = None,
                 shortcut: bool = False):
        super().__init__()
        self.variant, self.embed_dim, self.n_tokens = variant, embed_dim, n_tokens
        # FaceID plus: the width of the CLIP hidden states it also reads; v2: the shortcut and its scale
        self.clip_dim, self.shortcut, self.shortcut_scale = clip_dim, shortcut, 1.0
        self.image_proj = image_proj
        self.to_k_ip = torch.nn.ModuleList(torch.nn.Linear(i, o, bias=False) for o, i in layer_shapes)
        self.to_v_ip = torch.nn.ModuleList(torch.nn.Linear(i, o, bias=False) for o, i in layer_shapes)
        # per attention (self and cross, in order): {"q"|"k"|"v"|"out": Sequential(down, up)}
        self.lora = None if not lora_shapes else torch.nn.ModuleList(
            torch.nn.ModuleDict({name: torch.nn.Sequential(torch.nn.Linear(down[1], down[0], bias=False),
                                                           torch.nn.Linear(up[1], up[0], bias=False))
                                 for name, (down, up) in layer.items()}) for layer in lora_shapes)

    @property
    def cross_attention_dim(self) -> int:
        return self.to_k_ip[0].in_features

    @property
    def uses_hidden_states(self) -> bool:
        """Plus, full-face and FaceID plus read the encoder's penultimate hidden states; base its projected
        image_embeds."""
        return self.variant in (PLUS, FULL_FACE, FACE_ID_PLUS)

    @property
    def reads_faces(self) -> bool:
        """FaceID (and FaceID plus) read an insightface identity embedding, not (only) a CLIP encoding."""
        return self.variant in (FACE_ID, FACE_ID_PLUS)

    @property
    def reads_face_crops(self) -> bool:
        """FaceID plus also reads the CLIP encoding of each image's face aligned to 224x224."""
        return self.variant == FACE_ID_PLUS

    @property
    def device(self):
        return self.to_k_ip[0].weight.device

    @property
    def dtype(self):
        return self.to_k_ip[0].weight.dtype

    def tokens(self, encoded) -> torch.Tensor:
        """(N, n_tokens, cross_attention_dim) image tokens from the encoder output this variant reads (FaceID
        plus: a pair, identity embeddings (N, 512) and CLIP hidden states (N, patches, width))."""
        if self.variant == FACE_ID_PLUS:
            face, clip = (t.to(device=self.device, dtype=self.dtype) for t in encoded)
            return self.image_proj(face, clip, self.shortcut, self.shortcut_scale)
        return self.image_proj(encoded.to(device=self.device, dtype=self.dtype))


@functools.lru_cache(maxsize=None)
def _face_plus_class():
    """diffusers' FaceID plus projection (its modules and names), called with the CLIP hidden states as an
    argument rather than an attribute set beforehand, and with the v2 shortcut per call."""
    from diffusers.models.embeddings import IPAdapterFaceIDPlusImageProjection

    class FaceIDPlusProjection(IPAdapterFaceIDPlusImageProjection):
        def forward(self, face, clip, shortcut: bool = False, scale: float = 1.0):
            queries = self.norm(self.proj(face).reshape(-1, self.num_tokens, self.embed_dim))
            context = self.proj_in(clip)
            latents = queries
            for block in self.layers:
                latents = block(context, latents, latents)
            out = self.norm_out(self.proj_out(latents))
            return queries + scale * out if shortcut else out

    return FaceIDPlusProjection


def _projection(variant: str, proj: dict, cross_dim: int, name: str):
    from diffusers.models.embeddings import ImageProjection, IPAdapterFullImageProjection, IPAdapterPlusImageProjection

    if variant == BASE:
        embed, tokens = proj["proj.weight"][1], proj["proj.weight"][0] // cross_dim
        return ImageProjection(image_embed_dim=embed, cross_attention_dim=cross_dim,
                               num_image_text_embeds=tokens), embed, tokens
    if variant == FACE_ID:
        from diffusers.models.embeddings import IPAdapterFaceIDImageProjection

        embed, hidden = proj["proj.0.weight"][1], proj["proj.0.weight"][0]
        tokens = proj["proj.2.weight"][0] // cross_dim
        return IPAdapterFaceIDImageProjection(image_embed_dim=embed, cross_attention_dim=cross_dim,
                                              mult=hidden / embed, num_tokens=tokens), embed, tokens
    if variant == FACE_ID_PLUS:
        if not {"proj.0.weight", "proj.2.weight", "norm.weight", "perceiver_resampler.proj_out.weight"} <= set(proj):
            raise ModelFileError(f"{name} is an IP-Adapter FaceID plus file without its identity projection "
                                 "(proj.0, proj.2, norm) or resampler output.")
        face, hidden = proj["proj.0.weight"][1], proj["proj.0.weight"][0]
        width, clip = proj["perceiver_resampler.proj_in.weight"]
        resampler = {k[len("perceiver_resampler."):]: v for k, v in proj.items()
                     if k.startswith("perceiver_resampler.")}
        depth = len({m.group(1) for k in resampler if (m := _PLUS_ATTENTION.match(k))})
        if depth != 4:
            raise ModelFileError(f"{name} is an IP-Adapter FaceID plus file with a {depth}-block resampler; four "
                                 "are expected.")
        model = _face_plus_class()(
            embed_dims=width, output_dims=resampler["proj_out.weight"][0], hidden_dims=clip, id_embeddings_dim=face,
            depth=4, dim_head=_PLUS_HEAD_DIM, heads=resampler["layers.0.0.to_q.weight"][0] // _PLUS_HEAD_DIM,
            num_tokens=proj["proj.2.weight"][0] // width, ffn_ratio=resampler["layers.0.1.1.weight"][0] / width,
            ffproj_ratio=hidden / face)
        return model, face, proj["proj.2.weight"][0] // width
    if variant == FULL_FACE:
        embed = proj["proj.0.weight"][1]
        return IPAdapterFullImageProjection(image_embed_dim=embed, cross_attention_dim=cross_dim), embed, 257
    depth = len({m.group(1) for k in proj if (m := _PLUS_ATTENTION.match(k))})
    if depth != 4:  # diffusers' resampler (and every released plus file) has four blocks
        raise ModelFileError(f"{name} is an IP-Adapter plus file with a {depth}-block resampler; four are expected.")
    latents = proj["latents"]
    model = IPAdapterPlusImageProjection(
        embed_dims=proj["proj_in.weight"][1], output_dims=proj["proj_out.weight"][0], hidden_dims=latents[2],
        heads=proj["layers.0.0.to_q.weight"][0] // _PLUS_HEAD_DIM, num_queries=latents[1])
    return model, proj["proj_in.weight"][1], latents[1]


def _projection_state(variant: str, tensors: dict) -> dict:
    """image_proj tensors (group prefix removed) under the names of diffusers' projection modules."""
    if variant == BASE:
        return {k.replace("proj.", "image_embeds.", 1) if k.startswith("proj.") else k: v for k, v in tensors.items()}
    if variant == FACE_ID:
        names = {"proj.0": "ff.net.0.proj", "proj.2": "ff.net.2", "norm": "norm"}
        return {names[k.rsplit(".", 1)[0]] + "." + k.rsplit(".", 1)[1]: v for k, v in tensors.items()}
    if variant == FULL_FACE:
        names = {"proj.0": "ff.net.0.proj", "proj.2": "ff.net.2", "proj.3": "norm"}
        return {names[k.rsplit(".", 1)[0]] + "." + k.rsplit(".", 1)[1]: v for k, v in tensors.items()}
    out = {}
    if variant == FACE_ID_PLUS:  # the identity MLP, then the resampler under the plus names (no latents)
        names = {"proj.0": "proj.net.0.proj", "proj.2": "proj.net.2", "norm": "norm"}
        for key, tensor in tensors.items():
            if not key.startswith("perceiver_resampler."):
                out[names[key.rsplit(".", 1)[0]] + "." + key.rsplit(".", 1)[1]] = tensor
        return dict(out, **_projection_state(PLUS, {k[len("perceiver_resampler."):]: v for k, v in tensors.items()
                                                    if k.startswith("perceiver_resampler.")}))
    for key, tensor in tensors.items():
        if m := _PLUS_ATTENTION.match(key):
            i, part, leaf = m.groups()
            if part == "to_kv":  # one matrix in the file, two in diffusers' Attention
                k, v = tensor.chunk(2, dim=0)
                out[f"layers.{i}.attn.to_k.{leaf}"], out[f"layers.{i}.attn.to_v.{leaf}"] = k, v
            else:
                name = {"to_q": "attn.to_q", "to_out": "attn.to_out.0", "norm1": "ln0", "norm2": "ln1"}[part]
                out[f"layers.{i}.{name}.{leaf}"] = tensor
        elif m := re.match(r"^layers\.(\d+)\.1\.(\d)\.(weight|bias)$", key):
            out[f"layers.{m.group(1)}.{_PLUS_FEED_FORWARD.get(m.group(2), m.group(2))}.{m.group(3)}"] = tensor
        else:
            out[key] = tensor  # latents, proj_in, proj_out, norm_out: same names
    return out


def load_ip_adapter(path: Path, keys: FileKeys, dtype=None, device="cpu") -> IPAdapter:
    from accelerate import init_empty_weights

    from lib_controlnet.models.controlnet_loader import assign_weights, parse_dtype

    name = Path(path).name
    proj_shapes, ip_shapes = _groups(keys)
    variant = variant_of(proj_shapes, name)
    slots = sorted({int(m.group(1)) for k in ip_shapes if (m := _IP_KEY.match(k))})
    if not slots or slots != list(range(1, 2 * len(slots), 2)):
        raise ModelFileError(f"{name} looks like an IP-Adapter but its ip_adapter layers are not numbered 1, 3, 5, ...")
    layer_shapes = [tuple(ip_shapes[f"{n}.to_k_ip.weight"]) for n in slots]
    cross_dim = layer_shapes[0][1]
    lora_slots = sorted({int(m.group(1)) for k in ip_shapes if (m := _LORA_KEY.match(k))})
    if lora_slots and lora_slots != list(range(2 * len(slots))):
        raise ModelFileError(f"{name} has LoRA weights for {len(lora_slots)} attentions; {2 * len(slots)} expected "
                             "(every self- and cross-attention).")
    lora_shapes = [{p: (ip_shapes[f"{n}.to_{p}_lora.down.weight"], ip_shapes[f"{n}.to_{p}_lora.up.weight"])
                    for p in ("q", "k", "v", "out")} for n in lora_slots]
    with init_empty_weights():
        projection, embed, tokens = _projection(variant, proj_shapes, cross_dim, name)
        clip_dim = proj_shapes["perceiver_resampler.proj_in.weight"][1] if variant == FACE_ID_PLUS else None
        model = IPAdapter(variant, projection, layer_shapes, embed, tokens, lora_shapes, clip_dim=clip_dim,
                          shortcut=variant == FACE_ID_PLUS and "v2" in Path(path).stem.lower())
    tensors = read_tensors(keys.weights_path)
    state = {f"image_proj.{k}": v for k, v in _projection_state(variant, {
        k[len("image_proj."):]: v for k, v in tensors.items() if k.startswith("image_proj.")}).items()}
    for index, n in enumerate(slots):
        state[f"to_k_ip.{index}.weight"] = tensors[f"ip_adapter.{n}.to_k_ip.weight"]
        state[f"to_v_ip.{index}.weight"] = tensors[f"ip_adapter.{n}.to_v_ip.weight"]
    for n in lora_slots:
        for p in ("q", "k", "v", "out"):
            state[f"lora.{n}.{p}.0.weight"] = tensors[f"ip_adapter.{n}.to_{p}_lora.down.weight"]
            state[f"lora.{n}.{p}.1.weight"] = tensors[f"ip_adapter.{n}.to_{p}_lora.up.weight"]
    model = assign_weights(model, state, name, f"IP-Adapter {variant}")
    dtype = parse_dtype(dtype)
    if dtype is not None or str(device) != "cpu":
        model = model.to(device=device, dtype=dtype)
    return model


def _is_ip_adapter(keys: FileKeys) -> bool:
    return bool({"image_proj", "ip_adapter"} & set(keys.nested)) or keys.any_startswith("image_proj.", "ip_adapter.")


class IPAdapterKind(Kind):
    name = "IP-Adapter"
    control = ATTENTION

    def recognises(self, keys: FileKeys) -> bool:
        return _is_ip_adapter(keys)

    def load(self, path: Path, keys: FileKeys, dtype=None, device="cpu"):
        return load_ip_adapter(path, keys, dtype=dtype, device=device)

    def made_for(self, keys: FileKeys) -> str | None:
        """The base its cross-attention width names (768 SD1.5, 1024 SD2, 2048 SDXL); None for other widths."""
        shape = keys.shapes.get("ip_adapter.1.to_k_ip.weight")
        return {768: "sd15", 1024: "sd2", 2048: "sdxl"}.get(shape[1]) if shape and len(shape) == 2 else None

    def n_outputs(self, model) -> int:
        return len(model.to_k_ip)  # one per cross-attention layer of the UNet

    def owns(self, model) -> bool:
        return isinstance(model, IPAdapter)

    averages_images = True  # several images on one unit are one prompt (multi-inputs), not one per batch image

    def embed_unit(self, prepared, width: int, height: int):
        """The unit's image tokens, from its images as given (not resized to the generation size) through the
        encoder its preprocessor names; once per job."""
        from lib_controlnet.ip_attention import embed_unit

        return embed_unit(prepared)

    def attach(self, model, modules: dict, current) -> list:
        from lib_controlnet.ip_attention import attach

        return attach(model, modules, current)


IP_ADAPTER = IPAdapterKind()
