//! Finding the installed PostgreSQL binaries.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{DevDbError, show};

/// Environment variable that names the directory holding `initdb`, `pg_ctl` and `postgres`;
/// when set (and not empty) it is the only place looked at.
pub const ENV_PG_BIN: &str = "BATON_PG_BIN";

/// Where Debian/Ubuntu install the server binaries, one directory per major version.
const DEBIAN_ROOT: &str = "/usr/lib/postgresql";

const REQUIRED: [&str; 3] = ["initdb", "pg_ctl", "postgres"];

/// A directory of PostgreSQL server binaries and the version they report.
#[derive(Debug, Clone)]
pub struct PgBinaries {
    dir: PathBuf,
    version: String,
}

impl PgBinaries {
    /// Find the binaries (`initdb`, `pg_ctl`, `postgres`): `$BATON_PG_BIN` if set; otherwise the newest
    /// `/usr/lib/postgresql/<version>/bin`; otherwise a `PATH` directory that has all of them.
    pub fn find() -> Result<Self, DevDbError> {
        if let Some(dir) = std::env::var_os(ENV_PG_BIN).filter(|v| !v.is_empty()) {
            let dir = PathBuf::from(dir);
            if has_all(&dir) {
                return Self::at(dir);
            }
            return Err(DevDbError::BinariesNotFound {
                searched: vec![dir],
            });
        }

        let mut searched = Vec::new();
        let mut versioned: Vec<(Vec<u64>, PathBuf)> = std::fs::read_dir(DEBIAN_ROOT)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name().into_string().ok()?;
                let key = name
                    .split('.')
                    .map(|part| part.parse::<u64>().ok())
                    .collect::<Option<Vec<_>>>()?;
                Some((key, entry.path().join("bin")))
            })
            .collect();
        versioned.sort_by(|a, b| b.0.cmp(&a.0));
        if versioned.is_empty() {
            searched.push(Path::new(DEBIAN_ROOT).join("*").join("bin"));
        }
        for (_, dir) in versioned {
            if has_all(&dir) {
                return Self::at(dir);
            }
            searched.push(dir);
        }

        for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
            if dir.is_absolute() && has_all(&dir) {
                return Self::at(dir);
            }
        }
        searched.push(PathBuf::from("$PATH"));
        Err(DevDbError::BinariesNotFound { searched })
    }

    fn at(dir: PathBuf) -> Result<Self, DevDbError> {
        let postgres = dir.join("postgres");
        // `postgres --version` is answered before the refuse-to-run-as-root check.
        let out = Command::new(&postgres)
            .arg("--version")
            .output()
            .map_err(DevDbError::io(format!(
                "running {} --version",
                show(&postgres)
            )))?;
        let text = String::from_utf8_lossy(&out.stdout);
        // "postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"
        let version = text
            .split_once(')')
            .map(|(_, rest)| rest)
            .unwrap_or(&text)
            .split_whitespace()
            .next()
            .filter(|_| out.status.success())
            .map(str::to_owned)
            .ok_or_else(|| DevDbError::BinariesNotFound {
                searched: vec![dir.clone()],
            })?;
        Ok(Self { dir, version })
    }

    /// The directory holding the binaries.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The server version, e.g. `15.18`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Path of one binary in [`Self::dir`].
    pub fn bin(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

fn has_all(dir: &Path) -> bool {
    REQUIRED.iter().all(|name| dir.join(name).is_file())
}
