#!/usr/bin/env bash
# Start (idempotently) a dedicated PostgreSQL cluster with wal_level=logical for local CDC.
#
#   debezium/pg/start.sh
#
# Env: PGPORT_CDC (54329), PGDATA_CDC ($REPO/.data/pg-cdc), PGBIN (/usr/lib/postgresql/15/bin),
#      PG_OS_USER (postgres; used only when running as root), PGPASSWORD_CDC (postgres).
# The cluster listens on 127.0.0.1 only; TCP logins (incl. replication) use scram-sha-256 with
# user postgres / password postgres; the unix socket (in /tmp) is trust.
# It never touches the system cluster on 5432.
set -euo pipefail
# shellcheck source=common.sh
. "$(cd "$(dirname "$0")" && pwd)/common.sh"

[ -n "$PGBIN" ] && [ -x "$PGBIN/initdb" ] || pg_die "PostgreSQL server binaries not found (set PGBIN; Debian: apt-get install postgresql-15)"
if [ "$(id -u)" = 0 ] && ! id "$PG_OS_USER" >/dev/null 2>&1; then
  pg_die "running as root but OS user '$PG_OS_USER' does not exist (postgres refuses to run as root); set PG_OS_USER"
fi

# Tests start the cluster from parallel threads: one start at a time (the others then find it
# running), or two would race through initdb on the same directory. The server must not
# inherit the lock (9>&- below), or it would hold it for ever.
mkdir -p "$(dirname "$PGDATA_CDC")"
exec 9>"$PGDATA_CDC.start.lock"
flock 9

if pg_is_running; then
  pg_log "already running: $PGDATA_CDC (port $PGPORT_CDC)"
else
  if [ ! -f "$PGDATA_CDC/PG_VERSION" ]; then
    pg_log "initdb $PGDATA_CDC"
    mkdir -p "$PGDATA_CDC"
    if [ "$(id -u)" = 0 ]; then chown "$PG_OS_USER" "$PGDATA_CDC"; fi
    chmod 700 "$PGDATA_CDC"
    as_pg_owner test -w "$PGDATA_CDC" || pg_die "user '$PG_OS_USER' cannot write $PGDATA_CDC (a parent directory not traversable?); set PGDATA_CDC elsewhere, e.g. /var/tmp/pg-cdc"
    pwfile=$(mktemp)
    printf '%s\n' "$PGPASSWORD_CDC" >"$pwfile"
    if [ "$(id -u)" = 0 ]; then chown "$PG_OS_USER" "$pwfile"; fi
    if ! as_pg_owner "$PGBIN/initdb" -D "$PGDATA_CDC" -U "$PGUSER_CDC" --pwfile="$pwfile" \
        -E UTF8 --locale=C.UTF-8 --auth-local=trust --auth-host=scram-sha-256 >"$PGDATA_CDC.initdb.log" 2>&1; then
      rm -f "$pwfile"; cat "$PGDATA_CDC.initdb.log" >&2; pg_die "initdb failed"
    fi
    rm -f "$pwfile" "$PGDATA_CDC.initdb.log"
    cat >>"$PGDATA_CDC/postgresql.conf" <<'CONF'

# --- cdc-indexer local CDC cluster (debezium/pg/start.sh) ---
wal_level = logical
max_replication_slots = 20
max_wal_senders = 20
listen_addresses = '127.0.0.1'
unix_socket_directories = '/tmp'
shared_buffers = 64MB
# Do not let abandoned test slots fill the disk.
max_slot_wal_keep_size = 1GB
CONF
  fi
  if (exec 3<>"/dev/tcp/$PGHOST_CDC/$PGPORT_CDC") 2>/dev/null; then
    # Another cluster (e.g. of another checkout) already serves this port: use it if it is a
    # logical-decoding PostgreSQL that accepts our credentials.
    if [ "$(cdc_psql -At -c 'SHOW wal_level' 2>/dev/null)" = logical ]; then
      pg_log "port $PGPORT_CDC already serves a logical-decoding cluster (not $PGDATA_CDC); using it"
      exit 0
    fi
    pg_die "port $PGPORT_CDC is already in use by another process (set PGPORT_CDC)"
  fi
  pg_log "starting on $PGHOST_CDC:$PGPORT_CDC (data $PGDATA_CDC, log $PGDATA_CDC/server.log)"
  # The port is passed on the command line so PGPORT_CDC can change without re-initialising.
  as_pg_owner "$PGBIN/pg_ctl" -D "$PGDATA_CDC" -l "$PGDATA_CDC/server.log" -w -t 60 \
    -o "-p $PGPORT_CDC -c wal_level=logical" start >/dev/null 9>&- \
    || { tail -n 30 "$PGDATA_CDC/server.log" >&2 || true; pg_die "pg_ctl start failed"; }
fi

for _ in $(seq 1 60); do
  if "$PGBIN/pg_isready" -q -h "$PGHOST_CDC" -p "$PGPORT_CDC"; then break; fi
  sleep 0.5
done
"$PGBIN/pg_isready" -q -h "$PGHOST_CDC" -p "$PGPORT_CDC" || pg_die "cluster did not become ready on $PGHOST_CDC:$PGPORT_CDC"
wal=$(cdc_psql -At -c 'SHOW wal_level') || pg_die "cannot log in as $PGUSER_CDC on $PGHOST_CDC:$PGPORT_CDC"
[ "$wal" = logical ] || pg_die "wal_level is '$wal', expected 'logical' (is another server on port $PGPORT_CDC?)"
pg_log "ready: postgresql://$PGUSER_CDC:***@$PGHOST_CDC:$PGPORT_CDC/$PGDATABASE_CDC (wal_level=logical)"
