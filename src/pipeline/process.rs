//! One batch: decode → map → coalesce → plan → embed → write → ack.
//!
//! Poison is isolated to the delivery that caused it: undecodable and unmappable messages are
//! dead-lettered before anything is written; an input the embedder or the index rejects is
//! found (the provider names it, or we write op by op) and only its delivery is
//! dead-lettered; the rest of the batch is written. Then the whole batch is acked with one
//! `basic.ack(multiple=true)` up to its highest tag.

use std::collections::BTreeMap;

use lapin::message::Delivery;
use lapin::options::BasicAckOptions;

use super::{Pipeline, Session};
use crate::batch::{self, Coalesced, Planned};
use crate::broker::amqp_error;
use crate::broker::dead_letter::DeadLetter;
use crate::config::UnknownTable;
use crate::decode::{Decoded, decode};
use crate::error::{ErrorKind, StageError};
use crate::events::{
    BatchWritten, DeadLettered, EventProcessed, EventReceived, EventsSkipped, InternalEvent,
    TextsEmbedded,
};
use crate::mapping::CompiledRule;
use crate::model::{Change, ChangeEvent, TableName};
use crate::sink::Write;

/// What became of one delivery, for metrics.
#[derive(Debug, Clone)]
struct Fate {
    table: String,
    op: &'static str,
    outcome: &'static str,
    source_ts_ms: Option<i64>,
}

