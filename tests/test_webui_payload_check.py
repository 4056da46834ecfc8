"""Bad ControlNet units sent to the WebUI's own /sdapi/v1/txt2img answer 422 before the WebUI's job runs.

A FastAPI app with the WebUI's generation paths (which only count the requests that reach them) gets our
app_started callback, as WebUI 1.10 calls it after setting up its own middleware, and is served by uvicorn on
127.0.0.1.
"""
from __future__ import annotations

import base64
import dataclasses
import io
import json
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from fastapi import FastAPI, Request
from PIL import Image

from webui_standin.activate import standin_webui

MODEL_STEM = "control_sd15_canny_payload"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def webui_app(tmp_path_factory):
    with standin_webui(tmp_path_factory.mktemp("payload-check")):
        yield from _serve_webui_app()


def _serve_webui_app():
    import uvicorn
    from starlette.middleware.gzip import GZipMiddleware

    from lib_controlnet import tiny_models
    from lib_controlnet.models import get_registry, save_controlnet_ldm
    from lib_controlnet.settings import get_settings, update_settings
    from lib_controlnet.webui import callbacks
    from modules import paths  # the stand-in's; our callback reads the WebUI's folders and options from it

    saved = dataclasses.asdict(get_settings())
    save_controlnet_ldm(tiny_models.tiny_controlnet("sd15"),
                        Path(paths.models_path) / "ControlNet" / f"{MODEL_STEM}.safetensors", dtype="fp32")

    app = FastAPI()
    reached = []

    @app.post("/sdapi/v1/txt2img")
    @app.post("/sdapi/v1/img2img")
    async def generate(request: Request):
        body = await request.body()
        try:
            reached.append(json.loads(body))
        except ValueError:
            reached.append(body)  # the WebUI's own request model answers these
        return {"images": [], "info": "{}"}

    app.add_middleware(GZipMiddleware, minimum_size=1000)
    callbacks._on_app_started(None, app)
    callbacks._on_app_started(None, app)  # "Reload UI" runs it again on the same app
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield dict(url=f"http://127.0.0.1:{port}", reached=reached, app=app)
    server.should_exit = True
    thread.join(timeout=10)
    update_settings(**saved)
    get_registry().refresh()


def _png_b64() -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _post(webui_app, path, unit_change, **extra):
    unit = dict({"enabled": True, "module": "canny", "model": MODEL_STEM, "image": _png_b64()}, **unit_change)
    payload = dict({"prompt": "x", "alwayson_scripts": {"controlnet": {"args": [unit]}}}, **extra)
    return requests.post(webui_app["url"] + path, json=payload, timeout=60)


@pytest.mark.parametrize("change, field", [
    ({"guidance_start": 0.8, "guidance_end": 0.2}, "guidance_start"),
    ({"module": "no_such_module"}, "module"),
    ({"model": "no_such_model"}, "model"),
    ({"image": "%%% not base64"}, "image"),
    ({"weight": "abc"}, "weight"),
    ({"image": {"image": 5}}, "image.image"),
])
def test_bad_units_answer_422_before_the_job(webui_app, change, field):
    before = len(webui_app["reached"])
    for path in ("/sdapi/v1/txt2img", "/sdapi/v1/img2img"):
        response = _post(webui_app, path, change)
        assert response.status_code == 422, response.text
        body = response.json()
        assert set(body) == {"error", "detail", "body", "errors"}  # the error body the WebUI's routes answer
        assert body["detail"].startswith(f"alwayson_scripts.controlnet.args[0].{field}:")
    assert len(webui_app["reached"]) == before


def test_good_payloads_reach_the_webui_unchanged(webui_app):
    response = _post(webui_app, "/sdapi/v1/txt2img", {"weight": 0.5}, steps=3)
    assert response.status_code == 200, response.text
    received = webui_app["reached"][-1]
    assert received["steps"] == 3 and received["alwayson_scripts"]["controlnet"]["args"][0]["weight"] == 0.5
    big = "y" * 3_000_000  # a body that arrives in several chunks is replayed whole
    response = requests.post(webui_app["url"] + "/sdapi/v1/txt2img", json={"prompt": big}, timeout=60)
    assert response.status_code == 200 and webui_app["reached"][-1]["prompt"] == big


def test_other_routes_and_non_json_bodies_pass_through(webui_app):
    requests.post(webui_app["url"] + "/sdapi/v1/txt2img", data=b"not json",
                  headers={"Content-Type": "application/json"}, timeout=60)
    assert webui_app["reached"][-1] == b"not json"
    assert len([m for m in webui_app["app"].user_middleware if m.cls.__name__ == "AlwaysOnPayloadCheck"]) == 1
    assert requests.get(webui_app["url"] + "/controlnet/version", timeout=60).json() == {"version": 3}


class _LoadedModel:
    """What WebUI 1.10's load_model sets on a checkpoint: one of is_sd1 / is_sd2 / is_sdxl is True."""

    def __init__(self, family):
        self.is_sd1, self.is_sd2, self.is_sdxl = family == "sd15", family == "sd2", family == "sdxl"


@pytest.fixture
def loaded(webui_app):
    from modules import shared

    before = shared.sd_model

    def load(family):
        shared.sd_model = _LoadedModel(family) if family else None

    yield load
    shared.sd_model = before


def test_a_controlnet_for_another_base_answers_422_naming_both(webui_app, loaded):
    from lib_controlnet import tiny_models
    from lib_controlnet.models import get_registry, save_controlnet_ldm
    from modules import paths

    save_controlnet_ldm(tiny_models.tiny_controlnet("sdxl"),
                        Path(paths.models_path) / "ControlNet" / "control_sdxl_payload.safetensors", dtype="fp16")
    get_registry().refresh()
    before = len(webui_app["reached"])
    loaded("sdxl")
    response = _post(webui_app, "/sdapi/v1/txt2img", {})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert detail.startswith("alwayson_scripts.controlnet.args[0].model:")
    assert "for SD1.5" in detail and "checkpoint is SDXL" in detail
    assert _post(webui_app, "/sdapi/v1/txt2img", {"model": "control_sdxl_payload"}).status_code == 200
    loaded("sd15")  # the reverse
    response = _post(webui_app, "/sdapi/v1/img2img", {"model": "control_sdxl_payload"})
    assert response.status_code == 422 and "for SDXL" in response.json()["detail"]
    assert len(webui_app["reached"]) == before + 1
    # a request that loads another checkpoint, and a WebUI with none loaded yet: judged later, at load time
    switching = _post(webui_app, "/sdapi/v1/img2img", {"model": "control_sdxl_payload"},
                      override_settings={"sd_model_checkpoint": "some_sdxl_model"})
    assert switching.status_code == 200
    loaded(None)
    assert _post(webui_app, "/sdapi/v1/img2img", {"model": "control_sdxl_payload"}).status_code == 200
