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
    /// The connector's `decimal.handling.mode` (`precise`, `string` or `double`): how it sends
    /// `numeric` and `money`, so that reconcile reads them as the pipeline stored them.
    /// Default `precise` (Debezium's default).
    pub decimal_handling_mode: DecimalHandlingMode,
    /// The connector's `time.precision.mode` (`adaptive`, `adaptive_time_microseconds` or
    /// `connect`): `connect` sends `time` and `timestamp` in milliseconds. Default `adaptive`
    /// (Debezium's default).
    pub time_precision_mode: TimePrecisionMode,
}

/// Debezium's `decimal.handling.mode`.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DecimalHandlingMode {
    /// Exact: `org.apache.kafka.connect.data.Decimal` (stored as decimal text).
    #[default]
    Precise,
    /// The decimal as a JSON string (the same text).
    String,
    /// A JSON double.
    Double,
}

/// Debezium's `time.precision.mode`.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TimePrecisionMode {
    /// The column's own precision (µs for `time`/`timestamp`).
    #[default]
    Adaptive,
    /// µs for `time` too (the same values as `adaptive` for PostgreSQL).
    AdaptiveTimeMicroseconds,
    /// Kafka Connect's `Time`/`Timestamp`: milliseconds (sub-millisecond digits are cut).
    Connect,
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
            decimal_handling_mode: DecimalHandlingMode::Precise,
            time_precision_mode: TimePrecisionMode::Adaptive,
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
    /// amqps: PEM file of a CA to trust besides the system's (a private CA). Default: none.
    pub tls_ca_file: Option<PathBuf>,
    /// amqps: PEM client certificate (chain) to present; needs `tls_client_key_file`.
    /// Default: none.
    pub tls_client_cert_file: Option<PathBuf>,
    /// amqps: PEM private key (PKCS#8, PKCS#1 or SEC1) of `tls_client_cert_file`. Default: none.
    pub tls_client_key_file: Option<PathBuf>,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            url: "amqp://guest@127.0.0.1:5672/%2f".into(),
            password_env: "CDC_INDEXER_AMQP_PASSWORD".into(),
            password_file: None,
            prefetch: 512,
            connection_name: "cdc-indexer".into(),
            tls_ca_file: None,
            tls_client_cert_file: None,
            tls_client_key_file: None,
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
    /// http over https: PEM file of a CA to trust besides the bundled roots. Default: none.
    pub tls_ca_file: Option<PathBuf>,
    /// http over https: PEM client certificate to present; needs `tls_client_key_file`.
    /// Default: none.
    pub tls_client_cert_file: Option<PathBuf>,
    /// http over https: PEM private key of `tls_client_cert_file`. Default: none.
    pub tls_client_key_file: Option<PathBuf>,
    /// http: most requests in flight at once. The number adapts between 1 and this to the
    /// service's latency and back-pressure (429/503). Default 4.
    pub max_in_flight: usize,
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
            tls_ca_file: None,
            tls_client_cert_file: None,
            tls_client_key_file: None,
            max_in_flight: 4,
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
    /// llamaindex over https: PEM file of a CA to trust besides the bundled roots. qdrant
    /// over https: see README (the Qdrant client trusts the system store). Default: none.
    pub tls_ca_file: Option<PathBuf>,
    /// llamaindex over https: PEM client certificate; needs `tls_client_key_file`. Default:
    /// none.
    pub tls_client_cert_file: Option<PathBuf>,
    /// llamaindex over https: PEM private key of `tls_client_cert_file`. Default: none.
    pub tls_client_key_file: Option<PathBuf>,
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
            tls_ca_file: None,
            tls_client_cert_file: None,
            tls_client_key_file: None,
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
    /// Listen address (`IP:port`) of the side port: `/healthz`, `/readyz`, `/metrics`.
    /// Default `127.0.0.1:9187`.
    pub listen: String,
    /// Listen address (`IP:port`) of the search port (`/search`, which returns row payloads).
    /// Default: none, search is off. `cdc-indexer search` asks here when set.
    pub search_listen: Option<String>,
    /// Environment variable holding a bearer token that `/search` then requires. Default
    /// `CDC_INDEXER_SEARCH_TOKEN`; unset means no token.
    pub search_token_env: String,
    /// File holding the search token (wins over `search_token_env`). Default: none.
    pub search_token_file: Option<PathBuf>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9187".into(),
            search_listen: None,
            search_token_env: "CDC_INDEXER_SEARCH_TOKEN".into(),
            search_token_file: None,
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

