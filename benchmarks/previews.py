"""What previews cost: jobs with `preview: {every: 1, method: approx}` against the same jobs without,
on one server in one run (prints; never fails). Target: <= 3 % slower.

    .venv/bin/python benchmarks/previews.py [--quick] [--device cuda] [--steps 20] [--size 256] [--pairs 10]

Two figures, because a shared 2-core box moves a single job's time by several per cent:

1. Side by side through HTTP: jobs in ABBA order (plain, preview, preview, plain, ...), the client
   polling at 5 Hz as a page would (the preview rides in each poll). Reported: the median of the
   per-pair ratios (each pair ran back to back, so slow drift of the machine cancels), and the
   spread of the plain jobs alone (the noise floor: a ratio inside it is no measurable cost).
2. Accounting: the CPU time one preview costs in all (the sampler's part: the latent->RGB kernel
   and the copy; the encoder thread's part: resize + JPEG), measured in-process over many
   previews, times the steps of a job, over that job's measured time. On a CPU box the encoder
   competes with the sampler for cores, so this is an upper bound of the slowdown; on a GPU it
   runs beside the sampling and costs the GPU nothing.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import REQ, Service, install_bench_model  # noqa: E402


def preview_cpu_cost(device: str, size: int, n: int = 300) -> dict:
    """Milliseconds of CPU per approx preview of a size x size image: sampler side and in all."""
    import torch

    from diffusionapi.engine.previews import SD15_LATENT_RGB, PreviewSink, approx_rgb, preview_size

    published = []
    done = threading.Event()

    def publish(p) -> None:
        published.append(p)
        done.set()

    z = torch.randn(1, 4, size // 8, size // 8, device=device)

    def run(k: int) -> tuple[float, float]:
        sink = PreviewSink("approx", 1, lambda x: approx_rgb(x, SD15_LATENT_RGB), preview_size(size, size), publish)
        cpu0 = time.process_time()
        offer = 0.0
        for i in range(k):
            done.clear()
            t = time.perf_counter()
            sink.offer(z, i + 1, k, "generation")
            offer += time.perf_counter() - t
            # One preview per sampler step: wait (without spending CPU) until it is out, as the
            # time of a step would; the sink keeps only the newest pending preview, so a burst
            # of offers would encode fewer than were offered.
            done.wait(1.0)
        sink.close()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return offer / k, (time.process_time() - cpu0) / k

    run(20)  # warm-up (threads, allocator, JPEG tables)
    published.clear()
    offer, total = run(n)
    return {"sampler_side_ms": round(offer * 1000, 3), "cpu_total_ms": round(total * 1000, 3),
            "previews_encoded": len(published)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--pairs", type=int, default=10)
    args = ap.parse_args()
    pairs = 3 if args.quick else args.pairs
    work = Path(tempfile.mkdtemp(prefix="diffusionapi-bench-previews-"))
    models = work / "models"
    install_bench_model(models / "bench-sd15")
    (work / "loras").mkdir()
    svc = Service(work / "svc", models, work / "loras", args.device, DEFAULT_MODEL="bench-sd15")
    req = dict(REQ, steps=args.steps, width=args.size, height=args.size)
    with_previews = {"preview": {"every": 1, "method": "approx"}}
    plain, previewed, ratios = [], [], []
    try:
        svc.job(poll_hz=5, **req)  # load the model once
        for i in range(pairs):
            times = {}
            # ABBA: a pair's order alternates, so a trend on the machine hits both sides alike.
            for name, extra in ([("plain", {}), ("preview", with_previews)][:: 1 if i % 2 == 0 else -1]):
                body = svc.job(poll_hz=5, **req, seed=i, **extra)
                times[name] = body["generation_time_sec"] - body["load_time_sec"]
            plain.append(times["plain"])
            previewed.append(times["preview"])
            ratios.append(times["preview"] / times["plain"])
    finally:
        svc.close()
    cost = preview_cpu_cost(args.device, args.size)
    mp = statistics.median(plain)
    q = statistics.quantiles(plain, n=4) if len(plain) >= 2 else [mp, mp, mp]
    accounting = args.steps * cost["cpu_total_ms"] / 1000 / mp
    print(f"device {args.device}, {args.size}x{args.size}, {args.steps} steps, {pairs} pairs (worker time per job)")
    print(f"  no previews:              median {mp:.3f} s  {[round(x, 3) for x in plain]}")
    print(f"  approx preview each step: median {statistics.median(previewed):.3f} s  "
          f"{[round(x, 3) for x in previewed]}")
    print(f"  per-pair ratio (preview / plain): median {statistics.median(ratios):.3f}  "
          f"{[round(r, 3) for r in ratios]}  (target <= 1.03)")
    print(f"  noise floor: plain jobs alone spread {q[0] / mp:.3f} .. {q[2] / mp:.3f} of their median (IQR)")
    print(f"  one preview: {cost['sampler_side_ms']} ms in the sampler's thread, {cost['cpu_total_ms']} ms CPU in all "
          f"(encoded {cost['previews_encoded']} of 300)")
    print(f"  accounting: {args.steps} previews x {cost['cpu_total_ms']} ms / {mp:.3f} s per job = "
          f"{100 * accounting:.2f} % of a job (upper bound on a CPU box)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
