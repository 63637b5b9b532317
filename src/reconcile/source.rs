//! Reading the source tables (PostgreSQL, through sqlx): every row as Debezium would have sent
//! it, page by page.
//!
//! **One snapshot per table.** A table is read in a `REPEATABLE READ READ ONLY` transaction,
//! so every page sees the same committed state, and `pg_current_wal_insert_lsn()` read as its
//! first statement says where that state sits in the WAL: a change committed before the
//! snapshot has a smaller LSN, a change at or after that LSN is not in it.
//!
//! **Keyset pagination** in key order (`WHERE (k1, k2) > ($1, $2) ORDER BY k1, k2 LIMIT n`,
//! the primary-key index): memory is bounded by the page, not by the table.
//!
//! **Values as the pipeline stores them.** Debezium (JSON converter, schemas on; its
//! `decimal.handling.mode` and `time.precision.mode` as `[reconcile]` says, by default
//! Debezium's own defaults `precise` and `adaptive`) sends each type in a wire form that
//! `decode` turns into a stored value; here the database renders each column straight into
//! that stored form:
//!
//! | type | stored as | read as |
//! |---|---|---|
//! | `numeric`, `money` | `"1234.56"` (the value's scale; `double` mode: a double) | `col::text` (`col::float8::text`) |
//! | `real` | the shortest decimal of its float32 (`decode::float32`) | `col::text`, parsed as a float32 |
//! | `double precision` | the double (`"NaN"`, `"Infinity"`, `"-Infinity"` as text) | `col::text`, parsed |
//! | `timestamp` | `"2018-06-20T13:13:16.945104"` (`connect`: ms) | epoch µs, formatted by `decode`'s own function |
//! | `time` | `"15:13:16.945104"` (`connect`: ms) | µs since midnight, likewise |
//! | `timestamptz` | `"2018-06-20T13:13:16.945104Z"` (UTC, the column's fractional digits) | `to_char` |
//! | `timetz` | `"11:14:15.5Z"` (Debezium's `ZonedTime`: UTC, `ISO_OFFSET_TIME`) | µs since midnight in UTC, formatted here |
//! | `json`, `jsonb` | the JSON text | `col::text` |
//! | `bytea` | base64 | `encode(col, 'base64')` |
//! | `interval` | µs (`MicroDuration`: Debezium's own double arithmetic, a month = 30.4375 days) | its fields, computed as Debezium does |
//! | everything else (integers, booleans, text, `char(n)`, uuid, enums, `date`, arrays) | its JSON | `to_jsonb(col)` |
//!
//! Types outside this table compare by their JSON (`to_jsonb`), which may differ from what
//! Debezium sends for them: such a column shows as `stale` on every row.
//!
//! **Repair reads** lock what they read (`SELECT … FOR SHARE`, in a short transaction of their
//! own) and take the WAL position while holding the locks; see `repair`.

use std::collections::HashSet;
use std::str::FromStr;

use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgRow};
use sqlx::{AssertSqlSafe, ConnectOptions, Row as _};

use crate::config::{DecimalHandlingMode, ReconcileConfig, TimePrecisionMode, redact_url};
use crate::error::StageError;
use crate::mapping::CompiledRule;
use crate::model::{DocumentKey, Row};

/// How the connector sends values (its `decimal.handling.mode` and `time.precision.mode`),
/// which decides how reconcile reads them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ValueModes {
    pub decimal: DecimalHandlingMode,
    pub time: TimePrecisionMode,
}

impl ValueModes {
    pub fn of(config: &ReconcileConfig) -> ValueModes {
        ValueModes {
            decimal: config.decimal_handling_mode,
            time: config.time_precision_mode,
        }
    }
}

