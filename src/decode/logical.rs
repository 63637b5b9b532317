//! Kafka Connect logical types and Debezium's TOAST placeholder.
//!
//! With `schemas.enable=true` every column carries a schema, and its `name` says how the
//! JSON value encodes the database value:
//!
//! | schema name                                  | JSON                         | we store            |
//! |----------------------------------------------|------------------------------|---------------------|
//! | `org.apache.kafka.connect.data.Decimal`      | base64 two's complement      | `"1234.56"`         |
//! | `io.debezium.data.VariableScaleDecimal`      | `{"scale", "value"}`         | `"1234.56"`         |
//! | `io.debezium.time.MicroTimestamp` (…Timestamp, NanoTimestamp) | epoch µs (ms, ns) | `"2018-06-20T13:13:16.945104"` |
//! | `io.debezium.time.Date`, connect `Date`      | days since epoch             | `"2018-06-20"`      |
//! | `io.debezium.time.MicroTime` (Time, NanoTime)| µs (ms, ns) since midnight   | `"15:13:16.945104"` |
//! | (no name) type `float` (FLOAT32, `real`)     | a number, as the JVM printed it | the shortest decimal of its float32 |
//!
//! Without a schema those values pass through as they are (the scale of a decimal is unknown).
//!
//! An update that leaves a TOASTed column unchanged does not carry it: Debezium sends
//! `__debezium_unavailable_value` instead (as text, as base64 for bytea, as the bytes' integer
//! array for `int[]`). We remove such columns from the row and list them, so that they are
//! never embedded nor stored; the stored value stays.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use num_bigint::BigInt;
use serde_json::Value;

use super::DecodeError;
use crate::model::Row;

pub const UNAVAILABLE: &str = "__debezium_unavailable_value";
const UNAVAILABLE_BASE64: &str = "X19kZWJleml1bV91bmF2YWlsYWJsZV92YWx1ZQ==";

/// The schema of field `name` of the top-level struct schema (e.g. `after`).
pub fn field_schema<'a>(schema: &'a Value, name: &str) -> Option<&'a Value> {
    schema
        .get("fields")?
        .as_array()?
        .iter()
        .find(|f| f.get("field").and_then(Value::as_str) == Some(name))
}

/// Converts a row's logical-typed values and strips TOAST placeholders.
/// Returns the row and the names of the columns that were unavailable.
pub fn convert_row(
    mut row: Row,
    row_schema: Option<&Value>,
) -> Result<(Row, Vec<String>), DecodeError> {
    let mut unavailable = Vec::new();
    let names: Vec<String> = row.keys().cloned().collect();
    for name in names {
        let Some(value) = row.get(&name) else {
            continue;
        };
        if is_unavailable(value) {
            row.remove(&name);
            unavailable.push(name);
            continue;
        }
        let Some(schema) = row_schema.and_then(|s| field_schema(s, &name)) else {
            continue;
        };
        let converted = convert_value(value, schema)
            .map_err(|e| DecodeError(format!("column `{name}`: {e}")))?;
        if let Some(v) = converted {
            row.insert(name, v);
        }
    }
    Ok((row, unavailable))
}

/// The placeholder in any of its forms.
pub fn is_unavailable(value: &Value) -> bool {
    match value {
        Value::String(s) => s == UNAVAILABLE || s == UNAVAILABLE_BASE64,
        Value::Array(items) => {
            (items.len() == 1 && items[0].as_str() == Some(UNAVAILABLE))
                || (items.len() == UNAVAILABLE.len()
                    && items
                        .iter()
                        .zip(UNAVAILABLE.bytes())
                        .all(|(v, b)| v.as_u64() == Some(u64::from(b))))
        }
        _ => false,
    }
}

