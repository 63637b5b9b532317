//! Column types through the real Debezium engine, with reconcile as the judge: a table with a
//! column of every common PostgreSQL type (and NULLs in each) is captured by the real Debezium
//! 3.6.3 engine (debezium/runner.py) under several connector configurations, indexed by the
//! daemon, and must then reconcile with exit 0: the pipeline (src/decode/) and reconcile's
//! source reading (src/reconcile/source.rs) render every value the same way.

mod common;

use std::time::Duration;

use common::debezium::*;
use common::reconcile::*;
use common::*;
use serde_json::Value;

/// Every type, in that order (`id` apart).
const COLUMNS: &str = "id int PRIMARY KEY, si smallint, i integer, bi bigint, n numeric(12,3), \
     nu numeric, r real, d double precision, b boolean, t text, vc varchar(20), c char(5), \
     dt date, tm time, ttz timetz, ts timestamp, tstz timestamptz, iv interval, ba bytea, \
     m money, j json, jb jsonb, u uuid, ta text[], ia int[]";

/// The template covers several types; every column is in the payload.
const TEMPLATE: &str =
    "{t} / {vc} / {c} / {n} / {nu} / {d} / {b} / {dt} / {tm} / {ts} / {tstz} / {ta} / {ia}";

/// The columns after `id`, in table order.
const NAMES: [&str; 24] = [
    "si", "i", "bi", "n", "nu", "r", "d", "b", "t", "vc", "c", "dt", "tm", "ttz", "ts", "tstz",
    "iv", "ba", "m", "j", "jb", "u", "ta", "ia",
];

/// SQL literals for every column but `id`, in table order (`variant` picks a set; 3 is NULLs).
/// Chosen where renderings part: a `real` that Java 17 prints with extra digits (-3.5e10), one
/// it cannot hold (16777217), a double beyond 64-bit integers (1e20), `timetz` in other zones
/// with fractions, intervals with months and negative fields, a decimal Java would print in
/// E-notation (1E-8), pre-epoch timestamps with sub-millisecond digits.
fn literals(variant: u32) -> [&'static str; 24] {
    match variant {
        0 => [
            "-32768",
            "2147483647",
            "9223372036854775807",
            "1234.5",
            "3.14159265358979323846264338327950288",
            "0.1",
            "2.718281828459045",
            "true",
            "'plain text, ünïcödé and ''quotes'''",
            "'varchar'",
            "'ab'",
            "'2024-02-29'",
            "'13:14:15.123456'",
            "'13:14:15.5+02'",
            "'2024-02-29 13:14:15.123456'",
            "'2024-02-29 13:14:15.123456+01'",
            "'1 year 2 mons 3 days 04:05:06.789'",
            r"'\xdeadbeef'",
            "1234.56",
            r#"'{"b": 1,  "a": [1, 2]}'"#,
            r#"'{"b": 1, "a": [1, 2]}'"#,
            "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'",
            "ARRAY['x', 'y z', NULL]",
            "ARRAY[1, 2, 3]",
        ],
        1 => [
            "7",
            "-2147483648",
            "-9223372036854775808",
            "-0.001",
            "0.00000001",
            "-3.5e10",
            "-1e-300",
            "false",
            "''",
            "'v'",
            "'abcde'",
            "'1969-07-20'",
            "'00:00:00'",
            "'23:59:59.999999-07'",
            "'1969-07-20 20:17:40.5005'",
            "'1969-07-20 20:17:40.5-05'",
            "'-1 year -2 mons +3 days -04:05:06.5'",
            r"'\x'",
            "-5.25",
            "'[]'",
            "'{}'",
            "'00000000-0000-0000-0000-000000000000'",
            "'{}'",
            "'{}'",
        ],
        2 => [
            "0",
            "0",
            "0",
            "0",
            "100",
            "16777217",
            "1e20",
            "true",
            "'second version'",
            "'changed'",
            "'x'",
            "'2000-01-01'",
            "'12:00:00.123456'",
            "'12:30:00.5+05:30'",
            "'2000-01-01 00:00:00.000001'",
            "'2000-01-01 00:00:00+00'",
            "'1 year 2 mons 3 days 04:05:06.789'",
            r"'\x00ff'",
            "0",
            r#"'{"nested": {"k": [null, true]}}'"#,
            r#"'{"nested": {"k": [null, true]}}'"#,
            "'ffffffff-ffff-ffff-ffff-ffffffffffff'",
            "ARRAY['only']",
            "ARRAY[-1]",
        ],
        // As 1, with the floats that are not numbers.
        4 => {
            let mut l = literals(1);
            (l[5], l[6]) = ("'-Infinity'", "'NaN'");
            l
        }
        _ => ["NULL"; 24],
    }
}

