//! Planning: the coalesced batch, diffed against what the index holds, becomes the writes.

use std::collections::HashMap;

use super::{Carry, Coalesced, Op, Upsert};
use crate::mapping::CompiledRule;
use crate::model::{DocumentKey, Row, SourcePosition};
use crate::stored::{
    CommitMeta, StoredKind, StoredState, chunk_payload, commit_payload, deleted_payload,
    empty_payload, truncate_payload,
};

/// A point to write with a new vector.
#[derive(Debug, Clone, PartialEq)]
pub struct PointWrite {
    pub id: uuid::Uuid,
    pub text: String,
    pub payload: Row,
    /// The batch index of the delivery this point comes from.
    pub origin: usize,
}

/// A point whose payload is written whole: a vector-less marker, or chunk 0 of a document
/// whose text (and so its vectors) did not change.
#[derive(Debug, Clone, PartialEq)]
pub struct PayloadWrite {
    pub id: uuid::Uuid,
    pub payload: Row,
}

/// Everything one batch writes, in the order the sink must apply it: truncates (each a
/// delete by table, then its table marker), key deletes, point deletes, markers, upserts
/// (every document's chunk 0 after its other chunks: all commit records come last), then
/// payload overwrites of chunk 0.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct WritePlan {
    pub truncate_tables: Vec<String>,
    /// One per truncated table, written after its delete.
    pub table_markers: Vec<PayloadWrite>,
    pub delete_keys: Vec<DocumentKey>,
    /// Surplus chunks of documents that shrank, and the chunks of documents whose text became
    /// empty.
    pub delete_points: Vec<uuid::Uuid>,
    /// Vector-less points: delete markers and empty documents (at chunk 0's id).
    pub markers: Vec<PayloadWrite>,
    /// Points to embed (`text`) and write.
    pub upserts: Vec<PointWrite>,
    /// Chunk 0 of documents whose text did not change: the whole payload is replaced, the
    /// vectors stay. Nulls are kept, as in an upsert.
    pub payload_updates: Vec<PayloadWrite>,
}

impl WritePlan {
    pub fn is_empty(&self) -> bool {
        self.truncate_tables.is_empty()
            && self.delete_keys.is_empty()
            && self.delete_points.is_empty()
            && self.markers.is_empty()
            && self.upserts.is_empty()
            && self.payload_updates.is_empty()
    }
}

/// What planning decided beyond the writes.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct PlanOutcome {
    pub plan: WritePlan,
    /// Events dropped because the index (or the batch) holds a newer position for their key
    /// or their table's truncate: (key, origin).
    pub stale: Vec<(DocumentKey, usize)>,
    /// Upserts whose text was unchanged: nothing embedded (payload written if it changed).
    pub unchanged: usize,
    /// Ops that cannot be applied. Dead-letter these deliveries.
    pub poison: Vec<Poisoned>,
    /// Tables of documents whose text rendered empty (stored as a marker, nothing embedded).
    pub empty: Vec<String>,
    /// Tables of documents longer than their `max_chunks` (indexed by their first chunks).
    pub truncated: Vec<String>,
    /// Stale events that look like a position reset rather than a replay: older position than
    /// the stored one, but a later `source.ts_ms` (a restored database, a MySQL failover).
    pub regressions: Vec<Regression>,
}

/// A position that went backwards for a connector (see [`PlanOutcome::regressions`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Regression {
    pub connector: String,
    pub key: DocumentKey,
}

/// An op that cannot be applied, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Poisoned {
    pub origin: usize,
    /// Dead-letter kind: `toast-unavailable` (a column the text needs was not sent and the
    /// index holds no value of it) or `mapping`.
    pub kind: &'static str,
    pub reason: String,
}

