//! The daemon's loop: connect, declare, consume, batch, process, ack — and start over after a
//! lost connection.
//!
//! Ownership of acks: only [`process`] acks, and only after the batch's write is durable.
//! A delivery that is never acked is redelivered by the broker when its channel closes, so
//! every failure path here can simply drop deliveries and reconnect.

mod process;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use tokio_util::sync::CancellationToken;

use crate::broker::dead_letter::DeadLetterPublisher;
use crate::broker::{self, amqp_error, topology};
use crate::config::Config;
use crate::embed::Embedder;
use crate::error::{ErrorKind, StageError};
use crate::events::{BrokerSessionLost, InternalEvent, Recovered, RetryScheduled};
use crate::mapping::CompiledRule;
use crate::metrics::{Health, Metrics};
use crate::sink::Sink;

pub struct Pipeline {
    pub config: Arc<Config>,
    pub rules: HashMap<String, CompiledRule>,
    pub embedder: Arc<dyn Embedder>,
    pub sink: Arc<dyn Sink>,
    pub metrics: Arc<Metrics>,
    pub cancel: CancellationToken,
}

/// One broker session: a connection, the consuming channel, the dead-letter channel.
struct Session {
    connection: Connection,
    channel: Channel,
    consumer: Consumer,
    dead_letters: DeadLetterPublisher,
}

impl Pipeline {
    /// Runs until cancelled (`Ok`) or a fatal error (`Err`).
    pub async fn run(&self) -> Result<(), StageError> {
        let mut delay = Duration::from_millis(self.config.pipeline.retry_initial_ms);
        let max_delay = Duration::from_millis(self.config.pipeline.retry_max_ms);
        let mut first = true;
        while !self.cancel.is_cancelled() {
            self.metrics.health.beat();
            let result = match self.open_session().await {
                Ok(session) => {
                    if !first {
                        self.metrics.reconnects.inc();
                    }
                    first = false;
                    delay = Duration::from_millis(self.config.pipeline.retry_initial_ms);
                    tracing::info!(queue = %self.config.topology.queue, prefetch = self.config.broker.prefetch, "consuming");
                    self.consume(session).await
                }
                Err(e) => Err(e),
            };
            self.metrics.set_connected(false);
            match result {
                Ok(()) => return Ok(()),
                Err(e) if e.kind == ErrorKind::Fatal => return Err(e),
                Err(e) => {
                    if self.cancel.is_cancelled() {
                        return Ok(());
                    }
                    let wait = jitter(delay);
                    BrokerSessionLost { error: &e, wait }.emit(&self.metrics);
                    tokio::select! {
                        _ = beating_sleep(Arc::clone(&self.metrics.health), wait) => {}
                        _ = self.cancel.cancelled() => return Ok(()),
                    }
                    delay = (delay * 2).min(max_delay);
                }
            }
        }
        Ok(())
    }

