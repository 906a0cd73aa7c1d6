#!/usr/bin/env bash
# Refreshes constraints.txt: the exact set of packages the test suite ran with.
#   scripts/lock.sh          # fresh venv in a temp dir, newest versions pyproject.toml allows, then freeze
# Then run ./test.sh (it reinstalls .venv from the new constraints) and commit constraints.txt
# only if the suite is green. The package's own ranges in pyproject.toml stay loose.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"${PYTHON:-python3}" -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install -q --upgrade pip
"$tmp/venv/bin/python" -m pip install -q "$root[dev]"
{
  echo "# The tested set of packages (scripts/lock.sh writes this; ./init.sh and ./test.sh install with it)."
  "$tmp/venv/bin/python" -m pip freeze --exclude-editable | grep -v -i '^diffusionapi[= @]'
} > "$root/constraints.txt"
echo "wrote $root/constraints.txt ($(grep -vc '^#' "$root/constraints.txt") packages)"
