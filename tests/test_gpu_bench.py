"""benchmarks/gpu.py in its tiny CPU mode: the whole flow runs and reports (correctness, not timing)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def run_tiny_bench(tmp_path, *args: str, timeout: float = 900):
    """benchmarks/gpu.py --tiny on the CPU with ``args``, offline: the finished process (it
    succeeded) and its JSON report (no errors)."""
    out = tmp_path / "gpu.json"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--tiny", "--device", "cpu",
                           *args, "--out", str(out)],
                          env={**env, "HF_HUB_OFFLINE": "1"}, cwd=tmp_path, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["errors"] == [], r["errors"]
    return proc, r


def assert_flow_rows(r, families: set[str]) -> None:
    """The flow section measured exactly ``families``: bare diffusers and the service each timed,
    their images the same within 3/255."""
    rows = {x["family"]: x for x in r["flow"]}
    assert set(rows) == families
    for x in rows.values():
        assert x["bare_s_per_image"] > 0 and x["service_s_per_image"] > 0 and x["image_max_abs_diff"] <= 3


def test_gpu_benchmark_tiny_cpu_runs_every_section(tmp_path):
    proc, r = run_tiny_bench(tmp_path, "--families", "sd15", "--clients", "3",
                             "--sections", "speed,batch4,attention,options,batching,compile,fast,flow")
    assert r["mode"] == "tiny" and r["machine"]["device"] == "cpu"
    # Built and installed twice: a diffusers folder and a single file, each loaded by the service.
    assert r["build"]["sd15"]["folder_gb"] > 0 and r["build"]["sd15"]["single_file_gb"] > 0
    load = r["load"]["sd15"]
    assert load["service_single_file_s"] > 0 and load["service_folder_s"] > 0 and load["bare_folder_s"] > 0
    # Bare diffusers and the service measured side by side at batch 1 (and bare at batch 4).
    rows = {(x["harness"], x["batch"]) for x in r["speed"]}
    assert {("bare diffusers", 1), ("service", 1), ("bare diffusers", 4)} <= rows
    if r["service_batch_size_field"]:
        assert ("service", 4) in rows
    for x in r["speed"]:
        assert x["s_per_image"] > 0 and x["it_per_s"] > 0
    # Each fast-mode option that exists on CPU measured; the fast-mode service ran its jobs.
    options = [x["option"] for x in r["options"]]
    assert any(o.startswith("baseline") for o in options) and any("fused QKV" in o for o in options)
    assert [x["family"] for x in r["fast_service"]] == ["sd15"]
    # Dynamic batching: every client's job finished on both services.
    b = r["batching"]
    for key in ("max_batch_jobs_1", "max_batch_jobs_3"):
        assert b[key]["ok"] == b[key]["jobs"] == 3, b
    # The table is printed last.
    assert "| sd15 | 64 | 1 |" in proc.stdout and "dynamic batching" in proc.stdout


def test_gpu_benchmark_flow_families_tiny_cpu(tmp_path):
    """The flow section (Flux.1-dev and SD 3.5 at full size on a GPU) on tiny models: bare diffusers
    and the service make the same image, both timed."""
    proc, r = run_tiny_bench(tmp_path, "--families", "", "--flow-families", "flux1,sd3", "--sections", "flow",
                             "--reps", "1")
    assert_flow_rows(r, {"flux1", "sd3"})
    assert "| flux1 | 64 | 4 |" in proc.stdout


def test_gpu_benchmark_round2_sections_tiny_cpu(tmp_path):
    """Issue 29's sections on tiny models: compile cold vs warm (second process: FX cache hits, no
    miss), step caching against uncached (speed-up, PSNR, SSIM) on a UNet and a transformer,
    quantized compute (torchao int8 weight-only on CPU, or "not installed"), and a model switch
    from disk vs from host RAM. Figures are printed, not asserted."""
    proc, r = run_tiny_bench(tmp_path, "--families", "sd15", "--flow-families", "flux1", "--reps", "1",
                             "--sections", "compile_cache,step_cache,quant,host_cache", timeout=1200)
    (cc,) = r["compile_cache"]
    assert cc["cold_fx_miss"] >= 1 and cc["warm_fx_miss"] == 0 and cc["warm_fx_hit"] == cc["cold_fx_miss"]
    assert cc["graphs_batch_2_and_4"] == 1
    methods = {(x["family"], x["method"]) for x in r["step_cache"]}
    assert methods == {("sd15", "deepcache"), ("flux1", "first_block"), ("flux1", "taylorseer")}
    for x in r["step_cache"]:
        assert x["cached_s"] > 0 and x["uncached_s"] > 0 and 0 < x["ssim"] <= 1 and x["psnr_db"] > 20, x
    q = r["quant"]
    if q["status"] == "measured":
        assert {x["mode"] for x in q["rows"]} == {"fp32", "int8 weight-only"}
    else:
        assert "torchao not installed" in q["status"]
    h = r["host_cache"]
    assert h["disk"]["switch_back_load_s"] > 0 and h["host_ram"]["switch_back_load_s"] >= 0
    for text in ("| compile (fast mode), fresh process", "| step cache |", "model switch back"):
        assert text in proc.stdout, text


def test_gpu_benchmark_qwen_image_and_flux2_tiny_cpu(tmp_path):
    """The flow section's Qwen-Image and Flux.2 klein rows (full size on a GPU) on tiny models: bare
    diffusers and the service make the same image, both timed."""
    proc, r = run_tiny_bench(tmp_path, "--families", "", "--flow-families", "qwen-image,flux2", "--sections", "flow",
                             "--reps", "1")
    assert_flow_rows(r, {"qwen-image", "flux2"})
    assert "| qwen-image | 64 | 4 |" in proc.stdout and "| flux2 | 64 | 4 |" in proc.stdout


def test_full_size_qwen_image_and_flux2_builds_have_the_published_sizes():
    """The full-size builders (on the meta device: no memory) make the published architectures:
    Qwen-Image's 20.4B transformer and 8.3B Qwen2.5-VL-7B, Flux.2 klein's 3.9B transformer and
    4.0B Qwen3-4B."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu

    def billions(module):
        return round(sum(p.numel() for p in module.parameters()) / 1e9, 1)

    qwen = gpu.build_full_dit("qwen-image", "meta")
    assert (billions(qwen.transformer), billions(qwen.text_encoder)) == (20.4, 8.3)
    klein = gpu.build_full_dit("flux2", "meta")
    assert (billions(klein.transformer), billions(klein.text_encoder)) == (3.9, 4.0)
