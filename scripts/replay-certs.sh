#!/usr/bin/env bash
# Makes the replay listener's mutual-TLS files in DIR (created if missing), with openssl:
#   ca.crt, ca.key          a CA that signs both sides (keep ca.key offline in production)
#   control.crt, control.key control's server certificate (SAN DNS:mcp-affinity-control,
#                           IP:127.0.0.1): control --replay-tls-cert/--replay-tls-key
#   envoy.crt, envoy.key    Envoy's client certificate (CN envoy, clientAuth): the
#                           mcp_service cluster's transport_socket_matches for the replay
#                           endpoint; control --replay-client-ca ca.crt accepts it.
# Usage: scripts/replay-certs.sh DIR [DAYS]   (DAYS: validity, default 30)
set -euo pipefail
dir=${1:?usage: scripts/replay-certs.sh DIR [DAYS]}
days=${2:-30}
command -v openssl >/dev/null || { echo "replay-certs.sh: openssl is needed (Debian package openssl)" >&2; exit 1; }
mkdir -p "$dir"
cd "$dir"
umask 077
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.crt -days "$days" \
  -subj "/CN=mcp-affinity replay CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
leaf() { # name subject extensions
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$1.key" -out "$1.csr" -subj "$2" 2>/dev/null
  printf '%s\n' "$3" >"$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -out "$1.crt" -days "$days" -extfile "$1.ext" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}
leaf control "/CN=mcp-affinity-control" \
  "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=DNS:mcp-affinity-control,IP:127.0.0.1"
leaf envoy "/CN=envoy" \
  "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth"
rm -f ca.srl
chmod 644 ./*.crt
