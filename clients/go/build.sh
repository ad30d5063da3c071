#!/usr/bin/env bash
# Build the Go programs of clients/go offline, against Debian's Go packages (golang-go,
# golang-google-grpc-dev, golang-google-protobuf-dev, golang-google-genproto-dev: see
# scripts/install-polyglot-deps.sh). GOPATH mode: Debian installs the sources under
# /usr/share/gocode/src, and a temporary GOPATH maps the import path of the generated code,
# github.com/kv/kv/gen/go (the go_package of proto/kv/v1/kv.proto), onto this directory.
#
#   clients/go/build.sh OUTPUT_DIR     # vet, then build OUTPUT_DIR/kv-smoke
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${1:?usage: clients/go/build.sh OUTPUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)

command -v go >/dev/null || { echo "clients/go/build.sh: no go; run scripts/install-polyglot-deps.sh" >&2; exit 1; }
gopath=$(mktemp -d)
trap 'rm -rf "$gopath"' EXIT
mkdir -p "$gopath/src/github.com/kv/kv/gen"
ln -s "$here" "$gopath/src/github.com/kv/kv/gen/go"

export GO111MODULE=off GOFLAGS= GOPROXY=off GOTOOLCHAIN=local
export GOPATH="$gopath:/usr/share/gocode"
export GOCACHE=${GOCACHE:-$root/build/go-cache}
cd "$gopath/src/github.com/kv/kv/gen/go"
unformatted=$(gofmt -l cmd)
if [[ -n "$unformatted" ]]; then
  echo "clients/go/build.sh: not gofmt-formatted: $unformatted" >&2
  exit 1
fi
go vet ./cmd/... ./kv/...
go build -o "$out/kv-smoke" ./cmd/kv-smoke
