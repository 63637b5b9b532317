//! `reconcile`: proves that the index equals the source tables, and repairs it when not.
//!
//! A change stream alone never proves the index right: a message lost upstream, a skipped
//! event, a purged DLQ entry, a restored database, a bug — each leaves the index silently
//! different for ever. Reconcile compares the two sides directly, table by table, with
//! memory bounded by a page:
//!
//! 1. **Orphans** ([`Sink::scan`] of the table's points, page by page, *then* the source):
//!    documents whose row does not exist. The index is read first, so every document seen
//!    had committed before the source is asked (a fresh statement per page), and a row
//!    absent then was really gone.
//! 2. **Rows** ([`source`], one `REPEATABLE READ` snapshot, keyset pages in key order): each
//!    row is judged against what the index holds for its key ([`compare`]: the pipeline's
//!    own planner decides "equal"; chunks are checked against their commit record). A
//!    document newer than the snapshot (its position at or after the snapshot's LSN) is not
//!    judged.
//! 3. **Repair** (`--repair`, [`repair`]): drifted rows are re-read under `FOR SHARE` and
//!    published to the daemon's queue at the WAL position read under the locks; orphans get a
//!    delete that applies only while the index still holds what was seen. Both take the
//!    normal path, whose stale guard orders them against the stream: no newer streamed
//!    change is ever overwritten or deleted. On an empty index this is a full load
//!    (backfill) that needs no new connector snapshot.
//!
//! The index is read through [`IndexReader`]: the sink itself (qdrant, llamaindex, or an
//! embedded index no daemon holds), or the running daemon's `/index/*` endpoints on its side
//! port (the embedded index belongs to the daemon's process, see [`remote`]).

pub mod cli;
pub mod compare;
pub mod remote;
pub mod repair;
pub mod report;
pub mod source;

use std::collections::{BTreeSet, HashMap};
use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sqlx::postgres::PgConnection;

pub use report::{Report, TableReport};

use crate::batch::Repair;
use crate::config::{Config, read_secret, redact_url};
use crate::error::StageError;
use crate::events::{InternalEvent, ReconcileFailed, ReconcileFinished};
use crate::mapping::CompiledRule;
use crate::metrics::Metrics;
use crate::model::{DocumentKey, PositionAt, SourcePosition};
use crate::sink::{ScanPage, ScanScope, ScannedPoint, Sink};
use crate::stored::{StoredKind, StoredState};
use compare::Verdict;
use repair::{Origin, Publisher, RepairEvent};
use source::SourceTable;

/// What reconcile reads of the index.
#[async_trait]
pub trait IndexReader: Send + Sync {
    async fn read_states(
        &self,
        keys: &[DocumentKey],
    ) -> Result<HashMap<DocumentKey, StoredState>, StageError>;

    async fn scan(
        &self,
        scope: ScanScope<'_>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<ScanPage, StageError>;
}

/// The index read through a sink of this process.
pub struct SinkIndex(pub Arc<dyn Sink>);

#[async_trait]
impl IndexReader for SinkIndex {
    async fn read_states(
        &self,
        keys: &[DocumentKey],
    ) -> Result<HashMap<DocumentKey, StoredState>, StageError> {
        self.0.read_states(keys).await
    }

