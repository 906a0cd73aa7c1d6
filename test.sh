#!/usr/bin/env bash
# Sets up (first run) and runs the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup.sh
bash scripts/system-deps.sh  # real brokers and a browser: the Debian packages it lacks
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest -q "$@"
