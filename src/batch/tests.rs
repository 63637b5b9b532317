//! Coalescing and planning, against an in-memory model of the index (`Store`): a map of
//! point id → (payload, has a vector), applied in the plan's order exactly as the sinks do.

use std::collections::BTreeSet;

use serde_json::{Value, json};

use super::*;
use crate::config::TableRule;
use crate::mapping::{CompiledRule, text_hash};
use crate::model::PositionAt;
use crate::stored::{StoredKind, StoredState, stored_state};

const T: &str = "public.products";

fn key(id: i64) -> DocumentKey {
    DocumentKey {
        table: T.into(),
        key: format!("{{\"id\":{id}}}"),
    }
}

fn pos(lsn: u64) -> Option<SourcePosition> {
    Some(SourcePosition {
        connector: "dbserver1".into(),
        at: PositionAt::Lsn(lsn),
    })
}

fn row(v: Value) -> Row {
    v.as_object().cloned().unwrap_or_default()
}

/// `{name}\n\n{body}`, chunks of 20 characters; `secret` is a template column kept out of
/// the payload.
fn rules() -> HashMap<String, CompiledRule> {
    rules_with(vec!["secret".into()], 100)
}

fn rules_with(exclude: Vec<String>, max_chunks: usize) -> HashMap<String, CompiledRule> {
    let rule = CompiledRule::new(&TableRule {
        table: T.into(),
        id_columns: vec!["id".into()],
        text: "{name} {body} {secret}".into(),
        include: vec![],
        exclude,
        chunk_size: 20,
        chunk_overlap: 5,
        max_chunks,
    })
    .expect("rule");
    HashMap::from([(T.to_string(), rule)])
}

fn upsert_values(
    id: i64,
    values: Value,
    unavailable: &[&str],
    lsn: u64,
    origin: usize,
) -> Admitted {
    let mut values = row(values);
    values.insert("id".into(), json!(id));
    Admitted::Upsert(Upsert {
        key: key(id),
        values,
        unavailable: unavailable.iter().map(|s| s.to_string()).collect(),
        moved_from: None,
        position: pos(lsn),
        source_ts_ms: Some(1),
        origin,
        repair: Repair::default(),
    })
}

fn upsert(id: i64, name: &str, lsn: u64, origin: usize) -> Admitted {
    upsert_values(
        id,
        json!({"name": name, "body": "", "secret": ""}),
        &[],
        lsn,
        origin,
    )
}

fn delete(id: i64, lsn: u64, origin: usize) -> Admitted {
    Admitted::Delete(Delete {
        key: key(id),
        moved: false,
        position: pos(lsn),
        source_ts_ms: None,
        origin,
        repair: Repair::default(),
    })
}

fn truncate(lsn: u64, origin: usize) -> Admitted {
    Admitted::Truncate(Truncate {
        table: T.into(),
        position: pos(lsn),
        source_ts_ms: None,
        origin,
    })
}

fn coalesced(events: &[Admitted]) -> Coalesced {
    coalesce(events, &BTreeSet::new())
}

/// The index, modelled: point id → (payload, has a vector).
#[derive(Default, Clone, Debug, PartialEq)]
struct Store {
    points: HashMap<uuid::Uuid, (Row, bool)>,
}

impl Store {
    fn states(&self, keys: &[DocumentKey]) -> HashMap<DocumentKey, StoredState> {
        keys.iter()
            .filter_map(|k| {
                let (payload, _) = self.points.get(&k.point_id(0))?;
                Some((k.clone(), stored_state(payload)?))
            })
            .collect()
    }

    /// The plan's writes as elementary steps, in the order every sink applies them.
    fn steps(plan: &WritePlan) -> Vec<Step> {
        let mut steps = Vec::new();
        for t in &plan.truncate_tables {
            steps.push(Step::DeleteTable(t.clone()));
        }
        for m in &plan.table_markers {
            steps.push(Step::Put(m.id, m.payload.clone(), false));
        }
        for k in &plan.delete_keys {
            steps.push(Step::DeleteKey(k.clone()));
        }
        for id in &plan.delete_points {
            steps.push(Step::Delete(*id));
        }
        for m in &plan.markers {
            steps.push(Step::Put(m.id, m.payload.clone(), false));
        }
        for u in &plan.upserts {
            steps.push(Step::Put(u.id, u.payload.clone(), true));
        }
        for u in &plan.payload_updates {
            steps.push(Step::Payload(u.id, u.payload.clone()));
        }
        steps
    }

