//! Topology and DLQ tooling against the real RabbitMQ.

mod common;

use std::collections::BTreeMap;
use std::process::Command;

use cdc_indexer::broker::dead_letter::{DeadLetter, DeadLetterPublisher};
use cdc_indexer::dlq::{self, ReplayArgs};
use common::*;
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable, LongString};

const TABLES: &str =
    "[[tables]]\ntable = \"public.products\"\nid_columns = [\"id\"]\ntext = \"{name}\"\n";

#[tokio::test]
async fn topology_declare_is_idempotent() {
    let w = World::new("topo-idem", TABLES, "");
    w.declare().await;
    w.declare().await;
    // The CLI does the same.
    let out = Command::new(env!("CARGO_BIN_EXE_cdc-indexer"))
        .args(["--config", path_str(&w.config_path), "topology", "declare"])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(w.queue_depth(&w.queue).await, 0);
    assert_eq!(w.queue_depth(&w.dlq).await, 0);
    w.cleanup().await;
}

#[tokio::test]
async fn conflicting_queue_is_a_clear_start_error() {
    let w = World::new("topo-conflict", TABLES, "");
    // Someone created the main queue as a classic queue without our arguments.
    let conn = connect().await;
    let ch = conn.create_channel().await.expect("channel");
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("classic")),
    );
    ch.queue_declare(
        w.queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .expect("declare classic");
    let out = Command::new(env!("CARGO_BIN_EXE_cdc-indexer"))
        .args(["--config", path_str(&w.config_path), "topology", "declare"])
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(3),
        "fatal exit code; stderr: {stderr}"
    );
    assert!(stderr.contains(&format!("queue `{}`", w.queue)), "{stderr}");
    assert!(stderr.contains("x-queue-type"), "{stderr}");
    assert!(stderr.contains("quorum"), "{stderr}");
    w.cleanup().await;
}

#[tokio::test]
async fn verify_reports_missing_and_different_objects() {
    let w = World::new("topo-verify", TABLES, "");
    let verify = || {
        Command::new(env!("CARGO_BIN_EXE_cdc-indexer"))
            .args(["--config", path_str(&w.config_path), "topology", "verify"])
            .output()
            .expect("run")
    };
    let out = verify();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert_eq!(stdout.matches("missing").count(), 4, "{stdout}");
    w.declare().await;
    let out = verify();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Drift: the DLQ recreated as a quorum queue.
    let conn = connect().await;
    let ch = conn.create_channel().await.expect("channel");
    ch.queue_delete(w.dlq.as_str().into(), Default::default())
        .await
        .expect("delete");
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    ch.queue_declare(
        w.dlq.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .expect("declare");
    let out = verify();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout.contains(&format!("DRIFT queue `{}`", w.dlq)) && stdout.contains("x-queue-type"),
        "{stdout}"
    );
    w.cleanup().await;
}

#[test]
fn bad_config_fails_at_start_naming_file_and_key() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[broker]\nprefetch = 0\n").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_cdc-indexer"))
        .args(["--config", path_str(&path), "run"])
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr.contains("bad.toml: broker.prefetch: must be at least 1"),
        "{stderr}"
    );
}

#[test]
fn checked_in_definitions_equal_the_export_of_the_default_config() {
    let out = Command::new(env!("CARGO_BIN_EXE_cdc-indexer"))
        .args([
            "--config",
            &format!("{REPO}/config.toml"),
            "topology",
            "export",
        ])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let exported: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let file = std::fs::read(format!("{REPO}/topology/definitions.json"))
        .expect("topology/definitions.json");
    let checked_in: serde_json::Value = serde_json::from_slice(&file).expect("json");
    assert_eq!(
        exported, checked_in,
        "regenerate with: cdc-indexer topology export > topology/definitions.json"
    );
}

/// Puts `n` dead letters per (table, kind) into the DLQ, as the daemon would.
async fn seed_dlq(w: &World, entries: &[(&str, &str, u64)]) {
    let conn = connect().await;
    let publisher = DeadLetterPublisher::open(&conn, &w.dlx)
        .await
        .expect("publisher");
    for (table, kind, id) in entries {
        let body = serde_json::json!({"op": "c", "after": {"id": id}, "source": {"table": table}})
            .to_string();
        let letter = DeadLetter {
            kind: if *kind == "decode" {
                "decode"
            } else {
                "mapping"
            },
            reason: format!("{kind} failed for {id}"),
        };
        publisher
            .publish(
                body.as_bytes(),
                &lapin::BasicProperties::default(),
                &w.exchange,
                &format!("dbserver1.public.{table}"),
                &letter,
            )
            .await
            .expect("dead letter");
    }
    let _ = conn.close(200, "ok".into()).await;
}

