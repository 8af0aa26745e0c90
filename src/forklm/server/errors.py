"""Errors as OpenAI sends them: `{"error": {"message", "type", "param", "code"}}` with a 4xx status.

Every ForklmError raised while handling a request maps to a 4xx here (`from_forklm`); FastAPI's
own errors (malformed JSON, wrong types, unknown routes) get the same body through the handlers
installed by `install_handlers`. A 500 is left only for bugs, and still carries the same body.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import CapacityError, ContextLengthError, ForklmError, InvalidParameterError, TokenizerError

log = logging.getLogger(__name__)

#: Seconds a client told "queue full" (429) should wait before retrying.
RETRY_AFTER_S = 1


class APIError(Exception):
    """An HTTP error with OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        # a message may quote the client's own text: lone surrogates cannot go out as UTF-8 JSON
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    def sse(self) -> str:
        """The error as one server-sent event (a stream that already answered 200 fails this way)."""
        return f"data: {json.dumps(self.body())}\n\n"


class QueueFullError(ForklmError):
    """More requests wait for the engine than the server's --max-queue allows."""


def queue_full(message: str) -> APIError:
    return APIError(429, message, type="rate_limit_error", code="queue_full",
                    headers={"Retry-After": str(RETRY_AFTER_S)})


def from_forklm(error: ForklmError, rename: dict[str, str] | None = None) -> APIError:
    """The 4xx for an error forklm raised; `rename` maps SamplingParams field names to request names."""
    rename = rename or {}
    if isinstance(error, QueueFullError):
        return queue_full(str(error))
    if isinstance(error, ContextLengthError):
        return APIError(400, str(error), param=rename.get(error.field, error.field), code="context_length_exceeded")
    if isinstance(error, InvalidParameterError):
        return APIError(400, str(error), param=rename.get(error.field, error.field), code="invalid_value")
    if isinstance(error, CapacityError):
        return APIError(400, str(error), param="n", code="capacity_exceeded")
    if isinstance(error, TokenizerError):
        return APIError(400, str(error), code="unsupported")
    return APIError(400, str(error), code="invalid_request")


def _validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    """A one-line message and the offending top-level field of a pydantic / JSON error."""
    errors = error.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"malformed JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}", "body"
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    # union members appear in loc as type names ('str', 'list[int]'); keep the field path only
    path = [x for x in loc if not (x.startswith(("list[", "dict[")) or x in ("str", "int", "float", "bool"))]
    param = path[0] if path else None
    where = ".".join(path) or "body"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first.get('msg', 'invalid value')}{more}", param


def install_handlers(app: FastAPI) -> None:
    """OpenAI-style bodies for every error FastAPI or forklm can raise."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(ForklmError)
    async def _forklm_error(request: Request, exc: ForklmError):
        return from_forklm(exc).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        code = "invalid_json" if message.startswith("malformed JSON") else "invalid_type"
        return APIError(400, message, param=None if code == "invalid_json" else param, code=code).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, str(exc.detail), code=code, headers=dict(exc.headers or {})).response()

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return APIError(500, f"internal error: {type(exc).__name__}", type="server_error").response()
