//! `cdc-indexer dlq stats|peek|replay|purge`: the operator's view of the dead-letter queue.
//!
//! Entries are read with `basic.get` and held unacknowledged while we look at them. Entries we
//! leave in place are released by closing the channel, which returns them to the queue in
//! their original order. A scan never reads more than the depth the queue had when it began,
//! so a replay that fails again (and lands back at the tail) is not read twice in one run.
//!
//! `stats` folds each entry into its counters as it is read (memory bounded by the counters,
//! not the queue). `replay` republishes into **our main queue only**, through the default
//! exchange (routing key = the queue's name): republishing to the original topic exchange
//! would hand the event again to every other queue bound there. The original exchange and
//! routing key travel in `x-cdc-original-exchange` / `x-cdc-original-routing-key`, which the
//! pipeline reads (`broker::routing_key_of`) and a second dead-lettering keeps.

use std::io::{IsTerminal, Write as _};

use clap::{Args, Subcommand};
use lapin::Confirmation;
use lapin::message::BasicGetMessage;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use serde_json::{Value, json};

use crate::broker::{self, amqp_error, header, header_text};
use crate::config::Config;
use crate::error::StageError;

#[derive(Subcommand)]
pub enum DlqCommand {
    /// Depth, oldest entry age, counts by error kind and table.
    Stats {
        #[arg(long)]
        json: bool,
    },
    /// Show entries without removing them.
    Peek {
        #[arg(long, default_value_t = 10)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Republish entries into the main queue (their original exchange and routing key kept
    /// in headers).
    Replay(ReplayArgs),
    /// Delete every entry.
    Purge {
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Args, Clone)]
pub struct ReplayArgs {
    /// Replay at most this many entries.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Only entries of this table (`schema.table`).
    #[arg(long)]
    pub table: Option<String>,
    /// Only entries of this error kind (`decode`, `mapping`, `delivery-limit`, ...).
    #[arg(long)]
    pub error_kind: Option<String>,
    /// Show what would be replayed; change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// One DLQ entry as operators see it.
#[derive(Debug, Clone)]
pub struct Entry {
    pub table: String,
    pub op: String,
    pub key: String,
    pub error_kind: String,
    pub reason: String,
    pub failed_at: String,
    pub death_count: i64,
    pub replay_count: i64,
    pub exchange: String,
    pub routing_key: String,
}

impl Entry {
    pub fn of(message: &BasicGetMessage) -> Entry {
        let d = &message.delivery;
        let headers = d.properties.headers().as_ref();
        let text = |name: &str| header(headers, name).map(header_text);
        let death = first_death(headers);
        let death_text = |k: &str| {
            death.as_ref().and_then(|t| {
                t.inner()
                    .get(&ShortString::from(k.to_string()))
                    .map(header_text)
            })
        };
        let routing_key = text("x-cdc-original-routing-key")
            .or_else(|| death.as_ref().and_then(first_routing_key))
            .unwrap_or_else(|| d.routing_key.as_str().to_string());
        let (op, key) = summarize_body(&d.data);
        Entry {
            table: routing_key
                .split_once('.')
                .map(|(_, t)| t.to_string())
                .unwrap_or_else(|| routing_key.clone()),
            op,
            key,
            error_kind: text("x-cdc-error-kind").unwrap_or_else(|| {
                match death_text("reason").as_deref() {
                    Some("delivery_limit") => "delivery-limit".to_string(),
                    Some(other) => other.to_string(),
                    None => "unknown".to_string(),
                }
            }),
            reason: text("x-cdc-error").unwrap_or_else(|| {
                death_text("reason")
                    .map(|r| format!("dead-lettered by the broker: {r}"))
                    .unwrap_or_default()
            }),
            failed_at: text("x-cdc-failed-at")
                .or_else(|| death_text("time"))
                .unwrap_or_default(),
            death_count: death
                .as_ref()
                .and_then(|t| t.inner().get(&ShortString::from("count".to_string())))
                .map(|v| header_text(v).parse().unwrap_or(0))
                .unwrap_or(0),
            replay_count: text("x-cdc-replay-count")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            exchange: text("x-cdc-original-exchange")
                .or_else(|| death_text("exchange"))
                .unwrap_or_default(),
            routing_key,
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "table": self.table, "op": self.op, "key": self.key, "error_kind": self.error_kind,
            "reason": self.reason, "failed_at": self.failed_at, "death_count": self.death_count,
            "replay_count": self.replay_count, "exchange": self.exchange, "routing_key": self.routing_key,
        })
    }
}

fn first_death(headers: Option<&FieldTable>) -> Option<FieldTable> {
    match header(headers, "x-death")? {
        AMQPValue::FieldArray(items) => items.as_slice().iter().find_map(|v| match v {
            AMQPValue::FieldTable(t) => Some(t.clone()),
            _ => None,
        }),
        _ => None,
    }
}

fn first_routing_key(death: &FieldTable) -> Option<String> {
    match death
        .inner()
        .get(&ShortString::from("routing-keys".to_string()))?
    {
        AMQPValue::FieldArray(keys) => keys.as_slice().first().map(header_text),
        _ => None,
    }
}

/// Op and key of a Debezium body, best effort (it may be the undecodable one).
fn summarize_body(body: &[u8]) -> (String, String) {
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return ("?".into(), "?".into());
    };
    let payload = value
        .get("payload")
        .filter(|_| value.get("schema").is_some())
        .unwrap_or(&value);
    let op = payload
        .get("op")
        .or_else(|| payload.get("__op"))
        .and_then(Value::as_str)
        .unwrap_or("?")
        .to_string();
    let row = payload
        .get("after")
        .filter(|v| !v.is_null())
        .or_else(|| payload.get("before"))
        .unwrap_or(payload);
    let key = row
        .get("id")
        .map(|v| format!("id={v}"))
        .unwrap_or_else(|| "?".to_string());
    (op, key)
}

