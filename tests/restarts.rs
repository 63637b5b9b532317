//! Never dead-letter the innocent: restarts (kill -9 and SIGTERM) with a backlog, a message
//! that really crashes the daemon, a batch that outlasts the watchdog. Each test prints its
//! figures.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cdc_indexer::mapping::{chunk_text, text_hash};
use common::reconcile::*;
use common::*;
use rand::Rng;
use serde_json::json;

/// Multi-chunk documents: `{name}\n\n{description}` in chunks of 60 characters.
const DOCS: &str = "[[tables]]\ntable = \"public.products\"\nid_columns = [\"id\"]\ntext = \"{name}\\n\\n{description}\"\nchunk_size = 60\nchunk_overlap = 10\n";

#[derive(Clone, Debug)]
struct Row {
    name: String,
    description: String,
    price: u64,
}

impl Row {
    fn text(&self) -> String {
        format!("{}\n\n{}", self.name, self.description)
            .trim()
            .to_string()
    }
}

#[derive(Clone, Debug)]
struct Event {
    id: u64,
    lsn: u64,
    row: Option<Row>,
}

impl Event {
    fn body(&self) -> Vec<u8> {
        let source = json!({"name": "dbserver1", "schema": "public", "table": "products", "lsn": self.lsn, "ts_ms": chrono::Utc::now().timestamp_millis()});
        let value = match &self.row {
            Some(r) => json!({"op": "u", "before": null, "source": source,
                "after": {"id": self.id, "name": r.name, "description": r.description, "price": r.price}}),
            None => json!({"op": "d", "after": null, "source": source,
                "before": {"id": self.id, "name": "", "description": "", "price": 0}}),
        };
        value.to_string().into_bytes()
    }
}

