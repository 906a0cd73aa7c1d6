"""The web playground at `/` (plain static files, no build step) and the paths a browser may
load without the API key: the playground's page and assets, the offline API docs and the
OpenAPI document. None of them carries data; every API call the pages make sends the key."""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static"
# Where fastapi-offline serves Swagger UI's and ReDoc's JavaScript and CSS.
DOCS_ASSETS_URL = "/static-offline-docs"

PUBLIC_PATHS = frozenset({"/hello", "/", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
PUBLIC_PREFIXES = ("/static/", DOCS_ASSETS_URL + "/")


def is_public(path: str) -> bool:
    """True for paths served without the API key. Routing uses the same path, so a prefix
    match cannot reach an API route (`/static/../models` is a file lookup in STATIC_DIR)."""
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


class _RevalidatedStaticFiles(StaticFiles):
    # The browser revalidates (a cheap 304 via ETag) so an upgraded server never runs old JS.
    def file_response(self, *args, **kwargs):
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        return response


def install(app: FastAPI) -> None:
    app.mount("/static", _RevalidatedStaticFiles(directory=STATIC_DIR), name="playground")

    @app.get("/", include_in_schema=False)
    def playground() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})
