//! `reconcile` against the real thing: PostgreSQL (the logical-decoding cluster of
//! debezium/pg/), the real Debezium engine (debezium/runner.py), RabbitMQ and the daemon.
//! Drift is injected every way it happens in production, reconcile must name exactly those
//! keys, and `--repair` must heal them without losing a newer streamed change.

mod common;

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
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
    let w = World::new(
        "reconcile",
        &rule(&t),
        "[pipeline]\nbatch_max_wait_ms = 100\n",
    );
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
            &json!({"id": 99, "name": "ghost"})
                .as_object()
                .cloned()
                .unwrap_or_default(),
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
    psql(&format!(
        "UPDATE public.{t} SET note = 'changed' WHERE id = 5"
    ));
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
    assert!(
        w.drain_dlq().await.is_empty(),
        "repairs dead-letter nothing"
    );
    // Without a daemon, reconcile opens the index itself.
    drop(index);
    assert_reconciled(&w);
    psql(&format!("DROP TABLE public.{t}"));
    tap_delete(&tap_name).await;
    w.cleanup().await;
}

/// A table of `n` rows, a daemon, and a runner that has streamed them; returns after the
/// snapshot is indexed.
async fn streaming(test: &str, n: u32, extra: &str) -> (World, String, Daemon, Runner, String) {
    pg_start();
    let t = format!("rec_{}", rand_suffix());
    psql(&format!(
        "CREATE TABLE public.{t} (id int PRIMARY KEY, name text, body text); \
         INSERT INTO public.{t} SELECT i, 'name ' || i, 'body ' || i FROM generate_series(1, {n}) i"
    ));
    let w = World::new(
        test,
        &rule(&t),
        &format!("[pipeline]\nbatch_max_wait_ms = 100\n{extra}"),
    );
    w.declare().await;
    let tap_name = tap(&w).await;
    let mut d = w.start();
    d.wait_ready(Duration::from_secs(60));
    let runner = Runner::start(&w, &[&t], &[]);
    tap_wait(&w, &tap_name, n, &runner).await;
    wait_drained(&w, &mut d).await;
    (w, t, d, runner, tap_name)
}

/// Loses an update of row `id`: the connector is stopped (its slot dropped) while it happens,
/// and restarted without a snapshot.
fn lose_update(w: &World, t: &str, runner: &mut Runner, id: u32, name: &str) -> Runner {
    runner.stop();
    psql(&format!(
        "UPDATE public.{t} SET name = '{name}' WHERE id = {id}"
    ));
    Runner::start(w, &[t], &["snapshot.mode=no_data"])
}

