#!/usr/bin/env bash
# The whole test suite, on a fresh machine of our kind: installs what it needs, then runs the
# Rust tests (unit + integration against the real RabbitMQ/PostgreSQL) and the python-indexer
# tests. This is the command README.md gives and .ci/run calls.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"

scripts/ensure-services.sh
scripts/setup-models.sh
scripts/setup-python.sh

export PATH="$REPO/.venv/bin:$PATH"
echo "== cargo fmt / clippy"
cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --locked -- --test-threads="${CDC_TEST_THREADS:-2}"
if [ -d python-indexer/tests ]; then
  echo "== python-indexer tests"
  "$REPO/.venv/bin/python" -m pytest -q python-indexer/tests
fi
echo "== all tests passed"
