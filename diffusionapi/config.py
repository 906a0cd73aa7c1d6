"""One Settings object, read once at start-up from DIFFUSIONAPI_* environment variables."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
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
    # Image guidance (README "ControlNet"): None = the folder of that name next to models_dir.
    controlnet_dir: Path | None = None     # ControlNets and T2I-Adapters
    annotators_dir: Path | None = None     # preprocessor weights
    # Component files for transformer-only Flux.1 / SD 3.x files (docs/families.md "Where files go"):
    # None = the folder of that name next to models_dir.
    text_encoders_dir: Path | None = None  # CLIP-L / CLIP-G / T5-XXL files, and t5-tokenizer/
    vae_dir: Path | None = None            # VAE files (Flux ae, SD 3 VAE, A1111-style VAEs)

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
    max_reference_images: int = Field(4, ge=1, description="reference images per edit job (`POST /edit`, "
                                      "`/sdapi/v1/img2img` on an editing model)")
    max_batch_size: int = Field(8, ge=1)
    max_n_iter: int = Field(16, ge=1)
    max_image_body_bytes: int = Field(50_000_000, ge=1024)  # image-carrying endpoints (img2img, upscale)
    # A job's cost in megapixel-steps: images x (width x height x steps, + the hires pass) x
    # ControlNet units x conditioning (AND parts and 75-token chunks); limits.py, docs/security.md "sizing".
    max_cost: float = Field(2500.0, gt=0)
    # png-info: an image's text fields (prompt, negative prompt, parameters) longer than this are refused
    # before the infotext parser runs.
    max_infotext_chars: int = Field(65_536, ge=1024)

    # Engine behaviour.
    pipeline_cache_size: int = Field(1, ge=1)
    host_cache_gb: float | None = Field(
        None, ge=0, description="host RAM for models evicted from the device (pinned on CUDA): switching back to "
        "one is a device copy, not a disk load (engine/hostcache.py, [performance](performance.md)); 0: off; "
        "unset: a quarter of the RAM, at most 64 GB, when CUDA is present, else 0")
    lora_cache_size: int = Field(8, ge=1)
    conditioning_cache_size: int = Field(32, ge=0)  # encoded prompt texts kept (LRU); 0: off
    vae_tiling_pixels: int = Field(1536 * 1536, ge=64)
    cpu_offload: bool = False
    channels_last: bool = False
    compile_unet: bool = False
    compile_cache_dir: Path | None = Field(
        None, description="torch.compile's caches on disk (inductor FX graphs, kernels), one folder per torch "
        "build, so a restart reuses compiled graphs instead of compiling for minutes; unset: the `compile-cache` "
        "folder next to the models folder ([performance](performance.md#compile-cache))")
    # Fast mode and batching (engine/fastmode.py, engine/batching.py; benchmarks/gpu.py measures each).
    fused_qkv: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    vae_fp16: bool = True
    vae_upcast_dtype: Literal["float32", "bfloat16"] = "float32"
    warmup_shapes: str = ""
    step_cache_default: list[dict] = Field(
        default_factory=list, description="a request's `step_cache` when it sends none: a JSON list of "
        "`{\"method\": ..., \"threshold\"|\"interval\": ...}`, the first whose method fits the model's network "
        "(transformer or UNet) applies; empty: no step caching unless a request asks "
        "([performance](performance.md#step-caching))")
    max_batch_jobs: int | None = Field(
        None, ge=1, le=64, description="dynamic batching: jobs that differ only in prompts and seed, among the next "
        "this many waiting, run as one UNet batch; unset: 8 when the device is CUDA, 1 (off) elsewhere "
        "([performance](performance.md#gpu-benchmark-fast-mode-dynamic-batching))")
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
    # A submit's Idempotency-Key is remembered this long (both backends): a retry within it returns
    # the first submit's job instead of making another.
    idempotency_window_sec: float = Field(86400.0, gt=0)

    # Connections (security/connguard.py, docs/security.md): how long a request may take to arrive,
    # and how many connections a client, and all clients, may hold open.
    header_timeout_sec: float = Field(10.0, ge=0)  # request line + headers; 0: no deadline
    body_timeout_sec: float = Field(60.0, ge=0)    # the whole request, from its first byte
    max_connections: int = Field(0, ge=0)          # 0: half the process's open-file limit
    max_connections_per_client: int = Field(64, ge=0)  # 0: no cap (behind a reverse proxy)

    # Access (auth/keys.py: one check for every route of both dialects).
    api_key: str | None = None
    api_auth: str | None = None  # user:pass[,user2:pass2]: HTTP Basic (A1111's --api-auth), every route
    api_keys_file: Path | None = None  # named keys with roles and limits (docs/tenants.md, auth/keys.py)
    # init.sh refuses to listen beyond loopback with no credentials configured, unless this says so.
    allow_unauthenticated: bool = False
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
    webhook_concurrency: int = Field(8, ge=1)  # deliveries in flight at once
    webhook_per_host: int = Field(2, ge=1)     # ... of them to one host (a stalling receiver delays only its own)

    @field_validator("api_key", "api_auth", "webhook_secret", "admin_key")
    @classmethod
    def _no_empty_secret(cls, v: str | None, info) -> str | None:
        # "DIFFUSIONAPI_API_KEY=" in a unit file would otherwise turn auth off without a word.
        if v is not None and not v.strip():
            raise ValueError(f"DIFFUSIONAPI_{info.field_name.upper()} is set but empty: give a value, or unset it")
        return v  # a malformed api_auth fails create_app (auth/keys.py parses it)

    # Operating it (docs/operating.md): logs, metrics, probes, disk, models over the API.
    log_format: Literal["text", "json"] = "text"  # json: one object per line, uvicorn's lines included
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"  # diffusionapi.*; uvicorn's follow --log-level
    metrics_port: int | None = Field(None, ge=0, le=65535)  # a cluster worker's /metrics /healthz /readyz
    worker_stall_sec: float = Field(600.0, gt=0)  # a running job silent this long: /readyz says wedged
    result_ttl: float | None = None  # seconds ("24h", "30m", "7d" too): outputs and unread finals kept
    outputs_max_gb: float | None = Field(None, gt=0)  # outputs/ kept under this size, oldest removed first
    min_free_gb: float = Field(0.0, ge=0)  # a submit with less free disk is a 503 (nothing written)
    admin_key: str | None = None  # model install/delete/rescan need it (Bearer or X-API-Key)
    model_install_max_gb: float = Field(20.0, gt=0)  # a download larger than this is refused
    model_install_allowed_hosts: list[str] = Field(default_factory=lambda: ["*"])  # the webhook rule
    hf_token: str | None = None  # sent as Authorization to huggingface.co downloads
    civitai_token: str | None = None  # sent as Authorization to civitai.com downloads

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, v):
        return v.upper() if isinstance(v, str) else v

    @field_validator("result_ttl", mode="before")
    @classmethod
    def _duration(cls, v):
        """``86400``, ``"24h"``, ``"30m"``, ``"7d"``, ``"90s"``; empty or 0: keep forever."""
        if v in (None, "", 0, "0"):
            return None
        if isinstance(v, str) and v.strip()[-1:].lower() in _UNITS:
            v = v.strip()
            v = float(v[:-1]) * _UNITS[v[-1].lower()]
        if float(v) <= 0:
            raise ValueError("a duration above 0 (seconds, or with s/m/h/d), or empty to keep forever")
        return float(v)


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def stable_diffusion_dir(settings, field: str, default: str) -> Path:
    """A model folder: its setting (``field``) when set, else ``default`` beside the models folder
    (``stable_diffusion/<default>``, the layout A1111 / Forge / ComfyUI users know)."""
    chosen = getattr(settings, field, None)
    return Path(chosen) if chosen else Path(settings.models_dir).parent / default


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
    FieldLimit("reference_images", "max_reference_images", "maxItems"),
    FieldLimit("hires.scale", "max_hires_scale", "maximum"),
    FieldLimit("hires.steps", "max_steps", "maximum"),
)