/// How one column's value is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `to_jsonb(col)` as it is.
    Json,
    /// Its text (`numeric`, `json`, `jsonb`).
    Text,
    /// `money`: its numeric text.
    Money,
    /// base64.
    Bytea,
    /// UTC ISO text with the column's fractional digits.
    TimestampTz(u8),
    /// µs since the epoch, formatted in Rust; `millis`: cut to milliseconds first
    /// (`time.precision.mode=connect`).
    MicroTimestamp { millis: bool },
    /// µs since midnight, formatted in Rust; `millis` likewise.
    MicroTime { millis: bool },
    /// `interval`: Debezium's `MicroDuration`, computed from the interval's fields.
    MicroDuration,
    /// `real`: the shortest decimal of its float32.
    Float32,
    /// A double: `double precision`, and `numeric`/`money` under `decimal.handling.mode=double`
    /// (the cast that makes one of the column).
    Float64(&'static str),
    /// `timetz`: Debezium's `ZonedTime` (UTC).
    ZonedTime,
}

/// How a column of type `type_name` (its category, its typmod) is read.
fn kind_of(category: &str, type_name: &str, typmod: i32, modes: ValueModes) -> Kind {
    let double = modes.decimal == DecimalHandlingMode::Double;
    let millis = modes.time == TimePrecisionMode::Connect;
    match (category, type_name) {
        ("A", _) => Kind::Json,
        (_, "numeric") if double => Kind::Float64("::float8"),
        (_, "money") if double => Kind::Float64("::numeric::float8"),
        (_, "numeric" | "json" | "jsonb") => Kind::Text,
        (_, "money") => Kind::Money,
        (_, "float4") => Kind::Float32,
        (_, "float8") => Kind::Float64(""),
        (_, "bytea") => Kind::Bytea,
        (_, "timestamptz") => Kind::TimestampTz(if typmod < 0 { 6 } else { typmod as u8 }),
        (_, "timestamp") => Kind::MicroTimestamp { millis },
        (_, "time") => Kind::MicroTime { millis },
        (_, "timetz") => Kind::ZonedTime,
        (_, "interval") => Kind::MicroDuration,
        _ => Kind::Json,
    }
}

#[derive(Debug, Clone)]
struct Column {
    name: String,
    kind: Kind,
    /// `format_type` of the column (`integer`, `numeric(10,2)`, …), for casts of key texts.
    sql_type: String,
}

/// A source table as reconcile reads it: the columns its rule keeps, and its key columns.
#[derive(Debug, Clone)]
pub struct SourceTable {
    /// `schema.table`.
    pub name: String,
    quoted: String,
    columns: Vec<Column>,
    /// Indexes into `columns` of the rule's `id_columns`, in their order.
    keys: Vec<usize>,
}

/// One source row: its values (the columns the rule keeps, and its key columns) and its key
/// columns as text (the keyset cursor and the handle to read it again).
#[derive(Debug, Clone, PartialEq)]
pub struct SourceRow {
    pub values: Row,
    pub key_text: Vec<String>,
}

fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// A database error for the operator, classified: connection trouble is transient, the rest
/// (credentials, privileges, a missing table) fatal.
pub fn db_error(what: &str, e: sqlx::Error) -> StageError {
    match &e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Tls(_) => {
            StageError::transient(format!("source database: {what}: {e}"))
        }
        _ => StageError::fatal(format!("source database: {what}: {e}")),
    }
}

/// Is this a data exception (SQLSTATE class 22: a value that does not cast)?
fn is_data_exception(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.code().is_some_and(|c| c.starts_with("22")))
}

/// Checks that `url` parses as a PostgreSQL URL (for a configuration error at once, with
/// the URL redacted and without the parser's words).
pub fn check_url(url: &str) -> Result<(), String> {
    PgConnectOptions::from_str(url).map(|_| ()).map_err(|_| {
        format!(
            "the source URL `{}` is not a PostgreSQL URL (postgres://user@host:5432/database)",
            redact_url(url)
        )
    })
}

/// Connects to `url` with `password` (from `[reconcile]`'s env/file; a password in the URL
/// works too). The URL is never printed unredacted, and a URL that does not parse is reported
/// without the parser's words (they could quote it).
pub async fn connect(url: &str, password: Option<&str>) -> Result<PgConnection, StageError> {
    let mut options = PgConnectOptions::from_str(url).map_err(|_| {
        StageError::fatal(format!(
            "the source URL `{}` is not a PostgreSQL URL (postgres://user@host:5432/database)",
            redact_url(url)
        ))
    })?;
    if let Some(password) = password {
        options = options.password(password);
    }
    let options = options
        .application_name("cdc-indexer reconcile")
        .disable_statement_logging();
    let mut conn = options
        .connect()
        .await
        .map_err(|e| db_error(&format!("cannot connect to {}", redact_url(url)), e))?;
    // Values render the same whatever the server's defaults.
    sqlx::raw_sql(
        "SET DateStyle = 'ISO, YMD'; SET TimeZone = 'UTC'; SET extra_float_digits = 1; SET IntervalStyle = 'postgres'",
    )
    .execute(&mut conn)
    .await
    .map_err(|e| db_error("session settings", e))?;
    Ok(conn)
}

