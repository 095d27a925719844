//! Process-group signalling for the local executor.

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// A process group created for one run (the main process was spawned with
/// `process_group(0)`, so the group id is its pid).
///
/// Dropping an armed guard sends `SIGKILL` to the group: if the run future is dropped half-way
/// (the caller gave up on it), nothing it started is left behind.
#[derive(Debug)]
pub(crate) struct ProcessGroup {
    pgid: Option<Pid>,
}

impl ProcessGroup {
    pub(crate) fn new(pid: Option<u32>) -> Self {
        let pgid = pid
            .and_then(|p| i32::try_from(p).ok())
            .filter(|&p| p > 1)
            .map(Pid::from_raw);
        ProcessGroup { pgid }
    }

    /// Sends `signal` to every process of the group. A group that no longer exists is not an
    /// error.
    pub(crate) fn signal(&self, signal: Signal) {
        let Some(pgid) = self.pgid else { return };
        match killpg(pgid, signal) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(e) => tracing::warn!(pgid = pgid.as_raw(), %signal, error = %e, "killpg failed"),
        }
    }

    /// Kills the group with `SIGKILL` and disarms the guard.
    pub(crate) fn kill_and_disarm(&mut self) {
        self.signal(Signal::SIGKILL);
        self.pgid = None;
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        self.signal(Signal::SIGKILL);
    }
}
