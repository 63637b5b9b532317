//! One delivery → what the batch does with it: decode (Debezium envelope → `ChangeEvent`),
//! find its table's rule, map it (key, kept columns), or say why not.
//!
//! Nothing here does I/O; a failure is the delivery's own (poison, dead-lettered with the
//! reason) and never affects its batch-mates.

use lapin::message::Delivery;

use super::Pipeline;
use crate::batch::{Admitted, Delete, Repair, Truncate, Upsert};
use crate::broker::dead_letter::DeadLetter;
use crate::broker::{header, header_text};
use crate::config::UnknownTable;
use crate::decode::{Decoded, decode, decode_key_header};
use crate::events::{InternalEvent, KeylessDeleteSeen};
use crate::mapping::CompiledRule;
use crate::model::{Change, ChangeEvent, Ignored, TableName};

/// What became of one delivery, for metrics.
#[derive(Debug, Clone)]
pub(super) struct Fate {
    pub table: String,
    pub op: &'static str,
    pub outcome: &'static str,
    pub source_ts_ms: Option<i64>,
}

/// The batch's decision about one delivery.
#[derive(Debug)]
pub(super) enum Admission {
    /// An event to apply.
    Event(Box<Admitted>),
    /// Nothing to write (tombstone, metadata, a table without a rule): ack.
    Nothing,
    /// Poison: dead-letter it.
    DeadLetter(DeadLetter),
}

/// Decodes and maps delivery `origin` of the batch.
pub(super) fn admit(p: &Pipeline, origin: usize, d: &Delivery) -> (Fate, Admission) {
    let mut fate = Fate {
        table: "-".into(),
        op: "-",
        outcome: "dead_lettered",
        source_ts_ms: None,
    };
    // A delivery replayed from the DLQ arrives through the default exchange: its original
    // routing key travels in a header.
    let routing_key =
        crate::broker::routing_key_of(d.routing_key.as_str(), d.properties.headers().as_ref());
    let routing_key = routing_key.as_str();
    let event = match decode(&d.data, routing_key) {
        Ok(Decoded::Change(event)) => *event,
        Ok(Decoded::Ignored(kind)) => {
            fate.op = kind.as_str();
            fate.outcome = "ignored";
            if kind == Ignored::KeylessDelete {
                fate.table = table_of_routing_key(routing_key);
                let first = p.first_keyless_delete(&fate.table);
                KeylessDeleteSeen {
                    table: &fate.table,
                    first,
                }
                .emit(&p.metrics);
            }
            return (fate, Admission::Nothing);
        }
        Err(e) => return (fate, dead("decode", e.0)),
    };
    fate.op = event.op.as_str();
    fate.source_ts_ms = event.source_ts_ms;
    let Some(rule) = find_rule(p, &event.table) else {
        fate.table = event.table.to_string();
        return match p.config.pipeline.unknown_table {
            UnknownTable::Skip => {
                fate.outcome = "skipped_unknown_table";
                (fate, Admission::Nothing)
            }
            UnknownTable::DeadLetter => {
                let reason = format!("no [[tables]] rule for table `{}`", event.table);
                (fate, dead("unknown-table", reason))
            }
        };
    };
    fate.table = rule.rule.table.clone();
    let headers = d.properties.headers().as_ref();
    let key_header = |name: &str| header(headers, name).map(header_text);
    let repair = match key_header(REPAIR_HEADER).map(|h| Repair::parse(&h)) {
        None => Repair::default(),
        // A repair sets the stale guard aside: only `reconcile --repair` may ask for one,
        // and it publishes to our queue itself (the default exchange), as `dlq replay` does.
        Some(_) if !d.exchange.as_str().is_empty() => {
            let reason = format!(
                "header {REPAIR_HEADER} is accepted only on messages published to the queue \
                 itself (reconcile --repair), not through the exchange `{}`",
                d.exchange.as_str()
            );
            return (fate, dead("decode", reason));
        }
        Some(Ok(r)) => r,
        Some(Err(reason)) => return (fate, dead("decode", reason)),
    };
    if repair.from_reconcile {
        // Its `source.ts_ms` is when reconcile read the row, not a commit: no lag sample.
        fate.source_ts_ms = None;
    }
    match map_event(rule, origin, event, repair, key_header) {
        Ok((outcome, admitted)) => {
            fate.outcome = outcome;
            (fate, Admission::Event(Box::new(admitted)))
        }
        Err(reason) => (fate, dead("mapping", reason)),
    }
}

/// The header `reconcile --repair` puts on the events it publishes (see [`Repair::parse`]).
pub const REPAIR_HEADER: &str = "x-cdc-repair";

fn dead(kind: &'static str, reason: String) -> Admission {
    Admission::DeadLetter(DeadLetter { kind, reason })
}

/// The event as the batch sees it: key, kept columns, the primary-key change it is part of.
fn map_event(
    rule: &CompiledRule,
    origin: usize,
    mut event: ChangeEvent,
    repair: Repair,
    key_header: impl Fn(&str) -> Option<String>,
) -> Result<(&'static str, Admitted), String> {
    let is_delete = matches!(event.change, Change::Delete(_));
    if repair.if_unchanged != is_delete && repair.from_reconcile
        || (is_delete && (repair.rewrite || repair.reset_position))
    {
        return Err(format!(
            "header {REPAIR_HEADER}: `{}` does not fit an op `{}` event",
            repair.header(),
            event.op.as_str()
        ));
    }
    let header_key = |name: &str| -> Result<Option<crate::model::Row>, String> {
        key_header(name)
            .map(|text| decode_key_header(&text).map_err(|e| format!("header {name}: {e}")))
            .transpose()
    };
    match std::mem::replace(&mut event.change, Change::Truncate) {
        Change::Truncate => Ok((
            "truncated",
            Admitted::Truncate(Truncate {
                table: rule.rule.table.clone(),
                position: event.position,
                source_ts_ms: event.source_ts_ms,
                origin,
            }),
        )),
        Change::Upsert(row) => {
            let key = rule.key(&row).map_err(|e| e.0)?;
            let moved_from = match header_key("__debezium.oldkey")? {
                Some(old) => Some(rule.key(&old).map_err(|e| format!("old key: {}", e.0))?),
                None => None,
            };
            let unavailable = event.unavailable;
            // A column the template needs must be in the row, or be one Debezium did not send.
            if let Some(missing) = rule
                .missing_template_columns(&row)
                .into_iter()
                .find(|c| !unavailable.iter().any(|u| u == c))
            {
                return Err(rule
                    .render(&row)
                    .err()
                    .map(|e| e.0)
                    .unwrap_or_else(|| format!("template column `{missing}` is missing")));
            }
            Ok((
                "upserted",
                Admitted::Upsert(Upsert {
                    key,
                    values: rule.kept(row),
                    unavailable,
                    moved_from,
                    position: event.position,
                    source_ts_ms: event.source_ts_ms,
                    origin,
                    repair,
                }),
            ))
        }
        Change::Delete(row) => {
            let key = rule.key(&row).map_err(|e| e.0)?;
            let moved = header_key("__debezium.newkey")?.is_some();
            Ok((
                "deleted",
                Admitted::Delete(Delete {
                    key,
                    moved,
                    position: event.position,
                    source_ts_ms: event.source_ts_ms,
                    origin,
                    repair,
                }),
            ))
        }
    }
}

/// `dbserver1.public.products` → `public.products` (the table a keyless delete was for).
fn table_of_routing_key(routing_key: &str) -> String {
    let parts: Vec<&str> = routing_key.split('.').collect();
    match parts.as_slice() {
        [_, schema, table] => format!("{schema}.{table}"),
        _ => routing_key.to_string(),
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

/// About how many texts (chunks) an admitted event will embed, to bound a batch's work.
pub(super) fn estimated_texts(p: &Pipeline, event: &Admitted) -> usize {
    let Admitted::Upsert(u) = event else {
        return 0;
    };
    let Some(rule) = p.rules.get(&u.key.table) else {
        return 1;
    };
    let chars: usize = rule
        .template
        .columns()
        .filter_map(|c| u.values.get(c))
        .map(|v| v.as_str().map_or(16, str::len))
        .sum();
    let step = rule
        .rule
        .chunk_size
        .saturating_sub(rule.rule.chunk_overlap)
        .max(1);
    (chars / step + 1).min(rule.rule.max_chunks)
}