/// `16/B374D848` → the u64 Debezium puts in `source.lsn`.
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (high, low) = text.trim().split_once('/')?;
    Some((u64::from_str_radix(high, 16).ok()? << 32) | u64::from_str_radix(low, 16).ok()?)
}

/// The current WAL insert position, `None` on a standby (no WAL of its own).
pub async fn current_lsn(conn: &mut PgConnection) -> Result<Option<u64>, StageError> {
    let text: Option<String> = sqlx::query_scalar(
        "SELECT CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_insert_lsn()::text END",
    )
    .fetch_one(&mut *conn)
    .await
    .map_err(|e| db_error("pg_current_wal_insert_lsn()", e))?;
    Ok(text.as_deref().and_then(parse_lsn))
}

/// The database's name (Debezium's `source.db`).
pub async fn database_name(conn: &mut PgConnection) -> Result<String, StageError> {
    sqlx::query_scalar("SELECT current_database()::text")
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| db_error("current_database()", e))
}

impl SourceTable {
    /// Reads the table's columns from the catalog and picks those the rule keeps.
    pub async fn describe(
        conn: &mut PgConnection,
        rule: &CompiledRule,
        modes: ValueModes,
    ) -> Result<SourceTable, StageError> {
        let name = rule.rule.table.clone();
        let (schema, table) = name
            .split_once('.')
            .ok_or_else(|| StageError::fatal(format!("{name}: expected schema.table")))?;
        let quoted = format!("{}.{}", quote(schema), quote(table));
        let rows = sqlx::query(
            "SELECT a.attname::text, COALESCE(b.typname, t.typname)::text, \
                    COALESCE(b.typcategory, t.typcategory)::text, a.atttypmod, \
                    format_type(a.atttypid, a.atttypmod) \
             FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
             LEFT JOIN pg_type b ON t.typtype = 'd' AND b.oid = t.typbasetype \
             WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped \
             ORDER BY a.attnum",
        )
        .bind(&quoted)
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| db_error(&format!("reading the columns of {name}"), e))?;
        if rows.is_empty() {
            return Err(StageError::fatal(format!(
                "source table {name} does not exist (or has no columns) in the source database"
            )));
        }
        let mut columns = Vec::new();
        let mut all = Vec::new();
        for r in &rows {
            let column: String = r.try_get(0).map_err(|e| db_error("catalog", e))?;
            let type_name: String = r.try_get(1).map_err(|e| db_error("catalog", e))?;
            let category: String = r.try_get(2).map_err(|e| db_error("catalog", e))?;
            let typmod: i32 = r.try_get(3).map_err(|e| db_error("catalog", e))?;
            let sql_type: String = r.try_get(4).map_err(|e| db_error("catalog", e))?;
            all.push(column.clone());
            let kept = rule.is_payload_column(&column)
                || rule.is_template_column(&column)
                || rule.rule.id_columns.contains(&column);
            if !kept {
                continue;
            }
            let kind = kind_of(&category, &type_name, typmod, modes);
            columns.push(Column {
                name: column,
                kind,
                sql_type,
            });
        }
        let mut keys = Vec::new();
        for id in &rule.rule.id_columns {
            match columns.iter().position(|c| &c.name == id) {
                Some(i) => keys.push(i),
                None => {
                    return Err(StageError::fatal(format!(
                        "{name}: key column `{id}` (tables.id_columns) is not a column of the source table; its columns are {}",
                        all.join(", ")
                    )));
                }
            }
        }
        for column in rule.template.columns() {
            if !all.iter().any(|c| c == column) {
                return Err(StageError::fatal(format!(
                    "{name}: the text template uses `{column}`, which is not a column of the source table; its columns are {}",
                    all.join(", ")
                )));
            }
        }
        Ok(SourceTable {
            name,
            quoted,
            columns,
            keys,
        })
    }

    fn expression(column: &Column) -> String {
        let c = format!("src.{}", quote(&column.name));
        match column.kind {
            Kind::Json => format!("to_jsonb({c})"),
            Kind::Text => format!("to_jsonb({c}::text)"),
            Kind::Money => format!("to_jsonb({c}::numeric::text)"),
            Kind::Bytea => format!("to_jsonb(translate(encode({c}, 'base64'), E'\\n', ''))"),
            Kind::TimestampTz(0) => {
                format!(
                    "to_jsonb(to_char({c} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'))"
                )
            }
            Kind::TimestampTz(digits) => format!(
                "to_jsonb(to_char({c} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.FF{}\"Z\"'))",
                digits.min(6)
            ),
            Kind::MicroTimestamp { .. } | Kind::MicroTime { .. } => {
                format!("to_jsonb((extract(epoch FROM {c}) * 1000000)::int8)")
            }
            Kind::ZonedTime => format!(
                "to_jsonb((extract(epoch FROM ({c} AT TIME ZONE 'UTC')::time) * 1000000)::int8)"
            ),
            // The fields PostgreSQL prints (and the JDBC driver parses back): months (years
            // folded in), days, hours, minutes, and the seconds field in µs.
            Kind::MicroDuration => format!(
                "to_jsonb(CASE WHEN {c} IS NOT NULL THEN \
                 ARRAY[(extract(year FROM {c}) * 12 + extract(month FROM {c}))::int8, \
                 extract(day FROM {c})::int8, extract(hour FROM {c})::int8, \
                 extract(minute FROM {c})::int8, extract(microseconds FROM {c})::int8] END)"
            ),
            Kind::Float32 => format!("to_jsonb({c}::text)"),
            Kind::Float64(cast) => format!("to_jsonb({c}{cast}::text)"),
        }
    }

    /// The select list: each column's JSON text, then the key columns' texts.
    fn select_list(&self) -> String {
        let mut parts: Vec<String> = self
            .columns
            .iter()
            .map(|c| format!("{}::text", Self::expression(c)))
            .collect();
        parts.extend(
            self.keys
                .iter()
                .map(|&i| format!("src.{}::text", quote(&self.columns[i].name))),
        );
        parts.join(", ")
    }

    fn key_tuple(&self) -> String {
        let keys: Vec<String> = self
            .keys
            .iter()
            .map(|&i| format!("src.{}", quote(&self.columns[i].name)))
            .collect();
        format!("({})", keys.join(", "))
    }

    /// `($1::text::integer, $2::text::text)`: key texts cast back to their types.
    fn key_params(&self, first: usize) -> String {
        let params: Vec<String> = self
            .keys
            .iter()
            .enumerate()
            .map(|(n, &i)| format!("${}::text::{}", first + n, self.columns[i].sql_type))
            .collect();
        format!("({})", params.join(", "))
    }

    fn page_sql(&self, after: bool) -> String {
        let filter = if after {
            format!("WHERE {} > {}", self.key_tuple(), self.key_params(1))
        } else {
            String::new()
        };
        format!(
            "SELECT {} FROM {} AS src {filter} ORDER BY {} LIMIT ${}",
            self.select_list(),
            self.quoted,
            self.key_tuple().trim_matches(['(', ')']),
            if after { self.keys.len() + 1 } else { 1 }
        )
    }

    /// Rows whose keys are among the given key texts (one array parameter per key column).
    fn by_keys_sql(&self, lock: bool) -> String {
        let arrays: Vec<String> = (1..=self.keys.len())
            .map(|n| format!("${n}::text[]"))
            .collect();
        let names: Vec<String> = (1..=self.keys.len()).map(|n| format!("k{n}")).collect();
        let casts: Vec<String> = self
            .keys
            .iter()
            .enumerate()
            .map(|(n, &i)| format!("u.k{}::{}", n + 1, self.columns[i].sql_type))
            .collect();
        format!(
            "SELECT {} FROM {} AS src WHERE {} IN (SELECT {} FROM unnest({}) AS u({})){}",
            self.select_list(),
            self.quoted,
            self.key_tuple(),
            casts.join(", "),
            arrays.join(", "),
            names.join(", "),
            if lock { " FOR SHARE OF src" } else { "" }
        )
    }

    fn row_of(&self, row: &PgRow) -> Result<SourceRow, StageError> {
        let mut values = Row::new();
        for (i, column) in self.columns.iter().enumerate() {
            let text: Option<String> = row
                .try_get(i)
                .map_err(|e| db_error(&format!("{}: column {}", self.name, column.name), e))?;
            let value = match text {
                None => Value::Null,
                Some(text) => crate::decode::parse_json(&text).map_err(|e| {
                    StageError::fatal(format!("{}: column {}: {e}", self.name, column.name))
                })?,
            };
            values.insert(
                column.name.clone(),
                readable(column.kind, value).map_err(|e| {
                    StageError::fatal(format!("{}: column {}: {e}", self.name, column.name))
                })?,
            );
        }
        let mut key_text = Vec::new();
        for n in 0..self.keys.len() {
            let text: Option<String> = row
                .try_get(self.columns.len() + n)
                .map_err(|e| db_error(&format!("{}: key", self.name), e))?;
            key_text.push(text.unwrap_or_default());
        }
        Ok(SourceRow { values, key_text })
    }

    /// The next page of rows in key order, after the row whose key texts are `after`.
    pub async fn page(
        &self,
        conn: &mut PgConnection,
        after: Option<&[String]>,
        limit: usize,
    ) -> Result<Vec<SourceRow>, StageError> {
        let sql = self.page_sql(after.is_some());
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for text in after.unwrap_or_default() {
            query = query.bind(text.clone());
        }
        let rows = query
            .bind(limit as i64)
            .fetch_all(&mut *conn)
            .await
            .map_err(|e| db_error(&format!("reading {}", self.name), e))?;
        rows.iter().map(|r| self.row_of(r)).collect()
    }

    /// The rows with these keys (key texts per row), optionally locked `FOR SHARE`.
    pub async fn rows_by_key_text(
        &self,
        conn: &mut PgConnection,
        keys: &[Vec<String>],
        lock: bool,
    ) -> Result<Vec<SourceRow>, sqlx::Error> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut query = sqlx::query(AssertSqlSafe(self.by_keys_sql(lock)));
        for n in 0..self.keys.len() {
            let column: Vec<String> = keys.iter().map(|k| k[n].clone()).collect();
            query = query.bind(column);
        }
        let rows = query.fetch_all(&mut *conn).await?;
        rows.iter()
            .map(|r| self.row_of(r))
            .collect::<Result<Vec<_>, StageError>>()
            .map_err(|e| sqlx::Error::Protocol(e.message))
    }

    /// The key texts of a document key read from the index (`{"id":1}`), or `None` when it
    /// cannot be a key of this table (other columns, or values that are not scalars).
    pub fn key_text_of(&self, key: &DocumentKey) -> Option<Vec<String>> {
        let Ok(Value::Object(values)) = crate::decode::parse_json(&key.key) else {
            return None;
        };
        if values.len() != self.keys.len() {
            return None;
        }
        self.keys
            .iter()
            .map(|&i| match values.get(&self.columns[i].name)? {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                Value::Bool(b) => Some(b.to_string()),
                _ => None,
            })
            .collect()
    }

    /// Which of these document keys have a row (in a statement of its own: a snapshot taken
    /// now). A key whose values do not even cast to the key columns' types has none.
    pub async fn existing(
        &self,
        conn: &mut PgConnection,
        rule: &CompiledRule,
        keys: &[DocumentKey],
    ) -> Result<HashSet<DocumentKey>, StageError> {
        let texts: Vec<(DocumentKey, Vec<String>)> = keys
            .iter()
            .filter_map(|k| Some((k.clone(), self.key_text_of(k)?)))
            .collect();
        let all: Vec<Vec<String>> = texts.iter().map(|(_, t)| t.clone()).collect();
        let rows = match self.rows_by_key_text(conn, &all, false).await {
            Ok(rows) => rows,
            // One of them does not cast: ask key by key.
            Err(e) if is_data_exception(&e) => {
                let mut rows = Vec::new();
                for one in &all {
                    match self
                        .rows_by_key_text(conn, std::slice::from_ref(one), false)
                        .await
                    {
                        Ok(found) => rows.extend(found),
                        Err(e) if is_data_exception(&e) => {}
                        Err(e) => return Err(db_error(&format!("reading {}", self.name), e)),
                    }
                }
                rows
            }
            Err(e) => return Err(db_error(&format!("reading {}", self.name), e)),
        };
        Ok(rows
            .iter()
            .filter_map(|r| rule.key(&r.values).ok())
            .collect())
    }
}

