//! Reconcile benchmark: prints figures, asserts nothing.
//!
//! For each table size (default 10,000 and 100,000 rows): a PostgreSQL table (127.0.0.1:5432)
//! and an embedded index whose documents are exactly what the pipeline writes for its rows
//! (built with the mapping code and written straight into the index with a constant vector:
//! no embedding), so that every key is `ok`. Then `cdc-indexer reconcile --json` is timed, and
//! its peak RSS sampled from /proc, in two ways: through a running daemon's side port (the
//! index lives in the daemon: the figure is reconcile's own memory), and opening the index
//! itself (the figure includes the index engine).
//!
//! `cargo run --example bench-reconcile -- [ROWS...]` (needs `cargo build` first, RabbitMQ for
//! the daemon, and `psql` on PATH).

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cdc_indexer::config::Config;
use cdc_indexer::mapping::CompiledRule;
use cdc_indexer::model::{PositionAt, SourcePosition};
use cdc_indexer::reconcile::source::{self, SourceTable};
use cdc_indexer::sink::{Point, Write};
use cdc_indexer::stored::{CommitMeta, chunk_payload, commit_payload};

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const SOURCE: &str = "postgres://postgres@127.0.0.1:5432/postgres";

fn psql(sql: &str) {
    let status = Command::new("psql")
        .args([
            "-X",
            "-q",
            "-h",
            "127.0.0.1",
            "-p",
            "5432",
            "-U",
            "postgres",
            "-d",
            "postgres",
        ])
        .args(["-v", "ON_ERROR_STOP=1", "-c", sql])
        .status()
        .expect("psql");
    assert!(status.success(), "psql {sql}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port")
}

/// The daemon binary: `--daemon PATH`, else the debug build next to this bench.
fn daemon_binary() -> String {
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--daemon"
            && let Some(path) = args.next()
        {
            return path;
        }
    }
    format!(
        "{}/debug/cdc-indexer",
        std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| format!("{REPO}/target"))
    )
}

fn config_text(dir: &std::path::Path, table: &str, http: &str, search: &str) -> String {
    format!(
        r#"
[topology]
exchange = "bench-rec-{port}.events"
dead_letter_exchange = "bench-rec-{port}.dlx"
dead_letter_queue = "bench-rec-{port}.dlq"
queue = "bench-rec-{port}.q"
queue_type = "classic"
[embedding]
model_dir = "{REPO}/.models/all-minilm-l6-v2"
onnxruntime_lib = "{REPO}/.models/onnxruntime/libonnxruntime.so"
[sink]
path = "{index}"
[http]
listen = "{http}"
# reconcile reads the running daemon's index through its search port.
search_listen = "{search}"
[pipeline]
state_dir = "{state}"
[[tables]]
table = "public.{table}"
id_columns = ["id"]
text = "{{name}}: {{description}}"
"#,
        port = http.rsplit(':').next().unwrap_or("0"),
        index = dir.join("index").display(),
        state = dir.join("state").display(),
    )
}

/// Builds the index of every row of the table as the pipeline would, with a constant vector.
async fn load(config: &Config, rule: &CompiledRule) -> usize {
    let sink = cdc_indexer::sink::from_config(config).await.expect("sink");
    sink.prepare(384).await.expect("prepare");
    let mut conn = source::connect(SOURCE, None).await.expect("connect");
    let table = SourceTable::describe(&mut conn, rule, Default::default())
        .await
        .expect("describe");
    let lsn = source::current_lsn(&mut conn)
        .await
        .expect("lsn")
        .unwrap_or(1);
    let position = SourcePosition {
        connector: "dbserver1".into(),
        at: PositionAt::Lsn(lsn),
    };
    let mut vector = vec![0.0f32; 384];
    vector[0] = 1.0;
    let mut after: Option<Vec<String>> = None;
    let mut n = 0;
    loop {
        let rows = table
            .page(&mut conn, after.as_deref(), 2000)
            .await
            .expect("page");
        let Some(last) = rows.last() else { break };
        after = Some(last.key_text.clone());
        let mut upserts = Vec::new();
        for row in &rows {
            let key = rule.key(&row.values).expect("key");
            let values = rule.kept(row.values.clone());
            let rendered = rule.render(&values).expect("render");
            let chunks = rendered.chunks.len();
            for (i, text) in rendered.chunks.iter().enumerate().skip(1) {
                upserts.push(Point {
                    id: key.point_id(i),
                    vector: vector.clone(),
                    payload: chunk_payload(&key, i, chunks, &rendered.hash, text),
                });
            }
            let meta = CommitMeta {
                key: &key,
                chunks,
                hash: Some(&rendered.hash),
                position: Some(&position),
                source_ts_ms: Some(1),
            };
            upserts.push(Point {
                id: key.point_id(0),
                vector: vector.clone(),
                payload: commit_payload(
                    meta,
                    &rule.payload_fields(&values),
                    &rule.hidden_fields(&values),
                    &rendered.chunks[0],
                ),
            });
        }
        n += rows.len();
        sink.write(Arc::new(Write {
            upserts,
            ..Write::default()
        }))
        .await
        .expect("write");
    }
    sink.idle().await;
    n
}

