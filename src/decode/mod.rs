//! Debezium message → [`ChangeEvent`].
//!
//! Debezium Server publishes one AMQP message per record. The body is the record *value* as
//! JSON, in one of three shapes, which we detect per message (a queue may carry several):
//!
//! 1. **Envelope with schema** (`value.converter.schemas.enable=true`):
//!    `{"schema": {...}, "payload": {"before", "after", "source", "op", ...}}`.
//!    The schema lets us turn Kafka Connect logical types (decimals as base64, timestamps as
//!    epoch micros) back into readable values; see [`logical`].
//! 2. **Bare payload** (schemas disabled): just `{"before", "after", "source", "op", ...}`.
//! 3. **Unwrapped row** (the `ExtractNewRecordState` SMT): the row itself, with optional
//!    metadata columns `__op`, `__table`, `__deleted`, `__lsn`, `__source_ts_ms`, ... —
//!    possibly inside a `{schema, payload}` wrapper too.
//!
//! A *tombstone* (body `default` or empty: Debezium Server's `null.value` for a record whose
//! value and value schema are both null) follows every delete so that Kafka can compact the key
//! away. It carries nothing for us. A body `null`, or `{"schema": {...}, "payload": null}`, is
//! different: that is what the unwrap SMT makes of a *delete* in its default mode
//! (`delete.tombstone.handling.mode=tombstone`). The key it deleted is not in the body, so it
//! cannot be applied; we say so ([`Ignored::KeylessDelete`]) instead of calling it a tombstone.
//!
//! Transaction metadata, heartbeats and schema changes are recognised by their topic (the
//! routing key) or their schema name, never by the columns of a row: a user table may well have
//! columns called `status`, `id` and `event_count`, or `ddl`.
//!
//! Integers that do not fit in 64 bits (NUMERIC keys, `BIGINT UNSIGNED`) are read as their
//! exact decimal text, a JSON string, so that two keys never collapse into one `f64`.
//!
//! Anything we cannot read is a [`DecodeError`]: the pipeline dead-letters the message with
//! the error as the reason. Decoding never panics on input.

mod logical;

pub use logical::{float32, is_unavailable, micro_time_text, micro_timestamp_text};

use serde_json::{Map, Value};

use crate::model::{Change, ChangeEvent, Ignored, Op, PositionAt, Row, SourcePosition, TableName};

/// The result of decoding one message.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    /// A change to apply.
    Change(Box<ChangeEvent>),
    /// A message to acknowledge without writing anything.
    Ignored(Ignored),
}

/// Why a message cannot be decoded. Always poison: the same bytes will fail the same way.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(pub String);

fn fail<T>(message: impl Into<String>) -> Result<T, DecodeError> {
    Err(DecodeError(message.into()))
}

/// Decodes one message body. `routing_key` (Debezium's topic `<prefix>.<schema>.<table>`
/// under `routingKey.source=topic`) names the table when the body does not.
pub fn decode(body: &[u8], routing_key: &str) -> Result<Decoded, DecodeError> {
    let text = match std::str::from_utf8(body) {
        Ok(t) => t.trim(),
        Err(e) => return fail(format!("body is not UTF-8: {e}")),
    };
    if text.is_empty() || text == "default" {
        return Ok(Decoded::Ignored(Ignored::Tombstone));
    }
    if text == "null" {
        return Ok(Decoded::Ignored(Ignored::KeylessDelete));
    }
    let value = parse_json(text).map_err(|e| DecodeError(format!("body is not JSON: {e}")))?;
    let Value::Object(object) = value else {
        return fail("body is JSON but not an object");
    };

    // Shape 1 (or an unwrapped row with schema): exactly {schema, payload}.
    let (payload, schema) = match split_envelope(object) {
        Envelope::WithSchema { payload, schema } => match payload {
            Value::Null => return Ok(Decoded::Ignored(Ignored::KeylessDelete)),
            Value::Object(p) => (p, Some(schema)),
            _ => return fail("`payload` is neither an object nor null"),
        },
        Envelope::Bare(object) => (object, None),
    };

    let envelope = is_debezium_envelope(&payload);
    if let Some(ignored) = classify_metadata(schema.as_ref(), routing_key, envelope, &payload) {
        return Ok(Decoded::Ignored(ignored));
    }
    if envelope {
        decode_envelope(payload, schema.as_ref(), routing_key)
    } else {
        decode_unwrapped(payload, schema.as_ref(), routing_key)
    }
}

