//! The shell side of a remote run: the files written into the run's temporary directory and
//! the commands that start them.
//!
//! Everything runs under `/bin/sh` (POSIX), whatever the user's login shell is: the commands
//! given to sshd are single `exec /bin/sh 'FILE'` lines that every common shell understands.
//!
//! * `control.sh`: started first on its own channel. It reads one command per line on stdin:
//!   `TERM` / `KILL` signal the run's process group (answering `signalled SIG` or `nogroup SIG`
//!   when the run has not recorded its group yet). At end of input — sent by the worker when the
//!   run is over, or caused by the connection dropping (worker crash, network loss) — it kills
//!   whatever is left of the group and removes the temporary directory. Cleanup therefore
//!   happens even when the worker disappears.
//! * `start.sh`: makes sure the run leads its own process group (sshd already makes a session's
//!   process a session leader; `setsid` is the fallback), records the group id in `pgid`, loads
//!   `env.sh`, changes to the working directory, checks that the interpreter or program exists
//!   (writing `start-error` and exiting 127 if not) and `exec`s it with stdin from `/dev/null`,
//!   so the run's process is the channel's process and its exit status or signal is reported
//!   as such.
//! * `env.sh`: the run's environment as `export NAME='value'` lines. Variables travel in a
//!   private file rather than on a command line (visible in `ps`) or as SSH `env` requests
//!   (which sshd drops unless `AcceptEnv` lists them).

use std::fmt::Write as _;

use super::SshConfig;
use crate::executor::{ExecError, RunSpec, Runtime};

/// Exit code of `start.sh` when the run could not be started (with `start-error` written).
pub(crate) const START_FAILED_CODE: u32 = 127;

/// Quotes `s` for POSIX sh (single quotes; `'` becomes `'\''`).
pub(crate) fn sh_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        if c == '\'' {
            out.push_str("'\\''");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    out
}

/// A valid shell variable name (`[A-Za-z_][A-Za-z0-9_]*`).
pub(crate) fn is_shell_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// An absolute path made only of `[A-Za-z0-9/_.-]`, safe to put in a command line for any shell.
pub(crate) fn is_plain_absolute_path(path: &str) -> bool {
    path.starts_with('/')
        && path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'_' | b'.' | b'-'))
        && !path.split('/').any(|part| part == "..")
}

/// The run's temporary directory on the server and the paths inside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RemoteDir {
    root: String,
}

impl RemoteDir {
    /// `{temp_root}/baton-{job id}-{random}`.
    pub(crate) fn new(config: &SshConfig, spec: &RunSpec) -> Result<Self, ExecError> {
        let base = config.remote_temp_dir.trim_end_matches('/');
        let base = if base.is_empty() { "/" } else { base };
        if !is_plain_absolute_path(base) {
            return Err(ExecError::start_failed(format!(
                "the ssh executor's remote temporary directory `{}` must be an absolute path of letters, digits, `/`, `_`, `.` and `-`",
                config.remote_temp_dir.escape_debug()
            )));
        }
        let root = format!(
            "{}/baton-{}-{:016x}",
            base.trim_end_matches('/'),
            spec.job_id.simple(),
            rand::random::<u64>()
        );
        Ok(RemoteDir { root })
    }

    pub(crate) fn root(&self) -> &str {
        &self.root
    }

    pub(crate) fn path(&self, rel: &str) -> String {
        format!("{}/{rel}", self.root)
    }

    /// The login-shell command that runs `file` (inside the directory) with `/bin/sh`.
    pub(crate) fn sh_command(&self, file: &str) -> String {
        format!("exec /bin/sh {}", sh_quote(&self.path(file)))
    }

    /// The login-shell command that removes the directory (used when `control.sh` never
    /// started).
    pub(crate) fn remove_command(&self) -> String {
        format!("rm -rf {}", sh_quote(&self.root))
    }
}