/// `Ok(None)` when the value stays as it is.
fn convert_value(value: &Value, schema: &Value) -> Result<Option<Value>, String> {
    if value.is_null() {
        return Ok(None);
    }
    let name = schema.get("name").and_then(Value::as_str).unwrap_or("");
    let int = || {
        value
            .as_i64()
            .ok_or_else(|| format!("{name} expects an integer, got {value}"))
    };
    let text = |s: String| Ok(Some(Value::String(s)));
    if name.is_empty() && schema.get("type").and_then(Value::as_str) == Some("float") {
        // FLOAT32 (`real`): the float32's own shortest decimal, not the JVM's rendering.
        return Ok(value.as_f64().and_then(float32).map(Value::from));
    }
    match name {
        "org.apache.kafka.connect.data.Decimal" => {
            let scale = schema
                .get("parameters")
                .and_then(|p| p.get("scale"))
                .and_then(|s| {
                    s.as_str()
                        .and_then(|s| s.parse::<u32>().ok())
                        .or(s.as_u64().map(|n| n as u32))
                })
                .ok_or("Decimal schema without a numeric `parameters.scale`")?;
            match value {
                Value::String(b64) => text(decimal(b64, scale)?),
                // `decimal.handling.mode=double|string` already gives a readable value.
                _ => Ok(None),
            }
        }
        "io.debezium.data.VariableScaleDecimal" => {
            let scale = value
                .get("scale")
                .and_then(Value::as_u64)
                .ok_or("VariableScaleDecimal without `scale`")?;
            let digits = value
                .get("value")
                .and_then(Value::as_str)
                .ok_or("VariableScaleDecimal without `value`")?;
            text(decimal(digits, scale as u32)?)
        }
        "io.debezium.time.MicroTimestamp" => text(timestamp(int()?, 1_000_000)?),
        "io.debezium.time.Timestamp" | "org.apache.kafka.connect.data.Timestamp" => {
            text(timestamp(int()?, 1_000)?)
        }
        "io.debezium.time.NanoTimestamp" => text(timestamp(int()?, 1_000_000_000)?),
        "io.debezium.time.Date" | "org.apache.kafka.connect.data.Date" => {
            let days = int()?;
            let date = chrono::NaiveDate::from_ymd_opt(1970, 1, 1)
                .and_then(|d| d.checked_add_signed(chrono::Duration::days(days)))
                .ok_or_else(|| format!("date {days} days from epoch is out of range"))?;
            text(date.to_string())
        }
        "io.debezium.time.MicroTime" => text(time_of_day(int()?, 1_000_000)?),
        "io.debezium.time.Time" | "org.apache.kafka.connect.data.Time" => {
            text(time_of_day(int()?, 1_000)?)
        }
        "io.debezium.time.NanoTime" => text(time_of_day(int()?, 1_000_000_000)?),
        _ => Ok(None),
    }
}

/// A float32 value (`real`) as the double of its shortest decimal: `-3.5e10` for the float32
/// nearest to -3.5e10, however it was written (Java 17 writes `-3.5000001E10`; PostgreSQL and
/// Java 19+ `-3.5e10`). `None` for a value that is not finite as a float32.
pub fn float32(value: f64) -> Option<f64> {
    let single = value as f32;
    if !single.is_finite() {
        return None;
    }
    // Rust prints the shortest decimal that reads back as the same float32.
    single.to_string().parse::<f64>().ok()
}

/// Base64 big-endian two's-complement unscaled value + scale → decimal text.
fn decimal(b64: &str, scale: u32) -> Result<String, String> {
    let bytes = BASE64
        .decode(b64)
        .map_err(|e| format!("decimal value `{b64}` is not base64: {e}"))?;
    let unscaled = BigInt::from_signed_bytes_be(&bytes);
    let negative = unscaled.sign() == num_bigint::Sign::Minus;
    let digits = unscaled.magnitude().to_string();
    let scale = scale as usize;
    let text = if scale == 0 {
        digits
    } else {
        let padded = format!("{digits:0>width$}", width = scale + 1);
        let (int, frac) = padded.split_at(padded.len() - scale);
        format!("{int}.{frac}")
    };
    Ok(if negative { format!("-{text}") } else { text })
}

/// A `timestamp` column's value as the pipeline stores it, from microseconds since the epoch
/// (what Debezium's `MicroTimestamp` carries).
pub fn micro_timestamp_text(micros: i64) -> Result<String, String> {
    timestamp(micros, 1_000_000)
}

/// A `time` column's value as the pipeline stores it, from microseconds since midnight
/// (Debezium's `MicroTime`).
pub fn micro_time_text(micros: i64) -> Result<String, String> {
    time_of_day(micros, 1_000_000)
}

fn timestamp(value: i64, per_second: i64) -> Result<String, String> {
    let secs = value.div_euclid(per_second);
    let nanos = (value.rem_euclid(per_second) * (1_000_000_000 / per_second)) as u32;
    let at = chrono::DateTime::from_timestamp(secs, nanos)
        .ok_or_else(|| format!("timestamp {value} is out of range"))?;
    Ok(at.naive_utc().format("%Y-%m-%dT%H:%M:%S%.f").to_string())
}

