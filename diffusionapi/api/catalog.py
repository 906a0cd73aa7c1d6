from __future__ import annotations

from fastapi import APIRouter, Request

from ..engine.samplers import SAMPLER_NAMES, SCHEDULER_TYPES
from ..registry import display_path
from ..schemas import (EmbeddingInfo, EmbeddingsResponse, HelloResponse, ModuleInfo, ModulesResponse, LoraInfo, LorasResponse, ModelAliasesResponse, ModelInfo, ModelsResponse,
                       SamplingMethodsResponse, UpscalerInfo, UpscalersResponse)

router = APIRouter()


def _models(request: Request) -> list[ModelInfo]:
    return [ModelInfo(name=m.name, label=m.label, type=m.family, format=m.format, family=m.family,
                      prediction=m.prediction, ztsnr=m.ztsnr)
            for m in request.app.state.registry.models()]


@router.get("/hello", response_model=HelloResponse)
async def hello() -> HelloResponse:  # on the event loop: answers even while the threadpool is busy
    return HelloResponse(ok=True)


@router.get("/models", response_model=ModelsResponse, response_model_exclude_none=True)
def models(request: Request) -> ModelsResponse:
    return ModelsResponse(models=_models(request))


@router.get("/models/aliases", response_model=ModelAliasesResponse, response_model_exclude_none=True)
def model_aliases(request: Request) -> ModelAliasesResponse:
    items = _models(request)
    return ModelAliasesResponse(models=items, message=f"{len(items)} models; use a name or a label as 'model'")


@router.get("/loras", response_model=LorasResponse, response_model_exclude_none=True)
def loras(request: Request) -> LorasResponse:
    return LorasResponse(loras=[LoraInfo(name=e.name, scale=1.0, family=e.family)
                                for e in request.app.state.registry.loras()])


@router.get("/embeddings", response_model=EmbeddingsResponse, response_model_exclude_none=True)
def embeddings(request: Request) -> EmbeddingsResponse:
    return EmbeddingsResponse(embeddings=[EmbeddingInfo(name=e.name, family=e.family, vectors=e.vectors)
                                          for e in request.app.state.registry.embeddings()])


@router.get("/modules", response_model=ModulesResponse, response_model_exclude_none=True)
def modules(request: Request) -> ModulesResponse:
    """Text-encoder and VAE files (stable_diffusion/text_encoders/, stable_diffusion/vae/) for
    transformer-only Flux.1 / SD 3.x files, and VAEs that replace a model's own."""
    return ModulesResponse(modules=[
        ModuleInfo(name=c.name, kind=c.kind, role=c.role, families=list(c.families), width=c.width,
                   storage=c.storage, path=display_path(c.path))
        for c in request.app.state.registry.components.files()])


@router.get("/upscalers", response_model=UpscalersResponse, response_model_exclude_none=True)
def upscalers(request: Request) -> UpscalersResponse:
    return UpscalersResponse(upscalers=[
        UpscalerInfo(name=u.name, path="internal" if u.is_latent else display_path(u.path))
        for u in request.app.state.registry.upscalers()])


@router.get("/sampling_methods", response_model=SamplingMethodsResponse, response_model_exclude_none=True)
def sampling_methods() -> SamplingMethodsResponse:
    return SamplingMethodsResponse(sampling_methods=list(SAMPLER_NAMES), scheduler_types=list(SCHEDULER_TYPES))
