"""Semantic segmentation in the ADE20K palette (what control_v11p_sd15_seg was trained on), via transformers.

seg_ufade20k runs UperNet (folder `upernet-convnext-small`: save_pretrained of openmmlab/upernet-convnext-small);
seg_ofade20k runs OneFormer (folder `oneformer_ade20k_swin_tiny`: save_pretrained of
shi-labs/oneformer_ade20k_swin_tiny, tokenizer files included or the shipped CLIP tokenizer is used).
seg_ofcoco runs OneFormer trained on COCO panoptic (folder `oneformer_coco_swin_large`: save_pretrained of
shi-labs/oneformer_coco_swin_large), its 133 classes in COCO panoptic's colours (annotators/coco_palette.py).
The other extension's detectron2 checkpoints (250_16_swin_l_oneformer_ade20k_160k.pth,
150_16_swin_l_oneformer_coco_100ep.pth) are the originals those Hugging Face folders were converted from
(transformers' convert_to_hf_oneformer.py); they are not read here.
Both folders go in the annotator folder; nothing is fetched from the hub.
"""
from __future__ import annotations

import numpy as np

from annotators.common import Params
from annotators.runtime import aux_module, batchable, load_once, prepare, to_batch
from annotators.weights import AnnotatorWeightsError, find_weight

_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


def _palette() -> np.ndarray:
    return np.asarray(aux_module("util").ade_palette(), dtype=np.uint8)


def _normalised(images):
    import torch

    x = to_batch(images, scale=1.0 / 255.0, channels_last=False)
    mean = torch.tensor(_MEAN, device=x.device)[None, :, None, None]
    std = torch.tensor(_STD, device=x.device)[None, :, None, None]
    return (x - mean) / std


def _colour(labels, palette=None) -> list[np.ndarray]:
    palette = _palette() if palette is None else palette
    return [palette[np.asarray(label) % len(palette)] for label in labels.cpu().numpy()]


def _load_folder(model_class, folder_name: str, label: str):
    folder = find_weight(folder_name, label)
    if not (folder / "config.json").is_file():
        raise AnnotatorWeightsError(f"{folder} must be a transformers model folder with config.json "
                                    f"(the save_pretrained output of the model).")
    model = model_class.from_pretrained(str(folder), local_files_only=True)
    return prepare(model, channels_last=False), folder


# ---------------------------------------------------------------- UperNet


def _upernet():
    from transformers import UperNetForSemanticSegmentation

    return _load_folder(UperNetForSemanticSegmentation, "upernet-convnext-small", "seg_ufade20k")[0]


def _upernet_ade20k(images, p: Params):
    import torch

    model = load_once("upernet", _upernet)
    with torch.inference_mode():
        logits = model(pixel_values=_normalised(images)).logits  # already at input size
        return _colour(logits.argmax(dim=1))


upernet_ade20k = batchable(_upernet_ade20k)


# ---------------------------------------------------------------- OneFormer


def _oneformer(folder_name: str, label: str):
    def load():
        from transformers import CLIPTokenizer, OneFormerForUniversalSegmentation

        from lib_controlnet.settings import SHIPPED_CONFIGS_DIR

        model, folder = _load_folder(OneFormerForUniversalSegmentation, folder_name, label)
        tokenizer_dir = folder if (folder / "vocab.json").is_file() else SHIPPED_CONFIGS_DIR / "clip_tokenizer"
        tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        length = model.config.task_seq_len
        # OneFormerProcessor would do this, but its image processor insists on fetching class metadata from
        # the hub; a semantic map needs only the task prompt.
        task = tokenizer(["the task is semantic"], padding="max_length", max_length=length, truncation=True,
                         return_tensors="pt").input_ids
        return model, task

    return load


def _oneformer_semantic(key: str, folder_name: str, label: str, palette=None):
    def run(images, p: Params):
        import torch

        model, task = load_once(key, _oneformer(folder_name, label))
        with torch.inference_mode():
            pixels = _normalised(images)
            out = model(pixel_values=pixels, task_inputs=task.expand(len(images), -1).to(pixels.device))
            classes = out.class_queries_logits.softmax(dim=-1)[..., :-1]
            masks = out.masks_queries_logits.sigmoid()
            scores = torch.einsum("bqc,bqhw->bchw", classes, masks)
            scores = torch.nn.functional.interpolate(scores, size=pixels.shape[-2:], mode="bilinear",
                                                     align_corners=False)
            return _colour(scores.argmax(dim=1), palette)

    return run


oneformer_ade20k = batchable(_oneformer_semantic("oneformer_ade20k", "oneformer_ade20k_swin_tiny", "seg_ofade20k"))


def _coco_palette() -> np.ndarray:
    from annotators.coco_palette import COCO_PANOPTIC_COLORS

    return np.asarray(COCO_PANOPTIC_COLORS, dtype=np.uint8)


oneformer_coco = batchable(_oneformer_semantic("oneformer_coco", "oneformer_coco_swin_large", "seg_ofcoco",
                                               palette=_coco_palette()))
