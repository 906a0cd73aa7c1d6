"""The OpenAPI document, completed with what the routes alone do not say: the status codes the
middleware and handlers add to every operation (400, 401, 413, 422, 503), the API-key security
schemes when a key is configured, and OpenAPI links from each submit operation to the
operations that take its `job_id` (status, cancel, events, ...), so generic tools can follow a job.

The rules are applied to the generated document, not route by route, so new routes get them too.
"""
from __future__ import annotations

import re
from typing import Any, Callable

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
VALIDATION_REF = {"$ref": "#/components/schemas/ValidationErrorResponse"}
JOB_PATH = re.compile(r"^/queue/\{job_id\}(/[A-Za-z0-9_-]+)?$")

ERROR_SCHEMA = {
    "title": "ErrorResponse", "type": "object", "required": ["status", "error"],
    "properties": {"status": {"type": "string", "enum": ["error"]}, "error": {"type": "string"},
                   "detail": {}},
}
# What the app's validation handler answers (main.py): one `error` text naming the fields, and
# `detail` entries whose `loc` is the path to the field (["body", "hires", "scale"]).
VALIDATION_SCHEMA = {
    "title": "ValidationErrorResponse", "type": "object", "required": ["status", "error"],
    "properties": {
        "status": {"type": "string", "enum": ["error"]},
        "error": {"type": "string", "description": "`<field>: <why; valid choices>`, for each field"},
        "detail": {"type": "array", "items": {
            "type": "object", "required": ["loc", "msg"],
            "properties": {"loc": {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
                           "msg": {"type": "string"}, "type": {"type": "string"}}}},
    },
}
SECURITY_SCHEMES = {
    "APIKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
    "BearerAuth": {"type": "http", "scheme": "bearer"},
}


def _error(description: str, schema: dict = ERROR_REF, headers: dict | None = None) -> dict:
    out: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": schema}}}
    if headers:
        out["headers"] = headers
    return out


def _resolve(doc: dict, schema: dict) -> dict:
    while "$ref" in schema:
        node: Any = doc
        for part in schema["$ref"].lstrip("#/").split("/"):
            node = node[part]
        schema = node
    return schema


def _returns_job_id(doc: dict, op: dict) -> bool:
    content = op.get("responses", {}).get("200", {}).get("content", {})
    schema = content.get("application/json", {}).get("schema")
    return bool(schema) and "job_id" in _resolve(doc, schema).get("properties", {})


def _link_name(method: str, path: str) -> str:
    words = re.findall(r"[A-Za-z0-9]+", path.replace("job_id", "job"))
    return method.capitalize() + "".join(w.capitalize() for w in words)


def _request_schemas(doc: dict) -> set[str]:
    """Names of the component schemas that native request bodies use (A1111's /sdapi bodies
    follow A1111's own rules and keep theirs)."""
    schemas = doc.get("components", {}).get("schemas", {})

    def walk(node: Any, found: set[str]) -> None:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            name = ref.rsplit("/", 1)[-1]
            if ref.startswith("#/components/schemas/") and name not in found and name in schemas:
                found.add(name)
                walk(schemas[name], found)
            for value in node.values():
                walk(value, found)
        elif isinstance(node, list):
            for value in node:
                walk(value, found)

    native: set[str] = set()
    foreign: set[str] = set()
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method in METHODS and "requestBody" in op:
                walk(op["requestBody"], foreign if path.startswith("/sdapi/") else native)
    return native - foreign


def _constrain(schema: dict, kind: str, extra: dict) -> None:
    branches = [b for b in schema.get("anyOf", []) if b.get("type") == kind] or [schema]
    for branch in branches:
        branch.update(extra)


def request_limits(settings) -> dict[str, tuple[str, dict]]:
    """The configured limits that hold for every request, whatever else it asks for, as JSON
    schema keywords (from config.FIELD_LIMITS, the table resolve checks): a client (and the
    fuzzer) sees them; a value past one is a 422."""
    from .config import FIELD_LIMITS
    from .engine.samplers import SAMPLER_NAMES, SCHEDULER_TYPES
    from .jobs.resolve import round8

    def side(limit: int) -> int:  # the largest value that still rounds to <= limit
        return max(v for v in range(limit, limit + 8) if round8(v) <= limit)

    kinds = {"maxLength": "string", "maxItems": "array", "maximum": "integer"}
    out: dict[str, tuple[str, dict]] = {}
    for limit in FIELD_LIMITS:
        if "." in limit.field:  # nested (hires.*): those hold only when their block is enabled
            continue
        value = limit.value(settings)
        if limit.field in ("width", "height"):
            value = side(value)
        out[limit.field] = (kinds[limit.keyword], {limit.keyword: value})
    out["sampler_name"] = ("string", {"enum": list(SAMPLER_NAMES)})
    out["scheduler_type"] = ("string", {"enum": list(SCHEDULER_TYPES)})
    return out


def complete(doc: dict, *, api_key_required: bool, is_public: Callable[[str], bool],
             limits: dict[str, tuple[str, dict]] | None = None) -> dict:
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for name in _request_schemas(doc) if limits else ():
        properties = schemas[name].get("properties", {})
        for field, (kind, extra) in limits.items():
            if field in properties and name != "HiresConfig":  # hires limits apply only when enabled
                _constrain(properties[field], kind, extra)
    schemas.setdefault("ErrorResponse", ERROR_SCHEMA)
    schemas["ValidationErrorResponse"] = VALIDATION_SCHEMA
    job_ops = [(path, method, op) for path, item in doc["paths"].items() if JOB_PATH.match(path)
               for method, op in item.items() if method in METHODS]
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method not in METHODS:
                continue
            responses = op.setdefault("responses", {})
            if "requestBody" in op:
                responses.setdefault("400", _error("The body cannot be read: not JSON, or a bad Content-Length."))
                responses.setdefault("413", _error("The body is larger than DIFFUSIONAPI_MAX_BODY_BYTES."))
            if "requestBody" in op or op.get("parameters") or "422" in responses:
                responses["422"] = _error("A field is invalid: `error` names it (and, for names, the valid "
                                          "choices); `detail[].loc` is the path to it. Nothing was queued.",
                                          VALIDATION_REF)
            if api_key_required and not is_public(path):
                responses["401"] = _error("Missing or wrong API key (`X-API-Key` or `Authorization: Bearer`).",
                                          headers={"WWW-Authenticate": {"schema": {"type": "string"}}})
                op["security"] = [{"APIKeyHeader": []}, {"BearerAuth": []}]
                responses["429"] = _error("A limit of the API key is reached (docs/tenants.md): `limit` names it; "
                                          "nothing was queued.",
                                          headers={"Retry-After": {"schema": {"type": "integer"},
                                                                   "description": "seconds"}})
            if method == "post" and _returns_job_id(doc, op):
                responses["503"] = _error("The queue is full, or the job cannot be recorded durably; retry later.",
                                          headers={"Retry-After": {"schema": {"type": "integer"},
                                                                   "description": "seconds"}})
                responses["200"]["links"] = {
                    _link_name(m, p): {"operationId": target["operationId"],
                                       "parameters": {"job_id": "$response.body#/job_id"},
                                       "description": f"`{m.upper()} {p}` with the job id this answer returns"}
                    for p, m, target in job_ops if "operationId" in target}
            for code, response in responses.items():
                # FastAPI's default 422 schema is not what the app answers; use ours everywhere.
                if code == "422":
                    response.setdefault("content", {})["application/json"] = {"schema": VALIDATION_REF}
    if api_key_required:
        doc["components"]["securitySchemes"] = SECURITY_SCHEMES
    # FastAPI's validation schemas are now unreferenced.
    text = repr(doc["paths"])
    for name in ("HTTPValidationError", "ValidationError"):
        if f"#/components/schemas/{name}'" not in text and name in schemas:
            del schemas[name]
    return doc


def install(app: FastAPI, settings, *, is_public: Callable[[str], bool]) -> None:
    """Replaces app.openapi with the completed document (built once, on first request:
    settings are read once at start-up)."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, description=app.description,
                              routes=app.routes)
            app.openapi_schema = complete(doc, api_key_required=bool(settings.api_key or settings.api_keys_file),
                                          is_public=is_public, limits=request_limits(settings))
        return app.openapi_schema

    app.openapi = openapi


def allowed_methods(app: FastAPI, scope: dict) -> str:
    """The `Allow` header of a 405: every method some route takes at this path. (Starlette's own
    names only the first matching route's, so `/queue/{job_id}` would lose DELETE.)"""
    from starlette.routing import Match

    allowed = [m for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
               if any(route.matches({**scope, "method": m})[0] == Match.FULL for route in app.router.routes)]
    return ", ".join(allowed)
