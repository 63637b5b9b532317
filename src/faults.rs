//! Test-only fault injection: crashes at chosen moments, for the fault suite in `tests/`.
//!
//! Armed only by environment variables that no deployment sets (the daemon logs a warning
//! when one is): with none of them set, every hook is a load of a `OnceLock` and a branch.
//!
//! - `CDC_INDEXER_TEST_ABORT_AFTER_WRITES=N`: the sink aborts the process right after its
//!   `N`-th write request (a crash between two writes of one batch).
//! - `CDC_INDEXER_TEST_CRASH_ON_TEXT=S`: the pipeline aborts the process when a text it is
//!   about to embed contains `S` (a message that crashes the daemon, as a native library
//!   bug would).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

struct Armed {
    abort_after_writes: Option<u64>,
    crash_on_text: Option<String>,
}

fn armed() -> &'static Armed {
    static ARMED: OnceLock<Armed> = OnceLock::new();
    ARMED.get_or_init(|| Armed {
        abort_after_writes: std::env::var("CDC_INDEXER_TEST_ABORT_AFTER_WRITES")
            .ok()
            .and_then(|v| v.parse().ok()),
        crash_on_text: std::env::var("CDC_INDEXER_TEST_CRASH_ON_TEXT")
            .ok()
            .filter(|v| !v.is_empty()),
    })
}

/// Names of the armed hooks (the daemon warns at start when any is).
pub fn armed_hooks() -> Vec<&'static str> {
    let a = armed();
    let mut hooks = Vec::new();
    if a.abort_after_writes.is_some() {
        hooks.push("CDC_INDEXER_TEST_ABORT_AFTER_WRITES");
    }
    if a.crash_on_text.is_some() {
        hooks.push("CDC_INDEXER_TEST_CRASH_ON_TEXT");
    }
    hooks
}

/// Called by a sink after each write request it completed.
pub fn after_write_request() {
    static WRITES: AtomicU64 = AtomicU64::new(0);
    if let Some(limit) = armed().abort_after_writes {
        let n = WRITES.fetch_add(1, Ordering::SeqCst) + 1;
        if n >= limit {
            eprintln!("cdc-indexer: test fault: aborting after write request {n}");
            std::process::abort();
        }
    }
}

/// Called by the pipeline before it embeds `texts`.
pub fn before_embedding(texts: &[String]) {
    if let Some(needle) = &armed().crash_on_text
        && texts.iter().any(|t| t.contains(needle.as_str()))
    {
        eprintln!("cdc-indexer: test fault: crashing on a text that contains {needle:?}");
        std::process::abort();
    }
}
