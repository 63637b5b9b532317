//! Text → vector, behind one trait.
//!
//! [`local::LocalEmbedder`] runs all-MiniLM-L6-v2 in-process with fastembed (ONNX Runtime,
//! model files on disk, Mean pooling); [`http::HttpEmbedder`] calls an OpenAI-compatible
//! `/v1/embeddings` service (Ollama, vLLM, TEI, OpenAI, our python-indexer).

pub mod concurrency;
pub mod http;
pub mod local;

/// The text a provider is asked to embed to tell a rejected input from a rejected request.
pub const CANARY_TEXT: &str = "cdc-indexer canary";

use std::sync::Arc;

use async_trait::async_trait;

use crate::config::{EmbeddingConfig, EmbeddingProvider};
use crate::error::StageError;

#[async_trait]
pub trait Embedder: Send + Sync {
    /// Vector size.
    fn dimensions(&self) -> usize;

    /// One vector per text, in order. A poison error carries `item` = the index of the text
    /// that the provider rejected, when it can tell. A rejection that a harmless canary text
    /// gets too is about the request, not the input: fatal, never poison.
    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, StageError>;

    /// Requests it may have in flight right now (adaptive for a remote service).
    fn concurrency(&self) -> usize {
        1
    }
}

/// Builds the configured embedder. Fails (fatal) when model files or the runtime are missing.
pub async fn from_config(config: &EmbeddingConfig) -> Result<Arc<dyn Embedder>, StageError> {
    Ok(match config.provider {
        EmbeddingProvider::Fastembed => {
            let config = config.clone();
            let embedder = tokio::task::spawn_blocking(move || local::LocalEmbedder::load(&config))
                .await
                .map_err(|e| StageError::fatal(format!("loading the model panicked: {e}")))??;
            Arc::new(embedder)
        }
        EmbeddingProvider::Http => Arc::new(http::HttpEmbedder::new(config)?),
    })
}