impl ConfigError {
    /// An error about `file`; `message` starts with the key (`section.key: ...`).
    pub fn new(file: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            file: file.into(),
            message: message.into(),
        }
    }
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
        // toml's own error text quotes the offending line of the file, which may hold a
        // password: only its message (values scrubbed) and position are shown.
        let mut doc: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| err(toml_error(text, &e)))?;
        apply_env_overrides(&mut doc, env).map_err(err)?;
        let config: Config = doc
            .try_into()
            .map_err(|e: toml::de::Error| err(toml_error(text, &e)))?;
        config.validate().map_err(err)?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        let amqps = check_url("broker.url", &self.broker.url, &["amqp", "amqps"])? == "amqps";
        check_amqp_uri(&self.broker.url)?;
        check_tls(
            "broker",
            &self.broker.tls(),
            amqps,
            "broker.url is amqp://; use amqps://",
        )?;
        if self.embedding.provider == EmbeddingProvider::Http {
            let https = check_url("embedding.url", &self.embedding.url, &["http", "https"])?;
            check_tls(
                "embedding",
                &self.embedding.tls(),
                https == "https",
                "embedding.url is http://; use https://",
            )?;
        }
        if self.sink.kind != SinkKind::Embedded && !self.sink.url.is_empty() {
            let https = check_url("sink.url", &self.sink.url, &["http", "https"])?;
            check_tls(
                "sink",
                &self.sink.tls(),
                https == "https",
                "sink.url is http://; use https://",
            )?;
            if self.sink.kind == SinkKind::Qdrant && self.sink.tls() != TlsFiles::default() {
                return Err(
                    "sink.tls_*: the qdrant sink's client trusts the system store only \
                    (qdrant-client has no option for another CA or a client certificate); \
                    add the CA to the system store or point SSL_CERT_FILE at a bundle that holds it"
                        .into(),
                );
            }
        }
        check_socket_addr("http.listen", &self.http.listen)?;
        if let Some(search) = &self.http.search_listen {
            check_socket_addr("http.search_listen", search)?;
            if search == &self.http.listen {
                return Err(format!(
                    "http.search_listen: `{search}` is also http.listen; search needs a port of its own"
                ));
            }
        }
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
        if self.embedding.max_in_flight == 0 {
            return Err("embedding.max_in_flight: must be at least 1".into());
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
        if let Some(url) = r.source_url.as_deref().filter(|u| !u.is_empty()) {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                return Err(format!(
                    "reconcile.source_url: expected a postgres:// URL, got `{}`",
                    redact_url(url)
                ));
            }
            check_url("reconcile.source_url", url, &["postgres", "postgresql"])?;
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
///
/// Fails closed: a URL that does not parse, or whose user-info cannot be told apart from the
/// rest (an `@` after the host, as an unencoded `/`, `?` or `#` in a password makes), is shown
/// without anything after its scheme.
pub fn redact_url(url: &str) -> String {
    match parse_url(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                // Cannot fail: a URL with a password has a host.
                let _ = parsed.set_password(Some("***"));
            }
            parsed.to_string()
        }
        Err(_) => {
            let scheme = url
                .split_once("://")
                .map(|(s, _)| s)
                .filter(|s| {
                    !s.is_empty()
                        && s.chars()
                            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
                })
                .unwrap_or("?");
            format!("{scheme}://(hidden: the URL does not parse)")
        }
    }
}

/// Parses a URL strictly enough to know which part is the password.
fn parse_url(url: &str) -> Result<url::Url, String> {
    let parsed = url::Url::parse(url).map_err(|e| e.to_string())?;
    if parsed.cannot_be_a_base() || !url.contains("://") {
        return Err("expected scheme://host...".into());
    }
    let rest = [
        parsed.path(),
        parsed.query().unwrap_or(""),
        parsed.fragment().unwrap_or(""),
    ];
    if rest.iter().any(|part| part.contains('@')) {
        return Err(
            "an `@` follows the host: a password containing `/`, `?`, `#` or `@` must be \
            percent-encoded (`/` as %2F, `?` as %3F, `#` as %23, `@` as %40)"
                .into(),
        );
    }
    Ok(parsed)
}

/// `key`'s URL must parse with one of `schemes`; returns its scheme. The message never
/// contains the URL's user-info.
fn check_url(key: &str, url: &str, schemes: &[&str]) -> Result<String, String> {
    let expected = schemes
        .iter()
        .map(|s| format!("{s}://"))
        .collect::<Vec<_>>()
        .join(" or ");
    let parsed = parse_url(url).map_err(|why| {
        format!(
            "{key}: not a valid URL ({why}); expected {expected}host:port/...; put passwords in \
             the *_env or *_file settings instead of the URL"
        )
    })?;
    if !schemes.contains(&parsed.scheme()) {
        return Err(format!(
            "{key}: `{}` has scheme `{}`; expected {expected}",
            redact_url(url),
            parsed.scheme()
        ));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(format!("{key}: `{}` names no host", redact_url(url)));
    }
    Ok(parsed.scheme().to_string())
}

