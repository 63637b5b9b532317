//! Runs the real daemon binary (`target/<profile>/cdc-indexer run`) over a backlog queued
//! before it starts, and measures the drain.
//!
//! Each measured phase is one daemon process: the backlog is published first, the daemon
//! starts, the clock starts when `/readyz` first answers 200 (connected, consuming) and stops
//! when `cdc_indexer_events_processed_total` (counted after the ack) reaches the backlog.
//! One process per phase also makes its `VmHWM` that phase's peak RSS.
//!
//! Environment overrides (`CDC_INDEXER__SECTION__KEY`, e.g. `CDC_INDEXER__BROKER__PREFETCH`)
//! are inherited by every daemon the bench starts.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cdc_indexer::config::TopologyConfig;

use crate::procs::{Proc, RssSampler, cpu_secs, free_addr, memory_kb};
use crate::rabbit::AMQP;

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// Where the daemon embeds.
#[derive(Debug, Clone)]
pub enum Embedding {
    /// In-process fastembed, the daemon's default settings.
    Fastembed,
    /// An OpenAI-compatible service at `url` (up to `/v1`).
    Http { url: String, max_in_flight: usize },
}

/// Where the daemon writes.
#[derive(Debug, Clone)]
pub enum SinkSpec {
    /// The embedded index at this directory.
    Embedded(PathBuf),
    /// The python-indexer at this URL.
    LlamaIndex(String),
}

/// One daemon configuration; its index and state directory persist across its phases.
pub struct Daemon {
    pub exe: PathBuf,
    pub dir: PathBuf,
    pub topology: TopologyConfig,
    pub embedding: Embedding,
    pub sink: SinkSpec,
}

/// What one drain measured.
#[derive(Debug, Clone, Default)]
pub struct Drain {
    pub events: u64,
    pub secs: f64,
    /// Largest `VmRSS` sampled while draining, and the process's `VmHWM` at the end (kB).
    pub rss_drain_kb: u64,
    pub hwm_kb: u64,
    /// CPU time the daemon used while draining (s): near `secs` × cores = compute-bound,
    /// far below = waiting (fsync, round trips, one stage after another).
    pub cpu_secs: f64,
    pub texts_embedded: f64,
    pub batches: f64,
    /// `cdc_indexer_embed_concurrency` at the end (the adaptive limit).
    pub embed_concurrency: f64,
}

impl Drain {
    pub fn rate(&self) -> f64 {
        self.events as f64 / self.secs.max(1e-9)
    }

    /// CPU used while draining, in % of one core.
    pub fn cpu_pct(&self) -> f64 {
        100.0 * self.cpu_secs / self.secs.max(1e-9)
    }
}

/// The daemon binary next to this example (`target/<profile>/examples/bench` →
/// `target/<profile>/cdc-indexer`), unless `--daemon PATH` says otherwise.
pub fn default_exe() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe
        .parent()
        .and_then(|p| p.parent())
        .map(|p| p.join("cdc-indexer"))
        .ok_or_else(|| anyhow::anyhow!("cannot locate the target directory"))?;
    anyhow::ensure!(
        path.exists(),
        "{} not found: build the daemon first (`cargo build`) or pass --daemon PATH",
        path.display()
    );
    Ok(path)
}

/// The daemon's config (defaults everywhere but names, paths and providers).
pub fn config_text(d: &Daemon, http: &str) -> String {
    let t = &d.topology;
    let state = d.dir.join("state");
    let embedding = match &d.embedding {
        Embedding::Fastembed => format!(
            "model_dir = \"{REPO}/.models/all-minilm-l6-v2\"\nonnxruntime_lib = \"{REPO}/.models/onnxruntime/libonnxruntime.so\""
        ),
        Embedding::Http { url, max_in_flight } => format!(
            "provider = \"http\"\nurl = \"{url}\"\nmodel = \"bench-fake-no-model\"\ndimensions = 384\nmax_in_flight = {max_in_flight}"
        ),
    };
    let sink = match &d.sink {
        SinkSpec::Embedded(path) => format!("path = \"{}\"", path.display()),
        SinkSpec::LlamaIndex(url) => format!("kind = \"llamaindex\"\nurl = \"{url}\""),
    };
    format!(
        "[broker]\nurl = \"{AMQP}\"\n\
         [topology]\nexchange = \"{}\"\ndead_letter_exchange = \"{}\"\ndead_letter_queue = \"{}\"\nqueue = \"{}\"\n\
         [pipeline]\nstate_dir = \"{}\"\n\
         [embedding]\n{embedding}\n\
         [sink]\n{sink}\n\
         [http]\nlisten = \"{http}\"\n\
         [[tables]]\ntable = \"public.products\"\nid_columns = [\"id\"]\ntext = \"{{name}}\\n\\n{{description}}\"\n",
        t.exchange,
        t.dead_letter_exchange,
        t.dead_letter_queue,
        t.queue,
        state.display(),
    )
}

