#!/usr/bin/env python3
"""Writes docs/settings.md, the settings reference, from diffusionapi.config.Settings.

    .venv/bin/python scripts/gen_settings_doc.py          # rewrite docs/settings.md
    .venv/bin/python scripts/gen_settings_doc.py --check  # exit 1 when the file differs (tests do this)

Each row: the environment variable, the default, the accepted values (type, bounds, choices) and
the meaning. The meaning is the field's own `description` (``Field(..., description=...)``) when
it has one, else the entry in DESCRIPTIONS below, else the comment at the end of the field's line
in config.py; tests/test_settings_doc.py fails when a field has none of them, or when
docs/settings.md is not what this script writes.
"""
from __future__ import annotations

import argparse
import json
import sys
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusionapi.config import Settings  # noqa: E402

OUT = ROOT / "docs" / "settings.md"

# Meanings for fields without a `description`; move them into config.py's Field(description=...)
# whenever convenient (that wins).
DESCRIPTIONS = {
    "max_cost": "a job's cost budget in megapixel-steps: images × (width × height × steps, plus the hires pass) × "
                "ControlNet units × conditioning passes (AND parts, 75-token chunks); over it is a 422 on `cost` that says what to "
                "lower ([security](security.md))",
    "max_infotext_chars": "png-info: image text fields longer than this are refused (413) before the infotext "
                          "parser runs",
    "allow_unauthenticated": "let `init.sh` listen beyond loopback with no credentials configured "
                             "([security](security.md))",
    "models_dir": "models: diffusers folders, hub-cache folders, single-file checkpoints ([guide](guide.md#where-things-go))",
    "loras_dir": "LoRA files (`.safetensors`, subfolders allowed)",
    "upscalers_dir": "upscaler model files (what spandrel loads: ESRGAN, Real-ESRGAN, SwinIR, ...)",
    "embeddings_dir": "textual-inversion embeddings ([guide](guide.md#prompt-syntax))",
    "outputs_dir": "generated images",
    "queue_dir": "job records (and the file-hash caches)",
    "model_labels": "`{name: label}` JSON file of model labels",
    "controlnet_dir": "ControlNets and T2I-Adapters; unset: the `controlnet` folder next to the models folder ([controlnet](controlnet.md))",
    "annotators_dir": "preprocessor (annotator) weights; unset: the `annotators` folder next to the models folder",
    "model_install_allowed_hosts": "hosts model downloads may come from (`POST` installs, [operating](operating.md)); the same rule as `WEBHOOK_ALLOWED_HOSTS`",
    "api_keys_file": "named API keys with roles and limits ([tenants](tenants.md))",
    "device": "`auto` (cuda, then mps, then cpu), or `cpu`, `cuda`, `cuda:1`, ...",
    "default_model": "model used when a request names none; when it is not installed, the first installed base model",
    "max_width": "per-side width limit (after rounding to 8)",
    "max_height": "per-side height limit (after rounding to 8)",
    "max_pixels": "width × height (× batch size) limit of the first pass",
    "max_steps": "`steps` and `hires.steps` limit",
    "max_hires_scale": "`hires.scale` limit",
    "max_hires_pixels": "final (hires) width × height limit; also the input-image limit",
    "max_queued_jobs": "waiting + running jobs; beyond: 503 with `Retry-After`",
    "max_prompt_chars": "`prompt` / `negative_prompt` length limit",
    "max_body_bytes": "request body limit (413)",
    "max_loras": "LoRAs per request",
    "max_batch_size": "images per UNet batch (`batch_size`)",
    "max_n_iter": "batches per job (`n_iter`)",
    "max_image_body_bytes": "request body limit of the endpoints that carry images (`/img2img`, `/edit`, `/upscale`)",
    "pipeline_cache_size": "models kept resident (LRU); a refiner job keeps base + refiner",
    "lora_cache_size": "LoRA adapters kept loaded per model",
    "conditioning_cache_size": "encoded prompt texts kept (LRU); `0` turns the cache off",
    "vae_tiling_pixels": "the VAE encodes/decodes in tiles above this many output pixels",
    "cpu_offload": "diffusers model CPU offload (small GPUs)",
    "channels_last": "channels-last UNet on CUDA",
    "compile_unet": "`torch.compile` the UNet on CUDA (compiles once per new shape)",
    "fused_qkv": "one matmul for attention's q/k/v projections (exact; LoRA jobs run unfused)",
    "compile_mode": "inductor mode for `COMPILE_UNET` (`reduce-overhead`: CUDA graphs)",
    "vae_fp16": "VAE in fp16, redone in `VAE_UPCAST_DTYPE` only when the result has NaN/inf (then always, for that model); "
                "`false`: upcast when the VAE config says `force_upcast`",
    "vae_upcast_dtype": "the VAE's wider type",
    "warmup_shapes": "`[model:]WIDTHxHEIGHT[xBATCH],...` run once (2 steps) at start: models load and compile before the first job",
    "batch_wait_ms": "with batching, how long the worker waits for a batch to fill before starting it",
    "backend": "`embedded` (this process runs the jobs) or `celery` (API node of a cluster, [cluster](cluster.md))",
    "broker_url": "Celery broker: RabbitMQ (`amqp://`), or Redis (`redis://`)",
    "redis_url": "cluster job state, progress, results, worker heartbeats and catalogs; Sentinel: "
                 "`redis+sentinel://host:port[,host:port]/service_name[/db]` ([cluster-faults.md](cluster-faults.md))",
    "results_ttl_sec": "a finished cluster job not collected within this time is dropped from Redis (its file stays in the worker's `outputs/`)",
    "worker_heartbeat_sec": "worker heartbeat period; a worker silent for 3 periods is dead and its running job goes to another worker",
    "idempotency_window_sec": "a submit's `Idempotency-Key` returns the first submit's job for this long, on both "
                              "backends ([cluster-faults.md](cluster-faults.md))",
    "orphan_grace_sec": "a job recorded but never confirmed by the broker (its API node died mid-submit), or running with a "
                        "lapsed lease, this long is published again by an API node's orphan sweep",
    "api_key": "when set, every endpoint but `/hello` (and the pages) needs `Authorization: Bearer <key>` or `X-API-Key`",
    "api_auth": "`user:pass[,user2:pass2]`: HTTP Basic users, each an admin, on every route and dialect (A1111's `--api-auth`)",
    "cors_origins": "allowed browser origins (CORS is off when empty)",
    "previews_default": "`preview` for requests that send none, e.g. `{\"every\": 5, \"method\": \"approx\"}`",
    "vae_approx_dir": "TAESD decoders and per-model latent→RGB factor files (previews)",
    "events_retention_sec": "a streamed job's final event kept for reconnects",
    "webhook_secret": "HMAC key of webhook signatures; requests with a webhook are refused without it",
    "webhook_allowed_hosts": "host names, addresses or networks webhooks may target; `\"*\"` = any public host",
    "webhook_max_tries": "delivery attempts per webhook",
    "webhook_backoff_sec": "first retry delay; doubles each time",
    "webhook_timeout_sec": "one delivery attempt's timeout",
    "webhook_progress_interval_sec": "progress webhooks: at most one per interval",
}