/// `(id, v1, v2, …)` for an INSERT.
fn row(id: u32, variant: u32) -> String {
    format!("({id}, {})", literals(variant).join(", "))
}

/// `si = …, i = …, …` for an UPDATE.
fn set(variant: u32) -> String {
    NAMES
        .iter()
        .zip(literals(variant))
        .map(|(n, v)| format!("{n} = {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

async fn column_types_through_debezium(
    test: &str,
    properties: &[&str],
    reconcile_env: &[(&str, &str)],
) {
    pg_start();
    let t = format!("types_{}", rand_suffix());
    psql(&format!(
        "CREATE TABLE public.{t} ({COLUMNS}); \
         INSERT INTO public.{t} VALUES {}, {}, {}",
        row(1, 0),
        row(2, 1),
        row(3, 3)
    ));
    let rules = format!(
        "[[tables]]\ntable = \"public.{t}\"\nid_columns = [\"id\"]\ntext = \"{TEMPLATE}\"\n"
    );
    let w = World::new(test, &rules, "");
    w.declare().await;
    let tap_name = tap(&w).await;
    let mut d = w.start();
    d.wait_ready(Duration::from_secs(60));
    let mut runner = Runner::start(&w, &[&t], properties);
    tap_wait(&w, &tap_name, 3, &runner).await;
    wait_drained(&w, &mut d).await;
    // Inserts, updates (values to NULLs and back), a delete.
    psql(&format!(
        "INSERT INTO public.{t} VALUES {}, {}",
        row(4, 1),
        row(5, 3)
    ));
    psql(&format!("UPDATE public.{t} SET {} WHERE id = 1", set(2)));
    psql(&format!("UPDATE public.{t} SET {} WHERE id = 3", set(4)));
    psql(&format!("DELETE FROM public.{t} WHERE id = 2"));
    // 3 snapshot reads, 2 creates, 2 updates, a delete and its tombstone.
    tap_wait(&w, &tap_name, 3 + 2 + 2 + 2, &runner).await;
    wait_drained(&w, &mut d).await;
    runner.stop();
    let published = tap_take(&tap_name).await;
    assert!(d.sigterm().success());
    let dead = w.drain_dlq().await;
    assert!(
        dead.is_empty(),
        "dead-lettered: {:?}",
        dead.iter().map(|d| &d.1).collect::<Vec<_>>()
    );
    // One document and one event, for the eye.
    let table = format!("public.{t}");
    {
        let index = w.index().await;
        for id in [1, 3, 5] {
            let doc = index.doc(&table, &format!("{{\"id\":{id}}}")).await;
            let payload = doc.first().map(|p| Value::Object(p.payload.clone()));
            println!(
                "{test}: document {id}: {}",
                serde_json::to_string_pretty(&payload).unwrap_or_default()
            );
        }
    }
    for (_, _, body) in &published {
        let event: Value = serde_json::from_slice(body).unwrap_or_default();
        let p = &event["payload"];
        if !p.is_null() {
            println!("{test}: Debezium sent {}: {}", p["op"], p["after"]);
        }
    }
    let r = reconcile_with(&w, &[], reconcile_env);
    assert_eq!(
        r.code,
        0,
        "{test}: reconcile found drift: {}\n{}",
        serde_json::to_string_pretty(&r.json).unwrap_or_default(),
        r.stderr
    );
    assert_eq!(r.count(&table, "ok"), 4, "{}", r.json);
    psql(&format!("DROP TABLE public.{t}"));
    tap_delete(&tap_name).await;
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn column_types_reconcile_with_the_default_connector_config() {
    column_types_through_debezium("types-default", &[], &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn column_types_reconcile_with_decimal_handling_string() {
    column_types_through_debezium("types-string", &["decimal.handling.mode=string"], &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn column_types_reconcile_with_decimal_handling_double() {
    column_types_through_debezium(
        "types-double",
        &["decimal.handling.mode=double"],
        &[("CDC_INDEXER__RECONCILE__DECIMAL_HANDLING_MODE", "double")],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn column_types_reconcile_with_time_precision_connect() {
    column_types_through_debezium(
        "types-connect",
        &["time.precision.mode=connect"],
        &[("CDC_INDEXER__RECONCILE__TIME_PRECISION_MODE", "connect")],
    )
    .await;
}
