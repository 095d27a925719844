//! Where throwaway clusters live, and the pristine `initdb`'d data directory, made once per
//! machine (per PostgreSQL version and user) and copied for every throwaway cluster: `cp -a` of
//! ~40 MB is ~0.05 s on tmpfs, initdb ~2 s.

use std::fs::OpenOptions;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use nix::unistd::{AccessFlags, access, geteuid};

use crate::bins::PgBinaries;
use crate::error::{DevDbError, show};
use crate::owner::Owner;

/// Path of the cached pristine data directory, creating it if needed.
///
/// Concurrent processes (test binaries run in parallel) serialise on an `flock`ed lock file
/// next to it; the directory is built under a `.partial` name and renamed into place, so a
/// crash mid-initdb never leaves a half-made cache that looks finished.
pub(crate) fn pristine_data_dir(
    bins: &PgBinaries,
    owner: &Owner,
    base: &Path,
) -> Result<PathBuf, DevDbError> {
    let version: String = bins
        .version()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let name = format!("baton-devdb-initdb-{version}-{}", geteuid());
    let dir = base.join(&name);
    if is_valid(&dir, owner) {
        return Ok(dir);
    }

    let lock_path = base.join(format!("{name}.lock"));
    let file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .mode(0o600)
        .open(&lock_path)
        .map_err(DevDbError::io(format!("opening {}", show(&lock_path))))?;
    let _lock = Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, e)| DevDbError::Io {
        context: format!("locking {}", show(&lock_path)),
        source: e.into(),
    })?;
    if is_valid(&dir, owner) {
        return Ok(dir); // another process made it while we waited
    }

    tracing::info!(dir = %dir.display(), "creating the cached pristine PostgreSQL data directory");
    remove_if_exists(&dir)?;
    let partial = base.join(format!("{name}.partial"));
    remove_if_exists(&partial)?;
    owner.create_data_dir(&partial)?;
    crate::cluster::initdb(bins, owner, &partial, false)?;
    std::fs::rename(&partial, &dir).map_err(DevDbError::io(format!(
        "renaming {} to {}",
        show(&partial),
        show(&dir)
    )))?;
    Ok(dir)
}

/// Environment variable naming the directory for throwaway clusters and the initdb cache.
pub const ENV_DEVDB_TMPDIR: &str = "BATON_DEVDB_TMPDIR";

/// tmpfs used for throwaway clusters only if at least this much of it is free.
const MIN_SHM_FREE: u64 = 2 << 30;

/// Where throwaway clusters (and the initdb cache) go: `$BATON_DEVDB_TMPDIR` if set; else
/// `/dev/shm` when it is a writable tmpfs with at least 2 GiB free (a throwaway cluster's data is
/// worthless after the process, and on a busy disk a copy or a `CREATE DATABASE ... TEMPLATE`
/// is 5-10x slower than in memory); else [`std::env::temp_dir`].
pub(crate) fn scratch_root() -> PathBuf {
    if let Some(dir) = std::env::var_os(ENV_DEVDB_TMPDIR).filter(|v| !v.is_empty()) {
        let dir = PathBuf::from(dir);
        return std::path::absolute(&dir).unwrap_or(dir);
    }
    let shm = Path::new("/dev/shm");
    let roomy = nix::sys::statvfs::statvfs(shm)
        .is_ok_and(|st| st.blocks_available().saturating_mul(st.fragment_size()) >= MIN_SHM_FREE);
    if shm.is_dir() && roomy && access(shm, AccessFlags::W_OK | AccessFlags::X_OK).is_ok() {
        return shm.to_path_buf();
    }
    std::env::temp_dir()
}

/// A finished cache directory, owned by the cluster owner and private to it (we only trust what
/// our own user made: /tmp is shared).
fn is_valid(dir: &Path, owner: &Owner) -> bool {
    let Ok(meta) = std::fs::symlink_metadata(dir) else {
        return false;
    };
    meta.is_dir()
        && meta.uid() == owner.uid().as_raw()
        && meta.permissions().mode() & 0o077 == 0
        && dir.join("PG_VERSION").is_file()
        && dir.join("global").join("pg_control").is_file()
        && !dir.join("postmaster.pid").exists()
}

fn remove_if_exists(path: &Path) -> Result<(), DevDbError> {
    match std::fs::symlink_metadata(path) {
        Err(_) => Ok(()),
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path)
            .map_err(DevDbError::io(format!("removing stale {}", show(path)))),
        Ok(_) => std::fs::remove_file(path)
            .map_err(DevDbError::io(format!("removing stale {}", show(path)))),
    }
}
