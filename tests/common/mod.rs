//! Shared helpers of the integration tests: a real RabbitMQ on 127.0.0.1:5672 (guest/guest),
//! uniquely named objects per test, the daemon binary run as a child process, and the
//! embedded index opened through the library once the daemon has stopped.
#![allow(dead_code)]

pub mod debezium;
pub mod reconcile;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cdc_indexer::config::Config;
use cdc_indexer::embed::Embedder;
use cdc_indexer::model::DocumentKey;
use cdc_indexer::sink::{Sink, StoredPoint};
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

pub const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/debezium");
pub const REPO: &str = env!("CARGO_MANIFEST_DIR");

pub fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{FIXTURES}/{name}")).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// A test's private world: names, a temp dir, a config file.
pub struct World {
    pub name: String,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub http: String,
    /// The daemon's search port (`/search`, and the `/index/*` reads of `reconcile`).
    pub search: String,
    pub exchange: String,
    pub queue: String,
    pub dlx: String,
    pub dlq: String,
}

pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

impl World {
    /// `tables` is TOML for the `[[tables]]` rules; `extra` more TOML (e.g. `[pipeline]`).
    pub fn new(test: &str, tables: &str, extra: &str) -> World {
        let name = format!("t-{test}-{}-{}", std::process::id(), rand_suffix());
        let dir = tempfile::tempdir().expect("tempdir");
        let http = format!("127.0.0.1:{}", free_port());
        let search = format!("127.0.0.1:{}", free_port());
        let w = World {
            exchange: format!("{name}.events"),
            queue: format!("{name}.q"),
            dlx: format!("{name}.dlx"),
            dlq: format!("{name}.dlq"),
            config_path: dir.path().join("config.toml"),
            http,
            search,
            dir,
            name,
        };
        let config = format!(
            r#"
[broker]
url = "{AMQP}"
prefetch = 200
[topology]
exchange = "{ex}"
dead_letter_exchange = "{dlx}"
dead_letter_queue = "{dlq}"
queue = "{q}"
routing_patterns = ["dbserver1.#", "mysql-server-1.#"]
[embedding]
model_dir = "{repo}/.models/all-minilm-l6-v2"
onnxruntime_lib = "{repo}/.models/onnxruntime/libonnxruntime.so"
[sink]
path = "{index}"
[http]
listen = "{http}"
search_listen = "{search}"
{extra}
{tables}
"#,
            ex = w.exchange,
            dlx = w.dlx,
            dlq = w.dlq,
            q = w.queue,
            repo = REPO,
            index = w.dir.path().join("index").display(),
            http = w.http,
            search = w.search,
        );
        std::fs::write(&w.config_path, config).expect("write config");
        w
    }

    /// Points the config at the python-indexer on `url` instead of the embedded index.
    pub fn use_llamaindex_sink(&self, url: &str) {
        let text = std::fs::read_to_string(&self.config_path).expect("config");
        let embedded = format!(
            "[sink]\npath = \"{}\"",
            self.dir.path().join("index").display()
        );
        assert!(text.contains(&embedded), "the config has the embedded sink");
        let text = text.replace(&embedded, "")
            + &format!("[sink]\nkind = \"llamaindex\"\nurl = \"{url}\"\n");
        std::fs::write(&self.config_path, text).expect("config");
    }

    pub fn config(&self) -> Config {
        Config::load(&self.config_path).expect("config loads")
    }

    /// Starts the daemon (`cdc-indexer run`).
    pub fn start(&self) -> Daemon {
        self.start_with(&[])
    }

    /// Starts the daemon with extra environment variables.
    pub fn start_with(&self, env: &[(&str, &str)]) -> Daemon {
        let log = std::fs::File::create(
            self.dir
                .path()
                .join(format!("daemon-{}.log", rand_suffix())),
        )
        .expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_cdc-indexer"))
            .args(["--config", self.config_path.to_str().expect("utf8"), "run"])
            .env("CDC_INDEXER_LOG", "info,cdc_indexer=debug")
            .env(
                "CDC_INDEXER__PIPELINE__STATE_DIR",
                self.dir.path().join("state"),
            )
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn daemon");
        Daemon {
            child,
            http: self.http.clone(),
            dir: self.dir.path().to_path_buf(),
        }
    }