async fn name_of(w: &World, table: &str, id: u32) -> Option<serde_json::Value> {
    let index = w.index().await;
    let doc = index.doc(table, &format!("{{\"id\":{id}}}")).await;
    doc.first().map(|p| p.payload["name"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repair_racing_live_updates_of_the_same_row_ends_with_the_newest_value() {
    // Many rows, the raced one last: a reconcile reads it again (under FOR SHARE) long after
    // its snapshot, so live updates land between the two.
    let n = 300;
    let (w, t, mut d, mut runner, tap_name) = streaming("race", n, "").await;
    let table = format!("public.{t}");
    let runner2 = lose_update(&w, &t, &mut runner, n, "lost");
    assert_eq!(reconcile(&w, &[]).keys(&table, "stale"), keys(&[n as u64]));
    // The daemon stops: the index keeps the lost state, so every reconcile below finds the row
    // stale and repairs it. The stream's events and the repairs queue up interleaved, and the
    // stale guard alone orders them once the daemon is back.
    assert!(d.sigterm().success());
    let stop = Arc::new(AtomicBool::new(false));
    let updater = {
        let (t, stop) = (t.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut i: u32 = 0;
            loop {
                psql(&format!(
                    "UPDATE public.{t} SET name = 'live {i}' WHERE id = {n}"
                ));
                i += 1;
                if stop.load(Ordering::SeqCst) {
                    return i;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    for _ in 0..3 {
        let r = reconcile(&w, &["--repair"]);
        assert_eq!(r.code, 1, "drift found and repaired: {}", r.stderr);
        assert_eq!(
            r.table(&table)["repairs"]["upserts"],
            json!(1),
            "{}",
            r.json
        );
    }
    // The last repair takes its snapshot while the updater runs; the updater's last update
    // commits after that snapshot and before the raced row (the last key, small pages) is read
    // again: the repair carries a value and a position that must not beat that update.
    let last = Command::new(env!("CARGO_BIN_EXE_cdc-indexer"))
        .args([
            "--config",
            path_str(&w.config_path),
            "reconcile",
            "--repair",
        ])
        .args(["--source", SOURCE, "--json", "--page-size", "2"])
        .env("CDC_INDEXER_SOURCE_PASSWORD", "postgres")
        .env("CDC_INDEXER_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("reconcile");
    let start = Instant::now();
    while psql_query(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'cdc-indexer reconcile' \
         AND xact_start IS NOT NULL AND query LIKE '%ORDER BY%LIMIT%'",
    ) == "0"
    {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "reconcile took no snapshot"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Ordering::SeqCst);
    let updates = updater.join().expect("updater");
    let newest = format!("live {}", updates - 1);
    let in_snapshot = psql_query(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'cdc-indexer reconcile' \
         AND xact_start IS NOT NULL AND query LIKE '%ORDER BY%LIMIT%'",
    );
    let out = last.wait_with_output().expect("reconcile");
    assert_eq!(out.status.code(), Some(1), "drift found and repaired");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        report["tables"][0]["repairs"]["upserts"],
        json!(1),
        "{report}"
    );
    println!(
        "race: {updates} live updates, 4 repairs; the last update committed while the last reconcile was {} its snapshot",
        if in_snapshot == "0" {
            "past"
        } else {
            "still in"
        }
    );
    // Every streamed update published (the tap holds the snapshot's reads too), then applied
    // with the repairs in queue order.
    tap_wait(&w, &tap_name, n + updates, &runner2).await;
    let mut d = w.start();
    d.wait_ready(Duration::from_secs(60));
    wait_drained(&w, &mut d).await;
    assert_reconciled(&w);
    drop(runner2);
    assert!(d.sigterm().success());
    assert_eq!(name_of(&w, &table, n).await, Some(json!(newest)));
    psql(&format!("DROP TABLE public.{t}"));
    tap_delete(&tap_name).await;
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_open_across_the_snapshot_ends_with_its_committed_value() {
    let (w, t, mut d, mut runner, tap_name) = streaming("open-tx", 3, "").await;
    let table = format!("public.{t}");
    let runner2 = lose_update(&w, &t, &mut runner, 1, "lost");
    // A writer opens its transaction before reconcile takes its snapshot...
    let mut writer = Command::new(format!("{REPO}/debezium/pg/psql.sh"))
        .args(["-q", "-v", "ON_ERROR_STOP=1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("psql");
    let mut stdin = writer.stdin.take().expect("stdin");
    use std::io::Write as _;
    writeln!(
        stdin,
        "BEGIN; UPDATE public.{t} SET name = 'from the open transaction' WHERE id = 1;"
    )
    .expect("write");
    stdin.flush().expect("flush");
    std::thread::sleep(Duration::from_secs(1));
    // ...reconcile sees the old row in its snapshot, and its repair waits for the writer.
    let repair = Command::new(env!("CARGO_BIN_EXE_cdc-indexer"))
        .args([
            "--config",
            path_str(&w.config_path),
            "reconcile",
            "--repair",
        ])
        .args(["--source", SOURCE, "--json"])
        .env("CDC_INDEXER_SOURCE_PASSWORD", "postgres")
        .stdout(Stdio::piped())
        .spawn()
        .expect("reconcile");
    let mut repair = repair;
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        repair.try_wait().expect("try_wait").is_none(),
        "the repair read waits for the open transaction's row lock"
    );
    // ...which commits after the snapshot.
    writeln!(stdin, "COMMIT;").expect("commit");
    drop(stdin);
    assert!(writer.wait().expect("psql").success());
    let out = repair.wait_with_output().expect("reconcile");
    assert_eq!(out.status.code(), Some(1), "drift found and repaired");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        report["tables"][0]["repairs"]["upserts"],
        json!(1),
        "{report}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    wait_drained(&w, &mut d).await;
    assert_reconciled(&w);
    drop(runner2);
    assert!(d.sigterm().success());
    assert_eq!(
        name_of(&w, &table, 1).await,
        Some(json!("from the open transaction"))
    );
    psql(&format!("DROP TABLE public.{t}"));
    tap_delete(&tap_name).await;
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_on_an_empty_index_is_a_full_load_and_the_stream_goes_on_after_it() {
    pg_start();
    let t = format!("rec_{}", rand_suffix());
    let table = format!("public.{t}");
    psql(&format!(
        "CREATE TABLE public.{t} (id int PRIMARY KEY, name text, body text); \
         INSERT INTO public.{t} SELECT i, 'name ' || i, 'body ' || i FROM generate_series(1, 60) i"
    ));
    let w = World::new(
        "backfill",
        &rule(&t),
        "[pipeline]\nbatch_max_wait_ms = 100\n",
    );
    w.declare().await;
    let mut d = w.start();
    d.wait_ready(Duration::from_secs(60));
    // Attached to a stream that never snapshots: the index starts empty.
    let runner = Runner::start(&w, &[&t], &["snapshot.mode=no_data"]);
    let r = reconcile(&w, &[]);
    assert_eq!(r.count(&table, "missing"), 60, "{}", r.json);
    let r = reconcile(&w, &["--repair", "--page-size", "25"]);
    assert_eq!(
        r.table(&table)["repairs"]["upserts"],
        json!(60),
        "{}",
        r.json
    );
    wait_drained(&w, &mut d).await;
    assert_reconciled(&w);
    // Streamed changes after the load are newer than its positions: they apply.
    psql(&format!(
        "UPDATE public.{t} SET name = 'after the load' WHERE id = 7"
    ));
    psql(&format!("DELETE FROM public.{t} WHERE id = 8"));
    tokio::time::sleep(Duration::from_secs(3)).await;
    wait_drained(&w, &mut d).await;
    assert_reconciled(&w);
    drop(runner);
    assert!(d.sigterm().success());
    assert_eq!(name_of(&w, &table, 7).await, Some(json!("after the load")));
    psql(&format!("DROP TABLE public.{t}"));
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_reconciles_on_its_own_repairs_and_reports_in_metrics() {
    pg_start();
    let t = format!("rec_{}", rand_suffix());
    let table = format!("public.{t}");
    psql(&format!(
        "CREATE TABLE public.{t} (id int PRIMARY KEY, name text, body text); \
         INSERT INTO public.{t} SELECT i, 'name ' || i, 'body ' || i FROM generate_series(1, 5) i"
    ));
    let w = World::new(
        "periodic",
        &rule(&t),
        &format!("[reconcile]\nsource_url = \"{SOURCE}\"\ninterval_s = 1\nrepair = true\n"),
    );
    w.declare().await;
    let mut d = w.start_with(&[("CDC_INDEXER_SOURCE_PASSWORD", "postgres")]);
    d.wait_ready(Duration::from_secs(60));
    let gauge = |d: &Daemon, state: &str| -> Option<f64> {
        let (_, text) = d.get("/metrics")?;
        text.lines()
            .find(|l| {
                l.starts_with("cdc_indexer_reconcile_documents{")
                    && l.contains(&format!("state=\"{state}\""))
                    && l.contains(&table)
            })
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    };
    let start = Instant::now();
    while gauge(&d, "ok") != Some(5.0) || gauge(&d, "missing") != Some(0.0) {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "not healed: ok {:?}, missing {:?}: {}",
            gauge(&d, "ok"),
            gauge(&d, "missing"),
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(d.metric_sum("cdc_indexer_reconcile_runs_total") >= 2.0);
    assert!(d.metric_sum("cdc_indexer_reconcile_repairs_total") >= 5.0);
    assert!(d.metric_sum("cdc_indexer_reconcile_last_run_timestamp_seconds") > 0.0);
    assert!(d.sigterm().success());
    assert_reconciled(&w);
    psql(&format!("DROP TABLE public.{t}"));
    w.cleanup().await;
}

/// A Debezium envelope of row `id` at `lsn`, as a connector of a database before a restore
/// produced it.
fn old_event(t: &str, id: u32, name: &str, lsn: u64, ts_ms: i64) -> Vec<u8> {
    json!({
        "before": null,
        "after": {"id": id, "name": name, "body": format!("body {id}")},
        "source": {"connector": "postgresql", "name": "dbserver1", "db": "postgres", "schema": "public",
                   "table": t, "lsn": lsn, "ts_ms": ts_ms},
        "op": "c",
        "ts_ms": ts_ms,
    })
    .to_string()
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_positions_went_backwards_reset_positions_lets_the_stream_apply_again() {
    pg_start();
    let t = format!("rec_{}", rand_suffix());
    let table = format!("public.{t}");
    psql(&format!(
        "CREATE TABLE public.{t} (id int PRIMARY KEY, name text, body text); \
         INSERT INTO public.{t} SELECT i, 'name ' || i, 'body ' || i FROM generate_series(1, 3) i"
    ));
    let w = World::new("reset", &rule(&t), "[pipeline]\nbatch_max_wait_ms = 100\n");
    w.declare().await;
    let mut d = w.start();
    d.wait_ready(Duration::from_secs(60));
    // The index was built from the database before its restore: positions far ahead.
    let conn = connect().await;
    let ch = confirm_channel(&conn).await;
    for id in 1..=3 {
        let body = old_event(&t, id, &format!("name {id}"), 1 << 60, 1_000);
        w.publish(&ch, &format!("dbserver1.public.{t}"), &body)
            .await;
    }
    let _ = conn.close(200, "ok".into()).await;
    wait_drained(&w, &mut d).await;
    // The restored database streams again, with positions from its own WAL.
    let runner = Runner::start(&w, &[&t], &["snapshot.mode=no_data"]);
    psql(&format!(
        "UPDATE public.{t} SET name = 'after the restore' WHERE id = 1"
    ));
    let start = Instant::now();
    while d.metric_sum("cdc_indexer_position_regressions_total") < 1.0 {
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "no regression counted: {}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_drained(&w, &mut d).await;
    // Reconcile sees positions beyond the database's own WAL: stale, and repaired with a
    // position reset.
    let r = reconcile(&w, &[]);
    assert_eq!(r.keys(&table, "stale"), keys(&[1, 2, 3]), "{}", r.json);
    assert!(
        r.table(&table)["examples"]["stale"][0]["reason"]
            .as_str()
            .is_some_and(|s| s.contains("ahead of the source database's WAL")),
        "{}",
        r.json
    );
    let r = reconcile(&w, &["--repair"]);
    assert_eq!(
        r.table(&table)["repairs"]["upserts"],
        json!(3),
        "{}",
        r.json
    );
    wait_drained(&w, &mut d).await;
    assert_reconciled(&w);
    // From now on the stream's positions order the events again.
    psql(&format!(
        "UPDATE public.{t} SET name = 'streamed again' WHERE id = 2"
    ));
    tokio::time::sleep(Duration::from_secs(3)).await;
    wait_drained(&w, &mut d).await;
    assert_reconciled(&w);
    // --reset-positions re-stamps every document (for resets reconcile cannot see).
    let r = reconcile(&w, &["--repair", "--reset-positions"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        r.table(&table)["repairs"]["upserts"],
        json!(3),
        "{}",
        r.json
    );
    wait_drained(&w, &mut d).await;
    assert_reconciled(&w);
    drop(runner);
    assert!(d.sigterm().success());
    assert_eq!(name_of(&w, &table, 2).await, Some(json!("streamed again")));
    psql(&format!("DROP TABLE public.{t}"));
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_and_repair_work_with_the_llamaindex_sink() {
    pg_start();
    let t = format!("rec_{}", rand_suffix());
    let table = format!("public.{t}");
    psql(&format!(
        "CREATE TABLE public.{t} (id int PRIMARY KEY, name text, body text, price numeric(8,2)); \
         INSERT INTO public.{t} SELECT i, 'name ' || i, 'body ' || i, i * 2.5 FROM generate_series(1, 6) i"
    ));
    let w = World::new("llama", &rule(&t), "[pipeline]\nbatch_max_wait_ms = 100\n");
    let service = PythonIndexer::start(w.dir.path());
    let env = [
        ("CDC_INDEXER__SINK__KIND", "llamaindex"),
        ("CDC_INDEXER__SINK__URL", service.url.as_str()),
    ];
    w.declare().await;
    let mut d = w.start_with(&env);
    d.wait_ready(Duration::from_secs(60));
    let r = reconcile_with(&w, &[], &env);
    assert_eq!(r.count(&table, "missing"), 6, "{}\n{}", r.json, r.stderr);
    assert_eq!(reconcile_with(&w, &["--repair"], &env).code, 1);
    wait_drained(&w, &mut d).await;
    assert_eq!(
        reconcile_with(&w, &[], &env).code,
        0,
        "the service's documents read back equal"
    );
    psql(&format!("DELETE FROM public.{t} WHERE id = 6"));
    let r = reconcile_with(&w, &[], &env);
    assert_eq!(r.keys(&table, "orphan"), keys(&[6]), "{}", r.json);
    assert_eq!(reconcile_with(&w, &["--repair"], &env).code, 1);
    wait_drained(&w, &mut d).await;
    let r = reconcile_with(&w, &[], &env);
    assert_eq!(r.code, 0, "{}\n{}", r.json, r.stderr);
    assert!(d.sigterm().success());
    psql(&format!("DROP TABLE public.{t}"));
    w.cleanup().await;
}

#[test]
fn reconcile_exit_codes_and_the_source_password_never_printed() {
    let w = World::new("exit", &rule("whatever"), "");
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_cdc-indexer"))
            .args(["--config", path_str(&w.config_path), "reconcile"])
            .args(args)
            .env("CDC_INDEXER_SOURCE_PASSWORD", "from-the-env-s3cret")
            .output()
            .expect("reconcile");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !text.contains("hunter2") && !text.contains("s3cret"),
            "{text}"
        );
        (out.status.code(), text)
    };
    // Configuration errors: 2.
    assert_eq!(run(&[]).0, Some(2), "no source");
    assert_eq!(run(&["--source", "mysql://u:hunter2@h/db"]).0, Some(2));
    assert_eq!(
        run(&["--source", "postgres://u:hunter2@h:notaport/db"]).0,
        Some(2)
    );
    let (code, text) = run(&["--source", SOURCE, "--table", "public.nope"]);
    assert_eq!(code, Some(2), "{text}");
    // Cannot find out: 3, with the URL redacted.
    let port = free_port();
    let (code, text) = run(&[
        "--source",
        &format!("postgres://u:hunter2@127.0.0.1:{port}/db"),
    ]);
    assert_eq!(code, Some(3), "{text}");
    assert!(text.contains("u:***@127.0.0.1"), "{text}");
}
