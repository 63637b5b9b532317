//! `config.toml`: every knob of the daemon, with its default.
//!
//! The file is read, then overridden by environment variables named
//! `CDC_INDEXER__SECTION__KEY` (e.g. `CDC_INDEXER__BROKER__PREFETCH=1000`), then deserialized
//! into these structs. Unknown keys are rejected, so a typo fails at start instead of silently
//! meaning "default". Secrets (the AMQP password, API keys) never live in the file: each is read
//! from an environment variable or a file that the config names.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// RabbitMQ connection and consumer settings.
    #[serde(default)]
    pub broker: BrokerConfig,
    /// Names of the exchanges and queues the daemon declares.
    #[serde(default)]
    pub topology: TopologyConfig,
    /// Batching and flow.
    #[serde(default)]
    pub pipeline: PipelineConfig,
    /// The embedding provider.
    #[serde(default)]
    pub embedding: EmbeddingConfig,
    /// The vector index.
    #[serde(default)]
    pub sink: SinkConfig,
    /// The side HTTP port (`/healthz`, `/readyz`, `/metrics`, `/search`, `/index/*`).
    #[serde(default)]
    pub http: HttpConfig,
    /// `reconcile`: the source database it compares the index with, and the daemon's own
    /// periodic runs.
    #[serde(default)]
    pub reconcile: ReconcileConfig,
    /// One rule per captured table: how a row becomes a document.
    #[serde(default)]
    pub tables: Vec<TableRule>,
}

/// `[reconcile]`: proving that the index equals the source tables (`cdc-indexer reconcile`,
/// and the daemon's periodic check).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReconcileConfig {
    /// PostgreSQL URL of the source database, e.g. `postgres://reconcile@db:5432/app`
    /// (`--source` wins). No password here: see `password_env` / `password_file`. Default: none.
    pub source_url: Option<String>,
    /// Environment variable holding the source database's password. Default
    /// `CDC_INDEXER_SOURCE_PASSWORD`.
    pub password_env: String,
    /// File holding the source database's password (first line; wins over `password_env`).
    /// Default: none.
    pub password_file: Option<PathBuf>,
    /// Seconds between the daemon's own reconcile runs; 0 turns them off. Default 0 (off).
    pub interval_s: u64,
    /// The daemon's runs also repair what they find (as `reconcile --repair`). Default false.
    pub repair: bool,
    /// Tables to reconcile (`schema.table`, each with a `[[tables]]` rule). Empty (default):
    /// every rule's table.
    pub tables: Vec<String>,
    /// Source rows (and index points) read per page: the memory bound. Default 500.
    pub page_size: usize,
    /// The Debezium connector name (`source.name`) repair events carry, so that their
    /// positions compare with the stream's. Default: the one the index's stored positions
    /// name, else the first segment of `topology.routing_patterns[0]`.
    pub connector: Option<String>,
    /// Examples of each state kept per table in the report. Default 5.
    pub examples: usize,
}

impl Default for ReconcileConfig {
    fn default() -> Self {
        Self {
            source_url: None,
            password_env: "CDC_INDEXER_SOURCE_PASSWORD".into(),
            password_file: None,
            interval_s: 0,
            repair: false,
            tables: Vec::new(),
            page_size: 500,
            connector: None,
            examples: 5,
        }
    }
}

/// `[broker]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// AMQP URL. Default `amqp://guest@127.0.0.1:5672/%2f`. The password may be given here for
    /// local development, but in production comes from `password_env` or `password_file`.
    pub url: String,
    /// Environment variable holding the AMQP password. Default `CDC_INDEXER_AMQP_PASSWORD`.
    pub password_env: String,
    /// File holding the AMQP password (first line). Default: none.
    pub password_file: Option<PathBuf>,
    /// Unacknowledged deliveries the broker may push to us (basic.qos). Default 512.
    pub prefetch: u16,
    /// Connection name shown in the RabbitMQ management UI. Default `cdc-indexer`.
    pub connection_name: String,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            url: "amqp://guest@127.0.0.1:5672/%2f".into(),
            password_env: "CDC_INDEXER_AMQP_PASSWORD".into(),
            password_file: None,
            prefetch: 512,
            connection_name: "cdc-indexer".into(),
        }
    }
}

