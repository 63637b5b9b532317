//! `cdc-indexer reconcile` as the suite's oracle: a test that ends with a known source state
//! ends with reconcile finding every key `ok` (exit 0), through the running daemon's side port
//! or, once it has stopped, on the index directly.

use std::collections::BTreeSet;
use std::process::Command;

use serde_json::Value;

use super::*;

/// The local CDC cluster (debezium/pg/), password from the environment.
pub const SOURCE: &str = "postgres://postgres@127.0.0.1:54329/postgres";
const PASSWORD: &str = "postgres";

/// One run: exit code, the JSON report, stderr.
pub struct Reconciled {
    pub code: i32,
    pub json: Value,
    pub stderr: String,
}

impl Reconciled {
    /// The keys of `table` in `state` (`missing`, `stale`, `orphan`), from the examples.
    pub fn keys(&self, table: &str, state: &str) -> BTreeSet<String> {
        self.table(table)["examples"][state]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .filter_map(|e| e["key"].as_str().map(str::to_string))
            .collect()
    }

    pub fn count(&self, table: &str, state: &str) -> u64 {
        self.table(table)[state].as_u64().unwrap_or(u64::MAX)
    }

    pub fn table(&self, table: &str) -> &Value {
        self.json["tables"]
            .as_array()
            .and_then(|ts| ts.iter().find(|t| t["table"] == table))
            .unwrap_or(&Value::Null)
    }
}

/// Runs `cdc-indexer reconcile --source SOURCE --json --examples 100 <args>` with `w`'s config.
pub fn reconcile(w: &World, args: &[&str]) -> Reconciled {
    reconcile_with(w, args, &[])
}

/// [`reconcile`] with extra environment (e.g. `CDC_INDEXER__SINK__KIND`).
pub fn reconcile_with(w: &World, args: &[&str], env: &[(&str, &str)]) -> Reconciled {
    reconcile_from(w, SOURCE, args, env)
}

/// [`reconcile_with`] against another source database (`postgres://…`).
pub fn reconcile_from(w: &World, source: &str, args: &[&str], env: &[(&str, &str)]) -> Reconciled {
    let out = Command::new(env!("CARGO_BIN_EXE_cdc-indexer"))
        .args(["--config", path_str(&w.config_path), "reconcile"])
        .args(["--source", source, "--json", "--examples", "100"])
        .args(args)
        .env("CDC_INDEXER_SOURCE_PASSWORD", PASSWORD)
        .env("CDC_INDEXER_LOG", "warn")
        .envs(env.iter().copied())
        .output()
        .expect("run reconcile");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    Reconciled {
        code: out.status.code().unwrap_or(-1),
        json: serde_json::from_str(&stdout).unwrap_or(Value::Null),
        stderr: format!("{stderr}\n{stdout}"),
    }
}

/// The oracle: reconcile finds every key of every table of `w`'s rules `ok`.
pub fn assert_reconciled(w: &World) {
    let r = reconcile(w, &[]);
    assert_eq!(
        r.code,
        0,
        "reconcile found drift: {}\n{}",
        serde_json::to_string_pretty(&r.json).unwrap_or_default(),
        r.stderr
    );
}

/// One table of a test's expected final state: the rows the index must equal, for tests whose
/// events were made by hand (no source database behind them).
pub struct Expected {
    /// `schema.table`, as the rule names it.
    pub table: String,
    /// Column definitions (`id int PRIMARY KEY, name text`). The types decide how reconcile
    /// reads each value back (src/reconcile/source.rs): pick the type whose reading equals what
    /// the events carried (an event's JSON integer: `int`/`bigint`; its float: `double
    /// precision`; its string: `text`; a key beyond 64 bits: `numeric`).
    pub columns: String,
    /// The rows, as JSON objects by column name. A JSON string is fed to the column type's
    /// input function, so any type can be given as its text (`"1234.56"`, `"\\xdeadbeef"`).
    pub rows: Vec<Value>,
}

impl Expected {
    pub fn new(table: &str, columns: &str, rows: impl IntoIterator<Item = Value>) -> Expected {
        Expected {
            table: table.to_string(),
            columns: columns.to_string(),
            rows: rows.into_iter().collect(),
        }
    }
}

