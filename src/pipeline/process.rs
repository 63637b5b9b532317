//! One batch, in two steps that overlap with the neighbouring batches:
//!
//! - [`prepare`]: coalesce → read states → plan → embed. Runs while the previous batch is
//!   still being written: its reads are corrected with the previous write's [`Overlay`] (what
//!   the index will hold once that write is applied), so a key in both batches is planned
//!   against the previous batch's result, exactly as if the two ran one after the other.
//! - [`commit`]: write → dead letters → ack, strictly in delivery order, one batch at a time.
//!
//! Poison is isolated to the delivery that caused it. Undecodable and unmappable deliveries
//! were set aside at admission. An op the plan cannot apply (a TOASTed column with no stored
//! value), a text the embedder rejects (the provider names it), or a write the index rejects
//! (found by bisecting the batch's documents: halves written until one document is refused
//! alone) dead-letters its delivery only. The batch is then coalesced again without it and
//! written, so the key's earlier events in the batch still apply: the index holds the last
//! valid state, never a state the stream did not have. Before documents refused alone are
//! blamed, a canary document of ours is written: if the index refuses it too, it refuses
//! requests, not rows, and the batch waits (transient: retried, intake paused, not ready)
//! until the index takes writes again. Then the whole batch is acked with one
//! `basic.ack(multiple=true)` up to its highest tag.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use lapin::Channel;
use lapin::options::BasicAckOptions;

use super::{Batch, Pipeline};
use crate::batch::{self, Coalesced, Op, PlanOutcome};
use crate::broker::amqp_error;
use crate::broker::dead_letter::{DeadLetter, DeadLetterPublisher};
use crate::error::{ErrorKind, StageError};
use crate::events::{
    BatchWritten, DeadLettered, DocumentsEmpty, DocumentsTruncated, EventProcessed, EventsSkipped,
    InternalEvent, PositionRegressed, TextsEmbedded, WriteRejected,
};
use crate::model::DocumentKey;
use crate::sink::Write;
use crate::stored::{Overlay, StoredState, stored_state, truncate_payload};

/// Where a batch's acks and dead letters go.
pub(super) struct Outbox<'a> {
    pub channel: &'a Channel,
    pub dead_letters: &'a DeadLetterPublisher,
}

/// A batch planned and embedded, ready to be written.
pub(super) struct Prepared {
    pub batch: Batch,
    dead: BTreeMap<usize, DeadLetter>,
    /// What to write (`None`: nothing), and what it was planned from.
    work: Option<Work>,
    outcome: Box<PlanOutcome>,
}

struct Work {
    coalesced: Coalesced,
    states: HashMap<DocumentKey, StoredState>,
    write: Arc<Write>,
    origins: Vec<usize>,
}

impl Prepared {
    /// What the index will hold for this batch's keys once it is written.
    pub fn overlay(&self) -> Option<Overlay> {
        self.work.as_ref().map(|w| w.write.overlay())
    }

    /// The batch, to be prepared again (its plan was made against a state that changed).
    pub fn into_batch(self) -> Batch {
        self.batch
    }
}

/// Coalesces, plans and embeds `batch`. `overlay`: the previous batch's write, not yet
/// (known to be) applied.
pub(super) async fn prepare(
    p: &Pipeline,
    batch: Batch,
    overlay: Option<&Overlay>,
) -> Result<Prepared, StageError> {
    p.metrics.batch_size.observe(batch.deliveries.len() as f64);
    let mut dead: BTreeMap<usize, DeadLetter> = batch.dead.iter().cloned().collect();
    loop {
        let excluded: BTreeSet<usize> = dead.keys().copied().collect();
        let coalesced = batch::coalesce(&batch.events, &excluded);
        if coalesced.is_empty() {
            return Ok(Prepared {
                batch,
                dead,
                work: None,
                outcome: Box::default(),
            });
        }
        let keys = coalesced.keys_to_read();
        let mut states = p
            .retry("sink", || p.sink.read_states(&keys))
            .await
            .map_err(refused_read)?;
        if let Some(overlay) = overlay {
            overlay.apply(&keys, &mut states);
        }
        let mut outcome = batch::plan(&coalesced, &states, &p.rules);
        if !outcome.poison.is_empty() {
            for x in outcome.poison {
                dead.insert(
                    x.origin,
                    DeadLetter {
                        kind: x.kind,
                        reason: x.reason,
                    },
                );
            }
            continue;
        }
        let plan = std::mem::take(&mut outcome.plan);
        if plan.is_empty() {
            return Ok(Prepared {
                batch,
                dead,
                work: None,
                outcome: Box::new(outcome),
            });
        }
        let origins: Vec<usize> = plan.upserts.iter().map(|u| u.origin).collect();
        match embed(p, &plan.upserts).await? {
            Ok(vectors) => {
                return Ok(Prepared {
                    batch,
                    dead,
                    work: Some(Work {
                        coalesced,
                        states,
                        write: Arc::new(Write::from_plan(plan, vectors)),
                        origins,
                    }),
                    outcome: Box::new(outcome),
                });
            }
            Err(e) => {
                let culprits = match e.item.and_then(|i| origins.get(i)) {
                    Some(&origin) => vec![origin],
                    None => origins.clone(),
                };
                dead.extend(dead_letters(culprits, "embed", &e.message));
            }
        }
    }
}