    async fn open_session(&self) -> Result<Session, StageError> {
        let connection = broker::connect(&self.config.broker, "consumer").await?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| amqp_error("open channel", e))?;
        topology::declare(&channel, &self.config.topology).await?;
        channel
            .basic_qos(self.config.broker.prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| amqp_error("basic.qos", e))?;
        let dead_letters =
            DeadLetterPublisher::open(&connection, &self.config.topology.dead_letter_exchange)
                .await?;
        let consumer = channel
            .basic_consume(
                self.config.topology.queue.as_str().into(),
                "cdc-indexer".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| amqp_error("basic.consume", e))?;
        self.metrics.set_connected(true);
        Ok(Session {
            connection,
            channel,
            consumer,
            dead_letters,
        })
    }

    /// Batches and processes deliveries until cancelled or the session breaks.
    async fn consume(&self, mut session: Session) -> Result<(), StageError> {
        let deadline = Duration::from_millis(self.config.pipeline.shutdown_deadline_ms);
        let mut idle_since = Some(tokio::time::Instant::now());
        loop {
            self.metrics.health.beat();
            let batch = self.collect(&mut session.consumer).await?;
            if batch.is_empty() {
                if self.cancel.is_cancelled() {
                    break;
                }
                // Idle for a while: let the index optimise (qdrant-edge has no background thread).
                if idle_since.is_some_and(|t| t.elapsed() > Duration::from_secs(5)) {
                    idle_since = None;
                    self.sink.idle().await;
                }
                continue;
            }
            idle_since = Some(tokio::time::Instant::now());
            let work = process::process(self, &session, batch);
            tokio::pin!(work);
            let result = tokio::select! {
                r = &mut work => r,
                _ = self.cancel.cancelled() => match tokio::time::timeout(deadline, &mut work).await {
                    Ok(r) => r,
                    Err(_) => {
                        tracing::warn!(deadline_ms = deadline.as_millis() as u64, "shutdown deadline passed; the open batch is left unacked for redelivery");
                        break;
                    }
                },
            };
            if let Err(e) = result {
                if self.cancel.is_cancelled() {
                    tracing::warn!(error = %e, "shutting down with the open batch unacked (it will be redelivered)");
                    break;
                }
                return Err(e);
            }
            if self.cancel.is_cancelled() {
                break;
            }
        }
        close(session).await;
        Ok(())
    }

    /// Waits for the first delivery (up to 1 s, to keep the heartbeat going), then collects
    /// up to `batch_max_events` or until `batch_max_wait_ms` has passed.
    async fn collect(
        &self,
        consumer: &mut Consumer,
    ) -> Result<Vec<lapin::message::Delivery>, StageError> {
        let mut batch = Vec::new();
        let first = tokio::select! {
            d = consumer.next() => d,
            _ = self.cancel.cancelled() => return Ok(batch),
            _ = tokio::time::sleep(Duration::from_secs(1)) => return Ok(batch),
        };
        batch.push(delivery(first)?);
        let until = tokio::time::Instant::now()
            + Duration::from_millis(self.config.pipeline.batch_max_wait_ms);
        while batch.len() < self.config.pipeline.batch_max_events {
            tokio::select! {
                d = consumer.next() => batch.push(delivery(d)?),
                _ = tokio::time::sleep_until(until) => break,
                _ = self.cancel.cancelled() => break,
            }
        }
        Ok(batch)
    }

    /// Runs `f` until it succeeds, retrying transient failures with exponential backoff and
    /// jitter, without limit, pausing intake meanwhile. Poison and fatal errors return at once.
    /// Not cancellable by itself: callers race it against the shutdown deadline.
    pub async fn retry<T, F, Fut>(&self, stage: &'static str, mut f: F) -> Result<T, StageError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, StageError>>,
    {
        let policy = ExponentialBuilder::new()
            .with_min_delay(Duration::from_millis(self.config.pipeline.retry_initial_ms))
            .with_max_delay(Duration::from_millis(self.config.pipeline.retry_max_ms))
            .with_jitter()
            .without_max_times();
        let metrics = &self.metrics;
        // The heartbeat (`/healthz`, the systemd watchdog) goes on through an outage: a beat
        // at each attempt and every second of each backoff wait. A call that hangs past its
        // timeout still stops it, which is what the watchdog is for.
        let health = Arc::clone(&metrics.health);
        let attempt = (move || {
            metrics.health.beat();
            f()
        })
        .retry(policy)
        .sleep(move |wait| beating_sleep(Arc::clone(&health), wait))
        .when(|e: &StageError| e.kind == ErrorKind::Transient)
        .notify(|e: &StageError, wait: Duration| {
            RetryScheduled {
                stage,
                error: e,
                wait,
            }
            .emit(metrics)
        });
        // On shutdown the retries go on: the caller bounds them by the shutdown deadline, so a
        // sink that recovers within it still gets the open batch written and acked.
        let result = attempt.await;
        if result.is_ok() {
            Recovered { stage }.emit(metrics);
        }
        result
    }
}

/// Sleeps `wait`, beating the heartbeat every second.
async fn beating_sleep(health: Arc<Health>, wait: Duration) {
    let until = tokio::time::Instant::now() + wait;
    loop {
        health.beat();
        let now = tokio::time::Instant::now();
        if now >= until {
            return;
        }
        tokio::time::sleep((until - now).min(Duration::from_secs(1))).await;
    }
}

fn delivery(
    item: Option<lapin::Result<lapin::message::Delivery>>,
) -> Result<lapin::message::Delivery, StageError> {
    match item {
        Some(Ok(d)) => Ok(d),
        Some(Err(e)) => Err(amqp_error("consumer", e)),
        None => Err(StageError::transient("the broker closed our consumer")),
    }
}

async fn close(session: Session) {
    let _ = session.channel.close(200, "shutdown".into()).await;
    let _ = session.connection.close(200, "shutdown".into()).await;
}

/// 50–100 % of `delay`.
fn jitter(delay: Duration) -> Duration {
    delay.mul_f64(rand::random_range(0.5..1.0))
}
