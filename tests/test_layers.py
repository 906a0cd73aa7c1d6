"""The import graph: data flows one way (api -> backends -> runner -> resolve -> engine/registry ->
vocabulary/files), with no circle and no import from a lower layer up to a higher one.

Every import counts, also the ones inside functions (a lazy import is still a dependency).
A new module must be given a layer here: where it sits is a design decision, not an accident.
"""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "diffusionapi"

# Higher numbers may import lower ones. Modules of one package (engine.*, api.*, backends.*)
# may import each other; two different modules on the same level may not.
LAYERS: dict[str, float] = {
    "diffusionapi": 0, "vocabulary": 0, "files": 0, "config": 0, "errors": 0,
    "security": 0.5,  # defences against hostile clients: bodies, addresses, access
    "logs": 0, "metrics": 0, "tracing": 0,  # operating it (#27): leaves every layer may report to
    "jobs.observe": 0.5,  # a job's life as log records, metrics and traces (one call per event)
    "retention": 1,  # outputs and unread results kept within the TTL and the size cap
    "models_install": 4.25,  # POST /models/install's downloads, run by the embedded backend
    # jobs/: the middle of the house, layered inside (a group is the longest name listed here)
    "auth": 0.05,  # who calls: keys file, Caller, the keys CLI (nothing of the jobs)
    "jobs": 0, "jobs.states": 0, "jobs.status": 0.1, "jobs.events": 0.1, "jobs.quotas": 0.2,
    "jobs.webhooks": 1, "jobs.live": 1.5,
    "fileinfo": 1, "images": 1, "imageinput": 1,
    "families": 1.25,  # how each model family is recognised and runs: read by the registry and the engine
    "components": 1.5,  # separate text-encoder / VAE files (kinds read from headers): registry, resolve, engine
    "engine": 2, "registry": 2, "demo": 2,
    "schemas": 3, "limits": 3.1,  # the cost budget: plans and prompts, checked by resolve
    "jobs.views": 3.25,  # views: the GET /queue/{id} answer, built by API nodes and cluster workers
    "jobs.resolve": 3.5, "jobs.record": 3.6,
    "jobs.runner": 4,
    "jobs.backends": 4.5,  # embedded/ and celery/ (Celery workers and their Redis state run jobs through the runner)
    "jobs.service": 4.75,  # the one typed job service every dialect calls
    "api": 5, "openapi": 5, "playground": 5, "main": 6, "cli": 6, "generate": 6,
}


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def _group(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return parts[0]
    for n in range(len(parts) - 1, 0, -1):  # the longest listed name: "jobs.backends" before "jobs"
        name = ".".join(parts[1:n + 1])
        if name in LAYERS:
            return name
    return parts[1]


def _imports(module: str, path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - (node.level - 1)]
                target = ".".join(anchor + ([node.module] if node.module else []))
                names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
            else:
                names = [node.module or ""]
            out.update(n for n in names if n.startswith("diffusionapi"))
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("diffusionapi"))
    return out


def _graph() -> dict[str, set[str]]:
    mods = dict(_modules())
    graph = {}
    for m, p in mods.items():
        deps = set()
        for target in _imports(m, p):
            while target not in mods and "." in target:  # "pkg.mod.name" -> the module "pkg.mod"
                target = target.rsplit(".", 1)[0]
            if target in mods and target != m:
                deps.add(target)
        graph[m] = deps
    return graph


def test_every_module_has_a_layer():
    missing = sorted({_group(m) for m, _ in _modules()} - set(LAYERS))
    assert not missing, f"give these modules a layer in tests/test_layers.py: {missing}"


def test_no_import_reaches_up_or_sideways():
    bad = []
    for m, deps in _graph().items():
        for d in deps:
            gm, gd = _group(m), _group(d)
            if gd == "diffusionapi":  # the package itself: __version__
                continue
            if gm == gd:
                continue
            if not LAYERS[gd] < LAYERS[gm]:
                bad.append(f"{m} (layer {LAYERS[gm]}) imports {d} (layer {LAYERS[gd]})")
    assert not bad, "\n".join(bad)


def test_no_import_circle():
    graph = _graph()
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(m, stack):
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycle.extend(stack[stack.index(d):] + [d])
                return True
            if state.get(d) is None and visit(d, stack + [d]):
                return True
        state[m] = 2
        return False

    for m in sorted(graph):
        if state.get(m) is None and visit(m, [m]):
            break
    assert not cycle, " -> ".join(cycle)


def test_an_api_node_does_not_load_torch(tmp_path):
    """A cluster API node validates and queues; it never generates. Loading torch there costs
    ~700 MB per node and, with its half a million objects, garbage-collection pauses of up to a
    second in the middle of requests (seen as the submit p99 of benchmarks/scale.py)."""
    import os
    import subprocess
    import sys

    code = """
import sys
from fastapi.testclient import TestClient
from diffusionapi.main import create_app
from diffusionapi.jobs.resolve import resolve_txt2img
from diffusionapi.registry import Registry
from diffusionapi.schemas import Txt2ImgRequest
import diffusionapi.jobs.backends.celery.backend, diffusionapi.jobs.backends.celery.catalog, diffusionapi.api.sdapi.routes
app = create_app()
app.openapi()
try:
    resolve_txt2img(Txt2ImgRequest(prompt="a (cat:1.2)", preview={"every": 1, "method": "approx"}),
                    Registry(app.state.settings), app.state.settings)
except Exception:
    pass  # no model installed here: only the imports on the way matter
loaded = sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules)
print(loaded)
sys.exit(1 if loaded else 0)
"""
    env = {**os.environ, "DIFFUSIONAPI_BACKEND": "celery", "DIFFUSIONAPI_BROKER_URL": "amqp://127.0.0.1:1//",
           "DIFFUSIONAPI_REDIS_URL": "redis://127.0.0.1:1/0", "DIFFUSIONAPI_MODELS_DIR": str(tmp_path / "models"),
           "DIFFUSIONAPI_QUEUE_DIR": str(tmp_path / "queue"), "DIFFUSIONAPI_OUTPUTS_DIR": str(tmp_path / "out")}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stdout + r.stderr


def test_dialects_call_the_job_service_not_routes():
    """A dialect translates wire types and calls jobs/service.py with typed requests: no route
    lookup, no signature reflection (#23)."""
    import re

    offenders = [f"{p.relative_to(PKG)}:{i}" for p in sorted((PKG / "api").rglob("*.py"))
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if re.search(r"inspect\.signature|app\.routes|get_type_hints", line)]
    assert not offenders, offenders