def env_name(field: str) -> str:
    return Settings.model_config.get("env_prefix", "") + field.upper()


def _code(text: str) -> str:
    return f"`{text}`" if text else "empty"


def default_text(info) -> str:
    if info.default_factory is not None:
        value = info.default_factory()
    else:
        value = info.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return _code(str(value).lower())
    if isinstance(value, Path):
        return _code(value.as_posix())
    if isinstance(value, (list, dict)):
        return _code(json.dumps(value))
    return _code(str(value))


def values_text(info) -> str:
    ann = info.annotation
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Literal:
        return ", ".join(f"`{a}`" for a in args)
    optional = type(None) in args
    if args and optional:
        ann = next(a for a in args if a is not type(None))
    name = {int: "integer", float: "number", bool: "`true`/`false`", str: "text", Path: "path"}.get(ann)
    if name is None:
        base = typing.get_origin(ann) or ann
        name = {list: "JSON list", dict: "JSON object"}.get(base, getattr(ann, "__name__", str(ann)))
    bounds = []
    for m in info.metadata:
        for attr, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            if getattr(m, attr, None) is not None:
                bounds.append(f"{sign} {getattr(m, attr)}")
    return name + (" " + ", ".join(bounds) if bounds else "")


def _source_comments() -> dict[str, str]:
    """The trailing ``# comment`` of each field's line in config.py (the last fallback)."""
    import inspect
    import re

    out = {}
    for line in inspect.getsource(Settings).splitlines():
        m = re.match(r"    (\w+): [^#]*#\s*(.+)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def description(field: str, info) -> str | None:
    """The field's ``description``, else DESCRIPTIONS, else its line's comment in config.py."""
    return info.description or DESCRIPTIONS.get(field) or _source_comments().get(field)


def render() -> str:
    rows = []
    for field, info in Settings.model_fields.items():
        meaning = (description(field, info) or "**undocumented**").replace("|", "\\|")
        rows.append(f"| `{env_name(field)}` | {default_text(info)} | {values_text(info)} | {meaning} |")
    return "\n".join([
        "# Settings",
        "",
        "<!-- Generated by scripts/gen_settings_doc.py from diffusionapi/config.py's Settings; do not edit by hand.",
        "     tests/test_settings_doc.py fails when this file and Settings differ. -->",
        "",
        "Every setting is an environment variable, read once at start-up (a `.env` file is not read).",
        "Paths are relative to the working directory unless absolute. Lists and objects are JSON",
        "(`DIFFUSIONAPI_CORS_ORIGINS='[\"https://example.com\"]'`). On a cluster every process — API",
        "nodes and workers — reads the same variables ([cluster](cluster.md)).",
        "",
        "| variable | default | values | meaning |",
        "|---|---|---|---|",
        *rows,
        "",
    ])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when docs/settings.md is not up to date")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT.relative_to(ROOT)} is out of date: run scripts/gen_settings_doc.py", file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)} ({len(Settings.model_fields)} settings)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
