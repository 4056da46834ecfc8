"""A client written for the other WebUI ControlNet extension (sd-webui-controlnet, last release 1.1.455) works
against ours: its response shapes, held in tests/fixtures/sd_webui_controlnet_1.1.455.json, checked against our
routes served the way the WebUI serves them (its API error handling, our app_started callback, uvicorn on
127.0.0.1).

Where a client can see a difference, ours matches theirs, except the decisions in DIFFERENCES below (theirs is a
bug there, or ours adds something). What ours adds on top: `control_type` and `needs_weights` in module_detail,
and 422s naming the field where theirs answers 500 or silently uses a default. The hires-fix image order
(result, hires-size map, first-pass map) is checked where a whole WebUI job runs:
tests/test_webui_script.py::test_hires_fix_runs_both_passes.
"""
from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest
import requests

from webui_standin.activate import standin_webui

THEIRS = json.loads((Path(__file__).parent / "fixtures" / "sd_webui_controlnet_1.1.455.json").read_text())
SLIDER_KEYS = {"name", "value", "min", "max", "step"}
ERROR_KEYS = set(THEIRS["error_body_detect_unknown_module"])

# Decisions where ours differs from theirs on purpose. Keyed by module label: (what differs, why).
DIFFERENCES = {
    "none": ("sliders: [] where theirs lists a Resolution slider",
             "'none' runs no preprocessor, so a resolution does nothing; theirs lists it only because its "
             "default slider stays visible (a bug). An empty list is safe for clients that index sliders."),
    "ip-adapter-auto": ("sliders: [] where theirs lists a Resolution slider",
                        "an image prompt's encoder takes no resolution; theirs lists its base class's default "
                        "slider, as for 'none'."),
    "threshold": ("Binarization Threshold step 1 where theirs says 0.01",
                  "theirs leaves its default step on an integer threshold over 0..255 (a bug)"),
    "scribble_xdog": ("XDoG Threshold step 1 where theirs says 0.01",
                      "theirs leaves its default step on an integer threshold over 1..64 (a bug)"),
}
# Kept from theirs although it does nothing in either extension: tile_* and recolor_* list the Resolution
# slider first, because clients map sliders by position onto processor_res, threshold_a, threshold_b.
POSITIONAL_PLACEHOLDERS = ("tile_resample", "tile_colorfix", "tile_colorfix+sharp", "recolor_luminance",
                           "recolor_intensity")


def _ours_expected(label: str, theirs: dict) -> dict:
    expected = json.loads(json.dumps(theirs))
    if label in ("none", "ip-adapter-auto"):
        expected["sliders"] = []
    if label in ("threshold", "scribble_xdog"):
        expected["sliders"][1]["step"] = 1
    return expected


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def webui_url(tmp_path_factory):
    """A FastAPI app with the WebUI's API error handling and our app_started callback, on 127.0.0.1."""
    import dataclasses

    import uvicorn
    from fastapi import FastAPI

    from lib_controlnet.settings import get_settings, update_settings

    saved = dataclasses.asdict(get_settings())
    with standin_webui(tmp_path_factory.mktemp("compat")):
        from modules.api.api import api_middleware

        from lib_controlnet.webui import callbacks

        app = FastAPI()
        api_middleware(app)

        @app.post("/sdapi/v1/txt2img")
        async def txt2img():  # the WebUI's route; only bad ControlNet payloads are sent here
            raise AssertionError("a bad unit reached the WebUI's job")

        callbacks._on_app_started(None, app)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=_free_port(), log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        yield f"http://127.0.0.1:{server.config.port}"
        server.should_exit = True
        thread.join(timeout=10)
    update_settings(**saved)


def test_version_is_their_last_release(webui_url):
    assert requests.get(webui_url + "/controlnet/version", timeout=30).json() == THEIRS["version"]


@pytest.mark.parametrize("alias_names", [True, False])
def test_module_detail_sliders_are_slider_objects(webui_url, alias_names):
    body = requests.get(webui_url + "/controlnet/module_list", params={"alias_names": alias_names},
                        timeout=30).json()
    assert list(body["module_detail"]) == body["module_list"]
    for name, detail in body["module_detail"].items():
        assert {"model_free", "sliders", "control_type", "needs_weights"} <= set(detail), name
        for slider in detail["sliders"]:
            assert isinstance(slider, dict) and set(slider) == SLIDER_KEYS, (name, slider)  # no nulls, with step


