//! The crash-loop guard: blame only the message that crashes the daemon.
//!
//! Every unclean exit (a crash, `kill -9`, an OOM kill) returns every unacknowledged
//! delivery to the queue, and a quorum queue charges each return against `x-delivery-limit`
//! — also to the deliveries that were only prefetched and never reached our code. Left to
//! the broker, a crash loop of *any* cause therefore dead-letters healthy messages.
//!
//! So the daemon keeps a small journal (`<pipeline.state_dir>/in-flight.json`): before it
//! processes a batch it writes down the ids of the batch's messages (fsynced, replaced
//! atomically); a clean end of a batch or of the process leaves nothing in flight. At start,
//! whatever the journal still lists was in flight when the last process died: those
//! messages become *suspects*. When a delivery comes back:
//!
//! - not a suspect (it was only prefetched): processed normally, in a batch;
//! - a suspect: processed **alone**, in a batch of one, so that a crash now blames it only —
//!   and with the consumer's prefetch narrowed to 1 until the first innocent delivery
//!   arrives, so that dying again returns nobody else's delivery to the queue;
//! - a suspect that *crashed* the daemon `pipeline.crash_limit` times while processed alone:
//!   dead-lettered as `crash-loop`, without being processed again.
//!
//! A *crash* is a death the daemon saw: a fatal signal (SIGSEGV, SIGBUS, SIGILL, SIGFPE,
//! SIGABRT — a native library's bug, an `abort()`) or a panic, which leave a marker file
//! (`<state_dir>/crashed`) on their way out. A death nobody saw (`kill -9`, the OOM killer, a
//! power cut) makes suspects but blames no one: a restart storm of another cause never
//! dead-letters a message. (A message that gets the daemon OOM-killed each time is processed
//! alone, prefetch 1, until the broker's `x-delivery-limit` dead-letters it; its neighbours
//! are not returned meanwhile.)
//!
//! The broker's `x-delivery-limit` stays as the last resort, set high enough that the guard
//! acts first. Without a usable journal (its directory not writable) every returned delivery
//! is processed alone and only the broker's limit dead-letters.
//!
//! A message's id is a hash of its routing key and body: stable across redeliveries and
//! connections (delivery tags are not).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A message's identity across redeliveries.
pub type MessageId = String;

/// The id of a message.
pub fn message_id(routing_key: &str, body: &[u8]) -> MessageId {
    let mut hasher = Sha256::new();
    hasher.update(routing_key.as_bytes());
    hasher.update([0u8]);
    hasher.update(body);
    hasher.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// How often a message was in flight when the daemon died.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Suspicion {
    /// Deaths while it was in a batch with others.
    pub crashes: u32,
    /// Deaths while it was processed alone.
    pub alone: u32,
    /// Of those, crashes the daemon saw (a fatal signal or a panic): only these blame it.
    #[serde(default)]
    pub crashed_alone: u32,
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct Journal {
    /// The batch being processed right now (empty between batches and after a clean stop).
    in_flight: Vec<MessageId>,
    /// Whether `in_flight` is one suspect processed alone.
    isolated: bool,
    suspects: BTreeMap<MessageId, Suspicion>,
}

/// What to do with a delivery that came back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Process it with others.
    Normal,
    /// Process it alone.
    Isolate,
    /// It crashed the daemon `crash_limit` times alone: dead-letter it (`crash-loop`).
    CrashLoop(Suspicion),
}

/// Most suspects remembered (oldest dropped first); a crash suspects at most one batch.
const MAX_SUSPECTS: usize = 10_000;

/// The file a crash leaves behind, in the state directory.
const CRASH_MARKER: &str = "crashed";

/// The crash marker's path, for the signal handler (set once).
static MARKER_PATH: std::sync::OnceLock<std::ffi::CString> = std::sync::OnceLock::new();

/// Makes fatal signals and panics of this process leave the crash marker in `dir` behind,
/// for the next start's [`CrashGuard::open`]. Only the first call has an effect.
pub fn arm_crash_marker(dir: &Path) {
    let marker = dir.join(CRASH_MARKER);
    use std::os::unix::ffi::OsStrExt;
    let Ok(path) = std::ffi::CString::new(marker.as_os_str().as_bytes()) else {
        return;
    };
    if MARKER_PATH.set(path).is_err() {
        return;
    }
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        leave_marker();
        previous(info);
    }));
    for signal in [
        libc::SIGSEGV,
        libc::SIGBUS,
        libc::SIGILL,
        libc::SIGFPE,
        libc::SIGABRT,
    ] {
        // SAFETY: `on_fatal_signal` only calls async-signal-safe functions (open, write,
        // close, raise); SA_RESETHAND restores the default action, so re-raising the signal
        // ends the process as it would have without us. The sigaction struct is zeroed and
        // then filled with a valid handler and an empty mask.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_fatal_signal as *const () as usize;
            action.sa_flags = libc::SA_RESETHAND | libc::SA_NODEFER;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
}

