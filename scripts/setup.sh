#!/usr/bin/env bash
# Creates .venv and installs the project on first use (and again when pyproject.toml or
# constraints.txt change).
# Sourced by init.sh and test.sh; PYTHON picks the interpreter (default python3).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
# Installs use constraints.txt, the tested set of versions (scripts/lock.sh refreshes it).
stamp="$venv/.installed-$(cat "$root/pyproject.toml" "$root/constraints.txt" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  if [ ! -x "$venv/bin/python" ]; then
    echo "setup: creating $venv (first run; torch takes a minute or two)" >&2
    "${PYTHON:-python3}" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip >&2
  fi
  echo "setup: installing diffusionapi and its dependencies" >&2
  "$venv/bin/python" -m pip install -q -c "$root/constraints.txt" -e "$root[dev]" >&2
  rm -f "$venv"/.installed-*
  touch "$stamp"
fi