/// The record key of a `__debezium.oldkey` / `__debezium.newkey` header (a primary-key change):
/// the key's JSON, with its `{schema, payload}` wrapper when key schemas are on.
pub fn decode_key_header(text: &str) -> Result<Row, DecodeError> {
    let value =
        parse_json(text.trim()).map_err(|e| DecodeError(format!("key header is not JSON: {e}")))?;
    let Value::Object(object) = value else {
        return fail("key header is not a JSON object");
    };
    match split_envelope(object) {
        Envelope::WithSchema {
            payload: Value::Object(key),
            ..
        } => Ok(key),
        Envelope::WithSchema { .. } => fail("key header has no key object in `payload`"),
        Envelope::Bare(key) => Ok(key),
    }
}

/// Parses JSON, keeping every number's value exact: integers beyond 64 bits and decimals an
/// `f64` cannot hold become their decimal text.
pub fn parse_json(text: &str) -> Result<Value, serde_json::Error> {
    serde_json::from_str(&quote_inexact_numbers(text))
}

/// Puts quotes around every number literal outside strings whose value serde would change:
/// an integer that does not fit in an `i64` (`123456789012345678901234567890` and `…891`
/// would otherwise be one number), or a decimal an `f64` does not hold as written
/// (`12345678901234567890.1234567890` from JsonConverter's `decimal.format=NUMERIC`, or a
/// value that over- or underflows). serde then reads it as its exact text. A decimal the
/// `f64` holds (`1.5`, `1.50`, `1.0E-5`) stays a number. Everything else is left byte for byte.
fn quote_inexact_numbers(text: &str) -> std::borrow::Cow<'_, str> {
    let bytes = text.as_bytes();
    let mut out: Option<String> = None;
    let mut copied = 0;
    let mut i = 0;
    let mut in_string = false;
    while i < bytes.len() {
        let b = bytes[i];
        if in_string {
            match b {
                b'\\' => i += 2,
                b'"' => {
                    in_string = false;
                    i += 1;
                }
                _ => i += 1,
            }
            continue;
        }
        match b {
            b'"' => {
                in_string = true;
                i += 1;
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                i += 1;
                while i < bytes.len() && bytes[i].is_ascii_digit() {
                    i += 1;
                }
                let is_integer = !matches!(bytes.get(i), Some(b'.' | b'e' | b'E'));
                // The rest of a decimal literal.
                while !is_integer
                    && i < bytes.len()
                    && matches!(bytes[i], b'.' | b'e' | b'E' | b'+' | b'-' | b'0'..=b'9')
                {
                    i += 1;
                }
                let literal = &text[start..i];
                let inexact = if is_integer {
                    literal.len() > 18 && literal.parse::<i64>().is_err()
                } else {
                    !f64_holds(literal)
                };
                if inexact {
                    let buf = out.get_or_insert_with(|| String::with_capacity(text.len() + 16));
                    buf.push_str(&text[copied..start]);
                    buf.push('"');
                    buf.push_str(literal);
                    buf.push('"');
                    copied = i;
                }
            }
            _ => i += 1,
        }
    }
    match out {
        Some(mut buf) => {
            buf.push_str(&text[copied..]);
            std::borrow::Cow::Owned(buf)
        }
        None => std::borrow::Cow::Borrowed(text),
    }
}

/// Whether the `f64` nearest to the decimal `literal` is the same number: its shortest
/// representation has the same digits and exponent (`1.50` = `1.5`; not
/// `0.1000000000000000055511151231257827`, nor anything that over- or underflows).
fn f64_holds(literal: &str) -> bool {
    let Ok(x) = literal.parse::<f64>() else {
        return false;
    };
    if !x.is_finite() {
        return false;
    }
    match (decimal_digits(literal), decimal_digits(&format!("{x:e}"))) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

/// A decimal literal as (negative, significant digits, exponent of the last digit), without
/// leading or trailing zeros; every zero is `(false, "", 0)`.
fn decimal_digits(literal: &str) -> Option<(bool, String, i64)> {
    let (negative, unsigned) = match literal.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, literal),
    };
    let (mantissa, exponent) = match unsigned.find(['e', 'E']) {
        Some(at) => (&unsigned[..at], unsigned[at + 1..].parse::<i64>().ok()?),
        None => (unsigned, 0),
    };
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let mut digits: String = whole.chars().chain(fraction.chars()).collect();
    let mut exponent = exponent.checked_sub(i64::try_from(fraction.len()).ok()?)?;
    while digits.ends_with('0') {
        digits.pop();
        exponent += 1;
    }
    let digits = digits.trim_start_matches('0').to_string();
    if digits.is_empty() {
        return Some((false, String::new(), 0));
    }
    Some((negative, digits, exponent))
}

enum Envelope {
    WithSchema { payload: Value, schema: Value },
    Bare(Map<String, Value>),
}

fn split_envelope(mut object: Map<String, Value>) -> Envelope {
    if object.len() == 2 && object.contains_key("schema") && object.contains_key("payload") {
        let payload = object.remove("payload").unwrap_or(Value::Null);
        let schema = object.remove("schema").unwrap_or(Value::Null);
        Envelope::WithSchema { payload, schema }
    } else {
        Envelope::Bare(object)
    }
}

