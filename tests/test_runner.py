"""The job runner shared by both backends' workers."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_engine_creation_freezes_the_imports_once():
    """After the engine is made (torch and diffusers imported), the objects alive then are out of
    the collector's reach, so full collections no longer walk them; later objects (pipelines)
    stay collectable, so a second engine or a model load freezes nothing more."""
    code = """
import gc
from diffusionapi.jobs.runner import JobRunner

class Holder:  # a cycle made after the freeze must still be collected
    pass

r = JobRunner(None, None, lambda: object())
before = gc.get_freeze_count()
r.engine
frozen = gc.get_freeze_count()
assert frozen > before, (before, frozen)
JobRunner(None, None, lambda: object()).engine
assert gc.get_freeze_count() == frozen, "froze twice"
a = Holder(); a.me = a
del a
assert gc.collect() > 0
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr
