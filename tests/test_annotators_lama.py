"""inpaint_only+lama: LaMa's real loading code on random weights saved as ControlNetLama.pth (the released key
layout at reduced width), driven through the CLI and the generation path as a user reaches it."""
import cv2
import numpy as np
import pytest
import skimage.data
import torch

from annotators import lama_network, random_weights, runtime
from lib_controlnet import preprocess
from lib_controlnet.cli import main
from lib_controlnet.errors import UserError

IMAGE = cv2.resize(skimage.data.coffee(), (150, 100), interpolation=cv2.INTER_AREA)
MASK = np.zeros(IMAGE.shape[:2], np.uint8)
MASK[30:70, 50:110] = 255


def test_registered_as_users_know_it():
    pre = preprocess.get_preprocessor("inpaint_only+lama")
    assert pre.control_type == "Inpaint" and not pre.model_free and pre.sliders() == []
    assert "inpaint_only+lama" in preprocess.control_types()["Inpaint"]["module_list"]


def test_the_released_layout_is_big_lama():
    """The full-size generator: big-lama's 51 M parameters; its keys are FFCResNetGenerator's."""
    with torch.device("meta"):
        state = lama_network.LamaGenerator().state_dict()
    assert sum(v.numel() for k, v in state.items() if "num_batches" not in k and "running" not in k) == 50_975_875
    for key in ("model.1.ffc.convl2l.weight", "model.4.ffc.convl2g.weight",
                "model.5.conv1.ffc.convg2g.fu.conv_layer.weight",
                "model.22.conv2.bn_g.running_var", "model.24.weight", "model.25.running_mean", "model.34.bias"):
        assert key in state, key
    assert tuple(state["model.4.ffc.convl2g.weight"].shape) == (384, 256, 3, 3)
    assert tuple(state["model.5.conv1.ffc.convg2g.conv1.0.weight"].shape) == (192, 384, 1, 1)


def test_missing_file_is_one_sentence(annotator_dir):
    with pytest.raises(UserError) as error:
        preprocess.run("inpaint_only+lama", IMAGE, mask=MASK)
    text = str(error.value)
    assert "needs the weight file ControlNetLama.pth: put it in" in text and str(annotator_dir) in text
    assert "lllyasviel/Annotators" in text and "\n" not in text


def test_damaged_file_is_one_sentence(annotator_dir):
    torch.save({"model.1.ffc.convl2l.weight": torch.zeros(8, 4, 7, 7)}, annotator_dir / "ControlNetLama.pth")
    with pytest.raises(UserError, match=r"cannot be read as LaMa's ControlNetLama.pth: .*replace it"):
        preprocess.run("inpaint_only+lama", IMAGE, mask=MASK)


def test_lama_fills_only_the_hole_from_what_is_around_it(annotator_dir):
    random_weights.write_lama(annotator_dir, seed=1)
    out = preprocess.run("inpaint_only+lama", IMAGE, mask=MASK, use_cache=False)
    assert out.shape == IMAGE.shape[:2] + (4,) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[..., 3], MASK)  # inpaint_only's condition: alpha 255 = repaint
    keep = MASK == 0
    np.testing.assert_array_equal(out[..., :3][keep], IMAGE[keep])
    hole = MASK == 255
    assert np.abs(out[..., :3][hole].astype(int) - IMAGE[hole]).mean() > 5  # painted, not the input
    # the hole's own pixels never reach the network: scribbling inside it changes nothing (3 px in from its
    # edge: the resize to LaMa's 256 px blends the pixels at the edge into their unmasked neighbours)
    inside = cv2.erode(MASK, np.ones((7, 7), np.uint8)) == 255
    scribbled = IMAGE.copy()
    scribbled[inside] = 255 - scribbled[inside]
    np.testing.assert_array_equal(preprocess.run("inpaint_only+lama", scribbled, mask=MASK, use_cache=False), out)
    # ...but the weights do: another generator paints another fill
    random_weights.write_lama(annotator_dir, seed=2)
    runtime.unload_all()
    other = preprocess.run("inpaint_only+lama", IMAGE, mask=MASK, use_cache=False)
    assert not np.array_equal(other[..., :3][hole], out[..., :3][hole])
    # no mask: nothing to fill, the image as inpaint_only gives it
    np.testing.assert_array_equal(preprocess.run("inpaint_only+lama", IMAGE, use_cache=False), IMAGE)


def test_cli_and_generation_hint_carry_the_fill(annotator_dir, tmp_path):
    from lib_controlnet.control_units import ControlJob, _detect
    from lib_controlnet.unit import ControlUnit

    random_weights.write_lama(annotator_dir)
    photo, mask_png, out_png = tmp_path / "in.png", tmp_path / "mask.png", tmp_path / "hint.png"
    cv2.imwrite(str(photo), IMAGE[:, :, ::-1])
    cv2.imwrite(str(mask_png), MASK)
    assert main(["detect", "--module", "inpaint_only+lama", "--annotator-dir", str(annotator_dir),
                 "--mask", str(mask_png), str(photo), str(out_png)]) == 0
    written = cv2.cvtColor(cv2.imread(str(out_png), cv2.IMREAD_UNCHANGED), cv2.COLOR_BGRA2RGBA)
    np.testing.assert_array_equal(written, preprocess.run("inpaint_only+lama", IMAGE, mask=MASK))
    # a generation unit with a drawn mask: its control image is LaMa's fill, its mask limits the control
    unit = ControlUnit(enabled=True, module="inpaint_only+lama", model="x", image={"image": IMAGE, "mask": MASK})
    detected, masks = _detect(unit, ControlJob(units=[unit], width=152, height=104, steps=1))
    np.testing.assert_array_equal(detected[0], written[..., :3])
    np.testing.assert_array_equal(masks[0], MASK / 255.0)
    # the panel's preview of a sketch (strokes opaque on a clear layer) shows the fill, not a transparent image
    from lib_controlnet.ui.control_panel import run_preview

    strokes = np.zeros(IMAGE.shape[:2] + (4,), np.uint8)
    strokes[MASK == 255] = 255
    preview = run_preview({"image": IMAGE, "mask": strokes}, "inpaint_only+lama", -1, -1, -1, False, "Crop and Resize")
    np.testing.assert_array_equal(preview, written[..., :3])
