//! cdc-indexer: keeps a vector index in step with a database, from Debezium change events
//! on RabbitMQ. See ARCHITECTURE.md for the map of the code.

use cdc_indexer::{
    broker, dlq, embed, http, mapping, metrics, notify, pipeline, preflight, reconcile, search,
    sink,
};

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use cdc_indexer::config::{Config, ConfigError, read_secret, redact_url};
use cdc_indexer::error::{ErrorKind, StageError};

#[derive(Parser)]
#[command(
    name = "cdc-indexer",
    version,
    about = "Keeps a vector index in step with a database, from Debezium events on RabbitMQ"
)]
struct Cli {
    /// Configuration file.
    #[arg(
        long,
        global = true,
        default_value = "config.toml",
        env = "CDC_INDEXER_CONFIG"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (default for deployments).
    Run,
    /// Validate the configuration, and what `run` would refuse on this machine, and exit.
    CheckConfig {
        /// Check the file only, not the files it names on this machine (model, ONNX Runtime,
        /// secrets, certificates, index directory): for a config meant for another host or
        /// an image.
        #[arg(long = "static")]
        static_only: bool,
    },
    /// Manage the RabbitMQ topology.
    Topology {
        #[command(subcommand)]
        command: TopologyCommand,
    },
    /// Compare the index with the source tables (ok/missing/stale/orphan); `--repair` heals.
    Reconcile(reconcile::cli::Args),
    /// Inspect and replay the dead-letter queue.
    Dlq {
        #[command(subcommand)]
        command: dlq::DlqCommand,
    },
    /// Print the documents nearest to a text.
    Search {
        /// The query text.
        text: String,
        /// Only this table (`schema.table`).
        #[arg(long)]
        table: Option<String>,
        /// Number of results.
        #[arg(long, default_value_t = 5)]
        limit: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum TopologyCommand {
    /// Declare the exchanges, queues and bindings (idempotent).
    Declare,
    /// Report drift between the config and the broker (changes nothing; exit 1 on drift).
    Verify,
    /// Write the objects as a RabbitMQ definitions file to stdout.
    Export {
        /// Virtual host in the definitions.
        #[arg(long, default_value = "/")]
        vhost: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let config = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    // What `run` would refuse at start, checked without connecting anywhere.
    let host = match cli.command {
        Command::Run => Some(true),
        Command::CheckConfig { static_only } => Some(!static_only),
        _ => None,
    };
    if let Some(host) = host {
        let problems = preflight::check(&config, host);
        if !problems.is_empty() {
            let file = cli.config.display().to_string();
            for problem in problems {
                eprintln!("error: {}", ConfigError::new(file.clone(), problem));
            }
            return ExitCode::from(2);
        }
    }
    let daemon = matches!(cli.command, Command::Run);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Run => run(config).await,
            Command::CheckConfig { .. } => {
                println!(
                    "{}: ok ({} table rules, sink {:?}, broker {})",
                    cli.config.display(),
                    config.tables.len(),
                    config.sink.kind,
                    redact_url(&config.broker.url)
                );
                Ok(ExitCode::SUCCESS)
            }
            Command::Topology {
                command: TopologyCommand::Declare,
            } => {
                let connection = broker::connect(&config.broker, "topology").await?;
                let channel = connection
                    .create_channel()
                    .await
                    .map_err(|e| broker::amqp_error("open channel", e))?;
                broker::topology::declare(&channel, &config.topology).await?;
                let _ = connection.close(200, "done".into()).await;
                println!(
                    "declared exchange {}, DLX {}, DLQ {}, queue {}",
                    config.topology.exchange,
                    config.topology.dead_letter_exchange,
                    config.topology.dead_letter_queue,
                    config.topology.queue
                );
                Ok(ExitCode::SUCCESS)
            }
            Command::Topology {
                command: TopologyCommand::Verify,
            } => {
                let connection = broker::connect(&config.broker, "topology").await?;
                let drift = broker::topology::verify(&connection, &config.topology).await?;
                let _ = connection.close(200, "done".into()).await;
                for d in &drift {
                    println!("DRIFT {}: {}", d.object, d.problem);
                }
                println!(
                    "4 objects checked, {} drifted (bindings are not readable over AMQP and were not checked)",
                    drift.len()
                );
                Ok(if drift.is_empty() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                })
            }
            Command::Topology {
                command: TopologyCommand::Export { vhost },
            } => {
                let defs = broker::topology::definitions(&config.topology, &vhost);
                println!(
                    "{}",
                    serde_json::to_string_pretty(&defs).unwrap_or_default()
                );
                Ok(ExitCode::SUCCESS)
            }
            Command::Dlq { command } => dlq::run(&config, command).await,
            Command::Reconcile(args) => reconcile::cli::command(&config, args).await,
            Command::Search {
                text,
                table,
                limit,
                json,
            } => search_command(&config, &text, table.as_deref(), limit, json).await,
        }
    });
    // The runtime goes first: every task (and with it every handle on the embedder) ends.
    runtime.shutdown_timeout(std::time::Duration::from_secs(10));
    match result {
        Ok(code) => code,
        Err(e) => {
            // One line that says what to fix: the daemon's goes to its log (text or JSON),
            // a command's to the terminal.
            if daemon {
                tracing::error!(kind = e.kind.as_str(), "{}", e.message);
            } else {
                eprintln!("error: {}", e.message);
            }
            ExitCode::from(if e.kind == ErrorKind::Fatal { 3 } else { 1 })
        }
    }
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    // lapin (and the TLS verifier under it) logs every failure it meets (a channel or
    // connection the broker closed, I/O errors, a certificate it rejects) as an ERROR of its
    // own before handing us the same error, which we classify and report once, with what to
    // fix: their copies are off by default (`CDC_INDEXER_LOG=info,lapin=debug` shows them).
    let filter = EnvFilter::try_from_env("CDC_INDEXER_LOG").unwrap_or_else(|_| {
        EnvFilter::new("info,lapin=off,rustls_platform_verifier=off,qdrant_edge=warn,ort=warn")
    });
    // qdrant-edge 0.9 reads process-wide settings that only a Qdrant server's main
    // initialises, in private modules we cannot reach (`common::flags::init_feature_flags`,
    // `common::mmap::MULTI_MMAP_SUPPORT_CHECK_RESULT`); it warns on every read and uses the
    // defaults. Those warnings say nothing an operator can act on.
    let mut filter = filter;
    for quiet in [
        "qdrant_edge::common::flags=error",
        "qdrant_edge::common::mmap::ops=error",
    ] {
        if let Ok(directive) = quiet.parse() {
            filter = filter.add_directive(directive);
        }
    }
    // Colour only on a terminal: journald, kubectl logs and files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    if std::env::var("CDC_INDEXER_LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// The daemon: side HTTP port, embedder, sink, pipeline; exits on SIGTERM/SIGINT.
