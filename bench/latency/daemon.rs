//! The daemon under test: the real binary (`cdc-indexer run`), in-process fastembed model,
//! embedded index, search port on loopback; and what its `/metrics` say.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cdc_indexer::config::{Config, TopologyConfig};
use cdc_indexer::mapping::CompiledRule;

use crate::procs::{Proc, free_addr};
use crate::rabbit::AMQP;

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// What every daemon of the run shares: binary, directory (index, state), topology, table.
pub struct Setup {
    pub exe: PathBuf,
    pub dir: PathBuf,
    pub topology: TopologyConfig,
    pub table: String,
}

/// A running daemon.
pub struct Daemon {
    pub proc: Proc,
    /// Side port (`/readyz`, `/metrics`) and search port (`/search`, `/index/states`).
    pub http: String,
    pub search: String,
}

impl Setup {
    fn config_text(&self, http: &str, search: &str) -> String {
        let t = &self.topology;
        format!(
            "[broker]\nurl = \"{AMQP}\"\n\
             [topology]\nexchange = \"{}\"\ndead_letter_exchange = \"{}\"\ndead_letter_queue = \"{}\"\nqueue = \"{}\"\n\
             [pipeline]\nstate_dir = \"{}\"\n\
             [embedding]\nmodel_dir = \"{REPO}/.models/all-minilm-l6-v2\"\nonnxruntime_lib = \"{REPO}/.models/onnxruntime/libonnxruntime.so\"\n\
             [sink]\npath = \"{}\"\n\
             [http]\nlisten = \"{http}\"\nsearch_listen = \"{search}\"\n\
             [[tables]]\ntable = \"public.{}\"\nid_columns = [\"id\"]\ntext = \"{{name}}\\n\\n{{description}}\"\n",
            t.exchange,
            t.dead_letter_exchange,
            t.dead_letter_queue,
            t.queue,
            self.dir.join("state").display(),
            self.dir.join("index").display(),
            self.table,
        )
    }

    /// The daemon's config as it loads it (with the `CDC_INDEXER__*` overrides of this
    /// environment) and its table rule, which renders texts and hashes as the daemon does.
    pub fn config(&self) -> anyhow::Result<(Config, CompiledRule)> {
        std::fs::create_dir_all(&self.dir)?;
        let path = self.dir.join("probe-config.toml");
        std::fs::write(&path, self.config_text("127.0.0.1:1", "127.0.0.1:2"))?;
        let config = Config::load(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
        let rule = CompiledRule::new(&config.tables[0]).map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok((config, rule))
    }

    /// Starts a daemon (`env`: extra `CDC_INDEXER__*` overrides) and waits for `/readyz`.
    pub async fn start(&self, label: &str, env: &[(&str, String)]) -> anyhow::Result<Daemon> {
        std::fs::create_dir_all(&self.dir)?;
        let (http, search) = (free_addr()?, free_addr()?);
        let config = self.dir.join(format!("config-{label}.toml"));
        std::fs::write(&config, self.config_text(&http, &search))?;
        let mut command = Command::new(&self.exe);
        command
            .args(["--config", path_str(&config)?, "run"])
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())));
        let log = self.dir.join(format!("daemon-{label}.log"));
        let mut proc = Proc::spawn(&format!("the daemon ({label})"), command, &log)?;
        let client = client();
        let t0 = Instant::now();
        loop {
            proc.check_alive()?;
            if let Ok(r) = client.get(format!("http://{http}/readyz")).send().await
                && r.status().is_success()
            {
                break;
            }
            anyhow::ensure!(
                t0.elapsed() < Duration::from_secs(300),
                "the daemon ({label}) was not ready within 300 s; its log: {}",
                log.display()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(Daemon { proc, http, search })
    }
}

impl Daemon {
    pub async fn metrics(&self) -> Metrics {
        let text = match client()
            .get(format!("http://{}/metrics", self.http))
            .send()
            .await
        {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        Metrics(text)
    }

    /// SIGTERM, then wait (at most 30 s) for the exit.
    pub async fn stop(self) {
        let mut proc = self.proc;
        let _ = tokio::task::spawn_blocking(move || proc.stop(Duration::from_secs(30))).await;
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap_or_default()
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str()
        .ok_or_else(|| anyhow::anyhow!("{} is not UTF-8", p.display()))
}

/// One scrape of `/metrics`.
pub struct Metrics(pub String);

impl Metrics {
    /// The sum of a metric's samples over all label sets (0 when absent).
    pub fn sum(&self, name: &str) -> f64 {
        self.0
            .lines()
            .filter(|l| {
                l.starts_with(name)
                    && matches!(l.as_bytes().get(name.len()), Some(b'{') | Some(b' '))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// A histogram's cumulative buckets `(le, count)`, `+Inf` last.
    pub fn buckets(&self, name: &str) -> Vec<(f64, f64)> {
        let prefix = format!("{name}_bucket{{le=\"");
        self.0
            .lines()
            .filter_map(|l| {
                let rest = l.strip_prefix(&prefix)?;
                let (le, value) = rest.split_once("\"}")?;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((le, value.trim().parse().ok()?))
            })
            .collect()
    }
}

/// A histogram between two scrapes: what was observed in between.
pub struct Histogram(Vec<(f64, f64)>);

impl Histogram {
    pub fn between(before: &Metrics, after: &Metrics, name: &str) -> Histogram {
        let b = before.buckets(name);
        let a = after.buckets(name);
        Histogram(
            a.iter()
                .map(|&(le, n)| {
                    let was = b.iter().find(|(l, _)| *l == le).map_or(0.0, |(_, v)| *v);
                    (le, n - was)
                })
                .collect(),
        )
    }

    pub fn count(&self) -> f64 {
        self.0.last().map_or(0.0, |(_, n)| *n)
    }

    /// The q-quantile as Prometheus' `histogram_quantile` computes it (linear within the
    /// bucket); `None` without observations.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total <= 0.0 {
            return None;
        }
        let rank = q * total;
        let mut prev = (0.0, 0.0);
        for &(le, n) in &self.0 {
            if n >= rank {
                if le.is_infinite() {
                    return Some(prev.0);
                }
                let within = (rank - prev.1) / (n - prev.1).max(f64::MIN_POSITIVE);
                return Some(prev.0 + (le - prev.0) * within);
            }
            prev = (le, n);
        }
        Some(prev.0)
    }
}
