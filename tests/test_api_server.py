"""The HTTP API over real HTTP: `python -m lib_controlnet serve` started as a subprocess on 127.0.0.1.

Same paths and JSON shapes as the WebUI ControlNet API; bad payloads answer 422 naming the field, and the
server keeps serving after each of them.
"""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from webui_standin.standalone_server import MODEL_STEM, make_assets, running_server

pytestmark = pytest.mark.timeout(600)


def _png_b64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[::4, ::4])  # a real photograph, 128x128


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("api-server")
    with running_server(folder, make_assets(folder), unit_count=2) as srv:
        yield srv


@pytest.fixture(scope="module")
def model_name(server) -> str:
    names = server.get("/controlnet/model_list").json()["model_list"]
    return next(n for n in names if n.startswith(MODEL_STEM))


def _assert_422(response, field: str):
    assert response.status_code == 422, response.text
    body = response.json()
    assert set(body) == {"error", "detail", "body", "errors"}, body  # the WebUI's error body, on every route
    assert field in body["detail"], response.text


# ---------------------------------------------------------------- the read-only routes


def test_version_and_settings(server):
    assert server.get("/controlnet/version").json() == {"version": 3}
    assert server.get("/controlnet/settings").json() == {"control_net_unit_count": 2}


def test_model_list_names_files_with_their_short_hash(server, model_name):
    names = server.get("/controlnet/model_list", params={"update": "true"}).json()["model_list"]
    assert model_name in names
    assert model_name.endswith("]") and len(model_name.split("[")[1]) == 9  # "stem [hash8]"
    assert server.get("/controlnet/model_list", params={"update": "false"}).json()["model_list"] == names


def test_module_list_with_details_and_aliases(server):
    body = server.get("/controlnet/module_list").json()
    assert body["module_list"][0] == "none" and "canny" in body["module_list"]
    assert "lineart" in body["module_list"] and "lineart_realistic" not in body["module_list"]
    sliders = body["module_detail"]["canny"]["sliders"]
    assert [s["name"] for s in sliders] == ["Resolution", "Low Threshold", "High Threshold"]
    assert body["module_detail"]["canny"]["model_free"] is False
    aliased = server.get("/controlnet/module_list", params={"alias_names": "true"}).json()
    assert "lineart_realistic" in aliased["module_list"]
    assert set(aliased["module_detail"]) == set(aliased["module_list"])


def test_control_types_filter_modules_and_models(server, model_name):
    types = server.get("/controlnet/control_types").json()["control_types"]
    assert list(types)[0] == "All"
    canny = types["Canny"]
    assert set(canny) == {"module_list", "model_list", "default_option", "default_model"}
    assert "canny" in canny["module_list"] and canny["default_option"] == "canny"
    assert canny["model_list"] == ["None", model_name] and canny["default_model"] == model_name
    assert model_name not in types["Depth"]["model_list"]


# ---------------------------------------------------------------- detect


def test_detect_returns_the_preprocessor_map(server, photo):
    from lib_controlnet import preprocess

    payload = {"controlnet_module": "canny", "controlnet_input_images": [_png_b64(photo)],
               "controlnet_processor_res": 128, "controlnet_threshold_a": 50, "controlnet_threshold_b": 150}
    body = server.post("/controlnet/detect", json=payload).json()
    assert body["info"] == "Success" and len(body["images"]) == 1
    got = _decode(body["images"][0])
    want = preprocess.run("canny", photo, resolution=128, threshold_a=50, threshold_b=150)
    np.testing.assert_array_equal(got, want)
    assert 0 < (got > 0).mean() < 0.5  # an edge map, not a blank or a copy


def test_detect_takes_data_urls_and_several_images(server, photo):
    data_url = "data:image/png;base64," + _png_b64(photo)
    payload = {"controlnet_module": "invert", "controlnet_input_images": [data_url, _png_b64(photo[:64])]}
    body = server.post("/controlnet/detect", json=payload).json()
    assert len(body["images"]) == 2
    assert _decode(body["images"][1]).shape[:2] != _decode(body["images"][0]).shape[:2]


