//! What operators rely on: systemd readiness, metrics, reconnection, the crash-loop guard.

mod common;

use std::process::Command;
use std::time::Duration;

use common::reconcile::*;
use common::*;
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicNackOptions};
use lapin::types::FieldTable;

const PRODUCTS: &str =
    "[[tables]]\ntable = \"public.products\"\nid_columns = [\"id\"]\ntext = \"{name}\"\n";

fn event(id: u64, lsn: u64) -> Vec<u8> {
    serde_json::json!({"op": "c", "before": null, "after": {"id": id, "name": format!("product {id}")},
        "source": {"name": "dbserver1", "schema": "public", "table": "products", "lsn": lsn, "ts_ms": chrono::Utc::now().timestamp_millis()}})
    .to_string()
    .into_bytes()
}

#[test]
fn ready_is_sent_to_systemd_once_consuming() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let w = World::new("notify", PRODUCTS, "");
    let socket_path = w.dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).expect("bind notify socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let log = std::fs::File::create(w.dir.path().join("daemon-notify.log")).expect("log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_cdc-indexer"))
        .args(["--config", path_str(&w.config_path), "run"])
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "2000000")
        .stderr(log)
        .spawn()
        .expect("spawn");
    let mut received = Vec::new();
    let mut buf = [0u8; 512];
    while !received.iter().any(|m: &String| m.contains("WATCHDOG=1")) {
        let n = socket.recv(&mut buf).expect("a notification within 60 s");
        received.push(String::from_utf8_lossy(&buf[..n]).to_string());
    }
    assert!(received[0].starts_with("READY=1"), "{received:?}");
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let n = socket.recv(&mut buf).expect("STOPPING");
    let mut last = String::from_utf8_lossy(&buf[..n]).to_string();
    while last.contains("WATCHDOG") {
        let n = socket.recv(&mut buf).expect("STOPPING");
        last = String::from_utf8_lossy(&buf[..n]).to_string();
    }
    assert_eq!(last, "STOPPING=1");
    assert!(child.wait().expect("wait").success());
    rt.block_on(w.cleanup());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_complete_and_pass_promtool() {
    let w = World::new("metrics", PRODUCTS, "");
    w.declare().await;
    let conn = connect().await;
    let ch = confirm_channel(&conn).await;
    w.publish(&ch, "dbserver1.public.products", &event(1, 10))
        .await;
    w.publish(&ch, "dbserver1.public.products", b"garbage")
        .await;
    let mut d = w.start();
    d.wait_ready(Duration::from_secs(60));
    d.wait_processed(2.0, Duration::from_secs(60));
    // Queue depths come from a poller of their own (on its own connection, every 5 s).
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(15)
        && !d
            .get("/metrics")
            .is_some_and(|(_, t)| t.contains("cdc_indexer_queue_messages{queue=\"dlq\"}"))
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    let (status, text) = d.get("/metrics").expect("metrics");
    assert_eq!(status, 200);
    for name in [
        "cdc_indexer_events_received_total{op=\"c\",table=\"public.products\"} 1",
        "cdc_indexer_events_processed_total{op=\"c\",outcome=\"upserted\",table=\"public.products\"} 1",
        "cdc_indexer_dead_lettered_total{kind=\"decode\",table=\"-\"} 1",
        "cdc_indexer_batch_size_events_bucket",
        "cdc_indexer_embed_duration_seconds_bucket",
        "cdc_indexer_write_duration_seconds_bucket",
        "cdc_indexer_lag_seconds_bucket",
        "cdc_indexer_consumer_paused 0",
        "cdc_indexer_broker_connected 1",
        "cdc_indexer_build_info{version=",
        "cdc_indexer_queue_messages{queue=\"dlq\"}",
    ] {
        assert!(text.contains(name), "missing `{name}` in:\n{text}");
    }
    assert_eq!(d.get("/healthz").map(|r| r.0), Some(200));
    let (ready, body) = d.get("/readyz").expect("readyz");
    assert_eq!(ready, 200, "{body}");

    match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        Ok(mut child) => {
            use std::io::Write;
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(text.as_bytes())
                .expect("write");
            let out = child.wait_with_output().expect("promtool");
            assert!(
                out.status.success(),
                "promtool check metrics:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Err(e) => eprintln!(
            "SKIPPED promtool check metrics: promtool not installed ({e}); scripts/test.sh installs it"
        ),
    }
    assert!(d.sigterm().success());
    w.cleanup().await;
}

