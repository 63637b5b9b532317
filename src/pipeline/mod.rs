//! The daemon's loop: connect, declare, consume, batch, process, ack — and start over after a
//! lost connection.
//!
//! Ownership of acks: only [`process`] acks, and only after the batch's write is durable.
//! A delivery that is never acked is redelivered by the broker when its channel closes, so
//! every failure path here can simply drop deliveries and reconnect.
//!
//! **Batching** ([`Pipeline::collect`]): a batch closes at `batch_max_events`, at
//! `batch_max_bytes` of bodies, at about `batch_max_texts` texts to embed, after
//! `batch_max_wait_ms` — or as soon as the prefetch buffer runs dry (no delivery for
//! `batch_idle_ms`): a change that arrives alone is worked on at once, a backlog still fills
//! whole batches. Each delivery is decoded and mapped as it arrives ([`admit`]).
//!
//! **Returned deliveries** go through the [`crash_guard`]: a delivery that was in flight
//! when the daemon last died is processed alone; one that keeps killing it alone is
//! dead-lettered (`crash-loop`); one that was merely prefetched is processed as usual.
//!
//! **Clean stop** (SIGTERM): stop consuming first (`basic.cancel`), then finish the batch in
//! progress and every delivery already received, within `shutdown_deadline_ms`; only what
//! does not fit in the deadline goes back to the queue.

mod admit;
pub mod crash_guard;
mod process;
mod received;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use received::{Deliveries, Received};
use tokio_util::sync::CancellationToken;

use crate::batch::Admitted;
use crate::broker::dead_letter::{DeadLetter, DeadLetterPublisher};
use crate::broker::{self, amqp_error, topology};
use crate::config::Config;
use crate::embed::Embedder;
use crate::error::{ErrorKind, StageError};
use crate::events::{
    BrokerSessionLost, CrashJournalUnavailable, DeliveryIsolated, InternalEvent, Recovered,
    RetryScheduled,
};
use crate::mapping::CompiledRule;
use crate::metrics::Metrics;
use crate::sink::Sink;
pub use admit::REPAIR_HEADER;
use admit::{Admission, Fate};
use crash_guard::{CrashGuard, MessageId, Verdict, message_id};
pub use process::CANARY_TABLE;

/// The consumer tag of our consumer: the prefetch window is set when a consumer starts, so
/// opening it after the crash suspects means a second consumer (`cdc-indexer-wide`).
const CONSUMER_TAG: &str = "cdc-indexer";
const WIDE_CONSUMER_TAG: &str = "cdc-indexer-wide";

pub struct Pipeline {
    pub config: Arc<Config>,
    pub rules: HashMap<String, CompiledRule>,
    pub embedder: Arc<dyn Embedder>,
    pub sink: Arc<dyn Sink>,
    pub metrics: Arc<Metrics>,
    pub cancel: CancellationToken,
    guard: Mutex<CrashGuard>,
    /// Tables a keyless delete was already warned about.
    keyless_warned: Mutex<HashSet<String>>,
    /// The session consumes with prefetch 1 while crash suspects may come back, and opens
    /// the window (`broker.prefetch`) at the first innocent delivery.
    narrow: std::sync::atomic::AtomicBool,
    widen: std::sync::atomic::AtomicBool,
    /// The tag of the consumer in use this session.
    consumer_tag: Mutex<&'static str>,
    /// Connectors a position regression was already warned about.
    regression_warned: Mutex<HashSet<String>>,
    /// Batches acked since start: a session that acked nothing before it broke does not
    /// reset the reconnect backoff.
    acked_batches: std::sync::atomic::AtomicU64,
}

/// One broker session: a connection, the consuming channel, the dead-letter channel.
struct Session {
    connection: Connection,
    channel: Channel,
    consumer: Deliveries,
    dead_letters: DeadLetterPublisher,
    /// Fires the moment the broker closes the connection or a channel.
    lost: CancellationToken,
}

/// A batch as collected: its deliveries and what admission decided for each.
pub(crate) struct Batch {
    deliveries: Vec<Delivery>,
    fates: Vec<Fate>,
    /// Events to apply (with their delivery's index as origin).
    events: Vec<Admitted>,
    /// Deliveries to dead-letter, by index.
    dead: Vec<(usize, DeadLetter)>,
    ids: Vec<MessageId>,
    /// One suspect delivery processed alone.
    isolated: bool,
    /// When the daemon received each delivery (`received.rs`): the start of its share.
    received: Vec<Instant>,
}

