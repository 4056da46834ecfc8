"""HTTP routes `/controlnet/*`, shared by the WebUI (mounted on its FastAPI app) and the standalone server.

Paths and JSON shapes are those of the WebUI ControlNet API that existing clients already call (the other WebUI
ControlNet extension's last release; tests/test_api_compat.py holds its shapes and every place we differ). Every
bad payload is answered 422 with a message that names the field, in the one error body every route answers
(`error_body`); nothing a client sends can stop the server.
"""
from __future__ import annotations

import base64
import dataclasses
import io
import json
from typing import Any, Callable, Dict, List, Mapping, Optional

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from lib_controlnet.errors import UserError
from lib_controlnet.settings import get_settings
from lib_controlnet.ui import catalog
from lib_controlnet.unit import ControlUnit, ControlUnitError


# The WebUI ControlNet API version clients check before using the routes below: what the other WebUI ControlNet
# extension's last release (1.1.455) answers.
API_VERSION = 3
SCRIPT_TITLE = "ControlNet"


class PayloadError(UserError):
    """A bad field in a request; `field` is its path in the JSON payload."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def _unprocessable(error: Exception) -> HTTPException:
    return HTTPException(status_code=422, detail=str(error))


def error_body(status_code: int, detail: Any) -> dict:
    """THE error body of every route: the one the WebUI's API answers for an HTTPException (its
    modules/api/api.py handle_exception), so a client reads `detail` alike from the WebUI's routes, ours inside
    the WebUI, the 422 of a bad unit sent to the WebUI's txt2img, and the standalone server."""
    error = HTTPException(status_code=status_code, detail=detail)
    return {"error": type(error).__name__, "detail": detail, "body": "", "errors": str(error)}