fn ids(entries: &[(String, BTreeMap<String, String>, Vec<u8>)]) -> Vec<u64> {
    let mut ids: Vec<u64> = entries
        .iter()
        .map(|(_, _, body)| {
            serde_json::from_slice::<serde_json::Value>(body).expect("json")["after"]["id"]
                .as_u64()
                .expect("id")
        })
        .collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn replay_honours_filters_and_loses_or_duplicates_nothing() {
    let w = World::new("dlq-replay", TABLES, "");
    w.declare().await;
    seed_dlq(
        &w,
        &[
            ("products", "decode", 1),
            ("products", "mapping", 2),
            ("orders", "mapping", 3),
            ("products", "mapping", 4),
        ],
    )
    .await;
    let config = w.config();
    let conn = connect().await;

    // Peek removes nothing.
    let out = Command::new(env!("CARGO_BIN_EXE_cdc-indexer"))
        .args([
            "--config",
            path_str(&w.config_path),
            "dlq",
            "peek",
            "--json",
        ])
        .output()
        .expect("peek");
    let peeked: serde_json::Value = serde_json::from_slice(&out.stdout).expect("peek json");
    assert_eq!(peeked.as_array().map(Vec::len), Some(4));
    assert_eq!(peeked[0]["error_kind"], "decode");
    assert_eq!(peeked[0]["table"], "public.products");
    assert_eq!(w.queue_depth(&w.dlq).await, 4);

    // Dry run changes nothing.
    let dry = dlq::replay(
        &conn,
        &config,
        &ReplayArgs {
            limit: None,
            table: None,
            error_kind: None,
            dry_run: true,
        },
    )
    .await
    .expect("dry");
    assert_eq!((dry.replayed, dry.failed), (4, 0));
    assert_eq!(w.queue_depth(&w.dlq).await, 4);
    assert_eq!(w.queue_depth(&w.queue).await, 0);

    // Only mapping errors of products: ids 2 and 4.
    let args = ReplayArgs {
        limit: None,
        table: Some("public.products".into()),
        error_kind: Some("mapping".into()),
        dry_run: false,
    };
    let s = dlq::replay(&conn, &config, &args).await.expect("replay");
    assert_eq!((s.scanned, s.replayed, s.skipped, s.failed), (4, 2, 2, 0));
    assert_eq!(w.queue_depth(&w.queue).await, 2);
    assert_eq!(w.queue_depth(&w.dlq).await, 2);

    // The replayed messages are in the main queue with their count raised and no old reason.
    let replayed = consume_n(&w.queue, 2).await;
    for (rk, headers, _) in &replayed {
        assert_eq!(
            headers.get("x-cdc-replay-count").map(String::as_str),
            Some("1")
        );
        assert!(!headers.contains_key("x-cdc-error"));
        assert_eq!(rk, "dbserver1.public.products");
    }
    assert_eq!(ids(&replayed), vec![2, 4]);

    // Suppose id 2 fails again: it returns to the DLQ with its count raised.
    let again = replayed
        .iter()
        .find(|(_, _, b)| ids(&[(String::new(), BTreeMap::new(), b.clone())]) == vec![2])
        .expect("id 2");
    let publisher = DeadLetterPublisher::open(&conn, &w.dlx)
        .await
        .expect("publisher");
    let mut table = FieldTable::default();
    for (k, v) in &again.1 {
        table.insert(
            k.as_str().into(),
            AMQPValue::LongString(LongString::from(v.as_str())),
        );
    }
    publisher
        .publish(
            &again.2,
            &lapin::BasicProperties::default().with_headers(table),
            &w.exchange,
            &again.0,
            &DeadLetter {
                kind: "mapping",
                reason: "still bad".into(),
            },
        )
        .await
        .expect("dead letter again");
    let s = dlq::replay(
        &conn,
        &config,
        &ReplayArgs {
            limit: Some(1),
            table: Some("public.products".into()),
            error_kind: Some("mapping".into()),
            dry_run: false,
        },
    )
    .await
    .expect("replay");
    assert_eq!(s.replayed, 1);
    let again = consume_n(&w.queue, 1).await;
    assert_eq!(
        again[0].1.get("x-cdc-replay-count").map(String::as_str),
        Some("2")
    );
    // Nothing lost: decode 1 and orders 3 are still in the DLQ.
    let left = w.drain_dlq().await;
    assert_eq!(ids(&left), vec![1, 3]);
    let _ = conn.close(200, "ok".into()).await;
    w.cleanup().await;
}

#[tokio::test]
async fn stats_count_by_kind_and_table_and_purge_needs_yes() {
    let w = World::new("dlq-stats", TABLES, "");
    w.declare().await;
    seed_dlq(
        &w,
        &[
            ("products", "decode", 1),
            ("products", "mapping", 2),
            ("orders", "mapping", 3),
        ],
    )
    .await;
    let out = Command::new(env!("CARGO_BIN_EXE_cdc-indexer"))
        .args([
            "--config",
            path_str(&w.config_path),
            "dlq",
            "stats",
            "--json",
        ])
        .output()
        .expect("stats");
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(stats["depth"], 3);
    assert_eq!(stats["by_error_kind"]["mapping"], 2);
    assert_eq!(stats["by_table"]["public.orders"], 1);
    assert!(
        stats["oldest_age_seconds"]
            .as_i64()
            .is_some_and(|s| (0..600).contains(&s)),
        "{stats}"
    );
    assert_eq!(w.queue_depth(&w.dlq).await, 3, "stats removes nothing");

    let out = Command::new(env!("CARGO_BIN_EXE_cdc-indexer"))
        .args(["--config", path_str(&w.config_path), "dlq", "purge"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("purge");
    assert!(!out.status.success());
    assert_eq!(w.queue_depth(&w.dlq).await, 3);
    let out = Command::new(env!("CARGO_BIN_EXE_cdc-indexer"))
        .args([
            "--config",
            path_str(&w.config_path),
            "dlq",
            "purge",
            "--yes",
        ])
        .output()
        .expect("purge");
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("purged 3 entries from {}", w.dlq)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("ERROR") && !stderr.contains('\x1b'),
        "a clean exit logs no error, and no colour codes into a pipe: {stderr}"
    );
    assert_eq!(w.queue_depth(&w.dlq).await, 0);
    w.cleanup().await;
}
