//! Prometheus metrics (prefix `cdc_indexer_`, base units, `_total` counters) and the
//! daemon's health flags. One [`Metrics`] is built at start and passed in; no globals.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    /// Messages taken from the queue, by table and op (`-` when undecodable).
    pub events_received: IntCounterVec,
    /// Messages fully handled, by table, op and outcome (`upserted`, `deleted`, `truncated`,
    /// `ignored`, `skipped_stale`, `skipped_unchanged`, `skipped_unknown_table`, `dead_lettered`).
    pub events_processed: IntCounterVec,
    /// Messages sent to the DLQ, by table and error kind.
    pub dead_lettered: IntCounterVec,
    /// Events skipped, by reason (`stale`, `unchanged`).
    pub skipped: IntCounterVec,
    pub batch_size: Histogram,
    pub embed_seconds: Histogram,
    pub write_seconds: Histogram,
    /// Delay from the database commit (`source.ts_ms`) to the ack.
    pub lag_seconds: Histogram,
    /// Delay from a delivery's arrival at the daemon to its ack: the daemon's own share.
    pub delivery_to_ack_seconds: Histogram,
    pub last_lag_seconds: prometheus::Gauge,
    pub points_written: IntCounter,
    pub texts_embedded: IntCounter,
    /// Retries of transient failures, by stage (`embed`, `sink`, `broker`).
    pub retries: IntCounterVec,
    pub paused: IntGauge,
    pub broker_connected: IntGauge,
    pub reconnects: IntCounter,
    /// Unix time of the pipeline's last heartbeat (set when scraped).
    pub heartbeat: IntGauge,
    /// Messages in the main queue and the DLQ (polled).
    pub queue_messages: IntGaugeVec,
    /// Dead letters the broker returned as unroutable (the DLX has no queue bound).
    pub dead_letters_unroutable: IntCounter,
    /// Deletes that arrived without their key (unwrap SMT default mode), by table.
    pub unapplied_deletes: IntCounterVec,
    /// Documents longer than `max_chunks`, indexed by their first chunks, by table.
    pub documents_truncated: IntCounterVec,
    /// Documents whose text rendered empty (no points, a marker), by table.
    pub empty_documents: IntCounterVec,
    /// Deliveries processed alone because they were in flight when the daemon last died.
    pub isolated_deliveries: IntCounter,
    /// Deliveries the broker had delivered before (returned by a restart or a lost channel).
    pub redelivered: IntCounter,
    /// Suspects the last crashes left (set at start).
    pub crash_suspects: IntGauge,
    /// 1 while the crash journal is usable.
    pub crash_journal_ok: IntGauge,
    /// Batches the index refused as a whole (then bisected).
    pub write_rejections: IntCounter,
    /// Embedding requests allowed in flight (adaptive for a remote service).
    pub embed_concurrency: IntGauge,
    /// Stale events newer by `source.ts_ms` than what the index holds: a position reset.
    pub position_regressions: IntCounterVec,
    /// Documents by table and state (`ok`, `missing`, `stale`, `orphan`) of the last reconcile.
    pub reconcile_documents: IntGaugeVec,
    /// Unix time the last reconcile run finished.
    pub reconcile_last_run: IntGauge,
    /// How long the last reconcile run took.
    pub reconcile_duration: prometheus::Gauge,
    /// Source rows per second the last reconcile run read.
    pub reconcile_rows_per_second: prometheus::Gauge,
    /// Reconcile runs by result (`ok`, `drift`, `failed`).
    pub reconcile_runs: IntCounterVec,
    /// Repair events reconcile published, by table and action (`upsert`, `rewrite`, `delete`).
    pub reconcile_repairs: IntCounterVec,
    pub health: Arc<Health>,
}

