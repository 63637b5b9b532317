//! Each update's times: committed (the client's clock right after COMMIT), `source.ts_ms`
//! (from the event), at the broker (a tap queue bound to the bench's exchange, consumed
//! here), and searchable:
//! - every update: the new text's hash in its document's chunk 0, read through the daemon's
//!   `POST /index/states` (chunk 0 is the commit record, written after every other chunk);
//! - a labelled sample (every K-th update): a `/search` with the new text finds the document
//!   with that text, searched for once the hash is there (so the sample costs about one query
//!   embedding each, and shows whether hash-visible and search-visible differ).
//!
//! All times are Unix seconds (f64) on this machine's clock: PostgreSQL, Debezium and the
//! bench share it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use serde_json::{Value, json};

use crate::daemon::client;
use crate::source::seq_of;

pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[derive(Debug, Clone, Default)]
pub struct Update {
    pub seq: u64,
    pub id: u64,
    pub hash: String,
    pub text: String,
    pub sampled: bool,
    pub commit: Option<f64>,
    pub source: Option<f64>,
    pub broker: Option<f64>,
    pub written: Option<f64>,
    pub searched: Option<f64>,
    pub searches: u32,
    /// A later update of the same row was committed before this one was seen written.
    pub superseded: bool,
    /// Not seen written (or found) within the phase's wait: left out of the probe from then on.
    pub gave_up: bool,
}

#[derive(Default)]
struct State {
    updates: HashMap<u64, Update>,
    latest: HashMap<u64, u64>,
    probing: bool,
    /// The running daemon's search port.
    search: String,
}

/// Shared by the load generator, the tap consumer and the probe.
#[derive(Clone, Default)]
pub struct Tracker(Arc<Mutex<State>>);

impl Tracker {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registered before the UPDATE runs (the tap may see the event before it returns).
    pub fn register(&self, u: Update) {
        let mut s = self.lock();
        if let Some(old) = s.latest.insert(u.id, u.seq)
            && let Some(prev) = s.updates.get_mut(&old)
            && prev.written.is_none()
        {
            prev.superseded = true;
        }
        s.updates.insert(u.seq, u);
    }

    pub fn committed(&self, seq: u64, at: f64) {
        if let Some(u) = self.lock().updates.get_mut(&seq) {
            u.commit = Some(at);
        }
    }

    /// The `/index/states` probe runs only while this is on (not during bursts, where a
    /// request for every pending key would compete with the drain it measures).
    pub fn set_probing(&self, on: bool) {
        self.lock().probing = on;
    }

    /// Where the probe asks (each daemon has a search port of its own).
    pub fn set_search(&self, addr: &str) {
        self.lock().search = addr.to_string();
    }

    /// Updates with `from <= seq < to`.
    pub fn range(&self, from: u64, to: u64) -> Vec<Update> {
        let s = self.lock();
        let mut out: Vec<Update> = (from..to)
            .filter_map(|q| s.updates.get(&q).cloned())
            .collect();
        out.sort_by_key(|u| u.seq);
        out
    }

    /// Stops probing what is still not written (or found) in `from..to`.
    pub fn give_up(&self, from: u64, to: u64) {
        let mut s = self.lock();
        for q in from..to {
            if let Some(u) = s.updates.get_mut(&q)
                && (u.written.is_none() || (u.sampled && u.searched.is_none()))
                && !u.superseded
            {
                u.gave_up = true;
            }
        }
    }

    pub fn broker_seen(&self, from: u64, to: u64) -> usize {
        let s = self.lock();
        (from..to)
            .filter(|q| s.updates.get(q).is_some_and(|u| u.broker.is_some()))
            .count()
    }

    /// Whether every update of `from..to` is written (or superseded).
    pub fn all_written(&self, from: u64, to: u64) -> bool {
        let s = self.lock();
        (from..to).all(|q| {
            s.updates.get(&q).is_none_or(|u| {
                u.superseded || (u.written.is_some() && (!u.sampled || u.searched.is_some()))
            })
        })
    }
}

