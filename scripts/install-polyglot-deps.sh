#!/usr/bin/env bash
# Install what the TypeScript and Go clients need to build, generate and test (tests/polyglot/),
# on a fresh Debian bookworm machine. Idempotent and quiet: it does nothing when everything is
# there, and prints one line per thing it installs.
#
#   Debian packages (apt-get, as root or through sudo), only those missing:
#     golang-go                            Go 1.19, builds clients/go offline (GOPATH mode)
#     golang-google-grpc-dev               grpc-go 1.33, sources under /usr/share/gocode
#     golang-google-protobuf-dev           google.golang.org/protobuf 1.28
#     golang-github-golang-protobuf-1-5-dev  github.com/golang/protobuf 1.5 (grpc-go's codec; the
#                                          1.3 alternative cannot decode APIv2 messages)
#     golang-google-genproto-dev           google.golang.org/genproto (google/api annotations)
#     protoc-gen-go, protoc-gen-go-grpc    the Go protoc plugins (scripts/generate_polyglot.py)
#   npm packages: `npm ci` in clients/typescript when node_modules is missing or older than
#     package-lock.json (exact versions, integrity-checked).
#
#   scripts/install-polyglot-deps.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

debs=(
  golang-go
  golang-google-grpc-dev
  golang-google-protobuf-dev
  golang-github-golang-protobuf-1-5-dev
  golang-google-genproto-dev
  protoc-gen-go
  protoc-gen-go-grpc
)

missing=()
for deb in "${debs[@]}"; do
  if [[ "$(dpkg-query -W -f='${db:Status-Status}' "$deb" 2>/dev/null)" != installed ]]; then
    missing+=("$deb")
  fi
done
if ((${#missing[@]})); then
  if ! command -v apt-get >/dev/null; then
    echo "install-polyglot-deps: apt-get not found; install these Debian packages: ${missing[*]}" >&2
    exit 1
  fi
  sudo=()
  if ((EUID != 0)); then
    command -v sudo >/dev/null || { echo "install-polyglot-deps: need root or sudo for apt-get" >&2; exit 1; }
    sudo=(sudo)
  fi
  echo "install-polyglot-deps: apt-get install ${missing[*]}"
  log=$(mktemp)
  trap 'rm -f "$log"' EXIT
  if ! { "${sudo[@]}" apt-get update -qq &&
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${missing[@]}"; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "install-polyglot-deps: apt-get failed" >&2
    exit 1
  fi
fi

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "install-polyglot-deps: node and npm (Node.js >= 20) are needed for clients/typescript" >&2
  exit 1
fi
node_major=$(node -p 'process.versions.node.split(".")[0]')
if ((node_major < 20)); then
  echo "install-polyglot-deps: Node.js >= 20 is needed, found $(node --version)" >&2
  exit 1
fi

ts=clients/typescript
if [[ ! -f $ts/node_modules/.package-lock.json || $ts/package-lock.json -nt $ts/node_modules/.package-lock.json ]]; then
  echo "install-polyglot-deps: npm ci in $ts"
  (cd "$ts" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
fi
