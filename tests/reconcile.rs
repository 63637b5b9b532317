//! `reconcile` against the real thing: PostgreSQL (the logical-decoding cluster of
//! debezium/pg/), the real Debezium engine (debezium/runner.py), RabbitMQ and the daemon.
//! Drift is injected every way it happens in production, reconcile must name exactly those
//! keys, and `--repair` must heal them without losing a newer streamed change.

mod common;

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cdc_indexer::model::{DocumentKey, PositionAt, SourcePosition};
use cdc_indexer::sink::{Point, Write};
use cdc_indexer::stored::{CommitMeta, chunk_payload, commit_payload};
use common::debezium::*;
use common::reconcile::*;
use common::*;
use serde_json::json;

fn keys(ids: &[u64]) -> BTreeSet<String> {
    ids.iter().map(|i| format!("{{\"id\":{i}}}")).collect()
}

fn key(table: &str, id: u64) -> DocumentKey {
    DocumentKey {
        table: table.into(),
        key: format!("{{\"id\":{id}}}"),
    }
}

fn unit_vector() -> Vec<f32> {
    let mut v = vec![0.0; 384];
    v[0] = 1.0;
    v
}

fn big_text(word: &str) -> String {
    format!("{word} ").repeat(3000 / (word.len() + 1))
}

fn rule(table: &str) -> String {
    format!(
        "[[tables]]\ntable = \"public.{table}\"\nid_columns = [\"id\"]\ntext = \"{{name}}\\n\\n{{body}}\"\nchunk_size = 400\nchunk_overlap = 0\n"
    )
}

async fn wait_dlq(w: &World, n: u32) {
    let start = Instant::now();
    while w.queue_depth(&w.dlq).await < n {
        assert!(start.elapsed() < Duration::from_secs(120), "no DLQ entry");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn cli(w: &World, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cdc-indexer"))
        .args(["--config", path_str(&w.config_path)])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("cdc-indexer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_names_every_kind_of_drift_and_repair_heals_it() {
    pg_start();
    let t = format!("rec_{}", rand_suffix());
    let table = format!("public.{t}");
    psql(&format!(
        "CREATE TABLE public.{t} (id int PRIMARY KEY, name text, body text, note text, price numeric(10,2), at timestamptz DEFAULT '2024-01-02 03:04:05+00'); \
         ALTER TABLE public.{t} ALTER COLUMN body SET STORAGE EXTERNAL; \
         INSERT INTO public.{t} (id, name, body, note, price) SELECT i, 'name ' || i, 'body ' || i, 'note ' || i, i * 1.5 FROM generate_series(1, 8) i; \
         UPDATE public.{t} SET body = '{}' WHERE id = 5",
        big_text("toasted")
    ));
    let w = World::new("reconcile", &rule(&t), "[pipeline]\nbatch_max_wait_ms = 100\n");
    w.declare().await;
    let tap_name = tap(&w).await;
    let mut d = w.start();
    d.wait_ready(Duration::from_secs(60));
    let mut runner = Runner::start(&w, &[&t], &[]);
    tap_wait(&w, &tap_name, 8, &runner).await;
    wait_drained(&w, &mut d).await;
    // The oracle agrees with a healthy index, through the daemon's side port.
    assert_reconciled(&w);

    // Drift 1: points deleted behind the daemon's back (2; 5's too, for the DLQ below), a
    // stray chunk (1) and a document without a row (99), written straight into the index.
    assert!(d.sigterm().success());
    {
        let index = w.index().await;
        let stray = chunk_payload(&key(&table, 1), 3, 4, "bogus", "a stray chunk");
        let position = SourcePosition {
            connector: "dbserver1".into(),
            at: PositionAt::Lsn(1),
        };
        let orphan = commit_payload(
            CommitMeta {
                key: &key(&table, 99),
                chunks: 1,
                hash: Some("h"),
                position: Some(&position),
                source_ts_ms: Some(1),
            },
            &json!({"id": 99, "name": "ghost"}).as_object().cloned().unwrap_or_default(),
            &Default::default(),
            "ghost",
        );
        let write = Write {
            delete_keys: vec![key(&table, 2), key(&table, 5)],
            upserts: vec![
                Point {
                    id: key(&table, 1).point_id(3),
                    vector: unit_vector(),
                    payload: stray,
                },
                Point {
                    id: key(&table, 99).point_id(0),
                    vector: unit_vector(),
                    payload: orphan,
                },
            ],
            ..Write::default()
        };
        index.sink.write(Arc::new(write)).await.expect("write");
    }
    // Drift 2: rows changed while the connector was stopped and its slot dropped.
    runner.stop();
    psql(&format!(
        "UPDATE public.{t} SET name = 'renamed while nobody listened' WHERE id = 3; DELETE FROM public.{t} WHERE id = 4"
    ));
    let mut d = w.start();
    d.wait_ready(Duration::from_secs(60));
    let runner = Runner::start(&w, &[&t], &["snapshot.mode=no_data"]);
    // Drift 3: a DLQ entry purged. The TOASTed body is not resent and the index has no
    // stored value of it (deleted above): toast-unavailable, dead-lettered, then purged.
    psql(&format!("UPDATE public.{t} SET note = 'changed' WHERE id = 5"));
    wait_dlq(&w, 1).await;
    let purge = cli(&w, &["dlq", "purge", "--yes"]);
    assert!(purge.status.success(), "{purge:?}");
    wait_drained(&w, &mut d).await;

    let r = reconcile(&w, &[]);
    assert_eq!(r.code, 1, "drift found: {}", r.stderr);
    assert_eq!(r.keys(&table, "missing"), keys(&[2, 5]), "{}", r.json);
    assert_eq!(r.keys(&table, "stale"), keys(&[1, 3]), "{}", r.json);
    assert_eq!(r.keys(&table, "orphan"), keys(&[4, 99]), "{}", r.json);
    assert_eq!(r.count(&table, "ok"), 3, "6, 7 and 8: {}", r.json);

    let repaired = reconcile(&w, &["--repair"]);
    assert_eq!(repaired.code, 1, "{}", repaired.stderr);
    assert_eq!(repaired.table(&table)["repairs"]["deletes"], json!(2));
    wait_drained(&w, &mut d).await;
    assert_reconciled(&w);
    drop(runner);
    assert!(d.sigterm().success());
    // And the healed documents are the rows' own.
    let index = w.index().await;
    let five = index.doc(&table, "{\"id\":5}").await;
    assert_eq!(five[0].payload["note"], json!("changed"));
    assert!(five.len() > 1, "the TOASTed body is indexed whole again");
    assert_eq!(index.doc(&table, "{\"id\":1}").await.len(), 1, "stray gone");
    assert!(index.doc(&table, "{\"id\":99}").await.is_empty());
    assert!(w.drain_dlq().await.is_empty(), "repairs dead-letter nothing");
    // Without a daemon, reconcile opens the index itself.
    drop(index);
    assert_reconciled(&w);
    psql(&format!("DROP TABLE public.{t}"));
    tap_delete(&tap_name).await;
    w.cleanup().await;
}
