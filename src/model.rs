//! The domain's plain data: what a change is, what identifies a document, where in the source
//! stream a change came from. No I/O here.

use std::cmp::Ordering;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A row as Debezium sends it: column name → JSON value (integers exact).
pub type Row = Map<String, Value>;

/// `schema.table` (for MySQL, `database.table`). The schema is `None` only when neither the
/// event nor its routing key says it (an unwrapped row without `__schema`/`__db`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TableName {
    pub schema: Option<String>,
    pub table: String,
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.schema {
            Some(s) => write!(f, "{s}.{}", self.table),
            None => write!(f, "{}", self.table),
        }
    }
}

/// Debezium's operation letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Op {
    /// `c`: insert.
    Create,
    /// `u`: update.
    Update,
    /// `r`: snapshot read.
    Read,
    /// `d`: delete.
    Delete,
    /// `t`: truncate of the whole table.
    Truncate,
}

impl Op {
    pub fn from_letter(letter: &str) -> Option<Op> {
        Some(match letter {
            "c" => Op::Create,
            "u" => Op::Update,
            "r" => Op::Read,
            "d" => Op::Delete,
            "t" => Op::Truncate,
            _ => return None,
        })
    }

    /// The label used in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Create => "c",
            Op::Update => "u",
            Op::Read => "r",
            Op::Delete => "d",
            Op::Truncate => "t",
        }
    }
}

/// Where a change sits in its connector's stream. Two positions compare only when they come
/// from the same connector (`source.name`) and are of the same kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourcePosition {
    /// Debezium `source.name` (the topic prefix / logical server name).
    pub connector: String,
    #[serde(flatten)]
    pub at: PositionAt,
}

/// The comparable part of a [`SourcePosition`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PositionAt {
    /// PostgreSQL: the change's WAL position (`source.lsn`).
    Lsn(u64),
    /// MySQL: binlog file, offset, row within the event.
    Binlog { file: String, pos: u64, row: u64 },
    /// Fallback: `source.ts_ms`.
    TsMs(i64),
}

impl SourcePosition {
    /// `Some(ordering)` when the two positions are comparable.
    pub fn compare(&self, other: &SourcePosition) -> Option<Ordering> {
        if self.connector != other.connector {
            return None;
        }
        match (&self.at, &other.at) {
            (PositionAt::Lsn(a), PositionAt::Lsn(b)) => Some(a.cmp(b)),
            (
                PositionAt::Binlog { file, pos, row },
                PositionAt::Binlog {
                    file: f2,
                    pos: p2,
                    row: r2,
                },
            ) => Some(
                binlog_seq(file)
                    .cmp(&binlog_seq(f2))
                    .then(pos.cmp(p2))
                    .then(row.cmp(r2)),
            ),
            (PositionAt::TsMs(a), PositionAt::TsMs(b)) => Some(a.cmp(b)),
            _ => None,
        }
    }

    /// True when this position is known to be older than `stored`.
    pub fn is_older_than(&self, stored: &SourcePosition) -> bool {
        self.compare(stored) == Some(Ordering::Less)
    }
}

/// `mysql-bin.000003` → 3 (file names sort by their numeric suffix).
fn binlog_seq(file: &str) -> (u64, &str) {
    let digits = file.rsplit('.').next().unwrap_or("");
    (digits.parse().unwrap_or(0), file)
}

/// What a decoded message asks of the index.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Insert, update or snapshot read: the row image after the change.
    Upsert(Row),
    /// Delete: the key columns (other columns may be fillers).
    Delete(Row),
    /// Truncate: every document of the table goes.
    Truncate,
}

/// One decoded Debezium change event.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeEvent {
    pub table: TableName,
    pub op: Op,
    pub change: Change,
    pub position: Option<SourcePosition>,
    /// `source.ts_ms`: when the change happened in the database.
    pub source_ts_ms: Option<i64>,
    /// Columns whose value Debezium did not send (unchanged TOAST): they were removed from
    /// the row and must keep their stored value.
    pub unavailable: Vec<String>,
}

/// Why a message carries no change to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ignored {
    /// A tombstone (body `default` or empty) that follows a delete.
    Tombstone,
    /// A delete that lost its key: the unwrap SMT's default mode turns a delete into a body
    /// `null` (or `{"schema":…,"payload":null}`). It cannot be applied; see
    /// `delete.tombstone.handling.mode=rewrite`.
    KeylessDelete,
    /// A logical decoding message (`op: m`).
    LogicalMessage,
    /// Transaction metadata (BEGIN/END).
    Transaction,
    /// A heartbeat.
    Heartbeat,
    /// A schema change (DDL) event.
    SchemaChange,
}

