"""NormalBAE's inference decoder (annotators/normalbae_decoder.py) against controlnet-aux's own decoder: the
same four predictions, on a decoder built from controlnet-aux's class with random weights."""
import copy
import types

import pytest
import torch

from annotators import normalbae_decoder, runtime


def _decoder():
    torch.manual_seed(0)
    args = types.SimpleNamespace(architecture="BN", sampling_ratio=0.4, importance_ratio=0.7)
    decoder = runtime.aux_module("normalbae.nets.submodules.decoder").Decoder(args).eval()
    with torch.no_grad():
        for norm in decoder.modules():
            if isinstance(norm, torch.nn.BatchNorm2d):
                norm.running_mean.uniform_(-0.2, 0.2)
                norm.running_var.uniform_(0.5, 2.0)
    return decoder


def _features(height: int, width: int):
    """EfficientNet-B5 feature list as NNET's encoder hands it over: the decoder reads entries 4, 5, 6, 8, 11."""
    shapes = {4: (24, 2), 5: (40, 4), 6: (64, 8), 8: (176, 16), 11: (2048, 32)}
    return [torch.randn(1, shapes[i][0], height // shapes[i][1], width // shapes[i][1]) if i in shapes else None
            for i in range(12)]


@pytest.mark.parametrize("height,width", [(64, 96), (96, 64)])
def test_inference_decoder_equals_controlnet_aux(height, width):
    original = _decoder()
    fast = copy.deepcopy(original)
    normalbae_decoder.install(types.SimpleNamespace(decoder=fast))
    features = _features(height, width)
    with torch.inference_mode():
        theirs, ours = original(features), fast(features)
    for mine, reference in zip(ours[0], theirs[0]):
        assert mine.shape == reference.shape
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-5)
    assert ours[0][-1].shape[-2:] == (height, width)


def test_inference_decoder_leaves_training_to_the_original():
    fast = _decoder()
    normalbae_decoder.install(types.SimpleNamespace(decoder=fast))
    fast.train()
    features = [f.requires_grad_(True) if f is not None else None for f in _features(64, 64)]
    predictions, samples, coordinates = fast(features, mode="train")
    assert samples[1] is not None and coordinates[1] is not None  # the sampled training path ran
    samples[-1].sum().backward()
    assert features[4].grad is not None
