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

/// The runner processes of one slot: pids whose command line is `runner.py … <slot> …`
/// (zombies left out). With `exec`, the script's own pid is one of them once it runs.
fn runner_pids(slot: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let runner = args.iter().any(|a| a.ends_with("debezium/runner.py"));
        if !runner || !args.iter().any(|a| a == slot) {
            continue;
        }
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let zombie = stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
        if !zombie {
            pids.push(pid);
        }
    }
    pids
}

/// `debezium/run-local.sh` as an operator (or systemd) runs it, in a session of its own.
fn run_local(w: &World, slot: &str, table: &str, log: &std::path::Path) -> Child {
    let dir = w.dir.path();
    Command::new(format!("{REPO}/debezium/run-local.sh"))
        .args([
            "--no-install",
            "--exchange",
            &w.exchange,
            "--slot-name",
            slot,
            "--publication-name",
            &format!("pub_{slot}"),
            "--drop-slot-on-stop",
            "--offsets-file",
            path_str(&dir.join(format!("{slot}.offsets"))),
            "--ready-file",
            path_str(&dir.join(format!("{slot}.ready"))),
            "--table-include-list",
            &format!("public.{table}"),
            "--exchange-wait",
            "60",
        ])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(log).expect("log"))
        .stderr(std::fs::File::create(log.with_extension("err")).expect("log"))
        .spawn()
        .expect("spawn run-local.sh")
}

fn log_has(log: &std::path::Path, needle: &str) -> bool {
    std::fs::read_to_string(log.with_extension("err"))
        .unwrap_or_default()
        .contains(needle)
}

fn wait_for(what: &str, timeout: Duration, log: &std::path::Path, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < timeout,
            "{what}: not within {timeout:?}; run-local.sh's log:\n{}",
            std::fs::read_to_string(log.with_extension("err")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// SIGTERM to the script's pid; its exit status, and how long the runner took to go.
fn sigterm_and_wait(
    script: &mut Child,
    slot: &str,
    log: &std::path::Path,
) -> (std::process::ExitStatus, Duration) {
    let _ = Command::new("kill")
        .args(["-TERM", &script.id().to_string()])
        .status();
    let start = Instant::now();
    let deadline = Duration::from_secs(30);
    let status = loop {
        if let Some(status) = script.try_wait().expect("try_wait") {
            break status;
        }
        if start.elapsed() > deadline {
            let _ = script.kill();
            panic!(
                "run-local.sh still running {deadline:?} after SIGTERM:\n{}",
                std::fs::read_to_string(log.with_extension("err")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    while !runner_pids(slot).is_empty() {
        assert!(
            start.elapsed() < deadline,
            "the runner of {slot} still runs {deadline:?} after SIGTERM to run-local.sh (pids {:?})",
            runner_pids(slot)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (status, start.elapsed())
}

fn slot_exists(slot: &str) -> bool {
    common::debezium::psql_query(&format!(
        "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}'"
    )) != "0"
}

/// `debezium/run-local.sh` stopped with SIGTERM on its own pid (as systemd or a script stops
/// it) stops the Debezium runner — while it streams, while the runner starts, and before it
/// starts — within a deadline, with a clean exit and, once the runner ran, its slot dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_local_sh_stopped_with_sigterm_stops_the_runner() {
    common::debezium::pg_start();
    let suffix = rand_suffix();
    let table = format!("rl_{suffix}");
    psql(&format!(
        "CREATE TABLE public.{table} (id int PRIMARY KEY, name text NOT NULL)"
    ));
    let w = World::new(
        "runlocal",
        &format!(
            "[[tables]]\ntable = \"public.{table}\"\nid_columns = [\"id\"]\ntext = \"{{name}}\"\n"
        ),
        "",
    );
    w.declare().await;

    // 1. While it streams: the runner is the script's process (exec), and stops gracefully.
    let slot = format!("rl_{suffix}_a");
    let log = w.dir.path().join("streaming.log");
    let mut script = run_local(&w, &slot, &table, &log);
    let ready = w.dir.path().join(format!("{slot}.ready"));
    wait_for(
        "the runner streaming",
        Duration::from_secs(120),
        &log,
        || ready.exists(),
    );
    assert!(
        !runner_pids(&slot).is_empty(),
        "no runner process found for {slot}"
    );
    let (status, took) = sigterm_and_wait(&mut script, &slot, &log);
    assert!(
        status.success(),
        "exit {status} after SIGTERM while streaming"
    );
    assert!(
        log_has(&log, "clean shutdown after SIGTERM"),
        "no clean shutdown in the log"
    );
    assert!(
        !slot_exists(&slot),
        "the slot {slot} survived a graceful stop"
    );
    assert!(!ready.exists(), "the ready file survived the stop");
    println!("streaming: runner gone {took:?} after SIGTERM");

    // 2. While the runner starts (JVM, engine): it stops before streaming, exit 0.
    let slot = format!("rl_{suffix}_b");
    let log = w.dir.path().join("starting.log");
    let mut script = run_local(&w, &slot, &table, &log);
    wait_for(
        "the runner starting",
        Duration::from_secs(120),
        &log,
        || log_has(&log, "[runner]"),
    );
    let (status, took) = sigterm_and_wait(&mut script, &slot, &log);
    assert!(
        status.success(),
        "exit {status} after SIGTERM while the runner started"
    );
    assert!(
        !slot_exists(&slot),
        "the slot {slot} survived a stop during startup"
    );
    println!("starting: runner gone {took:?} after SIGTERM");

    // 3. Before the runner starts (the script is still preparing PostgreSQL): the script ends
    //    there, by the signal, and no runner is started later.
    let slot = format!("rl_{suffix}_c");
    let log = w.dir.path().join("preparing.log");
    let mut script = run_local(&w, &slot, &table, &log);
    wait_for(
        "the script preparing",
        Duration::from_secs(60),
        &log,
        || log_has(&log, "[pg-cdc]"),
    );
    let (status, _) = sigterm_and_wait(&mut script, &slot, &log);
    use std::os::unix::process::ExitStatusExt;
    let early = status.signal() == Some(15) && !log_has(&log, "[runner]");
    assert!(
        status.success() || early,
        "exit {status} after SIGTERM while preparing"
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        runner_pids(&slot).is_empty(),
        "a runner started after the stop"
    );
    assert!(!slot_exists(&slot), "a slot was created after the stop");

    psql(&format!("DROP TABLE public.{table}"));
    for s in ["a", "b", "c"] {
        psql(&format!("DROP PUBLICATION IF EXISTS pub_rl_{suffix}_{s}"));
    }
    w.cleanup().await;
}
