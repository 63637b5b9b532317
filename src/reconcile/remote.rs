//! The index as the running daemon reads it, over its search port (`http.search_listen`,
//! behind its bearer token when one is set): the embedded index belongs to the daemon's
//! process (an exclusive lock), so `cdc-indexer reconcile` asks it, as `search` does, and
//! opens the index itself only when no daemon answers (or no search port is configured).
//!
//! Two read-only endpoints (served by `http.rs`, on the search port: they return row
//! payloads), JSON in and out:
//!
//! * `POST /index/states` `{"keys": [{"table", "key"}]}` → `{"states": [{"table", "key",
//!   "payload"}]}`: chunk 0 of each key that has one, as stored.
//! * `POST /index/scan` `{"table"}` or `{"keys": [...]}`, with `"after"` and `"limit"` →
//!   `{"points": [{"id", "payload": {"_cdc": {...}}}], "next"}`: one page of
//!   [`crate::sink::Sink::scan`].

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Value, json};

use super::IndexReader;
use crate::error::StageError;
use crate::model::{DocumentKey, Row};
use crate::sink::{ScanPage, ScanScope, ScannedPoint};
use crate::stored::{StoredKind, StoredState, stored_state};

/// The daemon's side port, as a reader of its index.
pub struct DaemonIndex {
    client: reqwest::Client,
    base: String,
    token: Option<String>,
}

/// What asking the daemon found.
pub enum Probe {
    /// A daemon answers on its side port.
    Running(DaemonIndex),
    /// Nothing listens there: open the index directly.
    Absent,
}

impl DaemonIndex {
    /// Asks `listen` (the `http.search_listen` address) whether a daemon serves its index
    /// there; `token` is the search port's bearer token, if it has one.
    pub async fn probe(listen: &str, token: Option<String>) -> Result<Probe, StageError> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()
            .map_err(|e| StageError::fatal(format!("cannot build the HTTP client: {e}")))?;
        let index = DaemonIndex {
            client,
            base: format!("http://{listen}"),
            token,
        };
        let url = format!("{}/index/states", index.base);
        let mut request = index.client.post(&url).json(&json!({"keys": []}));
        if let Some(token) = &index.token {
            request = request.bearer_auth(token);
        }
        match request.send().await {
            Err(e) if e.is_connect() => Ok(Probe::Absent),
            Err(e) => Err(StageError::from_reqwest(&e)),
            Ok(r) if r.status().is_success() => Ok(Probe::Running(index)),
            Ok(r) => Err(StageError::fatal(format!(
                "something answers on {listen} (http.search_listen) but not as a cdc-indexer daemon with /index/states: HTTP {} (a wrong http.search_token_env / search_token_file?)",
                r.status()
            ))),
        }
    }

    async fn post(&self, path: &str, body: &Value) -> Result<Value, StageError> {
        let url = format!("{}{path}", self.base);
        let mut request = self.client.post(&url).json(body);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.map_err(|e| {
            let mut err = StageError::from_reqwest(&e);
            if e.is_connect() {
                err.message = format!("cannot connect to the daemon at {url}: {e}");
            }
            err
        })?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|e| StageError::from_reqwest(&e))?;
        if !status.is_success() {
            return Err(StageError::fatal(format!(
                "the daemon at {url} answered {status}: {}",
                &text[..text.floor_char_boundary(300)]
            )));
        }
        serde_json::from_str(&text)
            .map_err(|e| StageError::fatal(format!("the daemon at {url}: unreadable answer: {e}")))
    }
}

fn keys_json(keys: &[DocumentKey]) -> Vec<Value> {
    keys.iter()
        .map(|k| json!({"table": k.table, "key": k.key}))
        .collect()
}

#[async_trait]
impl IndexReader for DaemonIndex {
    async fn read_states(
        &self,
        keys: &[DocumentKey],
    ) -> Result<HashMap<DocumentKey, StoredState>, StageError> {
        if keys.is_empty() {
            return Ok(HashMap::new());
        }
        let answer = self
            .post("/index/states", &json!({"keys": keys_json(keys)}))
            .await?;
        let mut states = HashMap::new();
        for s in answer["states"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            let key = DocumentKey {
                table: s["table"].as_str().unwrap_or_default().to_string(),
                key: s["key"].as_str().unwrap_or_default().to_string(),
            };
            let payload: Row = s["payload"].as_object().cloned().unwrap_or_default();
            if let Some(state) = stored_state(&payload) {
                states.insert(key, state);
            }
        }
        Ok(states)
    }

    async fn scan(
        &self,
        scope: ScanScope<'_>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<ScanPage, StageError> {
        let body = match scope {
            ScanScope::Table(t) => json!({"table": t, "after": after, "limit": limit}),
            ScanScope::Keys(keys) => {
                json!({"keys": keys_json(keys), "after": after, "limit": limit})
            }
        };
        let answer = self.post("/index/scan", &body).await?;
        let points = answer["points"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .filter_map(|p| {
                ScannedPoint::from_payload(
                    p["id"].as_str().unwrap_or_default().to_string(),
                    &p["payload"].as_object().cloned().unwrap_or_default(),
                )
            })
            .collect();
        Ok(ScanPage {
            points,
            next: answer["next"].as_str().map(str::to_string),
        })
    }
}

/// A scanned point as the `/index/scan` endpoint sends it: `{"id", "payload": {"_cdc"}}`.
pub fn point_json(p: &ScannedPoint) -> Value {
    let mut cdc = json!({
        "table": p.key.table,
        "key": p.key.key,
        "chunk": p.chunk,
        "chunks": p.chunks,
        "hash": p.hash,
        "position": p.position,
    });
    match p.kind {
        StoredKind::Deleted => cdc["deleted"] = json!(true),
        StoredKind::Empty => cdc["empty"] = json!(true),
        StoredKind::Document => {}
    }
    json!({"id": p.id, "payload": {"_cdc": cdc}})
}

/// The request of `/index/states` and `/index/scan`: keys as `DocumentKey`s.
pub fn keys_of(body: &Value) -> Option<Vec<DocumentKey>> {
    body.get("keys")?
        .as_array()?
        .iter()
        .map(|k| {
            Some(DocumentKey {
                table: k.get("table")?.as_str()?.to_string(),
                key: k.get("key")?.as_str()?.to_string(),
            })
        })
        .collect()
}