/// The generated files of one run.
#[derive(Debug, Clone)]
pub(crate) struct RunFiles {
    pub control_sh: String,
    pub start_sh: String,
    pub env_sh: String,
    /// `(file name, content)` of the script, for script runtimes.
    pub script: Option<(&'static str, String)>,
    /// Whether `work/` must be created (no explicit working directory).
    pub make_workdir: bool,
}

/// Checks `spec` and writes the run's files for the directory `dir`.
pub(crate) fn build(
    spec: &RunSpec,
    config: &SshConfig,
    dir: &RemoteDir,
) -> Result<RunFiles, ExecError> {
    let (exec_line, check, script) = match spec.runtime {
        Runtime::Bash | Runtime::Sh | Runtime::Python | Runtime::Node => {
            let Some(content) = &spec.content else {
                return Err(ExecError::invalid_spec(format!(
                    "{} runtime needs script content",
                    spec.runtime
                )));
            };
            let interpreter = match spec.runtime {
                Runtime::Bash => &config.bash,
                Runtime::Sh => &config.sh,
                Runtime::Python => &config.python,
                _ => &config.node,
            };
            let name = spec.runtime.script_file_name().unwrap_or("script");
            let line = format!(
                "exec {} {} </dev/null",
                sh_quote(interpreter),
                sh_quote(&dir.path(name))
            );
            let check = program_check(interpreter, "interpreter");
            (line, check, Some((name, content.clone())))
        }
        Runtime::Exec => {
            let argv = spec.command.as_deref().unwrap_or_default();
            match argv.first() {
                Some(first) if !first.is_empty() => {}
                _ => {
                    return Err(ExecError::invalid_spec(
                        "exec runtime needs a non-empty command",
                    ));
                }
            }
            if argv.iter().any(|a| a.contains('\0')) {
                return Err(ExecError::invalid_spec(
                    "exec arguments cannot contain NUL characters",
                ));
            }
            let quoted: Vec<String> = argv.iter().map(|a| sh_quote(a)).collect();
            let line = format!("exec {} </dev/null", quoted.join(" "));
            (line, program_check(&argv[0], "command"), None)
        }
        Runtime::Http => {
            return Err(ExecError::invalid_spec(
                "the http runtime does not run over ssh (use the local or container executor)",
            ));
        }
    };
    let workdir = match &spec.workdir {
        Some(path) => {
            let path = path.to_str().ok_or_else(|| {
                ExecError::invalid_spec("the working directory is not valid UTF-8")
            })?;
            if path.contains('\0') {
                return Err(ExecError::invalid_spec(
                    "the working directory contains a NUL character",
                ));
            }
            path.to_owned()
        }
        None => dir.path("work"),
    };
    let root = sh_quote(dir.root());

    let mut start = String::new();
    let _ = writeln!(start, "# baton-worker: starts one run (generated)");
    let _ = writeln!(start, "T={root}");
    start.push_str(
        r#"fail() {
  printf '%s\n' "$1" > "$T/start-error"
  printf 'baton: %s\n' "$1" >&2
  exit 127
}
# The run leads its own process group so that timeout and cancel can kill all of it. sshd
# makes a session's process a session leader; check, and fall back to setsid(1).
if [ -z "${BATON_SETSID:-}" ] && [ -r "/proc/$$/stat" ]; then
  read -r stat < "/proc/$$/stat"
  set -- ${stat##*) }
  if [ "${3:-}" != "$$" ] && command -v setsid >/dev/null 2>&1; then
    BATON_SETSID=1
    export BATON_SETSID
    exec setsid /bin/sh "$T/start.sh"
  fi
fi
unset BATON_SETSID
echo "$$" > "$T/pgid" || fail "cannot record the process group"
. "$T/env.sh" || fail "cannot load the run's environment"
"#,
    );
    let _ = writeln!(
        start,
        "cd {} || fail {}",
        sh_quote(&workdir),
        sh_quote(&format!(
            "working directory {workdir} does not exist on the server"
        ))
    );
    start.push_str(&check);
    let _ = writeln!(start, "{exec_line}");

    Ok(RunFiles {
        control_sh: control_script(dir),
        start_sh: start,
        env_sh: env_script(spec, dir)?,
        script,
        make_workdir: spec.workdir.is_none(),
    })
}

/// A check that `program` can be run, failing the start with a clear reason otherwise.
fn program_check(program: &str, what: &str) -> String {
    let quoted = sh_quote(program);
    if program.contains('/') {
        format!(
            "[ -f {quoted} ] && [ -x {quoted} ] || fail {}\n",
            sh_quote(&format!(
                "{what} `{program}` is not an executable file on the server"
            ))
        )
    } else {
        format!(
            "command -v {quoted} >/dev/null 2>&1 || fail {}\n",
            sh_quote(&format!(
                "{what} `{program}` not found on the server's PATH"
            ))
        )
    }
}

fn control_script(dir: &RemoteDir) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# baton-worker: control channel of one run (generated)");
    let _ = writeln!(s, "T={}", sh_quote(dir.root()));
    s.push_str(
        r#"signal_group() {
  [ -s "$T/pgid" ] || return 1
  read -r pgid < "$T/pgid" || return 1
  case $pgid in ''|*[!0-9]*) return 1 ;; esac
  [ "$pgid" -gt 1 ] || return 1
  kill -s "$1" -- "-$pgid" 2>/dev/null
  return 0
}
while IFS= read -r command; do
  case $command in
    TERM|KILL)
      if signal_group "$command"; then echo "signalled $command"; else echo "nogroup $command"; fi ;;
    *) echo "unknown $command" ;;
  esac