    async fn scan(
        &self,
        scope: ScanScope<'_>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<ScanPage, StageError> {
        self.0.scan(scope, after, limit).await
    }
}

/// How to run.
#[derive(Debug, Clone)]
pub struct Options {
    pub source_url: String,
    pub password: Option<String>,
    /// `schema.table`s, each with a rule.
    pub tables: Vec<String>,
    pub repair: bool,
    /// Re-stamp every row's document with a current position (after a database restore).
    pub reset_positions: bool,
    pub page_size: usize,
    /// `source.name` for repair events, when given.
    pub connector: Option<String>,
    /// The connector to assume when the index names none (first routing pattern's prefix).
    pub default_connector: Option<String>,
    pub examples: usize,
    /// How the connector sends values (`decimal.handling.mode`, `time.precision.mode`).
    pub values: source::ValueModes,
    /// Draw a progress line on stderr.
    pub progress: bool,
}

impl Options {
    /// Options from `[reconcile]`, with `source` (the CLI's `--source`) winning.
    pub fn from_config(config: &Config, source: Option<&str>) -> Result<Options, String> {
        let r = &config.reconcile;
        let source_url = source
            .map(str::to_string)
            .or_else(|| r.source_url.clone())
            .filter(|u| !u.is_empty())
            .ok_or("no source database: pass --source postgres://user@host:5432/db or set reconcile.source_url")?;
        if !(source_url.starts_with("postgres://") || source_url.starts_with("postgresql://")) {
            return Err(format!(
                "--source: expected a postgres:// URL, got `{}`",
                redact_url(&source_url)
            ));
        }
        let password = read_secret(r.password_file.as_deref(), &r.password_env)?;
        let tables = if r.tables.is_empty() {
            config.tables.iter().map(|t| t.table.clone()).collect()
        } else {
            r.tables.clone()
        };
        let default_connector = config
            .topology
            .routing_patterns
            .first()
            .and_then(|p| p.split('.').next())
            .filter(|c| !c.is_empty() && !c.contains(['*', '#']))
            .map(str::to_string);
        Ok(Options {
            source_url,
            password,
            tables,
            repair: r.repair,
            reset_positions: false,
            page_size: r.page_size,
            connector: r.connector.clone(),
            default_connector,
            examples: r.examples,
            values: source::ValueModes::of(r),
            progress: false,
        })
    }
}

/// Compiles the config's rules (they were validated at load).
pub fn compile_rules(config: &Config) -> Result<HashMap<String, CompiledRule>, StageError> {
    config
        .tables
        .iter()
        .map(|r| {
            CompiledRule::new(r)
                .map(|c| (r.table.clone(), c))
                .map_err(StageError::fatal)
        })
        .collect()
}

/// The connections of one run: one holds each table's snapshot, the other asks fresh
/// questions (orphan checks, locked repair reads).
struct Source {
    snapshot: PgConnection,
    fresh: PgConnection,
    database: String,
}

/// One run over `options.tables`.
pub async fn run(
    options: &Options,
    rules: &HashMap<String, CompiledRule>,
    index: &dyn IndexReader,
    publisher: Option<&Publisher>,
) -> Result<Report, StageError> {
    let started = Instant::now();
    let password = options.password.as_deref();
    let mut snapshot = source::connect(&options.source_url, password).await?;
    let fresh = source::connect(&options.source_url, password).await?;
    let database = source::database_name(&mut snapshot).await?;
    let mut src = Source {
        snapshot,
        fresh,
        database,
    };
    let mut report = Report {
        repaired: options.repair,
        ..Report::default()
    };
    for table in &options.tables {
        let rule = rules.get(table).ok_or_else(|| {
            StageError::fatal(format!("{table}: no [[tables]] rule for this table"))
        })?;
        let t = Table {
            options,
            rule,
            index,
            publisher: if options.repair { publisher } else { None },
        };
        report.tables.push(t.run(&mut src).await?);
    }
    report.duration = started.elapsed();
    Ok(report)
}

struct Table<'a> {
    options: &'a Options,
    rule: &'a CompiledRule,
    index: &'a dyn IndexReader,
    publisher: Option<&'a Publisher>,
}

/// Connectors named by stored positions, and whether any position is not an LSN.
#[derive(Default)]
struct Seen {
    connectors: BTreeSet<String>,
    not_lsn: bool,
}

impl Seen {
    fn position(&mut self, p: Option<&SourcePosition>) {
        if let Some(p) = p {
            if self.connectors.len() < 16 {
                self.connectors.insert(p.connector.clone());
            }
            self.not_lsn |= !matches!(p.at, PositionAt::Lsn(_));
        }
    }
}

