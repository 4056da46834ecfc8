"""A full-size SD1.5 ControlNet with the released key set (random fp16 weights): detection and loading."""
import pytest
import torch
from safetensors import safe_open

from lib_controlnet.models import inspect_model, ldm_to_diffusers, load_controlnet
from lib_controlnet.models.configs import config_dir, shipped_config
from lib_controlnet.models.synthetic import write_random_controlnet

# Shapes of released SD1.5 ControlNets (control_v11p_sd15_*, control_sd15_*), ldm names.
RELEASED_SHAPES = {
    "control_model.time_embed.0.weight": (1280, 320),
    "control_model.input_blocks.0.0.weight": (320, 4, 3, 3),
    "control_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
    "control_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
    "control_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
    "control_model.input_blocks.11.0.out_layers.3.weight": (1280, 1280, 3, 3),
    "control_model.middle_block.1.proj_out.weight": (1280, 1280, 1, 1),
    "control_model.input_hint_block.0.weight": (16, 3, 3, 3),
    "control_model.input_hint_block.14.weight": (320, 256, 3, 3),
    "control_model.zero_convs.0.0.weight": (320, 320, 1, 1),
    "control_model.zero_convs.11.0.weight": (1280, 1280, 1, 1),
    "control_model.middle_block_out.0.weight": (1280, 1280, 1, 1),
}


@pytest.fixture(scope="module")
def full_file(tmp_path_factory):
    return write_random_controlnet(tmp_path_factory.mktemp("full") / "control_v11p_sd15_random.safetensors",
                                   "sd15", "fp16", "ldm")


def test_full_size_sd15_detects_and_loads(full_file):
    with safe_open(str(full_file), "pt") as handle:
        keys = list(handle.keys())
        for key, shape in RELEASED_SHAPES.items():
            assert tuple(handle.get_slice(key).get_shape()) == shape, key
        assert all(k.startswith("control_model.") for k in keys)
        file_tensors = ldm_to_diffusers({k: handle.get_tensor(k) for k in keys})
    assert len([k for k in keys if k.startswith("control_model.zero_convs.") and k.endswith("weight")]) == 12

    info = inspect_model(full_file)
    assert (info.format, info.base, info.dtype) == ("ldm (control_model.*)", "sd15", "fp16")
    assert info.n_params == 361_279_120
    fitted = {k: v for k, v in info.config.items() if not k.startswith("_")}
    shipped = {k: v for k, v in shipped_config("sd15").items() if k in fitted}
    assert fitted == shipped  # the architecture read from the weights is the released one

    model = load_controlnet(full_file)
    state = model.state_dict()
    assert set(state) == set(file_tensors)
    assert all(v.dtype == torch.float16 and torch.equal(v, file_tensors[k]) for k, v in state.items())
    assert not any(p.is_meta for p in model.parameters())


def test_full_size_matches_diffusers_single_file_loader(full_file):
    """diffusers reads our released-layout file into exactly the weights we load: same key set, same values."""
    from diffusers import ControlNetModel

    theirs = ControlNetModel.from_single_file(str(full_file), config=str(config_dir("sd15")),
                                              torch_dtype=torch.float16).state_dict()
    ours = load_controlnet(full_file).state_dict()
    assert set(theirs) == set(ours)
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)
