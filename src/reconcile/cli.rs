//! `cdc-indexer reconcile`: the command line around [`super::run`].
//!
//! Exit codes: 0 every key `ok`, 1 drift found (with `--repair`: drift found and repair
//! events published), 2 configuration error, 3 fatal (source or index unreachable, refused
//! credentials or privileges).

use std::process::ExitCode;

use crate::config::{Config, SinkKind, redact_url};
use crate::error::StageError;
use crate::sink;

use super::remote::{DaemonIndex, Probe};
use super::repair::Publisher;
use super::{IndexReader, Options, SinkIndex};

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Source database URL (`postgres://user@host:5432/db`; default `reconcile.source_url`).
    /// The password comes from `reconcile.password_env` / `password_file`.
    #[arg(long)]
    pub source: Option<String>,
    /// Only this table (`schema.table`); repeat for several. Default: `reconcile.tables`, else
    /// every `[[tables]]` rule.
    #[arg(long = "table")]
    pub tables: Vec<String>,
    /// Publish repair events for what differs (to the daemon's queue; the daemon applies them).
    #[arg(long)]
    pub repair: bool,
    /// With `--repair`: re-stamp every row's document with a current position (after a
    /// database restore or failover made positions go backwards).
    #[arg(long, requires = "repair")]
    pub reset_positions: bool,
    /// Debezium connector name (`topic.prefix`) for repair positions. Default: the one the
    /// index's positions name.
    #[arg(long)]
    pub connector: Option<String>,
    /// Rows per page. Default `reconcile.page_size`.
    #[arg(long)]
    pub page_size: Option<usize>,
    /// Examples per state and table in the report. Default `reconcile.examples`.
    #[arg(long)]
    pub examples: Option<usize>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

fn config_error(message: &str) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(2)
}

pub async fn command(config: &Config, args: Args) -> Result<ExitCode, StageError> {
    let mut options = match Options::from_config(config, args.source.as_deref()) {
        Ok(o) => o,
        Err(e) => return Ok(config_error(&e)),
    };
    if let Err(e) = super::source::check_url(&options.source_url) {
        return Ok(config_error(&e));
    }
    if !args.tables.is_empty() {
        for t in &args.tables {
            if config.rule(t).is_none() {
                return Ok(config_error(&format!(
                    "--table {t}: no [[tables]] rule for it in the config"
                )));
            }
        }
        options.tables = args.tables.clone();
    }
    options.repair = args.repair;
    options.reset_positions = args.reset_positions;
    options.connector = args.connector.clone().or(options.connector);
    if let Some(n) = args.page_size {
        if n == 0 {
            return Ok(config_error("--page-size: must be at least 1"));
        }
        options.page_size = n;
    }
    if let Some(n) = args.examples {
        options.examples = n;
    }
    options.progress = !args.json && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let rules = super::compile_rules(config)?;
    tracing::debug!(source = %redact_url(&options.source_url), tables = ?options.tables, "reconcile");

    // The embedded index belongs to the running daemon: ask it; without one, open it here.
    let result = reconcile(config, &options, &rules).await;
    // Exit code 1 means drift: every failure to find out is 3.
    let report = result.map_err(|e| StageError {
        kind: crate::error::ErrorKind::Fatal,
        ..e
    })?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report.json()).unwrap_or_default()
        );
    } else {
        print!("{}", report.render());
    }
    Ok(if report.drift() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

async fn reconcile(
    config: &Config,
    options: &Options,
    rules: &std::collections::HashMap<String, crate::mapping::CompiledRule>,
) -> Result<super::Report, StageError> {
    let index: Box<dyn IndexReader> = match config.sink.kind {
        SinkKind::Embedded => match &config.http.search_listen {
            Some(listen) => {
                let token = crate::config::read_secret(
                    config.http.search_token_file.as_deref(),
                    &config.http.search_token_env,
                )
                .map_err(StageError::fatal)?;
                match DaemonIndex::probe(listen, token).await? {
                    Probe::Running(daemon) => Box::new(daemon),
                    Probe::Absent => Box::new(SinkIndex(open_sink(config).await?)),
                }
            }
            // No search port: the index is opened here (refused while a daemon holds it).
            None => Box::new(SinkIndex(open_sink(config).await?)),
        },
        _ => Box::new(SinkIndex(open_sink(config).await?)),
    };
    let publisher = if options.repair {
        Some(Publisher::connect(config).await?)
    } else {
        None
    };
    let result = super::run(options, rules, index.as_ref(), publisher.as_ref()).await;
    if let Some(p) = publisher {
        p.close().await;
    }
    result
}

async fn open_sink(config: &Config) -> Result<std::sync::Arc<dyn sink::Sink>, StageError> {
    let sink = sink::from_config(config).await?;
    sink.prepare(config.embedding.dimensions).await?;
    Ok(sink)
}
