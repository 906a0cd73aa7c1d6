"""What previews cost: jobs with `preview: {every: 1, method: approx}` against the same jobs without,
interleaved in one run on one server (prints; never fails). Target: <= 3 % slower.

    .venv/bin/python benchmarks/previews.py [--quick] [--device cuda] [--steps 20] [--size 256]

Also prints the sampler-side cost of one preview (what the sampling thread pays per step:
the latent->RGB kernel and the start of the copy), measured in-process.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import REQ, Service, install_bench_model  # noqa: E402


def sampler_side_cost(device: str, size: int, n: int = 200) -> float:
    """Microseconds per PreviewSink.offer on [1, 4, size/8, size/8] latents (encoding happens elsewhere)."""
    import torch

    from diffusionapi.engine.previews import SD15_LATENT_RGB, PreviewSink, approx_rgb

    sink = PreviewSink("approx", 1, lambda z: approx_rgb(z, SD15_LATENT_RGB), (size, size), lambda p: None)
    z = torch.randn(1, 4, size // 8, size // 8, device=device)
    for i in range(10):
        sink.offer(z, i + 1, n, "generation")
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(n):
        sink.offer(z, i + 1, n, "generation")
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / n
    sink.close()
    return dt * 1e6


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args()
    pairs = 3 if args.quick else 8
    work = Path(tempfile.mkdtemp(prefix="diffusionapi-bench-previews-"))
    models = work / "models"
    install_bench_model(models / "bench-sd15")
    (work / "loras").mkdir()
    svc = Service(work / "svc", models, work / "loras", args.device, DEFAULT_MODEL="bench-sd15")
    req = dict(REQ, steps=args.steps, width=args.size, height=args.size)
    try:
        svc.job(poll_hz=5, **req)  # load the model once
        plain, with_previews = [], []
        for i in range(pairs):
            # Alternate the order so drift on a shared machine hits both sides alike.
            order = [(plain, {}), (with_previews, {"preview": {"every": 1, "method": "approx"}})]
            for sink, extra in (order if i % 2 == 0 else order[::-1]):
                body = svc.job(poll_hz=5, **req, seed=i, **extra)
                sink.append(body["generation_time_sec"] - body["load_time_sec"])
    finally:
        svc.close()
    mp, mv = statistics.median(plain), statistics.median(with_previews)
    print(f"device {args.device}, {args.size}x{args.size}, {args.steps} steps, {pairs} pairs (worker time per job)")
    print(f"  no previews:              median {mp:.3f} s  {[round(x, 3) for x in plain]}")
    print(f"  approx preview each step: median {mv:.3f} s  {[round(x, 3) for x in with_previews]}")
    print(f"  ratio: {mv / mp:.3f}  (target <= 1.03)")
    print(f"  sampler-side cost of one preview: {sampler_side_cost(args.device, args.size):.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