    /// Publishes like Debezium Server's RabbitMQ sink: persistent, to the exchange, routed
    /// by topic, confirmed.
    pub async fn publish(&self, channel: &Channel, routing_key: &str, body: &[u8]) {
        let confirm = channel
            .basic_publish(
                self.exchange.as_str().into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(
            matches!(confirm, lapin::Confirmation::Ack(_)),
            "{confirm:?}"
        );
    }

    pub async fn declare(&self) {
        let conn = connect().await;
        let ch = conn.create_channel().await.expect("channel");
        cdc_indexer::broker::topology::declare(&ch, &self.config().topology)
            .await
            .expect("declare");
        let _ = conn.close(200, "ok".into()).await;
    }

    /// Removes this test's broker objects.
    pub async fn cleanup(&self) {
        let conn = connect().await;
        let ch = conn.create_channel().await.expect("channel");
        for q in [&self.queue, &self.dlq] {
            let _ = ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        for e in [&self.exchange, &self.dlx] {
            let _ = ch
                .exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
        let _ = conn.close(200, "ok".into()).await;
    }

    pub async fn queue_depth(&self, queue: &str) -> u32 {
        let conn = connect().await;
        let ch = conn.create_channel().await.expect("channel");
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("passive declare");
        let _ = conn.close(200, "ok".into()).await;
        q.message_count()
    }

    /// Takes every DLQ entry (acking them): (routing key, headers as text, body).
    pub async fn drain_dlq(
        &self,
    ) -> Vec<(String, std::collections::BTreeMap<String, String>, Vec<u8>)> {
        let conn = connect().await;
        let ch = conn.create_channel().await.expect("channel");
        let mut out = Vec::new();
        while let Some(m) = ch
            .basic_get(self.dlq.as_str().into(), BasicGetOptions::default())
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
                .ack(BasicAckOptions::default())
                .await
                .expect("ack");
        }
        let _ = conn.close(200, "ok".into()).await;
        out
    }

    /// Opens the index (the daemon must be stopped).
    pub async fn index(&self) -> Index {
        let config = self.config();
        let sink = cdc_indexer::sink::from_config(&config).await.expect("sink");
        sink.prepare(384).await.expect("prepare");
        Index { sink, config }
    }
}

pub struct Index {
    pub sink: std::sync::Arc<dyn Sink>,
    pub config: Config,
}

impl Index {
    pub async fn doc(&self, table: &str, key: &str) -> Vec<StoredPoint> {
        self.sink
            .fetch(&DocumentKey {
                table: table.into(),
                key: key.into(),
            })
            .await
            .expect("fetch")
    }
    pub async fn count(&self, table: Option<&str>) -> u64 {
        self.sink.count(table).await.expect("count")
    }
    pub async fn embedder(&self) -> std::sync::Arc<dyn Embedder> {
        cdc_indexer::embed::from_config(&self.config.embedding)
            .await
            .expect("embedder")
    }
}

pub async fn connect() -> Connection {
    Connection::connect(AMQP, ConnectionProperties::default())
        .await
        .expect("RabbitMQ on 127.0.0.1:5672")
}

pub async fn confirm_channel(conn: &Connection) -> Channel {
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm");
    ch
}

pub fn rand_suffix() -> String {
    format!("{:08x}", rand::random::<u32>())
}

pub struct Daemon {
    pub child: Child,
    pub http: String,
    pub dir: PathBuf,
}

impl Daemon {
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(&self.http, path)
    }

    pub fn wait_ready(&mut self, timeout: Duration) {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!("daemon exited early with {status}: {}", self.log());
            }
            if matches!(self.get("/readyz"), Some((200, _))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("daemon not ready after {timeout:?}: {}", self.log());
    }

    /// Sum of a counter over all label sets.
    pub fn metric_sum(&self, name: &str) -> f64 {
        let Some((_, text)) = self.get("/metrics") else {
            return 0.0;
        };
        text.lines()
            .filter(|l| {
                l.starts_with(name)
                    && (l.as_bytes().get(name.len()) == Some(&b'{')
                        || l.as_bytes().get(name.len()) == Some(&b' '))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .fold(0.0, |a, b| a + b)
    }

    /// Waits until `events_processed_total` reaches `n`.
    /// Waits until the metric `name` (summed over its labels) reaches `at_least`.
    pub fn wait_metric(&mut self, name: &str, at_least: f64, timeout: Duration) {
        let start = Instant::now();
        while self.metric_sum(name) < at_least {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!("daemon exited with {status}: {}", self.log());
            }
            assert!(
                start.elapsed() < timeout,
                "{name} < {at_least} after {timeout:?}: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn wait_processed(&mut self, n: f64, timeout: Duration) {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if self.metric_sum("cdc_indexer_events_processed_total") >= n {
                return;
            }
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!("daemon exited with {status}: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "processed {} < {n} after {timeout:?}: {}",
            self.metric_sum("cdc_indexer_events_processed_total"),
            self.log()
        );
    }

    pub fn sigterm(&mut self) -> std::process::ExitStatus {
        self.sigterm_within(Duration::from_secs(30))
    }

    /// SIGTERM, then wait up to `timeout` for the exit.
    pub fn sigterm_within(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let pid = self.child.id() as i32;
        // SAFETY-free: kill(1) with the pid; no libc binding needed.
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        self.wait_exit(timeout)
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return s;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill9();
        panic!("daemon did not exit within {timeout:?}: {}", self.log());
    }

    pub fn log(&self) -> String {
        let mut out = String::new();
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with("daemon-") {
                    out.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
                }
            }
        }
        let lines: Vec<&str> = out.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill9();
        }
    }
}