pub async fn run(
    config: &Config,
    command: DlqCommand,
) -> Result<std::process::ExitCode, StageError> {
    let connection = broker::connect(&config.broker, "dlq").await?;
    let result = match command {
        DlqCommand::Stats { json } => stats(&connection, config, json).await,
        DlqCommand::Peek { limit, json } => peek(&connection, config, limit, json).await,
        DlqCommand::Replay(args) => replay(&connection, config, &args).await.map(|s| {
            println!("{}", s.line());
            if s.failed > 0 {
                std::process::ExitCode::from(1)
            } else {
                std::process::ExitCode::SUCCESS
            }
        }),
        DlqCommand::Purge { yes } => purge(&connection, config, yes).await,
    };
    let _ = connection.close(200, "done".into()).await;
    result
}

async fn depth(channel: &Channel, queue: &str) -> Result<u32, StageError> {
    let q = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| {
            StageError::fatal(format!(
                "dead-letter queue `{queue}` not found (run `cdc-indexer topology declare`): {e}"
            ))
        })?;
    Ok(q.message_count())
}

/// Reads up to `max` entries without acking them.
async fn scan(
    channel: &Channel,
    queue: &str,
    max: usize,
) -> Result<Vec<BasicGetMessage>, StageError> {
    let mut out = Vec::new();
    while out.len() < max {
        match channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await
            .map_err(|e| amqp_error("basic.get", e))?
        {
            Some(m) => out.push(m),
            None => break,
        }
    }
    Ok(out)
}

/// Counters over the DLQ, built one entry at a time.
#[derive(Default)]
struct Stats {
    by_kind: std::collections::BTreeMap<String, u64>,
    by_table: std::collections::BTreeMap<String, u64>,
    oldest: Option<chrono::DateTime<chrono::Utc>>,
}

impl Stats {
    fn add(&mut self, e: &Entry) {
        *self.by_kind.entry(e.error_kind.clone()).or_default() += 1;
        *self.by_table.entry(e.table.clone()).or_default() += 1;
        if let Some(at) = failed_at(&e.failed_at) {
            self.oldest = Some(self.oldest.map_or(at, |o| o.min(at)));
        }
    }
}