/// Closes every connection whose client properties carry `name`; returns how many.
fn close_connections(name: &str) -> usize {
    let out = Command::new("rabbitmqctl")
        .args(["-q", "list_connections", "pid", "client_properties"])
        .output()
        .expect("rabbitmqctl");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut closed = 0;
    for line in text.lines().filter(|l| l.contains(name)) {
        if let Some(pid) = line.split('\t').next() {
            let status = Command::new("rabbitmqctl")
                .args(["-q", "close_connection", pid, "fault injection"])
                .status()
                .expect("close");
            if status.success() {
                closed += 1;
            }
        }
    }
    closed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_the_broker_closes_the_connection_and_loses_nothing() {
    let w = World::new(
        "reconnect",
        PRODUCTS,
        "[pipeline]\nbatch_max_events = 50\nretry_initial_ms = 100\nretry_max_ms = 1000\n",
    );
    // A connection name of our own, to find our connection among the broker's.
    let marker = w.name.clone();
    let text = std::fs::read_to_string(&w.config_path)
        .expect("config")
        .replace(
            "prefetch = 200",
            &format!("prefetch = 200\nconnection_name = \"{marker}\""),
        );
    std::fs::write(&w.config_path, text).expect("config");
    w.declare().await;
    let mut d = w.start();
    d.wait_ready(Duration::from_secs(60));
    let conn = connect().await;
    let ch = confirm_channel(&conn).await;
    let rounds = 10;
    let per_round = 100;
    let mut id = 0;
    for round in 0..rounds {
        for _ in 0..per_round {
            id += 1;
            w.publish(&ch, "dbserver1.public.products", &event(id, 1000 + id))
                .await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            close_connections(&marker) >= 1,
            "round {round}: the daemon's connection was not found"
        );
        // Back and consuming.
        d.wait_ready(Duration::from_secs(30));
    }
    wait_drained(&w, &mut d).await;
    let reconnects = d.metric_sum("cdc_indexer_broker_reconnects_total");
    assert!(d.sigterm().success());
    let index = w.index().await;
    assert_eq!(index.count(None).await, id, "every product indexed");
    drop(index);
    assert!(w.drain_dlq().await.is_empty(), "nothing dead-lettered");
    assert_index_matches(
        &w,
        &[Expected::new(
            "public.products",
            "id int PRIMARY KEY, name text",
            (1..=id).map(|i| serde_json::json!({"id": i, "name": format!("product {i}")})),
        )],
    );
    println!(
        "reconnect test: {rounds} connection kills, {reconnects} reconnects, {id} events, 0 lost"
    );
    assert!(reconnects >= rounds as f64);
    w.cleanup().await;
}

#[tokio::test]
async fn a_message_redelivered_past_the_limit_lands_in_the_dlq_as_delivery_limit() {
    // topology.delivery_limit defaults to 5.
    let w = World::new("delivery-limit", PRODUCTS, "");
    w.declare().await;
    let conn = connect().await;
    let ch = confirm_channel(&conn).await;
    w.publish(&ch, "dbserver1.public.products", &event(7, 70))
        .await;
    // A consumer that "crashes" on it every time: the broker counts each return.
    let consumer_channel = conn.create_channel().await.expect("channel");
    let mut consumer = consumer_channel
        .basic_consume(
            w.queue.as_str().into(),
            "crasher".into(),
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
    assert!(deliveries >= 5, "{deliveries} deliveries");
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
    let entries: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(entries[0]["error_kind"], "delivery-limit", "{entries}");
    assert_eq!(entries[0]["table"], "public.products");
    assert_eq!(entries[0]["routing_key"], "dbserver1.public.products");
    let _ = conn.close(200, "ok".into()).await;
    w.cleanup().await;
}

/// A connection the broker closes in the middle of a long batch is noticed at once: not
/// ready within a second (not when the batch's ack fails later), and the daemon reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_closed_during_a_long_batch_is_noticed_at_once() {
    let rules = "[[tables]]\ntable = \"public.products\"\nid_columns = [\"id\"]\ntext = \"{name}\"\nchunk_size = 20\nchunk_overlap = 0\n";
    let w = World::new(
        "noticed",
        rules,
        "[pipeline]\nbatch_max_texts = 100000\nretry_initial_ms = 100\n",
    );
    let marker = w.name.clone();
    let text = std::fs::read_to_string(&w.config_path)
        .expect("config")
        .replace(
            "prefetch = 200",
            &format!("prefetch = 200\nconnection_name = \"{marker}\""),
        );
    std::fs::write(&w.config_path, text).expect("config");
    w.declare().await;
    let conn = connect().await;
    let ch = confirm_channel(&conn).await;
    // 100 documents of 20 chunks each: one batch that embeds for seconds.
    for id in 1..=100u64 {
        let name: String = (0..20)
            .map(|i| format!("part {i:02} of {id:03} "))
            .collect();
        let body = serde_json::json!({"op": "c", "after": {"id": id, "name": name},
            "source": {"name": "dbserver1", "schema": "public", "table": "products", "lsn": id}});
        w.publish(
            &ch,
            "dbserver1.public.products",
            body.to_string().as_bytes(),
        )
        .await;
    }
    let mut d = w.start();
    d.wait_ready(Duration::from_secs(60));
    // The batch is being embedded.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        d.metric_sum("cdc_indexer_events_processed_total"),
        0.0,
        "still working"
    );
    assert!(
        close_connections(&marker) >= 1,
        "the daemon's connection was not found"
    );
    let closed = std::time::Instant::now();
    let mut noticed = None;
    while closed.elapsed() < Duration::from_secs(10) {
        // Not ready, or (the reconnect is quick) already reconnected.
        if d.get("/readyz").map(|r| r.0) == Some(503)
            || d.metric_sum("cdc_indexer_broker_reconnects_total") >= 1.0
        {
            noticed = Some(closed.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let noticed = noticed.unwrap_or_else(|| panic!("not noticed within 10 s: {}", d.log()));
    println!("connection closed mid-batch: not ready after {noticed:?}");
    assert!(
        noticed < Duration::from_secs(1),
        "noticed only after {noticed:?}"
    );
    // Every delivery of the lost session comes back and is received twice: wait for the
    // 100 to be processed, not for received = processed.
    d.wait_processed(100.0, Duration::from_secs(300));
    assert!(d.sigterm().success());
    let points: usize = (1..=100u64)
        .map(|id| {
            let name: String = (0..20)
                .map(|i| format!("part {i:02} of {id:03} "))
                .collect();
            cdc_indexer::mapping::chunk_text(name.trim(), 20, 0).len()
        })
        .sum();
    assert_eq!(w.index().await.count(None).await, points as u64);
    assert!(w.drain_dlq().await.is_empty());
    let _ = conn.close(200, "ok".into()).await;
    w.cleanup().await;
}

/// A dead-letter queue that refuses what it is sent (full, `reject-publish`) pauses intake
/// with the poison's batch unacked, in the same session: no reconnect, so no delivery is
/// returned and charged against `x-delivery-limit` (a session torn down and reopened every
/// second would charge every prefetched delivery each time, until the broker dead-letters
/// healthy ones). Once the DLQ takes messages again, the poison is dead-lettered and the
/// rest indexed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dlq_that_refuses_dead_letters_pauses_intake_without_returning_deliveries() {
    let w = World::new(
        "dlq-refuses",
        PRODUCTS,
        "[pipeline]\nretry_initial_ms = 100\nretry_max_ms = 1000\n",
    );
    w.declare().await;
    let policy = format!("{}-full", w.name);
    let set = Command::new("rabbitmqctl")
        .args([
            "-q",
            "set_policy",
            "--apply-to",
            "queues",
            &policy,
            &format!("^{}$", regex_escape(&w.dlq)),
            r#"{"max-length":0,"overflow":"reject-publish"}"#,
        ])
        .output()
        .expect("rabbitmqctl");
    assert!(set.status.success(), "{set:?}");
    let conn = connect().await;
    let ch = confirm_channel(&conn).await;
    for id in 1..=20u64 {
        w.publish(&ch, "dbserver1.public.products", &event(id, id))
            .await;
    }
    w.publish(
        &ch,
        "dbserver1.public.products",
        b"this is not a Debezium event",
    )
    .await;
    for id in 21..=40u64 {
        w.publish(&ch, "dbserver1.public.products", &event(id, id))
            .await;
    }
    let mut d = w.start();
    d.wait_ready(Duration::from_secs(60));
    d.wait_metric("cdc_indexer_consumer_paused", 1.0, Duration::from_secs(30));
    assert_eq!(d.get("/readyz").map(|r| r.0), Some(503));
    // Refused for a while: retried in place, the session kept.
    std::thread::sleep(Duration::from_secs(5));
    assert!(d.metric_sum("cdc_indexer_retries_total") >= 2.0);
    assert_eq!(
        d.metric_sum("cdc_indexer_broker_reconnects_total"),
        0.0,
        "the session was torn down (and every prefetched delivery returned): {}",
        d.log()
    );
    let clear = Command::new("rabbitmqctl")
        .args(["-q", "clear_policy", &policy])
        .output()
        .expect("rabbitmqctl");
    assert!(clear.status.success(), "{clear:?}");
    d.wait_processed(41.0, Duration::from_secs(60));
    assert_eq!(d.metric_sum("cdc_indexer_consumer_paused"), 0.0);
    assert_eq!(d.metric_sum("cdc_indexer_broker_reconnects_total"), 0.0);
    assert_eq!(d.metric_sum("cdc_indexer_redelivered_total"), 0.0);
    assert!(d.sigterm().success());
    let dlq = w.drain_dlq().await;
    assert_eq!(dlq.len(), 1, "the poison, once");
    assert_eq!(w.index().await.count(None).await, 40);
    let _ = conn.close(200, "ok".into()).await;
    w.cleanup().await;
}

/// A dead-letter queue unbound from its exchange behind the daemon's back: the dead letter
/// comes back unroutable, the daemon binds the queue again and publishes it, in the same
/// session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unbound_dlq_is_bound_again_without_losing_the_session() {
    let w = World::new("dlq-unbound", PRODUCTS, "");
    let mut d = w.start();
    d.wait_ready(Duration::from_secs(60));
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
    w.publish(&ch, "dbserver1.public.products", &event(1, 1))
        .await;
    w.publish(&ch, "dbserver1.public.products", b"not an event")
        .await;
    w.publish(&ch, "dbserver1.public.products", &event(2, 2))
        .await;
    d.wait_processed(3.0, Duration::from_secs(60));
    assert!(d.metric_sum("cdc_indexer_dead_letters_unroutable_total") >= 1.0);
    assert_eq!(
        d.metric_sum("cdc_indexer_broker_reconnects_total"),
        0.0,
        "{}",
        d.log()
    );
    assert!(d.sigterm().success());
    assert_eq!(w.drain_dlq().await.len(), 1);
    assert_eq!(w.index().await.count(None).await, 2);
    let _ = conn.close(200, "ok".into()).await;
    w.cleanup().await;
}

fn regex_escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                vec![c]
            } else {
                vec!['\\', c]
            }
        })
        .collect()
}
