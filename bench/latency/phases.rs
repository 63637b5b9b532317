//! The measurements: the daemon's capacity for single-row text-changing updates end to end,
//! paced loads at a fraction of it, and a backlog drained with two batching settings.

use std::time::{Duration, Instant};

use cdc_indexer::mapping::CompiledRule;
use serde_json::{Map, Value};

use crate::daemon::{Daemon, Histogram, Metrics, Setup};
use crate::procs::cpu_secs;
use crate::source::{Pg, texts};
use crate::track::{Tracker, Update, now};

/// Writes the updates: each a single-row UPDATE of its own, with a text never written before.
pub struct Writer {
    pub pg: Pg,
    pub tracker: Tracker,
    pub rule: CompiledRule,
    pub rows: u64,
    pub search_every: u64,
    next_seq: u64,
    next_row: u64,
}

impl Writer {
    pub fn new(
        pg: Pg,
        tracker: Tracker,
        rule: CompiledRule,
        rows: u64,
        search_every: u64,
    ) -> Writer {
        Writer {
            pg,
            tracker,
            rule,
            rows,
            search_every: search_every.max(1),
            next_seq: 1,
            next_row: 0,
        }
    }

    /// One update of the next row (round robin): registered, committed, its commit time noted.
    async fn one(&mut self) -> anyhow::Result<()> {
        let (seq, id) = (self.next_seq, self.next_row % self.rows + 1);
        self.next_seq += 1;
        self.next_row += 1;
        let (name, description) = texts(id, seq);
        let mut row = Map::new();
        row.insert("id".into(), Value::from(id));
        row.insert("name".into(), Value::from(name));
        row.insert("description".into(), Value::from(description));
        let rendered = self
            .rule
            .render(&row)
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        self.tracker.register(Update {
            seq,
            id,
            hash: rendered.hash,
            text: rendered.text,
            sampled: seq % self.search_every == 0,
            ..Update::default()
        });
        self.pg.update(id, seq).await?;
        self.tracker.committed(seq, now());
        Ok(())
    }

    /// `n` updates of distinct rows (when `n` ≤ rows), as fast as one connection commits them.
    /// Returns the range of sequence numbers.
    pub async fn burst(&mut self, n: u64) -> anyhow::Result<(u64, u64)> {
        let from = self.next_seq;
        for _ in 0..n {
            self.one().await?;
        }
        Ok((from, self.next_seq))
    }

    /// Updates at `rate` per second for `secs` (open loop: update i is due at i / rate; a late
    /// one goes at once). Returns the range and the rate achieved.
    pub async fn paced(&mut self, rate: f64, secs: f64) -> anyhow::Result<(u64, u64, f64)> {
        let from = self.next_seq;
        let n = (rate * secs).round().max(1.0) as u64;
        let t0 = tokio::time::Instant::now();
        for i in 0..n {
            tokio::time::sleep_until(t0 + Duration::from_secs_f64(i as f64 / rate)).await;
            self.one().await?;
        }
        let took = t0.elapsed().as_secs_f64().max(1e-9);
        Ok((
            from,
            self.next_seq,
            n.saturating_sub(1).max(1) as f64 / took,
        ))
    }
}

