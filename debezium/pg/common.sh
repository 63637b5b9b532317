# shellcheck shell=bash
# Shared settings for the local CDC PostgreSQL cluster (sourced by start.sh / stop.sh / psql.sh).
# Every value can be overridden from the environment.

_PG_HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=${REPO:-$(cd "$_PG_HERE/../.." && pwd)}

# PostgreSQL binaries: 15 by default, else the newest installed major version.
if [ -z "${PGBIN:-}" ]; then
  if [ -x /usr/lib/postgresql/15/bin/initdb ]; then
    PGBIN=/usr/lib/postgresql/15/bin
  else
    PGBIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  fi
fi
PGPORT_CDC=${PGPORT_CDC:-54329}
PGHOST_CDC=${PGHOST_CDC:-127.0.0.1}
PGUSER_CDC=${PGUSER_CDC:-postgres}
PGPASSWORD_CDC=${PGPASSWORD_CDC:-postgres}
PGDATABASE_CDC=${PGDATABASE_CDC:-postgres}
PGDATA_CDC=${PGDATA_CDC:-$REPO/.data/pg-cdc}
# OS user that owns and runs the cluster when the scripts run as root (postgres refuses root).
PG_OS_USER=${PG_OS_USER:-postgres}

pg_log() { echo "[pg-cdc] $*" >&2; }
pg_die() { echo "[pg-cdc] ERROR: $*" >&2; exit 1; }

# Run a command as the cluster owner: via runuser when we are root, directly otherwise.
as_pg_owner() {
  if [ "$(id -u)" = 0 ]; then
    runuser -u "$PG_OS_USER" -- "$@"
  else
    "$@"
  fi
}

pg_is_running() {
  [ -f "$PGDATA_CDC/PG_VERSION" ] && as_pg_owner "$PGBIN/pg_ctl" -D "$PGDATA_CDC" status >/dev/null 2>&1
}

# psql against the CDC cluster over TCP (password auth).
cdc_psql() {
  PGPASSWORD="$PGPASSWORD_CDC" psql -X -q -v ON_ERROR_STOP=1 \
    -h "$PGHOST_CDC" -p "$PGPORT_CDC" -U "$PGUSER_CDC" -d "$PGDATABASE_CDC" "$@"
}
