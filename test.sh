#!/usr/bin/env bash
# Sets up (first run) and runs the test suite. Extra arguments go to pytest.
#   ./test.sh            every test (CI runs exactly this)
#   ./test.sh --quick    the fast tier: no real browser, broker, cluster or server restarts
#                        (deselects the markers listed in tests/conftest.py; docs/testing.md)
set -euo pipefail
cd "$(dirname "$0")"
quick=()
args=()
for a in "$@"; do
  if [ "$a" = "--quick" ]; then quick=(-m "not (browser or broker or processes or slow)"); else args+=("$a"); fi
done
source scripts/setup.sh
if [ ${#quick[@]} -gt 0 ]; then
  bash scripts/system-deps.sh --quick  # only what the fast tier runs (curl, jq)
else
  bash scripts/system-deps.sh  # real brokers and a browser: the Debian packages it lacks
fi
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest -q "${quick[@]}" "${args[@]}"
