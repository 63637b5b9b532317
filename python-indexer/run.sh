#!/usr/bin/env bash
# Start python-indexer. Honors PYTHON_INDEXER_HOST (default 127.0.0.1) and PYTHON_INDEXER_PORT
# (default 8090); uses $PYTHON, else <repo>/.venv/bin/python, else python3.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x "$HERE/../.venv/bin/python" ]; then PY="$HERE/../.venv/bin/python"; else PY=python3; fi
fi
cd "$HERE"
exec "$PY" -m uvicorn app.main:app \
  --host "${PYTHON_INDEXER_HOST:-127.0.0.1}" --port "${PYTHON_INDEXER_PORT:-8090}" "$@"
