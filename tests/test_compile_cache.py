"""Fast mode's compile cache on disk (engine/fastmode.use_compile_cache): two fresh processes
compile the same UNet with the same cache dir; the second compiles nothing (inductor's FX graph
cache: all hits, no miss, counted by torch in each process); a second batch size adds no graph
(the batch dimension is dynamic). benchmarks/compile_probe.py is the process; a micro UNet keeps
the CPU compile to about a minute."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.processes]

ROOT = Path(__file__).resolve().parents[1]


def _probe(cache_dir: Path) -> dict:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_probe.py"), "--cache-dir",
                           str(cache_dir), "--tiny", "--device", "cpu", "--batches", "2,4"],
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_second_process_compiles_nothing_and_batch_sizes_share_a_graph(tmp_path):
    cache = tmp_path / "compile-cache"
    cold = _probe(cache)
    assert cold["fxgraph_cache_miss"] >= 1 and cold["fxgraph_cache_hit"] == 0, cold
    assert [r["graphs_so_far"] for r in cold["runs"]] == [1, 1], cold  # batch 4 reused batch 2's graph
    assert any((cache / f"torch-{cold['torch']}").rglob("*")), "nothing was written to the cache dir"
    warm = _probe(cache)
    assert warm["fxgraph_cache_miss"] == 0, warm  # the restart compiled nothing
    assert warm["fxgraph_cache_hit"] == cold["fxgraph_cache_miss"], (cold, warm)
    assert warm["graphs"] == 1


def test_compile_cache_dir_setting(tmp_path):
    from diffusionapi.config import Settings
    from diffusionapi.engine.fastmode import FastMode, compile_cache_root

    s = Settings(models_dir=tmp_path / "sd" / "models")
    assert compile_cache_root(s) == tmp_path / "sd" / "compile-cache"
    assert FastMode.from_settings(s).compile_cache_dir == str(tmp_path / "sd" / "compile-cache")
    s2 = Settings(models_dir=tmp_path / "m", compile_cache_dir=tmp_path / "cc")
    assert FastMode.from_settings(s2).compile_cache_dir == str(tmp_path / "cc")
