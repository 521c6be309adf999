"""Errors in OpenAI's format: ``{"error": {"message", "type", "param", "code"}}`` with the right HTTP status.

Taught in notebook 15 (serving and its metrics).  Clients written for OpenAI's API
(the ``openai`` package, LangChain, curl scripts) read the message from there;
every message says what to change.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse


class OpenAIError(Exception):
    """An HTTP error answered in OpenAI's format (status 400 unless told)."""

    def __init__(self, message: str, *, status: int = 400, type: str = "invalid_request_error",  # noqa: A002
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,  # noqa: A002
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def validation_error(err: RequestValidationError) -> OpenAIError:
    """FastAPI's 422 (malformed JSON, a wrong type) as a 400 that names the field."""
    first = err.errors()[0] if err.errors() else {}
    if first.get("type") == "json_invalid":
        return OpenAIError(f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')}): "
                           'send a JSON object such as {"prompt": "ROMEO:", "max_tokens": 16}.', code="invalid_json")
    where = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(where) or None
    if first.get("type") == "missing":
        return OpenAIError(f"the field {param!r} is required: add it to the request body.", param=param)
    if first.get("type") in ("model_type", "dict_type", "model_attributes_type") and not where:
        return OpenAIError("the request body must be a JSON object with Content-Type: application/json.")
    got = first.get("input")
    shown = repr(got) if len(repr(got)) < 80 else repr(got)[:77] + "..."
    return OpenAIError(f"{param or 'the request body'}: {first.get('msg', 'invalid value')} (got {shown}): "
                       "fix this field's value or type.", param=param)


def install_error_handlers(app: FastAPI) -> None:
    """Answer OpenAIError and FastAPI's validation errors in OpenAI's format."""

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, err: OpenAIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        return validation_error(err).response()