/// Waits until every update of `from..to` is written (and found, if sampled), at most `wait`;
/// the rest is given up.
async fn settle(tracker: &Tracker, from: u64, to: u64, wait: Duration) {
    let t0 = Instant::now();
    while !tracker.all_written(from, to) && t0.elapsed() < wait {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tracker.give_up(from, to);
}

/// Waits until the daemon's `events_processed_total` reaches `target`; when it did (Unix s).
async fn processed(daemon: &mut Daemon, target: f64) -> anyhow::Result<f64> {
    let mut last = (0.0, Instant::now());
    loop {
        daemon.proc.check_alive()?;
        let n = daemon
            .metrics()
            .await
            .sum("cdc_indexer_events_processed_total");
        if n >= target {
            return Ok(now());
        }
        if n > last.0 {
            last = (n, Instant::now());
        }
        anyhow::ensure!(
            last.1.elapsed() < Duration::from_secs(300),
            "no progress for 300 s at {n} of {target} events processed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub struct Capacity {
    pub updates: u64,
    pub secs: f64,
    pub rate: f64,
    pub verified: usize,
}

/// `n` updates committed as fast as possible through the whole pipeline: the rate from the
/// first commit to the daemon's ack of the last (`events_processed_total`; the probe is off
/// meanwhile), then every one checked searchable by its chunk-0 hash.
pub async fn capacity(w: &mut Writer, daemon: &mut Daemon, n: u64) -> anyhow::Result<Capacity> {
    w.tracker.set_probing(false);
    let before = daemon
        .metrics()
        .await
        .sum("cdc_indexer_events_processed_total");
    let t0 = now();
    let (from, to) = w.burst(n).await?;
    let done = processed(daemon, before + n as f64).await?;
    w.tracker.set_probing(true);
    settle(&w.tracker, from, to, Duration::from_secs(60)).await;
    let verified = w
        .tracker
        .range(from, to)
        .iter()
        .filter(|u| u.written.is_some())
        .count();
    let secs = done - t0;
    Ok(Capacity {
        updates: n,
        secs,
        rate: n as f64 / secs.max(1e-9),
        verified,
    })
}

/// One paced load: the updates, and the daemon's own histograms over the phase.
pub struct Load {
    pub label: String,
    pub target_rate: f64,
    pub rate: f64,
    pub secs: f64,
    pub updates: Vec<Update>,
    pub share: Histogram,
    pub lag: Histogram,
    pub embed: Histogram,
    pub write: Histogram,
    pub batches: f64,
    pub daemon_cpu_pct: f64,
}

pub async fn load(
    w: &mut Writer,
    daemon: &Daemon,
    label: &str,
    rate: f64,
    secs: f64,
) -> anyhow::Result<Load> {
    w.tracker.set_probing(true);
    let m0: Metrics = daemon.metrics().await;
    let cpu0 = cpu_secs(daemon.proc.pid()).unwrap_or(0.0);
    let t0 = Instant::now();
    let (from, to, achieved) = w.paced(rate, secs).await?;
    settle(&w.tracker, from, to, Duration::from_secs(30)).await;
    let cpu = cpu_secs(daemon.proc.pid()).unwrap_or(0.0) - cpu0;
    let elapsed = t0.elapsed().as_secs_f64();
    let m1 = daemon.metrics().await;
    Ok(Load {
        label: label.to_string(),
        target_rate: rate,
        rate: achieved,
        secs,
        updates: w.tracker.range(from, to),
        share: Histogram::between(&m0, &m1, "cdc_indexer_delivery_to_ack_seconds"),
        lag: Histogram::between(&m0, &m1, "cdc_indexer_lag_seconds"),
        embed: Histogram::between(&m0, &m1, "cdc_indexer_embed_duration_seconds"),
        write: Histogram::between(&m0, &m1, "cdc_indexer_write_duration_seconds"),
        batches: m1.sum("cdc_indexer_batch_size_events_count")
            - m0.sum("cdc_indexer_batch_size_events_count"),
        daemon_cpu_pct: 100.0 * cpu / elapsed.max(1e-9),
    })
}

/// A backlog drained by a fresh daemon.
pub struct Drain {
    pub label: String,
    pub events: u64,
    pub secs: f64,
    pub batches: f64,
    pub searchable: usize,
}

impl Drain {
    pub fn rate(&self) -> f64 {
        self.events as f64 / self.secs.max(1e-9)
    }
}

/// `n` updates queued while no daemon runs (Debezium publishes them; the tap sees them all),
/// then a daemon started with `env` drains them: events/s from `/readyz` to the ack of the
/// last, as the throughput bench times a drain.
pub async fn backlog(
    w: &mut Writer,
    setup: &Setup,
    label: &str,
    env: &[(&str, String)],
    n: u64,
) -> anyhow::Result<Drain> {
    w.tracker.set_probing(false);
    let (from, to) = w.burst(n).await?;
    let t0 = Instant::now();
    while w.tracker.broker_seen(from, to) < n as usize {
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(180),
            "only {} of {n} updates reached the broker after 180 s",
            w.tracker.broker_seen(from, to)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut daemon = setup.start(label, env).await?;
    let ready = now();
    w.tracker.set_search(&daemon.search);
    let done = processed(&mut daemon, n as f64).await?;
    let batches = daemon
        .metrics()
        .await
        .sum("cdc_indexer_batch_size_events_count");
    w.tracker.set_probing(true);
    settle(&w.tracker, from, to, Duration::from_secs(60)).await;
    w.tracker.set_probing(false);
    let searchable = w
        .tracker
        .range(from, to)
        .iter()
        .filter(|u| u.written.is_some() || u.superseded)
        .count();
    daemon.stop().await;
    Ok(Drain {
        label: label.to_string(),
        events: n,
        secs: done - ready,
        batches,
        searchable,
    })
}
