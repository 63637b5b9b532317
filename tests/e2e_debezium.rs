//! End to end: PostgreSQL insert/update/delete → the real Debezium engine (debezium/runner.py)
//! → RabbitMQ → the daemon → `search` reflects it.
//!
//! Needs the local logical-decoding cluster (debezium/pg/start.sh, started here), Java 17 and
//! the runner's Python deps in .venv (scripts/setup-python.sh).

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn psql(sql: &str) {
    let out = Command::new(format!("{REPO}/debezium/pg/psql.sh"))
        .args(["-q", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()
        .expect("psql");
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Runner(Child);

impl Drop for Runner {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
    }
}

/// Top search hit's key for `query`, from the running daemon's /search (on its search port).
fn top_key(search: &str, query: &str, table: &str) -> Option<String> {
    let q: String = query.replace(' ', "%20");
    let (status, body) = http_get(search, &format!("/search?q={q}&table={table}&limit=1"))?;
    if status != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    v["results"][0]["key"].as_str().map(str::to_string)
}

fn eventually(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if check() {
            return start.elapsed();
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("{what}: not within {timeout:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_changes_reach_search_through_real_debezium() {
    let status = Command::new(format!("{REPO}/debezium/pg/start.sh"))
        .status()
        .expect("pg start");
    assert!(status.success(), "debezium/pg/start.sh failed");
    let suffix = rand_suffix();
    let table = format!("e2e_{suffix}");
    psql(&format!(
        "CREATE TABLE public.{table} (id int PRIMARY KEY, name text NOT NULL, description text NOT NULL)"
    ));
    psql(&format!(
        "INSERT INTO public.{table} VALUES \
         (1, 'Alpine tent', 'A four-season tent for high camps in snow and wind'), \
         (2, 'Espresso grinder', 'A burr grinder for fine, even espresso grounds'), \
         (3, 'Trail shoe', 'A light running shoe with a grippy sole for muddy trails')"
    ));
    let rules = format!(
        "[[tables]]\ntable = \"public.{table}\"\nid_columns = [\"id\"]\ntext = \"{{name}}: {{description}}\"\n"
    );
    let w = World::new("e2e", &rules, "[pipeline]\nbatch_max_wait_ms = 100\n");
    // /search is off unless given a port of its own: the World gives it one.
    let search = w.search.clone();
    let mut d = w.start();
    d.wait_ready(Duration::from_secs(60));

    let offsets = w.dir.path().join("offsets.dat");
    let ready = w.dir.path().join("runner.ready");
    let log = std::fs::File::create(w.dir.path().join("daemon-runner.log")).expect("log");
    let _runner = Runner(
        Command::new(format!("{REPO}/.venv/bin/python"))
            .args([
                &format!("{REPO}/debezium/runner.py"),
                "--exchange",
                &w.exchange,
                "--slot-name",
                &format!("e2e_{suffix}"),
                "--publication-name",
                &format!("pub_e2e_{suffix}"),
                "--drop-slot-on-stop",
                "--offsets-file",
                path_str(&offsets),
                "--ready-file",
                path_str(&ready),
                "--table-include-list",
                &format!("public.{table}"),
                "--property",
                "poll.interval.ms=100",
                "--exchange-wait",
                "60",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn runner"),
    );
    let t = format!("public.{table}");

    // Snapshot: the three rows are searchable.
    let snapshot = eventually("snapshot indexed", Duration::from_secs(120), || {
        top_key(&search, "espresso coffee grinder", &t).as_deref() == Some(r#"{"id":2}"#)
    });
    // Insert.
    psql(&format!(
        "INSERT INTO public.{table} VALUES (4, 'Kayak paddle', 'A carbon paddle for sea kayaking')"
    ));
    let insert = eventually("insert searchable", Duration::from_secs(60), || {
        top_key(&search, "paddle for a sea kayak", &t).as_deref() == Some(r#"{"id":4}"#)
    });
    // Update: row 1 becomes something else entirely.
    psql(&format!(
        "UPDATE public.{table} SET name = 'Cast iron skillet', description = 'A heavy pan for searing steak' WHERE id = 1"
    ));
    let update = eventually("update searchable", Duration::from_secs(60), || {
        top_key(&search, "pan to sear a steak", &t).as_deref() == Some(r#"{"id":1}"#)
    });
    // Delete: row 3 disappears.
    psql(&format!("DELETE FROM public.{table} WHERE id = 3"));
    let delete = eventually("delete applied", Duration::from_secs(60), || {
        top_key(&search, "running shoe for muddy trails", &t).as_deref() != Some(r#"{"id":3}"#)
    });
    println!(
        "e2e latencies: snapshot {snapshot:?}, insert {insert:?}, update {update:?}, delete {delete:?}"
    );

    // The oracle: the index equals the table (through the running daemon's side port).
    common::reconcile::assert_reconciled(&w);
    drop(_runner);
    assert!(d.sigterm().success());
    let index = w.index().await;
    assert_eq!(index.count(Some(&t)).await, 3, "rows 1, 2, 4");
    assert!(index.doc(&t, r#"{"id":3}"#).await.is_empty());
    assert_eq!(
        index.doc(&t, r#"{"id":1}"#).await[0].payload["name"],
        serde_json::json!("Cast iron skillet")
    );
    assert!(w.drain_dlq().await.is_empty());
    drop(index);
    // And on the index itself, once the daemon has stopped.
    common::reconcile::assert_reconciled(&w);
    psql(&format!("DROP TABLE public.{table}"));
    w.cleanup().await;
}
