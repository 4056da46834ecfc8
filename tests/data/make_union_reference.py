"""Regenerates tests/data/union_promax_tiny/ (a tiny random ControlNet-Union ProMax in the diffusers folder layout
xinsir publishes) and tests/data/union_reference.safetensors (inputs and diffusers' own outputs for it).

The pinned diffusers (0.31) has no ControlNetUnionModel, so this runs in a side environment with diffusers 0.32.2
first on sys.path and the project's torch shared, e.g.:

    python3.11 -m venv /work/side/union/venv
    echo /path/to/project/.venv/lib/python3.11/site-packages > /work/side/union/venv/lib/python3.11/site-packages/main.pth
    /work/side/union/venv/bin/pip install --no-deps --target /work/side/union/diffusers032 diffusers==0.32.2
    echo /work/side/union/diffusers032 > /work/side/union/venv/lib/python3.11/site-packages/a_diffusers032.pth
    /work/side/union/venv/bin/python tests/data/make_union_reference.py

(.pth files are read in name order, so a_diffusers032.pth puts 0.32.2 before the project's 0.31.) The weights are
stored in fp16, as the released union files are; the reference runs on those fp16 values upcast to fp32.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
FOLDER = HERE / "union_promax_tiny"
REFERENCE = HERE / "union_reference.safetensors"

# The shapes of the SDXL union model, shrunk: 2 levels (conv_in + 1 resnet + downsample, 1 resnet) -> 4 + 1
# residuals, linear projections, text_time added embedding, 8 control types (ProMax). Heads: one per 64 channels
# (at least one) and 8 in the condition transformer, as the released SDXL models have (the weights cannot tell).
CONFIG = dict(
    in_channels=4, conditioning_channels=3, block_out_channels=(32, 32), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), transformer_layers_per_block=1,
    norm_num_groups=32, cross_attention_dim=32, attention_head_dim=(1, 1), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8,
    conditioning_embedding_out_channels=(16, 16, 16, 16), num_control_type=8, num_trans_channel=32, num_trans_head=8,
    num_trans_layer=1, num_proj_channel=32,
)
# (name, control types, which hints) run through diffusers' forward: one type, two types in one forward, inpaint.
CASES = (("hard_edge", [3], [0]), ("depth_and_tile", [1, 6], [1, 2]), ("inpaint", [7], [3]))


def main() -> None:
    import diffusers
    from diffusers import ControlNetUnionModel

    assert diffusers.__version__ == "0.32.2", diffusers.__version__
    torch.manual_seed(0)
    model = ControlNetUnionModel(**CONFIG)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # zero-initialised outputs (zero convs, spatial_ch_projs) get values, or all is zero
        for param in model.parameters():
            if param.abs().sum() == 0:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    if FOLDER.exists():
        shutil.rmtree(FOLDER)
    model.half().save_pretrained(FOLDER, safe_serialization=True)
    model = ControlNetUnionModel.from_pretrained(FOLDER, torch_dtype=torch.float32).eval()

    g = torch.Generator().manual_seed(2)
    data = {
        "sample": torch.randn(2, 4, 4, 4, generator=g),
        "timestep": torch.tensor(611.0),
        "context": torch.randn(2, 6, 32, generator=g),
        "text_embeds": torch.randn(2, 16, generator=g),
        "time_ids": torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 2),
        "hints": torch.rand(4, 3, 32, 32, generator=g),
    }
    out = dict(data)
    with torch.no_grad():
        for name, types, hints in CASES:
            control_type = torch.zeros(1, CONFIG["num_control_type"])
            control_type[0, types] = 1
            down, mid = model(data["sample"], data["timestep"], data["context"],
                              controlnet_cond=[data["hints"][i:i + 1].expand(2, -1, -1, -1) for i in hints],
                              control_type=control_type.expand(2, -1), control_type_idx=types,
                              added_cond_kwargs={"text_embeds": data["text_embeds"], "time_ids": data["time_ids"]},
                              return_dict=False)
            for i, tensor in enumerate(down):
                out[f"{name}.down.{i}"] = tensor
            out[f"{name}.mid"] = mid
    save_file({k: v.contiguous() for k, v in out.items()}, str(REFERENCE),
              metadata={"diffusers": diffusers.__version__, "torch": torch.__version__})
    print(f"wrote {FOLDER} and {REFERENCE}")


if __name__ == "__main__":
    main()
