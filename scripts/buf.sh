#!/usr/bin/env bash
# Run the pinned buf from .venv, offline. buf.yaml declares build/googleapis as a local module for
# google/api/*.proto; this fills it from the googleapis-common-protos installed in .venv (the
# copy scripts/generate.py compiles against), again whenever that package's version changes.
#
#   scripts/buf.sh lint
#   scripts/buf.sh build proto -o build/kv.binpb
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
venv=${VENV:-.venv}
out=build/googleapis

shopt -s nullglob
dists=("$venv"/lib/python3*/site-packages/googleapis_common_protos-*.dist-info)
if ((${#dists[@]} != 1)); then
  echo "scripts/buf.sh: googleapis-common-protos is not installed in $venv; run \`make setup\`" >&2
  exit 1
fi
source_stamp=$(basename "${dists[0]}")

if [[ "$(cat "$out/.source" 2>/dev/null)" != "$source_stamp" ]]; then
  mkdir -p build
  tmp=$(mktemp -d build/googleapis.XXXXXX)
  mkdir -p "$tmp/google/api"
  cp "$(dirname "${dists[0]}")"/google/api/*.proto "$tmp/google/api/"
  echo "$source_stamp" >"$tmp/.source"
  rm -rf "$out"
  mv "$tmp" "$out"
fi

exec "$venv/bin/buf" "$@"