/// Runs reconcile, sampling its RSS: (seconds, peak RSS in MiB, report).
fn timed_reconcile(config: &std::path::Path) -> (f64, f64, serde_json::Value) {
    let started = Instant::now();
    let child = Command::new(daemon_binary())
        .args([
            "--config",
            &config.display().to_string(),
            "reconcile",
            "--json",
        ])
        .args(["--source", SOURCE])
        .env("CDC_INDEXER_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("reconcile");
    let status_path = format!("/proc/{}/status", child.id());
    let sampler = std::thread::spawn(move || {
        let mut peak_kb = 0u64;
        while let Ok(status) = std::fs::read_to_string(&status_path) {
            if let Some(kb) = status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
            {
                peak_kb = peak_kb.max(kb);
            }
            if status.contains("State:\tZ") {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        peak_kb
    });
    let out = child.wait_with_output().expect("reconcile output");
    let secs = started.elapsed().as_secs_f64();
    let peak_kb = sampler.join().unwrap_or(0);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    (secs, peak_kb as f64 / 1024.0, report)
}

fn http_ready(addr: &str) -> bool {
    use std::io::{Read, Write as _};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return false;
    };
    let _ = write!(s, "GET /readyz HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    let mut r = String::new();
    let _ = s.read_to_string(&mut r);
    r.starts_with("HTTP/1.1 200") || r.starts_with("HTTP/1.0 200")
}

/// Removes the daemon's broker objects.
async fn cleanup(config: &Config) {
    let Ok(conn) = lapin::Connection::connect(
        "amqp://guest:guest@127.0.0.1:5672/%2f",
        lapin::ConnectionProperties::default(),
    )
    .await
    else {
        return;
    };
    if let Ok(ch) = conn.create_channel().await {
        let t = &config.topology;
        for q in [&t.queue, &t.dead_letter_queue] {
            let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
        }
        for e in [&t.exchange, &t.dead_letter_exchange] {
            let _ = ch
                .exchange_delete(e.as_str().into(), Default::default())
                .await;
        }
    }
    let _ = conn.close(200, "done".into()).await;
}

#[tokio::main]
async fn main() {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    println!("daemon and reconcile: {}", daemon_binary());
    let mut figures: Vec<(usize, f64, f64)> = Vec::new();
    let sizes = if sizes.is_empty() {
        vec![10_000, 100_000]
    } else {
        sizes
    };
    for rows in sizes {
        let dir = tempfile::tempdir().expect("tmp");
        let table = format!("bench_rec_{}_{rows}", std::process::id());
        psql(&format!(
            "DROP TABLE IF EXISTS public.{table}; \
             CREATE TABLE public.{table} (id bigint PRIMARY KEY, name text, description text, price numeric(10,2), tags text[], updated_at timestamptz); \
             INSERT INTO public.{table} SELECT i, 'product ' || i, 'A durable product for long weekends in the mountains, number ' || i || '. It packs down small and weighs less than you expect.', (i % 1000) / 10.0, ARRAY['outdoor', 'tag' || (i % 17)], '2024-01-01'::timestamptz + i * interval '1 second' FROM generate_series(1, {rows}) i"
        ));
        let http = format!("127.0.0.1:{}", free_port());
        let config_path = dir.path().join("config.toml");
        let search = format!("127.0.0.1:{}", free_port());
        std::fs::write(
            &config_path,
            config_text(dir.path(), &table, &http, &search),
        )
        .expect("config");
        let config = Config::load(&config_path).expect("config");
        let rule = CompiledRule::new(&config.tables[0]).expect("rule");
        let started = Instant::now();
        let loaded = load(&config, &rule).await;
        let load_s = started.elapsed().as_secs_f64();

        // 1. The CLI opens the index itself.
        let (secs, rss, report) = timed_reconcile(&config_path);
        println!(
            "{rows} rows (index opened by reconcile): {:.1} s, {:.0} rows/s, peak RSS {rss:.0} MiB, drift {} (loaded in {load_s:.1} s)",
            secs,
            loaded as f64 / secs,
            report["drift"]
        );
        // 2. Through a running daemon: the index lives in the daemon's process.
        let mut daemon = Command::new(daemon_binary())
            .args(["--config", &config_path.display().to_string(), "run"])
            .env("CDC_INDEXER_LOG", "warn")
            .stderr(Stdio::null())
            .spawn()
            .expect("daemon");
        let wait = Instant::now();
        while !http_ready(&http) && wait.elapsed() < Duration::from_secs(120) {
            std::thread::sleep(Duration::from_millis(200));
        }
        let (secs, rss, report) = timed_reconcile(&config_path);
        println!(
            "{rows} rows (through the daemon): {:.1} s, {:.0} rows/s, peak RSS of reconcile {rss:.0} MiB, drift {}",
            secs,
            loaded as f64 / secs,
            report["drift"]
        );
        let through_daemon_ok = report["ok"] == serde_json::json!(true);
        figures.push((rows, loaded as f64 / secs, rss));
        let _ = Command::new("kill")
            .args(["-TERM", &daemon.id().to_string()])
            .status();
        let _ = daemon.wait();
        cleanup(&config).await;
        psql(&format!("DROP TABLE public.{table}"));
        assert!(through_daemon_ok, "reconcile through the daemon: {report}");
    }
    if let (Some(first), Some(last)) = (figures.first(), figures.last())
        && first.0 != last.0
    {
        println!(
            "through the daemon, {} → {} rows ({:.0}×): rows/s {:.0} → {:.0}, reconcile's peak RSS {:.0} → {:.0} MiB ({:.2}×)",
            first.0,
            last.0,
            last.0 as f64 / first.0 as f64,
            first.1,
            last.1,
            first.2,
            last.2,
            last.2 / first.2
        );
    }
}
