"""ControlNet unit strings in infotext: the other WebUI extension's format, written and parsed, quoting rules."""
import pytest

from lib_controlnet.infotext import (InfotextError, build_infotext, parse_infotext, unit_from_infotext,
                                     unit_to_infotext, units_from_params, units_to_params)
from lib_controlnet.unit import ControlMode, ControlUnit, HiResFixOption, ResizeMode

THEIRS = ('Module: canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 1.0, Resize Mode: Crop and Resize, '
          'Processor Res: 512, Threshold A: 100, Threshold B: 200, Guidance Start: 0.0, Guidance End: 1.0, '
          'Pixel Perfect: False, Control Mode: Balanced')


def test_writes_the_other_extensions_format():
    unit = ControlUnit(module="canny", model="control_v11p_sd15_canny [d14c016b]", processor_res=512,
                       threshold_a=100, threshold_b=200)
    assert unit_to_infotext(unit) == (
        "Module: canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 1.0, Resize Mode: Crop and Resize, "
        "Low Vram: False, Processor Res: 512, Threshold A: 100, Threshold B: 200, Guidance Start: 0.0, "
        "Guidance End: 1.0, Pixel Perfect: False, Control Mode: Balanced, Hr Option: Both, Save Detected Map: True")


def test_hidden_sliders_are_left_out():
    text = unit_to_infotext(ControlUnit(module="none", model="m"))
    assert "Processor Res" not in text and "Threshold" not in text


def test_parses_their_string():
    unit = unit_from_infotext(THEIRS)
    assert (unit.module, unit.model, unit.weight, unit.processor_res, unit.threshold_a) == (
        "canny", "control_v11p_sd15_canny [d14c016b]", 1.0, 512, 100.0)
    assert unit.resize_mode == ResizeMode.INNER_FIT and unit.control_mode == ControlMode.BALANCED


def test_round_trip_with_every_field_changed_and_awkward_model_name():
    unit = ControlUnit(module="depth_midas", model='my, model: "v2" [abcd1234]', weight=0.45,
                       resize_mode=ResizeMode.OUTER_FIT, low_vram=True, processor_res=768, threshold_a=0.5,
                       threshold_b=64, guidance_start=0.1, guidance_end=0.85, pixel_perfect=True,
                       control_mode=ControlMode.CONTROL, hr_option=HiResFixOption.HIGH_RES_ONLY,
                       save_detected_map=False)
    back = unit_from_infotext(unit_to_infotext(unit))
    assert back.to_dict() == unit.to_dict()


def test_whole_infotext_round_trip_with_webui_quoting():
    units = [ControlUnit(module="canny", model="cn [12345678]", processor_res=512, threshold_a=100, threshold_b=200),
             ControlUnit(enabled=False),
             ControlUnit(module="none", model="tile", weight=0.5, control_mode="My prompt is more important")]
    params = {"Steps": 20, "Sampler": "DPM++ 2M", "CFG scale": 7.5, "Seed": 42, "Size": "512x512",
              **units_to_params(units)}
    text = build_infotext("a cat, sitting", "blurry", params)
    assert 'ControlNet 0: "Module: canny, Model: cn [12345678], Weight: 1.0, ' in text
    assert "ControlNet 1" not in text
    prompt, negative, parsed = parse_infotext(text)
    assert (prompt, negative, parsed["Steps"], parsed["CFG scale"]) == ("a cat, sitting", "blurry", "20", "7.5")
    restored = units_from_params(parsed)
    assert sorted(restored) == [0, 2]
    assert restored[0].to_dict() == units[0].to_dict()
    assert restored[2].control_mode == ControlMode.PROMPT and restored[2].weight == 0.5


def test_parses_the_legacy_format():
    unit = unit_from_infotext("preprocessor: canny, model: control_sd15_canny [fef5e48e], weight: 0.8, "
                              "starting/ending: (0.1, 0.9), resize mode: Just Resize, pixel perfect: True, "
                              "control mode: ControlNet is more important, preprocessor params: (512, 100, 200)")
    assert (unit.module, unit.weight, unit.guidance_start, unit.guidance_end) == ("canny", 0.8, 0.1, 0.9)
    assert (unit.processor_res, unit.threshold_b, unit.pixel_perfect) == (512, 200.0, True)
    assert unit.resize_mode == ResizeMode.RESIZE and unit.control_mode == ControlMode.CONTROL


def test_bad_strings_raise_a_clear_error():
    with pytest.raises(InfotextError):
        unit_from_infotext("nothing to see")
    with pytest.raises(InfotextError):
        unit_from_infotext('Model: "unterminated')
    with pytest.raises(Exception, match="weight"):
        unit_from_infotext("Module: canny, Weight: heavy")