/// `x-cdc-failed-at` (RFC 3339) or the broker's `x-death` time (an AMQP timestamp, shown
/// as RFC 3339; bare epoch seconds accepted too).
fn failed_at(text: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|d| d.with_timezone(&chrono::Utc))
        .or_else(|| {
            text.parse::<i64>()
                .ok()
                .and_then(|s| chrono::DateTime::from_timestamp(s, 0))
        })
}

async fn stats(
    connection: &Connection,
    config: &Config,
    as_json: bool,
) -> Result<std::process::ExitCode, StageError> {
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| amqp_error("open channel", e))?;
    let queue = &config.topology.dead_letter_queue;
    let n = depth(&channel, queue).await?;
    // Each entry is held unacked by the broker (returned, in order, when the channel closes)
    // and dropped here once counted.
    let mut stats = Stats::default();
    for _ in 0..n {
        match channel
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
            .await
            .map_err(|e| amqp_error("basic.get", e))?
        {
            Some(message) => stats.add(&Entry::of(&message)),
            None => break,
        }
    }
    let _ = channel.close(200, "done".into()).await;
    let Stats {
        by_kind,
        by_table,
        oldest,
    } = stats;
    let age = oldest.map(|t| (chrono::Utc::now() - t).num_seconds().max(0));
    if as_json {
        println!(
            "{}",
            json!({"queue": queue, "depth": n, "oldest_age_seconds": age, "by_error_kind": by_kind, "by_table": by_table})
        );
    } else {
        println!("queue {queue}: {n} entries");
        if let Some(age) = age {
            println!("oldest: {age} s ago");
        }
        println!("by error kind:");
        for (k, v) in &by_kind {
            println!("  {k:<20} {v}");
        }
        println!("by table:");
        for (k, v) in &by_table {
            println!("  {k:<30} {v}");
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

async fn peek(
    connection: &Connection,
    config: &Config,
    limit: usize,
    as_json: bool,
) -> Result<std::process::ExitCode, StageError> {
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| amqp_error("open channel", e))?;
    let entries: Vec<Entry> = scan(&channel, &config.topology.dead_letter_queue, limit)
        .await?
        .iter()
        .map(Entry::of)
        .collect();
    // Closing the channel returns every entry, in order.
    let _ = channel.close(200, "peek done".into()).await;
    if as_json {
        println!(
            "{}",
            Value::Array(entries.iter().map(Entry::to_json).collect())
        );
    } else {
        for e in &entries {
            println!(
                "{} {} {} [{}] deaths={} replays={} at {}\n    {}",
                e.table,
                e.op,
                e.key,
                e.error_kind,
                e.death_count,
                e.replay_count,
                e.failed_at,
                e.reason
            );
        }
        println!("({} shown)", entries.len());
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// What a replay did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReplaySummary {
    pub scanned: usize,
    pub replayed: usize,
    pub skipped: usize,
    pub failed: usize,
    pub dry_run: bool,
}

impl ReplaySummary {
    pub fn line(&self) -> String {
        format!(
            "{}scanned {}, replayed {}, left in the DLQ {}, failed {}",
            if self.dry_run { "dry run: " } else { "" },
            self.scanned,
            self.replayed,
            self.skipped,
            self.failed
        )
    }
}

pub async fn replay(
    connection: &Connection,
    config: &Config,
    args: &ReplayArgs,
) -> Result<ReplaySummary, StageError> {
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| amqp_error("open channel", e))?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| amqp_error("confirm.select", e))?;
    let queue = &config.topology.dead_letter_queue;
    let total = depth(&channel, queue).await? as usize;
    let tty = std::io::stderr().is_terminal();
    let mut summary = ReplaySummary {
        dry_run: args.dry_run,
        ..ReplaySummary::default()
    };
    let limit = args.limit.unwrap_or(usize::MAX);
    while summary.scanned < total && summary.replayed + summary.failed < limit {
        let Some(message) = channel
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
            .await
            .map_err(|e| amqp_error("basic.get", e))?
        else {
            break;
        };
        summary.scanned += 1;
        let entry = Entry::of(&message);
        let selected = args.table.as_ref().is_none_or(|t| &entry.table == t)
            && args
                .error_kind
                .as_ref()
                .is_none_or(|k| &entry.error_kind == k);
        if !selected || args.dry_run {
            // Held unacked: returned to the queue, in order, when the channel closes.
            summary.skipped += 1;
            if args.dry_run && selected {
                summary.replayed += 1;
                summary.skipped -= 1;
                println!(
                    "would replay {} {} {} [{}] into queue {} (originally {}/{})",
                    entry.table,
                    entry.op,
                    entry.key,
                    entry.error_kind,
                    config.topology.queue,
                    entry.exchange,
                    entry.routing_key
                );
            }
            continue;
        }
        let properties = replay_properties(&message.delivery.properties, &entry, config);
        // Into our own queue only, through the default exchange.
        let confirmed = channel
            .basic_publish(
                "".into(),
                config.topology.queue.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &message.delivery.data,
                properties,
            )
            .await
            .map_err(|e| amqp_error("publish", e))?
            .await
            .map_err(|e| amqp_error("publisher confirm", e))?;
        match confirmed {
            Confirmation::Ack(None) => {
                message
                    .delivery
                    .acker
                    .ack(BasicAckOptions::default())
                    .await
                    .map_err(|e| amqp_error("basic.ack", e))?;
                summary.replayed += 1;
            }
            other => {
                // Unroutable or refused: the entry stays in the DLQ.
                summary.failed += 1;
                eprintln!(
                    "cannot replay {} {} into queue {}: {}",
                    entry.table,
                    entry.key,
                    config.topology.queue,
                    match other {
                        Confirmation::Ack(Some(_)) => "unroutable (does the queue exist?)",
                        _ => "refused by the broker",
                    }
                );
            }
        }
        if tty && summary.scanned.is_multiple_of(100) {
            eprint!("\r{} / {total}", summary.scanned);
            let _ = std::io::stderr().flush();
        }
    }
    if tty && total >= 100 {
        eprintln!();
    }
    let _ = channel.close(200, "replay done".into()).await;
    Ok(summary)
}

