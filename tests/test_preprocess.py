"""The preprocessor registry and the model-free maps, checked against their definitions on real photographs."""
import cv2
import numpy as np
import pytest
import skimage.data

from annotators.runtime import aux_module
from lib_controlnet import preprocess
from lib_controlnet.errors import UserError
from lib_controlnet.preprocess import PreprocessorError, get_preprocessor, pixel_perfect_resolution, run
from lib_controlnet.settings import get_settings, update_settings
from lib_controlnet.unit import ResizeMode

ASTRONAUT = skimage.data.astronaut()  # 512x512
COFFEE = skimage.data.coffee()  # 400x600
CAT = skimage.data.chelsea()  # 300x451


# ---------------------------------------------------------------- registry


def test_names_and_aliases_users_know():
    assert get_preprocessor("depth_midas") is get_preprocessor("depth")
    assert get_preprocessor("softedge_hed").name == "hed"
    assert get_preprocessor("lineart_realistic").name == "lineart"
    assert get_preprocessor("Inpaint_Global_Harmonious").name == "inpaint"
    assert get_preprocessor(None).name == "none"
    labels = preprocess.list_modules(alias_names=True)
    names = preprocess.list_modules()
    assert labels[:2] == ["none", "invert (from white bg & black line)"]
    assert len(labels) == len(set(labels)) == len(names)
    for expected in ("canny", "depth_midas", "depth_leres", "depth_leres++", "depth_zoe", "normal_midas",
                     "normal_bae", "openpose", "openpose_face", "openpose_faceonly", "openpose_full",
                     "openpose_hand", "lineart_realistic", "lineart_coarse", "lineart_anime", "softedge_hed",
                     "softedge_hedsafe", "softedge_pidinet", "softedge_pidisafe", "softedge_teed", "scribble_hed",
                     "scribble_pidinet", "scribble_xdog", "mlsd", "seg_ofade20k", "seg_ufade20k", "shuffle",
                     "tile_resample", "tile_colorfix", "tile_colorfix+sharp", "t2ia_color_grid",
                     "recolor_luminance", "recolor_intensity", "blur_gaussian", "threshold", "inpaint_only",
                     "lineart_standard (from white bg & black line)"):
        assert expected in labels
    with pytest.raises(PreprocessorError, match="Unknown preprocessor 'cany'.*--list"):
        get_preprocessor("cany")


def test_sliders_match_the_webui_extension():
    canny = get_preprocessor("canny").sliders()
    assert canny == [
        {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8},
        {"name": "Low Threshold", "value": 100, "min": 1, "max": 255, "step": 1},
        {"name": "High Threshold", "value": 200, "min": 1, "max": 255, "step": 1},
    ]
    mlsd = get_preprocessor("mlsd").sliders()
    assert mlsd[1] == {"name": "MLSD Value Threshold", "value": 0.1, "min": 0.01, "max": 2.0, "step": 0.01}
    assert mlsd[2]["name"] == "MLSD Distance Threshold" and mlsd[2]["max"] == 20.0
    # the panel's slots: None hides the resolution slider of a module that has none
    assert get_preprocessor("tile_resample").sliders() == [
        None, {"name": "Down Sampling Rate", "value": 1.0, "min": 1.0, "max": 8.0, "step": 0.01}]
    assert get_preprocessor("normal_midas").sliders()[1]["value"] == 0.4
    assert get_preprocessor("scribble_xdog").sliders()[1]["value"] == 32
    assert get_preprocessor("inpaint_only").sliders() == [] and get_preprocessor("none").sliders() == []
    detail = preprocess.module_detail(alias_names=True)
    assert list(detail) == preprocess.list_modules(alias_names=True)
    assert detail["canny"]["sliders"] == canny


def test_control_types_and_model_free_flags():
    types = preprocess.control_types()
    assert types["Canny"]["default_option"] == "canny"
    assert types["Depth"]["default_option"] == "depth_midas"
    assert "invert (from white bg & black line)" in types["Lineart"]["module_list"]
    assert {"softedge_hed", "softedge_pidinet", "softedge_teed"} <= set(types["SoftEdge"]["module_list"])
    assert all(t["module_list"][0] == "none" for t in types.values())
    assert get_preprocessor("canny").model_free and not get_preprocessor("softedge_hed").model_free