/// Declares an exclusive queue bound to `exchange` with `#` and records each update's
/// arrival at the broker and its `source.ts_ms` (`ts_us` when present).
pub async fn tap(conn: &lapin::Connection, exchange: &str, tracker: Tracker) -> anyhow::Result<()> {
    let ch = conn.create_channel().await?;
    let q = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    ch.queue_bind(
        q.name().as_str().into(),
        exchange.into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let mut consumer = ch
        .basic_consume(
            q.name().as_str().into(),
            "latency-tap".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    tokio::spawn(async move {
        while let Some(Ok(d)) = consumer.next().await {
            let at = now();
            if let Ok(v) = serde_json::from_slice::<Value>(&d.data) {
                let p = v.get("payload").unwrap_or(&v);
                let seq = p["after"]["description"].as_str().and_then(seq_of);
                let source = p["source"]["ts_us"]
                    .as_f64()
                    .map(|us| us / 1e6)
                    .or_else(|| p["source"]["ts_ms"].as_f64().map(|ms| ms / 1e3));
                if let Some(seq) = seq
                    && let Some(u) = tracker.lock().updates.get_mut(&seq)
                    && u.broker.is_none()
                {
                    u.broker = Some(at);
                    u.source = source;
                }
            }
            let _ = d.ack(BasicAckOptions::default()).await;
        }
    });
    Ok(())
}

/// Polls the daemon's search port every `every` while probing is on: one `/index/states`
/// request for every update at the broker and not yet written, then one `/search` per
/// sampled update that is written (none when nothing is pending: a light load costs little).
pub fn probe(table: String, every: Duration, tracker: Tracker) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let client = client();
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let (search, pending, to_search) = {
                let s = tracker.lock();
                if !s.probing || s.search.is_empty() {
                    continue;
                }
                let pending: Vec<(u64, u64, String)> = s
                    .updates
                    .values()
                    .filter(|u| {
                        // Not before the broker has it: nothing to find until then.
                        u.broker.is_some() && u.written.is_none() && !u.superseded && !u.gave_up
                    })
                    .map(|u| (u.seq, u.id, u.hash.clone()))
                    .collect();
                let to_search: Vec<(u64, u64, String)> = s
                    .updates
                    .values()
                    .filter(|u| {
                        u.sampled && u.written.is_some() && u.searched.is_none() && !u.gave_up
                    })
                    .map(|u| (u.seq, u.id, u.text.clone()))
                    .collect();
                (s.search.clone(), pending, to_search)
            };
            if !pending.is_empty() {
                let keys: Vec<Value> = pending
                    .iter()
                    .map(|(_, id, _)| json!({"table": table, "key": format!("{{\"id\":{id}}}")}))
                    .collect();
                let answer = client
                    .post(format!("http://{search}/index/states"))
                    .json(&json!({ "keys": keys }))
                    .send()
                    .await;
                let at = now();
                if let Ok(r) = answer
                    && let Ok(v) = r.json::<Value>().await
                {
                    let hashes: HashMap<String, String> = v["states"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|st| {
                            let key = st["key"].as_str()?.to_string();
                            let hash = st["payload"]["_cdc"]["hash"].as_str()?.to_string();
                            Some((key, hash))
                        })
                        .collect();
                    let mut s = tracker.lock();
                    for (seq, id, hash) in &pending {
                        if hashes.get(&format!("{{\"id\":{id}}}")) == Some(hash)
                            && let Some(u) = s.updates.get_mut(seq)
                        {
                            u.written = Some(at);
                        }
                    }
                }
            }
            for (seq, id, text) in to_search {
                let found = search_finds(&client, &search, &table, id, seq, &text).await;
                let at = now();
                if let Some(u) = tracker.lock().updates.get_mut(&seq) {
                    u.searches += 1;
                    if found {
                        u.searched = Some(at);
                    }
                }
            }
        }
    })
}

/// `/search` with the new text: is document `id` among the hits, with this update's text?
async fn search_finds(
    client: &reqwest::Client,
    search: &str,
    table: &str,
    id: u64,
    seq: u64,
    text: &str,
) -> bool {
    let Ok(r) = client
        .get(format!("http://{search}/search"))
        .query(&[("q", text), ("table", table), ("limit", "5")])
        .send()
        .await
    else {
        return false;
    };
    let Ok(v) = r.json::<Value>().await else {
        return false;
    };
    let key = format!("{{\"id\":{id}}}");
    let marker = format!("Revised edition {seq}:");
    v["results"].as_array().into_iter().flatten().any(|h| {
        h["key"].as_str() == Some(key.as_str())
            && h["text"].as_str().is_some_and(|t| t.contains(&marker))
    })
}