    fn apply(&mut self, steps: &[Step]) {
        for step in steps {
            match step {
                Step::DeleteTable(t) => self
                    .points
                    .retain(|_, (p, _)| p["_cdc"]["table"] != json!(t)),
                Step::DeleteKey(k) => self.points.retain(|_, (p, _)| {
                    !(p["_cdc"]["table"] == json!(k.table) && p["_cdc"]["key"] == json!(k.key))
                }),
                Step::Delete(id) => {
                    self.points.remove(id);
                }
                Step::Put(id, payload, vector) => {
                    self.points.insert(*id, (payload.clone(), *vector));
                }
                // An overwrite of a missing point fails in a real index: nothing happens.
                Step::Payload(id, payload) => {
                    if let Some(point) = self.points.get_mut(id) {
                        point.0 = payload.clone();
                    }
                }
            }
        }
    }

    /// Plans `events` against the store and applies the whole plan.
    fn run(&mut self, events: &[Admitted]) -> PlanOutcome {
        let c = coalesced(events);
        let out = plan(&c, &self.states(&c.keys_to_read()), &rules());
        self.apply(&Store::steps(&out.plan));
        out
    }

    /// The searchable document of `id`: its chunks' texts in order, and chunk 0's payload.
    fn document(&self, id: i64) -> Option<(Vec<String>, Row)> {
        let k = key(id);
        let (chunk0, vector) = self.points.get(&k.point_id(0))?;
        if !vector {
            return None;
        }
        let n = chunk0["_cdc"]["chunks"].as_u64()? as usize;
        let mut texts = Vec::new();
        for i in 0..n {
            let (p, _) = self.points.get(&k.point_id(i))?;
            assert_eq!(
                p["_cdc"]["hash"], chunk0["_cdc"]["hash"],
                "chunk {i} of {k} is of another version"
            );
            texts.push(p["text"].as_str()?.to_string());
        }
        Some((texts, chunk0.clone()))
    }

    fn points_of(&self, id: i64) -> usize {
        let k = key(id);
        self.points
            .values()
            .filter(|(p, v)| *v && p["_cdc"]["key"] == json!(k.key))
            .count()
    }
}

#[derive(Debug, Clone)]
enum Step {
    DeleteTable(String),
    DeleteKey(DocumentKey),
    Delete(uuid::Uuid),
    Put(uuid::Uuid, Row, bool),
    Payload(uuid::Uuid, Row),
}

fn text_of(store: &Store, id: i64) -> String {
    let (texts, _) = store.document(id).expect("document");
    texts.join("|")
}

#[test]
fn delete_after_upsert_in_one_batch_deletes() {
    let mut s = Store::default();
    let out = s.run(&[upsert(1, "tent", 10, 0), delete(1, 11, 1)]);
    assert_eq!(out.plan.delete_keys, vec![key(1)]);
    assert!(out.plan.upserts.is_empty());
    assert!(s.document(1).is_none());
}

#[test]
fn upsert_after_delete_in_one_batch_upserts() {
    let mut s = Store::default();
    s.run(&[delete(1, 10, 0), upsert(1, "tent", 11, 1)]);
    assert_eq!(text_of(&s, 1), "tent");
}

#[test]
fn repeated_updates_keep_the_last() {
    let mut s = Store::default();
    s.run(&[
        upsert(1, "a", 1, 0),
        upsert(2, "b", 2, 1),
        upsert(1, "c", 3, 2),
        upsert(1, "d", 4, 3),
    ]);
    assert_eq!(text_of(&s, 1), "d");
    assert_eq!(text_of(&s, 2), "b");
    let (_, chunk0) = s.document(1).expect("doc");
    assert_eq!(chunk0["_cdc"]["position"]["lsn"], json!(4));
}