impl Table<'_> {
    async fn run(&self, src: &mut Source) -> Result<TableReport, StageError> {
        let name = self.rule.rule.table.as_str();
        let mut report = TableReport::new(name, self.options.examples);
        let table =
            SourceTable::describe(&mut src.snapshot, self.rule, self.options.values).await?;
        let mut seen = Seen::default();
        let started = Instant::now();

        // 1. Orphans: the index first, then the source.
        let mut orphans = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self
                .index
                .scan(
                    ScanScope::Table(name),
                    after.as_deref(),
                    self.options.page_size,
                )
                .await?;
            report.points += page.points.len();
            let found = self
                .orphans(src, &table, &page.points, &mut seen, &mut report)
                .await?;
            // Kept only to be repaired, a page's worth at a time: memory stays bounded.
            if self.publisher.is_some() {
                orphans.extend(found);
                if orphans.len() >= self.options.page_size {
                    self.publish_orphans(src, &mut orphans, &mut report).await?;
                }
            }
            after = page.next;
            if after.is_none() {
                break;
            }
        }
        if self.publisher.is_some() {
            self.publish_orphans(src, &mut orphans, &mut report).await?;
        }
        if seen.not_lsn {
            report.note(
                "the index holds positions that are not PostgreSQL LSNs (source.ts_ms fallback, e.g. the unwrap SMT without `lsn` in add.fields): repairs are ordered against the stream only by LSN".into(),
            );
        }
        let connector = self.connector(&seen)?;

        // 2. Rows, in one snapshot.
        let snapshot_lsn = source::begin_snapshot(&mut src.snapshot).await?;
        let result = self
            .rows(
                src,
                &table,
                snapshot_lsn,
                connector.as_deref(),
                &mut report,
                started,
            )
            .await;
        let ended = source::end_snapshot(&mut src.snapshot).await;
        result?;
        ended?;
        if self.options.progress {
            eprintln!();
        }
        Ok(report)
    }

    /// The connector repair events name: given, the one the index names, or the default.
    fn connector(&self, seen: &Seen) -> Result<Option<String>, StageError> {
        if let Some(c) = &self.options.connector {
            return Ok(Some(c.clone()));
        }
        match seen.connectors.len() {
            0 => Ok(self.options.default_connector.clone()),
            1 => Ok(seen.connectors.first().cloned()),
            _ if self.publisher.is_none() => Ok(None),
            _ => Err(StageError::fatal(format!(
                "{}: the index holds positions of several connectors ({}); pass --connector NAME (Debezium's topic.prefix) so repair positions compare with the stream's",
                self.rule.rule.table,
                seen.connectors
                    .iter()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    /// The orphans among one page of the index's points: keys with a document (chunk 0, or
    /// only stray chunks) and no row.
    async fn orphans(
        &self,
        src: &mut Source,
        table: &SourceTable,
        points: &[ScannedPoint],
        seen: &mut Seen,
        report: &mut TableReport,
    ) -> Result<Vec<(DocumentKey, Option<SourcePosition>)>, StageError> {
        let mut candidates: HashMap<DocumentKey, Option<SourcePosition>> = HashMap::new();
        let mut strays: BTreeSet<DocumentKey> = BTreeSet::new();
        for p in points.iter().filter(|p| !p.key.is_table_marker()) {
            if p.chunk == 0 {
                seen.position(p.position.as_ref());
                if p.kind != StoredKind::Deleted {
                    candidates.insert(p.key.clone(), p.position.clone());
                }
            } else {
                strays.insert(p.key.clone());
            }
        }
        // Chunks whose chunk 0 is not in this page: judged here only if no document vouches
        // for them (chunk 0 missing or a delete marker); otherwise with their chunk 0.
        let strays: Vec<DocumentKey> = strays
            .into_iter()
            .filter(|k| {
                !candidates.contains_key(k) && !points.iter().any(|p| &p.key == k && p.chunk == 0)
            })
            .collect();
        if !strays.is_empty() {
            let states = self.index.read_states(&strays).await?;
            for k in strays {
                match states.get(&k) {
                    Some(s) if s.kind != StoredKind::Deleted => {}
                    other => {
                        candidates.insert(k, other.and_then(|s| s.position.clone()));
                    }
                }
            }
        }
        if candidates.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<DocumentKey> = candidates.keys().cloned().collect();
        let existing = table.existing(&mut src.fresh, self.rule, &keys).await?;
        let mut orphans: Vec<(DocumentKey, Option<SourcePosition>)> = candidates
            .into_iter()
            .filter(|(k, _)| !existing.contains(k))
            .collect();
        orphans.sort_by(|a, b| a.0.cmp(&b.0));
        for (k, p) in &orphans {
            report.add_orphan(k, p.as_ref());
        }
        Ok(orphans)
    }

    async fn publish_orphans(
        &self,
        src: &Source,
        orphans: &mut Vec<(DocumentKey, Option<SourcePosition>)>,
        report: &mut TableReport,
    ) -> Result<(), StageError> {
        let Some(publisher) = self.publisher else {
            orphans.clear();
            return Ok(());
        };
        let origin = Origin {
            connector: String::new(),
            database: src.database.clone(),
        };
        let now = chrono::Utc::now().timestamp_millis();
        let mut events = Vec::new();
        for (key, position) in orphans.drain(..) {
            match crate::decode::parse_json(&key.key) {
                Ok(serde_json::Value::Object(values)) => {
                    events.push(repair::orphan_event(&origin, &key, &values, position.as_ref(), now));
                }
                _ => report.note(format!(
                    "orphan {} has a key that is not a JSON object of the key columns: the pipeline cannot delete it (remove it by hand)",
                    key.key
                )),
            }
        }
        report.repairs.deletes += events.len();
        publisher.publish(&events).await
    }

    async fn rows(
        &self,
        src: &mut Source,
        table: &SourceTable,
        snapshot_lsn: Option<u64>,
        connector: Option<&str>,
        report: &mut TableReport,
        started: Instant,
    ) -> Result<(), StageError> {
        let mut after: Option<Vec<String>> = None;
        loop {
            let rows = table
                .page(&mut src.snapshot, after.as_deref(), self.options.page_size)
                .await?;
            let Some(last) = rows.last() else {
                return Ok(());
            };
            after = Some(last.key_text.clone());
            report.rows += rows.len();
            let mut keyed = Vec::with_capacity(rows.len());
            for row in rows {
                match self.rule.key(&row.values) {
                    Ok(key) => keyed.push((key, row)),
                    Err(e) => report.note(format!(
                        "a row the pipeline cannot map ({e}): it is dead-lettered when it streams, and not compared"
                    )),
                }
            }
            let keys: Vec<DocumentKey> = keyed.iter().map(|(k, _)| k.clone()).collect();
            let states = self.index.read_states(&keys).await?;
            let points = self.points_of(&keys).await?;
            // After the index was read: a stored position beyond this is not of this database.
            let wal = compare::Wal {
                snapshot: snapshot_lsn,
                now: source::current_lsn(&mut src.fresh).await?,
            };
            let mut drifted: Vec<(Vec<String>, Repair)> = Vec::new();
            for (key, row) in &keyed {
                let verdict = compare::judge(
                    self.rule,
                    key,
                    &row.values,
                    states.get(key),
                    points.get(key).map(Vec::as_slice).unwrap_or_default(),
                    wal,
                );
                let mut repair = Repair::default();
                match &verdict {
                    Verdict::Ok => report.counts.ok += 1,
                    Verdict::Ahead => {
                        report.counts.ok += 1;
                        report.ahead += 1;
                    }
                    Verdict::Missing => {
                        report.add_missing(key);
                        // Missing may leave stray points behind: start the document afresh.
                        repair.rewrite = true;
                    }
                    Verdict::Stale {
                        reason,
                        rewrite,
                        reset,
                    } => {
                        report.add_stale(key, reason);
                        repair.rewrite = *rewrite;
                        repair.reset_position = *reset;
                    }
                }
                let drift = !matches!(verdict, Verdict::Ok | Verdict::Ahead);
                if drift || (self.options.reset_positions && verdict != Verdict::Ahead) {
                    repair.reset_position |= self.options.reset_positions;
                    drifted.push((row.key_text.clone(), repair));
                }
            }
            if self.publisher.is_some() && !drifted.is_empty() {
                self.repair_rows(src, table, connector, drifted, report)
                    .await?;
            }
            if self.options.progress {
                let secs = started.elapsed().as_secs_f64().max(0.001);
                eprint!(
                    "\r{}: {} rows, {} drifted ({:.0} rows/s)   ",
                    report.table,
                    report.rows,
                    report.counts.drift(),
                    report.rows as f64 / secs
                );
                let _ = std::io::stderr().flush();
            }
        }
    }

    /// Every point of these documents, by key (one scan, paged).
    async fn points_of(
        &self,
        keys: &[DocumentKey],
    ) -> Result<HashMap<DocumentKey, Vec<ScannedPoint>>, StageError> {
        let mut out: HashMap<DocumentKey, Vec<ScannedPoint>> = HashMap::new();
        let mut after: Option<String> = None;
        loop {
            let page = self
                .index
                .scan(
                    ScanScope::Keys(keys),
                    after.as_deref(),
                    10 * self.options.page_size,
                )
                .await?;
            for p in page.points {
                out.entry(p.key.clone()).or_default().push(p);
            }
            after = page.next;
            if after.is_none() {
                return Ok(out);
            }
        }
    }

    /// Re-reads drifted rows under `FOR SHARE`, takes the WAL position under the locks, and
    /// publishes them at that position.
    async fn repair_rows(
        &self,
        src: &mut Source,
        table: &SourceTable,
        connector: Option<&str>,
        drifted: Vec<(Vec<String>, Repair)>,
        report: &mut TableReport,
    ) -> Result<(), StageError> {
        let Some(publisher) = self.publisher else {
            return Ok(());
        };
        let connector = connector.ok_or_else(|| {
            StageError::fatal(format!(
                "{}: no connector name for repair events: the index names none and topology.routing_patterns[0] has no plain prefix; pass --connector NAME (Debezium's topic.prefix)",
                self.rule.rule.table
            ))
        })?;
        let texts: Vec<Vec<String>> = drifted.iter().map(|(t, _)| t.clone()).collect();
        let flags: HashMap<Vec<String>, Repair> = drifted.into_iter().collect();
        let (rows, lsn) = locked_read(&mut src.fresh, table, &texts).await?;
        let origin = Origin {
            connector: connector.to_string(),
            database: src.database.clone(),
        };
        let now = chrono::Utc::now().timestamp_millis();
        let events: Vec<RepairEvent> = rows
            .iter()
            .map(|row| {
                let repair = flags.get(&row.key_text).copied().unwrap_or_default();
                if repair.rewrite {
                    report.repairs.rewrites += 1;
                }
                repair::upsert_event(
                    &origin,
                    &self.rule.rule.table,
                    &row.values,
                    lsn,
                    repair,
                    now,
                )
            })
            .collect();
        report.repairs.upserts += events.len();
        report.repairs.gone += texts.len().saturating_sub(rows.len());
        publisher.publish(&events).await
    }
}

/// `BEGIN; SELECT … FOR SHARE; pg_current_wal_insert_lsn(); COMMIT`.
async fn locked_read(
    conn: &mut PgConnection,
    table: &SourceTable,
    keys: &[Vec<String>],
) -> Result<(Vec<source::SourceRow>, u64), StageError> {
    sqlx::raw_sql("BEGIN")
        .execute(&mut *conn)
        .await
        .map_err(|e| source::db_error("BEGIN", e))?;
    let result = async {
        let rows = table
            .rows_by_key_text(conn, keys, true)
            .await
            .map_err(|e| {
                source::db_error(
                    &format!("reading {} FOR SHARE (repair needs the UPDATE privilege on it, or to own it)", table.name),
                    e,
                )
            })?;
        let lsn = source::current_lsn(conn).await?.ok_or_else(|| {
            StageError::fatal("--repair needs the primary: the source database is a standby")
        })?;
        Ok::<_, StageError>((rows, lsn))
    }
    .await;
    let end = if result.is_ok() { "COMMIT" } else { "ROLLBACK" };
    sqlx::raw_sql(end)
        .execute(&mut *conn)
        .await
        .map_err(|e| source::db_error(end, e))?;
    result
}

/// The daemon's periodic reconcile (`[reconcile] interval_s`), through its own sink.
pub fn spawn_periodic(
    config: Arc<Config>,
    sink: Arc<dyn Sink>,
    metrics: Arc<Metrics>,
    cancel: tokio_util::sync::CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    let every = config.reconcile.interval_s;
    if every == 0 {
        return None;
    }
    Some(tokio::spawn(async move {
        let index = SinkIndex(sink);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(every)) => {}
                _ = cancel.cancelled() => return,
            }
            let outcome = async {
                let options = Options::from_config(&config, None).map_err(StageError::fatal)?;
                let rules = compile_rules(&config)?;
                let publisher = if options.repair {
                    Some(Publisher::connect(&config).await?)
                } else {
                    None
                };
                let report = run(&options, &rules, &index, publisher.as_ref()).await;
                if let Some(p) = publisher {
                    p.close().await;
                }
                report
            };
            tokio::select! {
                result = outcome => match result {
                    Ok(report) => ReconcileFinished { report: &report }.emit(&metrics),
                    Err(e) => ReconcileFailed { error: &e }.emit(&metrics),
                },
                _ = cancel.cancelled() => return,
            }
        }
    }))
}
