"""OpenAI's error shape, ``{"error": {"message", "type", "param", "code"}}``, and the one
translation of the job service's errors into it.

Plain Python (no FastAPI import): main.py's guard answers 401/413 for `/v1` paths with
:func:`error_body` before any route runs.
"""
from __future__ import annotations

from ...errors import BackendUnavailable, QueueFull, ServiceError

INVALID = "invalid_request_error"

# A native request field -> the OpenAI parameter the client sent it as (errors name what the
# client sent; the SDK exposes it as ``exc.param``).
NATIVE_TO_OPENAI = {
    "width": "size", "height": "size", "batch_size": "n", "n_iter": "n", "steps": "quality",
    "init_image": "image", "denoising_strength": "strength", "model": "model", "prompt": "prompt",
    "negative_prompt": "negative_prompt", "seed": "seed", "mask": "mask", "cfg_scale": "cfg_scale",
    "preview": "partial_images", "preview.every": "partial_images", "preview.method": "partial_images",
}


class OpenAIError(Exception):
    """A request this dialect refuses, in OpenAI's terms."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = INVALID, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = INVALID, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def unauthorized_body() -> dict:
    # OpenAI's own answer to a wrong key: 401, invalid_request_error / invalid_api_key.
    return error_body("Incorrect API key provided (Authorization: Bearer <key>)", code="invalid_api_key")


def too_large_body(limit: int) -> dict:
    return error_body(f"request body larger than {limit} bytes", code="request_too_large")


def param_of(field: str | None) -> str | None:
    if not field:
        return None
    head = field.split("[")[0]
    return NATIVE_TO_OPENAI.get(field) or NATIVE_TO_OPENAI.get(head) or NATIVE_TO_OPENAI.get(head.split(".")[0]) \
        or field


def from_service_error(e: ServiceError) -> OpenAIError:
    """The job service's refusal as OpenAI would answer it. A full queue is a 429 (what OpenAI
    clients back off on, honouring Retry-After); a store or broker that is down is a 503."""
    if isinstance(e, QueueFull) or e.status == 429:  # a full queue, or a key's quota spent
        return OpenAIError(429, e.message, type="requests", code="rate_limit_exceeded", headers=e.headers)
    if isinstance(e, BackendUnavailable):
        return OpenAIError(503, e.message, type="server_error", code="service_unavailable", headers=e.headers)
    status = e.status
    if status == 422:  # the native dialect's "invalid field" is OpenAI's 400
        status = 400
    param = param_of(e.field)
    message = f"{param}: {e.message}" if param and e.field else e.message
    if status >= 500:
        return OpenAIError(status, message, type="server_error", headers=e.headers)
    code = "request_too_large" if status == 413 else ("model_not_found" if param == "model" else None)
    return OpenAIError(status, message, param=param, code=code, headers=e.headers)


def service_error_body(e: ServiceError) -> dict:
    """main.py's guard refuses some requests before any route runs (a key's request quota)."""
    return from_service_error(e).body()