/// The broker URL must also be one lapin's AMQP URI parser takes (port, vhost, query).
fn check_amqp_uri(url: &str) -> Result<(), String> {
    url.parse::<lapin::uri::AMQPUri>().map(|_| ()).map_err(|_| {
        format!(
            "broker.url: `{}` is not a valid AMQP URI; expected amqp://user@host:5672/vhost \
             (vhost `/` is written %2f; options: heartbeat, connection_timeout, frame_max, \
             channel_max, auth_mechanism)",
            redact_url(url)
        )
    })
}

fn check_socket_addr(key: &str, value: &str) -> Result<(), String> {
    value
        .parse::<std::net::SocketAddr>()
        .map(|_| ())
        .map_err(|_| {
            format!(
                "{key}: `{value}` is not a socket address; expected IP:port, e.g. 127.0.0.1:9187"
            )
        })
}

fn check_tls(section: &str, tls: &TlsFiles, encrypted: bool, plain: &str) -> Result<(), String> {
    if tls.client_cert_file.is_some() != tls.client_key_file.is_some() {
        return Err(format!(
            "{section}.tls_client_cert_file / {section}.tls_client_key_file: give both or neither"
        ));
    }
    if *tls != TlsFiles::default() && !encrypted {
        return Err(format!("{section}.tls_*: TLS files are set but {plain}"));
    }
    Ok(())
}

/// The TLS files of one client: a CA to trust besides the default roots, and an optional
/// client certificate with its key (all PEM).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca_file: Option<PathBuf>,
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
}

impl BrokerConfig {
    pub fn tls(&self) -> TlsFiles {
        TlsFiles {
            ca_file: self.tls_ca_file.clone(),
            client_cert_file: self.tls_client_cert_file.clone(),
            client_key_file: self.tls_client_key_file.clone(),
        }
    }
}

impl EmbeddingConfig {
    pub fn tls(&self) -> TlsFiles {
        TlsFiles {
            ca_file: self.tls_ca_file.clone(),
            client_cert_file: self.tls_client_cert_file.clone(),
            client_key_file: self.tls_client_key_file.clone(),
        }
    }
}

impl SinkConfig {
    pub fn tls(&self) -> TlsFiles {
        TlsFiles {
            ca_file: self.tls_ca_file.clone(),
            client_cert_file: self.tls_client_cert_file.clone(),
            client_key_file: self.tls_client_key_file.clone(),
        }
    }
}

/// A toml error as `line L, column C: message`, without the quoted source line (which may
/// hold a secret) and with quoted values scrubbed from the message.
fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let message = scrub_quoted(e.message().trim());
    match e.span() {
        Some(span) => {
            let before = &text[..text.floor_char_boundary(span.start)];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            let key = key_at(text, line);
            format!("line {line}, column {column}: {key}{message}")
        }
        // Without a position (the file was parsed, then overridden from the environment, then
        // deserialized) there is no source line to quote: the full text adds only the key.
        None => scrub_quoted(&e.to_string())
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" "),
    }
}

/// `section.key: ` of a `key = value` line (and its table header), or nothing.
fn key_at(text: &str, line: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let Some(this) = lines.get(line.saturating_sub(1)) else {
        return String::new();
    };
    let Some((key, _)) = this.split_once('=') else {
        return String::new();
    };
    let key = key.trim();
    if key.is_empty()
        || !key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
    {
        return String::new();
    }
    let section = lines[..line.saturating_sub(1)]
        .iter()
        .rev()
        .map(|l| l.trim())
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    match section {
        Some(s) if !s.is_empty() => format!("{s}.{key}: "),
        _ => format!("{key}: "),
    }
}