def test_detect_passes_masks_to_mask_aware_preprocessors(server, photo):
    from lib_controlnet import preprocess

    mask = np.zeros_like(photo)
    mask[32:96, 32:96] = 255
    payload = {"controlnet_module": "inpaint_only", "controlnet_input_images": [_png_b64(photo)],
               "controlnet_masks": [_png_b64(mask)]}
    body = server.post("/controlnet/detect", json=payload).json()
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["images"][0]))))
    np.testing.assert_array_equal(got, preprocess.run("inpaint_only", photo, mask=mask))
    short = dict(payload, controlnet_masks=[])
    assert server.post("/controlnet/detect", json=dict(short, controlnet_masks=[_png_b64(mask)] * 2)).status_code == 422


@pytest.mark.parametrize("payload, field", [
    ({"controlnet_module": "no_such_module", "controlnet_input_images": ["x"]}, "controlnet_module"),
    ({"controlnet_module": "canny", "controlnet_input_images": ["%%% not base64 %%%"]},
     "controlnet_input_images[0]"),
    ({"controlnet_module": "canny", "controlnet_input_images": [base64.b64encode(b"not an image").decode()]},
     "controlnet_input_images[0]"),
    ({"controlnet_module": "canny", "controlnet_input_images": []}, "controlnet_input_images"),
    ({"controlnet_module": "canny", "controlnet_input_images": "abc"}, "controlnet_input_images"),
    ({"controlnet_module": "canny", "controlnet_input_images": ["x"], "controlnet_processor_res": "big"},
     "controlnet_processor_res"),
    ({"controlnet_module": "canny", "controlnet_input_images": ["x"], "controlnet_processor_res": 9},
     "controlnet_processor_res"),
    ({"controlnet_module": "canny", "controlnet_input_images": ["x"], "controlnet_processor_res": 4096},
     "controlnet_processor_res: must be -1 (the default) or a whole number from 64 to 2048"),
    ({"controlnet_module": "canny", "controlnet_input_images": ["x"], "controlnet_threshold_a": [1]},
     "controlnet_threshold_a"),
])
def test_detect_bad_payloads_answer_422_and_the_server_keeps_serving(server, photo, payload, field):
    _assert_422(server.post("/controlnet/detect", json=payload), field)
    assert server.get("/controlnet/version").status_code == 200


def test_a_server_file_path_is_not_an_image(server, photo, tmp_path):
    """Clients send image data; a path must not make the server read one of its own files."""
    on_server = tmp_path / "secret.png"
    Image.fromarray(photo).save(on_server)
    response = server.post("/controlnet/detect", json={"controlnet_module": "canny",
                                                       "controlnet_input_images": [str(on_server)]})
    _assert_422(response, "controlnet_input_images[0]")
    assert "base64" in response.text


def test_detect_rejects_non_json(server):
    response = server.post("/controlnet/detect", data=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    assert server.alive()


# ---------------------------------------------------------------- txt2img with alwayson_scripts


def _txt2img(server, units, **extra):
    payload = dict(prompt="a house", negative_prompt="", steps=2, width=64, height=64, seed=7, cfg_scale=7.0,
                   alwayson_scripts={"ControlNet": {"args": units}}, **extra)
    return server.post("/sdapi/v1/txt2img", json=payload)


def test_txt2img_with_a_unit_returns_image_map_and_infotext(server, photo, model_name):
    unit = {"enabled": True, "module": "canny", "model": model_name, "image": _png_b64(photo), "weight": 1.0,
            "processor_res": 64}
    response = _txt2img(server, [unit], sampler_name="Euler a", override_settings={})  # unknown fields: ignored
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["images"]) == 2  # the generated image, then the detected map
    generated, detected = _decode(body["images"][0]), _decode(body["images"][1])
    assert generated.shape == (64, 64, 3) and generated.std() > 0
    assert set(np.unique(detected)) <= {0, 255}
    info = json.loads(body["info"])
    assert info["seed"] == 7 and 'ControlNet 0: "Module: canny' in info["infotexts"][0]
    assert body["parameters"]["prompt"] == "a house"


