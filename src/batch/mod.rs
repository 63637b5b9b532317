//! A batch of events → the writes that bring the index to the batch's final state.
//!
//! Two pure steps, both unit-tested without I/O:
//!
//! 1. [`coalesce`]: the batch's admitted events, in delivery order, become one operation per
//!    document key; the last op wins. An update that does not carry a TOASTed column takes
//!    the column's value from an earlier event of the same key in the batch (its *values*,
//!    never its rendered text). A create that was a primary-key change (`__debezium.oldkey`)
//!    deletes the old key and carries the old row's values over. A truncate drops every
//!    earlier op of its table and is written first, so ops that came after it still apply.
//!    Coalescing is recomputed from the admitted events whenever a delivery is taken out of
//!    the batch (it was dead-lettered): the key's other events then still apply.
//! 2. [`plan`]: against what the index holds ([`StoredState`]), drop stale events (older
//!    source position than the key's or the table's truncate), fill the columns an event did
//!    not send from the stored row, re-render the text, skip re-embedding when its hash is
//!    unchanged, and list the writes in commit order (chunk 0 last).

mod plan;

use std::collections::{BTreeSet, HashMap};

pub use plan::{PayloadWrite, PlanOutcome, PointWrite, Poisoned, Regression, WritePlan, plan};

use crate::model::{DocumentKey, Row, SourcePosition};

/// An event of the batch as the pipeline admitted it (decoded and mapped).
#[derive(Debug, Clone, PartialEq)]
pub enum Admitted {
    Upsert(Upsert),
    Delete(Delete),
    Truncate(Truncate),
}

impl Admitted {
    /// The batch index of the delivery behind this event.
    pub fn origin(&self) -> usize {
        match self {
            Admitted::Upsert(u) => u.origin,
            Admitted::Delete(d) => d.origin,
            Admitted::Truncate(t) => t.origin,
        }
    }
}

/// What `reconcile --repair` asks of an event it published (AMQP header `x-cdc-repair`, see
/// [`Repair::parse`]). Streamed events ask nothing: every flag is off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Repair {
    /// The event comes from `reconcile --repair` (flag `upsert`, or any other flag).
    pub from_reconcile: bool,
    /// Rewrite the whole document: every point of the key is deleted and every chunk written
    /// again, even when the text hash is unchanged (heals missing and stray chunks).
    pub rewrite: bool,
    /// Apply whatever position the index holds for the key, and store this event's: the stored
    /// positions are from before a database restore (`reconcile --repair --reset-positions`).
    pub reset_position: bool,
    /// A delete that applies only while the index holds exactly this event's position for its
    /// key: the orphan `reconcile` saw, with nothing written since. Its marker keeps that
    /// position, so a later re-insert of the key still applies.
    pub if_unchanged: bool,
}

impl Repair {
    /// Reads the header's comma-separated flags: `upsert`, `rewrite`, `reset-position`,
    /// `delete-if-unchanged`.
    pub fn parse(text: &str) -> Result<Repair, String> {
        let mut repair = Repair {
            from_reconcile: true,
            ..Repair::default()
        };
        for flag in text.split(',').map(str::trim).filter(|f| !f.is_empty()) {
            match flag {
                "upsert" => {}
                "rewrite" => repair.rewrite = true,
                "reset-position" => repair.reset_position = true,
                "delete-if-unchanged" => repair.if_unchanged = true,
                other => {
                    return Err(format!(
                        "header x-cdc-repair: unknown flag `{other}` (expected upsert, rewrite, reset-position, delete-if-unchanged)"
                    ));
                }
            }
        }
        Ok(repair)
    }

    /// The header value of these flags.
    pub fn header(&self) -> String {
        let mut flags = Vec::new();
        if self.rewrite {
            flags.push("rewrite");
        }
        if self.reset_position {
            flags.push("reset-position");
        }
        if self.if_unchanged {
            flags.push("delete-if-unchanged");
        }
        if flags.is_empty() {
            flags.push("upsert");
        }
        flags.join(",")
    }

