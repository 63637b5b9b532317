#!/usr/bin/env bash
# Stop the local CDC PostgreSQL cluster started by start.sh.
#
#   debezium/pg/stop.sh            # fast shutdown, keep data
#   debezium/pg/stop.sh --destroy  # stop and delete the data directory (slots, tables, everything)
set -euo pipefail
# shellcheck source=common.sh
. "$(cd "$(dirname "$0")" && pwd)/common.sh"

destroy=0
case "${1:-}" in
  --destroy) destroy=1 ;;
  "") ;;
  *) pg_die "usage: $0 [--destroy]" ;;
esac

if pg_is_running; then
  pg_log "stopping $PGDATA_CDC"
  as_pg_owner "$PGBIN/pg_ctl" -D "$PGDATA_CDC" -m fast -w -t 60 stop >/dev/null
else
  pg_log "not running ($PGDATA_CDC)"
fi
if [ "$destroy" = 1 ] && [ -d "$PGDATA_CDC" ]; then
  pg_log "removing $PGDATA_CDC"
  rm -rf "$PGDATA_CDC"
fi
