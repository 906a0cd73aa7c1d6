#!/usr/bin/env bash
# Chooses how to serve, then starts the server through init.sh:
#   1) HTTP (default)   2) HTTPS, self-signed certificate   3) HTTPS, your certificate and key
# Interactive by default; scripted with --mode http|self-signed|custom [--cert F --key F]
# or the environment HTTPS_MODE, SSL_CERTFILE, SSL_KEYFILE (SSL_DIR: where the self-signed
# pair lives, default ssl/). Other arguments go to uvicorn.
set -euo pipefail
cd "$(dirname "$0")"
mode="${HTTPS_MODE:-}"; cert="${SSL_CERTFILE:-}"; key="${SSL_KEYFILE:-}"
rest=()
while [ $# -gt 0 ]; do
  case "$1" in
    --mode) mode="$2"; shift ;;
    --cert) cert="$2"; shift ;;
    --key) key="$2"; shift ;;
    *) rest+=("$1") ;;
  esac
  shift
done
fail() { echo "init_https.sh: $*" >&2; exit 1; }

if [ -z "$mode" ]; then
  echo "How should DiffusionAPI serve?"
  echo "  1) HTTP (default)"
  echo "  2) HTTPS with a self-signed certificate"
  echo "  3) HTTPS with your own certificate and key"
  read -r -p "Choice [1]: " choice || choice=""
  case "${choice:-1}" in
    1) mode=http ;; 2) mode=self-signed ;; 3) mode=custom ;;
    *) fail "unknown choice '$choice' (1, 2 or 3)" ;;
  esac
fi

case "$mode" in
  http|1)
    export SSL_CERTFILE="" SSL_KEYFILE="" ;;
  self-signed|2)
    command -v openssl >/dev/null 2>&1 || fail "openssl not found; install it or choose HTTP"
    ssl_dir="${SSL_DIR:-ssl}"
    if [ ! -e "$ssl_dir/cert.pem" ] || [ ! -e "$ssl_dir/key.pem" ]; then
      ./generate_ssl_certs.sh --force --dir "$ssl_dir"
    fi
    export SSL_CERTFILE="$ssl_dir/cert.pem" SSL_KEYFILE="$ssl_dir/key.pem" REQUIRE_TLS=1 ;;
  custom|3)
    command -v openssl >/dev/null 2>&1 || fail "openssl not found; it is needed to check the certificate"
    [ -n "$cert" ] || read -r -p "Certificate file (PEM): " cert || true
    [ -n "$key" ] || read -r -p "Private key file (PEM): " key || true
    [ -n "$cert" ] && [ -n "$key" ] || fail "need both a certificate and a key path"
    for f in "$cert" "$key"; do
      [ -e "$f" ] || fail "$f does not exist"
      [ -r "$f" ] || fail "$f is not readable"
    done
    cert_pub=$(openssl x509 -in "$cert" -noout -pubkey 2>/dev/null) || fail "$cert is not a PEM certificate"
    key_pub=$(openssl pkey -in "$key" -pubout 2>/dev/null) || fail "$key is not a PEM private key (or needs a passphrase)"
    [ "$cert_pub" = "$key_pub" ] || fail "$cert and $key do not belong together (public keys differ)"
    export SSL_CERTFILE="$cert" SSL_KEYFILE="$key" REQUIRE_TLS=1 ;;
  *) fail "unknown mode '$mode' (http, self-signed or custom)" ;;
esac
exec ./init.sh "${rest[@]}"
