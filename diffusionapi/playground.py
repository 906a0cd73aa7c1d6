"""The web playground at `/` (plain static files, no build step), the API docs at `/docs` and
`/redoc` with their assets served by the app (FastAPI's self-hosting recipe; the pinned Swagger UI
and ReDoc bundles come from the `fastapi-offline` package), and the paths a browser may load
without the API key. None of those pages carries data; every API call they make sends the key.

Each page gets a Content-Security-Policy that allows only the app itself, so an offline or
air-gapped box never waits on a CDN, and nothing leaks a request to one (ReDoc's bundle, for
one, loads its logo from cdn.redoc.ly).
"""
from __future__ import annotations

import json
from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static"
DOCS_ASSETS_DIR = Path(fastapi_offline.__file__).parent / "static"
DOCS_ASSETS_URL = "/static-offline-docs"
OAUTH2_REDIRECT_URL = "/docs/oauth2-redirect"

# /healthz and /readyz (api/health.py): probes carry no data and must work without the key.
PUBLIC_PATHS = frozenset({"/hello", "/", "/docs", OAUTH2_REDIRECT_URL, "/redoc", "/openapi.json",
                          "/healthz", "/readyz"})
PUBLIC_PREFIXES = ("/static/", DOCS_ASSETS_URL + "/")

PLAYGROUND_CSP = ("default-src 'self'; img-src 'self' data: blob:; connect-src 'self' blob:; script-src 'self'; "
                  "style-src 'self'; object-src 'none'; base-uri 'self'; frame-ancestors 'self'")
# Swagger UI starts from an inline script; ReDoc styles inline and searches in a blob: worker.
DOCS_CSP = ("default-src 'self'; img-src 'self' data:; connect-src 'self'; script-src 'self' 'unsafe-inline'; "
            "style-src 'self' 'unsafe-inline'; worker-src 'self' blob:; font-src 'self' data:; "
            "object-src 'none'; base-uri 'self'; frame-ancestors 'self'")


def is_public(path: str) -> bool:
    """True for paths served without the API key. Routing uses the same path, so a prefix
    match cannot reach an API route (`/static/../models` is a file lookup in STATIC_DIR)."""
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


class _StaticFiles(StaticFiles):
    # The browser revalidates (a cheap 304 via ETag), so an upgraded server never runs old JS.
    def file_response(self, *args, **kwargs):
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        return response


def _with_csp(response: HTMLResponse, policy: str) -> HTMLResponse:
    response.headers["Content-Security-Policy"] = policy
    return response


def install(app: FastAPI) -> None:
    """Call on an app made with docs_url=None and redoc_url=None."""

    # The job states the page needs, generated from jobs/states.py (the one definition), before
    # the static mount so that this path is not looked up as a file.
    @app.get("/static/js/states.js", include_in_schema=False)
    def states_module() -> Response:
        from .jobs.states import FINAL_STATES

        body = f"// Generated from diffusionapi/jobs/states.py.\nexport const FINAL_STATES = new Set({json.dumps(list(FINAL_STATES))});\n"
        return Response(body, media_type="text/javascript", headers={"Cache-Control": "no-cache"})

    app.mount("/static", _StaticFiles(directory=STATIC_DIR), name="playground")
    app.mount(DOCS_ASSETS_URL, _StaticFiles(directory=DOCS_ASSETS_DIR), name="docs-assets")

    @app.get("/", include_in_schema=False)
    def playground() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html",
                            headers={"Cache-Control": "no-cache", "Content-Security-Policy": PLAYGROUND_CSP})

    @app.get("/docs", include_in_schema=False)
    def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return _with_csp(get_swagger_ui_html(
            openapi_url=root + app.openapi_url, title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{DOCS_ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_ASSETS_URL}/favicon.png",
            oauth2_redirect_url=root + OAUTH2_REDIRECT_URL,
            # No online validator badge; the API key entered under "Authorize" survives a reload.
            swagger_ui_parameters={"validatorUrl": None, "persistAuthorization": True}), DOCS_CSP)

    @app.get(OAUTH2_REDIRECT_URL, include_in_schema=False)
    def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return _with_csp(get_redoc_html(
            openapi_url=root + app.openapi_url, title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{DOCS_ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{DOCS_ASSETS_URL}/favicon.png", with_google_fonts=False), DOCS_CSP)
