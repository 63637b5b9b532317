use serde_json::json;

use super::*;
use crate::mapping::{chunk_text, text_hash};
use crate::model::PositionAt;

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

fn doc(id: i64, text: &str) -> Document {
    Document {
        key: key(id),
        text: Some(text.into()),
        chunks: chunk_text(text, 20, 5),
        hash: Some(text_hash(text)),
        fields: json!({"id": id, "name": text})
            .as_object()
            .cloned()
            .unwrap_or_default(),
    }
}

fn upsert(id: i64, text: &str, lsn: u64, origin: usize) -> Planned {
    Planned::Upsert {
        doc: doc(id, text),
        unavailable: vec![],
        position: pos(lsn),
        source_ts_ms: Some(1),
        origin,
    }
}

fn delete(id: i64, lsn: u64, origin: usize) -> Planned {
    Planned::Delete {
        key: key(id),
        position: pos(lsn),
        origin,
    }
}

fn coalesce(ops: Vec<Planned>) -> Coalesced {
    let mut c = Coalesced::default();
    for op in ops {
        c.push(op);
    }
    c
}

#[test]
fn delete_after_upsert_in_one_batch_deletes() {
    let c = coalesce(vec![upsert(1, "tent", 10, 0), delete(1, 11, 1)]);
    let out = plan(&c, &HashMap::new());
    assert_eq!(out.plan.delete_keys, vec![key(1)]);
    assert!(out.plan.upserts.is_empty());
}

#[test]
fn upsert_after_delete_in_one_batch_upserts() {
    let c = coalesce(vec![delete(1, 10, 0), upsert(1, "tent", 11, 1)]);
    let out = plan(&c, &HashMap::new());
    assert!(out.plan.delete_keys.is_empty());
    assert_eq!(out.plan.upserts.len(), 1);
    assert_eq!(out.plan.upserts[0].text, "tent");
}

#[test]
fn repeated_updates_keep_the_last() {
    let c = coalesce(vec![
        upsert(1, "a", 1, 0),
        upsert(2, "b", 2, 1),
        upsert(1, "c", 3, 2),
        upsert(1, "d", 4, 3),
    ]);
    let out = plan(&c, &HashMap::new());
    let texts: Vec<&str> = out.plan.upserts.iter().map(|p| p.text.as_str()).collect();
    assert_eq!(texts, vec!["d", "b"]);
    assert_eq!(
        out.plan.upserts[0].payload["_cdc"]["position"]["lsn"],
        json!(4)
    );
}

#[test]
fn truncate_drops_earlier_ops_of_its_table_only() {
    let mut c = coalesce(vec![upsert(1, "a", 1, 0)]);
    c.push(Planned::Delete {
        key: DocumentKey {
            table: "public.other".into(),
            key: "{\"id\":1}".into(),
        },
        position: pos(2),
        origin: 1,
    });
    c.truncate(T);
    c.push(upsert(2, "b", 3, 2));
    let out = plan(&c, &HashMap::new());
    assert_eq!(out.plan.truncate_tables, vec![T.to_string()]);
    assert_eq!(out.plan.upserts.len(), 1);
    assert_eq!(out.plan.upserts[0].text, "b");
    assert_eq!(out.plan.delete_keys.len(), 1);
}

#[test]
fn shrinking_document_deletes_surplus_chunks() {
    let long = "one two three four five six seven eight nine ten eleven twelve";
    let c = coalesce(vec![upsert(1, "short", 5, 0)]);
    let stored = HashMap::from([(
        key(1),
        StoredState {
            deleted: false,
            hash: Some(text_hash(long)),
            position: pos(1),
            chunks: 4,
            fields: Row::new(),
        },
    )]);
    let out = plan(&c, &stored);
    assert_eq!(out.plan.upserts.len(), 1);
    assert_eq!(
        out.plan.delete_points,
        vec![key(1).point_id(1), key(1).point_id(2), key(1).point_id(3)]
    );
}

#[test]
fn stale_events_are_skipped() {
    let c = coalesce(vec![upsert(1, "old", 5, 0), delete(2, 5, 1)]);
    let newer = StoredState {
        deleted: false,
        hash: None,
        position: pos(9),
        chunks: 1,
        fields: Row::new(),
    };
    let stored = HashMap::from([(key(1), newer.clone()), (key(2), newer)]);
    let out = plan(&c, &stored);
    assert!(out.plan.is_empty(), "{:?}", out.plan);
    assert_eq!(out.stale, vec![(key(1), 0), (key(2), 1)]);
}

#[test]
fn equal_position_is_not_stale() {
    let c = coalesce(vec![upsert(1, "x", 5, 0)]);
    let stored = HashMap::from([(
        key(1),
        StoredState {
            deleted: false,
            hash: None,
            position: pos(5),
            chunks: 1,
            fields: Row::new(),
        },
    )]);
    assert!(plan(&c, &stored).stale.is_empty());
}