/// Plans the writes of `batch` given the `stored` state of its keys (see
/// [`Coalesced::keys_to_read`]) and the table rules (by `schema.table`).
pub fn plan(
    batch: &Coalesced,
    stored: &HashMap<DocumentKey, StoredState>,
    rules: &HashMap<String, CompiledRule>,
) -> PlanOutcome {
    let mut out = PlanOutcome {
        stale: batch.stale.clone(),
        ..PlanOutcome::default()
    };
    let truncated_here = |table: &str| batch.truncates.iter().any(|t| t.table == table);
    // What the index holds for `key` once this batch's truncates are applied.
    let state_of = |key: &DocumentKey| -> Option<&StoredState> {
        if truncated_here(&key.table) {
            None
        } else {
            stored.get(key)
        }
    };
    for t in &batch.truncates {
        // A truncate at the stored truncate's position is that truncate again (a
        // redelivery): applying it twice would remove rows created since.
        let marker = stored.get(&DocumentKey::table_marker(&t.table));
        if not_newer(t.position.as_ref(), marker) {
            out.stale
                .push((DocumentKey::table_marker(&t.table), t.origin));
            continue;
        }
        out.plan.truncate_tables.push(t.table.clone());
        let marker_key = DocumentKey::table_marker(&t.table);
        out.plan.table_markers.push(PayloadWrite {
            id: marker_key.point_id(0),
            payload: truncate_payload(&t.table, t.position.as_ref(), t.source_ts_ms),
        });
    }
    let mut commits = Vec::new();
    for op in &batch.ops {
        let key = op.key();
        let table_marker = state_of(&DocumentKey::table_marker(&key.table));
        let state = state_of(key);
        let repair = op.repair();
        let stale = is_stale(op.position(), state) || is_stale(op.position(), table_marker);
        if stale && !repair.reset_position {
            if !repair.from_reconcile
                && let Some(connector) = regressed(op, state)
            {
                out.regressions.push(Regression {
                    connector,
                    key: key.clone(),
                });
            }
            out.stale.push((key.clone(), op.origin()));
            continue;
        }
        // An orphan's delete applies only while the index holds what reconcile saw.
        if repair.if_unchanged && state.and_then(|s| s.position.as_ref()) != op.position() {
            out.stale.push((key.clone(), op.origin()));
            continue;
        }
        match op {
            Op::Delete { delete, before } => {
                let moved_row = delete.moved.then(|| {
                    let carry = before.clone().unwrap_or_else(|| Carry {
                        values: Row::new(),
                        from: key.clone(),
                    });
                    let mut row = state_of(&carry.from)
                        .map(|s| s.values.clone())
                        .unwrap_or_default();
                    row.extend(carry.values);
                    row
                });
                out.plan.delete_keys.push(key.clone());
                out.plan.markers.push(PayloadWrite {
                    id: key.point_id(0),
                    payload: deleted_payload(
                        key,
                        delete.position.as_ref(),
                        delete.source_ts_ms,
                        moved_row.as_ref(),
                    ),
                });
            }
            Op::Upsert { upsert, carry } => {
                let Some(rule) = rules.get(&key.table) else {
                    out.poison.push(Poisoned {
                        origin: upsert.origin,
                        kind: "mapping",
                        reason: format!("{key}: no [[tables]] rule"),
                    });
                    continue;
                };
                let values = match whole_row(upsert, carry.as_ref(), state, &state_of, rule) {
                    Ok(v) => v,
                    Err(reason) => {
                        out.poison.push(Poisoned {
                            origin: upsert.origin,
                            kind: "toast-unavailable",
                            reason,
                        });
                        continue;
                    }
                };
                plan_upsert(&mut out, &mut commits, rule, upsert, &values, state);
            }
        }
    }
    // Commit records last: chunk 0 of each document after every other chunk of the batch.
    out.plan.upserts.extend(commits);
    out
}

/// The upsert's row with every column it did not send filled in: from earlier events of the
/// batch (`carry.values`), from the index's row of the key it moved from, or from the index's
/// row of its own key.
fn whole_row<'a>(
    upsert: &Upsert,
    carry: Option<&Carry>,
    state: Option<&StoredState>,
    state_of: &impl Fn(&DocumentKey) -> Option<&'a StoredState>,
    rule: &CompiledRule,
) -> Result<Row, String> {
    let mut values = upsert.values.clone();
    let source = match carry {
        Some(c) => state_of(&c.from),
        None => state.filter(|s| s.kind != StoredKind::Deleted),
    };
    for column in &upsert.unavailable {
        let value = carry
            .and_then(|c| c.values.get(column))
            .or_else(|| source.and_then(|s| s.values.get(column)));
        if let Some(v) = value {
            values.insert(column.clone(), v.clone());
        }
    }
    let missing = rule.missing_template_columns(&values);
    if missing.is_empty() {
        return Ok(values);
    }
    Err(format!(
        "{}: the text template needs {} but the event did not send {} (unchanged TOAST value) and the index holds no earlier value of {}",
        upsert.key,
        missing.join(", "),
        if missing.len() == 1 { "it" } else { "them" },
        if missing.len() == 1 { "it" } else { "them" },
    ))
}

