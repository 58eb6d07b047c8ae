"""GET /openapi.json and GET /docs (Swagger UI), both working offline.

Litestar derives the paths from the controllers; the generating routes decode their bodies themselves (decoding.py)
and answer JSON or SSE, so their request and response bodies, and the error bodies every route really answers, are
written into the document here from the msgspec structs. Swagger UI's files come from the `swagger-ui-py` package
(Swagger UI 5, which reads OpenAPI 3.1), served by kvrun at /docs/static: no CDN, so the page works on a machine
without internet.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import msgspec
from litestar import Request, get
from litestar.exceptions import NotFoundException
from litestar.openapi.plugins import JsonRenderPlugin
from litestar.response import File, Response

from kvrun.serving import responses, schemas

SWAGGER_ASSETS = {  # file → media type (a browser applies a stylesheet only when it is served as text/css)
    "swagger-ui.css": "text/css",
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui-standalone-preset.js": "text/javascript",
    "favicon-32x32.png": "image/png",
}
_REF = "#/components/schemas/{name}"


class OpenAIError(msgspec.Struct):
    message: str
    type: str  # invalid_request_error | authentication_error | not_found_error | server_overloaded | server_error
    param: str | None  # the request field at fault, e.g. `max_tokens` or `messages[0].role`
    code: str | None  # invalid_parameter | invalid_api_key | model_not_found | adapter_incompatible | ...


class OpenAIErrorBody(msgspec.Struct):
    """The error body of /v1/* (and of /tokenize, /detokenize): OpenAI's shape."""

    error: OpenAIError


class TgiErrorBody(msgspec.Struct):
    """The error body of /, /generate and /generate_stream: TGI's shape."""

    error: str
    error_type: str  # validation | authentication | not_found | adapter_incompatible | overloaded | generation


_ERRORS = {
    400: "Invalid request: the message names the problem, `param` the field",
    401: "Missing or wrong API key",
    404: "Unknown model, adapter, version or tag",
    422: "The adapter does not fit this base model",
    429: "Queue full (TGI routes); retry after `Retry-After` seconds",
    500: "The engine ended this request with an error (only this request)",
    503: "Queue full or waited too long (OpenAI routes), or the registry is unreachable; see `Retry-After`",
}
_SSE = "Server-sent events when `stream` is true: `data: <chunk JSON>` per event; OpenAI routes end with `data: [DONE]`"

# path → (request body, 200 body, its stream chunk or None, error shape)
_BODIES: dict[str, tuple[type | None, type, type | None, type]] = {
    "/v1/completions": (schemas.CompletionRequest, responses.Completion, responses.Completion, OpenAIErrorBody),
    "/v1/chat/completions": (schemas.ChatCompletionRequest, responses.ChatCompletion, responses.ChatCompletionChunk,
                             OpenAIErrorBody),  # fmt: skip
    "/": (schemas.GenerateRequest, list[responses.GenerateResponse], responses.StreamResponse, TgiErrorBody),
    "/generate": (schemas.GenerateRequest, responses.GenerateResponse, responses.StreamResponse, TgiErrorBody),
    "/generate_stream": (schemas.GenerateRequest, responses.StreamResponse, responses.StreamResponse, TgiErrorBody),
    "/tokenize": (schemas.TokenizeRequest, responses.TokenizeResponse, None, OpenAIErrorBody),
    "/detokenize": (schemas.DetokenizeRequest, responses.DetokenizeResponse, None, OpenAIErrorBody),
    "/v1/load_lora_adapter": (schemas.LoadLoraAdapterRequest, str, None, OpenAIErrorBody),
    "/v1/unload_lora_adapter": (schemas.UnloadLoraAdapterRequest, str, None, OpenAIErrorBody),
}


def _schemas(types: list) -> tuple[list[dict], dict[str, dict]]:
    return msgspec.json.schema_components(types, ref_template=_REF)


def complete(document: dict[str, Any]) -> dict[str, Any]:
    """Litestar's document with every route's request, response and error bodies as kvrun sends them."""
    types: list = []
    for request_type, body, chunk, error in _BODIES.values():
        types += [request_type, body, chunk or body, error]
    types += [OpenAIErrorBody, TgiErrorBody]
    refs, components = _schemas(types)
    ref_of = dict(zip(map(id, types), refs))
    paths = document.setdefault("paths", {})
    for path, operations in paths.items():
        for method, operation in operations.items():
            if not isinstance(operation, dict) or method not in ("get", "post"):
                continue
            spec = _BODIES.get(path)
            error_ref = ref_of[id(spec[3] if spec else (TgiErrorBody if path == "/" else OpenAIErrorBody))]
            responses_ = operation.setdefault("responses", {})
            statuses = _ERRORS if spec is not None else (401, 404, 503) if path.startswith("/v1/") else ()
            for status in statuses:
                responses_[str(status)] = {"description": _ERRORS[status],
                                           "content": {"application/json": {"schema": error_ref}}}  # fmt: skip
            if spec is None or method != "post":
                continue
            request_type, body, chunk, _ = spec
            operation["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": ref_of[id(request_type)]}}}  # fmt: skip
            content = {"application/json": {"schema": ref_of[id(body)]}}
            if chunk is not None:
                content["text/event-stream"] = {"schema": ref_of[id(chunk)], "description": _SSE}
            if path == "/generate_stream":
                content = {"text/event-stream": content["text/event-stream"]}
            if body is str:
                content = {"text/plain": {"schema": {"type": "string"}}}
            responses_["200"] = {"description": "Success", "content": content}
    document.setdefault("components", {}).setdefault("schemas", {}).update(components)
    return document


def document_bytes(request: Request) -> bytes:
    """The completed document, encoded once per app."""
    state = request.app.state
    if state.get("openapi_document") is None:
        state.openapi_document = msgspec.json.encode(complete(request.app.openapi_schema.to_schema()))
    return state.openapi_document


class OpenAPIJson(JsonRenderPlugin):
    """/schema/openapi.json (Litestar's place for it): the same completed document as /openapi.json."""

    def render(self, request: Request, openapi_schema: dict[str, Any]) -> bytes:
        return document_bytes(request)


@get("/openapi.json", include_in_schema=False, media_type="application/vnd.oai.openapi+json")
async def openapi_json(request: Request) -> Response[bytes]:
    return Response(document_bytes(request), media_type="application/vnd.oai.openapi+json")


@get("/docs", include_in_schema=False, media_type="text/html")
async def swagger_page(request: Request) -> Response[str]:
    return Response(_SWAGGER_PAGE, media_type="text/html")


_SWAGGER_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>kvrun API</title>
<link rel="icon" type="image/png" href="/docs/static/favicon-32x32.png">
<link rel="stylesheet" href="/docs/static/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="/docs/static/swagger-ui-bundle.js"></script>
<script>window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true});</script>
</body></html>"""


@lru_cache(maxsize=1)
def swagger_dir() -> Path:
    return Path(str(resources.files("swagger_ui") / "static"))


@get("/docs/static/{name:str}", include_in_schema=False)
async def swagger_asset(name: str) -> File:
    if name not in SWAGGER_ASSETS:
        raise NotFoundException(f"no such file: {name}")
    return File(swagger_dir() / name, media_type=SWAGGER_ASSETS[name], headers={"Cache-Control": "max-age=3600"})
