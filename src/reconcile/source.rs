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
//! **Values as the pipeline stores them.** Debezium (JSON converter, schemas on, its default
//! `decimal.handling.mode=precise` and `time.precision.mode=adaptive`) sends each type in a
//! wire form that `decode` turns into a stored value; here the database renders each column
//! straight into that stored form:
//!
//! | type | stored as | read as |
//! |---|---|---|
//! | `numeric`, `money` | `"1234.56"` (the value's scale) | `col::text` |
//! | `timestamp` | `"2018-06-20T13:13:16.945104"` | epoch µs, formatted by `decode`'s own function |
//! | `time` | `"15:13:16.945104"` | µs since midnight, likewise |
//! | `timestamptz` | `"2018-06-20T13:13:16.945104Z"` (UTC, the column's fractional digits) | `to_char` |
//! | `json`, `jsonb` | the JSON text | `col::text` |
//! | `bytea` | base64 | `encode(col, 'base64')` |
//! | `interval` | µs (`MicroDuration`; months counted as 30 days) | `extract(epoch)` µs |
//! | everything else (integers, floats, booleans, text, `char(n)`, uuid, enums, `date`, arrays) | its JSON | `to_jsonb(col)` |
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

use crate::config::redact_url;
use crate::error::StageError;
use crate::mapping::CompiledRule;
use crate::model::{DocumentKey, Row};

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
    /// µs since the epoch, formatted in Rust.
    MicroTimestamp,
    /// µs since midnight, formatted in Rust.
    MicroTime,
    /// µs (Debezium's `MicroDuration`).
    MicroDuration,
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
            let kind = match (category.as_str(), type_name.as_str()) {
                ("A", _) => Kind::Json,
                (_, "numeric" | "json" | "jsonb") => Kind::Text,
                (_, "money") => Kind::Money,
                (_, "bytea") => Kind::Bytea,
                (_, "timestamptz") => Kind::TimestampTz(if typmod < 0 { 6 } else { typmod as u8 }),
                (_, "timestamp") => Kind::MicroTimestamp,
                (_, "time") => Kind::MicroTime,
                (_, "interval") => Kind::MicroDuration,
                _ => Kind::Json,
            };
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
            Kind::MicroTimestamp | Kind::MicroTime | Kind::MicroDuration => {
                format!("to_jsonb((extract(epoch FROM {c}) * 1000000)::int8)")
            }
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
    Ok(match (kind, &value) {
        (_, Value::Null) => Value::Null,
        (Kind::MicroTimestamp, v) => {
            Value::String(crate::decode::micro_timestamp_text(micros(v)?)?)
        }
        (Kind::MicroTime, v) => Value::String(crate::decode::micro_time_text(micros(v)?)?),
        _ => value,
    })
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
        assert_eq!(
            readable(Kind::MicroTimestamp, serde_json::json!(1529507596945104i64)).unwrap(),
            serde_json::json!("2018-06-20T15:13:16.945104")
        );
        assert_eq!(
            readable(Kind::MicroTime, serde_json::json!(54796945104i64)).unwrap(),
            serde_json::json!("15:13:16.945104")
        );
        assert_eq!(
            readable(Kind::Json, serde_json::json!([1, "a"])).unwrap(),
            serde_json::json!([1, "a"])
        );
    }
}
