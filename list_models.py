#!/usr/bin/env python3
"""List installed models as 'Label -> name' (the seed's `python list_models.py`; `--json` for machines).

Runs with any python3: without the project's packages it re-runs itself with .venv's python.
"""
import os
import sys
from pathlib import Path

try:
    from diffusionapi.cli import list_models_main
except ImportError:
    venv_python = Path(__file__).resolve().parent / ".venv" / "bin" / "python"
    if venv_python.exists() and Path(sys.executable).resolve() != venv_python.resolve():
        os.execv(str(venv_python), [str(venv_python), __file__, *sys.argv[1:]])
    sys.exit("list_models.py: the project is not installed; run ./init.sh (or ./test.sh) once to set it up")

if __name__ == "__main__":
    sys.exit(list_models_main())
