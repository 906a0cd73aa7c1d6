"""The one error type of the service and the native API's one error body.

Everything below the HTTP layer (resolve, the job service, the backends) raises a
:class:`ServiceError` (or a subclass); each dialect turns it into its own shape exactly once:
the native API with :func:`error_body` / :func:`error_response`, `/sdapi` with A1111's body
(api/sdapi/errors.py), so a new dialect adds one translator, not a new set of exceptions.
"""
from __future__ import annotations


class ServiceError(Exception):
    """A request the service will not carry out: ``status`` is the HTTP status it maps to,
    ``field`` the request field at fault (dotted, ``loras[0].name``) when there is one."""
    status = 400

    def __init__(self, message: str, *, field: str | None = None, status: int | None = None,
                 headers: dict[str, str] | None = None, **extra):
        super().__init__(f"{field}: {message}" if field else message)
        self.message, self.field = message, field
        if status is not None:
            self.status = status
        self.headers = headers or {}
        self.extra = extra  # more keys for the native body (e.g. ``state`` of a 409)


class RequestError(ServiceError):
    """A field is invalid (422 unless said otherwise); nothing was queued."""
    status = 422

    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(message, field=field, status=status)


IDEMPOTENCY_HEADER = "Idempotency-Key"


class IdempotencyConflict(RequestError):
    """The caller's Idempotency-Key already made a job from a different request (the IETF
    Idempotency-Key draft's 422): nothing is queued; the first job stands."""

    def __init__(self, job_id: str):
        super().__init__(IDEMPOTENCY_HEADER, f"this key was used within its window for a different request "
                                             f"(job {job_id}); send that request again, or use a new key")


class NotFound(ServiceError):
    status = 404


class Conflict(ServiceError):
    status = 409


class QueueFull(ServiceError):
    """The queue holds its configured maximum; the client should retry later (503)."""
    status = 503

    def __init__(self, message: str = "the queue is full; retry later", retry_after: int = 10):
        super().__init__(message, headers={"Retry-After": str(retry_after)})


class RateLimited(ServiceError):
    """A key's limit (auth/caller.py's Limits) refuses the request for now (429); the body names
    the limit, ``Retry-After`` says when it would pass. Nothing was queued or counted."""
    status = 429

    def __init__(self, limit: str, allowed: int, retry_after: float, message: str):
        seconds = max(1, int(-(-retry_after // 1)))  # whole seconds, rounded up
        super().__init__(f"{message} (limit {limit} = {allowed}); retry in {seconds} s",
                         headers={"Retry-After": str(seconds)}, limit=limit, retry_after=seconds)


class BackendUnavailable(ServiceError):
    """The job could not be recorded durably (disk full, broker down); nothing was queued (503)."""
    status = 503

    def __init__(self, message: str = "the job store is unavailable; retry later", retry_after: int = 30):
        super().__init__(message, headers={"Retry-After": str(retry_after)})


def error_body(message: str, field: str | None = None, **extra) -> dict:
    """The native API's error body: ``{"status": "error", "error": <message>, "detail": [...]}``.
    ``detail[].loc`` (FastAPI's shape) points at the field, so clients show the error beside it."""
    body: dict = {"status": "error", "error": f"{field}: {message}" if field else message}
    if field:
        where = "header" if field == IDEMPOTENCY_HEADER else "body"
        body["detail"] = [{"loc": [where, *_loc(field)], "msg": message}]
    body.update(extra)
    return body


def error_response(e: ServiceError):
    from fastapi.responses import JSONResponse

    return JSONResponse(error_body(e.message, e.field, **e.extra), status_code=e.status, headers=e.headers or None)


def _loc(field: str) -> list:
    """``loras[0].name`` -> ["loras", 0, "name"]."""
    out: list = []
    for part in field.split("."):
        name, _, rest = part.partition("[")
        if name:
            out.append(name)
        while rest:
            index, _, rest = rest.partition("]")
            out.append(int(index) if index.isdigit() else index)
            rest = rest.lstrip("[")
    return out
