//! The index equals the source, on real Debezium output: PostgreSQL → the real Debezium
//! 3.6.3 engine (debezium/runner.py, published as Debezium Server's RabbitMQ sink does) →
//! RabbitMQ → the daemon → the embedded index, compared with the final rows.
//!
//! TOASTed columns (STORAGE EXTERNAL, > 2 KB) arrive as `__debezium_unavailable_value` in an
//! update that leaves them unchanged; a primary-key change arrives as delete + tombstone +
//! create with `__debezium.oldkey`; the unwrap SMT in its default mode loses a delete's key.

mod common;

use std::time::Duration;

use cdc_indexer::mapping::text_hash;
use common::debezium::*;
use common::reconcile::*;
use common::*;
use serde_json::{Value, json};

/// Text of more than 2 KB: stored out of line, so unchanged updates do not resend it.
fn big_text(word: &str) -> String {
    format!("{word} ").repeat(3000 / (word.len() + 1))
}

/// The document of `id`: its chunk texts joined, and chunk 0's payload.
async fn document(
    w: &World,
    table: &str,
    id: u64,
) -> Option<(String, serde_json::Map<String, Value>)> {
    let index = w.index().await;
    let points = index.doc(table, &format!("{{\"id\":{id}}}")).await;
    let first = points.first()?.payload.clone();
    let chunks = first["_cdc"]["chunks"].as_u64().unwrap_or(0) as usize;
    assert_eq!(
        points.len(),
        chunks,
        "{table} {id}: chunk count as chunk 0 says: {points:?}"
    );
    for p in &points {
        assert_eq!(
            p.payload["_cdc"]["hash"], first["_cdc"]["hash"],
            "{table} {id}: chunks of one version"
        );
    }
    let text = points
        .iter()
        .map(|p| p.payload["text"].as_str().unwrap_or("").to_string())
        .collect::<Vec<_>>()
        .join("");
    Some((text, first))
}

fn rule(table: &str, text: &str, extra: &str) -> String {
    format!(
        "[[tables]]\ntable = \"public.{table}\"\nid_columns = [\"id\"]\ntext = \"{text}\"\nchunk_size = 1000\nchunk_overlap = 0\n{extra}\n"
    )
}