/// A plain HTTP/1.0 GET (blocking, no client runtime involved): status and body.
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf8 path")
}

pub fn headers(pairs: &[(&str, &str)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert(
            ShortString::from(k.to_string()),
            AMQPValue::LongString(LongString::from(*v)),
        );
    }
    t
}

/// Waits until the main queue has nothing ready and the daemon has processed every message
/// it received, twice in a row a batch window apart.
pub async fn wait_drained(w: &World, d: &mut Daemon) {
    let start = Instant::now();
    let mut calm = 0;
    while start.elapsed() < Duration::from_secs(180) {
        let received = d.metric_sum("cdc_indexer_events_received_total");
        let processed = d.metric_sum("cdc_indexer_events_processed_total");
        if w.queue_depth(&w.queue).await == 0 && received == processed {
            calm += 1;
            if calm >= 3 {
                return;
            }
        } else {
            calm = 0;
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    panic!("not drained after 180 s: {}", d.log());
}

/// A received message: routing key, headers as text, body.
pub type Received = (String, std::collections::BTreeMap<String, String>, Vec<u8>);

/// Consumes exactly `n` messages of `queue` (auto-ack), waiting up to 10 s. The main queue is
/// a quorum queue with single-active-consumer, which refuses `basic.get`.
pub async fn consume_n(queue: &str, n: usize) -> Vec<Received> {
    use futures_util::StreamExt;
    let conn = connect().await;
    let ch = conn.create_channel().await.expect("channel");
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            format!("test-{}", rand_suffix()).as_str().into(),
            lapin::options::BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut out = Vec::new();
    while out.len() < n {
        let d = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .expect("message in time")
            .expect("stream")
            .expect("delivery");
        let headers = d
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
        out.push((d.routing_key.as_str().to_string(), headers, d.data.clone()));
    }
    let _ = conn.close(200, "ok".into()).await;
    out
}

/// The python-indexer service (python-indexer/run.sh) on a free loopback port, with its own
/// local Qdrant directory. Killed on drop.
pub struct PythonIndexer {
    pub child: Child,
    pub url: String,
    pub port: u16,
    pub qdrant_path: PathBuf,
    pub log_path: PathBuf,
}

impl PythonIndexer {
    pub fn start(dir: &Path) -> PythonIndexer {
        Self::start_on(dir, free_port())
    }

    pub fn start_on(dir: &Path, port: u16) -> PythonIndexer {
        Self::start_on_with(dir, port, &[])
    }

    /// With extra environment variables (`PYTHON_INDEXER_*`).
    pub fn start_on_with(dir: &Path, port: u16, env: &[(&str, &str)]) -> PythonIndexer {
        let qdrant_path = dir.join("python-qdrant");
        let log_path = dir.join(format!("python-indexer-{port}-{}.log", rand_suffix()));
        let child = Command::new(format!("{REPO}/python-indexer/run.sh"))
            .env("PYTHON_INDEXER_PORT", port.to_string())
            .env("PYTHON_INDEXER_QDRANT_PATH", &qdrant_path)
            .env("PYTHON_INDEXER_COLLECTION", "conformance")
            .env("CDC_INDEXER_MODELS", format!("{REPO}/.models"))
            .env_remove("QDRANT_URL")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path).expect("log"))
            .spawn()
            .expect("spawn python-indexer");
        let mut p = PythonIndexer {
            child,
            url: format!("http://127.0.0.1:{port}"),
            port,
            qdrant_path,
            log_path,
        };
        p.wait_healthy();
        p
    }

    pub fn wait_healthy(&mut self) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(120) {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "python-indexer exited with {status}: {}",
                    std::fs::read_to_string(&self.log_path).unwrap_or_default()
                );
            }
            if matches!(
                http_get(&format!("127.0.0.1:{}", self.port), "/healthz"),
                Some((200, _))
            ) {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "python-indexer not healthy: {}",
            std::fs::read_to_string(&self.log_path).unwrap_or_default()
        );
    }

    pub fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(15) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PythonIndexer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}