async fn run(config: Config) -> Result<ExitCode, StageError> {
    let config = Arc::new(config);
    let cancel = CancellationToken::new();
    spawn_signal_handler(cancel.clone());

    let metrics = Arc::new(
        metrics::Metrics::new().map_err(|e| StageError::fatal(format!("metrics registry: {e}")))?,
    );
    metrics.health.beat();
    let search = Arc::new(tokio::sync::OnceCell::new());
    let listener = bind("http.listen", &config.http.listen).await?;
    let http_cancel = CancellationToken::new();
    let mut http_tasks = vec![tokio::spawn(http::serve(
        listener,
        http::router(http::AppState {
            metrics: metrics.clone(),
        }),
        http_cancel.clone(),
    ))];
    tracing::info!(listen = %config.http.listen, "side HTTP port up (/healthz, /readyz, /metrics)");
    if let Some(address) = &config.http.search_listen {
        let token = read_secret(
            config.http.search_token_file.as_deref(),
            &config.http.search_token_env,
        )
        .map_err(StageError::fatal)?;
        let listener = bind("http.search_listen", address).await?;
        tracing::info!(listen = %address, token = token.is_some(), "search port up (/search)");
        http_tasks.push(tokio::spawn(http::serve(
            listener,
            http::search_router(http::SearchState {
                search: search.clone(),
                token: token.map(Arc::from),
            }),
            http_cancel.clone(),
        )));
    }

    let mut rules = HashMap::new();
    for rule in &config.tables {
        let compiled = mapping::CompiledRule::new(rule).map_err(StageError::fatal)?;
        rules.insert(rule.table.clone(), compiled);
    }
    let embedder = embed::from_config(&config.embedding).await?;
    tracing::info!(provider = ?config.embedding.provider, dimensions = embedder.dimensions(), "embedder ready");
    let sink = sink::from_config(&config).await?;

    for hook in cdc_indexer::faults::armed_hooks() {
        tracing::warn!(
            hook,
            "a test-only fault hook is armed; never set it in production"
        );
    }
    let pipeline = pipeline::Pipeline::new(
        config.clone(),
        rules,
        embedder.clone(),
        sink.clone(),
        metrics.clone(),
        cancel.clone(),
    );
    let prepared = tokio::select! {
        r = pipeline.retry("sink", || sink.prepare(embedder.dimensions())) => Some(r),
        _ = cancel.cancelled() => None,
    };
    let result = match prepared {
        None => {
            tracing::info!("stopped before the index was ready");
            Ok(())
        }
        Some(Err(e)) => Err(e),
        Some(Ok(())) => {
            metrics
                .health
                .sink_ok
                .store(true, std::sync::atomic::Ordering::Relaxed);
            let _ = search.set((embedder.clone(), sink.clone()));
            tracing::info!(sink = sink.name(), "index ready");

            notify::spawn(metrics.health.clone(), cancel.clone());
            let poller = tokio::spawn(broker::poll_queue_depths(
                config.clone(),
                metrics.clone(),
                std::time::Duration::from_secs(5),
                cancel.clone(),
            ));
            let reconciler = reconcile::spawn_periodic(
                config.clone(),
                sink.clone(),
                metrics.clone(),
                cancel.clone(),
            );
            let result = pipeline.run().await;
            notify::notify("STOPPING=1");
            cancel.cancel();
            let _ = poller.await;
            if let Some(task) = reconciler {
                let _ = task.await;
            }
            result
        }
    };
    http_cancel.cancel();
    for task in http_tasks {
        let _ = task.await;
    }
    drop(pipeline);
    drop(search);
    drop(sink);
    embedder_idle(&config, embedder).await;
    result.map(|()| {
        tracing::info!("stopped cleanly");
        ExitCode::SUCCESS
    })
}