/// A column's JSON as the database gave it → the value the pipeline stores.
fn readable(kind: Kind, value: Value) -> Result<Value, String> {
    let micros = |v: &Value| {
        v.as_i64()
            .ok_or_else(|| format!("expected microseconds, got {v}"))
    };
    // `connect` mode: Kafka Connect's millisecond types (the sub-millisecond digits cut).
    let cut = |micros: i64, millis: bool| {
        if millis {
            micros.div_euclid(1000) * 1000
        } else {
            micros
        }
    };
    let text = |v: &Value| {
        v.as_str()
            .map(str::to_string)
            .ok_or_else(|| format!("expected a number's text, got {v}"))
    };
    Ok(match (kind, &value) {
        (_, Value::Null) => Value::Null,
        (Kind::MicroTimestamp { millis }, v) => Value::String(crate::decode::micro_timestamp_text(
            cut(micros(v)?, millis),
        )?),
        (Kind::MicroTime { millis }, v) => {
            Value::String(crate::decode::micro_time_text(cut(micros(v)?, millis))?)
        }
        (Kind::ZonedTime, v) => Value::String(zoned_time_text(micros(v)?)?),
        (Kind::MicroDuration, v) => {
            let fields: Vec<i64> = v
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_i64).collect())
                .unwrap_or_default();
            let [months, days, hours, minutes, micros] = fields[..] else {
                return Err(format!("expected the fields of an interval, got {v}"));
            };
            Value::from(micro_duration(months, days, hours, minutes, micros))
        }
        (Kind::Float32, v) => float_value(&text(v)?, |f| {
            f.parse::<f32>()
                .ok()
                .map(|f| crate::decode::float32(f64::from(f)))
        })?,
        (Kind::Float64(_), v) => float_value(&text(v)?, |f| {
            f.parse::<f64>()
                .ok()
                .map(|f| Some(f).filter(|f| f.is_finite()))
        })?,
        _ => value,
    })
}