def test_pixel_perfect_resolution():
    # 512x768 (h x w) image onto 1024x1024: cover scales by 2 -> short side 1024; fit scales by 4/3 -> 683
    assert pixel_perfect_resolution((512, 768), 1024, 1024, ResizeMode.INNER_FIT) == 1024
    assert pixel_perfect_resolution((512, 768), 1024, 1024, "Just Resize") == 1024
    assert pixel_perfect_resolution((512, 768), 1024, 1024, "Resize and Fill") == 683
    assert pixel_perfect_resolution((300, 451), 512, 512) == 512
    with pytest.raises(PreprocessorError):
        pixel_perfect_resolution((0, 10), 512, 512)


@pytest.mark.parametrize("kwargs, message", [
    ({"threshold_a": 0}, "Low Threshold.*between 1 and 255"),
    ({"threshold_b": 256}, "High Threshold"),
    ({"threshold_a": "abc"}, "must be a number"),
    ({"resolution": 4}, "resolution must be -1 .* from 64 to 2048, got 4"),
    ({"resolution": "big"}, "must be a number"),
])
def test_parameters_out_of_range_are_user_errors(kwargs, message):
    with pytest.raises(PreprocessorError, match=message) as info:
        run("canny", CAT, **kwargs)
    assert isinstance(info.value, UserError)


def test_minus_one_means_default_as_in_the_webui_api():
    np.testing.assert_array_equal(run("canny", CAT, resolution=-1, threshold_a=-1, threshold_b=-1),
                                  run("canny", CAT))


def test_bad_images_surface_as_user_errors():
    with pytest.raises(UserError, match="not an image"):
        run("canny", b"GIF89a broken")


# ---------------------------------------------------------------- resolution and cache


def test_resolution_sets_the_short_side_and_keeps_aspect():
    out = run("canny", COFFEE, resolution=256)  # 400x600
    assert out.shape == (256, 384, 3) and out.dtype == np.uint8
    assert run("tile_resample", COFFEE).shape == COFFEE.shape  # no resolution slider: native size
    assert run("none", CAT).shape == CAT.shape


def test_cache_returns_equal_copies_and_evicts_least_recent():
    saved = get_settings().preprocessor_cache_size
    update_settings(preprocessor_cache_size=2)
    try:
        preprocess.clear_cache()
        first = run("scribble_xdog", CAT, resolution=128)
        first[:] = 7  # callers may scribble on their copy
        again = run("scribble_xdog", CAT, resolution=128)
        assert len(preprocess._cache) == 1 and not (again == 7).all()
        np.testing.assert_array_equal(again, run("scribble_xdog", CAT, resolution=128, use_cache=False))
        run("scribble_xdog", CAT, resolution=96)
        run("scribble_xdog", COFFEE, resolution=128)
        assert len(preprocess._cache) == 2
        key_params = {k[2] for k in preprocess._cache._data}
        assert key_params == {96, 128}
    finally:
        update_settings(preprocessor_cache_size=saved)
        preprocess.clear_cache()


def test_identity_maps_never_hand_back_the_callers_array():
    image = CAT.copy()
    out = run("none", image, use_cache=False)
    out[:] = 0
    assert image.any()


# ---------------------------------------------------------------- model-free maps vs definitions


def test_canny_is_cv2_canny_and_equals_controlnet_aux():
    ours = run("canny", ASTRONAUT, resolution=512, threshold_a=50, threshold_b=150)
    np.testing.assert_array_equal(ours[..., 0], cv2.Canny(ASTRONAUT, 50, 150))
    aux = aux_module("canny").CannyDetector()(ASTRONAUT, 50, 150, detect_resolution=512, image_resolution=512,
                                              output_type="np")
    np.testing.assert_array_equal(ours, aux)
    assert 0.02 < (ours > 0).mean() < 0.3  # a real photo gives real edges


def test_lineart_standard_equals_controlnet_aux():
    ours = run("lineart_standard", ASTRONAUT, resolution=512)
    aux = aux_module("lineart_standard").LineartStandardDetector()(ASTRONAUT, detect_resolution=512,
                                                                   output_type="np")
    np.testing.assert_array_equal(ours, aux)
    assert ours.std() > 5


def test_invert_threshold_blur_by_definition():
    np.testing.assert_array_equal(run("invert", CAT, resolution=300), 255 - CAT)
    binary = run("threshold", CAT, resolution=300, threshold_a=100)
    np.testing.assert_array_equal(binary[..., 0] == 255, CAT.min(axis=2) > 100)
    assert 0.05 < (binary[..., 0] == 255).mean() < 0.95
    blurred = run("blur_gaussian", CAT, resolution=300, threshold_a=3)
    np.testing.assert_array_equal(blurred, cv2.GaussianBlur(CAT, (0, 0), 3))
    assert np.abs(np.diff(blurred.astype(int), axis=1)).mean() < np.abs(np.diff(CAT.astype(int), axis=1)).mean()


