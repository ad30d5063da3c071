#!/usr/bin/env bash
# Install the benchmark's external tools (Debian packages), only those missing.
#   etcd-server  -> etcd      (the reference server, 3.4 on Debian bookworm)
#   etcd-client  -> etcdctl
#   nghttp2-client -> h2load  (the gRPC unary load generator)
#   wrk          -> wrk       (HTTP/1.1 load generator, for REST comparisons)
# and, when the venv exists (VENV, default .venv), bench/requirements.txt into it (matplotlib
# for the plot, py-spy for --profile), pinned.
# Idempotent: running it again when everything is present does nothing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV="${VENV:-.venv}"
if [ -x "$VENV/bin/python" ]; then
  if ! "$VENV/bin/python" -c 'import matplotlib' 2>/dev/null || [ ! -x "$VENV/bin/py-spy" ]; then
    echo "bench deps: installing bench/requirements.txt into $VENV"
    "$VENV/bin/python" -m pip install --quiet -c constraints.txt -r bench/requirements.txt
  fi
fi

declare -A BINARY_OF=(
  [etcd-server]=etcd
  [etcd-client]=etcdctl
  [nghttp2-client]=h2load
  [wrk]=wrk
)

missing=()
for pkg in etcd-server etcd-client nghttp2-client wrk; do
  if ! command -v "${BINARY_OF[$pkg]}" >/dev/null 2>&1 \
      && ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$pkg")
  fi
done

if [ "${#missing[@]}" -eq 0 ]; then
  echo "bench deps: all present (etcd, etcdctl, h2load, wrk; matplotlib and py-spy in $VENV)"
  exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
  SUDO=()
elif command -v sudo >/dev/null 2>&1; then
  SUDO=(sudo)
else
  echo "bench deps: missing ${missing[*]}; installing them needs root." >&2
  echo "Run as root: apt-get update && apt-get install -y ${missing[*]}" >&2
  exit 1
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "bench deps: apt-get not found; install ${missing[*]} with your package manager." >&2
  exit 1
fi

echo "bench deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