#[test]
fn an_older_event_behind_a_newer_one_in_the_batch_is_stale() {
    let mut s = Store::default();
    let out = s.run(&[upsert(1, "new", 9, 0), upsert(1, "old replay", 4, 1)]);
    assert_eq!(text_of(&s, 1), "new");
    assert_eq!(out.stale, vec![(key(1), 1)]);
}

#[test]
fn stale_events_are_skipped_and_equal_positions_are_not() {
    let mut s = Store::default();
    s.run(&[upsert(1, "v9", 9, 0), upsert(2, "v9", 9, 1)]);
    let out = s.run(&[upsert(1, "old", 5, 0), delete(2, 5, 1)]);
    assert!(out.plan.is_empty(), "{:?}", out.plan);
    assert_eq!(out.stale, vec![(key(1), 0), (key(2), 1)]);
    let out = s.run(&[upsert(1, "same position", 9, 0)]);
    assert!(out.stale.is_empty());
    assert_eq!(text_of(&s, 1), "same position");
}

#[test]
fn truncate_drops_earlier_ops_of_its_table_only() {
    let other = Admitted::Delete(Delete {
        key: DocumentKey {
            table: "public.other".into(),
            key: "{\"id\":1}".into(),
        },
        moved: false,
        position: pos(2),
        source_ts_ms: None,
        origin: 1,
        repair: Repair::default(),
    });
    let c = coalesced(&[
        upsert(1, "a", 1, 0),
        other,
        truncate(3, 2),
        upsert(2, "b", 4, 3),
    ]);
    let out = plan(&c, &HashMap::new(), &rules());
    assert_eq!(out.plan.truncate_tables, vec![T.to_string()]);
    assert_eq!(out.plan.upserts.len(), 1);
    assert_eq!(out.plan.upserts[0].text, "b");
    assert_eq!(out.plan.delete_keys.len(), 1);
}

#[test]
fn a_truncate_leaves_a_table_position_so_older_replays_do_not_resurrect_rows() {
    let mut s = Store::default();
    s.run(&[upsert(1, "before the truncate", 10, 0)]);
    s.run(&[truncate(20, 0)]);
    assert!(s.document(1).is_none());
    // The create, replayed from the DLQ or redelivered after the truncate: stale.
    let out = s.run(&[
        upsert(1, "before the truncate", 10, 0),
        upsert(2, "also old", 15, 1),
    ]);
    assert_eq!(out.stale.len(), 2, "{:?}", out.plan);
    assert!(s.document(1).is_none() && s.document(2).is_none());
    // A create after the truncate is applied.
    s.run(&[upsert(3, "after", 25, 0)]);
    assert_eq!(text_of(&s, 3), "after");
    // A replay of the truncate itself changes nothing.
    let out = s.run(&[truncate(20, 0)]);
    assert!(out.plan.truncate_tables.is_empty());
    assert_eq!(text_of(&s, 3), "after");
}

#[test]
fn shrinking_document_deletes_surplus_chunks() {
    let mut s = Store::default();
    s.run(&[upsert(
        1,
        "one two three four five six seven eight nine ten eleven twelve",
        1,
        0,
    )]);
    assert!(s.points_of(1) > 2);
    s.run(&[upsert(1, "short", 5, 0)]);
    assert_eq!(s.points_of(1), 1);
    assert_eq!(text_of(&s, 1), "short");
}

#[test]
fn unchanged_text_updates_chunk_zero_only_and_keeps_nulls() {
    let mut s = Store::default();
    let long = json!({"name": "a name long enough for two chunks", "body": "b", "secret": "s", "price": 1});
    s.run(&[upsert_values(1, long, &[], 3, 0)]);
    let changed = json!({"name": "a name long enough for two chunks", "body": "b", "secret": "s", "price": null});
    let out = s.run(&[upsert_values(1, changed, &[], 7, 0)]);
    assert!(out.plan.upserts.is_empty());
    assert_eq!(out.unchanged, 1);
    assert_eq!(
        out.plan.payload_updates.len(),
        1,
        "only chunk 0 carries fields"
    );
    let (_, chunk0) = s.document(1).expect("doc");
    assert_eq!(chunk0.get("price"), Some(&Value::Null), "nulls are values");
    assert_eq!(chunk0["_cdc"]["position"]["lsn"], json!(7));
    // The same event again writes nothing at all.
    let out = s.run(&[upsert_values(
        1,
        json!({"name": "a name long enough for two chunks", "body": "b", "secret": "s", "price": null}),
        &[],
        7,
        0,
    )]);
    assert!(out.plan.is_empty(), "{:?}", out.plan);
}

