//! One function per phase of the benchmark. Each declares its own topology, queues its
//! backlog before its consumer starts, and deletes what it declared.

use std::path::Path;
use std::time::{Duration, Instant};

use cdc_indexer::config::Config;
use cdc_indexer::mapping::CompiledRule;

use crate::corpus::{self, Version};
use crate::daemon::{Daemon, Drain, Embedding, SinkSpec, config_text};
use crate::fake_embedder::FakeEmbedder;
use crate::python_indexer::PythonIndexer;
use crate::rabbit::Rabbit;
use crate::report::{CeilingRun, DaemonOps, RssRun, SeedOps};
use crate::seed;

/// Source positions: each phase's events are newer than every earlier phase's.
const LSN_INSERT: u64 = 1_000_000_000;
const LSN_UPDATE: u64 = 2_000_000_000;
const LSN_UNCHANGED: u64 = 3_000_000_000;
const LSN_DELETE: u64 = 4_000_000_000;
const LSN_RSS: u64 = 5_000_000_000;

const V_INSERT: Version = Version::INSERTED;

fn v_update() -> Version {
    V_INSERT.new_text()
}

fn v_unchanged() -> Version {
    v_update().new_price()
}

pub struct Env<'a> {
    pub rabbit: &'a Rabbit,
    pub dir: &'a Path,
    pub exe: &'a Path,
    pub n: u64,
}

impl Env<'_> {
    async fn daemon(
        &self,
        run: &str,
        embedding: Embedding,
        sink: SinkSpec,
    ) -> anyhow::Result<Daemon> {
        Ok(Daemon {
            exe: self.exe.to_path_buf(),
            dir: self.dir.join(run),
            topology: self.rabbit.declare(run).await?,
            embedding,
            sink,
        })
    }

    async fn publish(
        &self,
        d: &Daemon,
        bodies: impl Iterator<Item = Vec<u8>>,
    ) -> anyhow::Result<u64> {
        let started = Instant::now();
        let count = corpus::publish(&self.rabbit.conn, &d.topology.exchange, bodies).await?;
        eprintln!(
            "    queued {count} events in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        Ok(count)
    }

    /// Queues `bodies`, then lets a fresh daemon process drain them.
    async fn drain(
        &self,
        d: &Daemon,
        label: &str,
        bodies: impl Iterator<Item = Vec<u8>>,
    ) -> anyhow::Result<Drain> {
        let count = self.publish(d, bodies).await?;
        let drain = d.drain(label, count).await?;
        eprintln!(
            "  {label}: {:.1} events/s ({:.2} s; {:.0} batches; daemon CPU {:.0} %; RSS {:.0} MB while draining, peak {:.0} MB; {:.0} texts embedded)",
            drain.rate(),
            drain.secs,
            drain.batches,
            drain.cpu_pct(),
            drain.rss_drain_kb as f64 / 1024.0,
            drain.hwm_kb as f64 / 1024.0,
            drain.texts_embedded
        );
        Ok(drain)
    }

    /// Inserts, text-changing updates, same-text updates, deletes: one daemon process each.
    async fn four_ops(&self, d: &Daemon, name: &str) -> anyhow::Result<DaemonOps> {
        let ids = 1..=self.n;
        Ok(DaemonOps {
            inserts: self
                .drain(
                    d,
                    &format!("{name} inserts"),
                    ids.clone()
                        .map(|id| corpus::event(id, "c", V_INSERT, LSN_INSERT + id)),
                )
                .await?,
            updates: self
                .drain(
                    d,
                    &format!("{name} updates (text)"),
                    ids.clone()
                        .map(|id| corpus::event(id, "u", v_update(), LSN_UPDATE + id)),
                )
                .await?,
            unchanged: self
                .drain(
                    d,
                    &format!("{name} updates (same text)"),
                    ids.clone()
                        .map(|id| corpus::event(id, "u", v_unchanged(), LSN_UNCHANGED + id)),
                )
                .await?,
            deletes: self
                .drain(
                    d,
                    &format!("{name} deletes"),
                    ids.map(|id| corpus::event(id, "d", v_unchanged(), LSN_DELETE + id)),
                )
                .await?,
        })
    }
}

/// The raw broker consume+ack ceiling over `count` messages.
pub async fn broker(env: &Env<'_>, count: u64) -> anyhow::Result<(u64, f64)> {
    let rate = crate::broker_ceiling::measure(env.rabbit, count, env.n).await?;
    eprintln!("  raw broker consume+ack: {rate:.0} msg/s over {count} messages");
    Ok((count, rate))
}

