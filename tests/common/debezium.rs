//! Real Debezium for the tests: the local logical-decoding PostgreSQL (debezium/pg/, port
//! 54329) and the real Debezium 3.6.3 engine (debezium/runner.py), publishing to a test's
//! exchange exactly as Debezium Server's RabbitMQ sink does. A *tap* queue bound to the same
//! exchange keeps a copy of everything published, so a test knows when Debezium has sent its
//! events and can replay old ones.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lapin::options::{QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;

use super::*;

/// Starts (or reuses) the local CDC cluster.
pub fn pg_start() {
    let status = Command::new(format!("{REPO}/debezium/pg/start.sh"))
        .stdout(Stdio::null())
        .status()
        .expect("pg start");
    assert!(status.success(), "debezium/pg/start.sh failed");
}

/// Runs SQL on the CDC cluster.
pub fn psql(sql: &str) {
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

/// Runs a query on the CDC cluster; its unaligned, tuples-only output.
pub fn psql_query(sql: &str) -> String {
    let out = Command::new(format!("{REPO}/debezium/pg/psql.sh"))
        .args(["-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()
        .expect("psql");
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The Debezium runner for one test: its own slot and offsets, capturing `tables`.
pub struct Runner {
    child: Child,
    pub log: std::path::PathBuf,
}

impl Runner {
    /// Starts the runner publishing to `w`'s exchange and waits until it streams.
    /// `properties`: extra Debezium engine properties (`key=value`).
    pub fn start(w: &World, tables: &[&str], properties: &[&str]) -> Runner {
        let suffix = rand_suffix();
        let offsets = w.dir.path().join(format!("offsets-{suffix}.dat"));
        let ready = w.dir.path().join(format!("runner-{suffix}.ready"));
        let log = w.dir.path().join(format!("runner-{suffix}.log"));
        let include: Vec<String> = tables.iter().map(|t| format!("public.{t}")).collect();
        let mut args = vec![
            format!("{REPO}/debezium/runner.py"),
            "--exchange".into(),
            w.exchange.clone(),
            "--slot-name".into(),
            format!("t_{suffix}"),
            // Its own publication: in `filtered` mode a runner sets the publication's tables
            // to its own, so runners sharing one would take each other's tables away.
            "--publication-name".into(),
            format!("pub_t_{suffix}"),
            "--drop-slot-on-stop".into(),
            "--offsets-file".into(),
            path_str(&offsets).into(),
            "--ready-file".into(),
            path_str(&ready).into(),
            "--table-include-list".into(),
            include.join(","),
            "--exchange-wait".into(),
            "60".into(),
            "--property".into(),
            "poll.interval.ms=100".into(),
        ];
        for p in properties {
            args.push("--property".into());
            args.push((*p).into());
        }
        let child = Command::new(format!("{REPO}/.venv/bin/python"))
            .args(&args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("runner log"))
            .spawn()
            .expect("spawn runner");
        let mut runner = Runner { child, log };
        let start = Instant::now();
        while !ready.exists() {
            if let Ok(Some(status)) = runner.child.try_wait() {
                panic!("runner exited with {status}: {}", runner.log_text());
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "runner not streaming after 120 s: {}",
                runner.log_text()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        runner
    }

    pub fn log_text(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// SIGTERM and wait (the slot is dropped on a graceful stop).
    pub fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

/// Declares a queue bound to `w`'s exchange with `#`: a copy of every message published.
pub async fn tap(w: &World) -> String {
    let name = format!("{}.tap", w.name);
    let conn = connect().await;
    let ch = conn.create_channel().await.expect("channel");
    ch.queue_declare(
        name.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare tap");
    ch.queue_bind(
        name.as_str().into(),
        w.exchange.as_str().into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind tap");
    let _ = conn.close(200, "ok".into()).await;
    name
}

/// Waits until the tap holds at least `n` messages (Debezium has published them).
pub async fn tap_wait(w: &World, tap: &str, n: u32, runner: &Runner) {
    let start = Instant::now();
    loop {
        let depth = w.queue_depth(tap).await;
        if depth >= n {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "only {depth} of {n} events published after 120 s: {}",
            runner.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Takes every message of the tap.
pub async fn tap_take(tap: &str) -> Vec<Received> {
    let conn = connect().await;
    let ch = conn.create_channel().await.expect("channel");
    let mut out = Vec::new();
    while let Some(m) = ch
        .basic_get(tap.into(), lapin::options::BasicGetOptions::default())
        .await
        .expect("get")
    {
        let headers = m
            .delivery
            .properties
            .headers()
            .as_ref()
            .map(|h| {
                h.inner()
                    .iter()
                    .map(|(k, v)| (k.as_str().to_string(), cdc_indexer::broker::header_text(v)))
                    .collect()
            })
            .unwrap_or_default();
        out.push((
            m.delivery.routing_key.as_str().to_string(),
            headers,
            m.delivery.data.clone(),
        ));
        m.delivery
            .acker
            .ack(lapin::options::BasicAckOptions::default())
            .await
            .expect("ack");
    }
    let _ = conn.close(200, "ok".into()).await;
    out
}

/// Deletes the tap.
pub async fn tap_delete(tap: &str) {
    let conn = connect().await;
    let ch = conn.create_channel().await.expect("channel");
    let _ = ch
        .queue_delete(tap.into(), lapin::options::QueueDeleteOptions::default())
        .await;
    let _ = conn.close(200, "ok".into()).await;
}