#[test]
fn row_fields_are_stored_once_per_document() {
    let mut s = Store::default();
    s.run(&[upsert_values(
        1,
        json!({"name": "a long name that makes several chunks of text", "body": "x", "secret": "s", "price": 5}),
        &[],
        1,
        0,
    )]);
    let k = key(1);
    let (chunk1, _) = s.points.get(&k.point_id(1)).expect("chunk 1");
    assert!(
        chunk1.get("price").is_none() && chunk1.get("name").is_none(),
        "{chunk1:?}"
    );
    let (chunk0, _) = s.points.get(&k.point_id(0)).expect("chunk 0");
    assert_eq!(chunk0["price"], json!(5));
    assert!(chunk0.get("secret").is_none(), "excluded from the payload");
    assert_eq!(
        chunk0["_cdc"]["hidden"]["secret"],
        json!("s"),
        "but kept for re-rendering"
    );
}

#[test]
fn toast_placeholder_with_changed_status_re_renders_text() {
    // `{name} {body} {secret}` where body is TOASTed: an update of `name` alone.
    let mut s = Store::default();
    s.run(&[upsert_values(
        1,
        json!({"name": "new", "body": "big text", "secret": "s"}),
        &[],
        1,
        0,
    )]);
    s.run(&[upsert_values(
        1,
        json!({"name": "updated", "secret": "s"}),
        &["body"],
        2,
        0,
    )]);
    let (texts, chunk0) = s.document(1).expect("doc");
    assert_eq!(texts.join(" "), "updated big text s");
    assert_eq!(chunk0["name"], json!("updated"));
    assert_eq!(
        chunk0["body"],
        json!("big text"),
        "the stored value is kept"
    );
    assert_eq!(
        chunk0["_cdc"]["hash"],
        json!(text_hash("updated big text s"))
    );
}

#[test]
fn a_toasted_column_excluded_from_the_payload_still_re_renders() {
    let mut s = Store::default();
    s.run(&[upsert_values(
        1,
        json!({"name": "n1", "body": "b", "secret": "hidden value"}),
        &[],
        1,
        0,
    )]);
    s.run(&[upsert_values(
        1,
        json!({"name": "n2", "body": "b"}),
        &["secret"],
        2,
        0,
    )]);
    assert_eq!(text_of(&s, 1), "n2 b hidden value");
}

#[test]
fn in_batch_toast_merge_re_renders_instead_of_copying_the_earlier_text() {
    let mut s = Store::default();
    s.run(&[
        upsert_values(
            1,
            json!({"name": "first", "body": "big", "secret": "s"}),
            &[],
            1,
            0,
        ),
        upsert_values(1, json!({"name": "second", "secret": "s"}), &["body"], 2, 1),
    ]);
    assert_eq!(text_of(&s, 1), "second big s");
}

#[test]
fn a_toasted_column_with_nothing_stored_is_poison() {
    let mut s = Store::default();
    let out = s.run(&[upsert_values(
        1,
        json!({"name": "n", "secret": "s"}),
        &["body"],
        2,
        0,
    )]);
    assert_eq!(out.poison.len(), 1);
    assert_eq!(out.poison[0].kind, "toast-unavailable");
    assert!(
        out.poison[0].reason.contains("body"),
        "{}",
        out.poison[0].reason
    );
}

fn moved(
    id: i64,
    from: i64,
    values: Value,
    unavailable: &[&str],
    lsn: u64,
    origin: usize,
) -> Admitted {
    let Admitted::Upsert(mut u) = upsert_values(id, values, unavailable, lsn, origin) else {
        unreachable!()
    };
    u.moved_from = Some(key(from));
    Admitted::Upsert(u)
}

