"""Image prompts (IP-Adapter) in the UNet's cross-attention: the hooks of the IP-Adapter kind
(models/kinds/ip_adapter.py), attached through the controller's ATTENTION hook point like any attention kind.

IP-Adapter's decoupled cross-attention: each cross-attention layer (attn2 of every transformer block) attends,
with its own query, to the image tokens through the adapter's `to_k_ip` / `to_v_ip`, and adds
`weight * that` to the text attention's result before the output projection:
    out = to_out(attention(q, k_text, v_text) + weight * attention(q, to_k_ip(tokens), to_v_ip(tokens)))
Done with two module hooks per layer, never a replaced `forward` (the WebUI swaps CrossAttention.forward for its
optimised attentions, which all call `to_q` and `to_out`): a forward hook on `to_q` keeps the query, a forward
pre-hook on `to_out[0]` adds the image attention to its input. The image tokens and their keys/values do not
depend on the step, so they are made once per job (encoding, projection, `to_k_ip`/`to_v_ip` per layer); each
step costs one small attention per layer. Unconditional rows attend to the unconditional tokens (the encoding
of a blank image, or zeros), as diffusers' pipelines and the original code do.

Layer order is diffusers' attention-processor order, which IP-Adapter files are numbered in: the cross-attentions
of the down blocks, then the up blocks, then the middle block (ldm names: input_blocks, output_blocks,
middle_block). FaceID's LoRA acts on every attention's q/k/v/out projections (self and cross) while the unit acts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lib_controlnet.control_units import ControlError, PreparedUnit
from lib_controlnet.hook_handles import removed_on_error

_SECTIONS = {"input_blocks": 0, "output_blocks": 1, "middle_block": 2}
FACE_ENCODER = "face_id"  # the preprocessors' name for insightface's identity embedding (annotators.face_embedding)
FACE_PLUS_ENCODER = "face_id_plus"  # that embedding and CLIP ViT-H of the face aligned to 224x224 (FaceID plus)
AUTO_ENCODER = "auto"  # ip-adapter-auto: whatever the adapter's variant and widths (read from its keys) need
FACE_CLIP = "clip_h"  # the tower FaceID plus was trained with (1280-wide hidden states)


def _order(name: str) -> tuple:
    """Sort key of an ldm attention name in diffusers' processor order (input, output, middle; then numbers)."""
    parts = name.split(".")
    return (_SECTIONS.get(parts[0], 3),) + tuple(int(p) if p.isdigit() else p for p in parts[1:])


def attention_layers(modules: dict, which: tuple = ("attn2",)) -> list:
    """The UNet's attention modules named `which` (attn2: cross-attention), in processor order, from its
    {ldm name: module} map."""
    names = [n for n in modules if n.rsplit(".", 1)[-1] in which and n.split(".")[0] in _SECTIONS]
    return [modules[n] for n in sorted(names, key=_order)]


def _encoder_name(prepared: PreparedUnit) -> str:
    from annotators.clip_vision import ENCODERS
    from lib_controlnet import preprocess

    adapter, module = prepared.model, prepared.unit.module
    face = FACE_PLUS_ENCODER if adapter.reads_face_crops else FACE_ENCODER if adapter.reads_faces else None
    wanted = {FACE_ENCODER: "ip-adapter_face_id", FACE_PLUS_ENCODER: "ip-adapter_face_id_plus"}.get(
        face, "ip-adapter_clip_h or ip-adapter_clip_g")
    if module and module.lower() != "none":
        pre = preprocess.get_preprocessor(module)
        named = pre.image_encoder
        if named != AUTO_ENCODER:
            if named is None or (named if named in (FACE_ENCODER, FACE_PLUS_ENCODER) else None) != face:
                raise ControlError(f"IP-Adapter '{prepared.unit.model}' needs the preprocessor {wanted} (or "
                                   f"ip-adapter-auto), not {module}.")
            return named
    # ip-adapter-auto, or no preprocessor named: the variant's face pipeline, else the tower whose output width
    # the adapter takes (embeds, or hidden states if plus)
    if face is not None:
        return face
    # no preprocessor named: the tower whose output width the adapter takes (embeds, or hidden states if plus)
    widths = {"clip_h": (1024, 1280), "clip_g": (1280, 1664), "clip_vitl": (768, 1024)}
    for name in ENCODERS:
        if widths[name][1 if adapter.uses_hidden_states else 0] == adapter.embed_dim:
            return name
    raise ControlError(f"IP-Adapter '{prepared.unit.model}' takes {adapter.embed_dim}-wide image features that no "
                       "known CLIP encoder gives.")


