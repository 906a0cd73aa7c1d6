#!/usr/bin/env python3
"""List installed models as 'Label -> name' (run with the project's venv: .venv/bin/python list_models.py)."""
import sys

from diffusionapi.cli import list_models_main

if __name__ == "__main__":
    sys.exit(list_models_main())