    /// Flags of two events of one key coalesced into one op: what either asked for.
    fn merge(self, other: Repair) -> Repair {
        Repair {
            from_reconcile: self.from_reconcile || other.from_reconcile,
            rewrite: self.rewrite || other.rewrite,
            reset_position: self.reset_position || other.reset_position,
            if_unchanged: false,
        }
    }
}

/// Insert, update or snapshot read of a row.
#[derive(Debug, Clone, PartialEq)]
pub struct Upsert {
    pub key: DocumentKey,
    /// The row's kept columns (payload and template columns) as sent.
    pub values: Row,
    /// Columns not sent (unchanged TOAST): their values come from earlier in the batch, from
    /// the old key of a primary-key change, or from the index.
    pub unavailable: Vec<String>,
    /// A primary-key change: the key this row had before.
    pub moved_from: Option<DocumentKey>,
    pub position: Option<SourcePosition>,
    pub source_ts_ms: Option<i64>,
    pub origin: usize,
    pub repair: Repair,
}

/// Delete of a row.
#[derive(Debug, Clone, PartialEq)]
pub struct Delete {
    pub key: DocumentKey,
    /// The row moved to a new key (a primary-key change, `__debezium.newkey`): its marker keeps
    /// the row's values for the create that follows, in this batch or a later one.
    pub moved: bool,
    pub position: Option<SourcePosition>,
    pub source_ts_ms: Option<i64>,
    pub origin: usize,
    pub repair: Repair,
}

/// Truncate of a table.
#[derive(Debug, Clone, PartialEq)]
pub struct Truncate {
    pub table: String,
    pub position: Option<SourcePosition>,
    pub source_ts_ms: Option<i64>,
    pub origin: usize,
}

/// Where the values of columns an upsert did not send come from: first `values` (from
/// earlier events of the batch), then what the index holds for `from`.
#[derive(Debug, Clone, PartialEq)]
pub struct Carry {
    pub values: Row,
    pub from: DocumentKey,
}

/// One document-level operation after coalescing.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Upsert {
        upsert: Upsert,
        /// For `upsert.unavailable`: where their values come from (when not the index's
        /// state of `upsert.key` itself).
        carry: Option<Carry>,
    },
    Delete {
        delete: Delete,
        /// The row as it was before this delete, when the batch changed it (for a moved row).
        before: Option<Carry>,
    },
}

impl Op {
    pub fn key(&self) -> &DocumentKey {
        match self {
            Op::Upsert { upsert, .. } => &upsert.key,
            Op::Delete { delete, .. } => &delete.key,
        }
    }

    pub fn position(&self) -> Option<&SourcePosition> {
        match self {
            Op::Upsert { upsert, .. } => upsert.position.as_ref(),
            Op::Delete { delete, .. } => delete.position.as_ref(),
        }
    }

    pub fn origin(&self) -> usize {
        match self {
            Op::Upsert { upsert, .. } => upsert.origin,
            Op::Delete { delete, .. } => delete.origin,
        }
    }

    pub fn repair(&self) -> Repair {
        match self {
            Op::Upsert { upsert, .. } => upsert.repair,
            Op::Delete { delete, .. } => delete.repair,
        }
    }

    pub fn source_ts_ms(&self) -> Option<i64> {
        match self {
            Op::Upsert { upsert, .. } => upsert.source_ts_ms,
            Op::Delete { delete, .. } => delete.source_ts_ms,
        }
    }

    /// How to rebuild the row this op leaves (for a primary-key change that moves it).
    fn as_carry(&self) -> Carry {
        match self {
            Op::Upsert { upsert, carry } => {
                let mut values = carry.as_ref().map(|c| c.values.clone()).unwrap_or_default();
                for (k, v) in &upsert.values {
                    values.insert(k.clone(), v.clone());
                }
                Carry {
                    values,
                    from: carry
                        .as_ref()
                        .map_or_else(|| upsert.key.clone(), |c| c.from.clone()),
                }
            }
            Op::Delete { delete, before } => before.clone().unwrap_or_else(|| Carry {
                values: Row::new(),
                from: delete.key.clone(),
            }),
        }
    }
}