/// Writes a prepared batch, publishes its dead letters and acks it. `Ok(true)`: written as
/// planned; `Ok(false)`: the index refused part of it, so it was planned again (a batch
/// prepared against its overlay must then be prepared again too).
pub(super) async fn commit(
    p: &Pipeline,
    out: &Outbox<'_>,
    prepared: Prepared,
) -> Result<bool, StageError> {
    let Prepared {
        mut batch,
        mut dead,
        work,
        outcome,
    } = prepared;
    let mut as_planned = true;
    if let Some(work) = work {
        let started = std::time::Instant::now();
        match p
            .retry("sink", || p.sink.write(Arc::clone(&work.write)))
            .await
        {
            Ok(()) => {
                BatchWritten {
                    points: work.write.upserts.len(),
                    took: started.elapsed(),
                }
                .emit(&p.metrics);
                record(p, &outcome, &mut batch.fates);
            }
            Err(e) if e.kind == ErrorKind::Poison => {
                as_planned = false;
                match e.item.and_then(|i| work.origins.get(i)) {
                    Some(&origin) => {
                        dead.extend(dead_letters(vec![origin], "sink", &e.message));
                    }
                    None => {
                        WriteRejected { error: &e }.emit(&p.metrics);
                        dead.extend(
                            p.retry("sink", || {
                                isolate_rejected(p, &work.coalesced, &work.states, &work.write)
                            })
                            .await?,
                        );
                    }
                }
                apply_without(p, &mut batch, &mut dead).await?;
            }
            Err(e) => return Err(e),
        }
    } else {
        record(p, &outcome, &mut batch.fates);
    }
    acknowledge(p, out, batch, dead).await?;
    Ok(as_planned)
}

/// Plans, embeds and writes the batch without the deliveries in `dead` (which grows with
/// every culprit found), one attempt after the other, against fresh reads.
async fn apply_without(
    p: &Pipeline,
    batch: &mut Batch,
    dead: &mut BTreeMap<usize, DeadLetter>,
) -> Result<(), StageError> {
    loop {
        let excluded: BTreeSet<usize> = dead.keys().copied().collect();
        let coalesced = batch::coalesce(&batch.events, &excluded);
        if coalesced.is_empty() {
            return Ok(());
        }
        match apply(p, &coalesced).await? {
            Applied::Written(outcome) => {
                record(p, &outcome, &mut batch.fates);
                return Ok(());
            }
            Applied::Culprits(culprits) => dead.extend(culprits),
        }
    }
}