/// Waits until the in-process embedder has finished the job it may still be running (a
/// batch abandoned at the shutdown deadline goes on computing on the model's thread), so
/// that ONNX Runtime is idle when the process exits; exiting mid-inference makes it print
/// an error of its own. The model's thread takes jobs in order: the reply to one more, tiny
/// job means every earlier one is done.
async fn embedder_idle(config: &Config, embedder: Arc<dyn embed::Embedder>) {
    if config.embedding.provider != cdc_indexer::config::EmbeddingProvider::Fastembed {
        return;
    }
    let probe = [String::from(".")];
    let barrier = embedder.embed(&probe);
    if tokio::time::timeout(std::time::Duration::from_secs(60), barrier)
        .await
        .is_err()
    {
        tracing::warn!("the embedder did not finish its last job within 60 s; exiting anyway");
    }
}

async fn bind(key: &str, address: &str) -> Result<tokio::net::TcpListener, StageError> {
    tokio::net::TcpListener::bind(address)
        .await
        .map_err(|e| StageError::fatal(format!("{key}: cannot listen on {address}: {e}")))
}

fn spawn_signal_handler(cancel: CancellationToken) {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot install the SIGTERM handler");
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping intake, finishing the open batch"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping intake, finishing the open batch"),
        }
        cancel.cancel();
    });
}

/// Asks the running daemon's search port (`http.search_listen`); without one configured, or
/// without a daemon answering there, opens the index itself.
async fn search_command(
    config: &Config,
    text: &str,
    table: Option<&str>,
    limit: usize,
    as_json: bool,
) -> Result<ExitCode, StageError> {
    let asked = match &config.http.search_listen {
        Some(address) => ask_daemon(config, address, text, table, limit).await?,
        None => None,
    };
    let hits = match asked {
        Some(hits) => hits,
        None => {
            let embedder = embed::from_config(&config.embedding).await?;
            let sink = sink::from_config(config).await?;
            sink.prepare(embedder.dimensions()).await?;
            search::run(embedder.as_ref(), sink.as_ref(), text, table, limit).await?
        }
    };
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&hits).unwrap_or_default()
        );
    } else {
        print!("{}", search::render(&hits));
    }
    Ok(ExitCode::SUCCESS)
}

/// The daemon's answer, or `None` when no daemon listens at `address`.
async fn ask_daemon(
    config: &Config,
    address: &str,
    text: &str,
    table: Option<&str>,
    limit: usize,
) -> Result<Option<Vec<serde_json::Value>>, StageError> {
    let url = format!("http://{address}/search");
    let token = read_secret(
        config.http.search_token_file.as_deref(),
        &config.http.search_token_env,
    )
    .map_err(StageError::fatal)?;
    let mut query = vec![("q", text.to_string()), ("limit", limit.to_string())];
    if let Some(t) = table {
        query.push(("table", t.to_string()));
    }
    let mut request = reqwest::Client::new().get(&url).query(&query);
    if let Some(token) = &token {
        request = request.bearer_auth(token);
    }
    match request.send().await {
        Ok(response) if response.status().is_success() => {
            let body: serde_json::Value = response
                .json()
                .await
                .map_err(|e| StageError::transient(format!("bad answer from the daemon: {e}")))?;
            Ok(Some(
                body["results"].as_array().cloned().unwrap_or_default(),
            ))
        }
        Ok(response) => {
            let status = response.status();
            let body = response.text().await.unwrap_or_default();
            Err(StageError::from_http_status(
                status.as_u16(),
                format!(
                    "the daemon's search port {url}: {}",
                    cdc_indexer::error::body_excerpt(&body)
                ),
            ))
        }
        Err(e) if e.is_connect() => Ok(None),
        Err(e) => Err(StageError::from_reqwest(&e)),
    }
}
