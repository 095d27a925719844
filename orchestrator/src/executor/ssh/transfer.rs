//! SFTP (see `shell_transfer` for servers without it): uploading a run's files into its temporary directory and downloading what the script
//! left in `$BATON_DIR/out/`.

use std::fs;
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use russh_sftp::client::SftpSession;
use russh_sftp::protocol::{FileAttributes, OpenFlags};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::pool::SshHandle;
use crate::rundir::is_valid_key;

/// Files written at once over one SFTP session.
const PARALLEL_TRANSFERS: usize = 8;

/// Opens an SFTP session on a new channel of `handle`. A server that refuses the subsystem
/// (none configured) is [`RequestError::Unavailable`] as soon as it answers, rather than a
/// timeout of the protocol's first request.
pub(crate) async fn open(
    handle: &SshHandle,
    timeout_secs: u64,
) -> Result<SftpSession, RequestError> {
    let session = |e: String| RequestError::Session(e);
    let mut channel = handle
        .channel_open_session()
        .await
        .map_err(|e| session(format!("cannot open a channel: {e}")))?;
    channel
        .request_subsystem(true, "sftp")
        .await
        .map_err(|e| session(format!("cannot start the sftp subsystem: {e}")))?;
    let answer = async {
        loop {
            match channel.wait().await {
                Some(russh::ChannelMsg::Success) => return Ok(()),
                Some(russh::ChannelMsg::Failure) | Some(russh::ChannelMsg::Close) => {
                    return Err(RequestError::Unavailable(
                        "the server has no sftp subsystem".to_owned(),
                    ));
                }
                None => {
                    return Err(session(
                        "cannot start the sftp subsystem: the connection closed".to_owned(),
                    ));
                }
                Some(_) => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(timeout_secs.max(1)), answer)
        .await
        .map_err(|_| session("cannot start the sftp subsystem: no answer".to_owned()))??;
    let config = russh_sftp::client::Config {
        request_timeout_secs: timeout_secs.max(1),
        ..Default::default()
    };
    SftpSession::new_with_config(channel.into_stream(), config)
        .await
        .map_err(|e| session(format!("cannot start the sftp subsystem: {e}")))
}

fn attrs(mode: u32) -> FileAttributes {
    FileAttributes {
        permissions: Some(mode),
        ..FileAttributes::empty()
    }
}

/// A failed SFTP request.
#[derive(Debug)]
pub(crate) enum RequestError {
    /// The server answered with a failure status.
    Refused(String),
    /// No answer: the session or the connection is unusable.
    Session(String),
    /// The server offers no SFTP subsystem (files then go over exec channels).
    Unavailable(String),
}

impl std::fmt::Display for RequestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestError::Refused(e) | RequestError::Session(e) | RequestError::Unavailable(e) => {
                f.write_str(e)
            }
        }
    }
}

impl RequestError {
    fn new(what: String, e: russh_sftp::client::error::Error) -> Self {
        match e {
            russh_sftp::client::error::Error::Status(_) => {
                RequestError::Refused(format!("{what}: {e}"))
            }
            _ => RequestError::Session(format!("{what}: {e}")),
        }
    }
}

/// Creates the directory `path` (it must not exist) with mode `mode`.
///
/// The mode request is sent right behind the creation, without waiting for its answer (one
/// round trip instead of two): OpenSSH's sftp-server handles requests in order. A server that
/// does not may answer that the directory does not exist yet; the mode is then set again once
/// the creation is confirmed.
pub(crate) async fn make_dir(
    sftp: &SftpSession,
    path: &str,
    mode: u32,
) -> Result<(), RequestError> {
    let (created, moded) =
        tokio::join!(sftp.create_dir(path), sftp.set_metadata(path, attrs(mode)));
    created.map_err(|e| RequestError::new(format!("cannot create {path}"), e))?;
    if moded.is_ok() {
        return Ok(());
    }
    sftp.set_metadata(path, attrs(mode))
        .await
        .map_err(|e| RequestError::new(format!("cannot set the mode of {path}"), e))
}

/// Creates the file `path` (it must not exist) with `data` and mode `mode`.
pub(crate) async fn put_file(
    sftp: &SftpSession,
    path: &str,
    data: &[u8],
    mode: u32,
) -> Result<(), String> {
    let mut file = sftp
        .open_with_flags_and_attributes(
            path,
            OpenFlags::CREATE | OpenFlags::EXCLUDE | OpenFlags::WRITE,
            attrs(mode),
        )
        .await
        .map_err(|e| format!("cannot create {path}: {e}"))?;
    file.write_all(data)
        .await
        .map_err(|e| format!("cannot write {path}: {e}"))?;
    file.close()
        .await
        .map_err(|e| format!("cannot write {path}: {e}"))
}

