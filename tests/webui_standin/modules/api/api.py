"""The error handling of WebUI 1.10.1's `modules/api/api.py` (`api_middleware`), which every route of the
WebUI's FastAPI app answers through, the extension's routes included.

What it does there (looked up in its source): an HTTPException, or any other exception a route raises, is
answered as JSON {"error": <exception class name>, "detail": <its detail, or "">, "body": <its body, or "">,
"errors": str(exception)}, with the exception's status code (500 when it has none). FastAPI's own request
validation errors keep FastAPI's default answer. Our own small implementation of that behaviour.
"""
from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException


def _answer(error: Exception) -> JSONResponse:
    fields = vars(error)
    content = {"error": type(error).__name__, "detail": fields.get("detail", ""), "body": fields.get("body", ""),
               "errors": str(error)}
    return JSONResponse(status_code=fields.get("status_code", 500), content=jsonable_encoder(content))


def api_middleware(app: FastAPI) -> None:
    @app.middleware("http")
    async def exception_handling(request: Request, call_next):
        try:
            return await call_next(request)
        except Exception as error:  # what escapes the routes, as the WebUI catches it
            return _answer(error)

    @app.exception_handler(Exception)
    async def any_exception(request: Request, error: Exception):
        return _answer(error)

    @app.exception_handler(HTTPException)
    async def http_exception(request: Request, error: HTTPException):
        return _answer(error)
