//! The files a container run needs, moved through the Engine API's archive endpoints (never a
//! bind mount, so the engine may be on another machine):
//!
//! * [`upload_archive`] builds, in memory, the tar that is extracted into the run's volume at
//!   [`MOUNT_DIR`](super::MOUNT_DIR) before the container starts: `script.*`, `helpers/`,
//!   `run/` (a copy of [`RunSpec::run_dir`]) and the empty working directory `work/`.
//! * [`unpack_out`] writes the tar of `run/out` downloaded after the run into the local
//!   `run_dir/out/`, so the worker collects `output.json`, `condition` and `vars/` exactly as
//!   from a local run.

use std::fs;
use std::io::{self, Read as _, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Component, Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::rundir::{BATON_JS, BATON_PY, BATON_SH};

use super::super::{ExecError, RunSpec};

/// Owner of the files the run may write (`work/`, `run/`), as numeric ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Owner {
    pub uid: u64,
    pub gid: u64,
}

/// Most files copied from the local run directory (a guard against a runaway directory).
const MAX_RUN_DIR_FILES: usize = 10_000;

/// Builds the upload tar. Paths are relative to the mount point; `script` is the script file
/// name and text (none for `exec`).
pub(crate) fn upload_archive(
    spec: &RunSpec,
    script: Option<(&str, &str)>,
    owner: Owner,
) -> Result<Vec<u8>, ExecError> {
    let mut tar = Tar::new();
    let root = Owner { uid: 0, gid: 0 };
    tar.dir("work", 0o700, owner)?;
    if let Some((name, text)) = script {
        tar.file(name, text.as_bytes(), 0o444, root)?;
    }
    tar.dir("helpers", 0o755, root)?;
    match &spec.helpers_dir {
        Some(dir) => {
            let entries = fs::read_dir(dir).map_err(|e| {
                ExecError::io(
                    format!("reading the helpers directory {}", dir.display()),
                    e,
                )
            })?;
            for entry in entries {
                let entry = entry.map_err(|e| ExecError::io("reading the helpers directory", e))?;
                let meta = fs::metadata(entry.path())
                    .map_err(|e| ExecError::io("reading the helpers directory", e))?;
                let Ok(name) = entry.file_name().into_string() else {
                    continue;
                };
                if !meta.is_file() {
                    continue;
                }
                let data = fs::read(entry.path())
                    .map_err(|e| ExecError::io(format!("reading {}", entry.path().display()), e))?;
                tar.file(&format!("helpers/{name}"), &data, 0o444, root)?;
            }
        }
        None => {
            for (name, text) in [
                ("baton.sh", BATON_SH),
                ("baton.py", BATON_PY),
                ("baton.js", BATON_JS),
            ] {
                tar.file(&format!("helpers/{name}"), text.as_bytes(), 0o444, root)?;
            }
        }
    }
    if let Some(dir) = &spec.run_dir {
        tar.dir("run", 0o700, owner)?;
        let mut count = 0;
        copy_tree(&mut tar, dir, "run", owner, &mut count)?;
    }
    tar.finish()
}

/// Adds the regular files and directories under `dir` (symlinks and special files are skipped).
fn copy_tree(
    tar: &mut Tar,
    dir: &Path,
    prefix: &str,
    owner: Owner,
    count: &mut usize,
) -> Result<(), ExecError> {
    let entries = fs::read_dir(dir)
        .map_err(|e| ExecError::io(format!("reading the run directory {}", dir.display()), e))?;
    let mut entries: Vec<_> = entries
        .collect::<Result<_, _>>()
        .map_err(|e| ExecError::io(format!("reading the run directory {}", dir.display()), e))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        let path = entry.path();
        let meta = fs::symlink_metadata(&path)
            .map_err(|e| ExecError::io(format!("reading {}", path.display()), e))?;
        *count += 1;
        if *count > MAX_RUN_DIR_FILES {
            return Err(ExecError::io(
                format!("copying the run directory {}", dir.display()),
                io::Error::other(format!("more than {MAX_RUN_DIR_FILES} entries")),
            ));
        }
        let rel = format!("{prefix}/{name}");
        if meta.is_dir() {
            tar.dir(&rel, 0o700, owner)?;
            copy_tree(tar, &path, &rel, owner, count)?;
        } else if meta.is_file() {
            let data = fs::read(&path)
                .map_err(|e| ExecError::io(format!("reading {}", path.display()), e))?;
            tar.file(&rel, &data, 0o600, owner)?;
        }
    }
    Ok(())
}