/// Reads at most `limit` bytes of the regular file `path`; `None` when it does not exist.
pub(crate) async fn read_file(
    sftp: &SftpSession,
    path: &str,
    limit: u64,
) -> Result<Option<Vec<u8>>, String> {
    match sftp.symlink_metadata(path).await {
        Ok(meta) if meta.file_type().is_file() => {}
        Ok(_) => return Ok(None),
        Err(russh_sftp::client::error::Error::Status(s))
            if s.status_code == russh_sftp::protocol::StatusCode::NoSuchFile =>
        {
            return Ok(None);
        }
        Err(e) => return Err(format!("cannot read {path}: {e}")),
    }
    let file = sftp
        .open(path)
        .await
        .map_err(|e| format!("cannot open {path}: {e}"))?;
    let mut data = Vec::new();
    let mut limited = file.take(limit);
    limited
        .read_to_end(&mut data)
        .await
        .map_err(|e| format!("cannot read {path}: {e}"))?;
    let _ = limited.into_inner().close().await;
    Ok(Some(data))
}

/// One entry of a local directory tree, relative to its root.
#[derive(Debug, Clone)]
pub(crate) enum Entry {
    Dir(String),
    File(String, Vec<u8>),
}

/// Reads the local tree under `root` (directories first, parents before children). Only
/// regular files and directories are taken; symbolic links are followed.
pub(crate) fn local_tree(root: &Path) -> io::Result<Vec<Entry>> {
    let mut entries = Vec::new();
    let mut queue: Vec<(PathBuf, String)> = vec![(root.to_owned(), String::new())];
    while let Some((dir, rel)) = queue.pop() {
        let mut children: Vec<_> = fs::read_dir(&dir)?.collect::<Result<_, _>>()?;
        children.sort_by_key(|e| e.file_name());
        for child in children {
            let Some(name) = child.file_name().to_str().map(str::to_owned) else {
                continue; // not representable in SFTP's UTF-8 paths
            };
            let child_rel = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let meta = fs::metadata(child.path())?;
            if meta.is_dir() {
                entries.push(Entry::Dir(child_rel.clone()));
                queue.push((child.path(), child_rel));
            } else if meta.is_file() {
                entries.push(Entry::File(child_rel, fs::read(child.path())?));
            }
        }
    }
    // Directories must exist before their files: stable partition keeps parents first.
    entries.sort_by_key(|e| matches!(e, Entry::File(..)));
    Ok(entries)
}

/// Uploads `entries` under the existing remote directory `remote_root`: files (mode
/// `file_mode`) several at a time, each as soon as its directory exists; directories level by
/// level, each level's at once.
///
/// Directories get the server's default mode rather than an explicit one: `remote_root` is
/// private (0700), which keeps everything under it private, and not setting the mode saves a
/// round trip per directory.
pub(crate) async fn upload(
    sftp: &SftpSession,
    remote_root: &str,
    entries: &[Entry],
    file_mode: u32,
) -> Result<(), String> {
    let mut dirs: Vec<&str> = Vec::new();
    let mut top_files = Vec::new();
    let mut nested_files = Vec::new();
    for entry in entries {
        match entry {
            Entry::Dir(rel) => dirs.push(rel),
            Entry::File(rel, data) => {
                let file = (format!("{remote_root}/{rel}"), data.as_slice());
                if rel.contains('/') {
                    nested_files.push(file);
                } else {
                    top_files.push(file);
                }
            }
        }
    }
    dirs.sort_by_key(|d| d.matches('/').count());
    let nested = async {
        for level in dirs.chunk_by(|a, b| a.matches('/').count() == b.matches('/').count()) {
            let mut running: FuturesUnordered<_> = level
                .iter()
                .map(|rel| create_dir(sftp, format!("{remote_root}/{rel}")))
                .collect();
            while let Some(result) = running.next().await {
                result?;
            }
        }
        put_files(sftp, nested_files, file_mode).await
    };
    let (top, nested) = tokio::join!(put_files(sftp, top_files, file_mode), nested);
    top.and(nested)
}

