//! Nearest documents to a query text: embed it, ask the sink, shape the answer.

use serde_json::{Value, json};

use crate::embed::Embedder;
use crate::error::StageError;
use crate::mapping::column_of_payload_key;
use crate::sink::Sink;

/// Embeds `text` and returns up to `limit` hits as JSON objects
/// (`score`, `table`, `key`, `chunk`, `text`, `fields`: the row's payload columns, joined in
/// from the document's chunk 0).
pub async fn run(
    embedder: &dyn Embedder,
    sink: &dyn Sink,
    text: &str,
    table: Option<&str>,
    limit: usize,
) -> Result<Vec<Value>, StageError> {
    let mut vectors = embedder.embed(&[text.to_string()]).await?;
    let vector = vectors
        .pop()
        .ok_or_else(|| StageError::transient("the embedder returned no vector"))?;
    let hits = crate::sink::search_with_fields(sink, vector, table, limit).await?;
    Ok(hits
        .into_iter()
        .map(|hit| {
            let cdc = hit.payload.get("_cdc").cloned().unwrap_or(Value::Null);
            let text = hit.payload.get("text").cloned().unwrap_or(Value::Null);
            // Row fields by column name (reserved names are stored escaped).
            let fields: serde_json::Map<String, Value> = hit
                .payload
                .iter()
                .filter_map(|(k, v)| column_of_payload_key(k).map(|c| (c.to_string(), v.clone())))
                .collect();
            json!({
                "score": hit.score,
                "table": cdc.get("table"),
                "key": cdc.get("key"),
                "chunk": cdc.get("chunk"),
                "text": text,
                "fields": fields,
            })
        })
        .collect())
}

/// Human-readable lines for the CLI.
pub fn render(hits: &[Value]) -> String {
    if hits.is_empty() {
        return "no results\n".to_string();
    }
    let mut out = String::new();
    for (i, h) in hits.iter().enumerate() {
        let text = h["text"].as_str().unwrap_or("");
        let short: String = text.chars().take(160).collect();
        out.push_str(&format!(
            "{:>2}. {:.3}  {} {}\n    {}{}\n",
            i + 1,
            h["score"].as_f64().unwrap_or(0.0),
            h["table"].as_str().unwrap_or("?"),
            h["key"].as_str().unwrap_or("?"),
            short.replace('\n', " "),
            if text.chars().count() > 160 {
                "…"
            } else {
                ""
            }
        ));
    }
    out
}
