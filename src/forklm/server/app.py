"""The FastAPI application: routes, API key, body size limit, request counting.

`build_app(ctx)` wires an already running `EngineRunner` (inside `ctx`) to the routes:
POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics, and
POST /v1/load_weights (new weights from a safetensors file on the server's disk; API key when set).
"""

from __future__ import annotations

import asyncio
import hmac
import time
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from .errors import APIError, install_handlers
from .handlers import ServerContext, create_chat_completion, create_completion, load_weights
from .protocol import ChatCompletionRequest, CompletionRequest, LoadWeightsRequest

#: Largest request body accepted (413 beyond it), unless build_app is told otherwise.
MAX_BODY_BYTES = 32 * 2**20
#: Seconds a client may take to send its whole body (408 beyond it), unless build_app is told otherwise.
BODY_TIMEOUT_S = 30.0



class _Guard:
    """Pure ASGI middleware: 413 for an oversized body, 408 for a body that does not arrive within
    body_timeout_s (a client that sends headers and stalls holds nothing past it), and a count of
    responses by path and status.

    (Pure ASGI rather than BaseHTTPMiddleware, which would get between a stream and the
    disconnect it must notice.)
    """

    def __init__(self, app, metrics, max_body_bytes: int, known_paths: set[str], body_timeout_s: float = BODY_TIMEOUT_S):
        self.app, self.metrics, self.max_body_bytes, self.known_paths = app, metrics, max_body_bytes, known_paths
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in self.known_paths else "other"
        status = {"code": 0}

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        headers = dict(scope["headers"])
        try:
            length = int(headers[b"content-length"]) if b"content-length" in headers else None
        except ValueError:
            length = -1
        try:
            if length is not None and length < 0:
                error = APIError(400, "invalid Content-Length header", code="invalid_request")
                return await error.response()(scope, receive, counting_send)
            if length is not None and length > self.max_body_bytes:
                return await self._too_large(scope, receive, counting_send)
            # the whole body is read here, against the size limit and the clock, then handed on
            try:
                body = await asyncio.wait_for(self._read_body(receive), self.body_timeout_s)
            except asyncio.TimeoutError:
                error = APIError(408, f"the request body did not arrive within {self.body_timeout_s:g} s",
                                 code="request_timeout")
                return await error.response()(scope, receive, counting_send)
            if body is None:
                return None  # the client left before sending its body
            if len(body) > self.max_body_bytes:
                return await self._too_large(scope, receive, counting_send)
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            return await self.app(scope, replay, counting_send)
        finally:
            self.metrics.count_http(path, status["code"])

    async def _read_body(self, receive) -> bytes | None:
        parts, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return None
            parts.append(message.get("body", b""))
            size += len(parts[-1])
            more = message.get("more_body", False)
            if size > self.max_body_bytes:
                break
        return b"".join(parts)

    async def _too_large(self, scope, receive, send):
        error = APIError(413, f"the request body exceeds the limit ({self.max_body_bytes} bytes)",
                         code="request_too_large")
        await error.response()(scope, receive, send)


def build_app(ctx: ServerContext, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
              body_timeout_s: float = BODY_TIMEOUT_S, enable_load_weights: bool = False) -> FastAPI:
    """The OpenAI-compatible app over `ctx.runner` (started here, stopped at shutdown)."""
    runner = ctx.runner

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not runner.alive:
            runner.start()
        yield
        runner.stop()

    app = FastAPI(title="forklm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    install_handlers(app)
    created = int(time.time())

    async def check_api_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    auth = [Depends(check_api_key)]

    def model_card() -> dict:
        return {"id": ctx.model_name, "object": "model", "created": created, "owned_by": "forklm",
                "max_model_len": ctx.context_len}

    @app.get("/health")
    async def health() -> Response:
        if not runner.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        if runner.draining:  # load balancers: stop sending here
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(runner.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=auth)
    async def list_models() -> Response:
        return JSONResponse({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/{model_id:path}", dependencies=auth)
    async def get_model(model_id: str) -> Response:
        ctx.check_model(model_id)
        return JSONResponse(model_card())

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await create_completion(body, request, ctx)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await create_chat_completion(body, request, ctx)

    @app.post("/v1/load_weights", dependencies=auth)
    async def load_weights_route(body: LoadWeightsRequest) -> Response:
        if not enable_load_weights:  # it replaces the served model from the server's disk: opt in
            raise APIError(403, "POST /v1/load_weights is off; start the server with --enable-load-weights "
                                "(and --api-key)", code="load_weights_disabled")
        return await load_weights(body, ctx)

    known = {"/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/load_weights"}
    app.add_middleware(_Guard, metrics=runner.metrics, max_body_bytes=max_body_bytes, known_paths=known,
                       body_timeout_s=body_timeout_s)
    return app

