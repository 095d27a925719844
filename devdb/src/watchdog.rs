//! A tiny `sh` process that shuts the cluster down (and deletes a throwaway one) when the
//! process that started it is gone, however it went: `std::process::exit`, a panic in a
//! `static`, SIGKILL.
//!
//! It blocks reading a pipe whose write end only the owner holds (close-on-exec, so no other
//! child inherits it). The kernel closes that end when the owner exits, `read` sees EOF, and the
//! watchdog signals the postmaster whose pid is in `postmaster.pid` (after checking it is a
//! postgres process), waits for it to go, and removes the directory. This needs no polling and
//! is immune to pid reuse of the owner. It runs as the calling user (root may signal the
//! postgres-owned postmaster; an ordinary user owns its own), in its own process group so a
//! Ctrl-C aimed at the owner's terminal does not take it down first.
//!
//! A normal [`Cluster::stop`](crate::Cluster::stop) or drop disarms it (SIGKILL + reap) first, so
//! it can never act on a later cluster in the same directory.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use crate::error::DevDbError;

const SCRIPT: &str = r#"
trap '' HUP INT
sig=$1; dir=$2; remove=$3
while read -r _; do :; done
pid=$(head -n 1 "$dir/postmaster.pid" 2>/dev/null)
case "$pid" in ''|*[!0-9]*) pid= ;; esac
if [ -n "$pid" ]; then
  comm=$(cat "/proc/$pid/comm" 2>/dev/null)
  if [ "$comm" = postgres ] || [ "$comm" = postmaster ]; then
    kill -"$sig" "$pid" 2>/dev/null
    n=0
    while [ -e "$dir/postmaster.pid" ] && [ -d "/proc/$pid" ] && [ "$n" -lt 600 ]; do
      sleep 0.1; n=$((n + 1))
    done
  fi
fi
if [ -n "$remove" ]; then rm -rf -- "$remove"; fi
"#;

/// What the watchdog does once the owner is gone.
#[derive(Debug, Clone, Copy)]
pub(crate) enum OnOwnerExit {
    /// SIGINT: PostgreSQL's "fast" shutdown (durable data).
    FastShutdown,
    /// SIGQUIT: "immediate" shutdown, then delete the directory.
    ImmediateShutdownAndDelete,
}

#[derive(Debug)]
pub(crate) struct Watchdog {
    child: Option<Child>,
}

impl Watchdog {
    /// Start watching. `remove` is deleted (recursively) after the shutdown, if given.
    pub(crate) fn spawn(
        data_dir: &Path,
        remove: Option<&Path>,
        on_exit: OnOwnerExit,
    ) -> Result<Self, DevDbError> {
        let sig = match on_exit {
            OnOwnerExit::FastShutdown => "INT",
            OnOwnerExit::ImmediateShutdownAndDelete => "QUIT",
        };
        let child = Command::new("/bin/sh")
            .arg("-c")
            .arg(SCRIPT)
            .arg("baton-devdb-watchdog")
            .arg(sig)
            .arg(data_dir)
            .arg(remove.map(Path::as_os_str).unwrap_or_default())
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(DevDbError::io(
                "starting the baton-devdb watchdog (/bin/sh)",
            ))?;
        Ok(Self { child: Some(child) })
    }

    /// Stop the watchdog without letting it act.
    pub(crate) fn disarm(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.disarm();
    }
}