fn plan_upsert(
    out: &mut PlanOutcome,
    commits: &mut Vec<PointWrite>,
    rule: &CompiledRule,
    upsert: &Upsert,
    values: &Row,
    state: Option<&StoredState>,
) {
    let key = &upsert.key;
    let rendered = match rule.render(values) {
        Ok(r) => r,
        Err(e) => {
            out.poison.push(Poisoned {
                origin: upsert.origin,
                kind: "mapping",
                reason: e.0,
            });
            return;
        }
    };
    let fields = rule.payload_fields(values);
    let hidden = rule.hidden_fields(values);
    let meta = CommitMeta {
        key,
        chunks: rendered.chunks.len(),
        hash: Some(&rendered.hash),
        position: upsert.position.as_ref(),
        source_ts_ms: upsert.source_ts_ms,
    };
    // A rewrite starts from nothing: every point of the key goes first (stray chunks too).
    let state = if upsert.repair.rewrite {
        out.plan.delete_keys.push(key.clone());
        None
    } else {
        state
    };
    let stored_chunks = state.map_or(0, |s| s.chunks);
    if rendered.chunks.is_empty() {
        // Nothing to embed (providers refuse empty input): the points go, the row stays as a
        // marker that keeps its fields and position.
        out.empty.push(key.table.clone());
        out.plan
            .delete_points
            .extend((1..stored_chunks).map(|i| key.point_id(i)));
        let payload = empty_payload(meta, &fields, &hidden);
        if state.is_none_or(|s| s.payload != payload) {
            out.plan.markers.push(PayloadWrite {
                id: key.point_id(0),
                payload,
            });
        }
        return;
    }
    if rendered.truncated {
        out.truncated.push(key.table.clone());
    }
    let n = rendered.chunks.len();
    let commit = commit_payload(meta, &fields, &hidden, &rendered.chunks[0]);
    let unchanged = state.is_some_and(|s| {
        s.kind == StoredKind::Document
            && s.hash.as_deref() == Some(rendered.hash.as_str())
            && s.chunks == n
    });
    if unchanged {
        out.unchanged += 1;
        if state.is_none_or(|s| s.payload != commit) {
            out.plan.payload_updates.push(PayloadWrite {
                id: key.point_id(0),
                payload: commit,
            });
        }
        return;
    }
    out.plan
        .delete_points
        .extend((n..stored_chunks).map(|i| key.point_id(i)));
    for (i, text) in rendered.chunks.iter().enumerate().skip(1) {
        out.plan.upserts.push(PointWrite {
            id: key.point_id(i),
            text: text.clone(),
            payload: chunk_payload(key, i, n, &rendered.hash, text),
            origin: upsert.origin,
        });
    }
    commits.push(PointWrite {
        id: key.point_id(0),
        text: rendered.chunks[0].clone(),
        payload: commit,
        origin: upsert.origin,
    });
}

/// The connector whose position went backwards, when a stale `op` is newer by its
/// `source.ts_ms` than what the index holds (a replay or redelivery is older by both).
fn regressed(op: &Op, state: Option<&StoredState>) -> Option<String> {
    let state = state?;
    let stored = state.position.as_ref()?;
    let newer = matches!((op.source_ts_ms(), state.source_ts_ms), (Some(a), Some(b)) if a > b);
    (newer && op.position().is_some_and(|p| p.is_older_than(stored)))
        .then(|| stored.connector.clone())
}

fn not_newer(position: Option<&SourcePosition>, state: Option<&StoredState>) -> bool {
    match (position, state.and_then(|s| s.position.as_ref())) {
        (Some(p), Some(stored)) => p.compare(stored).is_some_and(|o| o.is_le()),
        _ => false,
    }
}

fn is_stale(position: Option<&SourcePosition>, state: Option<&StoredState>) -> bool {
    match (position, state.and_then(|s| s.position.as_ref())) {
        (Some(p), Some(stored)) => p.is_older_than(stored),
        _ => false,
    }
}