fn moved_delete(id: i64, lsn: u64, origin: usize) -> Admitted {
    Admitted::Delete(Delete {
        key: key(id),
        moved: true,
        position: pos(lsn),
        source_ts_ms: None,
        origin,
        repair: Repair::default(),
    })
}

#[test]
fn a_primary_key_change_of_a_toasted_row_keeps_the_document_whole_across_batches() {
    let mut s = Store::default();
    s.run(&[upsert_values(
        1001,
        json!({"name": "n", "body": "big text", "secret": "s"}),
        &[],
        1,
        0,
    )]);
    // UPDATE t SET id = 2001: d(1001) [+ tombstone] + c(2001) with placeholders, here split
    // over two batches.
    s.run(&[moved_delete(1001, 5, 0)]);
    assert!(s.document(1001).is_none());
    s.run(&[moved(
        2001,
        1001,
        json!({"name": "n"}),
        &["body", "secret"],
        5,
        0,
    )]);
    assert_eq!(text_of(&s, 2001), "n big text s");
}

#[test]
fn a_primary_key_change_in_one_batch_carries_the_row_over() {
    let mut s = Store::default();
    s.run(&[upsert_values(
        1001,
        json!({"name": "n", "body": "big text", "secret": "s"}),
        &[],
        1,
        0,
    )]);
    let out = s.run(&[
        upsert_values(
            1001,
            json!({"name": "renamed", "secret": "s"}),
            &["body"],
            4,
            0,
        ),
        moved_delete(1001, 5, 1),
        moved(
            2001,
            1001,
            json!({"name": "renamed"}),
            &["body", "secret"],
            5,
            2,
        ),
    ]);
    assert!(out.poison.is_empty(), "{:?}", out.poison);
    assert!(s.document(1001).is_none());
    assert_eq!(text_of(&s, 2001), "renamed big text s");
}

#[test]
fn a_create_with_an_old_key_deletes_the_old_key_without_its_delete_event() {
    // The unwrap SMT's default mode drops the delete of a primary-key change.
    let mut s = Store::default();
    s.run(&[upsert(1001, "old key", 1, 0)]);
    s.run(&[moved(
        2001,
        1001,
        json!({"name": "moved", "body": "", "secret": ""}),
        &[],
        5,
        0,
    )]);
    assert!(s.document(1001).is_none());
    assert_eq!(text_of(&s, 2001), "moved");
}

#[test]
fn chunk_zero_is_written_after_every_other_chunk_of_its_document() {
    let mut s = Store::default();
    let c = coalesced(&[upsert(
        1,
        "a text long enough to need several chunks here",
        1,
        0,
    )]);
    let out = plan(&c, &s.states(&c.keys_to_read()), &rules());
    let ids: Vec<uuid::Uuid> = out.plan.upserts.iter().map(|u| u.id).collect();
    assert!(ids.len() > 2);
    assert_eq!(ids.last(), Some(&key(1).point_id(0)));
    s.apply(&Store::steps(&out.plan));
}

#[test]
fn a_crash_between_any_two_writes_is_repaired_by_the_redelivery() {
    let v1 = "version one of a document with a text long enough for many chunks to be written";
    let v2 = "version two is a different text, also long enough to need several chunks written";
    let mut base = Store::default();
    base.run(&[upsert(1, v1, 1, 0), upsert(2, "another document", 1, 1)]);
    let batch = [upsert(1, v2, 2, 0), delete(2, 2, 1), upsert(3, v1, 2, 2)];
    let c = coalesced(&batch);
    let full = plan(&c, &base.states(&c.keys_to_read()), &rules());
    let steps = Store::steps(&full.plan);
    for crash_after in 0..steps.len() {
        let mut s = base.clone();
        s.apply(&steps[..crash_after]);
        // The redelivery plans against whatever the crash left.
        s.run(&batch);
        let (texts, chunk0) = s.document(1).expect("doc 1");
        assert!(
            texts[0].starts_with("version two"),
            "crash after {crash_after}"
        );
        assert_eq!(
            chunk0["_cdc"]["hash"],
            json!(text_hash(v2)),
            "crash after {crash_after}"
        );
        assert_eq!(
            texts.len(),
            chunk0["_cdc"]["chunks"].as_u64().unwrap_or(0) as usize
        );
        assert!(s.document(2).is_none(), "crash after {crash_after}");
        assert!(s.document(3).is_some(), "crash after {crash_after}");
    }
}