/// A Debezium change envelope has `op` and `source`.
fn is_debezium_envelope(payload: &Map<String, Value>) -> bool {
    payload.contains_key("op") && payload.contains_key("source")
}

/// Transaction metadata, heartbeats and schema-change events share the queue on some setups.
/// They are told apart by their schema's name when the message has a schema, and otherwise by
/// their topic (the routing key under `routingKey.source=topic`): `<prefix>.transaction`,
/// `__debezium-heartbeat.<prefix>`, and the bare `<prefix>` for schema changes. Never by the
/// columns a row happens to have. (A one-segment routing key is a schema-change topic only for
/// a message that is neither a change envelope nor an unwrapped row naming its `__table`, so a
/// static routing key never swallows changes.)
fn classify_metadata(
    schema: Option<&Value>,
    routing_key: &str,
    envelope: bool,
    payload: &Map<String, Value>,
) -> Option<Ignored> {
    let schema_name = schema
        .and_then(|s| s.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("");
    if schema_name.ends_with(".TransactionMetadataValue") {
        return Some(Ignored::Transaction);
    }
    if schema_name.ends_with(".SchemaChangeValue") {
        return Some(Ignored::SchemaChange);
    }
    if schema_name == "io.debezium.connector.common.Heartbeat" {
        return Some(Ignored::Heartbeat);
    }
    let segments: Vec<&str> = routing_key.split('.').collect();
    match segments.as_slice() {
        [first, ..] if first.starts_with("__debezium-heartbeat") => Some(Ignored::Heartbeat),
        [prefix, "transaction"] if !prefix.is_empty() => Some(Ignored::Transaction),
        [prefix]
            if !prefix.is_empty()
                && !prefix.starts_with('{')
                && !envelope
                && !payload.contains_key("__table") =>
        {
            Some(Ignored::SchemaChange)
        }
        _ => None,
    }
}

fn decode_envelope(
    mut payload: Map<String, Value>,
    schema: Option<&Value>,
    routing_key: &str,
) -> Result<Decoded, DecodeError> {
    let op_letter = match payload.get("op") {
        Some(Value::String(s)) => s.clone(),
        other => return fail(format!("`op` must be a string, got {}", short(other))),
    };
    if op_letter == "m" {
        return Ok(Decoded::Ignored(Ignored::LogicalMessage));
    }
    let Some(op) = Op::from_letter(&op_letter) else {
        return fail(format!(
            "unknown op `{op_letter}` (expected c, u, r, d, t or m)"
        ));
    };
    let source = match payload.remove("source") {
        Some(Value::Object(s)) => s,
        other => {
            return fail(format!(
                "`source` must be an object, got {}",
                short(other.as_ref())
            ));
        }
    };
    let table = table_from_source(&source, routing_key)?;
    let position = position_from_source(&source);
    let source_ts_ms = source.get("ts_ms").and_then(Value::as_i64);

    let field_schema = |name: &str| schema.and_then(|s| logical::field_schema(s, name));
    let mut image = |name: &str| -> Result<Option<Row>, DecodeError> {
        match payload.remove(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Object(row)) => Ok(Some(row)),
            Some(other) => fail(format!(
                "`{name}` must be an object or null, got {}",
                short(Some(&other))
            )),
        }
    };
    let (change, raw, row_schema) = match op {
        Op::Create | Op::Update | Op::Read => match image("after")? {
            Some(row) => (Change::Upsert(Row::new()), row, field_schema("after")),
            None => return fail(format!("op `{op_letter}` without an `after` row")),
        },
        Op::Delete => match image("before")? {
            Some(row) => (Change::Delete(Row::new()), row, field_schema("before")),
            None => return fail("op `d` without a `before` row: the deleted key is unknown"),
        },
        Op::Truncate => {
            return Ok(Decoded::Change(Box::new(ChangeEvent {
                table,
                op,
                change: Change::Truncate,
                position,
                source_ts_ms,
                unavailable: Vec::new(),
            })));
        }
    };
    let (row, unavailable) = logical::convert_row(raw, row_schema)?;
    let change = match change {
        Change::Upsert(_) => Change::Upsert(row),
        _ => Change::Delete(row),
    };
    Ok(Decoded::Change(Box::new(ChangeEvent {
        table,
        op,
        change,
        position,
        source_ts_ms,
        unavailable,
    })))
}