/// The truncates of a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct TruncateOp {
    pub table: String,
    pub position: Option<SourcePosition>,
    pub source_ts_ms: Option<i64>,
    pub origin: usize,
}

/// The coalesced content of a batch.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Coalesced {
    /// Tables truncated in this batch, in order.
    pub truncates: Vec<TruncateOp>,
    /// Per key, the op that wins, in first-seen order.
    pub ops: Vec<Op>,
    /// Events dropped because an event of the same key (or a truncate of its table) earlier
    /// in the batch is newer: (key or table marker, origin).
    pub stale: Vec<(DocumentKey, usize)>,
    index: HashMap<DocumentKey, usize>,
}

/// Coalesces `events` (in delivery order), leaving out the deliveries in `excluded`.
pub fn coalesce<'a>(
    events: impl IntoIterator<Item = &'a Admitted>,
    excluded: &BTreeSet<usize>,
) -> Coalesced {
    let mut c = Coalesced::default();
    for event in events {
        if excluded.contains(&event.origin()) {
            continue;
        }
        c.push(event.clone());
    }
    c
}

impl Coalesced {
    /// A batch of these ops only (keys distinct, no truncates): a piece of a batch being
    /// bisected.
    pub fn from_ops(ops: Vec<Op>) -> Coalesced {
        let mut c = Coalesced {
            ops,
            ..Coalesced::default()
        };
        c.reindex();
        c
    }

    /// A batch of one truncate.
    pub fn from_truncate(t: TruncateOp) -> Coalesced {
        Coalesced {
            truncates: vec![t],
            ..Coalesced::default()
        }
    }

    /// Adds the next event (in delivery order).
    pub fn push(&mut self, event: Admitted) {
        match event {
            Admitted::Truncate(t) => self.truncate(t),
            Admitted::Upsert(u) => self.upsert(u),
            Admitted::Delete(d) => self.delete(d),
        }
    }

    fn truncate(&mut self, t: Truncate) {
        if let Some(earlier) = self.truncates.iter().find(|e| e.table == t.table)
            && older(t.position.as_ref(), earlier.position.as_ref())
        {
            self.stale
                .push((DocumentKey::table_marker(&t.table), t.origin));
            return;
        }
        // Ops of the table that are newer than the truncate (a replayed old truncate) stay.
        let table = t.table.clone();
        let position = t.position.clone();
        self.ops
            .retain(|op| op.key().table != table || older(position.as_ref(), op.position()));
        self.reindex();
        self.truncates.retain(|e| e.table != table);
        self.truncates.push(TruncateOp {
            table,
            position,
            source_ts_ms: t.source_ts_ms,
            origin: t.origin,
        });
    }

    fn upsert(&mut self, mut upsert: Upsert) {
        if self.is_stale(&upsert.key, upsert.position.as_ref(), upsert.origin) {
            return;
        }
        // A primary-key change: the old row's values come along, and the old key goes.
        let mut carry = upsert.moved_from.as_ref().map(|from| match self.op(from) {
            Some(op) => op.as_carry(),
            None => Carry {
                values: Row::new(),
                from: from.clone(),
            },
        });
        if let Some(from) = upsert.moved_from.clone() {
            self.delete(Delete {
                key: from,
                moved: false,
                position: upsert.position.clone(),
                source_ts_ms: upsert.source_ts_ms,
                origin: upsert.origin,
                repair: Repair::default(),
            });
        }
        match self.index.get(&upsert.key).copied() {
            Some(i) => {
                if let Op::Upsert {
                    upsert: earlier,
                    carry: earlier_carry,
                } = &self.ops[i]
                {
                    // The earlier event of this key in the batch holds the values not sent.
                    upsert
                        .unavailable
                        .retain(|column| match earlier.values.get(column) {
                            Some(v) => {
                                upsert.values.insert(column.clone(), v.clone());
                                false
                            }
                            None => true,
                        });
                    if carry.is_none() {
                        carry = earlier_carry.clone();
                    }
                    upsert.repair = upsert.repair.merge(earlier.repair);
                }
                self.ops[i] = Op::Upsert { upsert, carry };
            }
            None => {
                self.index.insert(upsert.key.clone(), self.ops.len());
                self.ops.push(Op::Upsert { upsert, carry });
            }
        }
    }