/// `[topology]`: see DESIGN §2 and `topology/README.md`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TopologyConfig {
    /// Topic exchange Debezium Server publishes to. Default `cdc.events`.
    pub exchange: String,
    /// Dead-letter exchange (fanout). Default `cdc.events.dlx`.
    pub dead_letter_exchange: String,
    /// Dead-letter queue bound to the DLX. Default `cdc-indexer.dlq`.
    pub dead_letter_queue: String,
    /// Main queue. Default `cdc-indexer`.
    pub queue: String,
    /// `quorum` (default, replicated) or `classic`.
    pub queue_type: QueueType,
    /// `x-delivery-limit` of a quorum queue: returns before the broker itself dead-letters a
    /// message. RabbitMQ 3.x counts *every* return (each restart returns every prefetched
    /// delivery), so this is only the last resort: the daemon's crash-loop guard
    /// (`pipeline.crash_limit`) dead-letters a message that really crashes it long before.
    /// Default 50. Ignored for classic queues.
    pub delivery_limit: u32,
    /// Binding patterns of the main queue on the exchange. Default `["dbserver1.public.#"]`.
    pub routing_patterns: Vec<String>,
}

impl Default for TopologyConfig {
    fn default() -> Self {
        Self {
            exchange: "cdc.events".into(),
            dead_letter_exchange: "cdc.events.dlx".into(),
            dead_letter_queue: "cdc-indexer.dlq".into(),
            queue: "cdc-indexer".into(),
            queue_type: QueueType::Quorum,
            delivery_limit: 50,
            routing_patterns: vec!["dbserver1.public.#".into()],
        }
    }
}

/// Main queue type.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// Replicated Raft queue; supports `x-delivery-limit`.
    Quorum,
    /// Classic queue.
    Classic,
}

/// `[pipeline]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Close a batch at this many events. Default 256.
    pub batch_max_events: usize,
    /// Close a batch this long after its first event. Default 250 ms.
    pub batch_max_wait_ms: u64,
    /// On SIGTERM, time allowed to finish the open batch before abandoning it (unacked, so the
    /// broker redelivers it). Default 10000 ms.
    pub shutdown_deadline_ms: u64,
    /// What to do with an event of a table that has no rule: `skip` (ack, count) or
    /// `dead-letter`. Default `skip`.
    pub unknown_table: UnknownTable,
    /// First delay of the retry backoff for transient sink/embedder failures. Default 500 ms.
    pub retry_initial_ms: u64,
    /// Cap of the retry backoff delay. Default 30000 ms.
    pub retry_max_ms: u64,
    /// Close a batch at this many bytes of message bodies. Default 16777216 (16 MiB).
    pub batch_max_bytes: usize,
    /// Close a batch once it holds about this many texts (chunks) to embed, so no batch
    /// outlives the shutdown deadline by much. Default 512.
    pub batch_max_texts: usize,
    /// Adaptive batching: once no further delivery has arrived for this long, the batch is
    /// processed without waiting out `batch_max_wait_ms` (the prefetch buffer ran dry).
    /// Default 5 ms.
    pub batch_idle_ms: u64,
    /// Directory of the crash journal (`in-flight.json`): which deliveries were being
    /// processed, so that after a crash only those are suspects. Default `data/state`.
    pub state_dir: PathBuf,
    /// Times a delivery may crash the daemon while processed alone before the daemon
    /// dead-letters it (kind `crash-loop`). Default 3.
    pub crash_limit: u32,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            batch_max_events: 256,
            batch_max_wait_ms: 250,
            shutdown_deadline_ms: 10_000,
            unknown_table: UnknownTable::Skip,
            retry_initial_ms: 500,
            retry_max_ms: 30_000,
            batch_max_bytes: 16 << 20,
            batch_max_texts: 512,
            batch_idle_ms: 5,
            state_dir: PathBuf::from("data/state"),
            crash_limit: 3,
        }
    }
}