impl Daemon {
    /// Starts the daemon on the backlog already queued, waits until it has processed
    /// `expected` events, stops it (SIGTERM) and returns what it measured.
    pub async fn drain(&self, label: &str, expected: u64) -> anyhow::Result<Drain> {
        std::fs::create_dir_all(&self.dir)?;
        let http = free_addr()?;
        let config = self.dir.join("config.toml");
        std::fs::write(&config, config_text(self, &http))?;
        let slug: String = label
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let log = self.dir.join(format!("daemon-{slug}.log"));
        let mut command = Command::new(&self.exe);
        command.args(["--config", path_str(&config)?, "run"]);
        let mut daemon = Proc::spawn(&format!("the daemon ({label})"), command, &log)?;
        let sampler = RssSampler::start(daemon.pid());
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()?;
        let base = format!("http://{http}");

        let started = Instant::now();
        loop {
            daemon.check_alive()?;
            if let Ok(r) = client.get(format!("{base}/readyz")).send().await
                && r.status().is_success()
            {
                break;
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(300),
                "{label}: the daemon was not ready within 300 s; its log: {}",
                log.display()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let t0 = Instant::now();
        let cpu0 = cpu_secs(daemon.pid()).unwrap_or(0.0);
        sampler.reset();
        let mut last = (0.0, Instant::now());
        loop {
            daemon.check_alive()?;
            let processed = metric(&client, &base, "cdc_indexer_events_processed_total").await;
            if processed >= expected as f64 {
                break;
            }
            if processed > last.0 {
                last = (processed, Instant::now());
            }
            anyhow::ensure!(
                last.1.elapsed() < Duration::from_secs(300),
                "{label}: no progress for 300 s at {processed} of {expected} events; its log: {}",
                log.display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let secs = t0.elapsed().as_secs_f64();
        let cpu = cpu_secs(daemon.pid()).unwrap_or(0.0) - cpu0;
        let rss_drain_kb = sampler.window_max();
        let hwm_kb = memory_kb(daemon.pid()).map_or(0, |(_, hwm)| hwm);
        let drain = Drain {
            events: expected,
            secs,
            rss_drain_kb,
            hwm_kb,
            cpu_secs: cpu,
            texts_embedded: metric(&client, &base, "cdc_indexer_texts_embedded_total").await,
            batches: metric(&client, &base, "cdc_indexer_batch_size_events_count").await,
            embed_concurrency: metric(&client, &base, "cdc_indexer_embed_concurrency").await,
        };
        drop(sampler);
        let stop = tokio::task::spawn_blocking(move || {
            daemon.stop(Duration::from_secs(30));
            daemon
        });
        let mut daemon = stop.await?;
        if let Ok(Some(status)) = daemon.child.try_wait()
            && !status.success()
        {
            eprintln!(
                "  warning: the daemon ({label}) exited with {status} on SIGTERM; log: {}",
                daemon.log.display()
            );
        }
        Ok(drain)
    }
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str()
        .ok_or_else(|| anyhow::anyhow!("{} is not UTF-8", p.display()))
}

/// The sum of a metric's samples over all label sets (0 when absent or unreachable).
pub async fn metric(client: &reqwest::Client, base: &str, name: &str) -> f64 {
    let Ok(response) = client.get(format!("{base}/metrics")).send().await else {
        return 0.0;
    };
    let text = response.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| {
            l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b'{') | Some(b' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