    fn delete(&mut self, delete: Delete) {
        if self.is_stale(&delete.key, delete.position.as_ref(), delete.origin) {
            return;
        }
        // A conditional delete (an orphan reconcile saw) after another event of its key in
        // this batch: that event is what the index will hold, so the condition is about it.
        if delete.repair.if_unchanged
            && let Some(op) = self.op(&delete.key)
            && op.position() != delete.position.as_ref()
        {
            self.stale.push((delete.key.clone(), delete.origin));
            return;
        }
        match self.index.get(&delete.key).copied() {
            Some(i) => {
                let before = Some(self.ops[i].as_carry());
                let moved =
                    delete.moved || matches!(&self.ops[i], Op::Delete { delete: d, .. } if d.moved);
                self.ops[i] = Op::Delete {
                    delete: Delete { moved, ..delete },
                    before,
                };
            }
            None => {
                self.index.insert(delete.key.clone(), self.ops.len());
                self.ops.push(Op::Delete {
                    delete,
                    before: None,
                });
            }
        }
    }

    /// An event older than what the batch already holds for its key, or than a truncate of
    /// its table earlier in the batch, changes nothing (a redelivery or a replay).
    fn is_stale(
        &mut self,
        key: &DocumentKey,
        position: Option<&SourcePosition>,
        origin: usize,
    ) -> bool {
        let behind_key = self
            .op(key)
            .is_some_and(|op| older(position, op.position()));
        let behind_truncate = self
            .truncates
            .iter()
            .any(|t| t.table == key.table && older(position, t.position.as_ref()));
        if behind_key || behind_truncate {
            self.stale.push((key.clone(), origin));
        }
        behind_key || behind_truncate
    }

    fn op(&self, key: &DocumentKey) -> Option<&Op> {
        self.index.get(key).map(|&i| &self.ops[i])
    }

    fn reindex(&mut self) {
        self.index = self
            .ops
            .iter()
            .enumerate()
            .map(|(i, op)| (op.key().clone(), i))
            .collect();
    }

    pub fn is_empty(&self) -> bool {
        self.truncates.is_empty() && self.ops.is_empty()
    }

    /// Every key whose stored state planning needs: the ops' keys, the keys rows moved from,
    /// and the truncate markers of their tables.
    pub fn keys_to_read(&self) -> Vec<DocumentKey> {
        let mut keys: BTreeSet<DocumentKey> = BTreeSet::new();
        for op in &self.ops {
            keys.insert(op.key().clone());
            keys.insert(DocumentKey::table_marker(&op.key().table));
            let from = match op {
                Op::Upsert { carry, .. } => carry.as_ref().map(|c| &c.from),
                Op::Delete { before, .. } => before.as_ref().map(|c| &c.from),
            };
            if let Some(from) = from {
                keys.insert(from.clone());
            }
        }
        for t in &self.truncates {
            keys.insert(DocumentKey::table_marker(&t.table));
        }
        keys.into_iter().collect()
    }
}

/// `a` is known to be older than `b`.
fn older(a: Option<&SourcePosition>, b: Option<&SourcePosition>) -> bool {
    matches!((a, b), (Some(a), Some(b)) if a.is_older_than(b))
}

/// Splits consecutive items of the given sizes into ranges of at most `max_items` items and
/// `max_size` in total (an item larger than that goes alone): how the sinks and the HTTP
/// embedder cut a batch into requests.
pub fn split_ranges(
    sizes: &[usize],
    max_items: usize,
    max_size: usize,
) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut total) = (0, 0);
    for (i, &size) in sizes.iter().enumerate() {
        if i > start && (i - start == max_items || total + size > max_size) {
            out.push(start..i);
            (start, total) = (i, 0);
        }
        total += size;
    }
    if start < sizes.len() {
        out.push(start..sizes.len());
    }
    out
}

#[cfg(test)]
mod tests;