impl Ignored {
    pub fn as_str(self) -> &'static str {
        match self {
            Ignored::Tombstone => "tombstone",
            Ignored::KeylessDelete => "keyless-delete",
            Ignored::LogicalMessage => "message",
            Ignored::Transaction => "transaction",
            Ignored::Heartbeat => "heartbeat",
            Ignored::SchemaChange => "schema-change",
        }
    }
}

/// A document's identity: table and primary-key values, as canonical JSON
/// (`{"id":1}`, keys sorted), which is also what `_cdc.key` stores.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DocumentKey {
    pub table: String,
    pub key: String,
}

impl fmt::Display for DocumentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.table, self.key)
    }
}

/// Namespace of point ids (UUIDv5). Fixed forever: changing it re-keys every index.
const POINT_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x6c1f_6a0e_3b4d_5e2f_9a8b_7c6d_5e4f_3a2b);

/// The `_cdc.key` of a table's truncate marker: no document key is an empty string.
pub const TABLE_MARKER_KEY: &str = "";

impl DocumentKey {
    /// The key under which a table's truncate marker (its table-level position) is stored.
    pub fn table_marker(table: &str) -> DocumentKey {
        DocumentKey {
            table: table.to_string(),
            key: TABLE_MARKER_KEY.to_string(),
        }
    }

    /// Is this the key of a table's truncate marker?
    pub fn is_table_marker(&self) -> bool {
        self.key == TABLE_MARKER_KEY
    }

    /// The point id of chunk `chunk`: UUIDv5 over `table 0x1f key 0x1f chunk`. Deterministic,
    /// so replays overwrite instead of duplicating.
    pub fn point_id(&self, chunk: usize) -> uuid::Uuid {
        let name = format!("{}\u{1f}{}\u{1f}{}", self.table, self.key, chunk);
        uuid::Uuid::new_v5(&POINT_NAMESPACE, name.as_bytes())
    }
}

/// Canonical JSON of a value: object keys sorted, no whitespace. Numbers print exactly as
/// parsed (serde_json keeps integers as i64/u64).
pub fn canonical_json(value: &Value) -> String {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            let parts: Vec<String> = keys
                .into_iter()
                .map(|k| format!("{}:{}", Value::String(k.clone()), canonical_json(&map[k])))
                .collect();
            format!("{{{}}}", parts.join(","))
        }
        Value::Array(items) => {
            let parts: Vec<String> = items.iter().map(canonical_json).collect();
            format!("[{}]", parts.join(","))
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key(table: &str, key: &str) -> DocumentKey {
        DocumentKey {
            table: table.into(),
            key: key.into(),
        }
    }

    #[test]
    fn point_ids_are_deterministic_and_distinct() {
        let k = key("public.products", r#"{"id":1}"#);
        assert_eq!(k.point_id(0), k.point_id(0));
        assert_ne!(k.point_id(0), k.point_id(1));
        assert_ne!(
            k.point_id(0),
            key("public.products", r#"{"id":2}"#).point_id(0)
        );
        assert_ne!(
            k.point_id(0),
            key("public.other", r#"{"id":1}"#).point_id(0)
        );
        // Pinned: a changed namespace or name layout would orphan every stored point.
        assert_eq!(
            k.point_id(0).to_string(),
            uuid::Uuid::new_v5(
                &POINT_NAMESPACE,
                "public.products\u{1f}{\"id\":1}\u{1f}0".as_bytes()
            )
            .to_string()
        );
        assert_eq!(k.point_id(0).get_version_num(), 5);
    }

    #[test]
    fn canonical_json_sorts_keys_and_keeps_big_integers() {
        let v: Value = serde_json::from_str(r#"{"b":9223372036854775807,"a":[1,"x"]}"#).unwrap();
        assert_eq!(
            canonical_json(&v),
            r#"{"a":[1,"x"],"b":9223372036854775807}"#
        );
        assert_eq!(
            canonical_json(&json!({"order_id": 100, "line_no": 1})),
            r#"{"line_no":1,"order_id":100}"#
        );
    }

    #[test]
    fn positions_compare_only_within_a_connector() {
        let p = |c: &str, at| SourcePosition {
            connector: c.into(),
            at,
        };
        assert!(p("a", PositionAt::Lsn(1)).is_older_than(&p("a", PositionAt::Lsn(2))));
        assert!(!p("a", PositionAt::Lsn(2)).is_older_than(&p("a", PositionAt::Lsn(2))));
        assert!(!p("a", PositionAt::Lsn(1)).is_older_than(&p("b", PositionAt::Lsn(2))));
        assert!(!p("a", PositionAt::Lsn(1)).is_older_than(&p("a", PositionAt::TsMs(2))));
        let bin = |f: &str, pos| PositionAt::Binlog {
            file: f.into(),
            pos,
            row: 0,
        };
        assert!(
            p("m", bin("mysql-bin.000009", 900)).is_older_than(&p("m", bin("mysql-bin.000010", 4)))
        );
    }
}