def test_module_detail_matches_theirs_module_by_module(webui_url):
    ours = requests.get(webui_url + "/controlnet/module_list", params={"alias_names": True}, timeout=30).json()
    detail = ours["module_detail"]
    assert set(THEIRS["module_detail_alias_names"]) == set(detail)  # every preprocessor of ours is one of theirs
    for label, theirs in THEIRS["module_detail_alias_names"].items():
        mine = {k: detail[label][k] for k in ("model_free", "sliders")}
        assert mine == _ours_expected(label, theirs), (label, DIFFERENCES.get(label))
    for label in POSITIONAL_PLACEHOLDERS:
        assert detail[label]["sliders"][0]["name"] == "Resolution"
    assert detail["depth_midas"]["needs_weights"] and not detail["canny"]["needs_weights"]
    assert detail["canny"]["control_type"] == "Canny"


def test_one_resolution_range_on_every_surface(webui_url):
    from lib_controlnet import preprocess
    from lib_controlnet.unit import ControlUnit, ControlUnitError

    listed = {s["min"] for d in THEIRS["module_detail_alias_names"].values() for s in d["sliders"]
              if s["name"] == "Resolution"}, {s["max"] for d in THEIRS["module_detail_alias_names"].values()
                                                 for s in d["sliders"] if s["name"] == "Resolution"}
    assert listed == ({preprocess.MIN_RESOLUTION}, {preprocess.MAX_RESOLUTION})
    image = _png_b64()
    for res, status in ((2048, 200), (2049, 422), (63, 422), (4096, 422)):
        response = requests.post(webui_url + "/controlnet/detect", timeout=60, json={
            "controlnet_module": "invert", "controlnet_input_images": [image], "controlnet_processor_res": res})
        assert response.status_code == status, (res, response.text)
    with pytest.raises(ControlUnitError, match="processor_res.*from 64 to 2048, got 4096"):
        ControlUnit(processor_res=4096)


def test_control_types_are_theirs(webui_url):
    types = requests.get(webui_url + "/controlnet/control_types", timeout=30).json()["control_types"]
    keys = list(types)
    assert set(keys) <= set(THEIRS["control_types"])  # no "Scribble/Sketch", "Tile/Blur"
    assert keys == [k for k in THEIRS["control_types"] if k in types]  # "All", then theirs' order
    assert {"Scribble", "Tile"} <= set(keys)
    for name, default in THEIRS["control_type_default_option"].items():
        assert types[name]["default_option"] == default, name
    assert set(types["Tile"]) == {"module_list", "model_list", "default_option", "default_model"}


def _png_b64() -> str:
    import base64
    import io

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize("path, payload, field", [
    ("/controlnet/detect", {"controlnet_module": "no_such", "controlnet_input_images": ["x"]}, "controlnet_module"),
    ("/controlnet/detect", {"controlnet_module": "canny", "controlnet_input_images": ["x"],
                            "controlnet_processor_res": "big"}, "controlnet_processor_res"),
    ("/controlnet/detect", {"controlnet_module": "canny", "controlnet_input_images": "x"}, "controlnet_input_images"),
    ("/controlnet/detect", b"{not json", "body"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "alwayson_scripts": {"ControlNet": {"args": [{"module": "no_such"}]}}},
     "alwayson_scripts.ControlNet.args[0].module"),
])
def test_every_error_has_the_webuis_error_body(webui_url, path, payload, field):
    if isinstance(payload, bytes):
        response = requests.post(webui_url + path, data=payload, headers={"Content-Type": "application/json"},
                                 timeout=30)
    else:
        response = requests.post(webui_url + path, json=payload, timeout=30)
    assert response.status_code == 422, response.text
    body = response.json()
    assert set(body) == ERROR_KEYS, body
    assert body["error"] == "HTTPException" and body["body"] == "" and body["errors"] == ""
    assert isinstance(body["detail"], str) and body["detail"].startswith(field + ":"), body


def test_scribble_and_tile_types_find_their_files_by_either_spelling():
    """Renaming "Scribble/Sketch" and "Tile/Blur" to their names must not lose sketch and blur model files."""
    from lib_controlnet.ui.catalog import _model_matches

    assert _model_matches("Scribble", "control_v11p_sd15_scribble") and _model_matches("Scribble", "t2i_sketch_xl")
    assert _model_matches("Tile", "control_v11f1e_sd15_tile") and _model_matches("Tile", "kohya_blur_xl")
    assert not _model_matches("Tile", "control_v11p_sd15_canny")