impl Batch {
    fn new() -> Batch {
        Batch {
            deliveries: Vec::new(),
            fates: Vec::new(),
            events: Vec::new(),
            dead: Vec::new(),
            ids: Vec::new(),
            isolated: false,
            received: Vec::new(),
        }
    }

    fn is_empty(&self) -> bool {
        self.deliveries.is_empty()
    }
}

/// What one [`Pipeline::step`] came to.
enum Step {
    /// Nothing arrived.
    Idle(Intake),
    /// A batch was committed and/or one is prepared for the next step.
    Next(Option<Box<process::Prepared>>),
}

/// The batch collected while the previous one was committed.
enum Upcoming {
    Nothing,
    Prepared(Box<process::Prepared>),
    /// A crash suspect: prepared only once nothing else is in flight.
    Alone(Batch),
}

/// What [`Pipeline::collect`] hands back besides the batch.
enum Intake {
    /// Go on.
    Open,
    /// The consumer was cancelled (shutdown) and every delivery it had was taken.
    Drained,
}

impl Pipeline {
    pub fn new(
        config: Arc<Config>,
        rules: HashMap<String, CompiledRule>,
        embedder: Arc<dyn Embedder>,
        sink: Arc<dyn Sink>,
        metrics: Arc<Metrics>,
        cancel: CancellationToken,
    ) -> Pipeline {
        let (guard, problem) =
            CrashGuard::open(&config.pipeline.state_dir, config.pipeline.crash_limit);
        match problem {
            Some(problem) => CrashJournalUnavailable { problem: &problem }.emit(&metrics),
            None => crash_guard::arm_crash_marker(&config.pipeline.state_dir),
        }
        metrics.crash_suspects.set(guard.suspects() as i64);
        Pipeline {
            config,
            rules,
            embedder,
            sink,
            metrics,
            cancel,
            guard: Mutex::new(guard),
            keyless_warned: Mutex::new(HashSet::new()),
            narrow: std::sync::atomic::AtomicBool::new(false),
            widen: std::sync::atomic::AtomicBool::new(false),
            consumer_tag: Mutex::new(CONSUMER_TAG),
            regression_warned: Mutex::new(HashSet::new()),
            acked_batches: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Runs until cancelled (`Ok`) or a fatal error (`Err`).
    pub async fn run(&self) -> Result<(), StageError> {
        let mut delay = Duration::from_millis(self.config.pipeline.retry_initial_ms);
        let max_delay = Duration::from_millis(self.config.pipeline.retry_max_ms);
        let mut first = true;
        let result = loop {
            if self.cancel.is_cancelled() {
                break Ok(());
            }
            self.metrics.health.beat();
            let acked_before = self
                .acked_batches
                .load(std::sync::atomic::Ordering::Relaxed);
            let opened = Instant::now();
            let result = match self.open_session().await {
                Ok(session) => {
                    if !first {
                        self.metrics.reconnects.inc();
                    }
                    first = false;
                    tracing::info!(queue = %self.config.topology.queue, prefetch = self.config.broker.prefetch, "consuming");
                    self.consume(session).await
                }
                Err(e) => Err(e),
            };
            // Every lost session returns the deliveries in hand, and the broker charges each
            // return against `x-delivery-limit`: a session that breaks again and again before
            // it gets anything done must not be reopened at the shortest delay each time.
            if self
                .acked_batches
                .load(std::sync::atomic::Ordering::Relaxed)
                > acked_before
                || opened.elapsed() >= Duration::from_secs(60)
            {
                delay = Duration::from_millis(self.config.pipeline.retry_initial_ms);
            }
            self.metrics.set_connected(false);
            match result {
                Ok(()) => break Ok(()),
                Err(e) if e.kind == ErrorKind::Fatal => break Err(e),
                Err(e) => {
                    if self.cancel.is_cancelled() {
                        break Ok(());
                    }
                    let wait = jitter(delay);
                    BrokerSessionLost { error: &e, wait }.emit(&self.metrics);
                    tokio::select! {
                        _ = crate::progress::scope(Arc::clone(&self.metrics.health), crate::progress::sleep(wait)) => {}
                        _ = self.cancel.cancelled() => break Ok(()),
                    }
                    delay = (delay * 2).min(max_delay);
                }
            }
        };
        // A deliberate exit, clean or fatal: nothing in flight is to blame. (A fatal error is
        // about us, not about a message; only a crash leaves suspects behind.)
        self.lock_guard().close();
        result
    }

    async fn open_session(&self) -> Result<Session, StageError> {
        let connection = broker::connect(&self.config.broker, "consumer").await?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| amqp_error("open channel", e))?;
        topology::declare(&channel, &self.config.topology).await?;
        // Crash suspects come back first: take them one at a time, so that dying on one
        // returns no other delivery (each return counts against x-delivery-limit).
        let narrow = self.lock_guard().suspects() > 0;
        self.narrow
            .store(narrow, std::sync::atomic::Ordering::Relaxed);
        self.widen
            .store(false, std::sync::atomic::Ordering::Relaxed);
        let prefetch = if narrow {
            1
        } else {
            self.config.broker.prefetch
        };
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| amqp_error("basic.qos", e))?;
        let dead_letters =
            DeadLetterPublisher::open(&connection, &self.config.topology.dead_letter_exchange)
                .await?
                .rebinding(&self.config.topology.dead_letter_queue)
                .with_metrics(Arc::clone(&self.metrics));
        let lost = broker::watch_connection(&connection, Arc::clone(&self.metrics));
        let consumer = channel
            .basic_consume(
                self.config.topology.queue.as_str().into(),
                self.use_consumer_tag(CONSUMER_TAG).into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| amqp_error("basic.consume", e))?;
        self.metrics.set_connected(true);
        Ok(Session {
            connection,
            channel,
            consumer: Deliveries::new(consumer),
            dead_letters,
            lost,
        })
    }