def error_response(status_code: int, detail: Any, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse(error_body(status_code, detail), status_code=status_code, headers=headers)


def _validation_detail(error: RequestValidationError) -> str:
    """pydantic's list of problems as one line naming each field by its path in the payload."""
    parts = []
    for problem in error.errors():
        loc = [str(part) for part in problem.get("loc", ()) if part != "body"]
        parts.append(f"{'.'.join(loc) or 'body'}: {problem.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    """The standalone server answers errors as the WebUI does (inside the WebUI, the WebUI's own handlers do)."""

    from starlette.exceptions import HTTPException as StarletteHTTPException  # also its 404/405s

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, error: StarletteHTTPException):
        return error_response(error.status_code, error.detail, getattr(error, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, error: RequestValidationError):
        return error_response(422, _validation_detail(error))


# ---------------------------------------------------------------- images in and out


def encode_png_base64(image) -> str:
    """PNG bytes as a bare base64 string (no data: prefix), as the WebUI API returns images."""
    import numpy as np
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_image(value: Any, field: str):
    """HxWx3 uint8 array from a base64 string (with or without data: prefix), or a PayloadError naming field."""
    from lib_controlnet import images

    if not isinstance(value, str) or not value.strip():
        raise PayloadError(field, f"expected a base64-encoded image, got {type(value).__name__}")
    try:
        return images.to_rgb_array(value)
    except Exception as error:  # bad base64, not an image, too large: all one answer for the client
        raise PayloadError(field, f"is not a readable base64 image ({error})") from None


def _image_entries(image: Any, field: str) -> list[tuple[Any, str]]:
    """Every image value inside a unit's `image`: a string, an {image, mask} dict, or a list of those."""
    if image is None:
        return []
    if isinstance(image, list):
        out = []
        for i, item in enumerate(image):
            out += _image_entries(item, f"{field}[{i}]")
        return out
    if isinstance(image, Mapping):
        if "image" not in image:
            raise PayloadError(field, "an image object needs an 'image' key (and optionally 'mask')")
        entries = [(image["image"], f"{field}.image")]
        if image.get("mask") is not None:
            entries.append((image["mask"], f"{field}.mask"))
        return entries
    return [(image, field)]


def validate_unit(unit: ControlUnit, where: str) -> ControlUnit:
    """Check what the dataclass cannot: the module and model exist and every image decodes."""
    if unit.module and unit.module.lower() != catalog.NO_MODULE:
        try:
            catalog.get_preprocessor(unit.module)
        except UserError as error:
            raise PayloadError(f"{where}.module", str(error)) from None
    if unit.enabled and unit.uses_model:
        try:
            catalog.find_model(unit.model)
        except UserError as error:
            raise PayloadError(f"{where}.model", str(error)) from None
    for value, field in _image_entries(unit.image, f"{where}.image") + _image_entries(unit.mask, f"{where}.mask"):
        if isinstance(value, str):
            decode_image(value, field)
        elif value is not None and not _is_python_image(value):
            # a JSON number, bool or object where an image belongs: name the field now, not at generation time
            raise PayloadError(field, f"expected a base64-encoded image, got {_json_type(value)}")
    return unit  # (processor_res: ControlUnit checks it against the registry's range)


def _is_python_image(value: Any) -> bool:
    """Arrays, PIL images and paths come from Python callers (panel, CLI, scripts), never from JSON."""
    import os

    import numpy as np
    from PIL import Image

    return isinstance(value, (np.ndarray, Image.Image, os.PathLike, bytes))


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    return {dict: "an object", list: "a list"}.get(type(value), type(value).__name__)


def parse_units(args: Any, where: str) -> list[ControlUnit]:
    """Units from a script's args list: dicts (JSON), ControlUnits, or panel states (dicts too)."""
    if not isinstance(args, (list, tuple)):
        raise PayloadError(where, f"expected a list of units, got {type(args).__name__}")
    units = []
    for i, raw in enumerate(args):
        field = f"{where}[{i}]"
        if isinstance(raw, ControlUnit):
            unit = raw
        elif isinstance(raw, Mapping):
            try:
                unit = ControlUnit.from_dict(raw)
            except ControlUnitError as error:
                raise PayloadError(f"{field}.{error.field}", error.message) from None
        else:
            raise PayloadError(field, f"expected a unit object, got {type(raw).__name__}")
        units.append(validate_unit(unit, field))
    return units


def parse_alwayson_units(alwayson_scripts: Any) -> list[ControlUnit]:
    """Units from `alwayson_scripts: {"ControlNet": {"args": [unit, ...]}}` (the script key is matched without
    regard to case, as the WebUI does)."""
    if alwayson_scripts is None:
        return []
    if not isinstance(alwayson_scripts, Mapping):
        raise PayloadError("alwayson_scripts", f"expected an object, got {type(alwayson_scripts).__name__}")
    for key, value in alwayson_scripts.items():
        if key.lower() != SCRIPT_TITLE.lower():
            continue
        where = f"alwayson_scripts.{key}"
        if not isinstance(value, Mapping) or "args" not in value:
            raise PayloadError(where, 'expected {"args": [unit, ...]}')
        return parse_units(value["args"], f"{where}.args")
    return []


# ---------------------------------------------------------------- /controlnet/* routes


@dataclasses.dataclass
class DetectRequest:
    """`POST /controlnet/detect`'s body. Read by `from_json` rather than by pydantic so that a field of the wrong
    type is answered like every other bad field (422, the one error body, the field named)."""

    controlnet_module: str = "none"
    controlnet_input_images: List[str] = dataclasses.field(default_factory=list)
    controlnet_processor_res: int = -1
    controlnet_threshold_a: float = -1
    controlnet_threshold_b: float = -1
    controlnet_masks: List[str] = dataclasses.field(default_factory=list)
    low_vram: bool = False

    @classmethod
    def from_json(cls, payload: Any) -> "DetectRequest":
        import math

        if not isinstance(payload, Mapping):
            raise PayloadError("body", f"expected a JSON object, got {_json_type(payload)}")
        request = cls()
        for name in ("controlnet_module",):
            if name in payload:
                if not isinstance(payload[name], str):
                    raise PayloadError(name, f"expected a string, got {_json_type(payload[name])}")
                setattr(request, name, payload[name])
        for name in ("controlnet_input_images", "controlnet_masks"):
            if payload.get(name) is not None:
                if not isinstance(payload[name], list):
                    raise PayloadError(name, f"expected a list of base64 images, got {_json_type(payload[name])}")
                setattr(request, name, list(payload[name]))
        for name in ("controlnet_processor_res", "controlnet_threshold_a", "controlnet_threshold_b"):
            if payload.get(name) is not None:
                value = payload[name]
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise PayloadError(name, f"expected a number, got {_json_type(value)}")
                setattr(request, name, value)
        if "low_vram" in payload:
            request.low_vram = bool(payload["low_vram"])
        return request


def _detect(request: DetectRequest) -> dict:
    from lib_controlnet import preprocess

    module = request.controlnet_module
    try:
        catalog.get_preprocessor(module)
    except UserError as error:
        raise PayloadError("controlnet_module", str(error)) from None
    if not request.controlnet_input_images:
        raise PayloadError("controlnet_input_images", "no image given")
    res = request.controlnet_processor_res
    problem = preprocess.resolution_error(res)
    if problem:
        raise PayloadError("controlnet_processor_res", problem)
    res = int(res)
    decoded = [decode_image(image, f"controlnet_input_images[{i}]")
               for i, image in enumerate(request.controlnet_input_images)]
    masks = [decode_image(mask, f"controlnet_masks[{i}]") for i, mask in enumerate(request.controlnet_masks)]
    if masks and len(masks) != len(decoded):
        raise PayloadError("controlnet_masks", f"give one mask per input image ({len(decoded)}), got {len(masks)}")
    threshold_a = None if request.controlnet_threshold_a == -1 else request.controlnet_threshold_a
    threshold_b = None if request.controlnet_threshold_b == -1 else request.controlnet_threshold_b
    resolution = None if res == -1 else res  # None: the module's default
    is_pose = preprocess.detects_poses(module)
    maps, poses = [], []
    for i, image in enumerate(decoded):
        try:
            if is_pose:  # the WebUI API also returns the keypoints (OpenPose JSON) for these
                detected, keypoints = preprocess.run_pose(module, image, resolution=resolution)
                poses.append(keypoints)
            else:
                detected = preprocess.run(module, image, resolution=resolution, threshold_a=threshold_a,
                                          threshold_b=threshold_b, mask=masks[i] if masks else None)
        except UserError as error:
            raise PayloadError(f"controlnet_input_images[{i}]", str(error)) from None
        maps.append(encode_png_base64(detected))
    answer = {"images": maps, "info": "Success"}
    if poses:
        answer["poses"] = poses
    return answer


def register_routes(app: FastAPI) -> None:
    """Add the `/controlnet/*` routes to a FastAPI app (the WebUI's or the standalone server's)."""
    if any(getattr(route, "path", None) == "/controlnet/version" for route in app.routes):
        return  # the WebUI runs app_started callbacks again after "Reload UI", on the same app

    @app.get("/controlnet/version")
    def version():
        return {"version": API_VERSION}

    @app.get("/controlnet/model_list")
    def model_list(update: bool = True):
        try:
            return {"model_list": catalog.model_names(update=update)}
        except UserError as error:
            raise _unprocessable(error) from None

    @app.get("/controlnet/module_list")
    def module_list(alias_names: bool = False):
        return {"module_list": catalog.module_names(alias_names),
                "module_detail": catalog.module_detail(alias_names)}

    @app.get("/controlnet/control_types")
    def control_types():
        return {"control_types": catalog.control_types()}

    @app.get("/controlnet/settings")
    def settings():
        return {"control_net_unit_count": get_settings().unit_count}

    @app.post("/controlnet/detect")
    async def detect(request: Request):
        from starlette.concurrency import run_in_threadpool

        try:
            payload = json.loads(await request.body() or b"{}")
        except ValueError:
            raise HTTPException(status_code=422, detail="body: is not JSON") from None
        try:
            # in a worker thread, so a slow preprocessor never blocks other requests
            return await run_in_threadpool(lambda: _detect(DetectRequest.from_json(payload)))
        except UserError as error:
            raise _unprocessable(error) from None


# ---------------------------------------------------------------- /sdapi/v1/txt2img (standalone server)


class Txt2ImgRequest(BaseModel):
    """The subset of the WebUI's txt2img payload the standalone server uses; other fields are accepted and
    ignored so that WebUI clients can send their usual payloads unchanged."""

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = Field(20, ge=1, le=150)
    width: int = Field(512, ge=64, le=2048)
    height: int = Field(512, ge=64, le=2048)
    seed: int = -1
    cfg_scale: float = Field(7.0, ge=0.0, le=30.0)
    batch_size: int = Field(1, ge=1, le=8)
    alwayson_scripts: Dict[str, Any] = Field(default_factory=dict)
    sampler_name: Optional[str] = None

    class Config:
        extra = "allow"


@dataclasses.dataclass
class GenerationJob:
    """One generation as the standalone host runs it (the panel and the txt2img route both build one)."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    width: int = 512
    height: int = 512
    seed: int = -1
    cfg_scale: float = 7.0
    batch_size: int = 1
    units: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class GenerationOutput:
    images: list  # generated images (PIL or HxWx3 uint8)
    detected_maps: list  # one per unit that ran a preprocessor
    infotexts: list[str]
    seed: int


def job_from_txt2img(request: Txt2ImgRequest) -> GenerationJob:
    for name in ("width", "height"):
        if getattr(request, name) % 8:
            raise PayloadError(name, f"must be a multiple of 8, got {getattr(request, name)}")
    from lib_controlnet.generate import seed_error  # the one seed rule, also the CLI's

    problem = seed_error(request.seed)
    if problem:
        raise PayloadError("seed", problem)
    units = parse_alwayson_units(request.alwayson_scripts)
    return GenerationJob(prompt=request.prompt, negative_prompt=request.negative_prompt, steps=request.steps,
                         width=request.width, height=request.height, seed=request.seed,
                         cfg_scale=request.cfg_scale, batch_size=request.batch_size, units=units)


def register_generation_routes(app: FastAPI, run: Callable[[GenerationJob], GenerationOutput]) -> None:
    """`POST /sdapi/v1/txt2img` for the standalone server; inside the WebUI the WebUI answers that route.
    Also gives the standalone server the WebUI's error body (`install_error_handlers`)."""
    install_error_handlers(app)

    @app.post("/sdapi/v1/txt2img")
    def txt2img(request: Txt2ImgRequest):
        try:
            job = job_from_txt2img(request)
            output = run(job)
        except UserError as error:
            raise _unprocessable(error) from None
        images = [encode_png_base64(image) for image in list(output.images) + list(output.detected_maps)]
        info = {"prompt": job.prompt, "negative_prompt": job.negative_prompt, "seed": output.seed,
                "width": job.width, "height": job.height, "steps": job.steps, "cfg_scale": job.cfg_scale,
                "infotexts": output.infotexts}
        parameters = request.dict()
        return {"images": images, "parameters": parameters, "info": json.dumps(info)}
