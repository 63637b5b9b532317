#!/usr/bin/env bash
# List, or drop, replication slots of the local CDC cluster. Only INACTIVE slots are dropped
# (an active one belongs to a running connector). Use it to clean up after runners that were
# killed with SIGKILL (a --unique-slot runner drops its slot only on a graceful stop); an
# abandoned slot makes PostgreSQL keep WAL (capped by max_slot_wal_keep_size=1GB here).
#
#   debezium/pg/drop-slots.sh                 # list slots
#   debezium/pg/drop-slots.sh 'e2e_%'         # drop inactive slots whose name is LIKE 'e2e_%'
set -euo pipefail
# shellcheck source=common.sh
. "$(cd "$(dirname "$0")" && pwd)/common.sh"

if [ $# -eq 0 ]; then
  cdc_psql -c "SELECT slot_name, plugin, active, restart_lsn, confirmed_flush_lsn,
                      pg_size_pretty(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)) AS retained_wal
               FROM pg_replication_slots ORDER BY slot_name"
  exit 0
fi
pattern=$1
[[ $pattern =~ ^[a-z0-9_%]+$ ]] || pg_die "pattern may only contain [a-z0-9_%]"
cdc_psql -At -c "SELECT slot_name FROM pg_replication_slots
                 WHERE NOT active AND slot_name LIKE '$pattern'" | while read -r slot; do
  [ -n "$slot" ] || continue
  pg_log "dropping slot $slot"
  cdc_psql -c "SELECT pg_drop_replication_slot('$slot')" >/dev/null
done
