"""Native ControlNet listings: ``GET /controlnets`` and ``GET /preprocessors`` (README "ControlNet")."""
from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel

from ..engine.controlnet import preprocessors as pp
from ..engine.controlnet.files import annotators_dir, controlnet_dir
from ..engine.controlnet.request import files_for

router = APIRouter()


class ControlNetInfo(BaseModel):
    name: str
    title: str              # "name [hash]": A1111's model title
    family: str | None      # sd15 | sdxl | sd2 (read from the file); null when unreadable
    kind: str               # controlnet | controlnet-union | control-lora | t2i-adapter
    format: str             # diffusers | single-file
    error: str | None = None  # why it cannot be used


class ControlNetsResponse(BaseModel):
    status: str = "success"
    controlnets: list[ControlNetInfo]
    folder: str


class PreprocessorInfo(BaseModel):
    name: str
    label: str
    tags: list[str]
    available: bool           # runs here now
    needs: list[str]          # annotator files a networked module loads
    sliders: list[dict]       # A1111's slider specs: resolution, threshold_a, threshold_b
    reason: str | None = None  # why it is not available (the file to add)


class PreprocessorsResponse(BaseModel):
    status: str = "success"
    preprocessors: list[PreprocessorInfo]
    annotators_folder: str


@router.get("/controlnets", response_model=ControlNetsResponse, response_model_exclude_none=True)
def controlnets(request: Request) -> ControlNetsResponse:
    settings = request.app.state.settings
    return ControlNetsResponse(
        controlnets=[ControlNetInfo(name=e.name, title=e.title, family=e.family, kind=e.kind, format=e.format,
                                    error=e.error) for e in files_for(settings).entries()],
        folder=str(controlnet_dir(settings)))


@router.get("/preprocessors", response_model=PreprocessorsResponse, response_model_exclude_none=True)
def preprocessors(request: Request) -> PreprocessorsResponse:
    where = annotators_dir(request.app.state.settings)
    out = []
    for p in pp.PREPROCESSORS.values():
        why = pp.why_not_runnable(p, where)
        out.append(PreprocessorInfo(name=p.name, label=p.label, tags=list(p.tags), available=why is None,
                                    needs=list(p.needs), sliders=p.sliders(), reason=why))
    return PreprocessorsResponse(preprocessors=out, annotators_folder=str(where))


class IPAdapterInfo(BaseModel):
    name: str
    family: str | None          # from the cross-attention width (null: not a real model's width)
    cross_attention_dim: int | None
    image_encoder: str | None   # the clip_vision folder it uses (null: none installed fits)
    variant: str = "plain"      # plain | plus (a resampler's tokens from the encoder's hidden states)
    tokens: int = 4             # image tokens per reference image
    error: str | None = None


class IPAdaptersResponse(BaseModel):
    status: str = "success"
    ip_adapters: list[IPAdapterInfo]


@router.get("/ipadapters", response_model=IPAdaptersResponse, response_model_exclude_none=True)
def ipadapters(request: Request) -> IPAdaptersResponse:
    from ..engine.controlnet.request import ip_files_for

    files = ip_files_for(request.app.state.settings)
    out = []
    for e in files.entries():
        enc = files.encoder_for(e) if e.error is None else None
        out.append(IPAdapterInfo(name=e.name, family=e.family, cross_attention_dim=e.cross_dim,
                                 image_encoder=enc.name if enc else None, variant=e.variant, tokens=e.tokens,
                                 error=e.error))
    return IPAdaptersResponse(ip_adapters=out)