fn time_of_day(value: i64, per_second: i64) -> Result<String, String> {
    let secs = value.div_euclid(per_second);
    let nanos = (value.rem_euclid(per_second) * (1_000_000_000 / per_second)) as u32;
    let t = chrono::NaiveTime::from_num_seconds_from_midnight_opt(secs as u32, nanos)
        .filter(|_| (0..86_400).contains(&secs))
        .ok_or_else(|| format!("time of day {value} is out of range"))?;
    Ok(t.format("%H:%M:%S%.f").to_string())
}

/// A plain map for tests.
#[cfg(test)]
pub fn row(value: Value) -> Row {
    match value {
        Value::Object(m) => m,
        _ => serde_json::Map::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_decode_with_their_scale() {
        assert_eq!(decimal("AeJA", 2).unwrap(), "1234.56");
        assert_eq!(decimal("MDk=", 3).unwrap(), "12.345");
        assert_eq!(decimal("/w==", 2).unwrap(), "-0.01");
        assert_eq!(decimal("AA==", 0).unwrap(), "0");
        assert!(decimal("not base64!", 2).is_err());
    }

    #[test]
    fn times_render_readably() {
        assert_eq!(
            timestamp(1529507596945104, 1_000_000).unwrap(),
            "2018-06-20T15:13:16.945104"
        );
        assert_eq!(
            time_of_day(54796945104, 1_000_000).unwrap(),
            "15:13:16.945104"
        );
        assert!(time_of_day(90_000_000_000, 1_000_000).is_err());
    }

    #[test]
    fn every_placeholder_form_is_unavailable() {
        assert!(is_unavailable(&Value::String(UNAVAILABLE.into())));
        assert!(is_unavailable(&Value::String(UNAVAILABLE_BASE64.into())));
        let bytes: Vec<Value> = UNAVAILABLE.bytes().map(|b| Value::from(b as u64)).collect();
        assert!(is_unavailable(&Value::Array(bytes)));
        assert!(!is_unavailable(&Value::String("__debezium".into())));
        assert!(!is_unavailable(&serde_json::json!([1, 2, 3])));
    }

    /// Debezium (Java 17's `Float.toString`) writes some `real` values with more digits than
    /// the float32 needs (`-3.5000001E10` for the float32 PostgreSQL prints as `-3.5e+10`);
    /// read as a double they would be another number than the column's. A FLOAT32 field is
    /// stored as the shortest decimal of its float32, whatever the JVM printed.
    #[test]
    fn a_float32_is_stored_as_the_shortest_decimal_of_its_float32() {
        let schema = serde_json::json!({"type": "struct", "fields": [
            {"field": "r", "type": "float", "optional": true},
            {"field": "d", "type": "double", "optional": true}]});
        let convert = |r: Value, d: Value| {
            let (row, _) =
                convert_row(row(serde_json::json!({"r": r, "d": d})), Some(&schema)).unwrap();
            (row["r"].clone(), row["d"].clone())
        };
        assert_eq!(
            convert(
                serde_json::json!(-35000001000.0),
                serde_json::json!(-35000001000.0)
            ),
            (
                serde_json::json!(-3.5e10),
                serde_json::json!(-35000001000.0)
            ),
            "float32 canonical, float64 as sent"
        );
        assert_eq!(
            convert(serde_json::json!(1.17549435e-38), serde_json::json!(0.1)),
            (serde_json::json!(1.1754944e-38), serde_json::json!(0.1))
        );
        assert_eq!(
            convert(serde_json::json!(0.1), Value::Null).0,
            serde_json::json!(0.1)
        );
        assert_eq!(
            convert(serde_json::json!(1.5), Value::Null).0,
            serde_json::json!(1.5)
        );
        // Jackson writes non-finite floats as strings: they stay as they are.
        assert_eq!(
            convert(serde_json::json!("NaN"), serde_json::json!("-Infinity")),
            (serde_json::json!("NaN"), serde_json::json!("-Infinity"))
        );
    }

    #[test]
    fn convert_row_strips_placeholders() {
        let (r, gone) =
            convert_row(row(serde_json::json!({"id": 1, "t": UNAVAILABLE})), None).unwrap();
        assert_eq!(gone, vec!["t".to_string()]);
        assert_eq!(r, row(serde_json::json!({"id": 1})));
    }
}
