//! The startup window: one rule, shared by every executor, deciding whether a run that ended
//! right after it started failed to start rather than ran and failed.
//!
//! The rule (the window is the event's `startup_window_seconds`, carried in the job's spec as
//! [`RunSpec::startup_window`](super::RunSpec::startup_window); 0 turns the rule off):
//!
//! 1. A run that ends by itself (not cancelled, not timed out) with a **non-zero exit code**
//!    less than the window after its process started is a **start failure**
//!    (`error.start_failure = true` in the job, with a message saying it exited within the
//!    startup window). A zero exit, a signal, or an exit after the window is not.
//! 2. Its kind is **infrastructure** when the program itself could not be run:
//!    - `exec`: exit code 127 (command not found) or 126 (found but not executable), the
//!      codes `execvp`-style launchers (the shell of the ssh executor, the container
//!      runtime's exec) report for a missing or non-executable program;
//!    - any runtime: what the executor detects directly — a spawn that fails (`ENOENT`,
//!      `EACCES`: the local executor), the container init or the engine refusing to exec
//!      the interpreter or program, the ssh start script not finding the interpreter (exit
//!      127 with its `start-error` file). Those are reported as
//!      [`ExecError::StartFailed`] by the executor before this rule is asked.
//! 3. Otherwise its kind is **script**: for `bash`/`sh`, exit 127 within the window is a
//!    command missing *inside* the script (the interpreter ran and reported it), which is the
//!    script's fault, and any other early non-zero exit (a Python traceback at import, a
//!    syntax error, `exit 1`) is too. Retries follow the kind as usual.

use std::time::Duration;

use super::{ExecError, Runtime};

/// What the rule needs to know about a run that ended by itself.
#[derive(Debug, Clone, Copy)]
pub struct EarlyEnd<'a> {
    pub runtime: Runtime,
    /// The run's startup window (zero: the rule is off).
    pub window: Duration,
    /// Whether the window came with the run ([`RunSpec::startup_window`](super::RunSpec::startup_window),
    /// as every job's does): then the whole rule applies. An executor's configured default
    /// window (library use without one) keeps only rule 2's `exec` 126/127 heuristic.
    pub from_spec: bool,
    /// From the start of the process to its exit.
    pub ran_for: Duration,
    pub exit_code: Option<i32>,
    /// The program (for `exec`) or interpreter, for the message.
    pub program: &'a str,
    /// Where it ran, for the message (`" in image `x`"`, `" on host:22"`, or empty).
    pub place: &'a str,
    /// The last lines of its stderr.
    pub stderr_tail: &'a [String],
}

/// The window of a run: its own, else the executor's configured default; and whether it
/// was the run's own (see [`EarlyEnd::from_spec`]).
pub fn window_of(spec: &super::RunSpec, configured: Duration) -> (Duration, bool) {
    match spec.startup_window {
        Some(window) => (window, true),
        None => (configured, false),
    }
}

/// Applies the rule: `None` when the run is not a start failure.
pub fn judge(end: &EarlyEnd<'_>) -> Option<ExecError> {
    let code = end.exit_code.filter(|&c| c != 0)?;
    if end.window.is_zero() || end.ran_for >= end.window {
        return None;
    }
    let within = format!(
        "ended with exit code {code} within its startup window of {}",
        seconds(end.window)
    );
    let missing = match (end.runtime, code) {
        (Runtime::Exec, 126) => Some("found but not executable"),
        (Runtime::Exec, 127) => Some("command not found"),
        _ => None,
    };
    if missing.is_none() && !end.from_spec {
        return None;
    }
    let mut reason = match missing {
        Some(what) => format!("`{}`{} {within} ({what})", end.program, end.place),
        None => format!("the run{} {within}", end.place),
    };
    if !end.stderr_tail.is_empty() {
        reason.push_str(": ");
        reason.push_str(&end.stderr_tail.join(" / "));
    }
    Some(match missing {
        Some(_) => ExecError::StartFailed { reason },
        None => ExecError::EarlyExit { code, reason },
    })
}

fn seconds(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn end(runtime: Runtime, code: Option<i32>, ran_for_ms: u64) -> EarlyEnd<'static> {
        EarlyEnd {
            runtime,
            window: Duration::from_secs(5),
            from_spec: true,
            ran_for: Duration::from_millis(ran_for_ms),
            exit_code: code,
            program: "prog",
            place: "",
            stderr_tail: &[],
        }
    }

    #[test]
    fn early_non_zero_exits_are_start_failures() {
        let e = judge(&end(Runtime::Bash, Some(1), 100)).expect("start failure");
        assert!(matches!(e, ExecError::EarlyExit { code: 1, .. }), "{e:?}");
        assert_eq!(e.kind(), super::super::ErrorKind::Script);
        assert!(e.is_start_failure());
        assert!(e.to_string().contains("startup window of 5 s"), "{e}");
    }

    #[test]
    fn missing_programs_are_infrastructure_for_exec_only() {
        for code in [126, 127] {
            let e = judge(&end(Runtime::Exec, Some(code), 10)).expect("start failure");
            assert!(matches!(e, ExecError::StartFailed { .. }), "{e:?}");
            assert_eq!(e.kind(), super::super::ErrorKind::Infrastructure);
            assert!(e.is_start_failure());
        }
        // bash's own 127 is a command missing inside the script: the script's fault.
        let e = judge(&end(Runtime::Bash, Some(127), 10)).expect("start failure");
        assert_eq!(e.kind(), super::super::ErrorKind::Script);
    }

    #[test]
    fn late_zero_signalled_or_windowless_runs_are_not() {
        assert!(judge(&end(Runtime::Bash, Some(1), 5000)).is_none());
        assert!(judge(&end(Runtime::Bash, Some(0), 10)).is_none());
        assert!(judge(&end(Runtime::Bash, None, 10)).is_none());
        let off = EarlyEnd {
            window: Duration::ZERO,
            ..end(Runtime::Exec, Some(127), 0)
        };
        assert!(judge(&off).is_none());
        let configured = EarlyEnd {
            from_spec: false,
            ..end(Runtime::Bash, Some(1), 10)
        };
        assert!(
            judge(&configured).is_none(),
            "a configured window: exec only"
        );
        let configured_exec = EarlyEnd {
            from_spec: false,
            ..end(Runtime::Exec, Some(127), 10)
        };
        assert!(judge(&configured_exec).is_some());
    }
}