/// A float's text as PostgreSQL prints it → the stored value: the number, or (not finite)
/// the text itself (`NaN`, `Infinity`, `-Infinity`: what Debezium's JSON converter writes).
fn float_value(text: &str, parse: impl Fn(&str) -> Option<Option<f64>>) -> Result<Value, String> {
    match parse(text) {
        Some(Some(f)) => Ok(Value::from(f)),
        Some(None) => Ok(Value::String(text.to_string())),
        None => Err(format!("`{text}` is not a float")),
    }
}

/// A `timetz` as Debezium's `ZonedTime` writes it (`DateTimeFormatter.ISO_OFFSET_TIME` of the
/// UTC time): `HH:MM:SS`, the fraction without trailing zeros when there is one, then `Z`.
fn zoned_time_text(micros: i64) -> Result<String, String> {
    if !(0..=86_400_000_000).contains(&micros) {
        return Err(format!("time of day {micros} µs is out of range"));
    }
    let (secs, fraction) = (micros / 1_000_000, micros % 1_000_000);
    let mut text = format!("{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60);
    if fraction != 0 {
        text.push('.');
        text.push_str(format!("{fraction:06}").trim_end_matches('0'));
    }
    text.push('Z');
    Ok(text)
}

/// Debezium's `MicroDuration.durationMicros(years, months, days, hours, minutes, seconds,
/// 30.4375)` in its own double arithmetic (a month is 30.4375 days, the seconds a double of
/// the JDBC driver's whole seconds and µs, the result truncated), from the interval's fields
/// as PostgreSQL prints them.
fn micro_duration(months: i64, days: i64, hours: i64, minutes: i64, micros: i64) -> i64 {
    const DAYS_PER_MONTH_AVG: f64 = 30.4375;
    let seconds = (micros / 1_000_000) as f64 + (micros % 1_000_000) as f64 / 1_000_000.0;
    let number_of_days = months as f64 * DAYS_PER_MONTH_AVG + days as f64;
    let number_of_seconds =
        ((number_of_days * 24.0 + hours as f64) * 60.0 + minutes as f64) * 60.0 + seconds;
    (number_of_seconds * 1_000_000.0 + 0.0) as i64
}

/// Opens the snapshot a table is read in: `REPEATABLE READ READ ONLY`, and the WAL position
/// it sits at (`None` on a standby).
pub async fn begin_snapshot(conn: &mut PgConnection) -> Result<Option<u64>, StageError> {
    let standby: bool = sqlx::query_scalar("SELECT pg_is_in_recovery()")
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| db_error("pg_is_in_recovery()", e))?;
    sqlx::raw_sql("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *conn)
        .await
        .map_err(|e| db_error("BEGIN", e))?;
    if standby {
        return Ok(None);
    }
    // The first statement takes the snapshot; the position is read while it is taken.
    current_lsn(conn).await
}

pub async fn end_snapshot(conn: &mut PgConnection) -> Result<(), StageError> {
    sqlx::raw_sql("COMMIT")
        .execute(&mut *conn)
        .await
        .map(|_| ())
        .map_err(|e| db_error("COMMIT", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_text_reads_as_debeziums_number() {
        assert_eq!(parse_lsn("0/1598C48"), Some(0x1598C48));
        assert_eq!(parse_lsn("16/B374D848"), Some((0x16 << 32) | 0xB374D848));
        assert_eq!(parse_lsn("nonsense"), None);
    }

    #[test]
    fn microsecond_columns_read_as_the_pipeline_stores_them() {
        let exact = Kind::MicroTimestamp { millis: false };
        assert_eq!(
            readable(exact, serde_json::json!(1529507596945104i64)).unwrap(),
            serde_json::json!("2018-06-20T15:13:16.945104")
        );
        assert_eq!(
            readable(
                Kind::MicroTime { millis: false },
                serde_json::json!(54796945104i64)
            )
            .unwrap(),
            serde_json::json!("15:13:16.945104")
        );
        assert_eq!(
            readable(Kind::Json, serde_json::json!([1, "a"])).unwrap(),
            serde_json::json!([1, "a"])
        );
        // time.precision.mode=connect: milliseconds, floored as Java's toEpochMilli does.
        let millis = Kind::MicroTimestamp { millis: true };
        assert_eq!(
            readable(millis, serde_json::json!(946684800000001i64)).unwrap(),
            serde_json::json!("2000-01-01T00:00:00")
        );
        assert_eq!(
            readable(millis, serde_json::json!(-14182939499500i64)).unwrap(),
            serde_json::json!("1969-07-20T20:17:40.500")
        );
        assert_eq!(
            readable(
                Kind::MicroTime { millis: true },
                serde_json::json!(43200123456i64)
            )
            .unwrap(),
            serde_json::json!("12:00:00.123")
        );
    }

    /// Which kind each type is read as, under the connector's modes.
    #[test]
    fn column_kinds_follow_the_type_and_the_connectors_modes() {
        let default = ValueModes::default();
        let double = ValueModes {
            decimal: DecimalHandlingMode::Double,
            ..default
        };
        let connect = ValueModes {
            time: TimePrecisionMode::Connect,
            ..default
        };
        assert_eq!(kind_of("N", "numeric", 655366, default), Kind::Text);
        assert_eq!(
            kind_of("N", "numeric", -1, double),
            Kind::Float64("::float8")
        );
        assert_eq!(kind_of("N", "money", -1, default), Kind::Money);
        assert_eq!(
            kind_of("N", "money", -1, double),
            Kind::Float64("::numeric::float8")
        );
        assert_eq!(kind_of("N", "float4", -1, default), Kind::Float32);
        assert_eq!(kind_of("N", "float8", -1, double), Kind::Float64(""));
        assert_eq!(kind_of("D", "timetz", -1, default), Kind::ZonedTime);
        assert_eq!(kind_of("T", "interval", -1, default), Kind::MicroDuration);
        assert_eq!(
            kind_of("D", "timestamp", -1, connect),
            Kind::MicroTimestamp { millis: true }
        );
        assert_eq!(
            kind_of("D", "time", -1, default),
            Kind::MicroTime { millis: false }
        );
        assert_eq!(
            kind_of("D", "timestamptz", 3, connect),
            Kind::TimestampTz(3)
        );
        assert_eq!(kind_of("A", "_float4", -1, double), Kind::Json);
    }

    /// Floats as the pipeline stores them: a double exactly, a float32 by its shortest
    /// decimal (`decode::float32`), the non-finite ones as the JSON converter's text.
    #[test]
    fn floats_read_as_the_pipeline_stores_them() {
        let read = |kind, text: &str| readable(kind, serde_json::json!(text)).unwrap();
        let double = Kind::Float64("");
        assert_eq!(read(double, "1e+20"), serde_json::json!(1e20));
        assert_eq!(read(double, "-3.5e+10"), serde_json::json!(-3.5e10));
        assert_eq!(read(double, "2"), serde_json::json!(2.0));
        assert_eq!(
            read(double, "0.30000000000000004"),
            serde_json::json!(0.1 + 0.2)
        );
        assert_eq!(read(double, "NaN"), serde_json::json!("NaN"));
        assert_eq!(read(double, "-Infinity"), serde_json::json!("-Infinity"));
        assert_eq!(read(Kind::Float32, "-3.5e+10"), serde_json::json!(-3.5e10));
        assert_eq!(read(Kind::Float32, "0.1"), serde_json::json!(0.1));
        assert_eq!(
            read(Kind::Float32, "Infinity"),
            serde_json::json!("Infinity")
        );
        assert!(readable(double, serde_json::json!("x")).is_err());
    }

    /// `timetz` as Debezium's `ZonedTime` (`ISO_OFFSET_TIME` in UTC), as it was seen on
    /// Debezium 3.6.3's output.
    #[test]
    fn a_timetz_reads_as_debeziums_zoned_time() {
        let read = |micros: i64| readable(Kind::ZonedTime, serde_json::json!(micros)).unwrap();
        assert_eq!(read(25_199_999_999), serde_json::json!("06:59:59.999999Z"));
        assert_eq!(read(0), serde_json::json!("00:00:00Z"));
        assert_eq!(read(25_200_500_000), serde_json::json!("07:00:00.5Z"));
        assert_eq!(read(40_455_120_000), serde_json::json!("11:14:15.12Z"));
    }

    /// `interval` as Debezium's `MicroDuration`: the expected figures are what Debezium
    /// 3.6.3 itself computes (`MicroDuration.durationMicros` over the JDBC driver's
    /// `PGInterval` of the same text), not PostgreSQL's `extract(epoch)` (30-day months).
    #[test]
    fn an_interval_reads_as_debeziums_micro_duration() {
        let read = |fields: [i64; 5]| {
            readable(Kind::MicroDuration, serde_json::json!(fields))
                .unwrap()
                .as_i64()
                .unwrap()
        };
        // '1 year 2 mons 3 days 04:05:06.789'
        assert_eq!(read([14, 3, 4, 5, 6_789_000]), 37_091_106_789_000);
        // '-1 years -2 mons +3 days -04:05:06.5'
        assert_eq!(read([-14, 3, -4, -5, -6_500_000]), -36_572_706_500_000);
        // '1 mon'
        assert_eq!(read([1, 0, 0, 0, 0]), 2_629_800_000_000);
        // '-1 days +02:00:00'
        assert_eq!(read([0, -1, 2, 0, 0]), -79_200_000_000);
        // '00:00:00.000001', '100 years'
        assert_eq!(read([0, 0, 0, 0, 1]), 1);
        assert_eq!(read([1200, 0, 0, 0, 0]), 3_155_760_000_000_000);
        assert!(readable(Kind::MicroDuration, serde_json::json!([1, 2])).is_err());
    }
}