/// Policy for events of tables without a rule.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum UnknownTable {
    /// Acknowledge and count as skipped.
    Skip,
    /// Send to the DLQ with error kind `unknown-table`.
    DeadLetter,
}

/// `[embedding]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddingConfig {
    /// `fastembed` (in-process ONNX, default) or `http` (OpenAI-compatible `/v1/embeddings`).
    pub provider: EmbeddingProvider,
    /// fastembed: directory with `model.onnx`, `tokenizer.json`, `config.json`,
    /// `special_tokens_map.json`, `tokenizer_config.json`. Default `.models/all-minilm-l6-v2`.
    pub model_dir: PathBuf,
    /// fastembed: the ONNX Runtime shared library. Default
    /// `.models/onnxruntime/libonnxruntime.so`; env `ORT_DYLIB_PATH` wins when set.
    pub onnxruntime_lib: PathBuf,
    /// fastembed: tokens per text; longer texts are truncated. Default 256.
    pub max_length: usize,
    /// Texts per model call (fastembed) or per request (http). Default 32.
    pub batch_size: usize,
    /// http: also cap a request at this many characters in total. Default 60000.
    pub max_batch_chars: usize,
    /// Vector size. Default 384 (all-MiniLM-L6-v2). For `http`, sent as `dimensions` only if
    /// `send_dimensions` is true; the size of returned vectors is always checked.
    pub dimensions: usize,
    /// http: base URL up to and including `/v1`, e.g. `http://127.0.0.1:11434/v1`.
    pub url: String,
    /// http: model name sent in each request. Default `all-minilm-l6-v2`.
    pub model: String,
    /// http: environment variable holding the API key (sent as a Bearer token). Default
    /// `CDC_INDEXER_EMBEDDING_API_KEY`; unset means no Authorization header.
    pub api_key_env: String,
    /// http: file holding the API key (wins over `api_key_env`). Default: none.
    pub api_key_file: Option<PathBuf>,
    /// http: send `dimensions` in requests (OpenAI text-embedding-3 models). Default false.
    pub send_dimensions: bool,
    /// http: per-request timeout. Default 30000 ms.
    pub timeout_ms: u64,
}

impl Default for EmbeddingConfig {
    fn default() -> Self {
        Self {
            provider: EmbeddingProvider::Fastembed,
            model_dir: PathBuf::from(".models/all-minilm-l6-v2"),
            onnxruntime_lib: PathBuf::from(".models/onnxruntime/libonnxruntime.so"),
            max_length: 256,
            batch_size: 32,
            max_batch_chars: 60_000,
            dimensions: 384,
            url: "http://127.0.0.1:8090/v1".into(),
            model: "all-minilm-l6-v2".into(),
            api_key_env: "CDC_INDEXER_EMBEDDING_API_KEY".into(),
            api_key_file: None,
            send_dimensions: false,
            timeout_ms: 30_000,
        }
    }
}

/// Embedding provider.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum EmbeddingProvider {
    /// In-process fastembed with local ONNX files.
    Fastembed,
    /// OpenAI-compatible HTTP service.
    Http,
}

/// `[sink]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SinkConfig {
    /// `embedded` (qdrant-edge on disk, default), `qdrant` (server, gRPC) or `llamaindex`
    /// (the python-indexer service).
    pub kind: SinkKind,
    /// Collection name (qdrant, llamaindex ignores it: the service owns its collection).
    /// Default `cdc_documents`.
    pub collection: String,
    /// embedded: directory of the on-disk shard. Default `data/index`.
    pub path: PathBuf,
    /// qdrant: gRPC URL (e.g. `http://127.0.0.1:6334`, `https://...` for TLS);
    /// llamaindex: base URL of python-indexer (e.g. `http://127.0.0.1:8090`).
    pub url: String,
    /// Environment variable holding the API key. Default `CDC_INDEXER_SINK_API_KEY`.
    pub api_key_env: String,
    /// File holding the API key (wins over `api_key_env`). Default: none.
    pub api_key_file: Option<PathBuf>,
    /// Per-request timeout of qdrant/llamaindex calls. Default 30000 ms.
    pub timeout_ms: u64,
}

