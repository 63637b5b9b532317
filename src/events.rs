//! Internal events: each observable thing the daemon does is one small struct that emits
//! its log line and its metrics together. Business code says `BatchWritten { .. }.emit(m)`;
//! it does not sprinkle counters and log calls.

use std::time::Duration;

use crate::metrics::Metrics;

/// Something that happened, with everything needed to log and count it.
pub trait InternalEvent {
    fn emit(self, metrics: &Metrics);
}

/// A message was taken from the queue.
pub struct EventReceived<'a> {
    pub table: &'a str,
    pub op: &'a str,
    /// The broker delivered it before (it was returned: a restart, a lost channel).
    pub redelivered: bool,
}

impl InternalEvent for EventReceived<'_> {
    fn emit(self, m: &Metrics) {
        m.events_received
            .with_label_values(&[self.table, self.op])
            .inc();
        if self.redelivered {
            m.redelivered.inc();
        }
    }
}

/// A batch's texts were embedded.
pub struct TextsEmbedded {
    pub texts: usize,
    pub took: Duration,
    /// The embedder's concurrency limit now.
    pub concurrency: usize,
}

impl InternalEvent for TextsEmbedded {
    fn emit(self, m: &Metrics) {
        m.embed_concurrency.set(self.concurrency as i64);
        if self.texts > 0 {
            m.embed_seconds.observe(self.took.as_secs_f64());
            m.texts_embedded.inc_by(self.texts as u64);
        }
    }
}

/// A batch's writes are durable in the index.
pub struct BatchWritten {
    pub points: usize,
    pub took: Duration,
}

impl InternalEvent for BatchWritten {
    fn emit(self, m: &Metrics) {
        m.write_seconds.observe(self.took.as_secs_f64());
        m.points_written.inc_by(self.points as u64);
        tracing::debug!(
            points = self.points,
            took_ms = self.took.as_millis() as u64,
            "batch written"
        );
    }
}

/// Events that wrote nothing new.
pub struct EventsSkipped {
    /// `stale` or `unchanged`.
    pub reason: &'static str,
    pub count: usize,
}

impl InternalEvent for EventsSkipped {
    fn emit(self, m: &Metrics) {
        if self.count > 0 {
            m.skipped
                .with_label_values(&[self.reason])
                .inc_by(self.count as u64);
        }
    }
}

/// A message went to the DLQ (after the broker confirmed it).
pub struct DeadLettered<'a> {
    pub table: &'a str,
    pub kind: &'a str,
    pub reason: &'a str,
    pub routing_key: &'a str,
}

impl InternalEvent for DeadLettered<'_> {
    fn emit(self, m: &Metrics) {
        m.dead_lettered
            .with_label_values(&[self.table, self.kind])
            .inc();
        tracing::warn!(
            table = self.table,
            kind = self.kind,
            reason = self.reason,
            routing_key = self.routing_key,
            "dead-lettered"
        );
    }
}

/// A message was handled and acked.
pub struct EventProcessed<'a> {
    pub table: &'a str,
    pub op: &'a str,
    pub outcome: &'a str,
    /// `source.ts_ms`, for the lag.
    pub source_ts_ms: Option<i64>,
    pub acked_at_ms: i64,
    /// How long it was in the daemon (delivery received → ack).
    pub in_daemon: Duration,
}

impl InternalEvent for EventProcessed<'_> {
    fn emit(self, m: &Metrics) {
        m.events_processed
            .with_label_values(&[self.table, self.op, self.outcome])
            .inc();
        m.delivery_to_ack_seconds
            .observe(self.in_daemon.as_secs_f64());
        if let Some(ts) = self.source_ts_ms {
            let lag = (self.acked_at_ms - ts).max(0) as f64 / 1000.0;
            m.lag_seconds.observe(lag);
            m.last_lag_seconds.set(lag);
        }
    }
}

/// A transient failure: intake pauses until the stage recovers.
pub struct RetryScheduled<'a> {
    pub stage: &'static str,
    pub error: &'a dyn std::fmt::Display,
    pub wait: Duration,
}