fn description(rng: &mut impl Rng, id: u64, version: u64) -> String {
    let words = rng.random_range(4..16);
    (0..words)
        .map(|i| format!("w{}x{}y{}", id, version, i))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `n` changes over `keys` keys: most updates change only the price (nothing to embed),
/// some the text, some delete the row.
fn backlog(n: u64, keys: u64) -> Vec<Event> {
    let mut rng = rand::rng();
    let mut rows: BTreeMap<u64, Row> = BTreeMap::new();
    (1..=n)
        .map(|lsn| {
            let id = rng.random_range(1..=keys);
            let row = match rows.get(&id).cloned() {
                None => Some(Row {
                    name: format!("product {id}"),
                    description: description(&mut rng, id, lsn),
                    price: lsn,
                }),
                Some(mut r) => match rng.random_range(0..20) {
                    0..=1 => None,
                    2..=5 => {
                        r.description = description(&mut rng, id, lsn);
                        Some(r)
                    }
                    _ => {
                        r.price = lsn;
                        Some(r)
                    }
                },
            };
            match &row {
                Some(r) => rows.insert(id, r.clone()),
                None => rows.remove(&id),
            };
            Event {
                id,
                lsn: 10_000 + lsn,
                row,
            }
        })
        .collect()
}

fn final_state(events: &[Event]) -> BTreeMap<u64, Row> {
    let mut last = BTreeMap::new();
    for e in events {
        match &e.row {
            Some(r) => last.insert(e.id, r.clone()),
            None => last.remove(&e.id),
        };
    }
    last
}

/// The source rows `want` stands for, for the oracle.
fn source_rows(want: &BTreeMap<u64, Row>) -> Expected {
    Expected::new(
        "public.products",
        "id int PRIMARY KEY, name text, description text, price bigint",
        want.iter().map(|(id, r)| {
            json!({"id": id, "name": r.name, "description": r.description, "price": r.price})
        }),
    )
}

async fn publish(w: &World, events: &[Event]) {
    let conn = connect().await;
    let ch = confirm_channel(&conn).await;
    for chunk in events.chunks(500) {
        let mut confirms = Vec::new();
        for e in chunk {
            confirms.push(
                ch.basic_publish(
                    w.exchange.as_str().into(),
                    "dbserver1.public.products".into(),
                    Default::default(),
                    &e.body(),
                    lapin::BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .expect("publish"),
            );
        }
        for c in confirms {
            assert!(matches!(
                c.await.expect("confirm"),
                lapin::Confirmation::Ack(_)
            ));
        }
    }
    let _ = conn.close(200, "ok".into()).await;
}

/// Every row is its document, whole (each chunk of the current version), and nothing else.
async fn assert_index_is_exact(w: &World, want: &BTreeMap<u64, Row>, keys: u64) {
    let index = w.index().await;
    let mut points = 0;
    for id in 1..=keys {
        let doc = index
            .doc("public.products", &format!("{{\"id\":{id}}}"))
            .await;
        match want.get(&id) {
            Some(row) => {
                let text = row.text();
                let chunks = chunk_text(&text, 60, 10);
                assert_eq!(doc.len(), chunks.len(), "id {id}: chunks");
                for (i, p) in doc.iter().enumerate() {
                    assert_eq!(p.payload["text"], json!(chunks[i]), "id {id} chunk {i}");
                    assert_eq!(
                        p.payload["_cdc"]["hash"],
                        json!(text_hash(&text)),
                        "id {id} chunk {i}"
                    );
                }
                assert_eq!(doc[0].payload["price"], json!(row.price), "id {id}: fields");
                points += doc.len();
            }
            None => assert!(doc.is_empty(), "id {id} should be deleted: {doc:?}"),
        }
    }
    assert_eq!(
        index.count(Some("public.products")).await,
        points as u64,
        "no stray points"
    );
}

const PREFETCH: [(&str, &str); 1] = [("CDC_INDEXER__BROKER__PREFETCH", "512")];

/// Waits (up to 15 min: a backlog of thousands on two shared cores) until the daemon has
/// processed everything.
async fn drain(w: &World, d: &mut Daemon) {
    let start = Instant::now();
    while w.queue_depth(&w.queue).await > 0 && start.elapsed() < Duration::from_secs(900) {
        if let Some(status) = d.child.try_wait().expect("try_wait") {
            panic!("daemon exited with {status}: {}", d.log());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    wait_drained(w, d).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_kill_9_restarts_at_random_moments_dead_letter_nothing_and_lose_nothing() {
    let w = World::new("restart-kill", DOCS, "");
    w.declare().await;
    let keys = 400;
    let events = backlog(5000, keys);
    publish(&w, &events).await;
    let mut rng = rand::rng();
    let started = Instant::now();
    for round in 0..20 {
        let mut d = w.start_with(&PREFETCH);
        d.wait_ready(Duration::from_secs(60));
        let after = Duration::from_millis(rng.random_range(0..2500));
        tokio::time::sleep(after).await;
        d.kill9();
        println!(
            "kill round {round}: after {after:?}, main queue {}",
            w.queue_depth(&w.queue).await
        );
    }
    let mut d = w.start_with(&PREFETCH);
    d.wait_ready(Duration::from_secs(60));
    drain(&w, &mut d).await;
    let isolated = d.metric_sum("cdc_indexer_isolated_deliveries_total");
    assert!(d.sigterm().success());
    let dead = w.drain_dlq().await;
    assert!(
        dead.is_empty(),
        "{} dead-lettered, e.g. {:?}",
        dead.len(),
        dead.first().map(|d| &d.1)
    );
    assert_index_is_exact(&w, &final_state(&events), keys).await;
    assert_index_matches(&w, &[source_rows(&final_state(&events))]);
    println!(
        "kill -9 x20 with a backlog of {}: 0 dead-lettered, exact; {isolated} deliveries processed alone in the last run; {:.0} s",
        events.len(),
        started.elapsed().as_secs_f64()
    );
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_sigterm_restarts_return_nothing_they_could_finish() {
    // A deadline long enough to finish what was received (512 prefetched deliveries) even on
    // two busy cores: then a clean stop must return nothing.
    let w = World::new(
        "restart-term",
        DOCS,
        "[pipeline]\nshutdown_deadline_ms = 60000\n",
    );
    w.declare().await;
    let keys = 400;
    let events = backlog(5000, keys);
    publish(&w, &events).await;
    let mut rng = rand::rng();
    let mut returned = 0.0;
    for round in 0..20 {
        let mut d = w.start_with(&PREFETCH);
        d.wait_ready(Duration::from_secs(60));
        // At least a second: what the previous stop returned comes first and is counted as
        // it is received, so none of it is missed by reading too early.
        tokio::time::sleep(Duration::from_millis(rng.random_range(1000..3500))).await;
        returned += d.metric_sum("cdc_indexer_redelivered_total");
        let stopping = Instant::now();
        let status = d.sigterm_within(Duration::from_secs(90));
        assert!(status.success(), "round {round}: {status}: {}", d.log());
        println!(
            "term round {round}: stopped in {:?}, main queue {}",
            stopping.elapsed(),
            w.queue_depth(&w.queue).await
        );
    }
    let mut d = w.start_with(&PREFETCH);
    d.wait_ready(Duration::from_secs(60));
    drain(&w, &mut d).await;
    returned += d.metric_sum("cdc_indexer_redelivered_total");
    assert!(d.sigterm().success());
    assert!(w.drain_dlq().await.is_empty(), "nothing dead-lettered");
    assert_index_is_exact(&w, &final_state(&events), keys).await;
    assert_index_matches(&w, &[source_rows(&final_state(&events))]);
    println!(
        "SIGTERM x20 with a backlog of {}: {returned} deliveries came back",
        events.len()
    );
    assert_eq!(
        returned, 0.0,
        "a clean stop returns nothing it could finish"
    );
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_crashes_the_daemon_is_dead_lettered_alone() {
    let w = World::new("crash-loop", DOCS, "");
    w.declare().await;
    let mut events = backlog(60, 60);
    events.sort_by_key(|e| e.id);
    events.dedup_by_key(|e| e.id);
    for e in &mut events {
        e.row = Some(e.row.clone().unwrap_or(Row {
            name: format!("product {}", e.id),
            description: "plain".into(),
            price: 1,
        }));
    }
    let culprit = events[events.len() / 2].id;
    if let Some(row) = events
        .iter_mut()
        .find(|e| e.id == culprit)
        .and_then(|e| e.row.as_mut())
    {
        row.description = "this one CRASHES-THE-DAEMON when embedded".into();
    }
    publish(&w, &events).await;
    let env = [("CDC_INDEXER_TEST_CRASH_ON_TEXT", "CRASHES-THE-DAEMON")];
    let mut crashes = 0;
    loop {
        // It may die before it is seen ready: the crash comes with its first batch.
        let mut d = w.start_with(&env);
        let start = Instant::now();
        let mut died = false;
        while start.elapsed() < Duration::from_secs(180) {
            if d.child.try_wait().expect("try_wait").is_some() {
                died = true;
                break;
            }
            if matches!(d.get("/readyz"), Some((200, _)))
                && w.queue_depth(&w.queue).await == 0
                && d.metric_sum("cdc_indexer_events_received_total")
                    == d.metric_sum("cdc_indexer_events_processed_total")
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if !died {
            let status = d.sigterm();
            if status.success() {
                break;
            }
            // It met the culprit while finishing what it had received: a crash like any other.
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(status.signal(), Some(6), "{status}: {}", d.log());
        }
        crashes += 1;
        assert!(
            crashes <= 6,
            "still crashing after {crashes} restarts: {}",
            d.log()
        );
    }
    let dead = w.drain_dlq().await;
    assert_eq!(
        dead.len(),
        1,
        "the culprit alone: {:?}",
        dead.iter().map(|d| &d.1).collect::<Vec<_>>()
    );
    assert_eq!(dead[0].1["x-cdc-error-kind"], "crash-loop");
    assert!(String::from_utf8_lossy(&dead[0].2).contains("CRASHES-THE-DAEMON"));
    let mut want = final_state(&events);
    want.remove(&culprit);
    assert_index_is_exact(&w, &want, 60).await;
    // The culprit's row is not in the index: the oracle's source is the rest.
    assert_index_matches(&w, &[source_rows(&want)]);
    println!(
        "crash loop: the culprit dead-lettered alone after {crashes} crashes; {} batch-mates indexed",
        want.len()
    );
    w.cleanup().await;
}

#[test]
fn a_batch_that_takes_longer_than_the_watchdog_keeps_the_daemon_alive() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    // 256 documents of 10 chunks each: one batch of 2,560 texts today, many seconds of
    // embedding; the watchdog allows 2 s of silence.
    let rules = "[[tables]]\ntable = \"public.products\"\nid_columns = [\"id\"]\ntext = \"{name}\\n\\n{description}\"\nchunk_size = 50\nchunk_overlap = 0\n";
    let w = World::new("watchdog", rules, "[pipeline]\nbatch_max_wait_ms = 2000\n");
    let socket_path = w.dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).expect("bind notify socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut d = w.start_with(&[
        ("NOTIFY_SOCKET", path_str(&socket_path)),
        ("WATCHDOG_USEC", "2000000"),
    ]);
    d.wait_ready(Duration::from_secs(60));
    let events: Vec<Event> = (1..=256)
        .map(|id| Event {
            id,
            lsn: id,
            row: Some(Row {
                name: format!("item {id}"),
                description: (0..10)
                    .map(|i| format!("sentence {i} of item {id} pads"))
                    .collect::<Vec<_>>()
                    .join(" "),
                price: id,
            }),
        })
        .collect();
    rt.block_on(publish(&w, &events));
    let published = Instant::now();
    let mut last = Instant::now();
    let mut longest = Duration::ZERO;
    let mut buf = [0u8; 256];
    while published.elapsed() < Duration::from_secs(120)
        && d.metric_sum("cdc_indexer_events_processed_total") < 256.0
    {
        let n = socket.recv(&mut buf).expect("a notification within 30 s");
        if String::from_utf8_lossy(&buf[..n]).contains("WATCHDOG=1") {
            longest = longest.max(last.elapsed());
            last = Instant::now();
        }
    }
    let took = published.elapsed();
    // Every event processed: the final state is known (for the oracle below).
    d.wait_processed(256.0, Duration::from_secs(300));
    assert!(d.sigterm().success());
    let want: BTreeMap<u64, Row> = events
        .iter()
        .filter_map(|e| Some((e.id, e.row.clone()?)))
        .collect();
    assert_index_matches(&w, &[source_rows(&want)]);
    println!("watchdog: 2,560 texts in {took:?}, longest gap between pings {longest:?}");
    assert!(
        took > Duration::from_secs(3),
        "the work outlasts the watchdog ({took:?})"
    );
    assert!(
        longest < Duration::from_millis(1900),
        "silent for {longest:?}: systemd would have killed the daemon"
    );
    rt.block_on(w.cleanup());
}
