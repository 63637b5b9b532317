#!/usr/bin/env bash
# The whole thing on one machine, in one command: installs what is needed (model files, ONNX
# Runtime, Python deps, a logical-decoding PostgreSQL on 54329), builds the daemon, starts it on
# the embedded index, and runs the real Debezium engine against the example `products` table.
# Edit a row in PostgreSQL and `search` reflects it within seconds. Ctrl-C stops everything.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"

scripts/ensure-services.sh
scripts/setup-models.sh
scripts/setup-python.sh
echo "quickstart: building cdc-indexer (first build takes ~10 min on 2 cores)"
cargo build --locked --quiet
BIN="${CARGO_TARGET_DIR:-$REPO/target}/debug/cdc-indexer"

export CDC_INDEXER_AMQP_PASSWORD=${CDC_INDEXER_AMQP_PASSWORD:-guest}
mkdir -p .data
pids=()
cleanup() {
  trap - INT TERM EXIT
  echo "quickstart: stopping"
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup INT TERM EXIT

# /search is off by default (it returns row payloads); the quickstart turns it on, on loopback,
# so that `cdc-indexer search` can ask the daemon, which owns the embedded index.
export CDC_INDEXER__HTTP__SEARCH_LISTEN=127.0.0.1:9188
"$BIN" --config config.toml run 2> .data/cdc-indexer.log &
pids+=($!)
for _ in $(seq 1 120); do
  curl -fs http://127.0.0.1:9187/readyz >/dev/null 2>&1 && break
  kill -0 "${pids[0]}" 2>/dev/null || { tail -20 .data/cdc-indexer.log; exit 1; }
  sleep 1
done
echo "quickstart: cdc-indexer ready (log: .data/cdc-indexer.log, metrics: http://127.0.0.1:9187/metrics)"

debezium/run-local.sh 2> .data/debezium.log &
pids+=($!)
echo "quickstart: Debezium starting (log: .data/debezium.log); the snapshot of public.products follows"
cat <<MSG

Try, in another shell:
  export CDC_INDEXER__HTTP__SEARCH_LISTEN=127.0.0.1:9188   # the daemon's search port
  $BIN search "warm jacket for winter hiking"
  debezium/pg/psql.sh -c "UPDATE products SET description = 'A tent for four people' WHERE id = 1"
  $BIN search "tent for four people" --limit 3
  $BIN dlq stats

Ctrl-C stops the daemon and Debezium.
MSG
wait -n "${pids[@]}"
