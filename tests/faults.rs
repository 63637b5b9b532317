//! Fault injection against the real RabbitMQ: crashes at random moments, redeliveries and DLQ
//! replays of old events, a poison corpus. Each test prints its figures.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use cdc_indexer::broker::dead_letter::{DeadLetter, DeadLetterPublisher};
use common::reconcile::*;
use common::*;
use rand::Rng;
use serde_json::json;

/// Documents of one to several chunks (the description grows with the position).
const PRODUCTS: &str = "[[tables]]\ntable = \"public.products\"\nid_columns = [\"id\"]\ntext = \"{name}\\n\\n{description}\"\nchunk_size = 60\nchunk_overlap = 10\n";

fn description(id: u64, lsn: u64) -> String {
    (0..(lsn % 9))
        .map(|i| format!("part{i} of {id}@{lsn}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// One generated change: key, op, source position.
#[derive(Clone, Debug)]
struct Change {
    id: u64,
    op: &'static str,
    lsn: u64,
}

impl Change {
    fn body(&self) -> Vec<u8> {
        let row = json!({"id": self.id, "name": format!("product {} at {}", self.id, self.lsn),
            "description": description(self.id, self.lsn)});
        let (before, after) = if self.op == "d" {
            (row, json!(null))
        } else {
            (json!(null), row)
        };
        json!({"op": self.op, "before": before, "after": after,
               "source": {"name": "dbserver1", "schema": "public", "table": "products", "lsn": self.lsn, "ts_ms": chrono::Utc::now().timestamp_millis()}})
        .to_string()
        .into_bytes()
    }
}

/// `n` random c/u/d changes over `keys` keys, positions increasing.
fn random_changes(n: u64, keys: u64) -> Vec<Change> {
    let mut rng = rand::rng();
    let mut exists = BTreeMap::new();
    (1..=n)
        .map(|lsn| {
            let id = rng.random_range(1..=keys);
            let present = *exists.get(&id).unwrap_or(&false);
            let op = match (present, rng.random_range(0..10)) {
                (false, _) => "c",
                (true, 0..=2) => "d",
                (true, _) => "u",
            };
            exists.insert(id, op != "d");
            Change {
                id,
                op,
                lsn: 1_000 + lsn,
            }
        })
        .collect()
}

/// Final state: id → (expected name, expected text), for ids whose last change is not a delete.
fn expected(changes: &[Change]) -> BTreeMap<u64, (String, String)> {
    let mut last = BTreeMap::new();
    for c in changes {
        last.insert(c.id, c.clone());
    }
    last.into_values()
        .filter(|c| c.op != "d")
        .map(|c| {
            let name = format!("product {} at {}", c.id, c.lsn);
            let text = format!("{name}\n\n{}", description(c.id, c.lsn))
                .trim()
                .to_string();
            (c.id, (name, text))
        })
        .collect()
}

/// The source rows the changes leave: the last version of every id not deleted.
fn expected_rows(changes: &[Change]) -> Expected {
    let mut last = BTreeMap::new();
    for c in changes {
        last.insert(c.id, c.clone());
    }
    Expected::new(
        "public.products",
        "id int PRIMARY KEY, name text, description text",
        last.into_values().filter(|c| c.op != "d").map(|c| {
            json!({"id": c.id, "name": format!("product {} at {}", c.id, c.lsn),
                "description": description(c.id, c.lsn)})
        }),
    )
}

async fn assert_index_equals(w: &World, want: &BTreeMap<u64, (String, String)>, keys: u64) {
    let index = w.index().await;
    let mut points = 0;
    for id in 1..=keys {
        let doc = index
            .doc("public.products", &format!("{{\"id\":{id}}}"))
            .await;
        match want.get(&id) {
            Some((name, text)) => {
                let chunks = cdc_indexer::mapping::chunk_text(text, 60, 10);
                assert_eq!(doc.len(), chunks.len(), "id {id}: chunks");
                for (i, p) in doc.iter().enumerate() {
                    assert_eq!(p.payload["text"], json!(chunks[i]), "id {id} chunk {i}");
                }
                assert_eq!(doc[0].payload["name"], json!(name), "id {id}");
                points += doc.len();
            }
            None => assert!(doc.is_empty(), "id {id} should be deleted: {doc:?}"),
        }
    }
    assert_eq!(
        index.count(Some("public.products")).await,
        points as u64,
        "point count"
    );
}

async fn publish_all(w: &World, changes: &[Change]) {
    let conn = connect().await;
    let ch = confirm_channel(&conn).await;
    for c in changes {
        w.publish(&ch, "dbserver1.public.products", &c.body()).await;
    }
    let _ = conn.close(200, "ok".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_under_load_loses_nothing() {
    let w = World::new(
        "chaos-kill",
        PRODUCTS,
        "[pipeline]\nbatch_max_events = 40\nbatch_max_wait_ms = 50\n",
    );
    w.declare().await;
    let keys = 150;
    let changes = random_changes(1500, keys);
    // Publish in the background while the daemon is killed and restarted.
    let publisher = {
        let changes = changes.clone();
        let exchange = w.exchange.clone();
        tokio::spawn(async move {
            let conn = connect().await;
            let ch = confirm_channel(&conn).await;
            for c in &changes {
                let confirm = ch
                    .basic_publish(
                        exchange.as_str().into(),
                        "dbserver1.public.products".into(),
                        Default::default(),
                        &c.body(),
                        lapin::BasicProperties::default().with_delivery_mode(2),
                    )
                    .await
                    .expect("publish");
                confirm.await.expect("confirm");
                // Spread the load over all the kill rounds.
                tokio::time::sleep(Duration::from_millis(12)).await;
            }
            let _ = conn.close(200, "ok".into()).await;
        })
    };
    let rounds = 10;
    let mut rng = rand::rng();
    for round in 0..rounds {
        let mut d = w.start();
        d.wait_ready(Duration::from_secs(60));
        let after = Duration::from_millis(rng.random_range(100..1200));
        tokio::time::sleep(after).await;
        d.kill9();
        println!(
            "chaos round {round}: killed after {after:?}, main queue {}",
            w.queue_depth(&w.queue).await
        );
    }
    publisher.await.expect("publisher");
    let mut d = w.start();
    d.wait_ready(Duration::from_secs(60));
    wait_drained(&w, &mut d).await;
    let stale = d.metric_sum("cdc_indexer_skipped_total") + 0.0;
    assert!(d.sigterm().success());
    let want = expected(&changes);
    assert_index_equals(&w, &want, keys).await;
    let dead = w.drain_dlq().await;
    assert!(
        dead.is_empty(),
        "dead-lettered: {:?}",
        dead.iter().map(|d| &d.1).collect::<Vec<_>>()
    );
    assert_index_matches(&w, &[expected_rows(&changes)]);
    println!(
        "chaos: {rounds} kill -9 rounds, {} events, {} keys present at the end, 0 lost, 0 dead-lettered, {stale} skipped in the last run",
        changes.len(),
        want.len()
    );
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redeliveries_and_dlq_replays_of_old_events_keep_the_exact_final_state() {
    let w = World::new(
        "chaos-replay",
        PRODUCTS,
        "[pipeline]\nbatch_max_events = 30\n",
    );
    w.declare().await;
    let keys = 60;
    let changes = random_changes(600, keys);
    let mut d = w.start();
    d.wait_ready(Duration::from_secs(60));
    publish_all(&w, &changes).await;
    wait_drained(&w, &mut d).await;

    // Old events again: re-published (as a redelivery would), and put in the DLQ then replayed.
    let mut rng = rand::rng();
    let old: Vec<Change> = (0..150)
        .map(|_| changes[rng.random_range(0..changes.len() - 1)].clone())
        .collect();
    publish_all(&w, &old[..75]).await;
    let conn = connect().await;
    let dlx = DeadLetterPublisher::open(&conn, &w.dlx).await.expect("dlx");
    for c in &old[75..] {
        let letter = DeadLetter {
            kind: "sink",
            reason: "simulated earlier failure".into(),
        };
        dlx.publish(
            &c.body(),
            &lapin::BasicProperties::default(),
            &w.exchange,
            "dbserver1.public.products",
            &letter,
        )
        .await
        .expect("dead letter");
    }
    let summary = cdc_indexer::dlq::replay(
        &conn,
        &w.config(),
        &cdc_indexer::dlq::ReplayArgs {
            limit: None,
            table: None,
            error_kind: None,
            dry_run: false,
        },
    )
    .await
    .expect("replay");
    assert_eq!(summary.replayed, 75);
    let _ = conn.close(200, "ok".into()).await;
    wait_drained(&w, &mut d).await;
    let stale = d.metric_sum("cdc_indexer_skipped_total");
    assert!(d.sigterm().success());
    assert_index_equals(&w, &expected(&changes), keys).await;
    assert_index_matches(&w, &[expected_rows(&changes)]);
    println!(
        "replays: {} changes, 150 old events re-sent (75 redelivered, 75 via DLQ replay), {stale} skipped as stale or unchanged",
        changes.len()
    );
    assert!(
        stale >= 100.0,
        "most old events must be recognised: {stale}"
    );
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_poison_message_is_dead_lettered_with_a_reason_and_the_daemon_stays_ready() {
    let w = World::new("poison", PRODUCTS, "");
    w.declare().await;
    let deep = format!("{}1{}", "[".repeat(5000), "]".repeat(5000));
    let huge = format!(
        "{{\"op\":\"c\",\"source\":{{\"schema\":\"public\",\"table\":\"products\"}},\"after\":{{\"id\":1,\"name\":\"{}\"",
        "x".repeat(10 * 1024 * 1024)
    );
    let corpus: Vec<(&str, Vec<u8>)> = vec![
        ("truncated JSON", br#"{"op":"c","source":{"schema":"public","table":"products"},"after":{"id":1,"na"#.to_vec()),
        ("wrong type of op", br#"{"op":1,"source":{"schema":"public","table":"products"},"after":{"id":1,"name":"x"}}"#.to_vec()),
        ("wrong type of after", br#"{"op":"c","source":{"schema":"public","table":"products"},"after":"row"}"#.to_vec()),
        ("missing key column", br#"{"op":"c","source":{"schema":"public","table":"products"},"after":{"name":"no id"}}"#.to_vec()),
        ("null key", br#"{"op":"c","source":{"schema":"public","table":"products"},"after":{"id":null,"name":"x"}}"#.to_vec()),
        ("missing template column", br#"{"op":"u","source":{"schema":"public","table":"products"},"after":{"id":5}}"#.to_vec()),
        ("binary garbage", vec![0xff, 0x00, 0xfe, 0x13, 0x37, 0x80, 0x81]),
        ("unknown op", br#"{"op":"x","source":{"schema":"public","table":"products"},"after":{"id":1,"name":"x"}}"#.to_vec()),
        ("deep nesting", deep.into_bytes()),
        ("10 MB truncated body", huge.into_bytes()),
        ("JSON array", b"[1,2,3]".to_vec()),
        ("delete without before", br#"{"op":"d","source":{"schema":"public","table":"products"},"before":null}"#.to_vec()),
    ];
    let good = br#"{"op":"c","source":{"name":"dbserver1","schema":"public","table":"products","lsn":9},"after":{"id":42,"name":"the good one","description":"fine"}}"#;
    let conn = connect().await;
    let ch = confirm_channel(&conn).await;
    let mut d = w.start();
    d.wait_ready(Duration::from_secs(60));
    for (_, body) in &corpus {
        w.publish(&ch, "dbserver1.public.products", body).await;
    }
    w.publish(&ch, "dbserver1.public.products", good).await;
    d.wait_processed((corpus.len() + 1) as f64, Duration::from_secs(120));
    assert_eq!(d.get("/readyz").map(|r| r.0), Some(200), "still ready");
    assert!(d.sigterm().success());

    let dead = w.drain_dlq().await;
    assert_eq!(dead.len(), corpus.len(), "one DLQ entry per poison message");
    for ((what, body), (_, headers, dead_body)) in corpus.iter().zip(&dead) {
        assert!(!headers["x-cdc-error"].is_empty(), "{what}: no reason");
        assert!(
            ["decode", "mapping"].contains(&headers["x-cdc-error-kind"].as_str()),
            "{what}: {headers:?}"
        );
        assert_eq!(body, dead_body, "{what}: body changed");
        println!(
            "poison {what:<26} → {}: {}",
            headers["x-cdc-error-kind"],
            &headers["x-cdc-error"][..headers["x-cdc-error"].len().min(90)]
        );
    }
    let index = w.index().await;
    assert_eq!(
        index.doc("public.products", r#"{"id":42}"#).await.len(),
        1,
        "the good message was indexed"
    );
    assert_eq!(index.count(None).await, 1);
    // The oracle: the poison left nothing behind, the good message its row.
    drop(index);
    assert_index_matches(
        &w,
        &[Expected::new(
            "public.products",
            "id int PRIMARY KEY, name text, description text",
            [json!({"id": 42, "name": "the good one", "description": "fine"})],
        )],
    );
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_outage_of_30_seconds_pauses_intake_and_loses_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let mut service = PythonIndexer::start_on(dir.path(), port);
    let sink = format!(
        "[sink]\nkind = \"llamaindex\"\nurl = \"{}\"\ntimeout_ms = 5000\n[pipeline]\nbatch_max_events = 50\nretry_initial_ms = 200\nretry_max_ms = 2000\n",
        service.url
    );
    let w = World::new("outage", PRODUCTS, "");
    // The World's [sink] section points at the embedded index: replace it.
    let text = std::fs::read_to_string(&w.config_path).expect("config");
    let text = text.replace(
        &format!(
            "[sink]\npath = \"{}\"",
            w.dir.path().join("index").display()
        ),
        "",
    ) + &sink;
    std::fs::write(&w.config_path, text).expect("config");
    w.declare().await;
    let mut d = w.start();
    d.wait_ready(Duration::from_secs(60));
    let keys = 80;
    let changes = random_changes(400, keys);
    publish_all(&w, &changes[..200]).await;
    wait_drained(&w, &mut d).await;

    // Outage: the service stops; events keep coming.
    service.stop();
    let outage = std::time::Instant::now();
    publish_all(&w, &changes[200..]).await;
    let mut saw_paused = false;
    let mut saw_not_ready = false;
    let mut longest_silence = 0.0_f64;
    while outage.elapsed() < Duration::from_secs(30) {
        saw_paused |= d.metric_sum("cdc_indexer_consumer_paused") == 1.0;
        saw_not_ready |= d.get("/readyz").map(|r| r.0) == Some(503);
        // Alive all along: the heartbeat goes on while retrying, so neither /healthz nor the
        // systemd watchdog restarts a daemon that is waiting out an outage.
        let beat = d.metric_sum("cdc_indexer_pipeline_heartbeat_timestamp_seconds");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |t| t.as_secs_f64());
        longest_silence = longest_silence.max(now - beat);
        assert_eq!(
            d.get("/healthz").map(|r| r.0),
            Some(200),
            "alive while paused"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        longest_silence < 5.0,
        "the heartbeat went silent for {longest_silence:.1} s during the outage"
    );
    assert!(saw_paused, "intake paused during the outage");
    assert!(saw_not_ready, "/readyz false during the outage");
    // Held unacked (prefetched) or still queued; none in the DLQ.
    assert!(
        d.metric_sum("cdc_indexer_events_processed_total") < changes.len() as f64,
        "events wait during the outage"
    );
    assert_eq!(
        w.queue_depth(&w.dlq).await,
        0,
        "nothing dead-lettered during the outage"
    );
    let retries = d.metric_sum("cdc_indexer_retries_total");

    // Recovery: same port, same data.
    let _service = PythonIndexer::start_on(dir.path(), port);
    wait_drained(&w, &mut d).await;
    d.wait_ready(Duration::from_secs(30));
    assert!(d.sigterm().success());
    assert!(
        w.drain_dlq().await.is_empty(),
        "nothing dead-lettered for a transient cause"
    );

    let mut config = w.config();
    config.sink.url = format!("http://127.0.0.1:{port}");
    let sink = cdc_indexer::sink::from_config(&config).await.expect("sink");
    let want = expected(&changes);
    let mut points = 0;
    for (id, (name, text)) in &want {
        let doc = sink
            .fetch(&cdc_indexer::model::DocumentKey {
                table: "public.products".into(),
                key: format!("{{\"id\":{id}}}"),
            })
            .await
            .expect("fetch");
        let chunks = cdc_indexer::mapping::chunk_text(text, 60, 10);
        assert_eq!(doc.len(), chunks.len(), "id {id}");
        assert_eq!(doc[0].payload["name"], json!(name));
        points += doc.len();
    }
    assert_eq!(
        sink.count(Some("public.products")).await.expect("count"),
        points as u64
    );
    // The oracle, through the python-indexer (the config's sink).
    assert_index_matches(&w, &[expected_rows(&changes)]);
    println!(
        "outage: python-indexer down {:?}, {retries} retries, longest heartbeat silence {longest_silence:.1} s, {} events, 0 dead-lettered, all indexed after recovery",
        outage.elapsed(),
        changes.len()
    );
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_sink_outage_exits_within_the_deadline_and_acks_nothing_unwritten() {
    let dir = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let mut service = PythonIndexer::start_on(dir.path(), port);
    let sink = format!(
        "[sink]\nkind = \"llamaindex\"\nurl = \"{}\"\ntimeout_ms = 2000\n[pipeline]\nshutdown_deadline_ms = 3000\nretry_initial_ms = 200\nretry_max_ms = 1000\n",
        service.url
    );
    let w = World::new("outage-term", PRODUCTS, "");
    let text = std::fs::read_to_string(&w.config_path).expect("config");
    let text = text.replace(
        &format!(
            "[sink]\npath = \"{}\"",
            w.dir.path().join("index").display()
        ),
        "",
    ) + &sink;
    std::fs::write(&w.config_path, text).expect("config");
    w.declare().await;
    let mut d = w.start();
    d.wait_ready(Duration::from_secs(60));
    let changes = random_changes(100, 40);
    service.stop();
    publish_all(&w, &changes).await;
    // The daemon is now retrying the write of its first batch.
    let start = std::time::Instant::now();
    while d.metric_sum("cdc_indexer_retries_total") < 2.0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no retries: {}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let term = std::time::Instant::now();
    let status = d.sigterm();
    let took = term.elapsed();
    assert!(status.success(), "exit {status}");
    assert!(
        took < Duration::from_secs(3 + 3),
        "exited after {took:?}, deadline 3 s"
    );
    assert_eq!(d.metric_sum("cdc_indexer_events_processed_total"), 0.0);

    // Nothing was acked: a new daemon against the recovered service indexes everything.
    let _service = PythonIndexer::start_on(dir.path(), port);
    let mut d = w.start();
    d.wait_ready(Duration::from_secs(60));
    wait_drained(&w, &mut d).await;
    assert!(d.sigterm().success());
    let mut config = w.config();
    config.sink.url = format!("http://127.0.0.1:{port}");
    let sink = cdc_indexer::sink::from_config(&config).await.expect("sink");
    let points: usize = expected(&changes)
        .values()
        .map(|(_, text)| cdc_indexer::mapping::chunk_text(text, 60, 10).len())
        .sum();
    assert_eq!(
        sink.count(Some("public.products")).await.expect("count"),
        points as u64
    );
    assert!(w.drain_dlq().await.is_empty());
    assert_index_matches(&w, &[expected_rows(&changes)]);
    println!(
        "shutdown during outage: exited {took:?} after SIGTERM (deadline 3 s), 0 acked, all {} events indexed after restart",
        changes.len()
    );
    w.cleanup().await;
}

/// A document of more than one write request (here 300 chunks: the embedded index writes at
/// most 256 points per operation), updated; the daemon crashes right after the first request
/// of the update. Chunk 0 is the commit record and is written last, so the crash leaves the
/// old chunk 0 vouching for the old text, and the redelivery rewrites the document whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_two_writes_of_a_document_is_repaired_by_the_redelivery() {
    let rules = "[[tables]]\ntable = \"public.products\"\nid_columns = [\"id\"]\ntext = \"{name}\\n\\n{description}\"\nchunk_size = 60\nchunk_overlap = 0\nmax_chunks = 1000\n";
    let w = World::new("commit-record", rules, "");
    w.declare().await;
    let description = |version: &str| {
        (0..300)
            .map(|i| format!("{version} sentence {i:03} of the long one, padded to sixty ch."))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let body = |version: &str, lsn: u64| {
        json!({"op": "u", "before": null,
            "after": {"id": 1, "name": format!("{version} long"), "description": description(version)},
            "source": {"name": "dbserver1", "schema": "public", "table": "products", "lsn": lsn, "ts_ms": 1}})
        .to_string()
        .into_bytes()
    };
    let conn = connect().await;
    let ch = confirm_channel(&conn).await;
    w.publish(&ch, "dbserver1.public.products", &body("v1", 10))
        .await;
    let mut d = w.start();
    d.wait_ready(Duration::from_secs(60));
    wait_drained(&w, &mut d).await;
    assert!(d.sigterm().success());

    w.publish(&ch, "dbserver1.public.products", &body("v2", 20))
        .await;
    let mut d = w.start_with(&[("CDC_INDEXER_TEST_ABORT_AFTER_WRITES", "1")]);
    let died = d.wait_exit(Duration::from_secs(120));
    assert!(!died.success(), "the test fault must crash it: {}", d.log());

    let mut d = w.start();
    d.wait_ready(Duration::from_secs(60));
    wait_drained(&w, &mut d).await;
    assert!(d.sigterm().success());
    let index = w.index().await;
    let doc = index.doc("public.products", r#"{"id":1}"#).await;
    let chunks = doc[0].payload["_cdc"]["chunks"].as_u64().unwrap_or(0) as usize;
    assert!(chunks > 256, "{chunks} chunks: more than one write request");
    assert_eq!(doc.len(), chunks);
    let text = format!("v2 long\n\n{}", description("v2"));
    let want = cdc_indexer::mapping::chunk_text(&text, 60, 0);
    assert_eq!(doc.len(), want.len());
    for (i, p) in doc.iter().enumerate() {
        assert_eq!(
            p.payload["text"],
            json!(want[i]),
            "chunk {i} is not the new version's"
        );
        assert_eq!(
            p.payload["_cdc"]["hash"],
            json!(cdc_indexer::mapping::text_hash(&text)),
            "chunk {i}"
        );
    }
    assert!(w.drain_dlq().await.is_empty(), "nothing dead-lettered");
    drop(doc);
    drop(index);
    assert_index_matches(
        &w,
        &[Expected::new(
            "public.products",
            "id int PRIMARY KEY, name text, description text",
            [json!({"id": 1, "name": "v2 long", "description": description("v2")})],
        )],
    );
    let _ = conn.close(200, "ok".into()).await;
    w.cleanup().await;
}

/// A proxy or a service that refuses large requests (413) refuses the batch but takes each
/// document alone: the daemon writes the batch in halves instead of rewriting it for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_refused_whole_but_taken_document_by_document_is_bisected_not_looped() {
    let dir = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let _service = PythonIndexer::start_on_with(
        dir.path(),
        port,
        &[("PYTHON_INDEXER_MAX_BODY_BYTES", "40000")],
    );
    let w = World::new("bisect-413", PRODUCTS, "");
    w.use_llamaindex_sink(&format!("http://127.0.0.1:{port}"));
    w.declare().await;
    // 40 one-chunk documents: about 8 KB each with its vector, 300 KB as one request.
    let changes: Vec<Change> = (1..=40)
        .map(|id| Change {
            id,
            op: "c",
            lsn: 9,
        })
        .collect();
    publish_all(&w, &changes).await;
    let mut d = w.start();
    d.wait_ready(Duration::from_secs(60));
    wait_drained(&w, &mut d).await;
    let rejections = d.metric_sum("cdc_indexer_write_rejections_total");
    assert!(d.sigterm().success());
    assert!(rejections >= 1.0, "the service refused the whole batch");
    assert!(
        w.drain_dlq().await.is_empty(),
        "nothing dead-lettered: every document fits alone"
    );
    let mut config = w.config();
    config.sink.url = format!("http://127.0.0.1:{port}");
    let sink = cdc_indexer::sink::from_config(&config).await.expect("sink");
    assert_eq!(
        sink.count(Some("public.products")).await.expect("count"),
        40
    );
    assert_index_matches(&w, &[expected_rows(&changes)]);
    println!("bisect: {rejections} whole-batch refusals, all 40 documents written by halves");
    w.cleanup().await;
}

/// Batch N is written while batch N+1 is planned and embedded: a crash in the middle of that
/// (here: right after the third write request of the run) loses nothing and acks nothing that
/// is not durable; after the restart the index is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_while_one_batch_is_written_and_the_next_embedded_loses_nothing() {
    let w = World::new(
        "overlap-crash",
        PRODUCTS,
        "[pipeline]\nbatch_max_events = 40\n",
    );
    w.declare().await;
    let keys = 120;
    let changes = random_changes(600, keys);
    publish_all(&w, &changes).await;
    let mut d = w.start_with(&[("CDC_INDEXER_TEST_ABORT_AFTER_WRITES", "3")]);
    let died = d.wait_exit(Duration::from_secs(120));
    assert!(!died.success(), "the test fault must crash it");
    let acked_before_crash = 600 - w.queue_depth(&w.queue).await;
    let mut d = w.start();
    d.wait_ready(Duration::from_secs(60));
    wait_drained(&w, &mut d).await;
    assert!(d.sigterm().success());
    assert_index_equals(&w, &expected(&changes), keys).await;
    assert!(w.drain_dlq().await.is_empty());
    assert_index_matches(&w, &[expected_rows(&changes)]);
    println!(
        "overlap crash: {acked_before_crash} events acked before the crash, exact after the restart"
    );
    w.cleanup().await;
}

/// An index that refuses every write request, whatever it holds (here: a request-size limit
/// too small for any document, as a proxy in front of the service could set), is not the
/// events' fault. Batches of one event, the usual case at low traffic, must not be
/// dead-lettered one after the other: the daemon writes a canary document, sees it refused
/// too, and waits with intake paused (not ready). Once the index takes writes again,
/// everything is indexed and nothing is in the DLQ.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_that_refuses_every_write_pauses_intake_instead_of_dead_lettering() {
    let dir = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let mut service = PythonIndexer::start_on_with(
        dir.path(),
        port,
        &[("PYTHON_INDEXER_MAX_BODY_BYTES", "1000")],
    );
    let w = World::new(
        "refuses-all",
        PRODUCTS,
        "[pipeline]\nretry_initial_ms = 200\nretry_max_ms = 1000\n",
    );
    w.use_llamaindex_sink(&format!("http://127.0.0.1:{port}"));
    w.declare().await;
    let mut d = w.start();
    d.wait_ready(Duration::from_secs(60));
    // One event at a time: each is a batch of its own.
    for id in 1..=3u64 {
        publish_all(
            &w,
            &[Change {
                id,
                op: "c",
                lsn: 10 + id,
            }],
        )
        .await;
        std::thread::sleep(Duration::from_millis(300));
    }
    d.wait_metric("cdc_indexer_consumer_paused", 1.0, Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(d.get("/readyz").map(|r| r.0), Some(503));
    assert_eq!(
        d.metric_sum("cdc_indexer_dead_lettered_total"),
        0.0,
        "events dead-lettered for the index's refusal: {}",
        d.log()
    );
    // The index takes writes again.
    service.stop();
    let _service = PythonIndexer::start_on(dir.path(), port);
    d.wait_processed(3.0, Duration::from_secs(60));
    assert!(d.sigterm().success());
    assert!(w.drain_dlq().await.is_empty(), "nothing dead-lettered");
    let mut config = w.config();
    config.sink.url = format!("http://127.0.0.1:{port}");
    let sink = cdc_indexer::sink::from_config(&config).await.expect("sink");
    let changes: Vec<Change> = (1..=3u64)
        .map(|id| Change {
            id,
            op: "c",
            lsn: 10 + id,
        })
        .collect();
    let points: usize = expected(&changes)
        .values()
        .map(|(_, text)| cdc_indexer::mapping::chunk_text(text, 60, 10).len())
        .sum();
    assert_eq!(
        sink.count(Some("public.products")).await.expect("count"),
        points as u64
    );
    assert_eq!(
        sink.count(Some(cdc_indexer::pipeline::CANARY_TABLE))
            .await
            .expect("count"),
        0,
        "the canary is deleted"
    );
    w.cleanup().await;
}
