#!/usr/bin/env bash
# Creates <repo>/.venv and installs the pinned Python dependencies of python-indexer/ and
# debezium/ (the local CDC runner). Idempotent: re-runs pip only when a requirements file
# changed.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV="$REPO/.venv"
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
reqs=()
files=()
for f in python-indexer/requirements.txt python-indexer/requirements-dev.txt debezium/requirements.txt tests/deploy/requirements.txt; do
  if [ -f "$REPO/$f" ]; then
    reqs+=(-r "$REPO/$f")
    files+=("$REPO/$f")
  fi
done
[ ${#files[@]} -gt 0 ] || exit 0
stamp="$VENV/.requirements.sha256"
sum=$(cat "${files[@]}" | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$sum" ]; then
  echo "setup-python: dependencies up to date"
  exit 0
fi
echo "setup-python: installing ${reqs[*]}"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${reqs[@]}"
echo "$sum" > "$stamp"
