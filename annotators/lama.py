"""inpaint_only+lama: LaMa (big-lama, lllyasviel's `ControlNetLama.pth`) fills the masked area first; the result is
then the inpaint ControlNet's condition exactly as inpaint_only's (RGBA, alpha 255 = repaint here).

As users of the other WebUI ControlNet extension know it: LaMa runs at 256 px on the short side (the size it was
trained at), its output is scaled back to the image's size and replaces only the masked pixels; the unmasked ones
are the input's own. Without a mask there is nothing to fill and the image comes back as inpaint_only gives it.
"""
from __future__ import annotations

import cv2
import numpy as np

from annotators.common import Params, pad_to_multiple, resize_short_side
from annotators.runtime import device, load_once, prepare
from annotators.weights import AnnotatorWeightsError, find_weight

FILENAME = "ControlNetLama.pth"
WORK_RESOLUTION = 256  # big-lama's training size; larger inputs make its Fourier units see a different spectrum


def _network():
    import torch

    from annotators import lama_network

    path = find_weight(FILENAME, "inpaint_only+lama")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        net = lama_network.from_state_dict(lama_network.strip_wrappers(state))
    except (ValueError, RuntimeError, AttributeError, EOFError) as error:
        raise AnnotatorWeightsError(f"{path} cannot be read as LaMa's {FILENAME}: {error}; replace it with the "
                                    f"file published in lllyasviel/Annotators on Hugging Face.") from None
    # float32 always: torch's FFT has no bfloat16 kernels on the CPU
    return prepare(net, channels_last=False)


def fill(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 image, HxW uint8 mask (255 = fill) -> HxWx3 uint8 with the masked area painted by LaMa."""
    import torch

    net = load_once("lama", _network)
    h, w = img.shape[:2]
    small = resize_short_side(np.concatenate([img, mask[..., None]], axis=2), WORK_RESOLUTION)
    small, (sh, sw) = pad_to_multiple(small, 8)  # three stride-2 downsamplings
    x = torch.from_numpy(np.ascontiguousarray(small)).to(device()).permute(2, 0, 1)[None].float().div_(255.0)
    hole = (x[:, 3:] > 0.5).float()
    known = x[:, :3] * (1.0 - hole)
    with torch.inference_mode():
        painted = net(torch.cat([known, hole], dim=1))
    painted = painted * hole + known * (1.0 - hole)
    painted = painted[0, :, :sh, :sw].permute(1, 2, 0).mul(255.0).clamp(0, 255).cpu().numpy().astype(np.uint8)
    painted = cv2.resize(painted, (w, h), interpolation=cv2.INTER_LINEAR)
    alpha = mask.astype(np.float32)[..., None] / 255.0
    return (painted * alpha + img * (1.0 - alpha)).clip(0, 255).astype(np.uint8)


def inpaint_lama(img: np.ndarray, p: Params) -> np.ndarray:
    if p.mask is None or not p.mask.any():
        return img
    return np.concatenate([fill(img, p.mask), p.mask[..., None]], axis=2)
