"""One Settings object, read once at start-up from DIFFUSIONAPI_* environment variables."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


# The seed's default for a request's `model`.
SEED_DEFAULT_MODEL = "stable-diffusion-v1-5"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DIFFUSIONAPI_", extra="ignore")

    # Where things live (relative to the working directory unless absolute).
    models_dir: Path = Path("stable_diffusion/models")
    loras_dir: Path = Path("stable_diffusion/loras")
    upscalers_dir: Path = Path("stable_diffusion/upscalers")
    embeddings_dir: Path = Path("stable_diffusion/embeddings")
    outputs_dir: Path = Path("outputs")
    queue_dir: Path = Path("queue")
    model_labels: Path = Path("stable_diffusion/model_labels.json")

    # "auto" picks cuda, then mps, then cpu.
    device: str = "auto"
    default_model: str = SEED_DEFAULT_MODEL  # used when a request names no model

    # Limits, enforced at submit so nothing oversized is ever queued.
    max_width: int = Field(2048, ge=8)
    max_height: int = Field(2048, ge=8)
    max_pixels: int = Field(2048 * 2048, ge=64)
    max_steps: int = Field(150, ge=1)
    max_hires_scale: float = Field(4.0, ge=1.0)
    max_hires_pixels: int = Field(4096 * 4096, ge=64)
    max_queued_jobs: int = Field(100, ge=1)
    max_prompt_chars: int = Field(10_000, ge=1)
    max_body_bytes: int = Field(1_000_000, ge=1024)
    max_loras: int = Field(16, ge=0)
    max_batch_size: int = Field(8, ge=1)
    max_n_iter: int = Field(16, ge=1)
    max_image_body_bytes: int = Field(50_000_000, ge=1024)  # image-carrying endpoints (img2img, upscale)

    # Engine behaviour.
    pipeline_cache_size: int = Field(1, ge=1)
    lora_cache_size: int = Field(8, ge=1)
    conditioning_cache_size: int = Field(32, ge=0)  # encoded prompt texts kept (LRU); 0: off
    vae_tiling_pixels: int = Field(1536 * 1536, ge=64)
    cpu_offload: bool = False
    channels_last: bool = False
    compile_unet: bool = False
    # Fast mode and batching (engine/fastmode.py, engine/batching.py; benchmarks/gpu.py measures each).
    fused_qkv: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    vae_fp16: bool = True
    vae_upcast_dtype: Literal["float32", "bfloat16"] = "float32"
    warmup_shapes: str = ""
    max_batch_jobs: int = Field(1, ge=1, le=64)
    batch_wait_ms: float = Field(0.0, ge=0, le=1000)

    # Scale-out (README "Several GPUs and machines"): embedded = this process runs the jobs.
    backend: Literal["embedded", "celery"] = "embedded"
    broker_url: str = "amqp://guest:guest@localhost:5672//"
    redis_url: str = "redis://localhost:6379/0"
    results_ttl_sec: int = Field(3600, ge=10)  # unread results (and their images) kept in Redis this long
    worker_heartbeat_sec: float = Field(2.0, gt=0)  # a worker silent for 3 beats is dead
    # A job recorded but with no broker message confirmed this long (its API node died mid-submit),
    # or running with a lapsed lease this long, is published again by an API node's orphan sweep.
    orphan_grace_sec: float = Field(30.0, gt=0)

    # Access.
    api_key: str | None = None
    api_auth: str | None = None  # user:pass[,user2:pass2]: HTTP Basic on /sdapi (A1111's --api-auth)
    cors_origins: list[str] = Field(default_factory=list)

    # Live progress (README "Live progress"): previews, event streams, webhooks.
    previews_default: dict | None = None  # a request's `preview` when it sends none, e.g. {"every": 5}
    vae_approx_dir: Path = Path("stable_diffusion/vae-approx")  # TAESD decoders, per-model factor files
    events_retention_sec: float = Field(300.0, ge=0)  # a streamed job's final event kept for reconnects
    webhook_secret: str | None = None
    webhook_allowed_hosts: list[str] = Field(default_factory=lambda: ["*"])
    webhook_max_tries: int = Field(5, ge=1)
    webhook_backoff_sec: float = Field(10.0, ge=0)  # first retry delay; doubles each time
    webhook_timeout_sec: float = Field(10.0, gt=0)
    webhook_progress_interval_sec: float = Field(2.0, ge=0)  # progress webhooks: at most one per interval


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


@dataclass(frozen=True)
class FieldLimit:
    """A configured limit on one request field: checked at submit (jobs/resolve.py) and shown
    in the OpenAPI document as ``keyword`` (openapi.py), both from this table."""
    field: str     # the request field (dotted for nested ones: ``hires.steps``)
    setting: str   # the Settings attribute holding the limit
    keyword: Literal["maximum", "maxLength", "maxItems"]

    def value(self, settings: Settings):
        return getattr(settings, self.setting)


# Limits that hold for every request whatever else it asks (the pixel budgets, which depend on
# several fields at once, are checked in resolve.py).
FIELD_LIMITS: tuple[FieldLimit, ...] = (
    FieldLimit("prompt", "max_prompt_chars", "maxLength"),
    FieldLimit("negative_prompt", "max_prompt_chars", "maxLength"),
    FieldLimit("steps", "max_steps", "maximum"),
    FieldLimit("width", "max_width", "maximum"),     # after rounding to a multiple of 8
    FieldLimit("height", "max_height", "maximum"),
    FieldLimit("batch_size", "max_batch_size", "maximum"),
    FieldLimit("n_iter", "max_n_iter", "maximum"),
    FieldLimit("loras", "max_loras", "maxItems"),
    FieldLimit("hires.scale", "max_hires_scale", "maximum"),
    FieldLimit("hires.steps", "max_steps", "maximum"),
)
