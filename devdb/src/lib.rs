//! A private PostgreSQL cluster started from the installed PostgreSQL binaries.
//!
//! Baton needs a real PostgreSQL in three places, none of which should require the user to set
//! one up:
//!
//! - **`baton dev`** keeps its data in a durable directory (under `./.baton/`) that is reused
//!   across runs: [`Cluster::start`] with [`ClusterOptions::durable`] `= true` and, usually, a
//!   fixed port. A second `baton dev` on the same directory gets
//!   [`DevDbError::AlreadyRunning`].
//! - **The test harness** wants a throwaway server per test binary and one database per test:
//!   [`Cluster::throwaway`] (a temporary, non-durable cluster that cleans up after itself even
//!   when kept in a `static`), [`Cluster::create_template`] once (runs the migrations), then
//!   [`Cluster::create_unique_database`] / [`Cluster::create_database`] with that template for
//!   every test.
//! - **Benchmarks** use either.
//!
//! # Binaries
//!
//! `initdb`, `pg_ctl` and `postgres` are taken from `$BATON_PG_BIN` if set, else
//! the newest `/usr/lib/postgresql/<version>/bin` (Debian/Ubuntu), else the first `PATH`
//! directory that has them all ([`PgBinaries::find`]).
//!
//! # Throwaway clusters
//!
//! [`Cluster::throwaway`] copies a pristine `initdb` result (made once per machine, PostgreSQL
//! version and user, as `baton-devdb-initdb-<version>-<uid>`, under a lock so parallel test
//! binaries do not race) into a fresh `baton-devdb-XXXXXX` directory and starts it there. These
//! live in `$BATON_DEVDB_TMPDIR` if set, else in `/dev/shm` when that is a writable tmpfs with
//! at least 2 GiB free (several times faster than a busy disk for the copy and for cloning
//! databases), else in the system temp directory.
//!
//! # Root and the `postgres` user
//!
//! PostgreSQL refuses to run as root. When this process runs as root (`geteuid() == 0`),
//! `initdb`, `pg_ctl` and the server run as the `postgres` OS user instead (the package creates
//! it; without it: [`DevDbError::NoPostgresUser`]). The data directory, and every parent
//! directory this crate creates for it, is `chown`ed to `postgres`; existing parents must be
//! searchable by that user (a data directory under `/root`, mode 0700, is refused with
//! [`DevDbError::InvalidDataDir`] saying so). The switch uses `std`'s `Command::uid/gid`
//! (setuid in the child, supplementary groups dropped), so no `runuser`/`su`/PAM is involved.
//! Otherwise everything runs as the current user.
//!
//! # Server settings
//!
//! `initdb -U postgres --auth=trust -E UTF8 --locale=C`; the server listens on `127.0.0.1`
//! only, with its unix socket inside the data directory and `max_connections=200`. Non-durable
//! clusters add `fsync=off`, `synchronous_commit=off`, `full_page_writes=off`. Settings are
//! passed on the command line, never written into the data directory. A start is `pg_ctl start`
//! followed by polling `postmaster.pid` (every 5 ms, up to 30 s) until it says `ready` and the
//! port takes TCP connections. The server log is `baton-devdb.log` in the data directory
//! ([`Cluster::log_file`]); a failed start reports its last lines. A first start `initdb`s into
//! `DIR.initdb-partial` and renames it into place, so an interrupted first run leaves nothing
//! half-made.
//!
//! # Lifetimes
//!
//! [`Cluster::stop`] (idempotent) or dropping the [`Cluster`] stops the server. For the cases
//! where neither happens (a `static`, `std::process::exit`, a crash, SIGKILL), every cluster has
//! a watchdog process that notices the owner's exit through a pipe reaching EOF and then shuts
//! the server down (fast for a durable directory, immediate for a throwaway one, which it then
//! deletes). So a `baton dev` killed with SIGKILL does not leave a server behind that would make
//! the next run fail with [`DevDbError::AlreadyRunning`].
//!
//! # Test harness recipe
//!
//! ```no_run
//! use baton_devdb::Cluster;
//! use tokio::sync::OnceCell;
//!
//! static CLUSTER: OnceCell<Cluster> = OnceCell::const_new();
//!
//! /// A fresh, migrated database for one test; returns its URL.
//! async fn test_database() -> String {
//!     let cluster = CLUSTER
//!         .get_or_init(|| async {
//!             let cluster = Cluster::throwaway().await.expect("throwaway PostgreSQL");
//!             cluster
//!                 .create_template("baton_template", |url| async move {
//!                     let pool = sqlx::PgPool::connect(&url).await?;
//!                     // sqlx::migrate!("../migrations").run(&pool).await?;
//!                     pool.close().await; // the template must have no sessions left
//!                     Ok::<_, sqlx::Error>(())
//!                 })
//!                 .await
//!                 .expect("template database");
//!             cluster
//!         })
//!         .await;
//!     let name = cluster
//!         .create_unique_database("test", Some("baton_template"))
//!         .await
//!         .expect("test database");
//!     cluster.url(&name)
//! }
//! ```
//!
//! Each `#[tokio::test]` has its own runtime; the cluster holds no runtime resources (every SQL
//! helper opens and closes its own connection), so sharing it across them through a `static` is
//! fine. Pools created by the tests belong to the test's runtime and should stay in it.

#![forbid(unsafe_code)]

mod bins;
mod cache;
mod cluster;
mod error;
mod owner;
mod watchdog;

pub use bins::{ENV_PG_BIN, PgBinaries};
pub use cache::ENV_DEVDB_TMPDIR;
pub use cluster::{Cluster, ClusterOptions};
pub use error::DevDbError;
