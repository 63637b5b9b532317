#!/usr/bin/env bash
# psql connected to the local CDC cluster (127.0.0.1:$PGPORT_CDC, postgres/postgres).
#   debezium/pg/psql.sh -c "UPDATE products SET price = price + 1 WHERE id = 1"
set -euo pipefail
# shellcheck source=common.sh
. "$(cd "$(dirname "$0")" && pwd)/common.sh"
PGPASSWORD="$PGPASSWORD_CDC" exec psql -X -h "$PGHOST_CDC" -p "$PGPORT_CDC" -U "$PGUSER_CDC" -d "$PGDATABASE_CDC" "$@"
