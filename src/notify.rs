//! systemd's notification protocol (`sd_notify`), for `Type=notify` units.
//!
//! systemd passes a datagram socket in `NOTIFY_SOCKET` (a path, or an abstract name written
//! with a leading `@`). We send `READY=1` once the daemon consumes, `WATCHDOG=1` at half the
//! `WATCHDOG_USEC` interval while the pipeline loop is alive, and `STOPPING=1` on shutdown.
//! Without `NOTIFY_SOCKET` (not under systemd) every call is a no-op.

use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::metrics::Health;

/// Sends one notification. Errors are logged, never fatal: systemd is an observer.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let result = UnixDatagram::unbound().and_then(|socket| {
        let path = path.to_string_lossy();
        if let Some(name) = path.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
            socket.send_to_addr(state.as_bytes(), &addr)
        } else {
            socket.send_to(state.as_bytes(), path.as_ref())
        }
    });
    if let Err(e) = result {
        tracing::warn!(error = %e, state, "cannot notify systemd");
    }
}

/// The watchdog interval systemd asked for, if any (and meant for us).
fn watchdog_interval() -> Option<Duration> {
    if let Some(pid) = std::env::var("WATCHDOG_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        && pid != std::process::id()
    {
        return None;
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Sends READY=1 when the daemon first becomes ready, then pings the watchdog while the
/// pipeline loop is alive, until `cancel`.
pub fn spawn(health: Arc<Health>, cancel: CancellationToken) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    tokio::spawn(async move {
        loop {
            if health.ready() {
                notify("READY=1\nSTATUS=consuming");
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = cancel.cancelled() => return,
            }
        }
        let Some(interval) = watchdog_interval() else {
            return;
        };
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval / 2) => {}
                _ = cancel.cancelled() => return,
            }
            // A stalled pipeline loop stops the pings, and systemd restarts us.
            if health.alive((interval.as_secs() as i64).max(1)) {
                notify("WATCHDOG=1");
            }
        }
    });
}
