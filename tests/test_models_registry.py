"""Registry: recursive scan of the model folders, "stem [hash8]" names as the WebUI's ControlNet extension shows
them, lookup by name / stem / unique substring, and the LRU cache of loaded models."""
import hashlib

import pytest

from lib_controlnet.models import (
    ModelNotFoundError, ModelRegistry, get_cache, get_controlnet, get_registry, save_controlnet_ldm,
)
from lib_controlnet.settings import get_settings, update_settings
from lib_controlnet.tiny_models import tiny_controlnet


def webui_model_hash(path):
    """What the WebUI's sd_models.model_hash computes (written out here from its documented behaviour)."""
    data = path.read_bytes()[0x100000:0x110000]
    return hashlib.sha256(data).hexdigest()[:8]


@pytest.fixture(scope="module")
def model_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    extra = tmp_path_factory.mktemp("extra")
    model = tiny_controlnet("sd15")
    save_controlnet_ldm(model, root / "control_v11p_sd15_canny.safetensors", "fp32")
    save_controlnet_ldm(model, root / "sub" / "deeper" / "control_v11p_sd15_openpose.safetensors", "fp16")
    model.save_pretrained(str(root / "sd15_depth_diffusers"), safe_serialization=True)
    (root / "annotators").mkdir()
    (root / "annotators" / "ControlNetHED.pth").write_bytes(b"not a controlnet")
    (root / "README.md").write_text("readme")
    # a file larger than 1 MiB, so the WebUI hash reads real bytes
    big = tiny_controlnet("sd2")
    save_controlnet_ldm(big, extra / "control_sd21_canny.safetensors", "fp32")
    return root, extra


@pytest.fixture()
def settings(model_tree):
    root, extra = model_tree
    saved = (get_settings().model_dirs, get_settings().annotator_models_path, get_settings().model_cache_size)
    update_settings(model_dirs=[root, extra], annotator_models_path=root / "annotators")
    get_cache().clear()
    yield root, extra
    update_settings(model_dirs=saved[0], annotator_models_path=saved[1], model_cache_size=saved[2])
    get_cache().clear()


def test_scan_names_and_hashes(settings):
    root, extra = settings
    registry = ModelRegistry()
    names = registry.refresh()
    by_stem = {e.stem: e for e in registry.entries()}
    assert set(by_stem) == {"control_v11p_sd15_canny", "control_v11p_sd15_openpose", "sd15_depth_diffusers",
                            "control_sd21_canny"}  # recursive, folders count once, annotators and README skipped
    big = extra / "control_sd21_canny.safetensors"
    assert big.stat().st_size > 0x110000
    assert by_stem["control_sd21_canny"].name == f"control_sd21_canny [{webui_model_hash(big)}]"
    assert by_stem["sd15_depth_diffusers"].path == root / "sd15_depth_diffusers"
    assert names == sorted(names, key=str.lower)
    assert all(n.endswith("]") and len(n.rsplit("[", 1)[1]) == 9 for n in names)


def test_find(settings):
    root, _ = settings
    registry = ModelRegistry()
    canny_name = next(n for n in registry.names() if n.startswith("control_v11p_sd15_canny"))
    canny = root / "control_v11p_sd15_canny.safetensors"
    assert registry.find(canny_name) == canny
    assert registry.find("control_v11p_sd15_canny") == canny  # stem
    assert registry.find("CONTROL_V11P_SD15_CANNY [0000abcd]") == canny  # stem, hash from another machine
    assert registry.find("openpose") == root / "sub" / "deeper" / "control_v11p_sd15_openpose.safetensors"
    with pytest.raises(ModelNotFoundError, match="matches 2 ControlNet models"):
        registry.find("canny")
    with pytest.raises(ModelNotFoundError, match="No ControlNet model matches 'scribble'"):
        registry.find("scribble")
    with pytest.raises(ModelNotFoundError, match="No ControlNet model was chosen"):
        registry.find("None")


def test_new_file_found_without_manual_refresh(settings):
    root, _ = settings
    registry = ModelRegistry()
    registry.refresh()
    save_controlnet_ldm(tiny_controlnet("sd15"), root / "control_new_lineart.safetensors", "fp16")
    try:
        assert registry.find("lineart") == root / "control_new_lineart.safetensors"
    finally:
        (root / "control_new_lineart.safetensors").unlink()
    get_registry().refresh()


def test_get_controlnet_uses_an_lru_cache(settings):
    root, _ = settings
    update_settings(model_cache_size=2)
    get_registry().refresh()
    first = get_controlnet("control_v11p_sd15_canny")
    assert get_controlnet("control_v11p_sd15_canny") is first
    assert get_controlnet(root / "control_v11p_sd15_canny.safetensors") is first  # by path, same entry
    get_controlnet("openpose")
    get_controlnet("sd15_depth_diffusers")  # third model: the least recently used (canny) goes
    assert len(get_cache()) == 2
    assert get_controlnet("control_v11p_sd15_canny") is not first
    assert get_controlnet("control_v11p_sd15_canny", dtype="fp16") is not get_controlnet("control_v11p_sd15_canny")
    update_settings(model_cache_size=0)
    get_cache().clear()
    get_controlnet("openpose")
    assert len(get_cache()) == 0
