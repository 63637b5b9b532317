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
    let out = Command::new(env!("CARGO_BIN_EXE_cdc-indexer"))
        .args(["--config", path_str(&w.config_path), "reconcile"])
        .args(["--source", SOURCE, "--json", "--examples", "100"])
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
