"""T2I-Adapter style tokens in the UNet's cross-attention: the hooks of the style kind (models/kinds/t2i_style.py),
attached through the controller's ATTENTION hook point like any attention kind.

The style adapter turns CLIP ViT-L/14's last hidden states of the reference image (preprocessor
t2ia_style_clipvision, tower `clip_vitl.pth`) into a few tokens of the text width; as in TencentARC's sampler,
the conditional rows' context becomes [text, weight * style tokens], and the unconditional rows' context is
padded to the same length with its own last tokens repeated (TencentARC pads the negative prompt's context that
way so both halves of the CFG batch have one length). Start / end and weight 0: no tokens at all (the plain UNet).
Done with a forward hook on each cross-attention's `to_k` and `to_v` (never a replaced `forward`: the WebUI's
optimised attentions all call them): the hook appends the projected tokens to the keys and values, which is
attention over the longer context because the projections act token by token. The tokens are made once per
job; each step costs two small matrix products per layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lib_controlnet.control_units import ControlError, PreparedUnit
from lib_controlnet.hook_handles import removed_on_error
from lib_controlnet.ip_attention import attention_layers

ENCODER = "clip_vitl"  # the tower the released style model was trained on (annotators.clip_vision)


def _check_preprocessor(prepared: PreparedUnit) -> None:
    from lib_controlnet import preprocess

    module = prepared.unit.module
    if module and module.lower() != "none" and preprocess.get_preprocessor(module).image_encoder != ENCODER:
        raise ControlError(f"T2I-Adapter style model '{prepared.unit.model}' needs the preprocessor "
                           f"t2ia_style_clipvision, not {module}.")


@torch.no_grad()
def style_tokens(prepared: PreparedUnit) -> torch.Tensor:
    """(1, tokens, context width): the unit's style tokens. Several images on one unit are encoded each and their
    hidden states averaged (one style)."""
    from annotators import clip_vision

    adapter = prepared.model
    _check_preprocessor(prepared)
    if prepared.mask is not None:
        raise ControlError(f"T2I-Adapter style model '{prepared.unit.model}' acts on the whole image; remove the "
                           "unit's mask.")
    encoder = clip_vision.get_encoder(ENCODER).to(device=adapter.device, dtype=adapter.dtype)
    pixels = clip_vision.pixel_values(prepared.source, encoder.config.image_size)
    hidden = encoder(pixel_values=pixels.to(device=adapter.device, dtype=adapter.dtype)).last_hidden_state
    if hidden.shape[-1] != adapter.width:
        raise ControlError(f"T2I-Adapter style model '{prepared.unit.model}' takes {adapter.width}-wide image "
                           f"features but {clip_vision.ENCODERS[ENCODER].label} gives {hidden.shape[-1]}.")
    return adapter(hidden.mean(dim=0, keepdim=True))


def attach(adapter, modules: dict, current, name: str = "T2I-Adapter style") -> list:
    """Hook `adapter`'s tokens onto the UNet's cross-attentions (`modules`: ldm name -> module); the hooks read
    `current()`, the unit's AttentionCall for the call under way (embeddings: the style tokens), or None."""
    cross = attention_layers(modules)
    widths = {attention.to_k.in_features for attention in cross}
    if widths != {adapter.context_dim}:
        raise ControlError(f"{name} model gives {adapter.context_dim}-wide tokens but this UNet's text context is "
                           f"{'/'.join(map(str, sorted(widths)))} wide: it was made for SD1.5.")
    rows = _Rows()
    with removed_on_error([]) as handles:
        for attention in cross:
            for projection in (attention.to_k, attention.to_v):
                handles.append(projection.register_forward_hook(_append_hook(current, rows)))
    return handles


class _Rows:
    """Per UNet call: which rows of the batch read the style tokens (conditional rows the unit acts on)."""

    def __init__(self):
        self.call, self.styled = None, None

    def update(self, call, device) -> torch.Tensor:
        if call is not self.call:
            styled = torch.zeros(len(call.cond), dtype=torch.bool)
            styled[call.selection] = True
            styled &= torch.tensor([bool(c) for c in call.cond], dtype=torch.bool)
            self.call, self.styled = call, styled.view(-1, 1, 1)
        return self.styled.to(device)


def _append_hook(current, rows: _Rows):
    def hook(module, args, output):
        call = current()
        if call is None:
            return None
        tokens = call.embeddings
        count = tokens.shape[1]
        if output.shape[0] != len(call.cond) or output.shape[1] < count:
            raise ControlError("The T2I-Adapter style tokens could not be matched to the UNet's batch.")
        scaled = (tokens * call.scale).to(device=module.weight.device, dtype=module.weight.dtype)
        # the projection's own weights, not a call of the module (which would run this hook again)
        projected = F.linear(scaled, module.weight, module.bias).to(output.dtype)
        padding = output[:, -count:]  # unconditional rows: their own last tokens again
        extra = torch.where(rows.update(call, output.device), projected.expand_as(padding), padding)
        return torch.cat([output, extra], dim=1)

    return hook
