"""benchmarks/gpu.py's second-round sections (issue 29), each a side-by-side ratio in one run:

- ``compile_cache``: fast mode's torch.compile in a fresh process with an empty compile cache
  (cold) and again in another fresh process with the cache the first one wrote (warm);
- ``step_cache``: each step-caching method on the service against the same job uncached, same
  seed: speed-up, PSNR and SSIM of the cached image against the uncached one;
- ``quant``: the transformer families' bare pipeline in bf16 against torchao's fp8 (Hopper and
  newer) or int8 weight-only compute, each also compiled; s/image and peak VRAM;
- ``host_cache``: a model switch A -> B -> A with one model on the device: the third job's load
  time from disk (host cache off) against from host RAM (on).

Never fails on a number; a section that errs is recorded by gpu.py's ``Run.section``.
"""
from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def log(msg: str) -> None:
    print(msg, flush=True)

# The method tried on each family's network and its knob (vocabulary.STEP_CACHE_METHODS has the
# defaults; these are the values measured). Tiny models change more per step: a wider threshold.
STEP_CACHE_RUNS = {
    "unet": [{"method": "deepcache", "interval": 3}],
    "transformer": [{"method": "first_block", "threshold": 0.08}, {"method": "taylorseer", "interval": 3}],
}
STEP_CACHE_RUNS_TINY = {
    "unet": [{"method": "deepcache", "interval": 3}],
    "transformer": [{"method": "first_block", "threshold": 0.4}, {"method": "taylorseer", "interval": 2}],
}


# ---------------------------------------------------------------------------- image comparison

def _rgb(b64: str):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.float64)


def psnr(a, b) -> float:
    import numpy as np

    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else round(10 * np.log10(255.0 ** 2 / mse), 2)


def ssim(a, b, win: int = 7) -> float:
    """Mean SSIM over the grey images, uniform ``win`` x ``win`` windows (Wang et al. 2004's constants)."""
    import numpy as np

    x, y = a.mean(axis=2), b.mean(axis=2)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def box(z):
        s = np.cumsum(np.cumsum(np.pad(z, ((1, 0), (1, 0))), 0), 1)
        return (s[win:, win:] - s[:-win, win:] - s[win:, :-win] + s[:-win, :-win]) / (win * win)

    mx, my = box(x), box(y)
    vx, vy, cxy = box(x * x) - mx * mx, box(y * y) - my * my, box(x * y) - mx * my
    m = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return round(float(m.mean()), 4)


# ---------------------------------------------------------------------------- sections

def compile_cache_section(run, work: Path, tiny: bool, device: str, families) -> None:
    """Cold and warm start of fast mode's compile, each in a fresh process (benchmarks/compile_probe.py)."""
    rows = run.results.setdefault("compile_cache", [])
    for fam in (["micro-unet"] if tiny else [f for f in families if f in ("sd15", "sdxl")]):
        cache = work / f"compile-cache-{fam}"
        size = 64 if tiny else (512 if fam == "sd15" else 1024)
        cmd = [sys.executable, str(HERE / "compile_probe.py"), "--cache-dir", str(cache), "--device", device,
               "--batches", "2,4", "--size", str(size)] + (["--tiny"] if tiny else ["--family", fam])
        out = {}
        for phase in ("cold", "warm"):
            t = time.perf_counter()
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
            if p.returncode != 0:
                raise RuntimeError(f"compile probe {phase}: {p.stderr[-1500:]}")
            r = json.loads(p.stdout.strip().splitlines()[-1])
            r["process_s"] = round(time.perf_counter() - t, 1)
            out[phase] = r
        c, w = out["cold"], out["warm"]
        row = {"family": fam, "size": size, "cold_first_call_s": c["runs"][0]["first_call_s"],
               "warm_first_call_s": w["runs"][0]["first_call_s"], "cold_process_s": c["process_s"],
               "warm_process_s": w["process_s"], "cold_fx_miss": c["fxgraph_cache_miss"],
               "warm_fx_hit": w["fxgraph_cache_hit"], "warm_fx_miss": w["fxgraph_cache_miss"],
               "graphs_batch_2_and_4": w["graphs"]}
        rows.append(row)
        log(f"   compile {fam}: cold {row['cold_first_call_s']} s, warm {row['warm_first_call_s']} s "
                f"(fx cache hits {row['warm_fx_hit']}, misses {row['warm_fx_miss']})")