def test_txt2img_payload_shapes_all_generate(server, photo, model_name):
    image = _png_b64(photo)
    mask = np.zeros_like(photo)
    mask[32:96, 32:96] = 255
    shapes = [
        {"image": {"image": image, "mask": _png_b64(mask)}},
        {"image": [image, image]},
        {"input_image": image, "guidance": 0.5, "lowvram": True},
        {"image": image, "resize_mode": 0, "control_mode": 2},
    ]
    for shape in shapes:
        unit = dict({"enabled": True, "module": "canny", "model": model_name, "processor_res": 64}, **shape)
        response = _txt2img(server, [unit], batch_size=2 if isinstance(shape.get("image"), list) else 1)
        assert response.status_code == 200, (shape.keys(), response.text)
        assert len(response.json()["images"]) >= 2


def test_txt2img_without_controlnet_still_generates(server):
    response = server.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "width": 64, "height": 64})
    assert response.status_code == 200 and len(response.json()["images"]) == 1


@pytest.mark.parametrize("change, field", [
    ({"guidance_start": 0.8, "guidance_end": 0.2}, "guidance_start"),
    ({"module": "no_such_module"}, "module"),
    ({"model": "no_such_model"}, "model"),
    ({"image": "%%% not base64"}, "image"),
    ({"image": {"mask": "abc"}}, "image"),
    ({"weight": "heavy"}, "weight"),
    ({"weight": 7}, "weight"),
    ({"resize_mode": "Stretch"}, "resize_mode"),
    ({"enabled": "maybe"}, "enabled"),
    ({"image": {"image": 5}}, "alwayson_scripts.ControlNet.args[0].image.image: expected a base64-encoded image, "
                              "got the number 5"),
    ({"processor_res": 4096}, "processor_res: must be -1 (the default) or a whole number from 64 to 2048"),
])
def test_txt2img_bad_units_answer_422_naming_the_field(server, photo, model_name, change, field):
    unit = dict({"enabled": True, "module": "canny", "model": model_name, "image": _png_b64(photo)}, **change)
    response = _txt2img(server, [unit])
    _assert_422(response, field)
    assert "alwayson_scripts.ControlNet.args[0]" in response.text
    assert server.alive()


@pytest.mark.parametrize("payload, field", [
    ({"alwayson_scripts": {"ControlNet": {"args": "not a list"}}}, "args"),
    ({"alwayson_scripts": {"ControlNet": [1, 2]}}, "alwayson_scripts.ControlNet"),
    ({"alwayson_scripts": {"ControlNet": {"args": [42]}}}, "args[0]"),
    ({"steps": "many"}, "steps"),
    ({"width": 100}, "width"),
    # the WebUI answers 500 here (torch cannot seed it, and it does not wrap seeds): a 422 naming the field
    ({"seed": 2 ** 64}, "seed: must be -1 (random) or a whole number from -9223372036854775808 to "
                        "18446744073709551615, got 18446744073709551616"),
    ({"seed": -(2 ** 63) - 1}, "seed"),
])
def test_txt2img_bad_payloads_answer_422(server, payload, field):
    response = server.post("/sdapi/v1/txt2img", json=dict({"prompt": "x", "steps": 1, "width": 64, "height": 64},
                                                          **payload))
    _assert_422(response, field)
    assert server.alive()


def test_serve_refuses_bad_flags_in_one_line():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "lib_controlnet", "serve", "--base", "/no/such/base"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "--base /no/such/base does not exist" in done.stderr and "Traceback" not in done.stderr