impl Default for SinkConfig {
    fn default() -> Self {
        Self {
            kind: SinkKind::Embedded,
            collection: "cdc_documents".into(),
            path: PathBuf::from("data/index"),
            url: String::new(),
            api_key_env: "CDC_INDEXER_SINK_API_KEY".into(),
            api_key_file: None,
            timeout_ms: 30_000,
        }
    }
}

/// Sink implementation.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SinkKind {
    /// qdrant-edge in-process.
    Embedded,
    /// Qdrant server over gRPC.
    Qdrant,
    /// python-indexer over HTTP.
    Llamaindex,
}

/// `[http]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Listen address of the side port. Default `127.0.0.1:9187`.
    pub listen: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9187".into(),
        }
    }
}

/// `[[tables]]`: how rows of one table become documents.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableRule {
    /// `schema.table` as Debezium names it (`public.products`; for MySQL `database.table`).
    pub table: String,
    /// Primary-key columns that identify a document; composite keys list several. Required.
    pub id_columns: Vec<String>,
    /// Text template over columns: `{column}` is replaced by the column's value (`{{`/`}}` for
    /// literal braces). Required.
    pub text: String,
    /// Columns copied into the point payload. Empty (default) means every column except
    /// those in `exclude`.
    #[serde(default)]
    pub include: Vec<String>,
    /// Columns never copied into the payload. Default: none.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Maximum characters per chunk. Default 1000.
    #[serde(default = "default_chunk_size")]
    pub chunk_size: usize,
    /// Characters shared by consecutive chunks. Default 100.
    #[serde(default = "default_chunk_overlap")]
    pub chunk_overlap: usize,
    /// Most chunks one document is indexed with. A longer text is indexed by its first
    /// `max_chunks` chunks (counted in `cdc_indexer_documents_truncated_total`); the row's
    /// fields and the hash of the whole text are stored as usual. Default 100.
    #[serde(default = "default_max_chunks")]
    pub max_chunks: usize,
}

fn default_chunk_size() -> usize {
    1000
}
fn default_chunk_overlap() -> usize {
    100
}
fn default_max_chunks() -> usize {
    100
}

/// A configuration error, written for the operator who has to fix it.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct ConfigError {
    file: String,
    message: String,
}