#[test]
fn without_a_dead_lettered_winner_the_keys_earlier_events_still_apply() {
    let events = [upsert(1, "valid", 1, 0), upsert(1, "the culprit", 2, 1)];
    let c = coalesce(&events, &BTreeSet::from([1]));
    let out = plan(&c, &HashMap::new(), &rules());
    assert_eq!(out.plan.upserts.len(), 1);
    assert_eq!(out.plan.upserts[0].text, "valid");
}

#[test]
fn an_empty_text_removes_the_points_and_keeps_a_marker() {
    let mut s = Store::default();
    s.run(&[upsert(1, "some text long enough for two chunks", 1, 0)]);
    let out = s.run(&[upsert_values(
        1,
        json!({"name": "", "body": "", "secret": "", "price": 3}),
        &[],
        2,
        0,
    )]);
    assert!(out.plan.upserts.is_empty());
    assert_eq!(out.empty, vec![T.to_string()]);
    assert_eq!(s.points_of(1), 0);
    let state = s.states(&[key(1)]).remove(&key(1)).expect("marker");
    assert_eq!(state.kind, StoredKind::Empty);
    assert_eq!(state.position, pos(2));
    assert_eq!(state.values["price"], json!(3));
    // Text again: written in full.
    s.run(&[upsert(1, "back", 3, 0)]);
    assert_eq!(text_of(&s, 1), "back");
}

#[test]
fn a_document_longer_than_max_chunks_is_indexed_by_its_first_chunks() {
    let rules = rules_with(vec![], 3);
    let c = coalesced(&[upsert(1, &"word ".repeat(200), 1, 0)]);
    let out = plan(&c, &HashMap::new(), &rules);
    assert_eq!(out.plan.upserts.len(), 3);
    assert_eq!(out.truncated, vec![T.to_string()]);
}

#[test]
fn columns_with_reserved_names_are_kept_under_escaped_keys() {
    let mut s = Store::default();
    s.run(&[upsert_values(
        1,
        json!({"name": "n", "body": "", "secret": "", "text": "a column called text", "doc_id": 7}),
        &[],
        1,
        0,
    )]);
    let (_, chunk0) = s.document(1).expect("doc");
    assert_eq!(chunk0["_col_text"], json!("a column called text"));
    assert_eq!(chunk0["_col_doc_id"], json!(7));
    assert_eq!(chunk0["text"], json!("n"));
    let state = s.states(&[key(1)]).remove(&key(1)).expect("state");
    assert_eq!(state.values["text"], json!("a column called text"));
}

#[test]
fn ranges_are_split_by_count_and_size() {
    assert_eq!(
        split_ranges(&[], 3, 100),
        Vec::<std::ops::Range<usize>>::new()
    );
    assert_eq!(split_ranges(&[1; 7], 3, 100), vec![0..3, 3..6, 6..7]);
    assert_eq!(split_ranges(&[40, 40, 40, 40], 10, 100), vec![0..2, 2..4]);
    // An item larger than the budget goes alone.
    assert_eq!(
        split_ranges(&[10, 500, 10], 10, 100),
        vec![0..1, 1..2, 2..3]
    );
}