def step_cache_section(run, services_models: list[tuple[str, Path, str]], work: Path, device: str, tiny: bool,
                       jobs: dict, service_cls, request) -> None:
    """``services_models``: (family, models folder, network kind); ``jobs``: family -> (size,
    steps, extra request fields). One service per folder; each family's job uncached, then with
    each method, same seed; 2 timed repetitions each."""
    rows = run.results.setdefault("step_cache", [])
    table = STEP_CACHE_RUNS_TINY if tiny else STEP_CACHE_RUNS
    by_folder: dict[Path, list] = {}
    for fam, folder, kind in services_models:
        by_folder.setdefault(folder, []).append((fam, kind))
    for folder, fams in by_folder.items():
        svc = service_cls(f"stepcache-{folder.name}", work, folder, device, max_batch_jobs=1,
                          default_model=fams[0][0])
        try:
            svc.ready()
            for fam, kind in fams:
                size, steps, extra = jobs[fam]
                req = request(fam, size, steps, 1, 7, **{"fileType": "png", **extra})
                svc.job(**req)  # load + warm-up
                plain = [svc.job(**req) for _ in range(2)]
                plain_s = min(p["wall"] for p in plain)
                ref = _rgb(plain[0]["image"])
                for sc in table[kind]:
                    cached = [svc.job(**req, step_cache=sc) for _ in range(2)]
                    img = _rgb(cached[0]["image"])
                    s = min(c["wall"] for c in cached)
                    knob = "threshold" if "threshold" in sc else "interval"
                    rows.append({"family": fam, "size": size, "steps": steps, "method": sc["method"],
                                 knob: sc[knob], "uncached_s": round(plain_s, 4), "cached_s": round(s, 4),
                                 "speedup": round(plain_s / s, 3), "psnr_db": psnr(img, ref), "ssim": ssim(img, ref)})
                    r = rows[-1]
                    log(f"   step cache {fam} {sc}: x{r['speedup']}, PSNR {r['psnr_db']} dB, SSIM {r['ssim']}")
        finally:
            svc.close()


def quant_section(run, flow_models: Path, families, device: str, tiny: bool, jobs: dict) -> None:
    """Bare diffusers Flux / SD 3 transformer: bf16 (fp32 on CPU) vs torchao fp8 or int8 weight-only."""
    try:
        import torchao
        from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig, Int8WeightOnlyConfig,
                                          quantize_)
    except ImportError:
        run.results["quant"] = {"status": "torchao not installed (pip install torchao==0.18.0 for this section)"}
        log("   quant: torchao not installed")
        return
    import torch
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    cuda = device.startswith("cuda")
    fp8 = cuda and torch.cuda.get_device_capability() >= (8, 9)
    out = {"status": "measured", "torchao": torchao.__version__, "rows": []}
    run.results["quant"] = out
    dtype = torch.bfloat16 if cuda else torch.float32
    for fam in families:
        folder = flow_models / fam
        if not (folder / "model_index.json").exists():
            out["rows"].append({"family": fam, "status": "not built (run the flow section first)"})
            continue
        size, steps, extra = jobs[fam]
        cfg = extra.get("cfg_scale", 1.0)
        cls = FluxPipeline if fam == "flux1" else StableDiffusion3Pipeline
        modes = ["bf16" if cuda else "fp32", "fp8" if fp8 else "int8 weight-only"]
        for mode in modes:
            for compiled in ((False, True) if cuda else (False,)):
                pipe = cls.from_pretrained(str(folder), dtype=dtype, local_files_only=True).to(device)
                pipe.set_progress_bar_config(disable=True)
                if mode == "fp8":
                    quantize_(pipe.transformer, Float8DynamicActivationFloat8WeightConfig())
                elif mode.startswith("int8"):
                    quantize_(pipe.transformer, Int8WeightOnlyConfig())
                if compiled:
                    pipe.transformer = torch.compile(pipe.transformer)
                kw = dict(height=size, width=size, num_inference_steps=steps, guidance_scale=cfg if fam == "sd3" else 3.5,
                          output_type="np")
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                t = time.perf_counter()
                pipe("a lighthouse", generator=torch.Generator("cpu").manual_seed(1), **kw)  # warm-up (compiles)
                first = time.perf_counter() - t
                times = []
                for i in range(2):
                    t = time.perf_counter()
                    pipe("a lighthouse", generator=torch.Generator("cpu").manual_seed(2 + i), **kw)
                    if cuda:
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - t)
                row = {"family": fam, "mode": mode, "compiled": compiled, "s_per_image": round(min(times), 4),
                       "first_call_s": round(first, 2),
                       "peak_vram_mb": round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None}
                out["rows"].append(row)
                log(f"   quant {fam} {mode}{' compiled' if compiled else ''}: {row['s_per_image']} s/image")
                del pipe
                if cuda:
                    torch.cuda.empty_cache()


