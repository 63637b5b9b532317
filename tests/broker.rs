//! Topology and DLQ tooling against the real RabbitMQ.

mod common;

use std::collections::BTreeMap;
use std::process::Command;

use std::sync::Arc;
use std::time::{Duration, Instant};

use cdc_indexer::broker::dead_letter::{DeadLetter, DeadLetterPublisher};
use cdc_indexer::dlq::{self, ReplayArgs};
use cdc_indexer::error::ErrorKind;
use common::*;
use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, QueueBindOptions,
    QueueDeclareOptions,
};
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

    // The replayed messages are in the main queue with their count raised and no old reason;
    // they came through the default exchange, the original exchange and key in headers.
    let replayed = consume_n(&w.queue, 2).await;
    for (rk, headers, _) in &replayed {
        assert_eq!(
            headers.get("x-cdc-replay-count").map(String::as_str),
            Some("1")
        );
        assert!(!headers.contains_key("x-cdc-error"));
        assert_eq!(rk, &w.queue);
        assert_eq!(
            headers
                .get("x-cdc-original-routing-key")
                .map(String::as_str),
            Some("dbserver1.public.products")
        );
        assert_eq!(
            headers.get("x-cdc-original-exchange").map(String::as_str),
            Some(w.exchange.as_str())
        );
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
            "",
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
    assert_eq!(
        again[0]
            .1
            .get("x-cdc-original-routing-key")
            .map(String::as_str),
        Some("dbserver1.public.products"),
        "a second dead-lettering keeps the original routing key"
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

fn dlq_json(w: &World, command: &str) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_cdc-indexer"))
        .args([
            "--config",
            path_str(&w.config_path),
            "dlq",
            command,
            "--json",
        ])
        .output()
        .expect("dlq");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

#[tokio::test]
async fn replay_goes_into_our_queue_only_never_to_other_consumers_of_the_exchange() {
    let w = World::new("dlq-own-queue", TABLES, "");
    w.declare().await;
    // Another consumer of the same CDC stream.
    let other = format!("{}.other", w.name);
    let conn = connect().await;
    let ch = conn.create_channel().await.expect("channel");
    ch.queue_declare(
        other.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("declare other");
    ch.queue_bind(
        other.as_str().into(),
        w.exchange.as_str().into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind other");
    seed_dlq(
        &w,
        &[("products", "mapping", 1), ("products", "mapping", 2)],
    )
    .await;
    let s = dlq::replay(
        &conn,
        &w.config(),
        &ReplayArgs {
            limit: None,
            table: None,
            error_kind: None,
            dry_run: false,
        },
    )
    .await
    .expect("replay");
    assert_eq!((s.replayed, s.failed), (2, 0));
    assert_eq!(w.queue_depth(&w.queue).await, 2);
    assert_eq!(
        w.queue_depth(&other).await,
        0,
        "the other consumer gets no duplicate"
    );
    // The pipeline reads the original routing key back.
    let replayed = consume_n(&w.queue, 2).await;
    let mut headers = FieldTable::default();
    for (k, v) in &replayed[0].1 {
        headers.insert(
            k.as_str().into(),
            AMQPValue::LongString(LongString::from(v.as_str())),
        );
    }
    assert_eq!(
        cdc_indexer::broker::routing_key_of(&replayed[0].0, Some(&headers)),
        "dbserver1.public.products"
    );
    let _ = ch
        .queue_delete(other.as_str().into(), Default::default())
        .await;
    let _ = conn.close(200, "ok".into()).await;
    w.cleanup().await;
}

#[tokio::test]
async fn entries_the_broker_dead_lettered_have_a_time_and_count_in_the_oldest_age() {
    let w = World::new("dlq-broker-time", TABLES, "");
    w.declare().await;
    // A queue whose messages expire at once into our DLX: the broker dead-letters them, with
    // an `x-death` record whose `time` is an AMQP timestamp.
    let expiring = format!("{}.ttl", w.name);
    let conn = connect().await;
    let ch = confirm_channel(&conn).await;
    let mut args = FieldTable::default();
    args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(0));
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from(w.dlx.as_str())),
    );
    ch.queue_declare(
        expiring.as_str().into(),
        QueueDeclareOptions::default(),
        args,
    )
    .await
    .expect("declare");
    for id in 0..3 {
        let body = serde_json::json!({"op": "c", "after": {"id": id}}).to_string();
        ch.basic_publish(
            "".into(),
            expiring.as_str().into(),
            BasicPublishOptions::default(),
            body.as_bytes(),
            lapin::BasicProperties::default(),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    }
    let start = Instant::now();
    while w.queue_depth(&w.dlq).await < 3 && start.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let peeked = dlq_json(&w, "peek");
    let failed_at = peeked[0]["failed_at"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        chrono::DateTime::parse_from_rfc3339(&failed_at).is_ok(),
        "failed_at is a time, not a debug dump: {peeked}"
    );
    let stats = dlq_json(&w, "stats");
    assert_eq!(stats["depth"], 3);
    assert!(
        stats["oldest_age_seconds"]
            .as_i64()
            .is_some_and(|s| (0..600).contains(&s)),
        "broker-dead-lettered entries count in the oldest age: {stats}"
    );
    assert_eq!(w.queue_depth(&w.dlq).await, 3, "stats removes nothing");
    let _ = ch
        .queue_delete(expiring.as_str().into(), Default::default())
        .await;
    let _ = conn.close(200, "ok".into()).await;
    w.cleanup().await;
}

/// Delivers the one message of `queue` and requeues it until the broker stops delivering it.
async fn crash_on_every_delivery(conn: &lapin::Connection, queue: &str) -> usize {
    let channel = conn.create_channel().await.expect("channel");
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            format!("crasher-{}", rand_suffix()).as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut deliveries = 0;
    while let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(3), consumer.next()).await
    {
        deliveries += 1;
        d.acker
            .nack(BasicNackOptions {
                requeue: true,
                ..Default::default()
            })
            .await
            .expect("nack");
    }
    let _ = channel.close(200, "done".into()).await;
    deliveries
}

#[tokio::test]
async fn the_broker_dead_letters_at_least_once_keeping_a_message_the_dlq_cannot_take() {
    let w = World::new("dlq-at-least-once", TABLES, "");
    w.declare().await;
    let list = Command::new("rabbitmqctl")
        .args(["-q", "list_queues", "name", "arguments"])
        .output()
        .expect("rabbitmqctl");
    let line = String::from_utf8_lossy(&list.stdout)
        .lines()
        .find(|l| l.starts_with(&format!("{}\t", w.queue)))
        .map(str::to_string)
        .unwrap_or_default();
    assert!(
        line.contains("at-least-once") && line.contains("reject-publish"),
        "{line}"
    );
    // The DLQ unbound: at-most-once would drop the message at its delivery limit; at-least-once
    // keeps it in the main queue until the DLQ can take it.
    let conn = connect().await;
    let ch = confirm_channel(&conn).await;
    ch.queue_unbind(
        w.dlq.as_str().into(),
        w.dlx.as_str().into(),
        "".into(),
        FieldTable::default(),
    )
    .await
    .expect("unbind");
    w.publish(
        &ch,
        "dbserver1.public.products",
        br#"{"op":"c","after":{"id":1}}"#,
    )
    .await;
    let deliveries = crash_on_every_delivery(&conn, &w.queue).await;
    assert!(deliveries >= 5, "{deliveries} deliveries");
    assert_eq!(w.queue_depth(&w.dlq).await, 0);
    // Past its limit, not in the DLQ, and not dropped: the quorum queue holds it as
    // dead-lettered-but-unconfirmed (`messages_dlx`) and retries the DLX (every
    // `dead_letter_worker_publisher_confirm_timeout`, 3 min by default) until a queue takes it.
    let start = Instant::now();
    let mut held = String::new();
    while start.elapsed() < Duration::from_secs(10) {
        let out = Command::new("rabbitmqctl")
            .args([
                "-q",
                "eval",
                &format!(
                    "{{ok, Q}} = rabbit_amqqueue:lookup(rabbit_misc:r(<<\"/\">>, queue, <<\"{}\">>)), \
                     proplists:get_value(messages_dlx, rabbit_quorum_queue:info(Q, [messages_dlx])).",
                    w.queue
                ),
            ])
            .output()
            .expect("rabbitmqctl");
        held = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if held == "1" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        held, "1",
        "the message past its delivery limit is kept, not dropped"
    );
    let _ = conn.close(200, "ok".into()).await;
    w.cleanup().await;
}

#[tokio::test]
async fn an_unroutable_dead_letter_is_never_confirmed() {
    let w = World::new("dlq-unroutable", TABLES, "");
    w.declare().await;
    let conn = connect().await;
    let ch = conn.create_channel().await.expect("channel");
    ch.queue_unbind(
        w.dlq.as_str().into(),
        w.dlx.as_str().into(),
        "".into(),
        FieldTable::default(),
    )
    .await
    .expect("unbind");
    let metrics = Arc::new(cdc_indexer::metrics::Metrics::new().expect("metrics"));
    let publisher = DeadLetterPublisher::open(&conn, &w.dlx)
        .await
        .expect("publisher")
        .with_metrics(metrics.clone());
    let err = publisher
        .publish(
            b"{}",
            &lapin::BasicProperties::default(),
            &w.exchange,
            "dbserver1.public.products",
            &DeadLetter {
                kind: "decode",
                reason: "not a Debezium event".into(),
            },
        )
        .await
        .expect_err("unroutable");
    assert_eq!(err.kind, ErrorKind::Transient, "{err}");
    assert!(err.message.contains("has no queue bound"), "{err}");
    assert_eq!(metrics.dead_letters_unroutable.get(), 1);
    assert!(
        metrics
            .render()
            .contains("cdc_indexer_dead_letters_unroutable_total 1")
    );
    assert_eq!(w.queue_depth(&w.dlq).await, 0);
    let _ = conn.close(200, "ok".into()).await;
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_broker_closes_is_signalled_within_a_second() {
    let w = World::new("watch", TABLES, "");
    let mut config = w.config();
    config.broker.connection_name = w.name.clone();
    let metrics = Arc::new(cdc_indexer::metrics::Metrics::new().expect("metrics"));
    let connection = cdc_indexer::broker::connect(&config.broker, "watched")
        .await
        .expect("connect");
    metrics.set_connected(true);
    let closed = cdc_indexer::broker::watch_connection(&connection, metrics.clone());
    assert!(!closed.is_cancelled());
    // Find our connection by its name and close it as an operator would.
    let mut pid = None;
    let start = Instant::now();
    while pid.is_none() && start.elapsed() < Duration::from_secs(15) {
        let out = Command::new("rabbitmqctl")
            .args(["-q", "list_connections", "pid", "client_properties"])
            .output()
            .expect("rabbitmqctl");
        pid = String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.contains(&w.name))
            .and_then(|l| l.split('\t').next())
            .map(str::to_string);
        if pid.is_none() {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    let pid = pid.expect("our connection is listed");
    let status = Command::new("rabbitmqctl")
        .args(["-q", "close_connection", &pid, "test closes it"])
        .status()
        .expect("close");
    assert!(status.success());
    let closed_at = Instant::now();
    tokio::time::timeout(Duration::from_secs(1), closed.cancelled())
        .await
        .expect("the signal fires within 1 s of the close");
    println!(
        "signalled {} ms after close_connection returned",
        closed_at.elapsed().as_millis()
    );
    assert_eq!(metrics.broker_connected.get(), 0);
    assert!(!metrics.health.ready());
}

#[tokio::test]
async fn a_vhost_we_may_not_open_is_fatal_by_its_reply_code() {
    let w = World::new("vhost", TABLES, "");
    let mut config = w.config();
    config.broker.url = format!("amqp://guest:guest@127.0.0.1:5672/no-such-vhost-{}", w.name);
    let err = cdc_indexer::broker::connect(&config.broker, "vhost")
        .await
        .expect_err("no such vhost");
    assert_eq!(err.kind, ErrorKind::Fatal, "{err}");
    assert!(err.message.contains("virtual host"), "{err}");
    config.broker.url = "amqp://guest:Xy9notthepw@127.0.0.1:5672/%2f".into();
    let err = cdc_indexer::broker::connect(&config.broker, "auth")
        .await
        .expect_err("wrong password");
    assert_eq!(err.kind, ErrorKind::Fatal, "{err}");
    assert!(!err.message.contains("Xy9notthepw"), "no password in {err}");
}