/// An `ExtractNewRecordState` row. Metadata columns (`__op`, `__table`, `__deleted`, ...)
/// are read and removed; what remains is the row.
fn decode_unwrapped(
    mut row: Map<String, Value>,
    schema: Option<&Value>,
    routing_key: &str,
) -> Result<Decoded, DecodeError> {
    let meta: Vec<String> = row
        .keys()
        .filter(|k| k.starts_with("__"))
        .cloned()
        .collect();
    let mut meta_values = Map::new();
    for k in meta {
        if let Some(v) = row.remove(&k) {
            meta_values.insert(k, v);
        }
    }
    let text = |k: &str| {
        meta_values
            .get(k)
            .and_then(Value::as_str)
            .map(str::to_string)
    };

    let deleted = match meta_values.get("__deleted") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) if s == "true" => true,
        Some(Value::String(s)) if s == "false" => false,
        Some(other) => {
            return fail(format!(
                "`__deleted` must be \"true\" or \"false\", got {other}"
            ));
        }
    };
    let op = match text("__op") {
        Some(letter) => match Op::from_letter(&letter) {
            Some(op) => op,
            None => return fail(format!("unknown `__op` `{letter}`")),
        },
        None if deleted => Op::Delete,
        None => Op::Update,
    };
    let from_key = table_from_routing_key(routing_key);
    let table = match text("__table") {
        Some(table) => TableName {
            schema: text("__schema").or_else(|| text("__db")).or_else(|| {
                from_key
                    .as_ref()
                    .filter(|t| t.table == table)
                    .and_then(|t| t.schema.clone())
            }),
            table,
        },
        None => match from_key {
            Some(t) => t,
            None => {
                return fail(format!(
                    "unwrapped row without `__table`, and the routing key `{routing_key}` does not name a table"
                ));
            }
        },
    };
    let source_ts_ms = meta_values.get("__source_ts_ms").and_then(Value::as_i64);
    let connector =
        text("__name").unwrap_or_else(|| routing_key.split('.').next().unwrap_or("").to_string());
    let position = meta_values
        .get("__lsn")
        .and_then(Value::as_u64)
        .map(PositionAt::Lsn)
        .or_else(|| source_ts_ms.map(PositionAt::TsMs))
        .map(|at| SourcePosition { connector, at });

    if op == Op::Truncate {
        return Ok(Decoded::Change(Box::new(ChangeEvent {
            table,
            op,
            change: Change::Truncate,
            position,
            source_ts_ms,
            unavailable: Vec::new(),
        })));
    }
    let (row, unavailable) = logical::convert_row(row, schema)?;
    let change = if deleted || op == Op::Delete {
        Change::Delete(row)
    } else {
        Change::Upsert(row)
    };
    let op = if deleted { Op::Delete } else { op };
    Ok(Decoded::Change(Box::new(ChangeEvent {
        table,
        op,
        change,
        position,
        source_ts_ms,
        unavailable,
    })))
}

fn table_from_source(
    source: &Map<String, Value>,
    routing_key: &str,
) -> Result<TableName, DecodeError> {
    let text = |k: &str| source.get(k).and_then(Value::as_str).map(str::to_string);
    match text("table") {
        // PostgreSQL has `schema`; MySQL has only `db`.
        Some(table) => Ok(TableName {
            schema: text("schema").or_else(|| text("db")),
            table,
        }),
        None => match table_from_routing_key(routing_key) {
            Some(t) => Ok(t),
            None => fail(format!(
                "`source.table` is missing and the routing key `{routing_key}` does not name a table"
            )),
        },
    }
}

/// `dbserver1.public.products` → `public.products`.
fn table_from_routing_key(routing_key: &str) -> Option<TableName> {
    let parts: Vec<&str> = routing_key.split('.').collect();
    match parts.as_slice() {
        [_, schema, table] if !schema.is_empty() && !table.is_empty() => Some(TableName {
            schema: Some(schema.to_string()),
            table: table.to_string(),
        }),
        _ => None,
    }
}

/// PostgreSQL: `source.lsn`; MySQL: `file`/`pos`/`row`; otherwise `ts_ms`.
fn position_from_source(source: &Map<String, Value>) -> Option<SourcePosition> {
    let connector = source
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let at = if let Some(lsn) = source.get("lsn").and_then(Value::as_u64) {
        PositionAt::Lsn(lsn)
    } else if let (Some(file), Some(pos)) = (
        source.get("file").and_then(Value::as_str),
        source.get("pos").and_then(Value::as_u64),
    ) {
        PositionAt::Binlog {
            file: file.to_string(),
            pos,
            row: source.get("row").and_then(Value::as_u64).unwrap_or(0),
        }
    } else {
        PositionAt::TsMs(source.get("ts_ms").and_then(Value::as_i64)?)
    };
    Some(SourcePosition { connector, at })
}

fn short(value: Option<&Value>) -> String {
    match value {
        None => "nothing".into(),
        Some(v) => {
            let s = v.to_string();
            if s.len() > 60 {
                format!("{}…", &s[..s.floor_char_boundary(60)])
            } else {
                s
            }
        }
    }
}

#[cfg(test)]
mod tests;