def test_scribble_xdog_marks_pixels_darker_than_their_surroundings():
    out = run("scribble_xdog", COFFEE, resolution=400, threshold_a=32)[..., 0]
    x = COFFEE.astype(np.float32)
    darkening = np.min(cv2.GaussianBlur(x, (0, 0), 5.0) - cv2.GaussianBlur(x, (0, 0), 0.5), axis=2)
    np.testing.assert_array_equal(out == 255, 2 * darkening > 32)
    assert set(np.unique(out)) == {0, 255}
    fewer = run("scribble_xdog", COFFEE, resolution=400, threshold_a=60)
    assert (fewer == 255).sum() < (out == 255).sum() * 3


def test_shuffle_moves_content_but_keeps_its_colours_and_is_seeded():
    small = cv2.resize(ASTRONAUT, (256, 256), interpolation=cv2.INTER_AREA)
    a = run("shuffle", small, seed=1)
    b = run("shuffle", small, resolution=1024, seed=1)  # shuffles at a fixed 512, as in the other extension
    c = run("shuffle", small, seed=2)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (512, 512, 3)
    assert np.abs(a.astype(int) - c).mean() > 5
    source = ASTRONAUT
    assert np.abs(a.astype(int) - source).mean() > 20  # really shuffled
    assert np.abs(a.mean(axis=(0, 1)) - source.mean(axis=(0, 1))).max() < 40  # same palette of colours


def test_tile_resample_downsamples_by_the_rate():
    out = run("tile_resample", COFFEE, threshold_a=2.0)
    assert out.shape == (200, 300, 3)
    np.testing.assert_array_equal(out, cv2.resize(COFFEE, (300, 200), interpolation=cv2.INTER_AREA))
    np.testing.assert_array_equal(run("tile_resample", COFFEE, threshold_a=1.05), COFFEE)
    np.testing.assert_array_equal(run("tile_colorfix+sharp", COFFEE, threshold_a=8, threshold_b=1.0), COFFEE)


def test_color_grid_is_flat_64px_cells():
    out = run("t2ia_color_grid", ASTRONAUT, resolution=512)
    cells = out.reshape(8, 64, 8, 64, 3)
    assert (cells == cells[:, :1, :, :1]).all()  # every 64x64 block is one colour
    # each cell's colour is the cubic sample at the cell centre (as the T2I colour adapter was trained)
    np.testing.assert_array_equal(cells[:, 0, :, 0], cv2.resize(ASTRONAUT, (8, 8), interpolation=cv2.INTER_CUBIC))
    assert len(np.unique(cells[:, 0, :, 0].reshape(-1, 3), axis=0)) > 30


def test_recolor_maps_are_lightness_and_value_with_gamma():
    lum = run("recolor_luminance", CAT)[..., 0]
    np.testing.assert_array_equal(lum, cv2.cvtColor(CAT, cv2.COLOR_RGB2LAB)[..., 0])
    intensity = run("recolor_intensity", CAT)[..., 0]
    np.testing.assert_array_equal(intensity, CAT.max(axis=2))
    darker = run("recolor_intensity", CAT, threshold_a=2.0)[..., 0]
    expected = ((CAT.max(axis=2) / 255.0) ** 2.0 * 255).astype(np.uint8)
    assert np.abs(darker.astype(int) - expected).max() <= 1


def test_inpaint_puts_the_mask_in_the_alpha_and_the_hint_marks_it():
    from annotators.inpaint import to_control_hint

    mask = np.zeros(CAT.shape[:2], np.uint8)
    mask[50:100, 60:200] = 255
    out = run("inpaint_only", CAT, mask=mask)
    assert out.shape == CAT.shape[:2] + (4,)
    np.testing.assert_array_equal(out[..., :3], CAT)
    np.testing.assert_array_equal(out[..., 3], mask)
    hint = to_control_hint(out)
    assert (hint[50:100, 60:200] == -1).all() and hint[:50].min() >= 0 and hint.max() <= 1
    assert run("inpaint", CAT).shape == CAT.shape  # no mask: the image itself


def test_run_batch_equals_run_for_model_free():
    maps = preprocess.run_batch("canny", [CAT, COFFEE, CAT], resolution=128)
    assert [m.shape for m in maps] == [(128, 192, 3), (128, 192, 3), (128, 192, 3)]
    np.testing.assert_array_equal(maps[1], run("canny", COFFEE, resolution=128))
