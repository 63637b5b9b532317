//! Judging one key: is what the index holds what the pipeline would write for the source row?
//!
//! "Equal" is decided by the pipeline's own planner: the row, as an upsert carrying the
//! stored position, is planned against the stored state ([`crate::batch::plan`]). When the
//! plan writes nothing, template, chunking, hash, payload fields and hidden template columns
//! all agree, by the very code that wrote them. On top of what planning looks at (chunk 0),
//! the points of the document are checked against its commit record: chunks `1..n` present,
//! of its hash, and no point beyond them.
//!
//! Pure functions over plain data, unit-tested without I/O.

use std::collections::HashMap;

use crate::batch::{Coalesced, Op, Repair, Upsert, plan};
use crate::mapping::CompiledRule;
use crate::model::{DocumentKey, PositionAt, Row, SourcePosition};
use crate::sink::ScannedPoint;
use crate::stored::{StoredKind, StoredState};

/// What reconcile concludes about one key.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// The index holds what the pipeline would write.
    Ok,
    /// The index holds a change newer than the snapshot: nothing to judge (counted as ok).
    Ahead,
    /// A row without a document (or with a delete marker).
    Missing,
    /// A document that differs from its row; `rewrite` when its chunks themselves are damaged
    /// (missing, of another version, or stray points beyond the count); `reset` when its
    /// position is ahead of the source database's WAL (it comes from another database: a
    /// restore, a failover), which the stale guard would let win over every new change.
    Stale {
        reason: String,
        rewrite: bool,
        reset: bool,
    },
}

/// Where the source database's WAL stood for a judgement: at the snapshot, and after the
/// index was read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Wal {
    pub snapshot: Option<u64>,
    pub now: Option<u64>,
}

fn lsn_of(position: Option<&SourcePosition>) -> Option<u64> {
    match position {
        Some(SourcePosition {
            at: PositionAt::Lsn(p),
            ..
        }) => Some(*p),
        _ => None,
    }
}

/// Is the stored `position` at or after the snapshot's WAL position, and not beyond where the
/// WAL is now (a change committed since the snapshot)?
pub fn is_ahead(position: Option<&SourcePosition>, wal: Wal) -> bool {
    matches!((lsn_of(position), wal.snapshot), (Some(p), Some(s)) if p >= s && !is_future(position, wal))
}

/// Is the stored `position` beyond anything this database has written?
pub fn is_future(position: Option<&SourcePosition>, wal: Wal) -> bool {
    matches!((lsn_of(position), wal.now), (Some(p), Some(now)) if p > now)
}

/// Judges the source row `values` (the columns the rule keeps) of `key` against the index:
/// its chunk-0 `state` and every point of the document (`points`, from a scan of its key).
pub fn judge(
    rule: &CompiledRule,
    key: &DocumentKey,
    values: &Row,
    state: Option<&StoredState>,
    points: &[ScannedPoint],
    wal: Wal,
) -> Verdict {
    if let Some(s) = state {
        if is_future(s.position.as_ref(), wal) {
            return Verdict::Stale {
                reason: format!(
                    "stored position {} is ahead of the source database's WAL ({}): it comes from another database (a restore, a failover?) and would win over every new change",
                    lsn_of(s.position.as_ref()).unwrap_or_default(),
                    wal.now.unwrap_or_default()
                ),
                rewrite: false,
                reset: true,
            };
        }
        if is_ahead(s.position.as_ref(), wal) {
            return Verdict::Ahead;
        }
    }
    let Some(state) = state.filter(|s| s.kind != StoredKind::Deleted) else {
        return Verdict::Missing;
    };
    let upsert = Upsert {
        key: key.clone(),
        values: rule.kept(values.clone()),
        unavailable: Vec::new(),
        moved_from: None,
        position: state.position.clone(),
        source_ts_ms: state.source_ts_ms,
        origin: 0,
        repair: Repair::default(),
    };
    let batch = Coalesced::from_ops(vec![Op::Upsert {
        upsert,
        carry: None,
    }]);
    let rules = HashMap::from([(key.table.clone(), rule.clone())]);
    let stored = HashMap::from([(key.clone(), state.clone())]);
    let outcome = plan(&batch, &stored, &rules);
    if let Some(p) = outcome.poison.first() {
        return Verdict::Stale {
            reason: format!("the row cannot be mapped: {}", p.reason),
            rewrite: false,
            reset: false,
        };
    }
    if !outcome.plan.is_empty() {
        return Verdict::Stale {
            reason: difference(rule, values, state),
            rewrite: false,
            reset: false,
        };
    }
    match damaged_chunks(state, points) {
        Some(reason) => Verdict::Stale {
            reason,
            rewrite: true,
            reset: false,
        },
        None => Verdict::Ok,
    }
}