/// Runs `sql` (any length: it goes through stdin) in database `db` of the CDC cluster.
pub fn psql_in(db: &str, sql: &str) {
    use std::io::Write as _;
    let mut child = Command::new(format!("{REPO}/debezium/pg/psql.sh"))
        .args(["-q", "-v", "ON_ERROR_STOP=1"])
        .env("PGDATABASE_CDC", db)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("psql");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(sql.as_bytes())
        .expect("write SQL");
    let out = child.wait_with_output().expect("psql");
    assert!(
        out.status.success(),
        "psql in {db}: {}: {}",
        &sql[..sql.floor_char_boundary(300)],
        String::from_utf8_lossy(&out.stderr)
    );
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A database of one test's own on the CDC cluster, holding its expected tables (parallel
/// tests never share one, so every test can have its `public.products`). Dropped on drop.
pub struct SourceDb {
    pub name: String,
}

impl SourceDb {
    /// Creates the database and fills `tables`.
    pub fn materialise(tables: &[Expected]) -> SourceDb {
        debezium::pg_start();
        let db = SourceDb {
            name: format!("oracle_{}_{}", std::process::id(), rand_suffix()),
        };
        debezium::psql(&format!("CREATE DATABASE {}", db.name));
        let mut sql = String::new();
        for t in tables {
            let (schema, table) = t
                .table
                .split_once('.')
                .unwrap_or_else(|| panic!("{}: expected schema.table", t.table));
            let quoted = format!("{}.{}", quote_ident(schema), quote_ident(table));
            let rows = Value::Array(t.rows.clone()).to_string();
            assert!(!rows.contains("$rows$"), "rows quote the delimiter");
            sql.push_str(&format!(
                "CREATE SCHEMA IF NOT EXISTS {schema_q};\n\
                 CREATE TABLE {quoted} ({columns});\n\
                 INSERT INTO {quoted} SELECT * FROM jsonb_populate_recordset(NULL::{quoted}, $rows${rows}$rows$::jsonb);\n",
                schema_q = quote_ident(schema),
                columns = t.columns,
            ));
        }
        psql_in(&db.name, &sql);
        db
    }

    /// `postgres://…/<name>` (the password comes from the environment, as for [`SOURCE`]).
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:54329/{}", self.name)
    }
}

impl Drop for SourceDb {
    fn drop(&mut self) {
        let _ = Command::new(format!("{REPO}/debezium/pg/psql.sh"))
            .args([
                "-q",
                "-c",
                &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
            ])
            .output();
    }
}

/// The oracle for tests built on hand-made events: the expected final rows become real tables
/// ([`SourceDb`]) and `reconcile` must find every key of them `ok` (exit 0; on drift the
/// panic prints its JSON report). The index is read as `w`'s config says (through the running
/// daemon's search port, or directly once it has stopped: drop every open [`Index`] first).
pub fn assert_index_matches(w: &World, tables: &[Expected]) {
    assert_index_matches_with(w, tables, &[]);
}

/// [`assert_index_matches`] with extra environment for `reconcile` (e.g. the sink's URL).
pub fn assert_index_matches_with(w: &World, tables: &[Expected], env: &[(&str, &str)]) {
    assert!(!tables.is_empty(), "the oracle needs the expected tables");
    let db = SourceDb::materialise(tables);
    let mut args: Vec<&str> = Vec::new();
    for t in tables {
        args.extend(["--table", t.table.as_str()]);
    }
    let r = reconcile_from(w, &db.url(), &args, env);
    drop(db);
    assert_eq!(
        r.code,
        0,
        "reconcile found drift between the index and the expected rows: {}\n{}",
        serde_json::to_string_pretty(&r.json).unwrap_or_default(),
        r.stderr
    );
    let rows: usize = tables.iter().map(|t| t.rows.len()).sum();
    let ok: u64 = tables.iter().map(|t| r.count(&t.table, "ok")).sum();
    assert_eq!(ok, rows as u64, "every expected row judged ok: {}", r.json);
}