/// Dead letters (confirmed), then the ack, then the metrics of every delivery.
async fn acknowledge(
    p: &Pipeline,
    out: &Outbox<'_>,
    batch: Batch,
    dead: BTreeMap<usize, DeadLetter>,
) -> Result<(), StageError> {
    let Batch {
        deliveries,
        mut fates,
        received,
        ..
    } = batch;
    let Some(last_tag) = deliveries.iter().map(|d| d.delivery_tag).max() else {
        return Ok(());
    };
    for (&i, letter) in &dead {
        let d = &deliveries[i];
        // A dead letter the broker does not take (unroutable, refused) is retried here, in
        // this session, intake paused: giving up the session would return every delivery in
        // hand, and each return counts against `x-delivery-limit`.
        p.retry("dead-letter", || {
            out.dead_letters.publish(
                &d.data,
                &d.properties,
                d.exchange.as_str(),
                d.routing_key.as_str(),
                letter,
            )
        })
        .await?;
        fates[i].outcome = "dead_lettered";
        DeadLettered {
            table: &fates[i].table,
            kind: letter.kind,
            reason: &letter.reason,
            routing_key: d.routing_key.as_str(),
        }
        .emit(&p.metrics);
    }
    out.channel
        .basic_ack(last_tag, BasicAckOptions { multiple: true })
        .await
        .map_err(|e| amqp_error("basic.ack", e))?;
    p.acked_batches
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let now_ms = chrono::Utc::now().timestamp_millis();
    for (fate, at) in fates.iter().zip(&received) {
        EventProcessed {
            table: &fate.table,
            op: fate.op,
            outcome: fate.outcome,
            source_ts_ms: fate.source_ts_ms,
            acked_at_ms: now_ms,
            in_daemon: at.elapsed(),
        }
        .emit(&p.metrics);
    }
    tracing::debug!(
        events = deliveries.len(),
        dead_lettered = dead.len(),
        "batch acked"
    );
    Ok(())
}

/// What one attempt at the coalesced batch came to.
enum Applied {
    /// Durable in the index.
    Written(Box<PlanOutcome>),
    /// These deliveries are poison; the rest is to be coalesced and applied again.
    Culprits(Vec<(usize, DeadLetter)>),
}

/// Plans, embeds and writes `coalesced`.
async fn apply(p: &Pipeline, coalesced: &Coalesced) -> Result<Applied, StageError> {
    let keys = coalesced.keys_to_read();
    let states = p
        .retry("sink", || p.sink.read_states(&keys))
        .await
        .map_err(refused_read)?;
    let mut outcome = batch::plan(coalesced, &states, &p.rules);
    if !outcome.poison.is_empty() {
        let culprits = outcome
            .poison
            .into_iter()
            .map(|x| {
                (
                    x.origin,
                    DeadLetter {
                        kind: x.kind,
                        reason: x.reason,
                    },
                )
            })
            .collect();
        return Ok(Applied::Culprits(culprits));
    }
    let plan = std::mem::take(&mut outcome.plan);
    if plan.is_empty() {
        return Ok(Applied::Written(Box::new(outcome)));
    }
    let origins: Vec<usize> = plan.upserts.iter().map(|u| u.origin).collect();
    let vectors = match embed(p, &plan.upserts).await? {
        Ok(v) => v,
        Err(e) => {
            let culprits = match e.item.and_then(|i| origins.get(i)) {
                Some(&origin) => vec![origin],
                None => origins.clone(),
            };
            return Ok(Applied::Culprits(dead_letters(
                culprits, "embed", &e.message,
            )));
        }
    };
    let write = Arc::new(Write::from_plan(plan, vectors));
    let started = std::time::Instant::now();
    match p.retry("sink", || p.sink.write(Arc::clone(&write))).await {
        Ok(()) => {
            BatchWritten {
                points: write.upserts.len(),
                took: started.elapsed(),
            }
            .emit(&p.metrics);
            Ok(Applied::Written(Box::new(outcome)))
        }
        Err(e) if e.kind == ErrorKind::Poison => {
            if let Some(&origin) = e.item.and_then(|i| origins.get(i)) {
                return Ok(Applied::Culprits(dead_letters(
                    vec![origin],
                    "sink",
                    &e.message,
                )));
            }
            WriteRejected { error: &e }.emit(&p.metrics);
            let culprits = p
                .retry("sink", || isolate_rejected(p, coalesced, &states, &write))
                .await?;
            Ok(Applied::Culprits(culprits))
        }
        Err(e) => Err(e),
    }
}

/// Embeds the texts of `upserts`: `Ok(Err(poison))` when the provider rejected an input.
async fn embed(
    p: &Pipeline,
    upserts: &[batch::PointWrite],
) -> Result<Result<Vec<Vec<f32>>, StageError>, StageError> {
    let texts: Vec<String> = upserts.iter().map(|u| u.text.clone()).collect();
    if texts.is_empty() {
        return Ok(Ok(Vec::new()));
    }
    crate::faults::before_embedding(&texts);
    let started = std::time::Instant::now();
    match p.retry("embed", || p.embedder.embed(&texts)).await {
        Ok(v) => {
            TextsEmbedded {
                texts: texts.len(),
                took: started.elapsed(),
                concurrency: p.embedder.concurrency(),
            }
            .emit(&p.metrics);
            Ok(Ok(v))
        }
        Err(e) if e.kind == ErrorKind::Poison => Ok(Err(e)),
        Err(e) => Err(e),
    }
}