/// Planning batch N+1 while batch N is still being written: against what the index held
/// before N, corrected by N's overlay, it must come to exactly the plan made after N.
#[test]
fn a_batch_planned_against_the_previous_writes_overlay_equals_one_planned_after_it() {
    let scenarios: Vec<(Vec<Admitted>, Vec<Admitted>)> = vec![
        // A key updated in consecutive batches.
        (
            vec![
                upsert(1, "first version of the text", 1, 0),
                upsert(2, "b", 1, 1),
            ],
            vec![
                upsert(1, "second version of the text", 2, 0),
                upsert(2, "b", 2, 1),
            ],
        ),
        // A delete between two upserts across the boundary.
        (
            vec![upsert(1, "a", 1, 0), delete(1, 2, 1)],
            vec![
                upsert(1, "old replay", 1, 0),
                upsert(1, "after the delete", 3, 1),
            ],
        ),
        (
            vec![delete(3, 5, 0)],
            vec![upsert(3, "back", 6, 0), delete(4, 6, 1)],
        ),
        // A truncate, then older and newer events of its table.
        (
            vec![truncate(10, 0)],
            vec![upsert(1, "older", 5, 0), upsert(2, "newer", 11, 1)],
        ),
        // A TOASTed column sent in N, not in N+1.
        (
            vec![upsert_values(
                5,
                json!({"name": "n", "body": "big", "secret": "s"}),
                &[],
                1,
                0,
            )],
            vec![upsert_values(
                5,
                json!({"name": "m", "secret": "s"}),
                &["body"],
                2,
                0,
            )],
        ),
        // A primary-key change across the boundary.
        (
            vec![moved_delete(6, 3, 0)],
            vec![moved(
                60,
                6,
                json!({"name": "moved"}),
                &["body", "secret"],
                3,
                0,
            )],
        ),
    ];
    for (i, (first, second)) in scenarios.into_iter().enumerate() {
        let mut before = Store::default();
        before.run(&[
            upsert(1, "stored text of one", 0, 0),
            upsert(2, "stored b", 0, 1),
            upsert(3, "stored three", 0, 2),
            upsert_values(
                6,
                json!({"name": "six", "body": "kept body", "secret": "s"}),
                &[],
                0,
                3,
            ),
        ]);
        let mut after = before.clone();
        after.run(&first);
        let c2 = coalesced(&second);
        let sequential = plan(&c2, &after.states(&c2.keys_to_read()), &rules());

        let c1 = coalesced(&first);
        let p1 = plan(&c1, &before.states(&c1.keys_to_read()), &rules()).plan;
        let vectors = vec![vec![0.5_f32; 4]; p1.upserts.len()];
        let overlay = crate::sink::Write::from_plan(p1, vectors).overlay();
        let keys = c2.keys_to_read();
        let mut states = before.states(&keys);
        overlay.apply(&keys, &mut states);
        let overlapped = plan(&c2, &states, &rules());
        assert_eq!(overlapped.plan, sequential.plan, "scenario {i}");
        assert_eq!(overlapped.stale, sequential.stale, "scenario {i}");
        assert_eq!(overlapped.poison, sequential.poison, "scenario {i}");
    }
}
fn with_repair(event: Admitted, flags: &str) -> Admitted {
    let repair = Repair::parse(flags).expect("flags");
    match event {
        Admitted::Upsert(u) => Admitted::Upsert(Upsert { repair, ..u }),
        Admitted::Delete(d) => Admitted::Delete(Delete { repair, ..d }),
        other => other,
    }
}

fn marker_position(store: &Store, id: i64) -> Option<SourcePosition> {
    let (payload, _) = store.points.get(&key(id).point_id(0))?;
    stored_state(payload)?.position
}

#[test]
fn repair_flags_read_back_from_their_header() {
    for text in [
        "upsert",
        "rewrite",
        "reset-position",
        "rewrite,reset-position",
        "delete-if-unchanged",
    ] {
        let r = Repair::parse(text).expect(text);
        assert!(r.from_reconcile);
        assert_eq!(Repair::parse(&r.header()).expect("again"), r, "{text}");
    }
    assert!(Repair::parse("sometimes").is_err());
}

#[test]
fn a_conditional_delete_removes_the_orphan_it_saw_and_keeps_its_position() {
    let mut s = Store::default();
    s.run(&[upsert(1, "orphan", 7, 0)]);
    let out = s.run(&[with_repair(delete(1, 7, 0), "delete-if-unchanged")]);
    assert!(out.stale.is_empty(), "{:?}", out.stale);
    assert!(s.document(1).is_none());
    assert_eq!(
        marker_position(&s, 1),
        pos(7),
        "the marker keeps what was seen"
    );
    // A later re-insert of the key still applies.
    s.run(&[upsert(1, "back", 8, 0)]);
    assert_eq!(text_of(&s, 1), "back");
}