def host_cache_section(run, work: Path, models: Path, device: str, tiny: bool, service_cls, request,
                       jobs: dict) -> None:
    """sd15 (folder) -> sd15-file (single file) -> sd15 with one model on the device: the third
    job's ``load_time_sec`` with the host cache off (a disk load) and on (a copy from host RAM)."""
    a, b = "sd15", "sd15-file"
    size = jobs["sd15"][0]
    out = {}
    for label, gb in (("disk", 0), ("host_ram", 64)):
        svc = service_cls(f"hostcache-{label}", work, models, device, max_batch_jobs=1, pipeline_cache_size=1,
                          host_cache_gb=gb)
        try:
            svc.ready()
            loads = []
            for model in (a, b, a, b, a):
                loads.append(svc.job(**request(model, size, 2, 1, 1))["load_time_sec"])
            out[label] = {"switch_back_load_s": round(min(loads[2:]), 3), "loads_s": loads}
        finally:
            svc.close()
    out["speedup"] = round(out["disk"]["switch_back_load_s"] / max(out["host_ram"]["switch_back_load_s"], 1e-3), 2)
    run.results["host_cache"] = out
    log(f"   host cache: switch back {out['disk']['switch_back_load_s']} s from disk, "
            f"{out['host_ram']['switch_back_load_s']} s from RAM")


# ---------------------------------------------------------------------------- table

def print_tables(R: dict, log) -> None:
    if R.get("compile_cache"):
        log("\n| compile (fast mode), fresh process | cold: first call s | warm (disk cache): first call s | "
            "cold / warm | warm FX cache hits / misses | graphs for batch 2 and 4 |")
        log("|---|---|---|---|---|---|")
        for r in R["compile_cache"]:
            log(f"| {r['family']} {r['size']} | {r['cold_first_call_s']} | {r['warm_first_call_s']} | "
                f"{r['cold_first_call_s'] / max(r['warm_first_call_s'], 1e-3):.1f}x | {r['warm_fx_hit']} / "
                f"{r['warm_fx_miss']} | {r['graphs_batch_2_and_4']} |")
    if R.get("step_cache"):
        log("\n| step cache | model | size, steps | uncached s | cached s | speed-up | PSNR dB | SSIM |")
        log("|---|---|---|---|---|---|---|---|")
        for r in R["step_cache"]:
            knob = f"threshold {r['threshold']}" if "threshold" in r else f"interval {r['interval']}"
            log(f"| {r['method']} ({knob}) | {r['family']} | {r['size']}, {r['steps']} | {r['uncached_s']} | "
                f"{r['cached_s']} | {r['speedup']}x | {r['psnr_db']} | {r['ssim']} |")
    q = R.get("quant")
    if q:
        if q.get("status") != "measured":
            log(f"\nquantized compute: {q.get('status')}")
        else:
            log(f"\n| quantized compute (torchao {q['torchao']}) | model | s/image | vs unquantized | peak VRAM MB |")
            log("|---|---|---|---|---|")
            base = {r["family"]: r["s_per_image"] for r in q["rows"] if "mode" in r and r["mode"] in ("bf16", "fp32")
                    and not r["compiled"]}
            for r in q["rows"]:
                if "mode" not in r:
                    log(f"| - | {r['family']} | {r['status']} | | |")
                    continue
                b = base.get(r["family"])
                log(f"| {r['mode']}{' + compile' if r['compiled'] else ''} | {r['family']} | {r['s_per_image']} | "
                    f"{(b / r['s_per_image']):.2f}x | {r['peak_vram_mb'] or '-'} |")
    h = R.get("host_cache")
    if h:
        log(f"\nmodel switch back (A -> B -> A, one model on the device): from disk {h['disk']['switch_back_load_s']} s, "
            f"from host RAM {h['host_ram']['switch_back_load_s']} s ({h['speedup']}x)")
