"""The OpenAPI document says every status code an operation answers, the configured limits, the
API key when one is set, and links a submit's job id to the operations that take it."""
from __future__ import annotations

import uuid

import httpx
import pytest

from diffusionapi.main import create_app
from diffusionapi.openapi import METHODS
from diffusionapi.playground import is_public
from diffusionapi.jobs.resolve import round8

from .conftest import SMALL, make_settings


def doc_for(model_store, tmp_path, **overrides) -> dict:
    return create_app(make_settings(model_store, tmp_path, **overrides)).openapi()


def operations(doc):
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method in METHODS:
                yield path, method, op


def test_every_operation_lists_the_codes_the_middleware_and_handlers_add(model_store, tmp_path):
    doc = doc_for(model_store, tmp_path)
    assert "securitySchemes" not in doc["components"]  # no key configured: no 401 anywhere
    seen_body = False
    for path, method, op in operations(doc):
        codes = set(op["responses"])
        assert "401" not in codes and "security" not in op
        if "requestBody" in op:
            seen_body = True
            assert {"400", "413", "422"} <= codes, (method, path)
        for code, response in op["responses"].items():
            if code == "422":
                assert response["content"]["application/json"]["schema"] == {
                    "$ref": "#/components/schemas/ValidationErrorResponse"}
    assert seen_body
    submit = doc["paths"]["/txt2img"]["post"]["responses"]
    assert "503" in submit and "Retry-After" in submit["503"]["headers"]
    assert "HTTPValidationError" not in doc["components"]["schemas"]  # FastAPI's shape is not what we answer


def test_with_an_api_key_every_guarded_operation_lists_401_and_its_security(model_store, tmp_path):
    doc = doc_for(model_store, tmp_path, api_key="k")
    assert set(doc["components"]["securitySchemes"]) == {"APIKeyHeader", "BearerAuth"}
    assert doc["components"]["securitySchemes"]["APIKeyHeader"]["name"] == "X-API-Key"
    for path, method, op in operations(doc):
        if is_public(path):
            assert "401" not in op["responses"] and "security" not in op, path
        else:
            assert "401" in op["responses"] and op["security"] == [{"APIKeyHeader": []}, {"BearerAuth": []}], path
    assert "security" not in doc["paths"]["/hello"]["get"]


def test_submit_links_its_job_id_to_status_cancel_and_the_rest(model_store, tmp_path):
    doc = doc_for(model_store, tmp_path)
    by_id = {op["operationId"]: (method, path) for path, method, op in operations(doc)}
    job_ops = {(m, p) for p, m, _ in operations(doc) if p.startswith("/queue/{job_id}")}
    assert {("get", "/queue/{job_id}"), ("delete", "/queue/{job_id}")} <= job_ops
    submits = [(p, op) for p, m, op in operations(doc) if m == "post" and "job_id" in str(op["responses"]["200"])]
    assert "/txt2img" in {p for p, _ in submits}
    for path, op in submits:
        links = op["responses"]["200"]["links"]
        assert {by_id[link["operationId"]] for link in links.values()} == job_ops, path
        assert all(link["parameters"] == {"job_id": "$response.body#/job_id"} for link in links.values())


def test_configured_limits_are_in_the_request_schema(model_store, tmp_path):
    doc = doc_for(model_store, tmp_path, max_steps=33, max_width=100, max_height=64, max_prompt_chars=500,
                  max_loras=3)
    props = doc["components"]["schemas"]["Txt2ImgRequest"]["properties"]
    assert props["steps"]["maximum"] == 33
    assert props["prompt"]["maxLength"] == 500 and props["negative_prompt"]["maxLength"] == 500
    assert props["loras"]["maxItems"] == 3
    # Sizes are rounded to 8 before the limit applies: the maximum is the last value that passes.
    for side, limit in (("width", 100), ("height", 64)):
        top = props[side]["maximum"]
        assert round8(top) <= limit < round8(top + 1)
    assert "Euler a" in props["sampler_name"]["enum"]
    assert "karras" in next(b for b in props["scheduler_type"]["anyOf"] if b.get("type") == "string")["enum"]
    # Hires limits hold only when hires is enabled, so they are not schema constraints.
    assert "maximum" not in doc["components"]["schemas"]["HiresConfig"]["properties"]["scale"]


def test_documented_codes_are_what_the_server_answers(server):
    c = server.client
    r = c.post("/txt2img", content=b"\x80not utf-8", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["status"] == "error"
    r = c.post("/txt2img", json={**SMALL, "steps": 10**6})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "steps"]
    big = {"prompt": "x" * (server.settings.max_body_bytes + 1)}
    assert c.post("/txt2img", json=big).status_code == 413
    # Two routes share /queue/{job_id}: a 405 names the methods of both.
    r = c.request("PUT", f"/queue/{uuid.uuid4()}")
    assert r.status_code == 405
    assert set(r.headers["allow"].split(", ")) == {"GET", "DELETE"}
    assert server.client.get("/queue").json()["jobs"] == []


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_docs_pages_load_only_assets_the_app_serves(server, path):
    page = server.client.get(path)
    assert page.status_code == 200 and "http" not in page.text.replace(server.url, "")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css") if path == "/docs" else ("redoc.standalone.js",):
        assert httpx.get(f"{server.url}/static-offline-docs/{asset}").status_code == 200