/// Says what differs between the row and chunk 0 (for people; the verdict is the plan's).
fn difference(rule: &CompiledRule, values: &Row, state: &StoredState) -> String {
    let values = rule.kept(values.clone());
    let Ok(rendered) = rule.render(&values) else {
        return "the text does not render".into();
    };
    if rendered.chunks.is_empty() != (state.kind == StoredKind::Empty) {
        return if rendered.chunks.is_empty() {
            "the text is now empty".into()
        } else {
            "the text is no longer empty".into()
        };
    }
    if state.hash.as_deref() != Some(rendered.hash.as_str()) {
        return "text differs (hash)".into();
    }
    if state.kind == StoredKind::Document && state.chunks != rendered.chunks.len() {
        return format!(
            "chunk count differs ({} stored, {} now)",
            state.chunks,
            rendered.chunks.len()
        );
    }
    let mut fields: Vec<String> = Vec::new();
    let stored_fields: Row = state
        .payload
        .iter()
        .filter(|(k, _)| crate::mapping::column_of_payload_key(k).is_some())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let now = rule.payload_fields(&values);
    for (k, v) in &now {
        if stored_fields.get(k) != Some(v) {
            fields.push(k.clone());
        }
    }
    for k in stored_fields.keys() {
        if !now.contains_key(k) {
            fields.push(k.clone());
        }
    }
    if fields.is_empty() {
        "stored metadata differs (hidden template columns or chunk text)".into()
    } else {
        fields.sort();
        format!("payload fields differ: {}", fields.join(", "))
    }
}

