//! The one error type of this crate.

use std::path::{Path, PathBuf};

/// Everything that can go wrong while running a private PostgreSQL cluster.
///
/// Every message says what to do about it; the variants carry the details (paths, log tails) so
/// a caller can also react programmatically.
#[derive(Debug, thiserror::Error)]
pub enum DevDbError {
    /// No directory with `initdb`, `pg_ctl` and `postgres` was found.
    #[error(
        "PostgreSQL binaries (initdb, pg_ctl, postgres) not found; searched: {}. \
         Install PostgreSQL (apt-get install -y postgresql) or set {env} to the directory that \
         contains them",
        paths(.searched),
        env = crate::bins::ENV_PG_BIN
    )]
    BinariesNotFound {
        /// The directories (or patterns) that were looked at, in order.
        searched: Vec<PathBuf>,
    },

    /// The process runs as root, and PostgreSQL refuses to; there is no `postgres` user to
    /// run it as instead.
    #[error(
        "running as root, but there is no `postgres` OS user to run PostgreSQL as (PostgreSQL \
         refuses to run as root); install the postgresql package, which creates that user \
         (apt-get install -y postgresql), or run as a non-root user"
    )]
    NoPostgresUser,

    /// The data directory cannot be used (bad characters, unreachable for the postgres user).
    #[error("cannot use {} as a PostgreSQL data directory: {reason}", .dir.display())]
    InvalidDataDir {
        /// The data directory that was asked for.
        dir: PathBuf,
        /// Why, and what to do.
        reason: String,
    },

    /// `initdb` failed.
    #[error(
        "initdb failed for {} (a non-empty directory without PG_VERSION cannot be initialised: \
         empty or remove it); initdb said:\n{log}",
        .dir.display()
    )]
    InitDb {
        /// The data directory being initialised.
        dir: PathBuf,
        /// initdb's output.
        log: String,
    },

    /// The server did not start, or did not accept connections within the deadline.
    #[error(
        "PostgreSQL in {} failed to start on 127.0.0.1:{port}: {reason}\n\
         last lines of the server log ({}):\n{log_tail}",
        .dir.display(),
        .log_file.display()
    )]
    Start {
        /// The data directory.
        dir: PathBuf,
        /// The port it was asked to listen on.
        port: u16,
        /// The server log file.
        log_file: PathBuf,
        /// What went wrong: pg_ctl's output and/or what we observed.
        reason: String,
        /// The end of the server log, from this start attempt.
        log_tail: String,
    },

    /// A live postmaster already owns the data directory.
    #[error(
        "another baton dev is using {} (postmaster pid {pid} is running); stop that one first, \
         or, if it is a leftover, stop it with `pg_ctl -D {} stop -m fast` (as the postgres \
         user when root)",
        .dir.display(),
        .dir.display()
    )]
    AlreadyRunning {
        /// The data directory.
        dir: PathBuf,
        /// The pid found in `postmaster.pid`.
        pid: i32,
    },

    /// `pg_ctl stop` failed.
    #[error("stopping PostgreSQL in {} failed; pg_ctl said: {output}", .dir.display())]
    Stop {
        /// The data directory.
        dir: PathBuf,
        /// What pg_ctl printed.
        output: String,
    },

    /// A database name that is not `^[a-z_][a-z0-9_]{0,62}$`.
    #[error(
        "invalid database name {name:?}: use 1-63 characters of a-z, 0-9 and _, not starting \
         with a digit"
    )]
    InvalidName {
        /// The rejected name.
        name: String,
    },

    /// The caller's template setup (migrations) failed.
    #[error("setting up template database {name} failed: {source}")]
    TemplateSetup {
        /// The template database.
        name: String,
        /// The caller's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// A file system or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A SQL statement against the cluster failed.
    #[error("{context}: {source}")]
    Sql {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: sqlx::Error,
    },
}

impl DevDbError {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| DevDbError::Io { context, source }
    }

    pub(crate) fn sql(context: impl Into<String>) -> impl FnOnce(sqlx::Error) -> Self {
        let context = context.into();
        move |source| DevDbError::Sql { context, source }
    }
}

fn paths(list: &[PathBuf]) -> String {
    if list.is_empty() {
        return "(nothing)".to_owned();
    }
    list.iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// `path.display()` as an owned string, for error contexts.
pub(crate) fn show(path: &Path) -> String {
    path.display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_say_what_to_do() {
        let err = DevDbError::BinariesNotFound {
            searched: vec![PathBuf::from("/usr/lib/postgresql/*/bin"), "$PATH".into()],
        };
        assert_eq!(
            err.to_string(),
            "PostgreSQL binaries (initdb, pg_ctl, postgres) not found; searched: \
             /usr/lib/postgresql/*/bin, $PATH. Install PostgreSQL (apt-get install -y \
             postgresql) or set BATON_PG_BIN to the directory that contains them"
        );
        let err = DevDbError::AlreadyRunning {
            dir: PathBuf::from("/w/.baton/pg"),
            pid: 42,
        };
        assert!(
            err.to_string()
                .starts_with("another baton dev is using /w/.baton/pg (postmaster pid 42"),
            "{err}"
        );
    }
}