done
# End of input: the run is over, or the worker is gone. Nothing of the run outlives this.
signal_group KILL
rm -rf "$T"
echo cleaned
"#,
    );
    s
}

fn env_script(spec: &RunSpec, dir: &RemoteDir) -> Result<String, ExecError> {
    let mut s = String::new();
    let _ = writeln!(s, "export PYTHONUNBUFFERED='1'");
    for (key, value) in &spec.env {
        if !is_shell_name(key) {
            return Err(ExecError::invalid_spec(format!(
                "environment variable `{}` cannot be set on an SSH server: names must match [A-Za-z_][A-Za-z0-9_]*",
                key.escape_debug()
            )));
        }
        if value.contains('\0') {
            return Err(ExecError::invalid_spec(format!(
                "environment variable `{key}` contains a NUL character"
            )));
        }
        let _ = writeln!(s, "export {key}={}", sh_quote(value));
    }
    let _ = writeln!(
        s,
        "export BATON_JOB_ID={}",
        sh_quote(&spec.job_id.to_string())
    );
    if spec.run_dir.is_some() {
        let _ = writeln!(s, "export BATON_DIR={}", sh_quote(&dir.path("run")));
    }
    if spec.helpers_dir.is_some() {
        let helpers = sh_quote(&dir.path("helpers"));
        let _ = writeln!(s, "export BATON_HELPERS={helpers}");
        for var in ["PATH", "PYTHONPATH", "NODE_PATH"] {
            let _ = writeln!(s, "export {var}={helpers}\"${{{var}:+:${var}}}\"");
        }
    }
    Ok(s)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports a failure
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(sh_quote("plain"), "'plain'");
        assert_eq!(sh_quote("it's"), "'it'\\''s'");
        assert_eq!(sh_quote(""), "''");
        assert!(is_shell_name("_A1"));
        assert!(!is_shell_name("1A"));
        assert!(!is_shell_name("A-B"));
        assert!(!is_shell_name(""));
        assert!(is_plain_absolute_path("/tmp"));
        assert!(is_plain_absolute_path("/var/tmp/baton_x-1.2"));
        assert!(!is_plain_absolute_path("tmp"));
        assert!(!is_plain_absolute_path("/tmp/a b"));
        assert!(!is_plain_absolute_path("/tmp/'x"));
        assert!(!is_plain_absolute_path("/tmp/../etc"));
    }

    #[test]
    fn env_file_exports_quoted_values_and_rejects_bad_names() {
        let dir = RemoteDir {
            root: "/tmp/baton-x".into(),
        };
        let mut spec = RunSpec::script(Runtime::Sh, "true").with_env("A", "it's $HOME");
        spec.helpers_dir = Some("/h".into());
        let env = env_script(&spec, &dir).unwrap();
        assert!(env.contains("export A='it'\\''s $HOME'\n"), "{env}");
        assert!(
            env.contains("export PATH='/tmp/baton-x/helpers'\"${PATH:+:$PATH}\"\n"),
            "{env}"
        );
        let spec = RunSpec::script(Runtime::Sh, "true").with_env("NOT-OK", "x");
        assert!(matches!(
            env_script(&spec, &dir),
            Err(ExecError::InvalidSpec { .. })
        ));
    }
}