/// A read the index refuses is about the request (no row is at fault), and retrying it would
/// loop for ever: fatal, with what the index said.
fn refused_read(e: StageError) -> StageError {
    match e.kind {
        ErrorKind::Poison => StageError::fatal(format!(
            "the index refuses to read stored documents (no event is at fault; check the sink's version and configuration): {}",
            e.message
        )),
        _ => e,
    }
}

fn dead_letters(origins: Vec<usize>, kind: &'static str, reason: &str) -> Vec<(usize, DeadLetter)> {
    origins
        .into_iter()
        .map(|o| {
            (
                o,
                DeadLetter {
                    kind,
                    reason: reason.to_string(),
                },
            )
        })
        .collect()
}

/// The index refused the batch without naming a point: write its truncates one by one, then
/// its documents by halves, until the documents it refuses alone are found. Everything else
/// is written on the way. Pieces are planned against the state read before the batch (with
/// the truncates applied), as the whole batch was, and reuse its vectors.
async fn isolate_rejected(
    p: &Pipeline,
    coalesced: &Coalesced,
    states: &HashMap<DocumentKey, StoredState>,
    full: &Write,
) -> Result<Vec<(usize, DeadLetter)>, StageError> {
    let vectors: HashMap<uuid::Uuid, Vec<f32>> = full
        .upserts
        .iter()
        .map(|u| (u.id, u.vector.clone()))
        .collect();
    let mut snapshot = states.clone();
    let mut culprits = Vec::new();
    for t in &coalesced.truncates {
        let piece = Coalesced::from_truncate(t.clone());
        if let Some(reason) = write_piece(p, &piece, &snapshot, &vectors).await? {
            culprits.push((t.origin, reason));
        }
        snapshot.retain(|k, _| k.table != t.table);
        if let Some(marker) = stored_state(&truncate_payload(
            &t.table,
            t.position.as_ref(),
            t.source_ts_ms,
        )) {
            snapshot.insert(DocumentKey::table_marker(&t.table), marker);
        }
    }
    let ops = coalesced.ops.clone();
    bisect(p, &ops, &snapshot, &vectors, &mut culprits).await?;
    if let Some((_, answer)) = culprits.last()
        && let Some(refusal) = canary_refused(p).await?
    {
        // Refused alone, and a plain document of ours is refused too: the index refuses
        // requests, not these rows. Wait (intake paused) until it takes writes again.
        return Err(StageError::transient(format!(
            "the index refuses every write, a one-chunk canary document too, so no event is \
             at fault: check the sink's configuration, version and any proxy in front of it \
             (request size limits). Its answer to the canary: {refusal}; to the batch: {answer}"
        )));
    }
    Ok(culprits
        .into_iter()
        .map(|(origin, reason)| {
            (
                origin,
                DeadLetter {
                    kind: "sink",
                    reason,
                },
            )
        })
        .collect())
}

/// The table of the canary document: no source table can have this name (its schema part
/// starts with `__cdc_indexer`), and the canary is deleted again right after it is written.
pub const CANARY_TABLE: &str = "__cdc_indexer.canary";

/// Writes a small one-chunk document of our own, then deletes it: `Some(answer)` when the
/// index refuses it. This tells a document the index refuses (the canary goes through) from
/// an index that refuses every request (the canary is refused too).
async fn canary_refused(p: &Pipeline) -> Result<Option<String>, StageError> {
    let text = "cdc-indexer canary: a one-chunk document written to check the index takes writes";
    let texts = vec![text.to_string()];
    // No retries of their own in here: a transient failure is the caller's to retry (it
    // runs under `Pipeline::retry`), and one pause is reported once.
    let vector = match p.embedder.embed(&texts).await {
        Ok(mut v) if v.len() == 1 => v.swap_remove(0),
        Err(e) if e.kind != ErrorKind::Poison => return Err(e),
        // The embedder refuses our own text: it cannot tell, so the documents keep the blame.
        _ => return Ok(None),
    };
    let key = DocumentKey {
        table: CANARY_TABLE.to_string(),
        key: r#"{"id":0}"#.to_string(),
    };
    let hash = crate::mapping::text_hash(text);
    let payload = crate::stored::commit_payload(
        crate::stored::CommitMeta {
            key: &key,
            chunks: 1,
            hash: Some(&hash),
            position: None,
            source_ts_ms: None,
        },
        &crate::model::Row::new(),
        &crate::model::Row::new(),
        text,
    );
    let write = Arc::new(Write {
        upserts: vec![crate::sink::Point {
            id: key.point_id(0),
            vector,
            payload,
        }],
        ..Write::default()
    });
    match p.sink.write(write).await {
        Ok(()) => {}
        Err(e) if e.kind == ErrorKind::Poison => return Ok(Some(e.message)),
        Err(e) => return Err(e),
    }
    let remove = Arc::new(Write {
        delete_keys: vec![key],
        ..Write::default()
    });
    match p.sink.write(remove).await {
        Ok(()) => Ok(None),
        Err(e) if e.kind == ErrorKind::Poison => Ok(Some(e.message)),
        Err(e) => Err(e),
    }
}

