"""seg_anime_face: the anime-face segmentation U-Net (`UNet.pth`, published in bdsqlsz/qinglong_controlnet-lllite
under Annotators/) in its 7-class palette, as users of the other WebUI ControlNet extension know the map.

The network: torchvision's MobileNetV2 features as the encoder (split into five blocks at strides 2..32), a
decoder of (nearest x2, 3x3 convolution, instance norm, LeakyReLU 0.1) blocks each joined to the encoder block of
its size, and a last x2 + 3x3 convolution to the 7 classes. Written here (no installable package has it) with the
module names of the released file, whose keys may carry a `module.` prefix (saved from DataParallel).
"""
from __future__ import annotations

import cv2
import numpy as np

from annotators.common import Params, pad_to_multiple, resize_short_side
from annotators.runtime import device, load_once, prepare
from annotators.weights import AnnotatorWeightsError, find_weight

FILENAME = "UNet.pth"
NETWORK_RESOLUTION = 512  # the short side the network was trained at; the map is scaled to the request after

# class index -> RGB: background, hair, eye, mouth, face, skin, clothes
PALETTE = np.array([(255, 255, 0), (0, 0, 255), (255, 0, 0), (255, 255, 255), (0, 255, 0), (0, 255, 255),
                    (255, 0, 255)], dtype=np.uint8)
# which MobileNetV2 feature layers make each encoder block (outputs at strides 2, 4, 8, 16, 32)
_ENCODER_SPLITS = ((0, 2), (2, 4), (4, 7), (7, 14), (14, 17))
_DECODER = (("de_block4", 160, 96), ("de_block3", 192, 32), ("de_block2", 64, 24), ("de_block1", 48, 16),
            ("de_block0", 32, 7))


def build():
    import torch
    import torch.nn.functional as F
    import torchvision
    from torch import nn

    class AnimeFaceUNet(nn.Module):
        def __init__(self):
            super().__init__()
            features = torchvision.models.mobilenet_v2(weights=None).features
            for index, (start, end) in enumerate(_ENCODER_SPLITS):
                setattr(self, f"en_block{index}", nn.Sequential(*features[start:end]))
            for name, cin, cout in _DECODER:
                layers = [nn.UpsamplingNearest2d(scale_factor=2), nn.Conv2d(cin, cout, 3, padding=1)]
                if cout != len(PALETTE):  # the last block ends in a softmax, left out: the argmax is the same
                    layers += [nn.InstanceNorm2d(cout), nn.LeakyReLU(0.1)]
                setattr(self, name, nn.Sequential(*layers))

        def forward(self, x):
            skips = []
            for index in range(len(_ENCODER_SPLITS)):
                x = getattr(self, f"en_block{index}")(x)
                skips.append(x)
            y = skips.pop()
            for name, _, _ in _DECODER[:-1]:
                skip = skips.pop()
                y = F.interpolate(getattr(self, name)(y), size=skip.shape[-2:], mode="bilinear", align_corners=True)
                y = torch.cat((y, skip), dim=1)
            return self.de_block0(y)

    return AnimeFaceUNet()


def _network():
    import torch

    path = find_weight(FILENAME, "seg_anime_face")
    net = build()
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
        net.load_state_dict(state)
    except (RuntimeError, AttributeError, EOFError) as error:
        problem = str(error).split("\n\t")[1].strip() if "\n\t" in str(error) else str(error)
        raise AnnotatorWeightsError(f"{path} cannot be read as the anime-face segmentation {FILENAME} "
                                    f"({problem[:200]}); replace it with Annotators/{FILENAME} from "
                                    f"bdsqlsz/qinglong_controlnet-lllite on Hugging Face.") from None
    return prepare(net, channels_last=False)


def anime_face(img: np.ndarray, p: Params) -> np.ndarray:
    import torch

    net = load_once("anime_face", _network)
    h, w = img.shape[:2]
    # edge-padded to the encoder's stride, as that extension feeds it
    x, (xh, xw) = pad_to_multiple(resize_short_side(img, NETWORK_RESOLUTION), 64)
    tensor = torch.from_numpy(np.ascontiguousarray(x)).to(device()).permute(2, 0, 1)[None].float().div_(255.0)
    with torch.inference_mode():
        labels = net(tensor)[0, :, :xh, :xw].argmax(dim=0).to(torch.uint8).cpu().numpy()
    if labels.shape != (h, w):
        labels = cv2.resize(labels, (w, h), interpolation=cv2.INTER_NEAREST)
    return PALETTE[labels]