def _face_features(source) -> tuple[torch.Tensor, torch.Tensor]:
    """FaceID: per image the identity embedding of its best face; the unconditional side is all zeros, as in
    the original FaceID code."""
    from annotators import face_embedding

    if torch.is_tensor(source):
        source = [(image.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy() for image in source.cpu()]
    cond = torch.from_numpy(face_embedding.embed(source))
    return cond, torch.zeros_like(cond[:1])


def _face_plus_tokens(prepared: PreparedUnit) -> torch.Tensor:
    """FaceID plus: the identity embedding of each image's best face, and CLIP ViT-H's penultimate hidden states
    of that face aligned to 224x224; unconditional: zeros and the tower's output for a blank input, as the
    original code and the other extension do. Several images: each input averaged over the images."""
    from annotators import clip_vision, face_embedding

    adapter, source = prepared.model, prepared.source
    if torch.is_tensor(source):
        source = [(image.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy() for image in source.cpu()]
    face, crops = face_embedding.analyse(source, crop_size=224)
    encoder = clip_vision.get_encoder(FACE_CLIP).to(device=adapter.device, dtype=adapter.dtype)
    clip_cond, clip_uncond = clip_vision.encode(encoder, crops, hidden_states=True)
    for width, expected, label in ((face.shape[-1], adapter.embed_dim, "insightface's recogniser"),
                                   (clip_cond.shape[-1], adapter.clip_dim, clip_vision.ENCODERS[FACE_CLIP].label)):
        if width != expected:
            raise ControlError(f"IP-Adapter '{prepared.unit.model}' takes {expected}-wide features but {label} "
                               f"gives {width}.")
    face = torch.from_numpy(face).mean(dim=0, keepdim=True)
    with torch.no_grad():
        return adapter.tokens((torch.cat([torch.zeros_like(face), face]),
                               torch.cat([clip_uncond, clip_cond.mean(dim=0, keepdim=True)])))


def image_tokens(prepared: PreparedUnit) -> torch.Tensor:
    """(2, tokens, width): the unit's unconditional and conditional image tokens. Several images on one unit
    (multi-inputs) are encoded each and their features averaged."""
    from annotators import clip_vision

    adapter = prepared.model
    name = _encoder_name(prepared)
    if name == FACE_ENCODER:
        cond, uncond = _face_features(prepared.source)
        label = "insightface's recogniser"
    elif name == FACE_PLUS_ENCODER:
        return _face_plus_tokens(prepared)
    else:
        # on the adapter's device and dtype: a GPU job encodes on the GPU (the tower stays there until a job
        # elsewhere moves it), a low-VRAM unit on the offload device
        encoder = clip_vision.get_encoder(name).to(device=adapter.device, dtype=adapter.dtype)
        cond, uncond = clip_vision.encode(encoder, prepared.source, adapter.uses_hidden_states)
        label = clip_vision.ENCODERS[name].label
    if cond.shape[-1] != adapter.embed_dim:
        raise ControlError(f"IP-Adapter '{prepared.unit.model}' takes {adapter.embed_dim}-wide image features "
                           f"but {label} gives {cond.shape[-1]}: pick the preprocessor made for it.")
    features = torch.cat([uncond, cond.mean(dim=0, keepdim=True)])
    with torch.no_grad():
        return adapter.tokens(features)


def _region(mask: torch.Tensor, latent_hw, tokens: int) -> torch.Tensor:
    """(B or 1, tokens, 1) weights of a region mask at the resolution of a layer with `tokens` positions."""
    height, width = latent_hw
    factor = 1
    while factor <= 64 and -(-height // factor) * -(-width // factor) != tokens:
        factor *= 2
    size = (-(-height // factor), -(-width // factor))
    if size[0] * size[1] != tokens:
        raise ControlError("An IP-Adapter region mask could not be matched to the UNet's attention resolution.")
    return F.interpolate(mask, size=size, mode="area").flatten(2).transpose(1, 2)




class PromptEmbedding:
    """A unit's image prompt for the job: its tokens (2, T, width), and each layer's keys and values made from
    them at the layer's first use (cached with the job's embedding, so dropped when the job ends)."""

    def __init__(self, tokens: torch.Tensor):
        self.tokens = tokens
        self._layers: dict = {}

    def keys_values(self, adapter, layer: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (layer, str(device), dtype)
        if key not in self._layers:
            tokens = self.tokens.to(device=adapter.device, dtype=adapter.dtype)
            with torch.no_grad():
                self._layers[key] = (adapter.to_k_ip[layer](tokens).to(device=device, dtype=dtype),
                                     adapter.to_v_ip[layer](tokens).to(device=device, dtype=dtype))
        return self._layers[key]


def embed_unit(prepared: PreparedUnit) -> PromptEmbedding:
    return PromptEmbedding(image_tokens(prepared))


class _Rows:
    """Per UNet call: which token set each row reads, its weight, and the region at each layer resolution."""

    def __init__(self):
        self.call, self.choice, self.scale, self.regions = None, None, None, {}

    def update(self, call, device) -> None:
        if call is self.call:
            return
        self.call, self.regions = call, {}
        self.choice = torch.tensor([1 if c else 0 for c in call.cond], dtype=torch.long, device=device)
        scale = torch.zeros(len(call.cond), dtype=torch.float32)
        scale[call.selection] = float(call.scale)  # rows outside the selection ("ControlNet is more important")
        self.scale = scale.to(device).view(-1, 1, 1)

    def region(self, tokens: int) -> torch.Tensor | None:
        mask = self.call.mask
        if mask is None:
            return None
        if tokens not in self.regions:
            union = mask.amax(dim=0, keepdim=True)  # one region for the unit: the union of its images' masks
            latent = (union.shape[-2] // 8, union.shape[-1] // 8)
            self.regions[tokens] = _region(F.interpolate(union, size=latent, mode="area"), latent, tokens)
        return self.regions[tokens]


def attach(adapter, modules: dict, current, name: str = "IP-Adapter") -> list:
    """Hook `adapter` onto the UNet's attentions (`modules`: ldm name -> module); the hooks read `current()`,
    the unit's AttentionCall for the call under way (embeddings: a PromptEmbedding), or None."""
    cross = attention_layers(modules)
    if len(cross) != len(adapter.to_k_ip):
        raise ControlError(f"IP-Adapter '{name}' has {len(adapter.to_k_ip)} cross-attention layers but this UNet "
                           f"has {len(cross)}: it was made for another base model (SD1.5 / SDXL).")
    handles, rows, queries = [], _Rows(), {}
    with removed_on_error(handles):
        if adapter.lora is not None:
            everything = attention_layers(modules, ("attn1", "attn2"))
            if len(everything) != len(adapter.lora):
                raise ControlError(f"IP-Adapter '{name}' has a LoRA for {len(adapter.lora)} attentions but this UNet "
                                   f"has {len(everything)}: it was made for another base model (SD1.5 / SDXL).")
            # registered before the query hooks: the query the image attention reads holds the LoRA's part
            for layer, attention in enumerate(everything):
                for part, linear in (("q", attention.to_q), ("k", attention.to_k), ("v", attention.to_v),
                                     ("out", attention.to_out[0])):
                    handles.append(linear.register_forward_hook(_lora_hook(adapter, current, layer, part)))
        for layer, attention in enumerate(cross):
            handles.append(attention.to_q.register_forward_hook(_query_hook(current, queries, layer)))
            handles.append(attention.to_out[0].register_forward_pre_hook(
                _output_hook(adapter, current, queries, rows, layer, attention.heads)))
    return handles


def _lora_hook(adapter, current, layer: int, part: str):
    """FaceID's LoRA: projection(x) + up(down(x)) on every row, while the unit acts."""
    lora = adapter.lora[layer][part]

    def hook(module, args, output):
        if current() is None:
            return None
        return output + lora(args[0].to(adapter.dtype)).to(output.dtype)

    return hook


def _query_hook(current, queries: dict, layer: int):
    def hook(module, args, output):
        if current() is not None:
            queries[layer] = output
        return None

    return hook


def _output_hook(adapter, current, queries: dict, rows: _Rows, layer: int, heads: int):
    def hook(module, args):
        query = queries.pop(layer, None)
        call = current()
        if call is None or query is None:
            return None
        rows.update(call, query.device)
        batch, positions, inner = query.shape
        keys, values = call.embeddings.keys_values(adapter, layer, query.device, query.dtype)
        q = query.view(batch, positions, heads, inner // heads).transpose(1, 2)
        k = keys.index_select(0, rows.choice).view(batch, -1, heads, inner // heads).transpose(1, 2)
        v = values.index_select(0, rows.choice).view(batch, -1, heads, inner // heads).transpose(1, 2)
        extra = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, positions, inner)
        extra = extra * rows.scale.to(extra.dtype)
        region = rows.region(positions)
        if region is not None:
            extra = extra * region.to(device=extra.device, dtype=extra.dtype)
        return (args[0] + extra.to(args[0].dtype), *args[1:])

    return hook
