"""Command-line helpers: list_models.py and the checks init.sh runs before starting."""
from __future__ import annotations

import argparse
import json
import socket
import sys
from pathlib import Path

from .vocabulary import FAMILY_LABELS


def list_models_main(argv: list[str] | None = None) -> int:
    from .config import get_settings
    from .registry import Registry

    s = get_settings()
    ap = argparse.ArgumentParser(prog="list_models.py", description="List installed models as 'Label -> name'.")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    ap.add_argument("--models-dir", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.models_dir is not None:
        s = s.model_copy(update={"models_dir": args.models_dir})
    models = Registry(s).models()
    rows = [{"name": m.name, "label": m.label, "family": m.family, "format": m.format, "path": str(m.path)}
            for m in models]
    if args.json:
        print(json.dumps({"models_dir": str(s.models_dir), "models": rows}, indent=2))
        return 0
    if not rows:
        where = Path(s.models_dir)
        state = "does not exist" if not where.exists() else "holds no models"
        print(f"No models installed: {where} {state}. Put diffusers folders, hub-cache folders "
              f"(models--org--name) or .safetensors checkpoints there, or run: python -m diffusionapi.demo")
        return 0
    for r in rows:
        print(f"{r['label']} -> {r['name']}  [{FAMILY_LABELS.get(r['family'], r['family'])}, {r['format']}]  {r['path']}")
    return 0


def _ensure_model() -> int:
    from .config import get_settings
    from .demo import DEMO_MODEL_NAME, install_demo
    from .registry import Registry

    s = get_settings()
    if Registry(s).models():
        return 0
    print(f"No model installed in {s.models_dir}: installing the tiny demo model {DEMO_MODEL_NAME!r} "
          "(random weights: it makes noise images; see README to add real checkpoints)")
    install_demo(Path(s.models_dir))
    return 0


def _check_port(host: str, port: str) -> int:
    try:
        p = int(port)
    except ValueError:
        print(f"init.sh: PORT must be a number, got {port!r}", file=sys.stderr)
        return 1
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, p))
        except OSError as e:
            print(f"init.sh: cannot listen on {host}:{p}: {e.strerror or e} (is another server running? set PORT)",
                  file=sys.stderr)
            return 1
    return 0


def _check_exposure(host: str) -> int:
    """init.sh: refuse to listen beyond loopback when nobody needs credentials (a GPU service open
    to a network runs anyone's jobs), unless DIFFUSIONAPI_ALLOW_UNAUTHENTICATED says so. Also
    reads the settings once, so an empty secret fails here with its message."""
    import ipaddress

    from pydantic import ValidationError

    from .config import Settings

    try:
        s = Settings()
    except ValidationError as e:
        for err in e.errors():
            print(f"init.sh: {str(err.get('msg', err)).removeprefix('Value error, ')}", file=sys.stderr)
        return 1
    if s.api_key or s.api_auth or s.api_keys_file or s.allow_unauthenticated:
        return 0
    try:
        loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if loopback:
        return 0
    print(f"init.sh: refusing to listen on {host} without credentials: set DIFFUSIONAPI_API_KEY (or "
          "DIFFUSIONAPI_API_AUTH, DIFFUSIONAPI_API_KEYS_FILE), or DIFFUSIONAPI_ALLOW_UNAUTHENTICATED=true "
          "to serve the network openly, "
          "or HOST=127.0.0.1", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = argv.pop(0) if argv else ""
    if cmd == "ensure-model":
        return _ensure_model()
    if cmd == "check-port":
        return _check_port(*argv)
    if cmd == "check-exposure":
        return _check_exposure(*argv)
    if cmd == "list-models":
        return list_models_main(argv)
    print("usage: python -m diffusionapi.cli {ensure-model|check-port HOST PORT|check-exposure HOST|list-models [--json]}",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
