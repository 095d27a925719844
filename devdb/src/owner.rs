//! Which OS user owns and runs the cluster: the current user, or `postgres` when we are root.

use std::ffi::OsStr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::unistd::{Gid, Uid, User, chown, getegid, geteuid};

use crate::error::{DevDbError, show};

/// The OS user the PostgreSQL programs run as and the data files belong to.
#[derive(Debug, Clone)]
pub(crate) struct Owner {
    uid: Uid,
    gid: Gid,
    /// `Some` when we are root and switch to the `postgres` user for PostgreSQL programs.
    switch_to: Option<User>,
}

impl Owner {
    pub(crate) fn detect() -> Result<Self, DevDbError> {
        if !geteuid().is_root() {
            return Ok(Self {
                uid: geteuid(),
                gid: getegid(),
                switch_to: None,
            });
        }
        let user = User::from_name("postgres")
            .map_err(|e| DevDbError::Io {
                context: "looking up the postgres OS user".into(),
                source: e.into(),
            })?
            .ok_or(DevDbError::NoPostgresUser)?;
        Ok(Self {
            uid: user.uid,
            gid: user.gid,
            switch_to: Some(user),
        })
    }

    pub(crate) fn uid(&self) -> Uid {
        self.uid
    }

    /// A command that runs `program` as the owner, from `/`, without the caller's `PG*`
    /// environment (which could redirect initdb/pg_ctl elsewhere).
    pub(crate) fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        // LC_ALL=C: we recognise some pg_ctl messages, and the cluster's locale is C anyway.
        cmd.current_dir("/").env("LC_ALL", "C");
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PG") {
                cmd.env_remove(key);
            }
        }
        if let Some(user) = &self.switch_to {
            // std drops supplementary groups (setgroups(0)) when root changes uid.
            cmd.uid(user.uid.as_raw())
                .gid(user.gid.as_raw())
                .env("HOME", &user.dir)
                .env("USER", &user.name)
                .env("LOGNAME", &user.name);
        }
        cmd
    }

    /// Give `path` to the owner (a no-op unless we are root).
    pub(crate) fn chown(&self, path: &Path) -> Result<(), DevDbError> {
        if self.switch_to.is_some() {
            chown(path, Some(self.uid), Some(self.gid)).map_err(|e| DevDbError::Io {
                context: format!("chown {} to postgres", show(path)),
                source: e.into(),
            })?;
        }
        Ok(())
    }

    /// `create_dir_all`, giving every directory it creates to the owner, and the last one mode
    /// 0700 (what PostgreSQL wants for a data directory).
    pub(crate) fn create_data_dir(&self, dir: &Path) -> Result<(), DevDbError> {
        let missing: Vec<PathBuf> = dir
            .ancestors()
            .take_while(|p| !p.exists())
            .map(Path::to_path_buf)
            .collect();
        for path in missing.iter().rev() {
            match std::fs::create_dir(path) {
                Ok(()) => self.chown(path)?,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(DevDbError::io(format!("creating {}", show(path)))(e)),
            }
        }
        let meta =
            std::fs::metadata(dir).map_err(DevDbError::io(format!("reading {}", show(dir))))?;
        if !meta.is_dir() {
            return Err(DevDbError::InvalidDataDir {
                dir: dir.to_path_buf(),
                reason: "it exists and is not a directory".into(),
            });
        }
        if meta.uid() != self.uid.as_raw() {
            // An empty directory someone made for us (initdb only takes empty ones anyway).
            self.chown(dir)?;
        }
        if meta.permissions().mode() & 0o077 != 0 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(DevDbError::io(format!("chmod 0700 {}", show(dir))))?;
        }
        Ok(())
    }

    /// When we switch users, every existing ancestor of `dir` must be searchable by it, or
    /// initdb/postgres fail with confusing permission errors (e.g. under `/root`, mode 0700).
    pub(crate) fn check_reachable(&self, dir: &Path) -> Result<(), DevDbError> {
        let Some(user) = &self.switch_to else {
            return Ok(());
        };
        for ancestor in dir.ancestors().skip(1) {
            let Ok(meta) = std::fs::metadata(ancestor) else {
                continue; // will be created, and given to postgres
            };
            let mode = meta.permissions().mode();
            let searchable = if meta.uid() == user.uid.as_raw() {
                mode & 0o100 != 0
            } else if meta.gid() == user.gid.as_raw() {
                mode & 0o010 != 0
            } else {
                mode & 0o001 != 0
            };
            if !searchable {
                return Err(DevDbError::InvalidDataDir {
                    dir: dir.to_path_buf(),
                    reason: format!(
                        "PostgreSQL runs as the postgres user (we are root), and it cannot enter \
                         {} (mode {:o}); choose a data directory elsewhere or `chmod o+x {}`",
                        show(ancestor),
                        mode & 0o7777,
                        show(ancestor)
                    ),
                });
            }
        }
        Ok(())
    }
}