/// Writes `files` (`(path, data)`), [`PARALLEL_TRANSFERS`] at a time.
async fn put_files(
    sftp: &SftpSession,
    files: Vec<(String, &[u8])>,
    file_mode: u32,
) -> Result<(), String> {
    let mut queue = files.into_iter();
    let mut running = FuturesUnordered::new();
    loop {
        while running.len() < PARALLEL_TRANSFERS {
            let Some((path, data)) = queue.next() else {
                break;
            };
            running.push(put_owned(sftp, path, data, file_mode));
        }
        match running.next().await {
            Some(result) => result?,
            None => return Ok(()),
        }
    }
}

/// Creates the directory `path` (it must not exist) with the server's default mode.
async fn create_dir(sftp: &SftpSession, path: String) -> Result<(), String> {
    sftp.create_dir(path.as_str())
        .await
        .map_err(|e| format!("cannot create {path}: {e}"))
}

async fn put_owned(sftp: &SftpSession, path: String, data: &[u8], mode: u32) -> Result<(), String> {
    put_file(sftp, &path, data, mode).await
}

async fn fetch(
    sftp: &SftpSession,
    remote: String,
    local: PathBuf,
    limit: u64,
) -> Result<(PathBuf, Option<Vec<u8>>), String> {
    read_file(sftp, &remote, limit)
        .await
        .map(|data| (local, data))
}

/// Copies `remote_out` (`$BATON_DIR/out` on the server) into `local_out`: `output.json`,
/// `condition` and `vars/KEY` for valid keys, regular files only, each cut at `limit` bytes
/// (the worker's own checks then report it as oversized). Nothing is created locally when the
/// script wrote nothing.
pub(crate) async fn download_out(
    sftp: &SftpSession,
    remote_out: &str,
    local_out: &Path,
    limit: u64,
) -> Result<(), String> {
    let mut wanted: Vec<(String, PathBuf)> = Vec::new();
    match sftp.read_dir(remote_out).await {
        Ok(entries) => {
            for entry in entries {
                let name = entry.file_name();
                if (name == "output.json" || name == "condition") && entry.file_type().is_file() {
                    wanted.push((format!("{remote_out}/{name}"), local_out.join(&name)));
                }
            }
        }
        Err(russh_sftp::client::error::Error::Status(s))
            if s.status_code == russh_sftp::protocol::StatusCode::NoSuchFile =>
        {
            return Ok(());
        }
        Err(e) => return Err(format!("cannot list {remote_out}: {e}")),
    }
    let remote_vars = format!("{remote_out}/vars");
    match sftp.read_dir(&remote_vars).await {
        Ok(entries) => {
            for entry in entries {
                let name = entry.file_name();
                if is_valid_key(&name) && entry.file_type().is_file() {
                    wanted.push((
                        format!("{remote_vars}/{name}"),
                        local_out.join("vars").join(&name),
                    ));
                }
            }
        }
        Err(russh_sftp::client::error::Error::Status(s))
            if s.status_code == russh_sftp::protocol::StatusCode::NoSuchFile => {}
        Err(e) => return Err(format!("cannot list {remote_vars}: {e}")),
    }
    let mut fetched: Vec<(PathBuf, Option<Vec<u8>>)> = Vec::new();
    let mut queue = wanted.into_iter();
    let mut running = FuturesUnordered::new();
    loop {
        while running.len() < PARALLEL_TRANSFERS {
            let Some((remote, local)) = queue.next() else {
                break;
            };
            running.push(fetch(sftp, remote, local, limit));
        }
        match running.next().await {
            Some(result) => fetched.push(result?),
            None => break,
        }
    }
    for (local, data) in fetched {
        let Some(data) = data else { continue };
        if let Some(parent) = local.parent() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        write_private(&local, &data)
            .map_err(|e| format!("cannot write {}: {e}", local.display()))?;
    }
    Ok(())
}

fn write_private(path: &Path, data: &[u8]) -> io::Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(data)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports a failure
mod tests {
    use super::*;

    #[test]
    fn local_tree_lists_parents_first() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("vars/sub")).unwrap();
        fs::write(dir.path().join("input.json"), "{}").unwrap();
        fs::write(dir.path().join("vars/k"), "v").unwrap();
        fs::write(dir.path().join("vars/sub/x"), "y").unwrap();
        let entries = local_tree(dir.path()).unwrap();
        let names: Vec<String> = entries
            .iter()
            .map(|e| match e {
                Entry::Dir(d) => format!("{d}/"),
                Entry::File(f, _) => f.clone(),
            })
            .collect();
        assert_eq!(
            names,
            vec!["vars/", "vars/sub/", "input.json", "vars/k", "vars/sub/x"]
        );
    }
}