    /// Batches and processes deliveries until the session breaks, or until shutdown has
    /// drained what was received. Batch N is written and acked while batch N+1 is collected,
    /// planned (against N's overlay) and embedded.
    async fn consume(&self, session: Session) -> Result<(), StageError> {
        let Session {
            connection,
            channel,
            mut consumer,
            dead_letters,
            lost,
        } = session;
        let out = process::Outbox {
            channel: &channel,
            dead_letters: &dead_letters,
        };
        let deadline = Duration::from_millis(self.config.pipeline.shutdown_deadline_ms);
        let mut stop_by: Option<tokio::time::Instant> = None;
        let mut held: VecDeque<Received> = VecDeque::new();
        let mut ready: Option<Box<process::Prepared>> = None;
        let mut idle_since = Some(Instant::now());
        let result = loop {
            self.metrics.health.beat();
            if stop_by.is_none() && self.cancel.is_cancelled() {
                stop_by = Some(self.stop_consuming(&channel, deadline).await);
            }
            // Not raced against the shutdown signal: a step that is cut short would drop the
            // deliveries it took. Its waits are bounded (1 s, then the batch window), and on
            // shutdown it runs on under the deadline.
            let work = crate::progress::scope(
                Arc::clone(&self.metrics.health),
                self.step(
                    &out,
                    &mut consumer,
                    &mut held,
                    ready.take(),
                    stop_by.is_some(),
                ),
            );
            tokio::pin!(work);
            // A connection the broker closed ends the step at once: its deliveries come back
            // anyway, and waiting for the ack to fail would only waste the work.
            let broken = || StageError::transient("the broker closed the connection or a channel");
            let stepped = match stop_by {
                None => tokio::select! {
                    r = &mut work => Some(r),
                    _ = lost.cancelled() => Some(Err(broken())),
                    _ = self.cancel.cancelled() => {
                        let by = self.stop_consuming(&channel, deadline).await;
                        stop_by = Some(by);
                        tokio::select! {
                            r = tokio::time::timeout_at(by, &mut work) => r.ok(),
                            _ = lost.cancelled() => Some(Err(broken())),
                        }
                    }
                },
                Some(by) => tokio::select! {
                    r = tokio::time::timeout_at(by, &mut work) => r.ok(),
                    _ = lost.cancelled() => Some(Err(broken())),
                },
            };
            match stepped {
                Some(Ok(Step::Idle(Intake::Drained))) => break Ok(()),
                Some(Ok(Step::Idle(Intake::Open))) => {
                    // Idle for a while: let the index optimise (qdrant-edge has no background
                    // thread).
                    if stop_by.is_none()
                        && idle_since.is_some_and(|t| t.elapsed() > Duration::from_secs(5))
                    {
                        idle_since = None;
                        self.sink.idle().await;
                    }
                }
                Some(Ok(Step::Next(next))) => {
                    idle_since = Some(Instant::now());
                    ready = next;
                }
                Some(Err(e)) => {
                    self.lock_guard().abandon();
                    if self.cancel.is_cancelled() {
                        tracing::warn!(error = %e, "shutting down with the open batches unacked (they will be redelivered)");
                        break Ok(());
                    }
                    break Err(e);
                }
                None => {
                    self.lock_guard().abandon();
                    tracing::warn!(
                        deadline_ms = deadline.as_millis() as u64,
                        "shutdown deadline passed; the open batches are left unacked for redelivery"
                    );
                    break Ok(());
                }
            }
        };
        drop(ready);
        lost.cancel();
        let _ = channel.close(200, "shutdown".into()).await;
        let _ = connection.close(200, "shutdown".into()).await;
        result
    }