impl InternalEvent for RetryScheduled<'_> {
    fn emit(self, m: &Metrics) {
        use std::sync::atomic::Ordering::Relaxed;
        m.retries.with_label_values(&[self.stage]).inc();
        if !m.health.paused.load(Relaxed) {
            tracing::warn!(stage = self.stage, error = %self.error, "transient failure; intake paused until it recovers");
        }
        tracing::debug!(
            stage = self.stage,
            retry_in_ms = self.wait.as_millis() as u64,
            "retrying"
        );
        m.set_paused(true);
        if self.stage == "sink" {
            m.health.sink_ok.store(false, Relaxed);
        }
    }
}

/// A stage works again after transient failures.
pub struct Recovered {
    pub stage: &'static str,
}

impl InternalEvent for Recovered {
    fn emit(self, m: &Metrics) {
        use std::sync::atomic::Ordering::Relaxed;
        if m.health.paused.load(Relaxed) {
            tracing::info!(stage = self.stage, "recovered; intake resumed");
            m.set_paused(false);
        }
        if self.stage == "sink" {
            m.health.sink_ok.store(true, Relaxed);
        }
    }
}

/// The broker session broke; we reconnect after `wait`.
pub struct BrokerSessionLost<'a> {
    pub error: &'a dyn std::fmt::Display,
    pub wait: Duration,
}

impl InternalEvent for BrokerSessionLost<'_> {
    fn emit(self, m: &Metrics) {
        m.retries.with_label_values(&["broker"]).inc();
        tracing::warn!(error = %self.error, retry_in_ms = self.wait.as_millis() as u64, "broker session lost; reconnecting");
    }
}

/// A dead letter came back unroutable (`basic.return`): the DLX has no queue bound. The
/// message it was for is not acked; the pipeline retries (intake paused, not ready).
pub struct DeadLetterUnroutable<'a> {
    pub exchange: &'a str,
}

impl InternalEvent for DeadLetterUnroutable<'_> {
    fn emit(self, m: &Metrics) {
        m.dead_letters_unroutable.inc();
        tracing::error!(
            exchange = self.exchange,
            "dead letter unroutable: the dead-letter exchange has no queue bound; nothing is acked until it has one (run `cdc-indexer topology declare`)"
        );
    }
}

/// A delete that lost its key (the unwrap SMT's default mode): it cannot be applied.
pub struct KeylessDeleteSeen<'a> {
    /// `schema.table` from the routing key (or the routing key itself).
    pub table: &'a str,
    /// The first one seen for this table since start: warn with the fix.
    pub first: bool,
}

impl InternalEvent for KeylessDeleteSeen<'_> {
    fn emit(self, m: &Metrics) {
        m.unapplied_deletes.with_label_values(&[self.table]).inc();
        if self.first {
            tracing::warn!(
                table = self.table,
                "a delete arrived without its key (body `null` or a null payload: the unwrap SMT in its default mode), so the deleted row stays searchable; \
                 set transforms.unwrap.delete.tombstone.handling.mode=rewrite in the connector (counted in cdc_indexer_unapplied_deletes_total; warned once per table)"
            );
        }
    }
}

/// The crash journal cannot be used: every returned delivery is processed alone.
pub struct CrashJournalUnavailable<'a> {
    pub problem: &'a str,
}

impl InternalEvent for CrashJournalUnavailable<'_> {
    fn emit(self, m: &Metrics) {
        m.crash_journal_ok.set(0);
        tracing::warn!(
            problem = self.problem,
            "crash journal unavailable (pipeline.state_dir): every redelivered message is processed alone, and only the broker's x-delivery-limit dead-letters a message that crashes the daemon"
        );
    }
}

/// A delivery that was in flight when the daemon last died is processed alone.
pub struct DeliveryIsolated<'a> {
    pub routing_key: &'a str,
}

impl InternalEvent for DeliveryIsolated<'_> {
    fn emit(self, m: &Metrics) {
        m.isolated_deliveries.inc();
        tracing::debug!(
            routing_key = self.routing_key,
            "processing a delivery alone: it was in flight when the daemon last died"
        );
    }
}

