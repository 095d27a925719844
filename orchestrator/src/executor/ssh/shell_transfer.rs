//! The fallback transfer when a server has no SFTP subsystem (hardened hosts, dropbear, the
//! `Subsystem` line removed): files go over exec channels with `/bin/sh`, `mkdir`, `tar`, `wc`
//! and `head`, as Ansible's "smart" transfer falls back to piping.
//!
//! * upload: one `umask 077 && mkdir -m 700 DIR && tar -x -f - -C DIR` fed a tar stream on
//!   stdin (the directory must not exist: a name collision fails, as over SFTP);
//! * reading a file: `head -c LIMIT FILE`;
//! * downloading `out/`: a small script that prints, for each wanted regular file, a header
//!   line `SIZE NAME` and then SIZE bytes (each file cut at the limit).

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::Path;
use std::time::Duration;

use russh::ChannelMsg;

use super::pool::SshHandle;
use super::remote::sh_quote;
use super::transfer::{Entry, RequestError};
use crate::rundir::is_valid_key;

/// Most bytes of stderr kept for an error message.
const STDERR_KEPT: usize = 2048;

/// What an exec'd command left.
struct Finished {
    status: Option<u32>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

impl Finished {
    fn error(&self, what: &str) -> String {
        let stderr = String::from_utf8_lossy(&self.stderr);
        let stderr = stderr.trim();
        let status = self.status.map_or_else(
            || "no exit status".to_owned(),
            |s| format!("exit status {s}"),
        );
        if stderr.is_empty() {
            format!("{what} failed ({status})")
        } else {
            format!("{what} failed ({status}): {stderr}")
        }
    }
}

/// Runs `command`, writes `stdin` to it, closes its input and collects its output (stdout up
/// to `stdout_limit` bytes, more is read and dropped), all within `timeout`.
async fn exec(
    handle: &SshHandle,
    command: &str,
    stdin: &[u8],
    stdout_limit: usize,
    timeout: Duration,
) -> Result<Finished, RequestError> {
    let session = RequestError::Session;
    let run = async {
        let mut channel = handle
            .channel_open_session()
            .await
            .map_err(|e| session(format!("cannot open a channel: {e}")))?;
        channel
            .exec(true, command)
            .await
            .map_err(|e| session(format!("cannot send the command: {e}")))?;
        let mut finished = Finished {
            status: None,
            stdout: Vec::new(),
            stderr: Vec::new(),
        };
        // The confirmation first: a refused exec ends here.
        loop {
            match channel.wait().await {
                Some(ChannelMsg::Success) => break,
                Some(ChannelMsg::Failure) => {
                    return Err(RequestError::Refused(
                        "the server refused to run a command".to_owned(),
                    ));
                }
                Some(ChannelMsg::Close) | None => {
                    return Err(session(
                        "the channel closed before the command started".to_owned(),
                    ));
                }
                Some(other) => absorb(&mut finished, other, stdout_limit),
            }
        }
        if !stdin.is_empty() {
            channel
                .data(stdin)
                .await
                .map_err(|e| session(format!("cannot send the files: {e}")))?;
        }
        channel
            .eof()
            .await
            .map_err(|e| session(format!("cannot close the command's input: {e}")))?;
        while let Some(msg) = channel.wait().await {
            if matches!(msg, ChannelMsg::Close) {
                break;
            }
            absorb(&mut finished, msg, stdout_limit);
        }
        Ok(finished)
    };
    tokio::time::timeout(timeout, run)
        .await
        .map_err(|_| session(format!("no answer within {timeout:?}")))?
}

fn absorb(finished: &mut Finished, msg: ChannelMsg, stdout_limit: usize) {
    match msg {
        ChannelMsg::Data { data } => {
            let room = stdout_limit.saturating_sub(finished.stdout.len());
            finished
                .stdout
                .extend_from_slice(&data[..data.len().min(room)]);
        }
        ChannelMsg::ExtendedData { data, .. } => {
            let room = STDERR_KEPT.saturating_sub(finished.stderr.len());
            finished
                .stderr
                .extend_from_slice(&data[..data.len().min(room)]);
        }
        ChannelMsg::ExitStatus { exit_status } => finished.status = Some(exit_status),
        _ => {}
    }
}

/// Creates the private directory `root` (it must not exist) and writes `entries` into it
/// (files mode `file_mode`, directories 0700).
pub(crate) async fn upload(
    handle: &SshHandle,
    root: &str,
    entries: &[Entry],
    file_mode: u32,
    timeout: Duration,
) -> Result<(), RequestError> {
    let archive = tar_of(entries, file_mode)
        .map_err(|e| RequestError::Refused(format!("cannot pack the files: {e}")))?;
    let root = sh_quote(root);
    let command = format!("umask 077 && mkdir -m 700 {root} && exec tar -x -o -f - -C {root}");
    let finished = exec(handle, &command, &archive, 4096, timeout).await?;
    match finished.status {
        Some(0) => Ok(()),
        _ => Err(RequestError::Refused(
            finished.error("`mkdir` and `tar -x`"),
        )),
    }
}

fn tar_of(entries: &[Entry], file_mode: u32) -> std::io::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    for entry in entries {
        let mut header = tar::Header::new_gnu();
        match entry {
            Entry::Dir(rel) => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(0o700);
                header.set_size(0);
                builder.append_data(&mut header, rel, std::io::empty())?;
            }
            Entry::File(rel, data) => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(file_mode);
                header.set_size(data.len() as u64);
                builder.append_data(&mut header, rel, data.as_slice())?;
            }
        }
    }
    builder.into_inner()
}

