"""The panel's flat values <-> ControlUnits, API unit detection, batch folders: the plain helpers under the
panel, the WebUI script and the standalone app."""
import numpy as np
import pytest
from PIL import Image

from lib_controlnet.ui.batch_folder import BatchFolderError, folder_images, pick
from lib_controlnet.ui.unit_args import (UNIT_FIELDS, sketch_to_image_and_mask, split_args, units_from_args,
                                         values_of)
from lib_controlnet.unit import ControlUnit, ControlUnitError


def _panel(count=2, **unit0):
    values = values_of(ControlUnit(enabled=False)) * count
    for name, value in unit0.items():
        values[UNIT_FIELDS.index(name)] = value
    return values


def test_panel_values_become_units():
    image = np.full((8, 8, 3), 7, np.uint8)
    units = units_from_args(_panel(enabled=True, module="canny", model="m", image={"image": image, "mask": None},
                                   weight=0.5, control_mode="ControlNet is more important"))
    assert [u.unit.enabled for u in units] == [True, False]
    assert units[0].unit.module == "canny" and units[0].unit.weight == 0.5
    assert units[0].unit.control_mode.value == "ControlNet is more important"
    assert units[0].unit.image is image and units[0].unit.mask is None


def test_api_units_at_the_front_replace_the_panel():
    api_unit = {"module": "canny", "model": "m", "image": "abc"}
    units = units_from_args([api_unit, ControlUnit(module="invert")] + _panel()[2:])
    assert [u.unit.module for u in units] == ["canny", "invert"]
    assert split_args([api_unit] + _panel()[1:]) == [api_unit]
    with pytest.raises(ControlUnitError) as caught:
        units_from_args([{"weight": "heavy"}] + _panel()[1:])
    assert caught.value.field == "0.weight"  # the unit index first, as the API names fields


def test_sketch_masks():
    image = np.zeros((4, 4, 3), np.uint8)
    assert sketch_to_image_and_mask({"image": image, "mask": np.zeros((4, 4, 4), np.uint8)})[1] is None
    painted = np.zeros((4, 4, 4), np.uint8)
    painted[1, 1] = 255
    assert sketch_to_image_and_mask({"image": image, "mask": painted})[1] is not None
    assert sketch_to_image_and_mask(image) == (image, None)
    assert sketch_to_image_and_mask(None) == (None, None)


def test_panel_unit_count_comes_from_the_values():
    with pytest.raises(ValueError, match="panel values"):
        split_args(_panel(count=1)[:-1])
    assert len(split_args(_panel(count=3))) == 3  # as many units as the panel was built with


def test_batch_folder(tmp_path):
    with pytest.raises(BatchFolderError, match="does not exist"):
        folder_images(str(tmp_path / "missing"), "batch input")
    with pytest.raises(BatchFolderError, match="holds no images"):
        folder_images(str(tmp_path), "batch input")
    for name in ("b.png", "a.jpg", "notes.txt"):
        if name.endswith("txt"):
            (tmp_path / name).write_text("x")
        else:
            Image.new("RGB", (4, 4)).save(tmp_path / name)
    files = folder_images(str(tmp_path), "batch input")
    assert [f.name for f in files] == ["a.jpg", "b.png"]
    assert [f.name for f in pick(files, 1, 3)] == ["b.png", "a.jpg", "b.png"]


def test_standalone_batch_mode_runs_one_job_per_folder_image(tmp_path):
    from lib_controlnet.app import batch_jobs

    for name in ("1.png", "2.png", "3.png"):
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    units = [ControlUnit(module="canny", model="m", batch_image_dir=str(tmp_path)), ControlUnit(enabled=False)]
    jobs = batch_jobs(units)
    assert len(jobs) == 3
    assert [job[0].image.name for job in jobs] == ["1.png", "2.png", "3.png"]
    assert all(job[1] is units[1] for job in jobs)
    assert batch_jobs(units[1:]) == [units[1:]]