/// A document whose text rendered empty: stored as a marker, nothing embedded.
pub struct DocumentsEmpty<'a> {
    pub table: &'a str,
}

impl InternalEvent for DocumentsEmpty<'_> {
    fn emit(self, m: &Metrics) {
        m.empty_documents.with_label_values(&[self.table]).inc();
    }
}

/// A document longer than its table's `max_chunks`: indexed by its first chunks.
pub struct DocumentsTruncated<'a> {
    pub table: &'a str,
}

impl InternalEvent for DocumentsTruncated<'_> {
    fn emit(self, m: &Metrics) {
        m.documents_truncated.with_label_values(&[self.table]).inc();
    }
}

/// The index refused a batch without naming a point: the batch is bisected.
pub struct WriteRejected<'a> {
    pub error: &'a dyn std::fmt::Display,
}

impl InternalEvent for WriteRejected<'_> {
    fn emit(self, m: &Metrics) {
        m.write_rejections.inc();
        tracing::warn!(error = %self.error, "the index refused a batch; writing it by halves to find the documents it refuses");
    }
}

/// A stale event that is newer by its `source.ts_ms` than what the index holds: the
/// connector's positions went backwards (a restored database, a MySQL failover). The stale
/// guard keeps skipping such events; `reconcile --repair --reset-positions` recovers.
pub struct PositionRegressed<'a> {
    pub connector: &'a str,
    pub key: &'a crate::model::DocumentKey,
    /// The first one for this connector since start: warn with the fix.
    pub first: bool,
}

impl InternalEvent for PositionRegressed<'_> {
    fn emit(self, m: &Metrics) {
        m.position_regressions
            .with_label_values(&[self.connector])
            .inc();
        if self.first {
            tracing::warn!(
                connector = self.connector,
                key = %self.key,
                "an event with an older source position but a later source.ts_ms than the index holds was skipped as stale: the connector's positions went backwards (a restored database, a MySQL failover?); \
                 such events keep being skipped until `cdc-indexer reconcile --repair --reset-positions` re-stamps the documents (counted in cdc_indexer_position_regressions_total; warned once per connector)"
            );
        } else {
            tracing::debug!(connector = self.connector, key = %self.key, "position regression");
        }
    }
}

/// A reconcile run finished: the documents it found per table and state.
pub struct ReconcileFinished<'a> {
    pub report: &'a crate::reconcile::Report,
}

impl InternalEvent for ReconcileFinished<'_> {
    fn emit(self, m: &Metrics) {
        let r = self.report;
        for t in &r.tables {
            for (state, n) in t.counts.by_state() {
                m.reconcile_documents
                    .with_label_values(&[t.table.as_str(), state])
                    .set(n as i64);
            }
            for (action, n) in t.repairs.by_action() {
                if n > 0 {
                    m.reconcile_repairs
                        .with_label_values(&[t.table.as_str(), action])
                        .inc_by(n as u64);
                }
            }
        }
        m.reconcile_last_run.set(chrono::Utc::now().timestamp());
        m.reconcile_duration.set(r.duration.as_secs_f64());
        m.reconcile_rows_per_second.set(r.rows_per_second());
        let drift = r.drift();
        m.reconcile_runs
            .with_label_values(&[if drift == 0 { "ok" } else { "drift" }])
            .inc();
        if drift == 0 {
            tracing::info!(
                tables = r.tables.len(),
                rows = r.rows(),
                took_ms = r.duration.as_millis() as u64,
                "reconcile: the index equals the source"
            );
        } else {
            tracing::warn!(tables = r.tables.len(), rows = r.rows(), drifted = drift, summary = %r.summary_line(), "reconcile: the index differs from the source");
        }
    }
}

/// A reconcile run failed.
pub struct ReconcileFailed<'a> {
    pub error: &'a dyn std::fmt::Display,
}

impl InternalEvent for ReconcileFailed<'_> {
    fn emit(self, m: &Metrics) {
        m.reconcile_runs.with_label_values(&["failed"]).inc();
        tracing::warn!(error = %self.error, "reconcile run failed");
    }
}
