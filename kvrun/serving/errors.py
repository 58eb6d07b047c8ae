"""API errors, and the two shapes they take on the wire.

`/v1/*` answers in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, so the official clients raise
their usual exception classes; `/generate*` answers in TGI's `{"error", "error_type"}`, which LoRAX and TGI clients
parse. One exception type carries everything both shapes need.
"""

from __future__ import annotations

import logging
import re

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR

logger = logging.getLogger(__name__)

_FIELD_IN_MESSAGE = re.compile(r"field `([^`]+)`")


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        tgi_type: str = "validation",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.tgi_type = tgi_type
        self.headers = headers or {}

    def openai_body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def tgi_body(self) -> dict:
        return {"error": self.message, "error_type": self.tgi_type}


def invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_parameter")


def unknown_model(model: str, why: str | None = None) -> ApiError:
    message = f"The model `{model}` does not exist." + (f" {why}" if why else "")
    return ApiError(404, message, type="not_found_error", param="model", code="model_not_found", tgi_type="not_found")


def incompatible_adapter(message: str) -> ApiError:
    return ApiError(422, message, param="model", code="adapter_incompatible", tgi_type="adapter_incompatible")


def overloaded(message: str, retry_after_s: int = 1, status: int = 503) -> ApiError:
    return ApiError(
        status, message, type="server_overloaded", code="overloaded", tgi_type="overloaded",
        headers={"Retry-After": str(retry_after_s)},
    )  # fmt: skip


def unauthorized(message: str = "Missing or invalid API key (send `Authorization: Bearer <key>`).") -> ApiError:
    return ApiError(
        401, message, type="authentication_error", code="invalid_api_key", tgi_type="authentication",
        headers={"WWW-Authenticate": "Bearer"},
    )  # fmt: skip


def generation_failed(reason: str | None) -> ApiError:
    """A request the engine ended with finish_reason "error" (only that request: its batch went on)."""
    message = f"Generation failed: {reason or 'the engine ended this request with an error'}"
    return ApiError(500, message, type="server_error", code="generation_error", tgi_type="generation")


def unavailable(message: str) -> ApiError:
    return ApiError(503, message, type="server_error", code="unavailable", tgi_type="unavailable")


def is_tgi_path(path: str) -> bool:
    return path == "/" or path.startswith("/generate")


def render(request: Request, error: ApiError) -> Response:
    body = error.tgi_body() if is_tgi_path(request.url.path) else error.openai_body()
    return Response(body, status_code=error.status, headers=error.headers)


def from_validation(error: ValidationException) -> ApiError:
    """Litestar's msgspec decode failure → 400 naming the field, e.g. `max_tokens: Expected int >= 1`."""
    problems = error.extra if isinstance(error.extra, list) else []
    if not problems:
        return invalid(str(error.detail))
    first = problems[0]
    message, key = str(first.get("message", error.detail)), str(first.get("key", ""))
    match = _FIELD_IN_MESSAGE.search(message)  # unknown or missing fields are named in msgspec's message
    if key in ("", "data"):
        key = match.group(1) if match else ""
    elif match:
        key = f"{key}.{match.group(1)}"
    return invalid(f"{key}: {message}" if key else message, param=key or None)


def handle_api_error(request: Request, error: ApiError) -> Response:
    if error.code in ("model_not_found", "adapter_incompatible"):
        # An operator should see why an adapter was refused without asking the client.
        logger.warning("refused %s %s: %s", request.method, request.url.path, error.message)
    return render(request, error)


def handle_validation(request: Request, error: ValidationException) -> Response:
    return render(request, from_validation(error))


def handle_http(request: Request, error: HTTPException) -> Response:
    kinds = {401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error"}
    api_error = ApiError(
        error.status_code, str(error.detail), type=kinds.get(error.status_code, "invalid_request_error"),
        tgi_type="validation" if error.status_code < 500 else "internal",
    )  # fmt: skip
    if error.status_code == 400:
        api_error.message = f"Invalid request body: {error.detail}"  # e.g. malformed JSON
    return render(request, api_error)


def handle_unexpected(request: Request, error: Exception) -> Response:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return render(
        request,
        ApiError(HTTP_500_INTERNAL_SERVER_ERROR, f"internal error: {type(error).__name__}", type="server_error",
                 tgi_type="internal"),
    )  # fmt: skip


EXCEPTION_HANDLERS = {
    ApiError: handle_api_error,
    ValidationException: handle_validation,
    HTTPException: handle_http,
    Exception: handle_unexpected,
}
