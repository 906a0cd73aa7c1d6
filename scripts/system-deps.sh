#!/usr/bin/env bash
# Installs the Debian packages the test suite runs for real (brokers, a browser, Prometheus), only those
# that are missing. Called by scripts/setup.sh for ./test.sh; needs root (or sudo) and apt-get
# only when one is missing.
# One line per package: the package, a file whose presence means it is installed, and "quick"
# when the fast tier (./test.sh --quick, which passes --quick here) needs it too.
set -euo pipefail
quick="${1:-}"
missing=()
while read -r package path tier; do
  [ "$quick" = "--quick" ] && [ "$tier" != "quick" ] && continue
  [ -n "$package" ] && [ ! -e "$path" ] && missing+=("$package")
done <<'LIST'
rabbitmq-server /usr/sbin/rabbitmq-server
redis-server /usr/bin/redis-server
chromium /usr/bin/chromium
prometheus /usr/bin/prometheus
curl /usr/bin/curl quick
jq /usr/bin/jq quick
openssl /usr/bin/openssl
LIST
[ ${#missing[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null; then
  echo "system-deps: please install ${missing[*]} (not a Debian system; the tests that need them will fail)" >&2
  exit 0
fi
sudo=()
[ "$(id -u)" -eq 0 ] || sudo=(sudo)
echo "system-deps: installing ${missing[*]}" >&2
"${sudo[@]}" apt-get update -qq >&2
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
