"""Model management over the API, admin key only (``DIFFUSIONAPI_ADMIN_KEY``):

- ``POST /models/install {url, kind, name?, sha256?}``: a job of kind ``install`` (models_install.py);
  follow it at ``GET /queue/{id}`` or ``/queue/{id}/events`` like any job.
- ``DELETE /models/{name}?kind=model``: removes an installed file (or a diffusers folder) from the
  folder of its kind.
- ``POST /models/rescan``: what the folders hold now (the registry reads them at every listing, so
  this is a check, and the answer after a hand copy).
"""
from __future__ import annotations

import hmac
import shutil
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from starlette.convertors import Convertor, register_url_convertor
from pydantic import BaseModel, Field

from ..models_install import KIND_DIRS, InstallRefused, plan_install
from ..registry import display_path
from ..schemas import ErrorResponse
from . import jobs as jobs_api

router = APIRouter()


class _ModelName(Convertor):
    """A name in ``DELETE /models/{name}``: anything (LoRA names have folders) but the fixed
    /models/... paths, so those routes advertise only their own methods (a 405's Allow)."""
    regex = "(?!(?:aliases|install|rescan)$).+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("modelname", _ModelName())

Kind = Literal["model", "lora", "vae", "text_encoder", "controlnet", "upscaler", "embedding"]


class InstallRequest(BaseModel):
    url: str = Field(..., max_length=4096, description="http(s) URL of one file")
    kind: Kind = "model"
    name: str | None = Field(None, max_length=200, description="file name in the folder (default: the URL's)")
    sha256: str | None = Field(None, description="expected sha256 (hex); a mismatch fails the job")


class InstallResponse(BaseModel):
    job_id: str
    status: str = "queued"
    path: str  # where the file will be, as GET /models etc. show paths


class DeleteResponse(BaseModel):
    status: str = "success"
    deleted: str
    kind: str


class RescanResponse(BaseModel):
    status: str = "success"
    models: int
    loras: int
    embeddings: int
    upscalers: int


_ERR = {"model": ErrorResponse}
_ADMIN = {403: _ERR}


def admin_problem(request: Request):
    """None when the request carries the admin key, else the 403 answer."""
    key = request.app.state.settings.admin_key
    if not key:
        return jobs_api.error(403, "model management over the API is off: set DIFFUSIONAPI_ADMIN_KEY")
    auth = request.headers.get("authorization", "")
    given = auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
    if not hmac.compare_digest(given.encode(), key.encode()):
        return jobs_api.error(403, "this needs the admin key (DIFFUSIONAPI_ADMIN_KEY), as Bearer or X-API-Key")
    return None


def _refused(e: InstallRefused):
    return jobs_api.error(e.status, str(e), detail=[{"loc": ["body", e.field], "msg": str(e)}])


@router.post("/models/install", response_model=InstallResponse,
             responses={**_ADMIN, 409: _ERR, 422: _ERR, 503: _ERR})
def install(body: InstallRequest, request: Request):
    denied = admin_problem(request)
    if denied:
        return denied
    state = request.app.state
    if state.settings.backend != "embedded":
        return jobs_api.error(409, "a cluster's models live on its worker hosts: install them there "
                                   "(files in each worker's folders; workers rescan every 30 s)")
    try:
        payload = plan_install(state.settings, body.url, body.kind, body.name, body.sha256)
    except InstallRefused as e:
        return _refused(e)
    job_id = state.jobs.record("install", payload)  # a 503 (queue full, disk below the floor) raises
    return InstallResponse(job_id=job_id, path=payload["path"])


def _entries(registry, kind: str):
    if kind == "model":
        return [(m.name, m.path) for m in registry.models()]
    if kind == "lora":
        return [(e.name, e.path) for e in registry.loras()]
    if kind == "embedding":
        return [(e.name, e.path) for e in registry.embeddings()]
    if kind == "upscaler":
        return [(u.name, u.path) for u in registry.upscalers() if not u.is_latent]
    return []


@router.delete("/models/{name:modelname}", response_model=DeleteResponse, responses={**_ADMIN, 404: _ERR, 409: _ERR})
def delete_model(name: str, request: Request, kind: Kind = Query("model")):
    denied = admin_problem(request)
    if denied:
        return denied
    state = request.app.state
    attr = KIND_DIRS.get(kind)
    folder = getattr(state.settings, attr, None) if attr else None
    found = next((p for n, p in _entries(state.registry, kind) if n == name), None)
    if folder is None or found is None:
        return jobs_api.error(404, f"no {kind} named {name!r}")
    path, root = Path(found).resolve(), Path(folder).resolve()
    if root in path.parents and path.relative_to(root).parts[0].startswith("models--"):
        path = root / path.relative_to(root).parts[0]  # a hub cache: the whole models--org--repo folder
    if root not in path.parents:  # never outside the kind's folder (a hub cache symlink, say)
        return jobs_api.error(409, f"{display_path(path)} is not inside {display_path(root)}; remove it by hand")
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()
        config = path.with_suffix(".config")  # a single file's config folder goes with it
        if config.is_dir():
            shutil.rmtree(config)
    return DeleteResponse(deleted=display_path(path), kind=kind)


@router.post("/models/rescan", response_model=RescanResponse, responses=_ADMIN)
async def rescan(request: Request):
    denied = admin_problem(request)
    if denied:
        return denied
    registry = request.app.state.registry

    def count():
        return {"models": len(registry.models()), "loras": len(registry.loras()),
                "embeddings": len(registry.embeddings()),
                "upscalers": sum(1 for u in registry.upscalers() if not u.is_latent)}

    return RescanResponse(**await run_in_threadpool(count))
