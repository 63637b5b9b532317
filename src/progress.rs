//! Signs of life from inside long work.
//!
//! `/healthz` and the systemd watchdog fail when the pipeline's heartbeat has been silent
//! for too long (a stuck loop). One batch can legitimately take longer than that: a long
//! document is many embedding sub-batches, a slow index many requests, a rate-limited
//! provider a `Retry-After` wait. So the code doing that work beats at each step it
//! completes: per embedding sub-batch, per request, per second of a wait. A call that hangs
//! beats no more, which is what the watchdog is for.
//!
//! The pipeline runs each batch inside [`scope`]; embedders and sinks call [`beat`] (or take
//! a [`Progress`] along to a thread of their own) without knowing who listens.

use std::sync::Arc;
use std::time::Duration;

use crate::metrics::Health;

tokio::task_local! {
    static CURRENT: Arc<Health>;
}

/// A handle that beats the heartbeat of whoever started the work; a no-op outside a scope.
#[derive(Clone, Default)]
pub struct Progress(Option<Arc<Health>>);

impl Progress {
    /// The progress handle of the current task (to move into a thread).
    pub fn current() -> Progress {
        Progress(CURRENT.try_with(Arc::clone).ok())
    }

    pub fn beat(&self) {
        if let Some(health) = &self.0 {
            health.beat();
        }
    }
}

/// Runs `work` with `health` as the heartbeat that [`beat`] reaches.
pub async fn scope<F: std::future::Future>(health: Arc<Health>, work: F) -> F::Output {
    CURRENT.scope(health, work).await
}

/// One step of long work is done.
pub fn beat() {
    let _ = CURRENT.try_with(|h| h.beat());
}

/// Sleeps `wait`, beating every second.
pub async fn sleep(wait: Duration) {
    let until = tokio::time::Instant::now() + wait;
    loop {
        beat();
        let now = tokio::time::Instant::now();
        if now >= until {
            return;
        }
        tokio::time::sleep((until - now).min(Duration::from_secs(1))).await;
    }
}
