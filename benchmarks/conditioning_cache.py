"""The conditioning cache: a queue of same-prompt jobs with different seeds, cache on vs off.

    .venv/bin/python benchmarks/conditioning_cache.py [--jobs 8] [--device cpu|cuda] [--skip-http]

Two figures, each a ratio measured side by side in one run (prints, never fails):
1. the conditioning stage alone (parse, tokenize, encode every schedule entry, AND part and the
   negative) per job, in-process on the bench model's 12-layer text encoder;
2. whole jobs through HTTP (a real uvicorn process per setting), the same queue.
The prompt is a typical pasted one: ~150 tokens with weights, a prompt-editing step and a long
negative prompt, so each job encodes 5 chunks per schedule entry without the cache.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

PROMPT = ("(masterpiece:1.2), best quality, [a lighthouse:an old lighthouse:0.5] on a cliff at dusk, "
          "(dramatic clouds:1.1), waves crashing on the rocks, warm light in the windows, seagulls, "
          "detailed, sharp focus, ((cinematic lighting)), wide angle, golden hour, film grain")
NEGATIVE = "(worst quality, low quality:1.4), blurry, jpeg artifacts, watermark, text, signature, deformed"
STEPS, SIZE = 10, 256


def stage_times(device: str, jobs: int, cache_size: int) -> list[float]:
    import torch

    from bench_model import build_bench_pipeline
    from diffusionapi.engine.conditioning import PromptEncoder

    pipe = build_bench_pipeline().to(device)
    enc = PromptEncoder(cache_size)
    times = []
    with torch.inference_mode():
        for _ in range(jobs):
            t = time.perf_counter()
            sc = enc.build(pipe, xl=False, prompt=PROMPT, negative=NEGATIVE, clip_skip=1, total_steps=STEPS)
            sc.batch(0)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    return times


def http_times(device: str, jobs: int, cache_size: int, models: Path, work: Path) -> list[float]:
    from run import Service

    svc = Service(work, models, work / "loras", device, conditioning_cache_size=cache_size)
    try:
        req = dict(prompt=PROMPT, negative_prompt=NEGATIVE, width=SIZE, height=SIZE, steps=STEPS,
                   sampler_name="Euler", scheduler_type="default", fileType="png", model="bench")
        svc.job(2, **req, seed=0)  # warm-up: the model loads
        return [svc.job(2, **req, seed=seed)["wall"] for seed in range(1, jobs + 1)]
    finally:
        svc.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-http", action="store_true")
    args = ap.parse_args()

    off = stage_times(args.device, args.jobs, 0)
    on = stage_times(args.device, args.jobs, 32)
    # The first job with the cache on pays for the encoding; the rest reuse it.
    print(f"conditioning stage per job, {args.jobs} same-prompt jobs ({args.device}):")
    print(f"  cache off: median {statistics.median(off) * 1000:.1f} ms")
    print(f"  cache on:  first {on[0] * 1000:.1f} ms, then median {statistics.median(on[1:]) * 1000:.2f} ms "
          f"({statistics.median(off) / max(statistics.median(on[1:]), 1e-9):.0f}x less)")
    if args.skip_http:
        return 0
    from bench_model import install_bench_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        install_bench_model(tmp / "models" / "bench")
        (tmp / "loras").mkdir()
        t_off = http_times(args.device, args.jobs, 0, tmp / "models", tmp / "off")
        t_on = http_times(args.device, args.jobs, 32, tmp / "models", tmp / "on")
    print(f"whole jobs through HTTP ({SIZE}x{SIZE}, {STEPS} steps, Euler), median per job:")
    print(f"  cache off {statistics.median(t_off):.3f} s, cache on {statistics.median(t_on):.3f} s: "
          f"ratio on/off {statistics.median(t_on) / statistics.median(t_off):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