/// Replaces the contents of "..." in a message: serde quotes the offending value.
fn scrub_quoted(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut inside = false;
    for c in message.chars() {
        if c == '"' {
            if inside {
                out.push_str("…\"");
            } else {
                out.push('"');
            }
            inside = !inside;
        } else if !inside {
            out.push(c);
        }
    }
    out
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
        // A password with an unencoded `/` makes the URL unparseable: refused at start
        // (exit 2), never retried at every run, and nothing of it is printed.
        let e = with("source_url = \"postgres://u:se/cr#et@h:5432/db\"").unwrap_err();
        assert!(e.contains("reconcile.source_url: not a valid URL"), "{e}");
        assert!(
            !e.contains("se/cr") && !e.contains("cr#et"),
            "redacted: {e}"
        );
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
        // The connector's value modes, as Debezium names them.
        let c =
            with("decimal_handling_mode = \"double\"\ntime_precision_mode = \"connect\"").unwrap();
        assert_eq!(
            (
                c.reconcile.decimal_handling_mode,
                c.reconcile.time_precision_mode
            ),
            (DecimalHandlingMode::Double, TimePrecisionMode::Connect)
        );
        let c = Config::from_toml(
            "c.toml",
            MINIMAL,
            [(
                "CDC_INDEXER__RECONCILE__DECIMAL_HANDLING_MODE".to_string(),
                "string".to_string(),
            )]
            .into_iter(),
        )
        .unwrap();
        assert_eq!(
            c.reconcile.decimal_handling_mode,
            DecimalHandlingMode::String
        );
        assert!(
            with("decimal_handling_mode = \"exact\"")
                .unwrap_err()
                .contains("decimal_handling_mode")
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
        assert_eq!(
            redact_url("https://k:s3cr%2Ft@api.example.com/v1"),
            "https://k:***@api.example.com/v1"
        );
    }

    #[test]
    fn redaction_fails_closed_on_a_url_that_does_not_parse() {
        for url in [
            "amqp://guest:Qz/Wk@127.0.0.1:5672/%2f",
            "amqp://guest:1234/Wk@127.0.0.1:5672/%2f",
            "amqp://guest:Qz?Wk@127.0.0.1/%2f",
            "amqp://guest:Qz#Wk@127.0.0.1/%2f",
            "amqp:guest:QzWk@127.0.0.1",
            "guest:QzWk@127.0.0.1",
        ] {
            let shown = redact_url(url);
            assert!(
                !shown.contains("Qz") && !shown.contains("Wk") && !shown.contains("1234"),
                "{url} → {shown}"
            );
            assert!(shown.contains("hidden"), "{url} → {shown}");
        }
    }

    #[test]
    fn a_broker_url_that_does_not_parse_is_a_config_error_without_the_password() {
        for url in [
            "amqp://guest:Sec/ret@127.0.0.1:5672/%2f",
            "amqp://guest:Sec?ret@127.0.0.1:5672/%2f",
            "amqp://guest:Sec#ret@127.0.0.1:5672/%2f",
            "http://guest:Secret@127.0.0.1:5672/%2f",
            "amqp://guest:Secret@127.0.0.1:notaport/%2f",
        ] {
            let text = format!("{MINIMAL}\n[broker]\nurl = \"{url}\"\n");
            let e = Config::from_toml("c.toml", &text, std::iter::empty())
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("c.toml: broker.url: "), "{e}");
            assert!(!e.contains("Sec"), "{url}: {e}");
        }
    }

    #[test]
    fn a_toml_syntax_error_names_the_line_not_its_text() {
        let text = "[broker]\nurl = \"amqp://guest:Secret@h/%2f\" trailing\n";
        let e = Config::from_toml("c.toml", text, std::iter::empty())
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("c.toml: line 2, column "), "{e}");
        assert!(!e.contains("Secret"), "{e}");
    }

    #[test]
    fn a_wrong_type_names_the_key_without_the_value() {
        let text = format!("{MINIMAL}\n[broker]\nprefetch = \"Secret\"\n");
        let e = Config::from_toml("c.toml", &text, std::iter::empty())
            .unwrap_err()
            .to_string();
        assert!(e.contains("prefetch"), "{e}");
        assert!(!e.contains("Secret"), "{e}");
    }

    #[test]
    fn addresses_and_schemes_are_checked() {
        let cases = [
            (
                "[http]\nlisten = \"not-an-address\"\n",
                "http.listen: `not-an-address` is not a socket address",
            ),
            (
                "[http]\nsearch_listen = \"127.0.0.1:9187\"\n",
                "http.search_listen: `127.0.0.1:9187` is also http.listen",
            ),
            (
                "[sink]\nkind = \"qdrant\"\nurl = \"grpc://q:6334\"\n",
                "sink.url: `grpc://q:6334` has scheme `grpc`",
            ),
            (
                "[embedding]\nprovider = \"http\"\nurl = \"127.0.0.1:8090/v1\"\n",
                "embedding.url: ",
            ),
            (
                "[broker]\ntls_ca_file = \"/ca.pem\"\n",
                "broker.tls_*: TLS files are set but broker.url is amqp://",
            ),
            (
                "[broker]\nurl = \"amqps://h/%2f\"\ntls_client_cert_file = \"/c.pem\"\n",
                "give both or neither",
            ),
        ];
        for (extra, expected) in cases {
            let text = format!("{MINIMAL}\n{extra}");
            let e = Config::from_toml("c.toml", &text, std::iter::empty())
                .unwrap_err()
                .to_string();
            assert!(e.contains(expected), "{extra}: {e}");
        }
        let text = format!(
            "{MINIMAL}\n[broker]\nurl = \"amqps://cdc@rabbit:5671/%2f\"\ntls_ca_file = \"/ca.pem\"\n"
        );
        assert!(Config::from_toml("c.toml", &text, std::iter::empty()).is_ok());
    }
}