/// Writes the crash marker (async-signal-safe).
fn leave_marker() {
    if let Some(path) = MARKER_PATH.get() {
        // SAFETY: open/write/close on a NUL-terminated path we own; all async-signal-safe.
        unsafe {
            let fd = libc::open(
                path.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC,
                0o600,
            );
            if fd >= 0 {
                libc::write(fd, b"crashed\n".as_ptr().cast(), 8);
                libc::close(fd);
            }
        }
    }
}

extern "C" fn on_fatal_signal(signal: libc::c_int) {
    leave_marker();
    // SAFETY: raise is async-signal-safe; the handler was reset to the default action.
    unsafe {
        libc::raise(signal);
    }
}

pub struct CrashGuard {
    path: Option<PathBuf>,
    journal: Journal,
    crash_limit: u32,
    /// An exclusive lock on `<dir>/in-flight.lock` while the journal is ours: two daemons
    /// sharing one state directory would charge each other's batches.
    _lock: Option<std::fs::File>,
}

impl CrashGuard {
    /// Opens the journal in `dir` and charges whatever the last process left in flight.
    /// Returns the guard and, when the journal cannot be used, why (the daemon then warns
    /// and isolates every returned delivery).
    pub fn open(dir: &Path, crash_limit: u32) -> (CrashGuard, Option<String>) {
        let path = dir.join("in-flight.json");
        let mut guard = CrashGuard {
            path: Some(path.clone()),
            journal: Journal::default(),
            crash_limit,
            _lock: None,
        };
        if let Err(e) = std::fs::create_dir_all(dir) {
            guard.path = None;
            return (guard, Some(format!("cannot create {}: {e}", dir.display())));
        }
        let lock_path = dir.join("in-flight.lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path);
        match lock {
            Ok(file) if file.try_lock().is_ok() => guard._lock = Some(file),
            Ok(_) => {
                guard.path = None;
                return (
                    guard,
                    Some(format!(
                        "{} is locked by another cdc-indexer process; give each instance its own pipeline.state_dir",
                        lock_path.display()
                    )),
                );
            }
            Err(e) => {
                guard.path = None;
                return (
                    guard,
                    Some(format!("cannot open {}: {e}", lock_path.display())),
                );
            }
        }
        match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<Journal>(&bytes) {
                Ok(journal) => guard.journal = journal,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "crash journal unreadable; starting a new one");
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                guard.path = None;
                return (guard, Some(format!("cannot read {}: {e}", path.display())));
            }
        }
        let died_with = std::mem::take(&mut guard.journal.in_flight);
        let alone = std::mem::take(&mut guard.journal.isolated);
        let marker = dir.join(CRASH_MARKER);
        let crashed = marker.exists();
        if crashed && let Err(e) = std::fs::remove_file(&marker) {
            guard.path = None;
            return (
                guard,
                Some(format!("cannot remove {}: {e}", marker.display())),
            );
        }
        for id in died_with {
            let s = guard.journal.suspects.entry(id).or_default();
            if alone {
                s.alone += 1;
                if crashed {
                    s.crashed_alone += 1;
                }
            } else {
                s.crashes += 1;
            }
        }
        guard.prune();
        if let Err(e) = guard.save() {
            guard.path = None;
            return (guard, Some(e));
        }
        (guard, None)
    }

    /// A guard without a journal (tests, or a state directory that cannot be written).
    pub fn without_journal(crash_limit: u32) -> CrashGuard {
        CrashGuard {
            path: None,
            journal: Journal::default(),
            crash_limit,
            _lock: None,
        }
    }

    /// Number of suspects the last crashes left.
    pub fn suspects(&self) -> usize {
        self.journal.suspects.len()
    }

    /// The verdict on a delivery that came back (`redelivered`).
    pub fn verdict(&self, id: &MessageId) -> Verdict {
        if self.path.is_none() {
            return Verdict::Isolate;
        }
        match self.journal.suspects.get(id) {
            Some(s) if s.crashed_alone >= self.crash_limit => Verdict::CrashLoop(*s),
            Some(_) => Verdict::Isolate,
            None => Verdict::Normal,
        }
    }

    /// Records a batch about to be processed (several may be in flight: one being written
    /// while the next is prepared; a suspect batch is always alone). An error means the
    /// journal failed: the caller goes on without it (and says so once).
    pub fn begin(&mut self, ids: &[MessageId], isolated: bool) -> Result<(), String> {
        if self.path.is_none() {
            return Ok(());
        }
        self.journal.in_flight.extend(ids.iter().cloned());
        self.journal.isolated = isolated && self.journal.in_flight.len() == ids.len();
        self.save().inspect_err(|_| self.path = None)
    }

    /// The batch ended without a crash: acked (its suspects are cleared) or abandoned to a
    /// lost session or a shutdown (`acked` false; they come back, still suspect or not).
    pub fn end(&mut self, ids: &[MessageId], acked: bool) {
        if acked {
            for id in ids {
                self.journal.suspects.remove(id);
            }
        }
        let done: std::collections::HashSet<&MessageId> = ids.iter().collect();
        self.journal.in_flight.retain(|id| !done.contains(id));
        if self.journal.in_flight.is_empty() {
            self.journal.isolated = false;
        }
        // Written lazily: the next `begin` (or a clean stop) writes it. A crash before that
        // charges a batch that was in fact acked, whose messages never come back.
    }

    /// Every batch in flight was abandoned without a crash (a lost session, a shutdown):
    /// they come back, and none of them is to blame.
    pub fn abandon(&mut self) {
        self.journal.in_flight.clear();
        self.journal.isolated = false;
    }

    /// A clean stop: nothing is in flight.
    pub fn close(&mut self) {
        self.journal.in_flight.clear();
        self.journal.isolated = false;
        if self.path.is_some()
            && let Err(e) = self.save()
        {
            tracing::warn!(error = %e, "cannot write the crash journal at shutdown");
        }
    }

    fn prune(&mut self) {
        while self.journal.suspects.len() > MAX_SUSPECTS {
            let Some(first) = self.journal.suspects.keys().next().cloned() else {
                break;
            };
            self.journal.suspects.remove(&first);
        }
    }

    fn save(&self) -> Result<(), String> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let bytes = serde_json::to_vec(&self.journal)
            .map_err(|e| format!("cannot encode the crash journal: {e}"))?;
        let tmp = path.with_extension("json.tmp");
        let write = || -> std::io::Result<()> {
            use std::io::Write as _;
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(&bytes)?;
            file.sync_data()?;
            std::fs::rename(&tmp, path)
        };
        write().map_err(|e| format!("cannot write the crash journal {}: {e}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(names: &[&str]) -> Vec<MessageId> {
        names
            .iter()
            .map(|n| message_id("rk", n.as_bytes()))
            .collect()
    }

    #[test]
    fn only_what_was_in_flight_when_the_daemon_died_is_suspect() {
        let dir = tempfile::tempdir().expect("tmp");
        let batch = ids(&["a", "b"]);
        let (mut guard, problem) = CrashGuard::open(dir.path(), 3);
        assert_eq!(problem, None);
        guard.begin(&batch, false).expect("begin");
        drop(guard); // the process dies here

        let (guard, _) = CrashGuard::open(dir.path(), 3);
        assert_eq!(guard.verdict(&batch[0]), Verdict::Isolate);
        assert_eq!(guard.verdict(&batch[1]), Verdict::Isolate);
        assert_eq!(
            guard.verdict(&ids(&["prefetched only"])[0]),
            Verdict::Normal
        );
    }

    #[test]
    fn a_message_that_kills_the_daemon_alone_is_blamed_after_the_limit() {
        let dir = tempfile::tempdir().expect("tmp");
        let culprit = ids(&["culprit"]);
        {
            let (mut g, _) = CrashGuard::open(dir.path(), 2);
            g.begin(&[culprit[0].clone(), ids(&["neighbour"])[0].clone()], false)
                .expect("begin");
        }
        for _ in 0..2 {
            let (mut g, _) = CrashGuard::open(dir.path(), 2);
            assert_eq!(g.verdict(&culprit[0]), Verdict::Isolate);
            g.begin(&culprit, true).expect("begin");
            // It crashes the daemon (what the signal handler leaves behind).
            std::fs::write(dir.path().join(CRASH_MARKER), "crashed\n").expect("marker");
        }
        let (g, _) = CrashGuard::open(dir.path(), 2);
        assert_eq!(
            g.verdict(&culprit[0]),
            Verdict::CrashLoop(Suspicion {
                crashes: 1,
                alone: 2,
                crashed_alone: 2,
            })
        );
        // Its neighbour is suspect only until it is processed without a crash.
        let mut g = g;
        let neighbour = ids(&["neighbour"]);
        assert_eq!(g.verdict(&neighbour[0]), Verdict::Isolate);
        g.begin(&neighbour, true).expect("begin");
        g.end(&neighbour, true);
        assert_eq!(g.verdict(&neighbour[0]), Verdict::Normal);
    }

    #[test]
    fn deaths_nobody_saw_make_suspects_but_blame_no_one() {
        let dir = tempfile::tempdir().expect("tmp");
        let victim = ids(&["victim of kill -9"]);
        for _ in 0..10 {
            let (mut g, _) = CrashGuard::open(dir.path(), 2);
            g.begin(&victim, true).expect("begin");
            // killed from outside: no marker
        }
        let (g, _) = CrashGuard::open(dir.path(), 2);
        assert_eq!(
            g.verdict(&victim[0]),
            Verdict::Isolate,
            "processed alone, never dead-lettered"
        );
    }

    #[test]
    fn a_clean_stop_leaves_nothing_suspect() {
        let dir = tempfile::tempdir().expect("tmp");
        let batch = ids(&["x"]);
        {
            let (mut g, _) = CrashGuard::open(dir.path(), 3);
            g.begin(&batch, false).expect("begin");
            g.end(&batch, false);
            g.close();
        }
        let (g, _) = CrashGuard::open(dir.path(), 3);
        assert_eq!(g.verdict(&batch[0]), Verdict::Normal);
        assert_eq!(g.suspects(), 0);
    }

    #[test]
    fn without_a_journal_every_returned_delivery_is_isolated() {
        let g = CrashGuard::without_journal(3);
        assert_eq!(g.verdict(&ids(&["x"])[0]), Verdict::Isolate);
    }
}