/// Checks a document's points against its commit record: chunks `1..n` present once each,
/// all of its hash, nothing beyond. `None` when whole.
fn damaged_chunks(state: &StoredState, points: &[ScannedPoint]) -> Option<String> {
    let n = state.chunks as u64;
    let mut seen = vec![false; state.chunks.max(1)];
    let mut problems = Vec::new();
    for p in points.iter().filter(|p| p.chunk > 0) {
        if p.chunk >= n.max(1) {
            problems.push(format!("stray chunk {}", p.chunk));
        } else if p.hash != state.hash {
            problems.push(format!("chunk {} is of another version", p.chunk));
        } else {
            seen[p.chunk as usize] = true;
        }
    }
    for (i, present) in seen.iter().enumerate().skip(1) {
        if !present {
            problems.push(format!("chunk {i} missing"));
        }
    }
    if problems.is_empty() {
        None
    } else {
        problems.sort();
        problems.dedup();
        Some(format!("chunks damaged: {}", problems.join(", ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TableRule;
    use crate::stored::{CommitMeta, chunk_payload, commit_payload, deleted_payload, stored_state};
    use serde_json::json;

    const T: &str = "public.t";

    fn rule() -> CompiledRule {
        CompiledRule::new(&TableRule {
            table: T.into(),
            id_columns: vec!["id".into()],
            text: "{name} {body}".into(),
            include: vec![],
            exclude: vec!["body".into()],
            chunk_size: 20,
            chunk_overlap: 0,
            max_chunks: 100,
        })
        .expect("rule")
    }

    fn key() -> DocumentKey {
        DocumentKey {
            table: T.into(),
            key: r#"{"id":1}"#.into(),
        }
    }

    fn row(v: serde_json::Value) -> Row {
        v.as_object().cloned().unwrap_or_default()
    }

    fn lsn(n: u64) -> SourcePosition {
        SourcePosition {
            connector: "dbserver1".into(),
            at: PositionAt::Lsn(n),
        }
    }

    /// What the pipeline stores for `values`: chunk 0's state and every point.
    fn stored(values: &Row, at: u64) -> (StoredState, Vec<ScannedPoint>) {
        let r = rule();
        let rendered = r.render(values).expect("render");
        let position = lsn(at);
        let n = rendered.chunks.len();
        let meta = CommitMeta {
            key: &key(),
            chunks: n,
            hash: Some(&rendered.hash),
            position: Some(&position),
            source_ts_ms: Some(1),
        };
        let chunk0 = commit_payload(
            meta,
            &r.payload_fields(values),
            &r.hidden_fields(values),
            &rendered.chunks[0],
        );
        let mut points = vec![ScannedPoint::from_payload("0".into(), &chunk0).expect("p")];
        for (i, text) in rendered.chunks.iter().enumerate().skip(1) {
            let p = chunk_payload(&key(), i, n, &rendered.hash, text);
            points.push(ScannedPoint::from_payload(i.to_string(), &p).expect("p"));
        }
        (stored_state(&chunk0).expect("state"), points)
    }

    fn values() -> Row {
        row(json!({"id": 1, "name": "tent", "body": "a light tent for two people", "note": null}))
    }

    fn verdict(values: &Row, state: Option<&StoredState>, points: &[ScannedPoint]) -> Verdict {
        let wal = Wal {
            snapshot: Some(1_000),
            now: Some(10_000),
        };
        judge(&rule(), &key(), values, state, points, wal)
    }

    #[test]
    fn what_the_pipeline_wrote_is_ok() {
        let (state, points) = stored(&values(), 10);
        assert!(points.len() > 1, "a document of several chunks");
        assert_eq!(verdict(&values(), Some(&state), &points), Verdict::Ok);
    }

    #[test]
    fn no_document_or_a_delete_marker_is_missing() {
        assert_eq!(verdict(&values(), None, &[]), Verdict::Missing);
        let marker = stored_state(&deleted_payload(&key(), Some(&lsn(9)), None, None)).expect("m");
        assert_eq!(verdict(&values(), Some(&marker), &[]), Verdict::Missing);
    }

    #[test]
    fn a_changed_text_field_or_null_is_stale() {
        let (state, points) = stored(&values(), 10);
        let mut changed = values();
        changed.insert("body".into(), json!("now a heavy tent"));
        assert!(matches!(
            verdict(&changed, Some(&state), &points),
            Verdict::Stale { rewrite: false, ref reason, .. } if reason.contains("hash")
        ));
        let mut field = values();
        field.insert("note".into(), json!("a note"));
        assert_eq!(
            verdict(&field, Some(&state), &points),
            Verdict::Stale {
                reason: "payload fields differ: note".into(),
                rewrite: false,
                reset: false,
            }
        );
        let mut gone = values();
        gone.remove("note");
        assert!(matches!(
            verdict(&gone, Some(&state), &points),
            Verdict::Stale { .. }
        ));
    }

    #[test]
    fn damaged_chunks_are_stale_and_ask_for_a_rewrite() {
        let (state, points) = stored(&values(), 10);
        let without_1: Vec<ScannedPoint> =
            points.iter().filter(|p| p.chunk != 1).cloned().collect();
        let mut stray = points.clone();
        let mut extra = points[1].clone();
        extra.chunk = 9;
        stray.push(extra);
        let mut other = points.clone();
        other[1].hash = Some("another".into());
        for (points, what) in [
            (without_1, "chunk 1 missing"),
            (stray, "stray chunk 9"),
            (other, "chunk 1 is of another version"),
        ] {
            match verdict(&values(), Some(&state), &points) {
                Verdict::Stale {
                    reason, rewrite, ..
                } => {
                    assert!(rewrite);
                    assert!(reason.contains(what), "{reason}");
                }
                v => panic!("{what}: {v:?}"),
            }
        }
    }

    #[test]
    fn a_change_newer_than_the_snapshot_is_not_judged() {
        let (state, points) = stored(&values(), 5_000);
        let mut changed = values();
        changed.insert("name".into(), json!("the snapshot's older value"));
        assert_eq!(verdict(&changed, Some(&state), &points), Verdict::Ahead);
    }

    #[test]
    fn a_position_beyond_the_databases_wal_is_stale_and_asks_for_a_reset() {
        let (state, points) = stored(&values(), 1 << 40);
        assert!(matches!(
            verdict(&values(), Some(&state), &points),
            Verdict::Stale {
                reset: true,
                rewrite: false,
                ..
            }
        ));
    }
}
