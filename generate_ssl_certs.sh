#!/usr/bin/env bash
# Creates a self-signed certificate and key for HTTPS (localhost and 127.0.0.1).
#   ./generate_ssl_certs.sh [--force] [--dir DIR] [--days N]     (default: ssl/, 365 days)
set -euo pipefail
cd "$(dirname "$0")"
dir="${SSL_DIR:-ssl}"; days=365; force=0
while [ $# -gt 0 ]; do
  case "$1" in
    --force) force=1 ;;
    --dir) dir="$2"; shift ;;
    --days) days="$2"; shift ;;
    -h|--help) sed -n 2,3p "$0"; exit 0 ;;
    *) echo "generate_ssl_certs.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
if ! command -v openssl >/dev/null 2>&1; then
  echo "generate_ssl_certs.sh: openssl not found; install it (e.g. apt-get install openssl)" >&2; exit 1
fi
cert="$dir/cert.pem"; key="$dir/key.pem"
if [ $force -eq 0 ] && { [ -e "$cert" ] || [ -e "$key" ]; }; then
  echo "generate_ssl_certs.sh: $cert or $key already exists; use --force to replace them" >&2; exit 1
fi
mkdir -p "$dir"
umask 077
if ! err=$(openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days "$days" \
      -keyout "$key.tmp" -out "$cert.tmp" -subj "/CN=localhost" \
      -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" 2>&1); then
  rm -f "$key.tmp" "$cert.tmp"
  echo "generate_ssl_certs.sh: openssl failed: $(echo "$err" | tail -n 1)" >&2; exit 1
fi
chmod 600 "$key.tmp"; chmod 644 "$cert.tmp"
mv -f "$key.tmp" "$key"; mv -f "$cert.tmp" "$cert"
echo "wrote certificate $cert and private key $key (mode 600), valid $days days for localhost, 127.0.0.1"