    /// One step of the pipeline: commit the batch that is ready (if any) while the next one is
    /// collected and prepared. An isolated batch (a crash suspect) is prepared and committed
    /// with nothing else in flight, so that a crash can only be its own.
    async fn step(
        &self,
        out: &process::Outbox<'_>,
        consumer: &mut Deliveries,
        held: &mut VecDeque<Received>,
        ready: Option<Box<process::Prepared>>,
        draining: bool,
    ) -> Result<Step, StageError> {
        let widen = !draining && self.widen.load(std::sync::atomic::Ordering::Relaxed);
        let Some(current) = ready else {
            if widen {
                // Nothing is in flight: open the window without another instance taking over
                // deliveries we still hold.
                self.widen_if_due(out.channel, consumer, held).await?;
            }
            let (batch, intake) = self.collect(consumer, held, draining).await?;
            if batch.is_empty() {
                return Ok(Step::Idle(intake));
            }
            self.begin(&batch);
            return Ok(Step::Next(Some(Box::new(
                process::prepare(self, batch, None).await?,
            ))));
        };
        let ids = current.batch.ids.clone();
        if current.batch.isolated || widen {
            process::commit(self, out, *current).await?;
            self.lock_guard().end(&ids, true);
            return Ok(Step::Next(None));
        }
        let overlay = current.overlay();
        let next = async {
            let (batch, intake) = self.collect(consumer, held, draining).await?;
            if batch.is_empty() {
                return Ok::<_, StageError>((Upcoming::Nothing, intake));
            }
            if batch.isolated {
                return Ok((Upcoming::Alone(batch), intake));
            }
            self.begin(&batch);
            let prepared = process::prepare(self, batch, overlay.as_ref()).await?;
            Ok((Upcoming::Prepared(Box::new(prepared)), intake))
        };
        let (committed, upcoming) = tokio::join!(process::commit(self, out, *current), next);
        let as_planned = committed?;
        self.lock_guard().end(&ids, true);
        let (upcoming, _intake) = upcoming?;
        let next = match upcoming {
            Upcoming::Nothing => None,
            Upcoming::Prepared(prepared) if as_planned => Some(prepared),
            // The previous batch was written otherwise than planned (part of it refused):
            // its overlay was wrong, so plan again against what the index now holds.
            Upcoming::Prepared(prepared) => Some(Box::new(
                process::prepare(self, prepared.into_batch(), None).await?,
            )),
            Upcoming::Alone(batch) => {
                self.begin(&batch);
                Some(Box::new(process::prepare(self, batch, None).await?))
            }
        };
        Ok(Step::Next(next))
    }