struct Tar {
    builder: tar::Builder<Vec<u8>>,
    mtime: u64,
}

impl Tar {
    fn new() -> Self {
        let mtime = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Tar {
            builder: tar::Builder::new(Vec::new()),
            mtime,
        }
    }

    fn header(&self, kind: tar::EntryType, size: u64, mode: u32, owner: Owner) -> tar::Header {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_size(size);
        header.set_mode(mode);
        header.set_uid(owner.uid);
        header.set_gid(owner.gid);
        header.set_mtime(self.mtime);
        header
    }

    fn dir(&mut self, path: &str, mode: u32, owner: Owner) -> Result<(), ExecError> {
        let mut header = self.header(tar::EntryType::Directory, 0, mode, owner);
        self.builder
            .append_data(&mut header, format!("{path}/"), io::empty())
            .map_err(|e| ExecError::io(format!("building the upload archive ({path})"), e))
    }

    fn file(&mut self, path: &str, data: &[u8], mode: u32, owner: Owner) -> Result<(), ExecError> {
        let mut header = self.header(tar::EntryType::Regular, data.len() as u64, mode, owner);
        self.builder
            .append_data(&mut header, path, data)
            .map_err(|e| ExecError::io(format!("building the upload archive ({path})"), e))
    }

    fn finish(self) -> Result<Vec<u8>, ExecError> {
        self.builder
            .into_inner()
            .map_err(|e| ExecError::io("building the upload archive", e))
    }
}

/// What [`unpack_out`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Unpacked {
    /// Regular files written.
    pub files: usize,
    /// Entries skipped (symlinks, devices, unsafe paths).
    pub skipped: usize,
    /// The archive was cut short (at the size cap); the last file written may be truncated.
    pub truncated: bool,
}

/// Unpacks `archive` (the tar of the container's `run/out`, whose entries start with `out/`)
/// into `dest` (the local `run_dir/out`). Only regular files and directories are written
/// (files `0600`, directories `0700`); links, devices and paths that are absolute or contain
/// `..` are skipped. `truncated` says the archive was cut at the download cap: entries are
/// written as far as they go.
pub(crate) fn unpack_out(archive: &[u8], dest: &Path, truncated: bool) -> io::Result<Unpacked> {
    let mut report = Unpacked {
        truncated,
        ..Unpacked::default()
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dest)?;
    let mut tar = tar::Archive::new(archive);
    let entries = match tar.entries() {
        Ok(entries) => entries,
        Err(e) if truncated => {
            tracing::debug!(error = %e, "truncated out/ archive has no readable entry");
            return Ok(report);
        }
        Err(e) => return Err(e),
    };
    for entry in entries {
        let mut entry = match entry {
            Ok(entry) => entry,
            Err(_) if truncated => break,
            Err(e) => return Err(e),
        };
        let Some(rel) = entry.path().ok().and_then(|p| relative_out_path(&p)) else {
            report.skipped += 1;
            continue;
        };
        let target = dest.join(&rel);
        match entry.header().entry_type() {
            tar::EntryType::Directory => {
                if rel.as_os_str().is_empty() {
                    continue;
                }
                if let Err(e) = fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(&target)
                {
                    tracing::debug!(path = %target.display(), error = %e, "cannot create out/ directory");
                    report.skipped += 1;
                }
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                if rel.as_os_str().is_empty() {
                    report.skipped += 1;
                    continue;
                }
                let mut data = Vec::new();
                if let Err(e) = entry.read_to_end(&mut data) {
                    if truncated {
                        report.truncated = true;
                    } else {
                        return Err(e);
                    }
                }
                if let Some(parent) = target.parent()
                    && fs::DirBuilder::new()
                        .recursive(true)
                        .mode(0o700)
                        .create(parent)
                        .is_err()
                {
                    report.skipped += 1;
                    continue;
                }
                // Never follow a link a previous entry could have left (there is none: links
                // are not written; this is belt and braces).
                if fs::symlink_metadata(&target).is_ok_and(|m| !m.is_file()) {
                    report.skipped += 1;
                    continue;
                }
                let mut file = fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&target)?;
                file.write_all(&data)?;
                report.files += 1;
            }
            _ => report.skipped += 1,
        }
    }
    Ok(report)
}