#[test]
fn unchanged_text_updates_payload_without_embedding() {
    let c = coalesce(vec![upsert(1, "same text", 7, 0)]);
    let stored = HashMap::from([(
        key(1),
        StoredState {
            deleted: false,
            hash: Some(text_hash("same text")),
            position: pos(3),
            chunks: 1,
            fields: Row::new(),
        },
    )]);
    let out = plan(&c, &stored);
    assert!(out.plan.upserts.is_empty());
    assert_eq!(out.unchanged, 1);
    assert_eq!(out.plan.payload_updates.len(), 1);
    assert_eq!(
        out.plan.payload_updates[0].payload["_cdc"]["position"]["lsn"],
        json!(7)
    );
}

#[test]
fn toast_unavailable_columns_keep_stored_values() {
    let mut d = doc(1, "x");
    d.fields.remove("name");
    d.text = None;
    d.chunks.clear();
    d.hash = None;
    let c = coalesce(vec![Planned::Upsert {
        doc: d,
        unavailable: vec!["name".into()],
        position: pos(8),
        source_ts_ms: None,
        origin: 0,
    }]);
    // Nothing stored: the event cannot be applied.
    assert_eq!(plan(&c, &HashMap::new()).poison.len(), 1);
    let stored_fields = json!({"id": 1, "name": "stored name"})
        .as_object()
        .cloned()
        .unwrap_or_default();
    let stored = HashMap::from([(
        key(1),
        StoredState {
            deleted: false,
            hash: Some("h".into()),
            position: pos(3),
            chunks: 2,
            fields: stored_fields,
        },
    )]);
    let out = plan(&c, &stored);
    assert_eq!(out.plan.payload_updates.len(), 2);
    assert_eq!(
        out.plan.payload_updates[0].payload["name"],
        json!("stored name")
    );
    assert_eq!(
        out.plan.payload_updates[1].payload["_cdc"]["hash"],
        json!("h")
    );
    assert!(out.plan.upserts.is_empty());
}

#[test]
fn later_toast_upsert_inherits_from_earlier_in_batch() {
    let mut later = doc(1, "x");
    later.fields.remove("name");
    later.text = None;
    later.chunks.clear();
    let c = coalesce(vec![
        upsert(1, "full text", 1, 0),
        Planned::Upsert {
            doc: later,
            unavailable: vec!["name".into()],
            position: pos(2),
            source_ts_ms: None,
            origin: 1,
        },
    ]);
    let out = plan(&c, &HashMap::new());
    assert_eq!(out.plan.upserts.len(), 1);
    assert_eq!(out.plan.upserts[0].text, "full text");
    assert_eq!(out.plan.upserts[0].payload["name"], json!("full text"));
    assert_eq!(
        out.plan.upserts[0].payload["_cdc"]["position"]["lsn"],
        json!(2)
    );
}

#[test]
fn stored_state_round_trips_through_the_payload() {
    let c = coalesce(vec![upsert(1, "a b c", 42, 0)]);
    let out = plan(&c, &HashMap::new());
    let s = stored_state(&out.plan.upserts[0].payload).expect("state");
    assert_eq!(s.position, pos(42));
    assert_eq!(s.hash, Some(text_hash("a b c")));
    assert_eq!(s.chunks, 1);
    assert_eq!(s.fields.get("name"), Some(&json!("a b c")));
    assert!(!s.fields.contains_key("text"));
}

#[test]
fn an_older_event_behind_a_newer_one_in_the_batch_is_stale() {
    let c = coalesce(vec![upsert(1, "new", 9, 0), upsert(1, "old replay", 4, 1)]);
    let out = plan(&c, &HashMap::new());
    assert_eq!(out.plan.upserts.len(), 1);
    assert_eq!(out.plan.upserts[0].text, "new");
    assert_eq!(out.stale, vec![(key(1), 1)]);
}

#[test]
fn a_delete_leaves_a_marker_that_makes_older_replays_stale() {
    let out = plan(&coalesce(vec![delete(1, 20, 0)]), &HashMap::new());
    assert_eq!(out.plan.delete_keys, vec![key(1)]);
    assert_eq!(out.plan.markers.len(), 1);
    assert_eq!(out.plan.markers[0].id, key(1).point_id(0));
    let state = stored_state(&out.plan.markers[0].payload).expect("marker state");
    assert!(state.deleted);
    assert_eq!(state.chunks, 0);
    // An old create replayed from the DLQ after the delete: stale.
    let stored = HashMap::from([(key(1), state.clone())]);
    let out = plan(&coalesce(vec![upsert(1, "resurrected?", 10, 0)]), &stored);
    assert!(out.plan.upserts.is_empty());
    assert_eq!(out.stale.len(), 1);
    // A newer create: written in full, nothing to delete as surplus.
    let out = plan(&coalesce(vec![upsert(1, "back again", 30, 0)]), &stored);
    assert_eq!(out.plan.upserts.len(), 1);
    assert!(out.plan.delete_points.is_empty());
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
