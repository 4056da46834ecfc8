"""Random-weight annotator files under the real release names, built from each network's own class.

For tests, benchmarks and demos on machines without the real weights: every file is the state dict of the
network class controlnet-aux loads, saved the way the released file stores it, so the real loading code runs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from annotators.runtime import aux_module


def _hed():
    return aux_module("hed").ControlNetHED_Apache2().state_dict()


def _pidinet():
    return {"state_dict": {f"module.{k}": v for k, v in aux_module("pidi.model").pidinet().state_dict().items()}}


def _teed():
    return aux_module("teed.ted").TED().state_dict()


def _mlsd():
    return aux_module("mlsd.models.mbv2_mlsd_large").MobileV2_MLSD_Large().state_dict()


def _lineart():
    return aux_module("lineart").Generator(3, 1, 3).state_dict()


def _lineart_anime():
    import functools

    import torch.nn as nn

    module = aux_module("lineart_anime")
    norm = functools.partial(nn.InstanceNorm2d, affine=False, track_running_stats=False)
    return module.UnetGenerator(3, 1, 8, 64, norm_layer=norm, use_dropout=False).state_dict()


def _midas():
    return aux_module("midas.midas.dpt_depth").DPTDepthModel(path=None, backbone="vitb_rn50_384",
                                                            non_negative=True).state_dict()


def _leres_depth():
    model = aux_module("leres.leres.multi_depth_model_woauxi").RelDepthModel(backbone="resnext101")
    return {"depth_model": {f"module.{k}": v for k, v in model.state_dict().items()}}


def _leres_pix2pix():
    models = aux_module("leres.pix2pix.models.pix2pix4depth_model")
    options = aux_module("leres.pix2pix.options.test_options").TestOptions().parse()
    options.gpu_ids = []
    return models.Pix2Pix4DepthModel(options).netG.state_dict()


def _zoe():
    module = aux_module("zoe")
    return {"model": module.ZoeDepth.build_from_config(module.get_config("zoedepth", "infer")).state_dict()}


def _normal_bae():
    import types

    args = types.SimpleNamespace(mode="client", architecture="BN", pretrained="scannet", sampling_ratio=0.4,
                                 importance_ratio=0.7)
    return {"model": aux_module("normalbae.nets.NNET").NNET(args).state_dict()}


def _openpose_flat(model):
    # the released body/hand files hold keys without the first (block) component; util.transfer maps them back
    return {".".join(k.split(".")[1:]): v for k, v in model.state_dict().items()}


def _body():
    return _openpose_flat(aux_module("open_pose.model").bodypose_model())


def _hand():
    return _openpose_flat(aux_module("open_pose.model").handpose_model())


def _face():
    return aux_module("open_pose.face").FaceNet().state_dict()


def _manga_line():
    from annotators import manga_line

    return manga_line.network().state_dict()


def _lama(ngf: int = 64, n_blocks: int = 18):
    """big-lama's generator as ControlNetLama.pth stores it (bare `model.*` keys); batch-norm statistics random
    too, so folding them is exercised."""
    import torch

    from annotators.lama_network import LamaGenerator

    net = LamaGenerator(ngf=ngf, n_blocks=n_blocks)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return net.state_dict()


def _anime_face():
    """The anime-face U-Net under the `module.` prefix a DataParallel save gives (the loader strips it, as the
    other extension's does; bare keys load too)."""
    from annotators.anime_face import build

    return {f"module.{k}": v for k, v in build().state_dict().items()}


# Depth Anything's sizes (Depth-Anything-V2's README: encoder width, head features, head channels); "tiny" is
# for tests: the released key layout and depth at a fraction of the width.
DEPTH_ANYTHING_SIZES = {"vits": (384, 64, (48, 96, 192, 384)), "vitb": (768, 128, (96, 192, 384, 768)),
                        "vitl": (1024, 256, (256, 512, 1024, 1024)), "tiny": (64, 16, (8, 16, 32, 32))}


def depth_anything(size: str = "vits", seed: int = 0) -> dict:
    """A random Depth Anything state dict (v1 and v2 share the layout) with the released files' keys and shapes.

    Values come from a generator seeded here, key by key in sorted order, not from the modules' initialisers:
    the same seed gives the same tensors whatever order the modules are built in (stored reference maps rely
    on it). Scales keep the activations alive through 12-24 blocks and the head's ReLUs."""
    import torch

    from annotators.depth_anything import Config, DepthAnything

    dim, features, channels = DEPTH_ANYTHING_SIZES[size]
    depth = 24 if size == "vitl" else 12
    config = Config(dim=dim, depth=depth, heads=max(1, dim // 64), features=features, out_channels=channels)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in DepthAnything(config, 2).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(shapes):
        shape = shapes[key]
        noise = torch.randn(shape, generator=generator)
        if key.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
            value = 1.0 + 0.1 * noise
        elif key.endswith(".gamma"):
            value = 0.3 + 0.05 * noise
        elif key.endswith("bias") or len(shape) < 2 or key.endswith(("_token", "pos_embed")):
            value = 0.05 * noise
        else:
            fan_in = shape[1] * (shape[2] * shape[3] if len(shape) == 4 else 1)
            value = noise / fan_in ** 0.5
        if key.endswith("output_conv2.2.bias"):  # the depth's offset: few pixels clipped to 0 by the last ReLU
            value = value + 1.0
        out[key] = value.contiguous()
    return out


def dsine(tiny: bool = False) -> dict:
    """DSINE as released ({"model": state}); tiny: an EfficientNet-B0 encoder with a 64-wide head (tests)."""
    import torch

    from annotators.dsine import DSINE

    model = DSINE("tf_efficientnet_b0", 64, 112, 40) if tiny else DSINE()
    state = model.state_dict()
    for key, value in state.items():
        if key.endswith("running_mean"):
            state[key] = 0.1 * torch.randn_like(value)
        elif key.endswith("running_var"):
            state[key] = 0.5 + torch.rand_like(value)
    return {"model": state}


BUILDERS: dict[str, Callable[[], dict]] = {
    "ControlNetHED.pth": _hed,
    "table5_pidinet.pth": _pidinet,
    "7_model.pth": _teed,
    "mlsd_large_512_fp32.pth": _mlsd,
    "sk_model.pth": _lineart,
    "sk_model2.pth": _lineart,
    "netG.pth": _lineart_anime,
    "erika.pth": _manga_line,
    "dpt_hybrid-midas-501f0c75.pt": _midas,
    "res101.pth": _leres_depth,
    "latest_net_G.pth": _leres_pix2pix,
    "ZoeD_M12_N.pt": _zoe,
    "scannet.pt": _normal_bae,
    "body_pose_model.pth": _body,
    "hand_pose_model.pth": _hand,
    "facenet.pth": _face,
    "ControlNetLama.pth": _lama,
    "UNet.pth": _anime_face,
}
# the small Depth Anything files users have (the large ones: depth_anything(size="vitl"), 1.3 GB)
BUILDERS.update({"depth_anything_vits14.pth": depth_anything, "depth_anything_v2_vits.pth": depth_anything})
BUILDERS["dsine.pt"] = dsine


def write(directory: Path, names=None, seed: int = 0) -> list[Path]:
    """Save random weights for `names` (default: all known files) into `directory`; returns the paths."""
    import torch

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names or BUILDERS:
        torch.manual_seed(seed)
        path = directory / name
        if not path.exists():
            torch.save(BUILDERS[name](), path)
        written.append(path)
    return written


def write_segmentation(directory: Path, seed: int = 0) -> list[Path]:
    """Small random UperNet and OneFormer folders (ADE20K's 150 labels) under the folder names seg.py looks for.

    The architectures are the real ones at reduced width and depth, so transformers' own from_pretrained and
    forward run; a user's folder holds the full-size save_pretrained output instead."""
    import torch
    from transformers import (ConvNextConfig, OneFormerForUniversalSegmentation,
                              UperNetConfig, UperNetForSemanticSegmentation)

    directory = Path(directory)
    labels = {i: f"class_{i}" for i in range(150)}
    upernet_dir = directory / "upernet-convnext-small"
    oneformer_dir = directory / "oneformer_ade20k_swin_tiny"
    torch.manual_seed(seed)
    if not (upernet_dir / "config.json").exists():
        backbone = ConvNextConfig(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 32, 64],
                                  out_features=["stage1", "stage2", "stage3", "stage4"])
        config = UperNetConfig(backbone_config=backbone, hidden_size=32, auxiliary_in_channels=32,
                               id2label=labels, label2id={v: k for k, v in labels.items()})
        UperNetForSemanticSegmentation(config).save_pretrained(upernet_dir)
    if not (oneformer_dir / "config.json").exists():
        OneFormerForUniversalSegmentation(_tiny_oneformer_config(labels)).save_pretrained(oneformer_dir)
    return [upernet_dir, oneformer_dir]


def _tiny_oneformer_config(labels: dict):
    from transformers import OneFormerConfig, SwinConfig

    backbone = SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4,
                          out_features=["stage1", "stage2", "stage3", "stage4"])
    return OneFormerConfig(backbone_config=backbone, hidden_dim=32, conv_dim=32, mask_dim=32,
                           num_queries=8, encoder_layers=1, decoder_layers=2, dim_feedforward=64,
                           text_encoder_width=32, text_encoder_num_layers=1, text_encoder_context_length=77,
                           text_encoder_proj_layers=1, text_encoder_n_ctx=4, num_attention_heads=2,
                           id2label=labels, label2id={v: k for k, v in labels.items()})


def write_oneformer_coco(directory: Path, seed: int = 0) -> Path:
    """A small random OneFormer folder with COCO panoptic's 133 labels, under the folder name seg_ofcoco looks for
    (the real architecture at reduced width and depth, as write_segmentation's)."""
    import torch
    from transformers import OneFormerForUniversalSegmentation

    folder = Path(directory) / "oneformer_coco_swin_large"
    torch.manual_seed(seed)
    if not (folder / "config.json").exists():
        labels = {i: f"class_{i}" for i in range(133)}
        OneFormerForUniversalSegmentation(_tiny_oneformer_config(labels)).save_pretrained(folder)
    return folder


def write_lama(directory: Path, ngf: int = 4, n_blocks: int = 2, seed: int = 0) -> Path:
    """ControlNetLama.pth at reduced width and depth (the released layout and key names; `lama_network` reads
    the width and block count from the shapes): a few hundred kB instead of 200 MB, for tests."""
    import torch

    path = Path(directory) / "ControlNetLama.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    torch.save(_lama(ngf, n_blocks), path)
    return path