/// The original properties, without our error headers and the broker's death history,
/// with the original exchange and routing key in headers and `x-cdc-replay-count` raised.
fn replay_properties(
    properties: &BasicProperties,
    entry: &Entry,
    config: &Config,
) -> BasicProperties {
    let mut headers = FieldTable::default();
    if let Some(old) = properties.headers() {
        for (k, v) in old.inner() {
            let name = k.as_str();
            if name.starts_with("x-cdc-")
                || name == "x-death"
                || name.starts_with("x-first-death")
                || name.starts_with("x-last-death")
            {
                continue;
            }
            headers.insert(k.clone(), v.clone());
        }
    }
    let mut set = |name: &str, value: String| {
        headers.insert(
            ShortString::from(name.to_string()),
            AMQPValue::LongString(LongString::from(value)),
        );
    };
    let exchange = if entry.exchange.is_empty() {
        config.topology.exchange.clone()
    } else {
        entry.exchange.clone()
    };
    set("x-cdc-original-exchange", exchange);
    set("x-cdc-original-routing-key", entry.routing_key.clone());
    set("x-cdc-replay-count", (entry.replay_count + 1).to_string());
    properties
        .clone()
        .with_headers(headers)
        .with_delivery_mode(2)
}

async fn purge(
    connection: &Connection,
    config: &Config,
    yes: bool,
) -> Result<std::process::ExitCode, StageError> {
    let queue = &config.topology.dead_letter_queue;
    if !yes {
        if !std::io::stdin().is_terminal() {
            eprintln!("refusing to purge {queue} without confirmation: pass --yes");
            return Ok(std::process::ExitCode::from(1));
        }
        eprint!("Delete every entry of {queue}? Type the queue name to confirm: ");
        let _ = std::io::stderr().flush();
        let mut answer = String::new();
        let _ = std::io::stdin().read_line(&mut answer);
        if answer.trim() != queue {
            eprintln!("not confirmed; nothing deleted");
            return Ok(std::process::ExitCode::from(1));
        }
    }
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| amqp_error("open channel", e))?;
    let n = channel
        .queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
        .await
        .map_err(|e| amqp_error("queue.purge", e))?;
    let _ = channel.close(200, "done".into()).await;
    println!("purged {n} entries from {queue}");
    Ok(std::process::ExitCode::SUCCESS)
}
