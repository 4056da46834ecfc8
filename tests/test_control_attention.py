"""The ControlNet's attention with the text's keys kept across steps: the same numbers as diffusers' own processor
for every call, fresh keys when the text or a weight changes, training and unusual layers left to diffusers."""
import copy

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from lib_controlnet import control_attention, tiny_models
from lib_controlnet.control_attention import TextKeysProcessor, keep_text_keys, release


def _inputs(model, seed, batch=2):
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    x = torch.randn(batch, 4, 8, 8, generator=generator)
    text = torch.randn(batch, 5, config.cross_attention_dim, generator=generator)
    kwargs = dict(controlnet_cond=torch.rand(batch, 3, 64, 64, generator=generator))
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = dict(text_embeds=torch.randn(batch, pooled, generator=generator),
                                           time_ids=torch.tensor([[64., 64, 0, 0, 64, 64]] * batch))
    return x, text, kwargs


def _outputs(model, x, text, kwargs, t=10):
    out = model(x, torch.tensor(t), text, **kwargs)
    return [*out.down_block_res_samples, out.mid_block_res_sample]


def _processors(model):
    return [m.processor for m in model.modules() if isinstance(m, Attention)]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_kept_text_keys_give_diffusers_numbers_step_after_step_and_for_a_new_text(family):
    plain = tiny_models.tiny_controlnet(family)
    kept = copy.deepcopy(plain)
    layers = keep_text_keys(kept)
    assert layers == len(_processors(plain)) > 0 and keep_text_keys(kept) == 0  # idempotent
    assert all(isinstance(p, TextKeysProcessor) for p in _processors(kept))
    x, text, kwargs = _inputs(plain, 0)
    other_text = _inputs(plain, 1)[1]
    with torch.inference_mode():
        for step, (t, words) in enumerate([(900, text), (700, text), (500, other_text), (300, text)]):
            expected = _outputs(plain, x + step, words, kwargs, t)
            got = _outputs(kept, x + step, words, kwargs, t)
            for a, b in zip(got, expected):
                assert torch.equal(a, b), (family, step)
    texts = _processors(kept)[0].texts
    assert len(texts.entries) == 2  # the two prompts, each projected once per layer


def test_a_weight_changed_in_place_and_a_reused_text_tensor_get_fresh_keys():
    plain = tiny_models.tiny_controlnet("sd15")
    kept = copy.deepcopy(plain)
    keep_text_keys(kept)
    x, text, kwargs = _inputs(plain, 0)
    with torch.inference_mode():
        _outputs(kept, x, text, kwargs)
        for model in (plain, kept):  # a merge that edits weights in place (as a LoRA would)
            for module in model.modules():
                if isinstance(module, Attention) and module.is_cross_attention:
                    module.to_k.weight.mul_(1.5)
        for a, b in zip(_outputs(kept, x, text, kwargs), _outputs(plain, x, text, kwargs)):
            assert torch.equal(a, b)
        text.mul_(-1)  # the caller reuses its tensor for another prompt
        for a, b in zip(_outputs(kept, x, text, kwargs), _outputs(plain, x, text, kwargs)):
            assert torch.equal(a, b)


def test_training_runs_diffusers_processor_with_gradients_and_release_empties_the_memory():
    plain = tiny_models.tiny_controlnet("sd15").train()
    kept = copy.deepcopy(plain)
    keep_text_keys(kept)
    x, text, kwargs = _inputs(plain, 0)
    sum(o.sum() for o in _outputs(kept, x, text, kwargs)).backward()
    sum(o.sum() for o in _outputs(plain, x, text, kwargs)).backward()
    for (name, a), b in zip(kept.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    assert not _processors(kept)[0].texts.entries  # nothing kept while training
    with torch.inference_mode():
        _outputs(kept.eval(), x, text, kwargs)
    assert any(p.kept for p in _processors(kept))
    release(kept)
    assert not any(p.kept for p in _processors(kept)) and not _processors(kept)[0].texts.entries


def test_layers_with_norms_or_rescaling_keep_diffusers_processor():
    unusual = [Attention(16, cross_attention_dim=8, heads=2, dim_head=8, residual_connection=True),
               Attention(16, heads=2, dim_head=8, rescale_output_factor=2.0),
               Attention(16, heads=2, dim_head=8, norm_num_groups=4)]
    plain = Attention(16, cross_attention_dim=8, heads=2, dim_head=8)
    model = torch.nn.ModuleList(unusual + [plain])
    assert keep_text_keys(model) == 1
    assert [type(m.processor) for m in unusual] == [AttnProcessor2_0] * 3
    assert isinstance(plain.processor, TextKeysProcessor)
    assert control_attention._KEEP >= 2  # cond and uncond calls of a WebUI job must not evict each other


def test_a_text_is_compared_once_per_forward_unless_it_keeps_no_version(monkeypatch):
    model = tiny_models.tiny_controlnet("sd15")
    keep_text_keys(model)
    cross = sum(isinstance(m, Attention) and m.is_cross_attention for m in model.modules())
    matches = []
    original = control_attention._Texts._match
    monkeypatch.setattr(control_attention._Texts, "_match", lambda self, text: matches.append(1) or original(self, text))
    x, text, kwargs = _inputs(model, 0)
    with torch.no_grad():  # the WebUI's sampling: tensors keep their version counters
        _outputs(model, x, text, kwargs)
        _outputs(model, x, text, kwargs)
        text.add_(1.0)  # written in place between steps: compared again, new keys
        after = _outputs(model, x, text, kwargs)
    assert cross > 1 and len(matches) == 2
    with torch.inference_mode():  # inference tensors keep no counter: every layer compares
        frozen = text.clone()
        for a, b in zip(_outputs(model, x, frozen, kwargs), after):
            assert torch.equal(a, b)
    assert len(matches) == 2 + cross
