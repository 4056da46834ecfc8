"""422 for bad ControlNet units sent to the WebUI's own /sdapi/v1/txt2img and img2img.

The WebUI runs an always-on script's `process` inside its job and only logs what it raises, so a bad unit would
otherwise come back as HTTP 200 with an image made without ControlNet. This ASGI middleware reads the request
body first, checks `alwayson_scripts.ControlNet.args` with the same parser as the standalone server, and
answers 422 naming the field; a good body is replayed to the WebUI untouched. A unit whose ControlNet was made
for another base than the loaded checkpoint is a bad field too (unless the request switches checkpoints).
"""
from __future__ import annotations

import json

from lib_controlnet import api
from lib_controlnet.webui import base_fit

CHECKED_PATHS = frozenset({"/sdapi/v1/txt2img", "/sdapi/v1/img2img"})


def payload_error(body: bytes) -> str | None:
    """The message for a bad ControlNet part of a generation request, or None (also for JSON the WebUI's own
    validation will answer)."""
    try:
        payload = json.loads(body or b"null")
    except ValueError:
        return None
    if not isinstance(payload, dict):
        return None
    try:
        units = api.parse_alwayson_units(payload.get("alwayson_scripts"))
    except api.PayloadError as error:
        return str(error)
    overrides = payload.get("override_settings")
    if isinstance(overrides, dict) and overrides.get("sd_model_checkpoint"):
        return None  # another checkpoint will be loaded for this job: the unit is judged against that one
    family = base_fit.loaded_family() if any(u.is_active and u.uses_model for u in units) else None
    key = next((k for k in payload["alwayson_scripts"] if k.lower() == api.SCRIPT_TITLE.lower()), "") if units else ""
    for i, unit in enumerate(units):
        sentence = base_fit.mismatch(unit.model, family) if unit.is_active and unit.uses_model else None
        if sentence:
            return str(api.PayloadError(f"alwayson_scripts.{key}.args[{i}].model", sentence))
    return None


class AlwaysOnPayloadCheck:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in CHECKED_PATHS:
            await self.app(scope, receive, send)
            return
        messages, body = [], b""
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        error = payload_error(body)
        if error is not None:
            from starlette.responses import JSONResponse

            # the WebUI's own error body, as its routes and ours answer (api.error_body)
            await JSONResponse(api.error_body(422, error), status_code=422)(scope, receive, send)
            return

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


def install(app) -> None:
    """Add the check to the WebUI's FastAPI app once (app_started runs again after "Reload UI")."""
    if any(getattr(m, "cls", None) is AlwaysOnPayloadCheck for m in app.user_middleware):
        return
    # Starlette refuses new middleware once its stack is built; the WebUI resets it the same way when it adds its own.
    app.middleware_stack = None
    app.add_middleware(AlwaysOnPayloadCheck)
