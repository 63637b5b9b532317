//! Embeddings from an OpenAI-compatible `POST {url}/embeddings` service.
//!
//! Requests carry at most `batch_size` texts and `max_batch_chars` characters. A 429 is
//! retried after its `Retry-After` (a few times, then reported as transient so the pipeline
//! pauses); 5xx and timeouts are transient. A 400 on a multi-text request is bisected to find
//! the text the service rejects, so only that text's event is dead-lettered.

use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::json;

use super::concurrency::{Limiter, Signal};
use super::{CANARY_TEXT, Embedder};
use crate::config::{EmbeddingConfig, read_secret, redact_url};
use crate::error::{ErrorKind, StageError};

pub struct HttpEmbedder {
    client: reqwest::Client,
    endpoint: String,
    model: String,
    api_key: Option<String>,
    dimensions: usize,
    send_dimensions: bool,
    batch_size: usize,
    max_batch_chars: usize,
    /// Requests in flight at once: adaptive, up to `embedding.max_in_flight`.
    limiter: Limiter,
    max_in_flight: usize,
}

#[derive(Deserialize)]
struct Response {
    data: Vec<Item>,
}

#[derive(Deserialize)]
struct Item {
    index: usize,
    embedding: Vec<f32>,
}

/// How many 429s in a row one request waits out before giving up (transient).
const MAX_RATE_LIMIT_WAITS: u32 = 5;

impl HttpEmbedder {
    pub fn new(config: &EmbeddingConfig) -> Result<HttpEmbedder, StageError> {
        if config.url.is_empty() {
            return Err(StageError::fatal(
                "embedding.url: required for embedding.provider = \"http\"",
            ));
        }
        let api_key = read_secret(config.api_key_file.as_deref(), &config.api_key_env)
            .map_err(StageError::fatal)?;
        let builder = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.timeout_ms))
            .pool_idle_timeout(Duration::from_secs(60));
        let client = crate::tls::http(builder, "embedding", &config.tls())?
            .build()
            .map_err(|e| StageError::fatal(format!("cannot build the HTTP client: {e}")))?;
        Ok(HttpEmbedder {
            client,
            endpoint: format!("{}/embeddings", config.url.trim_end_matches('/')),
            model: config.model.clone(),
            api_key,
            dimensions: config.dimensions,
            send_dimensions: config.send_dimensions,
            batch_size: config.batch_size,
            max_batch_chars: config.max_batch_chars,
            limiter: Limiter::new(config.max_in_flight),
            max_in_flight: config.max_in_flight.max(1),
        })
    }

    /// Splits `texts` into requests by count and total characters.
    fn groups(&self, texts: &[String]) -> Vec<std::ops::Range<usize>> {
        let chars: Vec<usize> = texts.iter().map(|t| t.chars().count()).collect();
        crate::batch::split_ranges(&chars, self.batch_size, self.max_batch_chars)
    }

    async fn request(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, StageError> {
        let mut body = json!({"model": self.model, "input": texts, "encoding_format": "float"});
        if self.send_dimensions {
            body["dimensions"] = json!(self.dimensions);
        }
        let mut waits = 0;
        loop {
            let mut request = self.client.post(&self.endpoint).json(&body);
            if let Some(key) = &self.api_key {
                request = request.bearer_auth(key);
            }
            let response = request
                .send()
                .await
                .map_err(|e| StageError::from_reqwest_in(&e, "embedding"))?;
            let status = response.status();
            if matches!(status.as_u16(), 429 | 503) {
                self.limiter.record(Signal::Backpressure);
            }
            if status.as_u16() == 429 && waits < MAX_RATE_LIMIT_WAITS {
                waits += 1;
                let delay = retry_after(response.headers())
                    .unwrap_or(Duration::from_secs(1 << waits.min(5)));
                tracing::warn!(delay_ms = delay.as_millis() as u64, endpoint = %redact_url(&self.endpoint), "embedding service rate-limited us; waiting");
                crate::progress::sleep(delay).await;
                continue;
            }
            if !status.is_success() {
                // The body may quote the rejected input (row data): only its start is kept.
                let text = response.text().await.unwrap_or_default();
                return Err(StageError::from_http_status(
                    status.as_u16(),
                    crate::error::body_excerpt(&text),
                ));
            }
            let parsed: Response = response.json().await.map_err(|e| {
                StageError::transient(format!("unreadable embeddings response: {e}"))
            })?;
            crate::progress::beat();
            return self.order(parsed, texts.len());
        }
    }

    fn order(&self, response: Response, expected: usize) -> Result<Vec<Vec<f32>>, StageError> {
        if response.data.len() != expected {
            return Err(StageError::transient(format!(
                "embedding service returned {} vectors for {expected} texts",
                response.data.len()
            )));
        }
        let mut out = vec![Vec::new(); expected];
        for item in response.data {
            if item.index >= expected {
                return Err(StageError::transient(format!(
                    "embedding service returned index {} of {expected}",
                    item.index
                )));
            }
            if item.embedding.len() != self.dimensions {
                return Err(StageError::fatal(format!(
                    "embedding service returned {}-dimensional vectors but embedding.dimensions = {}",
                    item.embedding.len(),
                    self.dimensions
                )));
            }
            out[item.index] = item.embedding;
        }
        Ok(out)
    }

    /// Requests `texts`; on a poison answer, bisects to find the one text at fault.
    async fn request_isolating(
        &self,
        texts: &[String],
        offset: usize,
    ) -> Result<Vec<Vec<f32>>, StageError> {
        match self.request(texts).await {
            Err(e) if e.kind == ErrorKind::Poison && texts.len() > 1 => {
                let mid = texts.len() / 2;
                let mut left = Box::pin(self.request_isolating(&texts[..mid], offset)).await?;
                let right = Box::pin(self.request_isolating(&texts[mid..], offset + mid)).await?;
                left.extend(right);
                Ok(left)
            }
            Err(e) if e.kind == ErrorKind::Poison => {
                // One text refused. If a harmless canary is refused too, the service refuses
                // every request (wrong model name, dimensions, key): not this input's fault.
                match self.request(&[CANARY_TEXT.to_string()]).await {
                    Err(canary) if canary.kind == ErrorKind::Poison => {
                        Err(StageError::fatal(format!(
                            "the embedding service refuses every request, a canary text too: {}; \
                         check embedding.model, embedding.dimensions / send_dimensions and the API key",
                            canary.message
                        )))
                    }
                    _ => Err(e.at(offset)),
                }
            }
            other => other,
        }
    }
}

fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    let secs: f64 = value.trim().parse().ok()?;
    Some(Duration::from_secs_f64(secs.clamp(0.0, 300.0)))
}

#[async_trait]
impl Embedder for HttpEmbedder {
    fn dimensions(&self) -> usize {
        self.dimensions
    }

    fn concurrency(&self) -> usize {
        self.limiter.limit()
    }

    /// Requests run concurrently (adaptive, up to `max_in_flight`); vectors come back in
    /// the order of `texts`.
    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, StageError> {
        use futures_util::StreamExt;
        let requests = self.groups(texts).into_iter().map(|range| async move {
            let _permit = self.limiter.acquire().await;
            let started = std::time::Instant::now();
            let start = range.start;
            let result = self.request_isolating(&texts[range], start).await;
            self.limiter.record(match &result {
                Ok(_) => Signal::Ok(started.elapsed()),
                Err(e) if e.kind == ErrorKind::Transient => Signal::Backpressure,
                Err(_) => Signal::Other,
            });
            result
        });
        let mut results = futures_util::stream::iter(requests).buffered(self.max_in_flight);
        let mut out = Vec::with_capacity(texts.len());
        while let Some(vectors) = results.next().await {
            out.extend(vectors?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_capped_by_count_and_characters() {
        let config = EmbeddingConfig {
            provider: crate::config::EmbeddingProvider::Http,
            url: "http://x/v1".into(),
            batch_size: 3,
            max_batch_chars: 10,
            ..EmbeddingConfig::default()
        };
        let e = HttpEmbedder::new(&config).unwrap();
        let texts: Vec<String> = ["aaaa", "bbbb", "cc", "d", "e", "f", "ggggggggggggggg"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(e.groups(&texts), vec![0..3, 3..6, 6..7]);
    }
}
