//! The source side: the bench's own table in the logical-decoding cluster (debezium/pg/,
//! port 54329), single-row UPDATEs (each its own commit), and the real Debezium runner
//! (debezium/runner.py) with its own slot and publication, publishing to the bench's exchange.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::Context;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{AssertSqlSafe, ConnectOptions};

use crate::procs::Proc;
use crate::rabbit::AMQP;

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// Name and description of row `id` at text revision `rev` (revision = the update's sequence
/// number, so every update writes a text never written before).
pub fn texts(id: u64, rev: u64) -> (String, String) {
    crate::corpus::product(id, rev as u32)
}

/// The marker each update's text carries (`corpus::product`): "Revised edition <seq>:".
pub fn seq_of(description: &str) -> Option<u64> {
    let rest = description.split("Revised edition ").nth(1)?;
    rest.split(':').next()?.parse().ok()
}

pub struct Pg {
    conn: PgConnection,
    pub table: String,
}

impl Pg {
    pub async fn connect(url: &str, table: &str) -> anyhow::Result<Pg> {
        let conn = PgConnectOptions::from_str(url)?
            .disable_statement_logging()
            .connect()
            .await
            .with_context(|| format!("PostgreSQL at {url} (start it: debezium/pg/start.sh)"))?;
        Ok(Pg {
            conn,
            table: table.to_string(),
        })
    }

    async fn exec(&mut self, sql: String) -> anyhow::Result<()> {
        sqlx::raw_sql(AssertSqlSafe(sql.clone()))
            .execute(&mut self.conn)
            .await
            .with_context(|| sql)?;
        Ok(())
    }

    /// Creates the table with `rows` rows at revision 0.
    pub async fn create(&mut self, rows: u64) -> anyhow::Result<()> {
        let t = self.table.clone();
        self.exec(format!(
            "DROP TABLE IF EXISTS public.{t}; CREATE TABLE public.{t} (id int PRIMARY KEY, \
             name text NOT NULL, description text NOT NULL, price numeric(10,2) NOT NULL)"
        ))
        .await?;
        for chunk in (1..=rows).collect::<Vec<_>>().chunks(500) {
            let mut q = sqlx::QueryBuilder::new(format!(
                "INSERT INTO public.{t} (id, name, description, price) "
            ));
            q.push_values(chunk, |mut b, &id| {
                let (name, description) = texts(id, 0);
                b.push_bind(id as i32)
                    .push_bind(name)
                    .push_bind(description)
                    .push("19.99");
            });
            q.build().execute(&mut self.conn).await?;
        }
        Ok(())
    }

    /// One single-row UPDATE in its own transaction (autocommit): returns once committed.
    pub async fn update(&mut self, id: u64, rev: u64) -> anyhow::Result<()> {
        let (name, description) = texts(id, rev);
        let sql = format!(
            "UPDATE public.{} SET name = $1, description = $2 WHERE id = $3",
            self.table
        );
        sqlx::query(AssertSqlSafe(sql))
            .bind(name)
            .bind(description)
            .bind(id as i32)
            .execute(&mut self.conn)
            .await?;
        Ok(())
    }

    /// Drops the table, the bench's publications and any slot of its that is left.
    pub async fn cleanup(&mut self, prefix: &str) {
        let t = self.table.clone();
        let _ = self.exec(format!("DROP TABLE IF EXISTS public.{t}")).await;
        let _ = self
            .exec(format!(
                "DO $$ DECLARE p text; BEGIN \
                 FOR p IN SELECT pubname FROM pg_publication WHERE pubname LIKE 'pub_{prefix}%' LOOP \
                 EXECUTE format('DROP PUBLICATION %I', p); END LOOP; \
                 PERFORM pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                 WHERE slot_name LIKE '{prefix}%' AND NOT active; END $$"
            ))
            .await;
    }
}

/// The Debezium runner of one run: its own slot and publication, dropped on a clean stop.
pub struct Runner {
    pub proc: Proc,
}

pub struct RunnerSpec<'a> {
    pub dir: &'a Path,
    pub exchange: &'a str,
    pub table: &'a str,
    pub slot: String,
    pub poll_ms: u64,
    /// `initial` (the rows as `r` events first) or `no_data`.
    pub snapshot: &'a str,
}

impl Runner {
    pub async fn start(spec: RunnerSpec<'_>) -> anyhow::Result<Runner> {
        let ready: PathBuf = spec.dir.join(format!("{}.ready", spec.slot));
        let offsets = spec.dir.join(format!("{}.offsets", spec.slot));
        let log = spec.dir.join(format!("runner-{}.log", spec.slot));
        let _ = std::fs::remove_file(&ready);
        let mut command = Command::new(format!("{REPO}/.venv/bin/python"));
        command.args([
            &format!("{REPO}/debezium/runner.py"),
            "--amqp-url",
            AMQP,
            "--exchange",
            spec.exchange,
            "--slot-name",
            &spec.slot,
            "--publication-name",
            &format!("pub_{}", spec.slot),
            "--drop-slot-on-stop",
            "--offsets-file",
            &offsets.to_string_lossy(),
            "--ready-file",
            &ready.to_string_lossy(),
            "--table-include-list",
            &format!("public.{}", spec.table),
            "--snapshot-mode",
            spec.snapshot,
            "--poll-interval-ms",
            &spec.poll_ms.to_string(),
            "--exchange-wait",
            "60",
        ]);
        let mut proc = Proc::spawn(
            &format!("the Debezium runner (poll {} ms)", spec.poll_ms),
            command,
            &log,
        )?;
        let t0 = Instant::now();
        while !ready.exists() {
            proc.check_alive()?;
            anyhow::ensure!(
                t0.elapsed() < Duration::from_secs(180),
                "the runner was not streaming after 180 s; its log: {}",
                log.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(Runner { proc })
    }

    /// SIGTERM and wait (the slot is dropped on a clean stop).
    pub async fn stop(self) {
        let mut proc = self.proc;
        let _ = tokio::task::spawn_blocking(move || proc.stop(Duration::from_secs(60))).await;
    }
}
