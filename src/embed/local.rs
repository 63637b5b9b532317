//! In-process embeddings: fastembed over ONNX Runtime, model files on disk.
//!
//! `TextEmbedding::embed` is blocking and needs `&mut self`, so the model lives on its own
//! OS thread; async callers send it work over a channel and await the reply. Texts are sorted
//! by length and embedded in sub-batches of `batch_size`, so short texts are not padded to
//! the length of long ones, then put back in the caller's order.
//!
//! The model is all-MiniLM-L6-v2 with **Mean pooling** (fastembed's default for user-defined
//! models, CLS, silently gives different vectors from sentence-transformers).

use std::path::Path;
use std::sync::OnceLock;
use std::sync::{Mutex, mpsc};

use async_trait::async_trait;
use fastembed::{
    InitOptionsUserDefined, Pooling, TextEmbedding, TokenizerFiles, UserDefinedEmbeddingModel,
};
use tokio::sync::oneshot;

use super::{CANARY_TEXT, Embedder};
use crate::config::EmbeddingConfig;
use crate::error::StageError;
use crate::progress::Progress;

type Job = (
    Vec<String>,
    Progress,
    oneshot::Sender<Result<Vec<Vec<f32>>, StageError>>,
);

pub struct LocalEmbedder {
    jobs: Mutex<mpsc::Sender<Job>>,
    dimensions: usize,
}

/// ONNX Runtime can be loaded once per process.
static ORT: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();

fn ort_environment(config: &EmbeddingConfig) -> Result<ort::environment::Environment, StageError> {
    let lib = std::env::var_os("ORT_DYLIB_PATH")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| config.onnxruntime_lib.clone());
    ORT.get_or_init(|| {
        if !lib.exists() {
            return Err(format!(
                "ONNX Runtime library {} not found (embedding.onnxruntime_lib or ORT_DYLIB_PATH); run scripts/setup-models.sh",
                lib.display()
            ));
        }
        ort::init_from(&lib)
            .map_err(|e| format!("cannot load ONNX Runtime from {}: {e}", lib.display()))?
            .build()
            .map_err(|e| format!("cannot start ONNX Runtime from {}: {e}", lib.display()))
    })
    .clone()
    .map_err(StageError::fatal)
}

fn read(dir: &Path, name: &str) -> Result<Vec<u8>, StageError> {
    let path = dir.join(name);
    std::fs::read(&path).map_err(|e| {
        StageError::fatal(format!(
            "model file {} unreadable ({e}); set embedding.model_dir or run scripts/setup-models.sh",
            path.display()
        ))
    })
}

impl LocalEmbedder {
    /// Loads the model (blocking: call off the async runtime).
    pub fn load(config: &EmbeddingConfig) -> Result<LocalEmbedder, StageError> {
        let environment = ort_environment(config)?;
        let dir = &config.model_dir;
        let model = UserDefinedEmbeddingModel::new(
            read(dir, "model.onnx")?,
            TokenizerFiles {
                tokenizer_file: read(dir, "tokenizer.json")?,
                config_file: read(dir, "config.json")?,
                special_tokens_map_file: read(dir, "special_tokens_map.json")?,
                tokenizer_config_file: read(dir, "tokenizer_config.json")?,
            },
        )
        .with_pooling(Pooling::Mean);
        let options = InitOptionsUserDefined::new()
            .with_environment(environment)
            .with_max_length(config.max_length);
        let mut model = TextEmbedding::try_new_from_user_defined(model, options).map_err(|e| {
            StageError::fatal(format!("cannot load the model from {}: {e}", dir.display()))
        })?;

        // Probe once: the vector size must match the configuration.
        let probe = model
            .embed(["probe"], None)
            .map_err(|e| StageError::fatal(format!("the model failed on a probe text: {e}")))?;
        let dimensions = probe.first().map(Vec::len).unwrap_or(0);
        if dimensions != config.dimensions {
            return Err(StageError::fatal(format!(
                "the model in {} gives {dimensions}-dimensional vectors but embedding.dimensions = {}",
                dir.display(),
                config.dimensions
            )));
        }

        let batch_size = config.batch_size;
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("embedder".into())
            .spawn(move || {
                for (texts, progress, reply) in rx {
                    let _ = reply.send(embed_sorted(&mut model, &texts, batch_size, &progress));
                }
            })
            .map_err(|e| StageError::fatal(format!("cannot start the embedder thread: {e}")))?;
        Ok(LocalEmbedder {
            jobs: Mutex::new(tx),
            dimensions,
        })
    }
}

/// Embeds in length-sorted sub-batches and restores the input order, beating `progress`
/// after each sub-batch. A failed sub-batch is embedded text by text: a text that fails
/// alone, while the canary text does not, is poison (`item` names it); a model that fails on
/// the canary too is broken, which is fatal.
fn embed_sorted(
    model: &mut TextEmbedding,
    texts: &[String],
    batch_size: usize,
    progress: &Progress,
) -> Result<Vec<Vec<f32>>, StageError> {
    let mut order: Vec<usize> = (0..texts.len()).collect();
    order.sort_by_key(|&i| texts[i].len());
    let mut out: Vec<Vec<f32>> = vec![Vec::new(); texts.len()];
    for group in order.chunks(batch_size) {
        let batch: Vec<&str> = group.iter().map(|&i| texts[i].as_str()).collect();
        let vectors = match model.embed(&batch, Some(batch.len())) {
            Ok(v) => v,
            Err(_) => group
                .iter()
                .map(|&i| embed_one(model, &texts[i]).map_err(|e| e.at(i)))
                .collect::<Result<Vec<_>, _>>()?,
        };
        for (&i, v) in group.iter().zip(vectors) {
            out[i] = v;
        }
        progress.beat();
    }
    Ok(out)
}

fn embed_one(model: &mut TextEmbedding, text: &str) -> Result<Vec<f32>, StageError> {
    match model.embed([text], None) {
        Ok(mut v) => v
            .pop()
            .ok_or_else(|| StageError::fatal("the model returned no vector")),
        Err(e) => match model.embed([CANARY_TEXT], None) {
            Ok(_) => Err(StageError::poison(format!(
                "the model cannot embed this text: {e}"
            ))),
            Err(canary) => Err(StageError::fatal(format!(
                "the model fails on every text (a canary too): {canary}; check the model files and ONNX Runtime"
            ))),
        },
    }
}

#[async_trait]
impl Embedder for LocalEmbedder {
    fn dimensions(&self) -> usize {
        self.dimensions
    }

    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, StageError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, answer) = oneshot::channel();
        self.jobs
            .lock()
            .map_err(|_| StageError::fatal("embedder channel poisoned"))?
            .send((texts.to_vec(), Progress::current(), reply))
            .map_err(|_| StageError::fatal("the embedder thread has stopped"))?;
        answer
            .await
            .map_err(|_| StageError::fatal("the embedder thread has stopped"))?
    }
}
