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
# promtool (Debian package `prometheus`) checks the live /metrics and the alert rules.
if ! command -v promtool >/dev/null; then
  echo "== installing promtool (Debian package prometheus)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null \
    || echo "warning: promtool could not be installed; its checks will report SKIPPED"
fi

export PATH="$REPO/.venv/bin:$PATH"
echo "== cargo fmt / clippy"
cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --locked -- --test-threads="${CDC_TEST_THREADS:-2}"
if [ -n "${QDRANT_URL:-}" ]; then
  echo "== qdrant sink conformance against $QDRANT_URL"
  cargo test --locked --test sink_conformance -- --ignored qdrant_sink_conforms
else
  echo "== qdrant sink conformance: SKIPPED (set QDRANT_URL to a Qdrant server to run it)"
fi
echo "== python tests (python-indexer service, deploy manifests)"
py_tests=(python-indexer/tests)
[ -d tests/deploy ] && py_tests+=(tests/deploy)
"$REPO/.venv/bin/python" -m pytest -q "${py_tests[@]}"
echo "== fuzz smoke (the decoder, ${CDC_FUZZ_SECONDS:-30} s)"
fuzz_log=$(mktemp)
if ! scripts/fuzz.sh "${CDC_FUZZ_SECONDS:-30}" > "$fuzz_log" 2>&1; then
  tail -40 "$fuzz_log"
  echo "fuzz smoke FAILED (log above)"
  exit 1
fi
grep -E "^Done|stat::number_of_executed_units" "$fuzz_log" || true
rm -f "$fuzz_log"
echo "== all tests passed"