/// What `/healthz` and `/readyz` answer from.
///
/// Liveness is measured on the monotonic clock (`std::time::Instant`): a wall-clock step
/// (NTP, a VM resumed, an operator's `date -s`) neither makes a busy loop look stalled nor a
/// stalled loop look alive. The wall-clock time of the last beat is kept beside it, for the
/// `pipeline_heartbeat_timestamp_seconds` metric only.
pub struct Health {
    pub broker_connected: AtomicBool,
    pub consuming: AtomicBool,
    pub paused: AtomicBool,
    pub sink_ok: AtomicBool,
    /// Unix seconds of the pipeline loop's last turn (for Prometheus; not for liveness).
    pub heartbeat: AtomicI64,
    /// Milliseconds since `started` (monotonic) of the last turn.
    beat_ms: AtomicU64,
    started: std::time::Instant,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            broker_connected: AtomicBool::new(false),
            consuming: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            sink_ok: AtomicBool::new(false),
            heartbeat: AtomicI64::new(chrono::Utc::now().timestamp()),
            beat_ms: AtomicU64::new(0),
            started: std::time::Instant::now(),
        }
    }
}

impl Health {
    fn monotonic_ms(&self, now: std::time::Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.started).as_millis()).unwrap_or(u64::MAX)
    }
    pub fn beat(&self) {
        self.beat_at(std::time::Instant::now());
    }
    /// A beat at monotonic time `now`.
    pub fn beat_at(&self, now: std::time::Instant) {
        self.beat_ms
            .store(self.monotonic_ms(now), Ordering::Relaxed);
        self.heartbeat
            .store(chrono::Utc::now().timestamp(), Ordering::Relaxed);
    }
    pub fn ready(&self) -> bool {
        self.broker_connected.load(Ordering::Relaxed)
            && self.consuming.load(Ordering::Relaxed)
            && !self.paused.load(Ordering::Relaxed)
            && self.sink_ok.load(Ordering::Relaxed)
    }
    /// True when the last beat is at most `max_silence_s` seconds old, on the monotonic clock.
    pub fn alive(&self, max_silence_s: i64) -> bool {
        self.alive_at(std::time::Instant::now(), max_silence_s)
    }
    /// [`Health::alive`] as seen at monotonic time `now`.
    pub fn alive_at(&self, now: std::time::Instant, max_silence_s: i64) -> bool {
        let silence_ms = self
            .monotonic_ms(now)
            .saturating_sub(self.beat_ms.load(Ordering::Relaxed));
        let limit_ms = u64::try_from(max_silence_s.max(0)).unwrap_or(0) * 1000;
        silence_ms <= limit_ms
    }
}

/// Fine below one second (a p99 of 1 s must be readable), coarse beyond.
const LAG_BUCKETS: [f64; 23] = [
    0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0,
    10.0, 30.0, 60.0, 300.0, 1800.0,
];

/// The daemon's share: milliseconds matter.
const SHARE_BUCKETS: [f64; 20] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0,
    10.0, 30.0, 60.0,
];

