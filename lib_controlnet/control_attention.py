"""A ControlNet's attention layers during a job: diffusers' scaled-dot-product attention, with the keys and values
of the text kept while the text and the weights stay the same.

A ControlNet's cross-attention keys and values depend only on the prompt embedding and the layer's weights, not
on the step, yet diffusers' processor projects them again on every call: on an SDXL-size ControlNet at 512 px
that is about 5 % of its time on the CPU, every step. Its processor also divides every attention output by
`rescale_output_factor`, 1.0 in every Stable Diffusion ControlNet: a full pass over the output for nothing.

`keep_text_keys(model)` gives the model's plain attention layers (diffusers' `AttnProcessor2_0` with no norms,
masks or rescaling: what SD1.5, SD2 and SDXL ControlNets have) a processor that computes exactly what diffusers'
computes, without the division and with the text's keys and values remembered for the last few prompt
embeddings (a WebUI job may alternate cond and uncond calls, or change prompt mid-job). A text is compared by
value with the remembered ones once per forward (the layers after the first see the same tensor, unchanged: its
version counter has not moved), so the keys in use always belong to the text given; a weight changed in place
(its version counter moves) or moved to another device drops them. Anything else (training, masks, other
layouts) runs diffusers' own processor. `release(model)` empties the memory at the end of a job.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

_KEEP = 4  # texts remembered per model: cond, uncond and the odd prompt-schedule switch
_PLAIN = AttnProcessor2_0()


class _Texts:
    """The last few text embeddings one model's layers saw (copies: a caller may reuse its tensor in place)."""

    def __init__(self):
        self.entries: list[tuple[int, torch.Tensor]] = []
        self._next = 0
        # (tensor, its version counter, key) of the last text matched: every layer of one forward gets the same
        # tensor, so one comparison by value per forward (on a GPU, one sync) instead of one per layer
        self.last: Optional[tuple] = None

    def key_of(self, text: torch.Tensor) -> int:
        version = _version(text)
        if self.last is not None and self.last[0] is text and version is not None and self.last[1] == version:
            return self.last[2]
        key = self._match(text)
        self.last = (text, version, key)
        return key

    def _match(self, text: torch.Tensor) -> int:
        for key, kept in self.entries:
            if kept.shape == text.shape and kept.dtype == text.dtype and kept.device == text.device \
                    and torch.equal(kept, text):
                return key
        self._next += 1
        self.entries = [(self._next, text.detach().clone())] + self.entries[:_KEEP - 1]
        return self._next

    def clear(self) -> None:
        self.entries.clear()
        self.last = None

    def live(self) -> set:
        return {key for key, _ in self.entries}


class TextKeysProcessor:
    """diffusers' AttnProcessor2_0 for a plain attention layer, with the text's keys/values kept (see above)."""

    def __init__(self, texts: _Texts):
        self.texts = texts
        self.kept: dict[int, tuple[tuple, torch.Tensor, torch.Tensor]] = {}

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, temb: Optional[torch.Tensor] = None, *args, **kwargs):
        if attention_mask is not None or temb is not None or hidden_states.ndim != 3 or args or kwargs \
                or torch.is_grad_enabled():
            return _PLAIN(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        batch = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            key, value = attn.to_k(hidden_states), attn.to_v(hidden_states)
        else:
            key, value = self._text_keys(attn, encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out))

    def _text_keys(self, attn: Attention, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights = tuple((p.data_ptr(), p._version) for p in (*attn.to_k.parameters(), *attn.to_v.parameters()))
        key = self.texts.key_of(text)
        kept = self.kept.get(key)
        if kept is not None and kept[0] == weights:
            return kept[1], kept[2]
        live = self.texts.live()
        self.kept = {k: v for k, v in self.kept.items() if k in live}
        self.kept[key] = (weights, attn.to_k(text), attn.to_v(text))
        return self.kept[key][1], self.kept[key][2]


def _version(tensor: torch.Tensor) -> Optional[int]:
    """The tensor's in-place-write counter; None for inference tensors, which keep none (compared every time)."""
    try:
        return tensor._version
    except RuntimeError:
        return None


def _plain_layer(attn: Attention) -> bool:
    return (type(attn.processor) is AttnProcessor2_0 and attn.spatial_norm is None and attn.group_norm is None
            and attn.norm_q is None and attn.norm_k is None and not attn.residual_connection
            and attn.rescale_output_factor == 1.0 and not attn.norm_cross and len(attn.to_out) == 2)


def keep_text_keys(model: torch.nn.Module) -> int:
    """Give the model's plain attention layers the text-keeping processor; how many got it. Idempotent."""
    texts = None
    count = 0
    for module in model.modules():
        if isinstance(module, Attention) and isinstance(module.processor, TextKeysProcessor):
            texts = module.processor.texts
    texts = texts or _Texts()
    for module in model.modules():
        if isinstance(module, Attention) and _plain_layer(module):
            module.set_processor(TextKeysProcessor(texts))
            count += 1
    return count


def release(model: torch.nn.Module) -> None:
    """Forget the kept texts and keys (end of a job); the processors stay and refill on the next job."""
    for module in model.modules():
        if isinstance(module, Attention) and isinstance(module.processor, TextKeysProcessor):
            module.processor.kept.clear()
            module.processor.texts.clear()
