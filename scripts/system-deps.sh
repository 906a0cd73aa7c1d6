#!/usr/bin/env bash
# Debian packages the test suite runs for real (brokers, browsers): installed when missing.
# Called by scripts/setup.sh for ./test.sh; needs root (or sudo) and apt-get only when one is missing.
set -euo pipefail
packages=(
  rabbitmq-server
  redis-server
  chromium  # tests/test_playground.py (headless, through Playwright)
)
missing=()
for p in "${packages[@]}"; do
  command -v "$p" >/dev/null && continue  # e.g. /usr/bin/chromium from elsewhere
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ "${#missing[@]}" -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null; then
  echo "system-deps: missing ${missing[*]} and no apt-get here; install them by hand" >&2
  exit 1
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "system-deps: installing ${missing[*]}" >&2
$sudo apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