impl Config {
    /// Reads `path`, applies `CDC_INDEXER__*` environment overrides, validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let err = |message: String| ConfigError {
            file: file.clone(),
            message,
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| err(format!("cannot read the config file: {e}")))?;
        Self::from_toml(&file, &text, std::env::vars())
    }

    /// Parses config text (named `file` in errors) with the given environment.
    pub fn from_toml(
        file: &str,
        text: &str,
        env: impl Iterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let err = |message: String| ConfigError {
            file: file.to_string(),
            message,
        };
        let mut doc: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| err(e.to_string()))?;
        apply_env_overrides(&mut doc, env).map_err(err)?;
        let config: Config = doc
            .try_into()
            .map_err(|e: toml::de::Error| err(e.to_string()))?;
        config.validate().map_err(err)?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        if self.broker.prefetch == 0 {
            return Err("broker.prefetch: must be at least 1".into());
        }
        if self.topology.routing_patterns.is_empty() {
            return Err("topology.routing_patterns: list at least one binding pattern, e.g. [\"dbserver1.public.#\"]".into());
        }
        if self.pipeline.batch_max_events == 0 {
            return Err("pipeline.batch_max_events: must be at least 1".into());
        }
        if self.pipeline.batch_max_bytes == 0 || self.pipeline.batch_max_texts == 0 {
            return Err(
                "pipeline.batch_max_bytes / pipeline.batch_max_texts: must be at least 1".into(),
            );
        }
        if self.pipeline.crash_limit == 0 {
            return Err("pipeline.crash_limit: must be at least 1".into());
        }
        if self.embedding.batch_size == 0 {
            return Err("embedding.batch_size: must be at least 1".into());
        }
        if self.embedding.dimensions == 0 {
            return Err("embedding.dimensions: must be at least 1".into());
        }
        if self.sink.kind != SinkKind::Embedded && self.sink.url.is_empty() {
            return Err(format!(
                "sink.url: required for sink.kind = \"{}\"",
                match self.sink.kind {
                    SinkKind::Qdrant => "qdrant",
                    _ => "llamaindex",
                }
            ));
        }
        let r = &self.reconcile;
        if r.page_size == 0 {
            return Err("reconcile.page_size: must be at least 1".into());
        }
        if r.interval_s > 0 && r.source_url.as_deref().is_none_or(str::is_empty) {
            return Err("reconcile.source_url: required when reconcile.interval_s is set (the database to compare the index with, e.g. postgres://reconcile@db:5432/app)".into());
        }
        if let Some(url) = r.source_url.as_deref()
            && !(url.starts_with("postgres://") || url.starts_with("postgresql://"))
        {
            return Err(format!(
                "reconcile.source_url: expected a postgres:// URL, got `{}`",
                redact_url(url)
            ));
        }
        for (i, table) in r.tables.iter().enumerate() {
            if !self.tables.iter().any(|t| &t.table == table) {
                return Err(format!(
                    "reconcile.tables[{i}]: `{table}` has no [[tables]] rule; rules are {}",
                    self.tables
                        .iter()
                        .map(|t| t.table.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
        let mut seen = BTreeMap::new();
        for (i, rule) in self.tables.iter().enumerate() {
            let at = format!("tables[{i}]");
            if rule.table.split('.').count() != 2 || rule.table.split('.').any(str::is_empty) {
                return Err(format!(
                    "{at}.table: expected `schema.table` (e.g. `public.products`), got `{}`",
                    rule.table
                ));
            }
            if let Some(first) = seen.insert(rule.table.clone(), i) {
                return Err(format!(
                    "{at}.table: `{}` already has a rule at tables[{first}]",
                    rule.table
                ));
            }
            if rule.id_columns.is_empty() {
                return Err(format!("{at}.id_columns: list at least one key column"));
            }
            if let Err(e) = crate::mapping::Template::parse(&rule.text) {
                return Err(format!("{at}.text: {e}"));
            }
            if rule.chunk_size == 0 {
                return Err(format!("{at}.chunk_size: must be at least 1"));
            }
            if rule.max_chunks == 0 {
                return Err(format!("{at}.max_chunks: must be at least 1"));
            }
            if rule.chunk_overlap >= rule.chunk_size {
                return Err(format!(
                    "{at}.chunk_overlap: must be smaller than chunk_size ({}), got {}",
                    rule.chunk_size, rule.chunk_overlap
                ));
            }
        }
        Ok(())
    }

    /// The rule for `schema.table`, if any.
    pub fn rule(&self, table: &str) -> Option<&TableRule> {
        self.tables.iter().find(|r| r.table == table)
    }
}

/// Applies `CDC_INDEXER__SECTION__KEY=value` overrides. Values are parsed as TOML values when
/// they parse (numbers, booleans, arrays), otherwise taken as strings.
fn apply_env_overrides(
    doc: &mut toml::Table,
    env: impl Iterator<Item = (String, String)>,
) -> Result<(), String> {
    for (name, raw) in env {
        let Some(path) = name.strip_prefix("CDC_INDEXER__") else {
            continue;
        };
        let keys: Vec<String> = path.split("__").map(|k| k.to_ascii_lowercase()).collect();
        if keys.len() != 2 || keys.iter().any(String::is_empty) {
            return Err(format!(
                "environment variable {name}: expected CDC_INDEXER__SECTION__KEY"
            ));
        }
        let value = format!("v = {raw}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or(toml::Value::String(raw));
        let section = doc
            .entry(keys[0].clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let toml::Value::Table(section) = section else {
            return Err(format!(
                "environment variable {name}: `{}` is not a table in the config",
                keys[0]
            ));
        };
        section.insert(keys[1].clone(), value);
    }
    Ok(())
}

/// Reads a secret from a file (first line, trimmed) or an environment variable.
pub fn read_secret(file: Option<&Path>, env_var: &str) -> Result<Option<String>, String> {
    if let Some(file) = file {
        let text = std::fs::read_to_string(file)
            .map_err(|e| format!("cannot read secret file {}: {e}", file.display()))?;
        return Ok(Some(text.lines().next().unwrap_or("").trim().to_string()));
    }
    Ok(std::env::var(env_var).ok().filter(|v| !v.is_empty()))
}

/// `scheme://user:***@host/...`: a URL safe to log.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            let shown = if userinfo.contains(':') {
                format!("{user}:***")
            } else {
                user.to_string()
            };
            format!("{scheme}://{shown}@{host}{path}")
        }
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[[tables]]
table = "public.products"
id_columns = ["id"]
text = "{name}\n\n{description}"
"#;

    #[test]
    fn defaults_fill_a_minimal_file() {
        let c = Config::from_toml("config.toml", MINIMAL, std::iter::empty()).unwrap();
        assert_eq!(c.topology.exchange, "cdc.events");
        assert_eq!(c.topology.queue_type, QueueType::Quorum);
        assert_eq!(c.tables[0].chunk_size, 1000);
        assert_eq!(c.sink.kind, SinkKind::Embedded);
    }

    #[test]
    fn unknown_key_is_rejected_with_file_and_key() {
        let text = format!("{MINIMAL}\n[broker]\nprefetsh = 3\n");
        let e = Config::from_toml("config.toml", &text, std::iter::empty())
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("config.toml:"), "{e}");
        assert!(e.contains("prefetsh"), "{e}");
    }

    #[test]
    fn bad_table_rule_names_its_index() {
        let text = format!(
            "{MINIMAL}\n[[tables]]\ntable = \"public.orders\"\nid_columns = []\ntext = \"x\"\n"
        );
        let e = Config::from_toml("c.toml", &text, std::iter::empty())
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "c.toml: tables[1].id_columns: list at least one key column"
        );
    }

    #[test]
    fn env_overrides_typed_values() {
        let env = vec![
            ("CDC_INDEXER__BROKER__PREFETCH".to_string(), "7".to_string()),
            (
                "CDC_INDEXER__SINK__PATH".to_string(),
                "/tmp/x y".to_string(),
            ),
            ("OTHER".to_string(), "1".to_string()),
        ];
        let c = Config::from_toml("c.toml", MINIMAL, env.into_iter()).unwrap();
        assert_eq!(c.broker.prefetch, 7);
        assert_eq!(c.sink.path, PathBuf::from("/tmp/x y"));
    }

    #[test]
    fn wrong_type_names_the_key() {
        let text = format!("{MINIMAL}\n[broker]\nprefetch = \"many\"\n");
        let e = Config::from_toml("c.toml", &text, std::iter::empty())
            .unwrap_err()
            .to_string();
        assert!(e.contains("prefetch"), "{e}");
    }

    #[test]
    fn reconcile_section_is_checked_naming_its_keys() {
        let with = |extra: &str| {
            Config::from_toml(
                "c.toml",
                &format!("{MINIMAL}\n[reconcile]\n{extra}\n"),
                std::iter::empty(),
            )
            .map_err(|e| e.to_string())
        };
        let c = with("").unwrap();
        assert_eq!((c.reconcile.interval_s, c.reconcile.page_size), (0, 500));
        let e = with("interval_s = 60").unwrap_err();
        assert!(
            e.starts_with("c.toml: reconcile.source_url: required"),
            "{e}"
        );
        let e = with("source_url = \"mysql://u:secret@h/db\"").unwrap_err();
        assert!(
            e.contains("reconcile.source_url: expected a postgres:// URL"),
            "{e}"
        );
        assert!(!e.contains("secret"), "redacted: {e}");
        let e = with("tables = [\"public.orders\"]").unwrap_err();
        assert!(
            e.contains("reconcile.tables[0]: `public.orders` has no [[tables]] rule"),
            "{e}"
        );
        assert!(
            with("sourse_url = \"x\"")
                .unwrap_err()
                .contains("sourse_url")
        );
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("amqp://guest:secret@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact_url("amqp://127.0.0.1/"), "amqp://127.0.0.1/");
        assert_eq!(redact_url("amqp://u@h"), "amqp://u@h");
    }
}
