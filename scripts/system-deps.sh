#!/usr/bin/env bash
# Installs the Debian packages the tests need, only those that are missing (run by test.sh).
# One line per package: the package, and a file whose presence means it is installed.
set -euo pipefail
missing=()
while read -r package path; do
  [ -n "$package" ] && [ ! -e "$path" ] && missing+=("$package")
done <<'LIST'
chromium /usr/bin/chromium
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
