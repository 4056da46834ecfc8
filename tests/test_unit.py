import pytest

from lib_controlnet.unit import ControlMode, ControlUnit, ControlUnitError, HiResFixOption, ResizeMode


def test_defaults_match_the_webui_api():
    unit = ControlUnit()
    assert unit.module == "none" and unit.model == "None"
    assert unit.resize_mode is ResizeMode.INNER_FIT
    assert unit.control_mode is ControlMode.BALANCED
    assert unit.hr_option is HiResFixOption.BOTH
    assert (unit.guidance_start, unit.guidance_end, unit.weight) == (0.0, 1.0, 1.0)


@pytest.mark.parametrize("sent, expected", [
    ("Crop and Resize", ResizeMode.INNER_FIT), (0, ResizeMode.RESIZE), ("2", ResizeMode.OUTER_FIT),
    ("just resize", ResizeMode.RESIZE), ("OUTER_FIT", ResizeMode.OUTER_FIT), (1.0, ResizeMode.INNER_FIT),
])
def test_resize_mode_accepts_names_and_old_ints(sent, expected):
    assert ControlUnit(resize_mode=sent).resize_mode is expected


def test_control_mode_names_users_send():
    assert ControlUnit(control_mode="My prompt is more important").control_mode is ControlMode.PROMPT
    assert ControlUnit(control_mode=2).control_mode is ControlMode.CONTROL


def test_legacy_aliases():
    unit = ControlUnit.from_dict({"input_image": "abc", "lowvram": True, "guidance": 0.4, "guessmode": True})
    assert unit.image == "abc" and unit.low_vram and unit.guidance_end == 0.4
    assert unit.control_mode is ControlMode.CONTROL


def test_current_name_wins_over_legacy_alias():
    unit = ControlUnit.from_dict({"input_image": "old", "image": "new"})
    assert unit.image == "new"


def test_unknown_keys_are_ignored_like_the_webui_does():
    assert ControlUnit.from_dict({"module": "canny", "some_future_field": 1}).module == "canny"


@pytest.mark.parametrize("payload, field", [
    ({"guidance_start": 0.8, "guidance_end": 0.2}, "guidance_start"),
    ({"weight": 3.5}, "weight"),
    ({"weight": "heavy"}, "weight"),
    ({"weight": float("nan")}, "weight"),
    ({"resize_mode": "Zoom"}, "resize_mode"),
    ({"resize_mode": 7}, "resize_mode"),
    ({"control_mode": True}, "control_mode"),
    ({"enabled": "maybe"}, "enabled"),
    ({"module": 5}, "module"),
    ({"guidance_end": 1.5}, "guidance_end"),
    ({"processor_res": 10}, "processor_res"),
])
def test_bad_fields_name_the_field(payload, field):
    with pytest.raises(ControlUnitError) as error:
        ControlUnit.from_dict(payload)
    assert error.value.field == field
    assert field in str(error.value)


def test_not_a_dict():
    with pytest.raises(ControlUnitError):
        ControlUnit.from_dict(["canny"])


def test_round_trip_through_dict():
    unit = ControlUnit(module="canny", model="control_sd15_canny [abcd1234]", weight=0.7,
                       control_mode="ControlNet is more important", pixel_perfect=True)
    again = ControlUnit.from_dict(unit.to_dict())
    assert again == unit
    assert unit.to_dict()["control_mode"] == "ControlNet is more important"
