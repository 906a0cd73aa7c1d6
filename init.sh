#!/usr/bin/env bash
# Sets up on first use, then serves DiffusionAPI with uvicorn.
#   HOST (default 127.0.0.1: this machine only), PORT (default 7866); extra arguments go to uvicorn.
#   Listening beyond loopback (HOST=0.0.0.0) needs DIFFUSIONAPI_API_KEY or DIFFUSIONAPI_API_AUTH,
#   or DIFFUSIONAPI_ALLOW_UNAUTHENTICATED=true (docs/security.md).
#   HTTPS when SSL_CERTFILE and SSL_KEYFILE (default ssl/cert.pem, ssl/key.pem) both exist.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup.sh
HOST="${HOST:-127.0.0.1}"
PORT="${PORT:-7866}"
SSL_CERTFILE="${SSL_CERTFILE-ssl/cert.pem}"  # set empty to force HTTP
SSL_KEYFILE="${SSL_KEYFILE-ssl/key.pem}"
py=.venv/bin/python

"$py" -m diffusionapi.cli check-exposure "$HOST" || exit 1
"$py" -m diffusionapi.cli check-port "$HOST" "$PORT" || exit 1
"$py" -m diffusionapi.cli ensure-model || exit 1

tls=()
scheme=http
# HTTPS when asked for (REQUIRE_TLS, set by init_https.sh) or when the certificate files exist.
if [ -n "${REQUIRE_TLS:-}" ] || { [ -n "$SSL_CERTFILE$SSL_KEYFILE" ] && { [ -e "$SSL_CERTFILE" ] || [ -e "$SSL_KEYFILE" ]; }; }; then
  for f in "$SSL_CERTFILE" "$SSL_KEYFILE"; do
    if [ -z "$f" ] || [ ! -e "$f" ]; then echo "init.sh: HTTPS needs both SSL_CERTFILE and SSL_KEYFILE; missing: ${f:-(unset)}" >&2; exit 1; fi
    if [ ! -r "$f" ]; then echo "init.sh: cannot read $f" >&2; exit 1; fi
  done
  tls=(--ssl-certfile "$SSL_CERTFILE" --ssl-keyfile "$SSL_KEYFILE")
  scheme=https
fi
shown_host="$HOST"; [ "$HOST" = "0.0.0.0" ] && shown_host=localhost
echo "DiffusionAPI serving at $scheme://$shown_host:$PORT"
# The connection guard: header/body deadlines and connection caps (security/connguard.py).
exec .venv/bin/uvicorn diffusionapi.main:app --host "$HOST" --port "$PORT" \
  --http diffusionapi.security.connguard:GuardedAuto "${tls[@]}" "$@"
