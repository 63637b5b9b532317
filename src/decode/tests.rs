//! The decoder against every captured fixture in `tests/fixtures/debezium/` (copied from the
//! shared corpus: real Debezium 3.6.3 output, plus documented MySQL samples).

use serde_json::{Value, json};

use super::*;
use crate::model::PositionAt;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/debezium");

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{DIR}/{name}")).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The topic the fixture was emitted for (the routing key under `routingKey.source=topic`).
fn topic(name: &str) -> String {
    let manifest: Value =
        serde_json::from_slice(&fixture("manifest.json")).expect("manifest.json parses");
    manifest[name]["destination_topic"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| "mysql-server-1.inventory.customers".to_string())
}

fn decode_fixture(name: &str) -> Decoded {
    decode(&fixture(name), &topic(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn change(name: &str) -> ChangeEvent {
    match decode_fixture(name) {
        Decoded::Change(c) => *c,
        other => panic!("{name}: expected a change, got {other:?}"),
    }
}

fn row_of(c: &ChangeEvent) -> &Row {
    match &c.change {
        Change::Upsert(r) | Change::Delete(r) => r,
        Change::Truncate => panic!("truncate has no row"),
    }
}

/// Expected: file, op, table, kind (`upsert`/`delete`/`truncate`), a subset of the row.
const CHANGES: &[(&str, Op, &str, &str, &str)] = &[
    (
        "pg-create-no-schema.json",
        Op::Create,
        "public.customers",
        "upsert",
        r#"{"id":1,"first_name":"Anne","email":"annek@noanswer.org"}"#,
    ),
    (
        "pg-create-with-schema.json",
        Op::Create,
        "public.customers",
        "upsert",
        r#"{"id":1,"first_name":"Anne"}"#,
    ),
    (
        "pg-create-products-no-schema.json",
        Op::Create,
        "public.products",
        "upsert",
        r#"{"id":1,"name":"car battery","description":"12V car battery","weight":8.1}"#,
    ),
    (
        "pg-create-products-with-schema.json",
        Op::Create,
        "public.products",
        "upsert",
        r#"{"id":1,"name":"car battery","weight":8.1}"#,
    ),
    (
        "pg-read-snapshot-no-schema.json",
        Op::Read,
        "public.customers",
        "upsert",
        r#"{"id":1001,"first_name":"Sally"}"#,
    ),
    (
        "pg-read-snapshot-with-schema.json",
        Op::Read,
        "public.customers",
        "upsert",
        r#"{"id":1001,"last_name":"Thomas"}"#,
    ),
    (
        "pg-update-replica-default-no-schema.json",
        Op::Update,
        "public.customers",
        "upsert",
        r#"{"id":1,"first_name":"Anne Marie"}"#,
    ),
    (
        "pg-update-replica-default-with-schema.json",
        Op::Update,
        "public.customers",
        "upsert",
        r#"{"id":1,"first_name":"Anne Marie"}"#,
    ),
    (
        "pg-update-replica-full-no-schema.json",
        Op::Update,
        "public.customers_full",
        "upsert",
        r#"{"id":1,"first_name":"Anne Marie"}"#,
    ),
    (
        "pg-update-replica-full-with-schema.json",
        Op::Update,
        "public.customers_full",
        "upsert",
        r#"{"id":1,"first_name":"Anne Marie"}"#,
    ),
    (
        "pg-delete-replica-default-no-schema.json",
        Op::Delete,
        "public.customers",
        "delete",
        r#"{"id":1}"#,
    ),
    (
        "pg-delete-replica-default-with-schema.json",
        Op::Delete,
        "public.customers",
        "delete",
        r#"{"id":1}"#,
    ),
    (
        "pg-delete-replica-full-no-schema.json",
        Op::Delete,
        "public.customers_full",
        "delete",
        r#"{"id":1,"first_name":"Anne Marie"}"#,
    ),
    (
        "pg-delete-replica-full-with-schema.json",
        Op::Delete,
        "public.customers_full",
        "delete",
        r#"{"id":1}"#,
    ),
    (
        "pg-composite-pk-create-no-schema.json",
        Op::Create,
        "public.order_lines",
        "upsert",
        r#"{"order_id":100,"line_no":1,"sku":"SKU-1","qty":3}"#,
    ),
    (
        "pg-composite-pk-create-with-schema.json",
        Op::Create,
        "public.order_lines",
        "upsert",
        r#"{"order_id":100,"line_no":1,"qty":3}"#,
    ),
    (
        "pg-composite-pk-update-no-schema.json",
        Op::Update,
        "public.order_lines",
        "upsert",
        r#"{"order_id":100,"line_no":1,"qty":5}"#,
    ),
    (
        "pg-composite-pk-update-with-schema.json",
        Op::Update,
        "public.order_lines",
        "upsert",
        r#"{"order_id":100,"line_no":1,"qty":5}"#,
    ),
    (
        "pg-composite-pk-delete-no-schema.json",
        Op::Delete,
        "public.order_lines",
        "delete",
        r#"{"order_id":100,"line_no":1}"#,
    ),
    (
        "pg-composite-pk-delete-with-schema.json",
        Op::Delete,
        "public.order_lines",
        "delete",
        r#"{"order_id":100,"line_no":1}"#,
    ),
    (
        "pg-toast-create-no-schema.json",
        Op::Create,
        "public.toast_test",
        "upsert",
        r#"{"id":1,"status":"new"}"#,
    ),
    (
        "pg-toast-create-with-schema.json",
        Op::Create,
        "public.toast_test",
        "upsert",
        r#"{"id":1,"status":"new"}"#,
    ),
    (
        "pg-toast-update-unavailable-placeholder-no-schema.json",
        Op::Update,
        "public.toast_test",
        "upsert",
        r#"{"id":1,"status":"updated"}"#,
    ),
    (
        "pg-toast-update-unavailable-placeholder-with-schema.json",
        Op::Update,
        "public.toast_test",
        "upsert",
        r#"{"id":1,"status":"updated"}"#,
    ),
    (
        "pg-truncate-no-schema.json",
        Op::Truncate,
        "public.customers_full",
        "truncate",
        "{}",
    ),
    (
        "pg-truncate-with-schema.json",
        Op::Truncate,
        "public.customers_full",
        "truncate",
        "{}",
    ),
    (
        "pg-types-decimal-precise-no-schema.json",
        Op::Create,
        "public.special_types",
        "upsert",
        r#"{"id":1,"price":"AeJA","big":9223372036854775807,"small":-32768}"#,
    ),
    (
        "pg-types-decimal-precise-with-schema.json",
        Op::Create,
        "public.special_types",
        "upsert",
        r#"{"id":1,"price":"1234.56","ratio":"12.345","big":9223372036854775807,"created_at_tz":"2018-06-20T13:13:16.945104Z"}"#,
    ),
    (
        "mysqldoc-create-with-schema.json",
        Op::Create,
        "inventory.customers",
        "upsert",
        r#"{"id":1004,"first_name":"Anne"}"#,
    ),
    (
        "mysqldoc-update-no-schema.json",
        Op::Update,
        "inventory.customers",
        "upsert",
        r#"{"id":1004,"first_name":"Anne Marie"}"#,
    ),
    (
        "mysqldoc-delete-no-schema.json",
        Op::Delete,
        "inventory.customers",
        "delete",
        r#"{"id":1004}"#,
    ),
    (
        "mysqldoc-truncate-no-schema.json",
        Op::Truncate,
        "inventory.customers",
        "truncate",
        "{}",
    ),
    (
        "unwrap-default-create-no-schema.json",
        Op::Update,
        "public.customers",
        "upsert",
        r#"{"id":1,"first_name":"Anne"}"#,
    ),
    (
        "unwrap-default-create-with-schema.json",
        Op::Update,
        "public.customers",
        "upsert",
        r#"{"id":1,"first_name":"Anne"}"#,
    ),
    (
        "unwrap-rewrite-create-no-schema.json",
        Op::Create,
        "public.customers",
        "upsert",
        r#"{"id":1,"first_name":"Anne"}"#,
    ),
    (
        "unwrap-rewrite-create-with-schema.json",
        Op::Create,
        "public.customers",
        "upsert",
        r#"{"id":1,"first_name":"Anne"}"#,
    ),
    (
        "unwrap-rewrite-update-no-schema.json",
        Op::Update,
        "public.customers",
        "upsert",
        r#"{"id":1,"first_name":"Anne Marie"}"#,
    ),
    (
        "unwrap-rewrite-update-with-schema.json",
        Op::Update,
        "public.customers",
        "upsert",
        r#"{"id":1,"first_name":"Anne Marie"}"#,
    ),
    (
        "unwrap-rewrite-delete-no-schema.json",
        Op::Delete,
        "public.customers",
        "delete",
        r#"{"id":1}"#,
    ),
    (
        "unwrap-rewrite-delete-with-schema.json",
        Op::Delete,
        "public.customers",
        "delete",
        r#"{"id":1}"#,
    ),
];

const TOMBSTONES: &[&str] = &[
    "pg-tombstone-no-schema.json",
    "pg-tombstone-with-schema.json",
    "pg-composite-pk-tombstone-no-schema.json",
    "pg-composite-pk-tombstone-with-schema.json",
];

/// The unwrap SMT's default mode turns a delete into these: the key is lost.
const KEYLESS_DELETES: &[&str] = &[
    "unwrap-default-delete-no-schema.json",
    "unwrap-default-delete-with-schema.json",
];

#[test]
fn every_fixture_value_is_covered_by_an_expectation() {
    let mut covered: Vec<&str> = CHANGES
        .iter()
        .map(|c| c.0)
        .chain(TOMBSTONES.iter().copied())
        .chain(KEYLESS_DELETES.iter().copied())
        .collect();
    covered.push("mysqldoc-key-with-schema.json"); // a record key, tested below
    for entry in std::fs::read_dir(DIR).expect("fixture dir") {
        let name = entry
            .expect("entry")
            .file_name()
            .to_string_lossy()
            .to_string();
        if name.ends_with(".key.json")
            || name == "manifest.json"
            || name == "rabbitmq-derived-publishes.json"
            || name == "README.md"
        {
            continue;
        }
        assert!(
            covered.contains(&name.as_str()),
            "fixture {name} has no expectation"
        );
    }
}

#[test]
fn every_fixture_decodes_to_the_expected_event() {
    for (name, op, table, kind, subset) in CHANGES {
        let c = change(name);
        assert_eq!(c.op, *op, "{name}: op");
        assert_eq!(c.table.to_string(), *table, "{name}: table");
        let actual_kind = match c.change {
            Change::Upsert(_) => "upsert",
            Change::Delete(_) => "delete",
            Change::Truncate => "truncate",
        };
        assert_eq!(actual_kind, *kind, "{name}: kind");
        let expected: Value = serde_json::from_str(subset).expect("subset parses");
        if *kind != "truncate" {
            let row = row_of(&c);
            for (col, want) in expected.as_object().expect("object") {
                assert_eq!(row.get(col), Some(want), "{name}: column {col}");
            }
            assert!(
                !row.keys().any(|k| k.starts_with("__")),
                "{name}: metadata column left in row"
            );
        }
        // The unwrap SMT without `add.fields` drops the source metadata: no position.
        let expect_position = !name.starts_with("unwrap-default");
        assert_eq!(
            c.position.is_some(),
            expect_position,
            "{name}: source position"
        );
    }
}

#[test]
fn tombstones_in_every_form_are_ignored() {
    for name in TOMBSTONES {
        assert_eq!(
            decode_fixture(name),
            Decoded::Ignored(Ignored::Tombstone),
            "{name}"
        );
    }
    for body in ["default", "", " default\n"] {
        assert_eq!(
            decode(body.as_bytes(), "x.y.z").unwrap(),
            Decoded::Ignored(Ignored::Tombstone),
            "{body:?}"
        );
    }
}

#[test]
fn a_delete_that_lost_its_key_is_told_apart_from_a_tombstone() {
    for name in KEYLESS_DELETES {
        assert_eq!(
            decode_fixture(name),
            Decoded::Ignored(Ignored::KeylessDelete),
            "{name}"
        );
    }
    for body in [
        "null",
        "  null\n",
        r#"{"schema":{"type":"struct"},"payload":null}"#,
    ] {
        assert_eq!(
            decode(body.as_bytes(), "x.y.z").unwrap(),
            Decoded::Ignored(Ignored::KeylessDelete),
            "{body:?}"
        );
    }
}

#[test]
fn integer_keys_beyond_64_bits_keep_their_exact_text() {
    let body = |id: &str| {
        format!(
            r#"{{"op":"c","source":{{"name":"s","schema":"public","table":"t","lsn":1}},"after":{{"id":{id},"f":1.5e300,"n":-9223372036854775808,"s":"123456789012345678901234567890"}}}}"#
        )
    };
    let a = change_of(&body("123456789012345678901234567890"));
    let b = change_of(&body("123456789012345678901234567891"));
    let (ra, rb) = (row_of(&a), row_of(&b));
    assert_eq!(ra["id"], json!("123456789012345678901234567890"));
    assert_ne!(ra["id"], rb["id"]);
    assert_eq!(ra["n"], json!(i64::MIN), "64-bit integers stay numbers");
    assert_eq!(ra["f"], json!(1.5e300), "floats stay floats");
    assert_eq!(
        ra["s"],
        json!("123456789012345678901234567890"),
        "strings untouched"
    );
    let u = change_of(&body("18446744073709551615"));
    assert_eq!(
        row_of(&u)["id"],
        json!("18446744073709551615"),
        "beyond i64: exact text"
    );
    let key = decode_key_header(
        r#"{"schema":{"type":"struct"},"payload":{"id":123456789012345678901234567890}}"#,
    )
    .expect("key header");
    assert_eq!(key["id"], json!("123456789012345678901234567890"));
    assert_eq!(
        decode_key_header(r#"{"id":7}"#).expect("bare")["id"],
        json!(7)
    );
}

fn change_of(body: &str) -> ChangeEvent {
    match decode(body.as_bytes(), "s.public.t").expect("decodes") {
        Decoded::Change(c) => *c,
        other => panic!("{other:?}"),
    }
}

#[test]
fn user_tables_with_metadata_like_columns_are_indexed() {
    // Decided by topic and schema name, never by the columns a row has.
    for row in [
        r#"{"status":"BEGIN","id":"571","event_count":3,"data_collections":null,"__table":"orders"}"#,
        r#"{"id":1,"ddl":"CREATE TABLE x","__table":"migrations"}"#,
        r#"{"ts_ms":5}"#,
    ] {
        assert!(
            matches!(
                decode(row.as_bytes(), "dbserver1.public.orders"),
                Ok(Decoded::Change(_))
            ),
            "{row}"
        );
    }
    let tx_schema = r#"{"schema":{"type":"struct","name":"io.debezium.connector.common.TransactionMetadataValue"},"payload":{"status":"END","id":"1"}}"#;
    assert_eq!(
        decode(tx_schema.as_bytes(), "anything.at.all").unwrap(),
        Decoded::Ignored(Ignored::Transaction)
    );
    let ddl = r#"{"source":{"name":"dbserver1"},"ddl":"ALTER TABLE t","tableChanges":[]}"#;
    assert_eq!(
        decode(ddl.as_bytes(), "dbserver1").unwrap(),
        Decoded::Ignored(Ignored::SchemaChange)
    );
}

#[test]
fn toast_placeholder_in_all_forms_is_removed_and_listed() {
    for name in [
        "pg-toast-update-unavailable-placeholder-no-schema.json",
        "pg-toast-update-unavailable-placeholder-with-schema.json",
    ] {
        let c = change(name);
        let mut gone = c.unavailable.clone();
        gone.sort();
        assert_eq!(
            gone,
            ["big_arr", "big_bin", "big_json", "big_text"],
            "{name}"
        );
        let text = serde_json::to_string(row_of(&c)).unwrap();
        assert!(
            !text.contains("__debezium_unavailable_value"),
            "{name}: {text}"
        );
        assert!(
            !text.contains("X19kZWJleml1bV91bmF2YWlsYWJsZV92YWx1ZQ"),
            "{name}: {text}"
        );
    }
    // The create before it carries the real values.
    assert!(
        change("pg-toast-create-with-schema.json")
            .unavailable
            .is_empty()
    );
}

#[test]
fn schema_decodes_decimals_and_time_types() {
    let c = change("pg-types-decimal-precise-with-schema.json");
    let row = row_of(&c);
    assert_eq!(row["price"], json!("1234.56"));
    assert_eq!(row["ratio"], json!("12.345"));
    assert_eq!(row["cash"], json!("99.99"));
    assert!(
        row["amount"].as_str().is_some_and(|s| s.contains('.')),
        "amount: {}",
        row["amount"]
    );
    assert_eq!(row["created_at"], json!("2018-06-20T15:13:16.945104"));
    assert_eq!(row["created_at_ms"], json!("2018-06-20T15:13:16.945"));
    assert_eq!(row["day"], json!("2018-06-20"));
    assert_eq!(row["t"], json!("15:13:16.945104"));
    assert_eq!(row["uid"], json!("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"));
    assert_eq!(row["big"], json!(9223372036854775807i64));
    assert_eq!(row["big"].to_string(), "9223372036854775807");
}

#[test]
fn positions_come_from_lsn_or_binlog() {
    let c = change("pg-create-no-schema.json");
    let p = c.position.expect("position");
    assert_eq!(p.connector, "dbserver1");
    assert!(matches!(p.at, PositionAt::Lsn(n) if n > 0));
    let m = change("mysqldoc-update-no-schema.json")
        .position
        .expect("position");
    assert_eq!(
        m.at,
        PositionAt::Binlog {
            file: "mysql-bin.000003".into(),
            pos: 484,
            row: 0
        }
    );
    let u = change("unwrap-rewrite-update-no-schema.json")
        .position
        .expect("position");
    assert!(matches!(u.at, PositionAt::Lsn(_)));
}

#[test]
fn a_record_key_decodes_as_a_row_of_its_routing_key_table() {
    let d = decode(
        &fixture("mysqldoc-key-with-schema.json"),
        "mysql-server-1.inventory.customers",
    )
    .unwrap();
    let Decoded::Change(c) = d else {
        panic!("{d:?}")
    };
    assert_eq!(c.table.to_string(), "inventory.customers");
}

#[test]
fn logical_messages_and_metadata_are_ignored() {
    let m = br#"{"op":"m","source":{"name":"s"},"message":{"prefix":"p","content":"eA=="}}"#;
    assert_eq!(
        decode(m, "a.b.c").unwrap(),
        Decoded::Ignored(Ignored::LogicalMessage)
    );
    let tx = br#"{"status":"BEGIN","id":"571","event_count":null,"data_collections":null}"#;
    assert_eq!(
        decode(tx, "a.transaction").unwrap(),
        Decoded::Ignored(Ignored::Transaction)
    );
    let hb = br#"{"ts_ms":1}"#;
    assert_eq!(
        decode(hb, "__debezium-heartbeat.a").unwrap(),
        Decoded::Ignored(Ignored::Heartbeat)
    );
}

#[test]
fn bad_bodies_are_errors_with_reasons() {
    let cases: &[(&[u8], &str)] = &[
        (b"{\"op\":\"c\",", "not JSON"),
        (b"[1,2]", "not an object"),
        (b"\xff\xfe", "not UTF-8"),
        (
            br#"{"op":"x","source":{"table":"t","schema":"s"},"after":{}}"#,
            "unknown op `x`",
        ),
        (
            br#"{"op":"c","source":{"table":"t","schema":"s"},"after":null}"#,
            "without an `after`",
        ),
        (
            br#"{"op":"d","source":{"table":"t","schema":"s"},"before":null}"#,
            "without a `before`",
        ),
        (br#"{"op":7,"source":{}}"#, "`op` must be a string"),
        (
            br#"{"op":"c","source":"x","after":{}}"#,
            "`source` must be an object",
        ),
        (
            br#"{"op":"c","source":{"table":"t","schema":"s"},"after":[1]}"#,
            "must be an object or null",
        ),
        (br#"{"id":1,"__deleted":"maybe"}"#, "`__deleted`"),
    ];
    for (body, want) in cases {
        let e = decode(body, "p.s.t").expect_err(want).to_string();
        assert!(e.contains(want), "expected `{want}` in `{e}`");
    }
    let e = decode(br#"{"id":1}"#, "two.segments")
        .expect_err("no table")
        .to_string();
    assert!(e.contains("routing key"), "{e}");
}

#[test]
fn deep_nesting_is_an_error_not_a_crash() {
    let body = "[".repeat(100_000);
    assert!(decode(body.as_bytes(), "a.b.c").is_err());
}

#[test]
fn decimals_an_f64_cannot_hold_keep_their_exact_text() {
    // Kafka Connect's JsonConverter writes decimals as JSON numbers with
    // `decimal.format=NUMERIC`: a numeric(38,10) value has more digits than an f64 holds.
    let body = r#"{"op":"c","source":{"name":"s","schema":"public","table":"t","lsn":1},"after":{"id":1,"big":12345678901234567890.1234567890,"pi":3.14159265358979323846264338327950288,"tiny":1e-400,"plain":1.5,"trailing":1.50,"java":1.0E-5,"neg":-0.1}}"#;
    let change = change_of(body);
    let row = row_of(&change);
    assert_eq!(row["big"], json!("12345678901234567890.1234567890"));
    assert_eq!(row["pi"], json!("3.14159265358979323846264338327950288"));
    assert_eq!(row["tiny"], json!("1e-400"), "would underflow to 0");
    // Values an f64 holds exactly as written stay numbers.
    assert_eq!(row["plain"], json!(1.5));
    assert_eq!(row["trailing"], json!(1.5), "the same value as 1.5");
    assert_eq!(row["java"], json!(1.0e-5));
    assert_eq!(row["neg"], json!(-0.1));
}