fn buckets(start: f64, factor: f64, count: usize) -> Vec<f64> {
    prometheus::exponential_buckets(start, factor, count).unwrap_or_default()
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new_custom(Some("cdc_indexer".into()), None)?;
        let counter_vec =
            |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
                let c = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(c.clone()))?;
                Ok(c)
            };
        let histogram =
            |name: &str, help: &str, b: Vec<f64>| -> Result<Histogram, prometheus::Error> {
                let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(b))?;
                registry.register(Box::new(h.clone()))?;
                Ok(h)
            };
        let gauge = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let counter = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let last_lag_seconds = prometheus::Gauge::new(
            "last_lag_seconds",
            "Lag of the most recently acked event: ack time minus source.ts_ms.",
        )?;
        registry.register(Box::new(last_lag_seconds.clone()))?;
        let queue_messages = IntGaugeVec::new(
            Opts::new(
                "queue_messages",
                "Messages ready in a queue (polled), by queue role (main, dlq).",
            ),
            &["queue"],
        )?;
        registry.register(Box::new(queue_messages.clone()))?;
        let build_info = IntGaugeVec::new(
            Opts::new("build_info", "Always 1; labels carry the version."),
            &["version"],
        )?;
        registry.register(Box::new(build_info.clone()))?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);

        let float_gauge =
            |name: &str, help: &str| -> Result<prometheus::Gauge, prometheus::Error> {
                let g = prometheus::Gauge::new(name, help)?;
                registry.register(Box::new(g.clone()))?;
                Ok(g)
            };
        let reconcile_documents = IntGaugeVec::new(
            Opts::new(
                "reconcile_documents",
                "Documents found by the last reconcile run, by table and state (ok, missing, stale, orphan).",
            ),
            &["table", "state"],
        )?;
        registry.register(Box::new(reconcile_documents.clone()))?;

        Ok(Metrics {
            position_regressions: counter_vec(
                "position_regressions_total",
                "Events skipped as stale although newer by source.ts_ms than what the index holds: the connector's positions went backwards (a restored database, a MySQL failover), by connector.",
                &["connector"],
            )?,
            reconcile_documents,
            reconcile_last_run: gauge(
                "reconcile_last_run_timestamp_seconds",
                "Unix time the last reconcile run finished.",
            )?,
            reconcile_duration: float_gauge(
                "reconcile_duration_seconds",
                "Duration of the last reconcile run.",
            )?,
            reconcile_rows_per_second: float_gauge(
                "reconcile_rows_per_second",
                "Source rows per second read by the last reconcile run.",
            )?,
            reconcile_runs: counter_vec(
                "reconcile_runs_total",
                "Reconcile runs, by result (ok, drift, failed).",
                &["result"],
            )?,
            reconcile_repairs: counter_vec(
                "reconcile_repairs_total",
                "Repair events published by reconcile, by table and action (upsert, rewrite, delete).",
                &["table", "action"],
            )?,
            events_received: counter_vec(
                "events_received_total",
                "Messages taken from the queue, by table and op.",
                &["table", "op"],
            )?,
            events_processed: counter_vec(
                "events_processed_total",
                "Messages handled and acked, by table, op and outcome.",
                &["table", "op", "outcome"],
            )?,
            dead_lettered: counter_vec(
                "dead_lettered_total",
                "Messages sent to the dead-letter queue, by table and error kind.",
                &["table", "kind"],
            )?,
            skipped: counter_vec(
                "skipped_total",
                "Events that wrote nothing new, by reason (stale, unchanged).",
                &["reason"],
            )?,
            batch_size: histogram(
                "batch_size_events",
                "Events per batch.",
                buckets(1.0, 2.0, 12),
            )?,
            embed_seconds: histogram(
                "embed_duration_seconds",
                "Time to embed one batch's texts.",
                buckets(0.005, 2.0, 14),
            )?,
            write_seconds: histogram(
                "write_duration_seconds",
                "Time to write one batch durably to the index.",
                buckets(0.001, 2.0, 15),
            )?,
            lag_seconds: histogram(
                "lag_seconds",
                "Delay from the database change (source.ts_ms) to its ack.",
                LAG_BUCKETS.to_vec(),
            )?,
            delivery_to_ack_seconds: histogram(
                "delivery_to_ack_seconds",
                "Delay from a delivery's arrival at the daemon (its wait in the prefetch buffer included) to its ack: the daemon's own share of the lag.",
                SHARE_BUCKETS.to_vec(),
            )?,
            last_lag_seconds,
            points_written: counter("points_written_total", "Points upserted into the index.")?,
            texts_embedded: counter("texts_embedded_total", "Texts (chunks) embedded.")?,
            retries: counter_vec(
                "retries_total",
                "Retries of transient failures, by stage.",
                &["stage"],
            )?,
            paused: gauge(
                "consumer_paused",
                "1 while intake is paused by a transient failure.",
            )?,
            broker_connected: gauge(
                "broker_connected",
                "1 while the broker connection and consumer are up.",
            )?,
            reconnects: counter(
                "broker_reconnects_total",
                "Broker reconnections after a lost connection or channel.",
            )?,
            heartbeat: gauge(
                "pipeline_heartbeat_timestamp_seconds",
                "Unix time of the pipeline's last sign of life (a loop turn, a retry attempt or a second of backoff); /healthz and the systemd watchdog fail when it is older than their limit.",
            )?,
            queue_messages,
            dead_letters_unroutable: counter(
                "dead_letters_unroutable_total",
                "Dead letters the broker returned as unroutable: the dead-letter exchange has no queue bound.",
            )?,
            unapplied_deletes: counter_vec(
                "unapplied_deletes_total",
                "Deletes that arrived without their key (the unwrap SMT's default mode) and could not be applied, by table.",
                &["table"],
            )?,
            documents_truncated: counter_vec(
                "documents_truncated_total",
                "Documents longer than their table's max_chunks, indexed by their first chunks, by table.",
                &["table"],
            )?,
            empty_documents: counter_vec(
                "empty_documents_total",
                "Rows whose text rendered empty: no points, a marker keeps their fields, by table.",
                &["table"],
            )?,
            isolated_deliveries: counter(
                "isolated_deliveries_total",
                "Deliveries processed alone because they were in flight when the daemon last died.",
            )?,
            redelivered: counter(
                "redelivered_total",
                "Deliveries the broker had delivered before: returned by a restart, a crash or a lost channel (each return counts against x-delivery-limit).",
            )?,
            crash_suspects: gauge(
                "crash_suspects",
                "Messages that were in flight when the daemon died and are processed alone when they come back (set at start).",
            )?,
            crash_journal_ok: {
                let g = gauge(
                    "crash_journal_ok",
                    "1 while the crash journal (pipeline.state_dir) is usable.",
                )?;
                g.set(1);
                g
            },
            embed_concurrency: gauge(
                "embed_concurrency",
                "Embedding requests allowed in flight at once (adapts to a remote service's latency and back-pressure, up to embedding.max_in_flight).",
            )?,
            write_rejections: counter(
                "write_rejections_total",
                "Batches the index refused as a whole (then written by halves to find the refused documents).",
            )?,
            health: Arc::new(Health::default()),
            registry,
        })
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        self.heartbeat
            .set(self.health.heartbeat.load(Ordering::Relaxed));
        let mut buffer = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut buffer) {
            return format!("# encoding failed: {e}\n");
        }
        String::from_utf8_lossy(&buffer).into_owned()
    }

    pub fn set_paused(&self, paused: bool) {
        self.paused.set(i64::from(paused));
        self.health.paused.store(paused, Ordering::Relaxed);
    }

    pub fn set_connected(&self, connected: bool) {
        self.broker_connected.set(i64::from(connected));
        self.health
            .broker_connected
            .store(connected, Ordering::Relaxed);
        self.health.consuming.store(connected, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Silence is measured between monotonic instants; the wall clock (which an NTP step or
    /// `date -s` can move either way) plays no part.
    #[test]
    fn liveness_follows_the_monotonic_clock_not_the_wall_clock() {
        use std::time::{Duration, Instant};
        let health = Health::default();
        let t0 = Instant::now();
        health.beat_at(t0);
        assert!(health.alive_at(t0, 60));
        assert!(health.alive_at(t0 + Duration::from_secs(59), 60));
        assert!(
            !health.alive_at(t0 + Duration::from_secs(61), 60),
            "61 s of silence is a stalled loop, whatever the wall clock says"
        );
        health.beat_at(t0 + Duration::from_secs(61));
        assert!(health.alive_at(t0 + Duration::from_secs(62), 60));
        // The wall-clock metric is still set, for Prometheus.
        assert!(health.heartbeat.load(Ordering::Relaxed) > 1_700_000_000);
    }
}