async fn drained_after(w: &World, d: &mut Daemon, tap_name: &str, events: u32, runner: &Runner) {
    tap_wait(w, tap_name, events, runner).await;
    wait_drained(w, d).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn toast_placeholder_with_changed_status_re_renders_text_and_keeps_nulls() {
    pg_start();
    let s = rand_suffix();
    let (plain, hidden) = (format!("toast_{s}"), format!("toast_hidden_{s}"));
    for t in [&plain, &hidden] {
        psql(&format!(
            "CREATE TABLE public.{t} (id int PRIMARY KEY, status text, big_text text, note text); \
             ALTER TABLE public.{t} ALTER COLUMN big_text SET STORAGE EXTERNAL; \
             INSERT INTO public.{t} VALUES (1, 'new', '{}', 'a note'), (2, 'new', '{}', 'another')",
            big_text("new"),
            big_text("other")
        ));
    }
    let rules = format!(
        "{}{}",
        rule(&plain, "{status}\\n\\n{big_text}", ""),
        rule(
            &hidden,
            "{status}\\n\\n{big_text}",
            "exclude = [\"big_text\"]"
        )
    );
    let w = World::new("toast", &rules, "");
    w.declare().await;
    let tap_name = tap(&w).await;
    let mut d = w.start();
    d.wait_ready(Duration::from_secs(60));
    let mut runner = Runner::start(&w, &[&plain, &hidden], &[]);
    drained_after(&w, &mut d, &tap_name, 4, &runner).await;
    for t in [&plain, &hidden] {
        psql(&format!(
            "UPDATE public.{t} SET status = 'updated' WHERE id = 1"
        ));
        psql(&format!("UPDATE public.{t} SET note = NULL WHERE id = 1"));
    }
    drained_after(&w, &mut d, &tap_name, 8, &runner).await;
    runner.stop();
    // Debezium really sent the placeholder for the unchanged TOASTed column.
    let published = tap_take(&tap_name).await;
    assert!(
        published
            .iter()
            .any(|(_, _, body)| String::from_utf8_lossy(body)
                .contains("__debezium_unavailable_value")),
        "no TOAST placeholder in what Debezium published"
    );
    assert!(d.sigterm().success());

    let want = format!("updated\n\n{}", big_text("new").trim());
    for t in [&plain, &hidden] {
        let table = format!("public.{t}");
        let (text, chunk0) = document(&w, &table, 1).await.expect("document");
        assert_eq!(chunk0["status"], json!("updated"), "{t}: payload");
        assert!(
            text.starts_with("updated\n\nnew new"),
            "{t}: text re-rendered: {:?}",
            &text[..40.min(text.len())]
        );
        assert_eq!(
            chunk0["_cdc"]["hash"],
            json!(text_hash(&want)),
            "{t}: hash of the new text"
        );
        assert_eq!(
            chunk0.get("note"),
            Some(&Value::Null),
            "{t}: a null column is kept"
        );
    }
    let (_, hidden_chunk0) = document(&w, &format!("public.{hidden}"), 1)
        .await
        .expect("doc");
    assert!(
        hidden_chunk0.get("big_text").is_none(),
        "excluded from the payload"
    );
    // The vectors are those of the new text: a search for it finds the document first, its
    // chunk 0 with the very vector of the new chunk (cosine 1), and the old text's vector is
    // gone (nothing scores 1 for the old chunk).
    let index = w.index().await;
    let embedder = index.embedder().await;
    let old_text = format!("new\n\n{}", big_text("new").trim());
    for t in [&plain, &hidden] {
        let table = format!("public.{t}");
        let chunk0 = |text: &str| cdc_indexer::mapping::chunk_text(text, 1000, 0)[0].clone();
        let search = |text: String| {
            let (embedder, sink, table) = (embedder.clone(), index.sink.clone(), table.clone());
            async move {
                cdc_indexer::search::run(embedder.as_ref(), sink.as_ref(), &text, Some(&table), 10)
                    .await
                    .expect("search")
            }
        };
        let hits = search(chunk0(&want)).await;
        let top = &hits[0];
        println!(
            "{t}: new text → {} chunk {} score {}",
            top["key"], top["chunk"], top["score"]
        );
        assert_eq!(
            top["key"],
            json!(r#"{"id":1}"#),
            "{t}: nearest document: {hits:?}"
        );
        assert_eq!(top["chunk"], json!(0), "{t}: {hits:?}");
        assert!(
            top["score"].as_f64().unwrap_or(0.0) > 0.9999,
            "{t}: chunk 0's vector is the new text's: {hits:?}"
        );
        // Chunk 0 held the old text's first chunk; it must not hold its vector any more (the
        // later chunks of "new new …" are alike in both versions: only chunk 0 tells).
        let old = search(chunk0(&old_text)).await;
        let old_score = old
            .iter()
            .find(|h| h["key"] == json!(r#"{"id":1}"#) && h["chunk"] == json!(0))
            .and_then(|h| h["score"].as_f64())
            .unwrap_or(0.0);
        println!("{t}: old text → chunk 0 score {old_score}");
        assert!(
            old_score < 0.9999,
            "{t}: chunk 0 still holds the old text's vector: {old:?}"
        );
    }
    drop(index);
    assert!(w.drain_dlq().await.is_empty(), "nothing dead-lettered");
    assert_reconciled(&w);
    for t in [&plain, &hidden] {
        psql(&format!("DROP TABLE public.{t}"));
    }
    tap_delete(&tap_name).await;
    w.cleanup().await;
}

async fn primary_key_change_of_a_toasted_row(test: &str, pipeline: &str) {
    pg_start();
    let t = format!("pk_{}", rand_suffix());
    psql(&format!(
        "CREATE TABLE public.{t} (id int PRIMARY KEY, status text, big_text text); \
         ALTER TABLE public.{t} ALTER COLUMN big_text SET STORAGE EXTERNAL; \
         INSERT INTO public.{t} VALUES (1001, 'moving', '{}')",
        big_text("kept")
    ));
    let w = World::new(test, &rule(&t, "{status}\\n\\n{big_text}", ""), pipeline);
    w.declare().await;
    let tap_name = tap(&w).await;
    let mut d = w.start();
    d.wait_ready(Duration::from_secs(60));
    let mut runner = Runner::start(&w, &[&t], &[]);
    drained_after(&w, &mut d, &tap_name, 1, &runner).await;
    psql(&format!("UPDATE public.{t} SET id = 2001 WHERE id = 1001"));
    // delete(1001) + tombstone + create(2001)
    drained_after(&w, &mut d, &tap_name, 4, &runner).await;
    runner.stop();
    let published = tap_take(&tap_name).await;
    assert!(
        published
            .iter()
            .any(|(_, h, _)| h.contains_key("__debezium.oldkey")),
        "the create carries __debezium.oldkey"
    );
    assert!(d.sigterm().success());
    let table = format!("public.{t}");
    assert!(
        document(&w, &table, 1001).await.is_none(),
        "the old key is gone"
    );
    let (text, chunk0) = document(&w, &table, 2001)
        .await
        .expect("the new key's document");
    assert!(
        text.starts_with("moving\n\nkept kept"),
        "whole text: {:?}",
        &text[..30.min(text.len())]
    );
    assert_eq!(
        chunk0["big_text"],
        json!(big_text("kept")),
        "the TOASTed column carried over"
    );
    let dead = w.drain_dlq().await;
    assert!(
        dead.is_empty(),
        "dead-lettered: {:?}",
        dead.iter().map(|d| &d.1).collect::<Vec<_>>()
    );
    assert_reconciled(&w);
    psql(&format!("DROP TABLE public.{t}"));
    tap_delete(&tap_name).await;
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_key_change_of_a_toasted_row_keeps_its_document_in_one_batch() {
    primary_key_change_of_a_toasted_row("pk-one-batch", "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_key_change_of_a_toasted_row_keeps_its_document_across_batches() {
    primary_key_change_of_a_toasted_row("pk-batches", "[pipeline]\nbatch_max_events = 1\n").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unwrap_default_mode_deletes_are_counted_and_key_changes_still_apply() {
    pg_start();
    let t = format!("unwrap_{}", rand_suffix());
    psql(&format!(
        "CREATE TABLE public.{t} (id int PRIMARY KEY, name text); \
         INSERT INTO public.{t} VALUES (1, 'one'), (2, 'two'), (3, 'three')"
    ));
    let w = World::new("unwrap", &rule(&t, "{name}", ""), "");
    w.declare().await;
    let tap_name = tap(&w).await;
    let mut d = w.start();
    d.wait_ready(Duration::from_secs(60));
    let unwrap = [
        "transforms=unwrap",
        "transforms.unwrap.type=io.debezium.transforms.ExtractNewRecordState",
    ];
    let mut runner = Runner::start(&w, &[&t], &unwrap);
    drained_after(&w, &mut d, &tap_name, 3, &runner).await;
    psql(&format!("DELETE FROM public.{t} WHERE id = 1"));
    psql(&format!("DELETE FROM public.{t} WHERE id = 2"));
    psql(&format!("UPDATE public.{t} SET id = 30 WHERE id = 3"));
    // Two deletes become bare `null`s; the key change is a `null` and a create(30).
    drained_after(&w, &mut d, &tap_name, 3 + 2 + 2, &runner).await;
    runner.stop();
    let unapplied = d.metric_sum("cdc_indexer_unapplied_deletes_total");
    assert!(unapplied >= 2.0, "keyless deletes counted: {unapplied}");
    // Reconcile finds the two rows whose deletes lost their key, and repair removes them.
    let table = format!("public.{t}");
    let r = reconcile(&w, &[]);
    let orphans: Vec<String> = r.keys(&table, "orphan").into_iter().collect();
    assert_eq!(orphans, vec![r#"{"id":1}"#, r#"{"id":2}"#], "{}", r.json);
    assert_eq!(reconcile(&w, &["--repair"]).code, 1);
    wait_drained(&w, &mut d).await;
    assert_reconciled(&w);
    assert!(d.sigterm().success());
    let log = d.log();
    let warnings = log
        .matches("delete.tombstone.handling.mode=rewrite")
        .count();
    assert_eq!(
        warnings, 1,
        "warned once for the table, with the fix: {log}"
    );
    assert!(
        document(&w, &table, 3).await.is_none(),
        "the create with __debezium.oldkey deleted the old key"
    );
    assert!(document(&w, &table, 30).await.is_some());
    psql(&format!("DROP TABLE public.{t}"));
    tap_delete(&tap_name).await;
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncate_keeps_older_creates_replayed_after_it_from_resurrecting_rows() {
    pg_start();
    let t = format!("trunc_{}", rand_suffix());
    psql(&format!(
        "CREATE TABLE public.{t} (id int PRIMARY KEY, name text)"
    ));
    let w = World::new("truncate", &rule(&t, "{name}", ""), "");
    w.declare().await;
    let tap_name = tap(&w).await;
    let mut d = w.start();
    d.wait_ready(Duration::from_secs(60));
    let mut runner = Runner::start(&w, &[&t], &["skipped.operations=none"]);
    psql(&format!("INSERT INTO public.{t} VALUES (1, 'before')"));
    drained_after(&w, &mut d, &tap_name, 1, &runner).await;
    let old_create = tap_take(&tap_name).await;
    psql(&format!("TRUNCATE public.{t}"));
    psql(&format!("INSERT INTO public.{t} VALUES (2, 'after')"));
    drained_after(&w, &mut d, &tap_name, 2, &runner).await;
    runner.stop();
    // The old create again (a redelivery, a DLQ replay), after the truncate.
    let conn = connect().await;
    let ch = confirm_channel(&conn).await;
    for (rk, _, body) in &old_create {
        w.publish(&ch, rk, body).await;
    }
    let _ = conn.close(200, "ok".into()).await;
    wait_drained(&w, &mut d).await;
    assert!(d.sigterm().success());
    let table = format!("public.{t}");
    assert!(
        document(&w, &table, 1).await.is_none(),
        "a row older than the truncate stays gone"
    );
    assert!(document(&w, &table, 2).await.is_some());
    assert_reconciled(&w);
    psql(&format!("DROP TABLE public.{t}"));
    tap_delete(&tap_name).await;
    w.cleanup().await;
}