#[test]
fn a_conditional_delete_leaves_a_document_written_since() {
    let mut s = Store::default();
    s.run(&[upsert(1, "orphan", 7, 0)]);
    s.run(&[upsert(1, "re-inserted", 9, 0)]);
    let out = s.run(&[with_repair(delete(1, 7, 0), "delete-if-unchanged")]);
    assert_eq!(out.stale, vec![(key(1), 0)]);
    assert_eq!(text_of(&s, 1), "re-inserted");
    // In one batch with the newer event before it, too.
    let mut s = Store::default();
    s.run(&[upsert(1, "orphan", 7, 0)]);
    let out = s.run(&[
        upsert(1, "re-inserted", 9, 0),
        with_repair(delete(1, 7, 1), "delete-if-unchanged"),
    ]);
    assert_eq!(out.stale, vec![(key(1), 1)]);
    assert_eq!(text_of(&s, 1), "re-inserted");
}

#[test]
fn a_rewrite_writes_every_chunk_again_and_removes_strays() {
    let mut s = Store::default();
    let long = "alpha beta gamma delta epsilon zeta";
    s.run(&[upsert(1, long, 5, 0)]);
    let (chunks, _) = s.document(1).expect("doc");
    assert!(chunks.len() > 1);
    // A stray point beyond the chunk count, and a lost middle chunk.
    let stray = key(1).point_id(7);
    s.points.insert(
        stray,
        (
            row(json!({"_cdc": {"table": T, "key": key(1).key, "chunk": 7}})),
            true,
        ),
    );
    s.points.remove(&key(1).point_id(1));
    let out = s.run(&[with_repair(upsert(1, long, 6, 0), "rewrite")]);
    assert_eq!(out.plan.delete_keys, vec![key(1)]);
    assert_eq!(
        out.plan.upserts.len(),
        chunks.len(),
        "every chunk re-embedded"
    );
    assert!(!s.points.contains_key(&stray));
    assert_eq!(s.document(1).expect("whole again").0, chunks);
    // Without the flag the same event is only a payload update: the damage would stay.
    let out = s.run(&[upsert(1, long, 7, 0)]);
    assert!(out.plan.upserts.is_empty());
}

#[test]
fn a_reset_position_repair_applies_over_a_newer_stored_position() {
    let mut s = Store::default();
    s.run(&[upsert(1, "before the restore", 9000, 0)]);
    let out = s.run(&[upsert(1, "after the restore", 100, 0)]);
    assert_eq!(out.stale, vec![(key(1), 0)], "the stale guard skips it");
    let out = s.run(&[with_repair(upsert(1, "repaired", 120, 0), "reset-position")]);
    assert!(out.stale.is_empty());
    assert_eq!(text_of(&s, 1), "repaired");
    assert_eq!(marker_position(&s, 1), pos(120));
    // From now on the new positions order the events again.
    assert_eq!(s.run(&[upsert(1, "older", 110, 0)]).stale.len(), 1);
    s.run(&[upsert(1, "newer", 130, 0)]);
    assert_eq!(text_of(&s, 1), "newer");
}

#[test]
fn an_older_position_with_a_later_timestamp_is_a_regression_a_replay_is_not() {
    let mut s = Store::default();
    let at = |id, name: &str, lsn, ts| {
        let Admitted::Upsert(u) = upsert(id, name, lsn, 0) else {
            unreachable!()
        };
        Admitted::Upsert(Upsert {
            source_ts_ms: Some(ts),
            ..u
        })
    };
    s.run(&[at(1, "v1", 500, 1_000)]);
    let replay = s.run(&[at(1, "v0", 400, 900)]);
    assert_eq!(replay.stale.len(), 1);
    assert!(replay.regressions.is_empty(), "a replay is older by both");
    let reset = s.run(&[at(1, "after restore", 40, 2_000)]);
    assert_eq!(reset.stale.len(), 1);
    assert_eq!(
        reset.regressions,
        vec![Regression {
            connector: "dbserver1".into(),
            key: key(1)
        }]
    );
}
