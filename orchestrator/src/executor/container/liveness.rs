//! Whether the worker process that made a container is still alive, for containers of other
//! worker ids on the same host (a worker killed with SIGKILL and never restarted under its id
//! leaves its running job containers behind; its spares end by themselves, see `spares.rs`).
//!
//! Every container carries [`LABEL_PROCESS`](super::LABEL_PROCESS): the host's boot id, the
//! worker's PID namespace, its PID and its start time (`/proc/PID/stat`, field 22). Another
//! worker can then tell for certain that the process is gone — same boot and PID namespace,
//! and no process with that PID and start time — and only then reaps the container. A mark
//! from another host, another boot or another PID namespace (a worker in another container)
//! is [`Liveness::Unknown`] and never reaped this way.

use std::fs;

/// What a process mark says about its process, seen from this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    Alive,
    /// Same host, boot and PID namespace, and the process is gone.
    Dead,
    /// Cannot be told from here (another host or namespace, or an unreadable mark).
    Unknown,
}

/// This process's mark: `BOOT_ID/PIDNS/PID/STARTTIME`, or `None` where `/proc` cannot tell.
pub fn own_mark() -> Option<String> {
    let pid = std::process::id();
    Some(format!(
        "{}/{}/{pid}/{}",
        boot_id()?,
        pid_namespace()?,
        start_time(pid)?
    ))
}

/// Whether the process of `mark` is alive.
pub fn liveness(mark: &str) -> Liveness {
    let mut parts = mark.split('/');
    let (Some(boot), Some(ns), Some(pid), Some(start), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Liveness::Unknown;
    };
    let Ok(pid) = pid.parse::<u32>() else {
        return Liveness::Unknown;
    };
    if boot_id().as_deref() != Some(boot) || pid_namespace().as_deref() != Some(ns) {
        return Liveness::Unknown;
    }
    match start_time(pid) {
        Some(now) if now == start => Liveness::Alive,
        // No such process, or the PID was reused by a later one.
        _ => Liveness::Dead,
    }
}

fn boot_id() -> Option<String> {
    let id = fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let id = id.trim();
    (!id.is_empty() && !id.contains('/')).then(|| id.to_owned())
}

fn pid_namespace() -> Option<String> {
    let link = fs::read_link("/proc/self/ns/pid").ok()?;
    let text = link.to_str()?;
    let inode = text.strip_prefix("pid:[")?.strip_suffix(']')?;
    inode
        .chars()
        .all(|c| c.is_ascii_digit())
        .then(|| inode.to_owned())
}

/// Field 22 of `/proc/PID/stat` (clock ticks after boot): with the PID, it names one process.
fn start_time(pid: u32) -> Option<String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count after its last `)`.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(19).map(str::to_owned)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_alive_and_an_ended_one_dead() {
        let own = own_mark().unwrap();
        assert_eq!(liveness(&own), Liveness::Alive);
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let start = start_time(pid);
        child.wait().unwrap();
        if let Some(start) = start {
            let mark = format!(
                "{}/{}/{pid}/{start}",
                boot_id().unwrap(),
                pid_namespace().unwrap()
            );
            assert_eq!(liveness(&mark), Liveness::Dead);
        }
        // The same PID with another start time is another process.
        let reused = format!(
            "{}/{}/{}/1",
            boot_id().unwrap(),
            pid_namespace().unwrap(),
            std::process::id()
        );
        assert_eq!(liveness(&reused), Liveness::Dead);
        // Another boot or namespace cannot be judged.
        assert_eq!(liveness("other-boot/1/1/1"), Liveness::Unknown);
        assert_eq!(
            liveness(&format!("{}/0/1/1", boot_id().unwrap())),
            Liveness::Unknown
        );
        assert_eq!(liveness("garbage"), Liveness::Unknown);
    }
}