/// The bare embedder: fastembed in-process with the daemon's settings, the same N texts as
/// the daemon's inserts (rendered by the daemon's own rule), in chunks of 256 (a batch).
pub async fn embedder(env: &Env<'_>) -> anyhow::Result<(u64, f64)> {
    let probe = Daemon {
        exe: env.exe.to_path_buf(),
        dir: env.dir.join("embedder"),
        topology: Default::default(),
        embedding: Embedding::Fastembed,
        sink: SinkSpec::Embedded(env.dir.join("embedder").join("index")),
    };
    std::fs::create_dir_all(&probe.dir)?;
    let path = probe.dir.join("config.toml");
    std::fs::write(&path, config_text(&probe, "127.0.0.1:1"))?;
    let config = Config::load(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let rule = CompiledRule::new(&config.tables[0]).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let mut texts = Vec::new();
    for id in 1..=env.n {
        let row = corpus::row(id, V_INSERT);
        let object = row.as_object().ok_or_else(|| anyhow::anyhow!("row"))?;
        let doc = rule.render(object).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        texts.push(doc.chunks.concat());
    }
    let embedder = cdc_indexer::embed::from_config(&config.embedding).await?;
    let started = Instant::now();
    for chunk in texts.chunks(256) {
        embedder.embed(chunk).await?;
    }
    let rate = env.n as f64 / started.elapsed().as_secs_f64();
    eprintln!("  bare embedder: {rate:.1} texts/s");
    Ok((env.n, rate))
}

/// The daemon with the in-process model and the embedded index.
pub async fn embedded(env: &Env<'_>) -> anyhow::Result<DaemonOps> {
    let index = env.dir.join("embedded").join("index");
    let d = env
        .daemon("embedded", Embedding::Fastembed, SinkSpec::Embedded(index))
        .await?;
    let result = env.four_ops(&d, "embedded").await;
    env.rabbit.delete(&d.topology).await;
    result
}

/// The daemon with the in-process model writing to a python-indexer it starts.
pub async fn llamaindex(env: &Env<'_>) -> anyhow::Result<DaemonOps> {
    let service =
        PythonIndexer::start(&env.dir.join("llamaindex-service"), "llamaindex sink").await?;
    let d = env
        .daemon(
            "llamaindex",
            Embedding::Fastembed,
            SinkSpec::LlamaIndex(service.url.clone()),
        )
        .await?;
    let result = env.four_ops(&d, "llamaindex").await;
    env.rabbit.delete(&d.topology).await;
    drop(service);
    result
}

/// The seed design on the same inserts and deletes, against a python-indexer of its own.
pub async fn seed(env: &Env<'_>) -> anyhow::Result<SeedOps> {
    let service = PythonIndexer::start(&env.dir.join("seed-service"), "seed design").await?;
    let topology = env.rabbit.declare("seed").await?;
    let run = async {
        let ids = 1..=env.n;
        let mut out = Vec::new();
        for (label, bodies) in [
            ("inserts", ids.clone().map(|id| corpus::event(id, "c", V_INSERT, LSN_INSERT + id)).collect::<Vec<_>>()),
            ("deletes", ids.clone().map(|id| corpus::event(id, "d", V_INSERT, LSN_DELETE + id)).collect()),
        ] {
            let count = corpus::publish(&env.rabbit.conn, &topology.exchange, bodies.into_iter()).await?;
            let drain = seed::drain(env.rabbit, &topology.queue, &service.url, count).await?;
            eprintln!(
                "  SEED DESIGN {label}: {:.1} events/s ({:.1} s; first tenth {:.1}/s, last tenth {:.1}/s)",
                drain.rate(),
                drain.secs,
                drain.first_tenth,
                drain.last_tenth
            );
            out.push(drain);
        }
        let deletes = out.pop().unwrap_or_default();
        let inserts = out.pop().unwrap_or_default();
        anyhow::Ok(SeedOps { inserts, deletes })
    }
    .await;
    env.rabbit.delete(&topology).await;
    drop(service);
    run
}

/// The daemon's own ceiling: inserts embedded by the fake (model-free) service, once per
/// `max_in_flight`.
pub async fn ceiling(
    env: &Env<'_>,
    in_flight: &[usize],
    latency: Duration,
) -> anyhow::Result<Vec<CeilingRun>> {
    let fake = FakeEmbedder::start(latency)?;
    let mut runs = Vec::new();
    for &k in in_flight {
        let run = format!("ceiling-{k}");
        let embedding = Embedding::Http {
            url: fake.url.clone(),
            max_in_flight: k,
        };
        let index = env.dir.join(&run).join("index");
        let d = env
            .daemon(&run, embedding, SinkSpec::Embedded(index))
            .await?;
        let (r0, t0) = served(&fake);
        let drain = env
            .drain(
                &d,
                &format!("fake embedder, max_in_flight {k}, inserts"),
                (1..=env.n).map(|id| corpus::event(id, "c", V_INSERT, LSN_INSERT + id)),
            )
            .await;
        env.rabbit.delete(&d.topology).await;
        let (r1, t1) = served(&fake);
        runs.push(CeilingRun {
            max_in_flight: k,
            drain: drain?,
            requests: r1 - r0,
            texts: t1 - t0,
        });
    }
    Ok(runs)
}

fn served(fake: &FakeEmbedder) -> (u64, u64) {
    use std::sync::atomic::Ordering::Relaxed;
    (
        fake.served.requests.load(Relaxed),
        fake.served.texts.load(Relaxed),
    )
}

/// Peak RSS while draining N deletes, then `factor`×N (the same keys, `factor` rounds, newer
/// positions each round), both queued before the daemon starts.
pub async fn rss(env: &Env<'_>, factor: u64) -> anyhow::Result<RssRun> {
    let index = env.dir.join("rss").join("index");
    let d = env
        .daemon("rss", Embedding::Fastembed, SinkSpec::Embedded(index))
        .await?;
    let n = env.n;
    let run = async {
        let base = env
            .drain(
                &d,
                "rss deletes, backlog N",
                (1..=n).map(|id| corpus::event(id, "d", V_INSERT, LSN_RSS + id)),
            )
            .await?;
        let big = env
            .drain(
                &d,
                &format!("rss deletes, backlog {factor}×N"),
                (0..factor * n)
                    .map(|i| corpus::event(1 + i % n, "d", V_INSERT, LSN_RSS + n + 1 + i)),
            )
            .await?;
        anyhow::Ok(RssRun { factor, base, big })
    }
    .await;
    env.rabbit.delete(&d.topology).await;
    run
}