    /// The suspects are behind us (an innocent delivery arrived): open the prefetch window.
    /// RabbitMQ applies `basic.qos` to consumers started after it, so the narrow consumer is
    /// cancelled (what it delivered stays ours to ack) and a wide one started.
    async fn widen_if_due(
        &self,
        channel: &Channel,
        consumer: &mut Deliveries,
        held: &mut VecDeque<Received>,
    ) -> Result<(), StageError> {
        use std::sync::atomic::Ordering::Relaxed;
        if !(self.widen.swap(false, Relaxed) && self.narrow.swap(false, Relaxed)) {
            return Ok(());
        }
        let narrow_tag = *self.consumer_tag.lock().unwrap_or_else(|e| e.into_inner());
        channel
            .basic_cancel(narrow_tag.into(), BasicCancelOptions::default())
            .await
            .map_err(|e| amqp_error("basic.cancel", e))?;
        // What the narrow consumer was sent before the cancel is ours to process (and ack):
        // never drop it with the consumer, or a later multiple-ack would ack it unseen.
        while let Ok(item) = tokio::time::timeout(Duration::from_millis(500), consumer.next()).await
        {
            match next_delivery(item, true)? {
                Some(d) => held.push_back(d),
                None => break,
            }
        }
        channel
            .basic_qos(self.config.broker.prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| amqp_error("basic.qos", e))?;
        *consumer = Deliveries::new(
            channel
                .basic_consume(
                    self.config.topology.queue.as_str().into(),
                    self.use_consumer_tag(WIDE_CONSUMER_TAG).into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| amqp_error("basic.consume", e))?,
        );
        tracing::debug!(
            prefetch = self.config.broker.prefetch,
            "crash suspects done; prefetch window open"
        );
        Ok(())
    }

