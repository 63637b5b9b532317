//! THE SEED DESIGN, rebuilt as a baseline: the pipeline cdc-indexer replaces, not cdc-indexer.
//!
//! A consumer with prefetch 5 that takes one message at a time and makes one HTTP call per
//! message to the python-indexer: a create/update becomes `POST /v1/documents:upsert` with
//! that one document (one chunk, `embedding: null`, so the service embeds that one text and
//! writes it), a delete becomes `POST /v1/documents:delete` with that one key. The message is
//! acked (alone) after the 200. No batching, no skipping of unchanged texts, no ordering
//! guard: each event costs one embedding (or one delete) and one round trip.

use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use serde_json::{Value, json};

use crate::rabbit::Rabbit;

pub const PREFETCH: u16 = 5;

/// Columns the python-indexer reserves in metadata.
const RESERVED: &[&str] = &[
    "text",
    "_node_content",
    "_node_type",
    "document_id",
    "doc_id",
    "ref_doc_id",
];

/// One drain of the seed consumer.
#[derive(Debug, Clone, Default)]
pub struct SeedDrain {
    pub events: u64,
    pub secs: f64,
    /// Rates over the first and the last tenth of the events (the seed slows down as its
    /// collection grows).
    pub first_tenth: f64,
    pub last_tenth: f64,
}

impl SeedDrain {
    pub fn rate(&self) -> f64 {
        self.events as f64 / self.secs.max(1e-9)
    }
}

/// Consumes `expected` messages from `queue` the seed's way, against the service at `url`.
pub async fn drain(
    rabbit: &Rabbit,
    queue: &str,
    url: &str,
    expected: u64,
) -> anyhow::Result<SeedDrain> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?;
    let ch = rabbit.conn.create_channel().await?;
    ch.basic_qos(PREFETCH, BasicQosOptions::default()).await?;
    let started = Instant::now();
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "bench-seed-design".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut done: Vec<Duration> = Vec::with_capacity(expected as usize);
    while (done.len() as u64) < expected {
        let delivery = consumer
            .next()
            .await
            .ok_or_else(|| anyhow::anyhow!("the seed consumer ended after {}", done.len()))??;
        let (path, body) = request(&delivery.data)?;
        let response = client
            .post(format!("{url}{path}"))
            .json(&body)
            .send()
            .await
            .with_context(|| format!("seed design: POST {path}"))?;
        let status = response.status();
        anyhow::ensure!(
            status.is_success(),
            "seed design: POST {path} answered {status}: {}",
            response.text().await.unwrap_or_default()
        );
        ch.basic_ack(delivery.delivery_tag, BasicAckOptions::default())
            .await?;
        done.push(started.elapsed());
    }
    let _ = ch.close(200, "done".into()).await;
    let secs = done.last().map_or(0.0, Duration::as_secs_f64);
    let tenth = (done.len() / 10).max(1);
    let rate = |from: usize, to: usize| {
        let t0 = if from == 0 {
            0.0
        } else {
            done[from - 1].as_secs_f64()
        };
        (to - from) as f64 / (done[to - 1].as_secs_f64() - t0).max(1e-9)
    };
    Ok(SeedDrain {
        events: expected,
        secs,
        first_tenth: rate(0, tenth),
        last_tenth: rate(done.len() - tenth, done.len()),
    })
}

/// The one HTTP call the seed design makes for this message: (path, body).
fn request(body: &[u8]) -> anyhow::Result<(&'static str, Value)> {
    let event: Value = serde_json::from_slice(body).context("seed design: not JSON")?;
    let source = &event["source"];
    let table = format!(
        "{}.{}",
        source["schema"].as_str().unwrap_or("public"),
        source["table"].as_str().unwrap_or_default()
    );
    let op = event["op"].as_str().unwrap_or_default();
    let row = if op == "d" {
        &event["before"]
    } else {
        &event["after"]
    };
    let row = row
        .as_object()
        .ok_or_else(|| anyhow::anyhow!("seed design: an event without its row"))?;
    let key = json!({"id": row.get("id").cloned().unwrap_or(Value::Null)}).to_string();
    if op == "d" {
        return Ok((
            "/v1/documents:delete",
            json!({"keys": [{"table": table, "key": key}]}),
        ));
    }
    let field = |name: &str| row.get(name).and_then(Value::as_str).unwrap_or_default();
    let text = format!("{}\n\n{}", field("name"), field("description"));
    let metadata: serde_json::Map<String, Value> = row
        .iter()
        .filter(|(k, _)| !RESERVED.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let id = uuid::Uuid::new_v5(
        &uuid::Uuid::NAMESPACE_URL,
        format!("{table}/{key}").as_bytes(),
    );
    Ok((
        "/v1/documents:upsert",
        json!({"documents": [{"table": table, "key": key, "chunks": [
            {"id": id.to_string(), "text": text, "embedding": null, "metadata": metadata}
        ]}]}),
    ))
}