/// Reads at most `limit` bytes of the regular file `path`; `None` when it does not exist.
pub(crate) async fn read_file(
    handle: &SshHandle,
    path: &str,
    limit: u64,
    timeout: Duration,
) -> Result<Option<Vec<u8>>, String> {
    let path = sh_quote(path);
    let command = format!("[ -f {path} ] || exit 3; exec head -c {limit} {path}");
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let finished = exec(handle, &command, &[], limit, timeout)
        .await
        .map_err(|e| e.to_string())?;
    match finished.status {
        Some(0) => Ok(Some(finished.stdout)),
        Some(3) => Ok(None),
        _ => Err(finished.error("reading a file")),
    }
}

/// Copies `remote_out` into `local_out` like [`super::transfer::download_out`]: `output.json`,
/// `condition` and `vars/KEY` for valid keys, regular files only, each cut at `limit` bytes.
pub(crate) async fn download_out(
    handle: &SshHandle,
    remote_out: &str,
    local_out: &Path,
    limit: u64,
    timeout: Duration,
) -> Result<(), String> {
    // Names are filtered on the server too, so that a header line cannot be forged by a
    // file name (keys are letters, digits, `_`, `.` and `-`).
    let command = format!(
        "cd {} 2>/dev/null || exit 0\n\
         for f in output.json condition vars/*; do\n\
           case \"$f\" in *[!A-Za-z0-9_./-]*) continue;; esac\n\
           if [ -f \"$f\" ] && [ ! -h \"$f\" ]; then\n\
             n=$(wc -c < \"$f\") || exit 1\n\
             n=$((n + 0)); if [ \"$n\" -gt {limit} ]; then n={limit}; fi\n\
             printf '%s %s\\n' \"$n\" \"$f\"\n\
             head -c \"$n\" \"$f\" || exit 1\n\
           fi\n\
         done",
        sh_quote(remote_out)
    );
    // Three kinds of files of at most `limit` bytes each; vars are bounded by the same limit
    // per file, and the whole stream by a generous multiple.
    let stream_limit = usize::try_from(limit.saturating_mul(64)).unwrap_or(usize::MAX);
    let finished = exec(handle, &command, &[], stream_limit, timeout)
        .await
        .map_err(|e| e.to_string())?;
    if finished.status != Some(0) {
        return Err(finished.error("listing the run's output"));
    }
    let mut rest = finished.stdout.as_slice();
    while !rest.is_empty() {
        let newline = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("the output listing is cut")?;
        let header = std::str::from_utf8(&rest[..newline]).map_err(|_| "bad output listing")?;
        let (size, name) = header.split_once(' ').ok_or("bad output listing")?;
        let size: usize = size.parse().map_err(|_| "bad output listing")?;
        let data = rest
            .get(newline + 1..newline + 1 + size)
            .ok_or("the output listing is cut")?;
        rest = &rest[newline + 1 + size..];
        let local = match name.split_once('/') {
            None if name == "output.json" || name == "condition" => local_out.join(name),
            Some(("vars", key)) if is_valid_key(key) => local_out.join("vars").join(key),
            _ => continue,
        };
        if let Some(parent) = local.parent() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&local)
            .and_then(|mut f| f.write_all(data))
            .map_err(|e| format!("cannot write {}: {e}", local.display()))?;
    }
    Ok(())
}