/// `out/a/b` → `a/b`; `out` → ``; `None` for anything absolute or with `..`.
fn relative_out_path(path: &Path) -> Option<PathBuf> {
    let mut components = path.components();
    match components.next()? {
        Component::Normal(first) if first == "out" => {}
        Component::CurDir => return relative_out_path(components.as_path()),
        _ => return None,
    }
    let mut rel = PathBuf::new();
    for c in components {
        match c {
            Component::Normal(part) => rel.push(part),
            Component::CurDir => {}
            _ => return None,
        }
    }
    Some(rel)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(entries: &[(&str, Option<&[u8]>)]) -> Vec<u8> {
        let mut tar = Tar::new();
        let owner = Owner { uid: 1, gid: 1 };
        for (path, data) in entries {
            match data {
                Some(d) => tar.file(path, d, 0o644, owner).expect("file"),
                None => tar.dir(path, 0o755, owner).expect("dir"),
            }
        }
        tar.finish().expect("finish")
    }

    #[test]
    fn unpacks_out_files() {
        let tar = archive(&[
            ("out", None),
            ("out/output.json", Some(b"{\"a\":1}")),
            ("out/vars", None),
            ("out/vars/k", Some(b"v")),
        ]);
        let dir = tempfile::tempdir().expect("tempdir");
        let dest = dir.path().join("out");
        let report = unpack_out(&tar, &dest, false).expect("unpack");
        assert_eq!(report.files, 2);
        assert_eq!(
            fs::read(dest.join("output.json")).expect("read"),
            b"{\"a\":1}"
        );
        assert_eq!(fs::read(dest.join("vars/k")).expect("read"), b"v");
    }

    #[test]
    fn skips_unsafe_entries() {
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Symlink);
        header.set_size(0);
        header.set_mode(0o777);
        builder
            .append_link(&mut header, "out/link", "/etc/passwd")
            .expect("link");
        let mut header = tar::Header::new_gnu();
        header.set_size(1);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        // `append_data` refuses `..`; write the name into the header by hand.
        header.as_old_mut().name[..13].copy_from_slice(b"out/../escape");
        header.set_cksum();
        builder.append(&header, &b"x"[..]).expect("append");
        let tar = builder.into_inner().expect("finish");
        let dir = tempfile::tempdir().expect("tempdir");
        let dest = dir.path().join("out");
        let report = unpack_out(&tar, &dest, false).expect("unpack");
        assert_eq!(report.files, 0);
        assert_eq!(report.skipped, 2);
        assert!(!dir.path().join("escape").exists());
        assert!(!dest.join("link").exists());
    }

    #[test]
    fn relative_paths() {
        assert_eq!(
            relative_out_path(Path::new("out/vars/k")),
            Some(PathBuf::from("vars/k"))
        );
        assert_eq!(relative_out_path(Path::new("out")), Some(PathBuf::new()));
        assert_eq!(
            relative_out_path(Path::new("./out/x")),
            Some(PathBuf::from("x"))
        );
        assert_eq!(relative_out_path(Path::new("other/x")), None);
        assert_eq!(relative_out_path(Path::new("/out/x")), None);
        assert_eq!(relative_out_path(Path::new("out/../x")), None);
    }
}