    fn use_consumer_tag(&self, tag: &'static str) -> &'static str {
        *self.consumer_tag.lock().unwrap_or_else(|e| e.into_inner()) = tag;
        tag
    }

    /// Records a batch as in flight in the crash journal.
    fn begin(&self, batch: &Batch) {
        if let Err(e) = self.lock_guard().begin(&batch.ids, batch.isolated) {
            CrashJournalUnavailable { problem: &e }.emit(&self.metrics);
        }
    }

    /// Shutdown, step one: no new deliveries. Returns when the work must be done by.
    async fn stop_consuming(&self, channel: &Channel, deadline: Duration) -> tokio::time::Instant {
        let by = tokio::time::Instant::now() + deadline;
        tracing::info!(
            deadline_ms = deadline.as_millis() as u64,
            "stopping intake; finishing the deliveries already received"
        );
        let tag = *self.consumer_tag.lock().unwrap_or_else(|e| e.into_inner());
        let cancel = channel.basic_cancel(tag.into(), BasicCancelOptions::default());
        if let Err(e) = tokio::time::timeout_at(by, cancel)
            .await
            .map_err(|_| "timed out".to_string())
            .and_then(|r| r.map_err(|e| e.to_string()))
        {
            tracing::warn!(error = %e, "basic.cancel failed; what is unacked will be redelivered");
        }
        self.metrics
            .health
            .consuming
            .store(false, std::sync::atomic::Ordering::Relaxed);
        by
    }

    /// Collects the next batch. Waits for its first delivery up to 1 s (to keep the
    /// heartbeat going), then takes deliveries while they keep arriving (see the module
    /// doc). `held`: deliveries taken from the consumer but not yet batched (one that did not
    /// fit the previous batch; those a replaced consumer still had), taken first.
    async fn collect(
        &self,
        consumer: &mut Deliveries,
        held: &mut VecDeque<Received>,
        draining: bool,
    ) -> Result<(Batch, Intake), StageError> {
        let c = &self.config.pipeline;
        let mut batch = Batch::new();
        let mut bytes = 0usize;
        let mut texts = 0usize;
        // While draining after `basic.cancel`, nothing new arrives: what lapin holds comes at
        // once, so a short silence means everything received has been taken.
        let first_wait = if draining {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(1)
        };
        let first = match held.pop_front() {
            Some(d) => Some(d),
            None => match tokio::time::timeout(first_wait, consumer.next()).await {
                Err(_) if draining => return Ok((batch, Intake::Drained)),
                Err(_) => return Ok((batch, Intake::Open)),
                Ok(item) => next_delivery(item, draining || self.cancel.is_cancelled())?,
            },
        };
        let Some(first) = first else {
            return Ok((batch, Intake::Drained));
        };
        let until = tokio::time::Instant::now() + Duration::from_millis(c.batch_max_wait_ms);
        let idle = Duration::from_millis(c.batch_idle_ms);
        let mut next = Some(first);
        let mut intake = Intake::Open;
        while let Some(d) = next.take() {
            let id = message_id(d.delivery.routing_key.as_str(), &d.delivery.data);
            let verdict = if d.delivery.redelivered {
                self.lock_guard().verdict(&id)
            } else {
                Verdict::Normal
            };
            if verdict == Verdict::Normal && self.narrow.load(std::sync::atomic::Ordering::Relaxed)
            {
                self.widen.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            if verdict == Verdict::Isolate {
                if !batch.is_empty() {
                    held.push_front(d);
                    break;
                }
                DeliveryIsolated {
                    routing_key: d.delivery.routing_key.as_str(),
                }
                .emit(&self.metrics);
                batch.isolated = true;
                self.add(&mut batch, d, id, None);
                break;
            }
            if !batch.is_empty() && bytes + d.delivery.data.len() > c.batch_max_bytes {
                held.push_front(d);
                break;
            }
            bytes += d.delivery.data.len();
            let crash_loop = match verdict {
                Verdict::CrashLoop(s) => Some(DeadLetter {
                    kind: "crash-loop",
                    reason: format!(
                        "this message was being processed each of the last {} times the daemon died ({} of them alone); it is set aside so the stream goes on",
                        s.crashes + s.alone,
                        s.alone
                    ),
                }),
                _ => None,
            };
            texts += self.add(&mut batch, d, id, crash_loop);
            if batch.deliveries.len() >= c.batch_max_events
                || bytes >= c.batch_max_bytes
                || texts >= c.batch_max_texts
            {
                break;
            }
            let now = tokio::time::Instant::now();
            if now >= until {
                break;
            }
            if let Some(d) = held.pop_front() {
                next = Some(d);
                continue;
            }
            match tokio::time::timeout((until - now).min(idle), consumer.next()).await {
                Err(_) => break, // ran dry: work on what is here now
                Ok(item) => match next_delivery(item, draining || self.cancel.is_cancelled())? {
                    Some(d) => next = Some(d),
                    None => intake = Intake::Drained,
                },
            }
        }
        Ok((batch, intake))
    }

    /// Adds a delivery to the batch, admitting it (or dead-lettering it as `crash-loop`).
    /// Returns about how many texts it will embed.
    fn add(
        &self,
        batch: &mut Batch,
        received: Received,
        id: MessageId,
        crash_loop: Option<DeadLetter>,
    ) -> usize {
        let Received { at, delivery: d } = received;
        let origin = batch.deliveries.len();
        let (fate, admission) = match crash_loop {
            Some(letter) => (
                Fate {
                    table: "-".into(),
                    op: "-",
                    outcome: "dead_lettered",
                    source_ts_ms: None,
                },
                Admission::DeadLetter(letter),
            ),
            None => admit::admit(self, origin, &d),
        };
        crate::events::EventReceived {
            table: &fate.table,
            op: fate.op,
            redelivered: d.redelivered,
        }
        .emit(&self.metrics);
        let texts = match admission {
            Admission::Event(event) => {
                let texts = admit::estimated_texts(self, &event);
                batch.events.push(*event);
                texts
            }
            Admission::Nothing => 0,
            Admission::DeadLetter(letter) => {
                batch.dead.push((origin, letter));
                0
            }
        };
        batch.fates.push(fate);
        batch.ids.push(id);
        batch.received.push(at);
        batch.deliveries.push(d);
        texts
    }

    fn lock_guard(&self) -> std::sync::MutexGuard<'_, CrashGuard> {
        self.guard.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// True the first time a keyless delete is seen for `table` (warn once per table).
    fn first_regression(&self, connector: &str) -> bool {
        self.regression_warned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(connector.to_string())
    }

    fn first_keyless_delete(&self, table: &str) -> bool {
        self.keyless_warned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(table.to_string())
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
        .sleep(move |wait| {
            crate::progress::scope(Arc::clone(&health), crate::progress::sleep(wait))
        })
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

/// The next delivery; `None` when the consumer ended, which is expected only while draining
/// after `basic.cancel` (otherwise the broker cancelled us: the session is over).
fn next_delivery(
    item: Option<lapin::Result<Received>>,
    draining: bool,
) -> Result<Option<Received>, StageError> {
    match item {
        Some(Ok(d)) => Ok(Some(d)),
        Some(Err(e)) => Err(amqp_error("consumer", e)),
        None if draining => Ok(None),
        None => Err(StageError::transient("the broker closed our consumer")),
    }
}

/// 50–100 % of `delay`.
fn jitter(delay: Duration) -> Duration {
    delay.mul_f64(rand::random_range(0.5..1.0))
}