async fn bisect(
    p: &Pipeline,
    ops: &[Op],
    states: &HashMap<DocumentKey, StoredState>,
    vectors: &HashMap<uuid::Uuid, Vec<f32>>,
    culprits: &mut Vec<(usize, String)>,
) -> Result<(), StageError> {
    if ops.is_empty() {
        return Ok(());
    }
    let piece = Coalesced::from_ops(ops.to_vec());
    match write_piece(p, &piece, states, vectors).await? {
        None => Ok(()),
        Some(reason) if ops.len() == 1 => {
            culprits.push((ops[0].origin(), reason));
            Ok(())
        }
        Some(_) => {
            let mid = ops.len() / 2;
            Box::pin(bisect(p, &ops[..mid], states, vectors, culprits)).await?;
            Box::pin(bisect(p, &ops[mid..], states, vectors, culprits)).await
        }
    }
}

/// Writes one piece of a batch: `Some(reason)` when the index refuses it.
async fn write_piece(
    p: &Pipeline,
    piece: &Coalesced,
    states: &HashMap<DocumentKey, StoredState>,
    known: &HashMap<uuid::Uuid, Vec<f32>>,
) -> Result<Option<String>, StageError> {
    let plan = batch::plan(piece, states, &p.rules).plan;
    if plan.is_empty() {
        return Ok(None);
    }
    let missing: Vec<batch::PointWrite> = plan
        .upserts
        .iter()
        .filter(|u| !known.contains_key(&u.id))
        .cloned()
        .collect();
    let mut fresh: HashMap<uuid::Uuid, Vec<f32>> = HashMap::new();
    if !missing.is_empty() {
        match embed(p, &missing).await? {
            Ok(v) => fresh.extend(missing.iter().map(|u| u.id).zip(v)),
            Err(e) => return Ok(Some(e.message)),
        }
    }
    let vectors = plan
        .upserts
        .iter()
        .map(|u| {
            known
                .get(&u.id)
                .or_else(|| fresh.get(&u.id))
                .cloned()
                .unwrap_or_default()
        })
        .collect();
    let write = Arc::new(Write::from_plan(plan, vectors));
    match p.retry("sink", || p.sink.write(Arc::clone(&write))).await {
        Ok(()) => Ok(None),
        Err(e) if e.kind == ErrorKind::Poison => Ok(Some(e.message)),
        Err(e) => Err(e),
    }
}

/// Counts what the plan decided beyond the writes.
fn record(p: &Pipeline, outcome: &PlanOutcome, fates: &mut [super::Fate]) {
    for (_, origin) in &outcome.stale {
        if let Some(f) = fates.get_mut(*origin) {
            f.outcome = "skipped_stale";
        }
    }
    EventsSkipped {
        reason: "stale",
        count: outcome.stale.len(),
    }
    .emit(&p.metrics);
    EventsSkipped {
        reason: "unchanged",
        count: outcome.unchanged,
    }
    .emit(&p.metrics);
    for table in &outcome.empty {
        DocumentsEmpty { table }.emit(&p.metrics);
    }
    for table in &outcome.truncated {
        DocumentsTruncated { table }.emit(&p.metrics);
    }
    for r in &outcome.regressions {
        PositionRegressed {
            connector: &r.connector,
            key: &r.key,
            first: p.first_regression(&r.connector),
        }
        .emit(&p.metrics);
    }
}
