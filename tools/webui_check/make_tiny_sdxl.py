"""Put a tiny random SDXL checkpoint that a real WebUI 1.10.1 loads, and tiny SDXL / SD1.5 ControlNets, into a WebUI.

    python tools/webui_check/make_tiny_sdxl.py /path/to/stable-diffusion-webui

Writes models/Stable-diffusion/tinyxl.safetensors with tinyxl.yaml beside it (the WebUI builds a checkpoint from a
yaml of the same name: sgm's DiffusionEngine at tiny widths), the tiny CLIP-L folder that yaml names, an open_clip
model config "TinyBigG" into the WebUI venv's open_clip (the second text encoder's width is chosen there; open_clip
2.20 has no mlp_ratio, so its MLP is 4x the width), and models/ControlNet/tinyxl_canny + tiny15_canny.
"""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402

import lib_controlnet  # noqa: E402,F401
from lib_controlnet import tiny_models  # noqa: E402
from lib_controlnet.models import save_controlnet_ldm  # noqa: E402
from tiny_checkpoint import sdxl_single_file_state  # noqa: E402


def main(webui: Path) -> None:
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    components = tiny_models.tiny_sdxl_components(0)
    torch.manual_seed(4)
    config = components["text_encoder_2"].config.to_dict()
    config["intermediate_size"] = 4 * config["hidden_size"]
    components["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**config)).eval()
    clip_dir = webui / "models" / "tiny_clip_l"
    components["text_encoder"].save_pretrained(clip_dir, safe_serialization=True)  # the WebUI refuses pickles
    components["tokenizer"].save_pretrained(clip_dir)
    checkpoints = webui / "models" / "Stable-diffusion"
    checkpoints.mkdir(parents=True, exist_ok=True)
    state = sdxl_single_file_state(components)
    save_file({k: v.contiguous() for k, v in state.items()}, str(checkpoints / "tinyxl.safetensors"))
    yaml = (Path(__file__).with_name("tinyxl.yaml.in")).read_text().replace("@CLIP_L@", str(clip_dir))
    (checkpoints / "tinyxl.yaml").write_text(yaml)
    width = config["hidden_size"]
    open_clip_config = {"embed_dim": tiny_models.SDXL_POOLED_DIM,
                        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
                        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": width, "heads": 2,
                                     "layers": config["num_hidden_layers"]}}
    target = next((webui / "venv" / "lib").glob("python3*/site-packages/open_clip/model_configs"))
    (target / "TinyBigG.json").write_text(json.dumps(open_clip_config))
    controlnets = webui / "models" / "ControlNet"
    controlnets.mkdir(parents=True, exist_ok=True)
    save_controlnet_ldm(tiny_models.tiny_controlnet(unet=components["unet"], seed=5),
                        controlnets / "tinyxl_canny.safetensors", dtype="fp32")
    save_controlnet_ldm(tiny_models.tiny_controlnet("sd15"), controlnets / "tiny15_canny.safetensors", dtype="fp32")
    print(f"wrote {checkpoints / 'tinyxl.safetensors'} (+ .yaml) and {controlnets}")


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())