pub(super) async fn process(
    p: &Pipeline,
    session: &Session,
    deliveries: Vec<Delivery>,
) -> Result<(), StageError> {
    let Some(last_tag) = deliveries.iter().map(|d| d.delivery_tag).max() else {
        return Ok(());
    };
    p.metrics.batch_size.observe(deliveries.len() as f64);
    let mut fates = Vec::with_capacity(deliveries.len());
    let mut coalesced = Coalesced::default();
    let mut dead: BTreeMap<usize, DeadLetter> = BTreeMap::new();

    for (i, d) in deliveries.iter().enumerate() {
        let (fate, result) = admit(p, i, d, &mut coalesced);
        EventReceived {
            table: &fate.table,
            op: fate.op,
        }
        .emit(&p.metrics);
        fates.push(fate);
        if let Err(letter) = result {
            dead.insert(i, letter);
        }
    }

    // Plan, embed, write; on poison from the embedder or the index, dead-letter the culprit
    // and plan again without it.
    loop {
        if coalesced.is_empty() {
            break;
        }
        let keys = coalesced.keys();
        let states = p.retry("sink", || p.sink.read_states(&keys)).await?;
        let outcome = batch::plan(&coalesced, &states);
        if !outcome.poison.is_empty() {
            for (origin, reason) in outcome.poison {
                dead.insert(
                    origin,
                    DeadLetter {
                        kind: "toast-unavailable",
                        reason,
                    },
                );
                remove_origin(&mut coalesced, origin);
            }
            continue;
        }
        for (_, origin) in &outcome.stale {
            fates[*origin].outcome = "skipped_stale";
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
        let plan = outcome.plan;
        if plan.is_empty() {
            break;
        }
        let texts: Vec<String> = plan.upserts.iter().map(|u| u.text.clone()).collect();
        let origins: Vec<usize> = plan.upserts.iter().map(|u| u.origin).collect();
        let started = std::time::Instant::now();
        let vectors = match p.retry("embed", || p.embedder.embed(texts.clone())).await {
            Ok(v) => v,
            Err(e) if e.kind == ErrorKind::Poison => {
                let culprits: Vec<usize> = match e.item {
                    Some(item) => origins.get(item).copied().into_iter().collect(),
                    None => origins.clone(),
                };
                for origin in culprits {
                    dead.insert(
                        origin,
                        DeadLetter {
                            kind: "embed",
                            reason: e.message.clone(),
                        },
                    );
                    remove_origin(&mut coalesced, origin);
                }
                continue;
            }
            Err(e) => return Err(e),
        };
        TextsEmbedded {
            texts: texts.len(),
            took: started.elapsed(),
        }
        .emit(&p.metrics);
        let write = Write::from_plan(plan, vectors);
        let started = std::time::Instant::now();
        match p.retry("sink", || p.sink.write(&write)).await {
            Ok(()) => {
                BatchWritten {
                    points: write.upserts.len(),
                    took: started.elapsed(),
                }
                .emit(&p.metrics);
                break;
            }
            Err(e) if e.kind == ErrorKind::Poison => {
                let culprits = match e.item.and_then(|i| origins.get(i).copied()) {
                    Some(origin) => vec![origin],
                    None => find_rejected(p, &coalesced).await?,
                };
                tracing::warn!(error = %e, culprits = culprits.len(), "the index rejected part of a batch; dead-lettering the culprits");
                for origin in culprits {
                    dead.insert(
                        origin,
                        DeadLetter {
                            kind: "sink",
                            reason: e.message.clone(),
                        },
                    );
                    remove_origin(&mut coalesced, origin);
                }
            }
            Err(e) => return Err(e),
        }
    }

    for (&i, letter) in &dead {
        let d = &deliveries[i];
        session
            .dead_letters
            .publish(
                &d.data,
                &d.properties,
                d.exchange.as_str(),
                d.routing_key.as_str(),
                letter,
            )
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

    session
        .channel
        .basic_ack(last_tag, BasicAckOptions { multiple: true })
        .await
        .map_err(|e| amqp_error("basic.ack", e))?;

    let now_ms = chrono::Utc::now().timestamp_millis();
    for fate in &fates {
        EventProcessed {
            table: &fate.table,
            op: fate.op,
            outcome: fate.outcome,
            source_ts_ms: fate.source_ts_ms,
            acked_at_ms: now_ms,
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

/// Decodes and maps one delivery into `coalesced`. `Err` means: dead-letter it.
fn admit(
    p: &Pipeline,
    i: usize,
    d: &Delivery,
    coalesced: &mut Coalesced,
) -> (Fate, Result<(), DeadLetter>) {
    let mut fate = Fate {
        table: "-".into(),
        op: "-",
        outcome: "dead_lettered",
        source_ts_ms: None,
    };
    let routing_key =
        crate::broker::routing_key_of(d.routing_key.as_str(), d.properties.headers().as_ref());
    let event = match decode(&d.data, &routing_key) {
        Ok(Decoded::Change(event)) => *event,
        Ok(Decoded::Ignored(kind)) => {
            fate.op = kind.as_str();
            fate.outcome = "ignored";
            return (fate, Ok(()));
        }
        Err(e) => {
            return (
                fate,
                Err(DeadLetter {
                    kind: "decode",
                    reason: e.0,
                }),
            );
        }
    };
    fate.op = event.op.as_str();
    fate.source_ts_ms = event.source_ts_ms;
    let Some(rule) = find_rule(p, &event.table) else {
        fate.table = event.table.to_string();
        return match p.config.pipeline.unknown_table {
            UnknownTable::Skip => {
                fate.outcome = "skipped_unknown_table";
                (fate, Ok(()))
            }
            UnknownTable::DeadLetter => {
                let reason = format!("no [[tables]] rule for table `{}`", event.table);
                (
                    fate,
                    Err(DeadLetter {
                        kind: "unknown-table",
                        reason,
                    }),
                )
            }
        };
    };
    fate.table = rule.rule.table.clone();
    match admit_change(rule, i, event, coalesced) {
        Ok(outcome) => {
            fate.outcome = outcome;
            (fate, Ok(()))
        }
        Err(reason) => (
            fate,
            Err(DeadLetter {
                kind: "mapping",
                reason,
            }),
        ),
    }
}

fn admit_change(
    rule: &CompiledRule,
    origin: usize,
    event: ChangeEvent,
    coalesced: &mut Coalesced,
) -> Result<&'static str, String> {
    match event.change {
        Change::Truncate => {
            coalesced.truncate(&rule.rule.table);
            Ok("truncated")
        }
        Change::Upsert(row) => {
            let doc = rule.document(&row, &event.unavailable).map_err(|e| e.0)?;
            coalesced.push(Planned::Upsert {
                doc,
                unavailable: event.unavailable,
                position: event.position,
                source_ts_ms: event.source_ts_ms,
                origin,
            });
            Ok("upserted")
        }
        Change::Delete(row) => {
            let key = rule.key(&row).map_err(|e| e.0)?;
            coalesced.push(Planned::Delete {
                key,
                position: event.position,
                origin,
            });
            Ok("deleted")
        }
    }
}

/// The rule of `schema.table`; for an unwrapped row without a schema, the only rule whose
/// table name matches.
fn find_rule<'a>(p: &'a Pipeline, table: &TableName) -> Option<&'a CompiledRule> {
    match &table.schema {
        Some(_) => p.rules.get(&table.to_string()),
        None => {
            let mut matches = p
                .rules
                .values()
                .filter(|r| r.rule.table.rsplit('.').next() == Some(table.table.as_str()));
            let first = matches.next();
            if matches.next().is_some() {
                None
            } else {
                first
            }
        }
    }
}

fn remove_origin(coalesced: &mut Coalesced, origin: usize) {
    let mut kept = Coalesced::default();
    for table in &coalesced.truncates {
        kept.truncate(table);
    }
    for op in coalesced.ops.drain(..) {
        let o = batch::origin(&op);
        if o != origin {
            kept.push(op);
        }
    }
    kept.stale = std::mem::take(&mut coalesced.stale);
    *coalesced = kept;
}

/// The index rejected a batch without saying which point: write each op alone to find the
/// ones it rejects. Returns their origins. (Rare: invalid payloads.)
async fn find_rejected(p: &Pipeline, coalesced: &Coalesced) -> Result<Vec<usize>, StageError> {
    let mut culprits = Vec::new();
    for op in &coalesced.ops {
        let mut single = Coalesced::default();
        single.push(op.clone());
        let keys = single.keys();
        let states = p.retry("sink", || p.sink.read_states(&keys)).await?;
        let plan = batch::plan(&single, &states).plan;
        let texts: Vec<String> = plan.upserts.iter().map(|u| u.text.clone()).collect();
        let vectors = p.retry("embed", || p.embedder.embed(texts.clone())).await?;
        let write = Write::from_plan(plan, vectors);
        match p.retry("sink", || p.sink.write(&write)).await {
            Ok(()) => {}
            Err(e) if e.kind == ErrorKind::Poison => culprits.push(batch::origin(op)),
            Err(e) => return Err(e),
        }
    }
    Ok(culprits)
}
