//! [`Cluster`]: start, use and stop one private PostgreSQL server.

use std::future::Future;
use std::io::{Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgSslMode};
use sqlx::{AssertSqlSafe, Connection, PgConnection};
use tempfile::TempDir;

use crate::bins::PgBinaries;
use crate::error::{DevDbError, show};
use crate::owner::Owner;
use crate::watchdog::{OnOwnerExit, Watchdog};

/// How long a start may take before it is reported as failed.
const START_DEADLINE: Duration = Duration::from_secs(30);
/// Server log, inside the data directory (pg_ctl appends to it).
const LOG_NAME: &str = "baton-devdb.log";
/// The log is moved to `LOG_NAME.1` at start once it is bigger than this.
const LOG_ROTATE_BYTES: u64 = 8 << 20;
/// `sun_path` is 108 bytes; PostgreSQL adds `/.s.PGSQL.NNNNN` and a NUL to the socket dir.
const MAX_SOCKET_DIR_LEN: usize = 107 - "/.s.PGSQL.65535".len();

/// How to run a [`Cluster`] on a directory of your choosing (see [`Cluster::throwaway`] for the
/// temporary kind).
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// The data directory. Created (with its missing parents) and `initdb`'d if it has no
    /// `PG_VERSION`; reused as is otherwise. Relative paths are taken from the current directory.
    pub data_dir: PathBuf,
    /// TCP port on 127.0.0.1; `None` picks a free one (and retries if it is taken meanwhile).
    pub port: Option<u16>,
    /// `false` runs with `fsync=off`, `synchronous_commit=off`, `full_page_writes=off`: fast,
    /// but an OS crash can corrupt the data. Only for data you can throw away.
    pub durable: bool,
}

/// A running private PostgreSQL server: superuser `postgres`, trust authentication, listening on
/// `127.0.0.1:`[`port`](Self::port) only (and a unix socket inside the data directory, when its
/// path is short enough for one).
///
/// Stopped by [`stop`](Self::stop) or on drop. If the owning process exits without either (a
/// `static`, `std::process::exit`, a crash), a watchdog process stops it (and deletes a
/// throwaway one) right after.
#[derive(Debug)]
pub struct Cluster {
    data_dir: PathBuf,
    port: u16,
    durable: bool,
    log_file: PathBuf,
    bins: PgBinaries,
    owner: Owner,
    state: Mutex<State>,
    next_db: AtomicU64,
    /// The throwaway directory; declared last so it is deleted after `Drop::drop` stopped the
    /// server.
    temp: Option<TempDir>,
}

#[derive(Debug)]
struct State {
    running: bool,
    watchdog: Watchdog,
}

impl Cluster {
    /// Start a cluster on `opts.data_dir` (initialising it first if needed) and wait until it
    /// accepts connections.
    ///
    /// Fails with [`DevDbError::AlreadyRunning`] if a live postmaster already uses the
    /// directory. The blocking work runs on tokio's blocking pool; see
    /// [`start_blocking`](Self::start_blocking) for the same without a runtime.
    pub async fn start(opts: ClusterOptions) -> Result<Cluster, DevDbError> {
        run_blocking(move || Self::start_blocking(opts)).await
    }

    /// [`start`](Self::start), blocking the calling thread (for `std::sync::OnceLock` and
    /// friends; do not call it on an async worker thread).
    pub fn start_blocking(opts: ClusterOptions) -> Result<Cluster, DevDbError> {
        let bins = PgBinaries::find()?;
        let owner = Owner::detect()?;
        let data_dir = std::path::absolute(&opts.data_dir).map_err(DevDbError::io(format!(
            "resolving {}",
            show(&opts.data_dir)
        )))?;
        Self::launch(bins, owner, data_dir, opts.port, opts.durable, None)
    }

    /// A non-durable cluster in a fresh temporary directory, for tests and benchmarks.
    ///
    /// The data directory is a copy of a pristine `initdb` result cached once per machine (as
    /// `baton-devdb-initdb-<version>-<uid>`, next to the cluster directories: see the crate
    /// docs on where that is), so this takes a couple of hundred milliseconds rather than
    /// seconds. The cluster is stopped and its directory deleted on drop, or by the watchdog
    /// when the process exits: keeping it in a `static` is fine.
    pub async fn throwaway() -> Result<Cluster, DevDbError> {
        run_blocking(Self::throwaway_blocking).await
    }

    /// [`throwaway`](Self::throwaway), blocking the calling thread.
    pub fn throwaway_blocking() -> Result<Cluster, DevDbError> {
        let bins = PgBinaries::find()?;
        let owner = Owner::detect()?;
        let scratch = crate::cache::scratch_root();
        let temp = tempfile::Builder::new()
            .prefix("baton-devdb-")
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .tempdir_in(&scratch)
            .map_err(DevDbError::io(format!(
                "creating a temporary directory in {}",
                show(&scratch)
            )))?;
        owner.chown(temp.path())?;
        let data_dir = temp.path().join("data");
        owner.check_reachable(&data_dir)?;
        let pristine = crate::cache::pristine_data_dir(&bins, &owner, &scratch)?;
        let out = Command::new("cp")
            .arg("-a")
            .arg("--")
            .arg(&pristine)
            .arg(&data_dir)
            .stdin(Stdio::null())
            .output()
            .map_err(DevDbError::io("running cp"))?;
        if !out.status.success() {
            return Err(DevDbError::Io {
                context: format!("cp -a {} {}", show(&pristine), show(&data_dir)),
                source: std::io::Error::other(output_text(&out)),
            });
        }
        Self::launch(bins, owner, data_dir, None, false, Some(temp))
    }

    fn launch(
        bins: PgBinaries,
        owner: Owner,
        data_dir: PathBuf,
        port: Option<u16>,
        durable: bool,
        temp: Option<TempDir>,
    ) -> Result<Cluster, DevDbError> {
        check_path(&data_dir)?;
        owner.check_reachable(&data_dir)?;
        if data_dir.join("PG_VERSION").exists() {
            check_not_running(&data_dir)?;
        } else {
            initdb_into_place(&bins, &owner, &data_dir, durable)?;
        }

        // Armed before the server exists, so there is no moment where the owner can die and
        // leave it behind. Dropped (= disarmed) on every error path below.
        let watchdog = match &temp {
            Some(temp) => Watchdog::spawn(
                &data_dir,
                Some(temp.path()),
                OnOwnerExit::ImmediateShutdownAndDelete,
            )?,
            None => Watchdog::spawn(&data_dir, None, OnOwnerExit::FastShutdown)?,
        };

        let log_file = data_dir.join(LOG_NAME);
        let started = Instant::now();
        let port = start_server(&bins, &owner, &data_dir, &log_file, port, durable)?;
        tracing::info!(
            data_dir = %data_dir.display(),
            port,
            durable,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "private PostgreSQL cluster started"
        );
        Ok(Cluster {
            data_dir,
            port,
            durable,
            log_file,
            bins,
            owner,
            state: Mutex::new(State {
                running: true,
                watchdog,
            }),
            next_db: AtomicU64::new(1),
            temp,
        })
    }

    /// `postgres://postgres@127.0.0.1:PORT/DATABASE`.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The (absolute) data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server log (`baton-devdb.log` in the data directory).
    pub fn log_file(&self) -> &Path {
        &self.log_file
    }

    /// Whether the server runs with fsync and full page writes.
    pub fn is_durable(&self) -> bool {
        self.durable
    }

    /// The binaries this cluster runs (handy for `psql`, `pg_dump`, `pgbench`).
    pub fn binaries(&self) -> &PgBinaries {
        &self.bins
    }

    /// `CREATE DATABASE name [TEMPLATE template]`.
    ///
    /// Cloning fails if anything is connected to the template; templates made by
    /// [`create_template`](Self::create_template) refuse connections, so this cannot happen.
    /// Concurrent clones of one template are fine.
    pub async fn create_database(
        &self,
        name: &str,
        template: Option<&str>,
    ) -> Result<(), DevDbError> {
        validate_name(name)?;
        let sql = match template {
            Some(template) => {
                validate_name(template)?;
                format!(r#"CREATE DATABASE "{name}" TEMPLATE "{template}""#)
            }
            None => format!(r#"CREATE DATABASE "{name}""#),
        };
        self.admin_execute(sql, &format!("creating database {name}"))
            .await
    }

    /// A new database named `{prefix}_{n}` (n counts up per cluster), optionally cloned from
    /// `template`; returns its name. For one database per test.
    pub async fn create_unique_database(
        &self,
        prefix: &str,
        template: Option<&str>,
    ) -> Result<String, DevDbError> {
        let n = self.next_db.fetch_add(1, Ordering::Relaxed);
        let name = format!("{prefix}_{n}");
        validate_name(&name)?;
        self.create_database(&name, template).await?;
        Ok(name)
    }

    /// `DROP DATABASE IF EXISTS name WITH (FORCE)`: disconnects its sessions first.
    pub async fn drop_database(&self, name: &str) -> Result<(), DevDbError> {
        validate_name(name)?;
        self.admin_execute(
            format!(r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#),
            &format!("dropping database {name}"),
        )
        .await
    }

    /// (Re)create the template database `name`: drop it if it exists, create it, run
    /// `setup(url)` (e.g. the migrations) against it, then disconnect every session still in it
    /// and forbid new ones (`ALLOW_CONNECTIONS false`), so that
    /// [`create_database(x, Some(name))`](Self::create_database) always works.
    ///
    /// `setup` should close its own pool when done; stragglers are terminated anyway.
    /// Call it once per cluster (e.g. inside the same `OnceCell` that holds the cluster), not
    /// concurrently with clones of the same template.
    pub async fn create_template<F, Fut, E>(&self, name: &str, setup: F) -> Result<(), DevDbError>
    where
        F: FnOnce(String) -> Fut,
        Fut: Future<Output = Result<(), E>>,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        self.drop_database(name).await?;
        self.create_database(name, None).await?;
        setup(self.url(name))
            .await
            .map_err(|e| DevDbError::TemplateSetup {
                name: name.to_owned(),
                source: e.into(),
            })?;

        let context = format!("sealing template database {name}");
        let mut conn = self.admin_connection().await?;
        sqlx::raw_sql(AssertSqlSafe(format!(
            r#"ALTER DATABASE "{name}" ALLOW_CONNECTIONS false"#
        )))
        .execute(&mut conn)
        .await
        .map_err(DevDbError::sql(context.clone()))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let remaining: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = $1 AND pid <> pg_backend_pid()",
            )
            .bind(name)
            .fetch_one(&mut conn)
            .await
            .map_err(DevDbError::sql(context.clone()))?;
            if remaining == 0 {
                break;
            }
            if Instant::now() > deadline {
                return Err(DevDbError::Sql {
                    context,
                    source: sqlx::Error::Protocol(format!(
                        "{remaining} sessions are still connected to {name} after 10 s"
                    )),
                });
            }
            tracing::debug!(
                name,
                remaining,
                "terminating sessions left in template database"
            );
            sqlx::query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = $1 AND pid <> pg_backend_pid()",
            )
            .bind(name)
            .execute(&mut conn)
            .await
            .map_err(DevDbError::sql(context.clone()))?;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = conn.close().await;
        Ok(())
    }

    /// Stop the server (`pg_ctl stop -m fast`; `-m immediate` for a throwaway cluster) and wait
    /// for it to exit. Idempotent: later calls, and the drop, do nothing.
    pub fn stop(&self) -> Result<(), DevDbError> {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !state.running {
            return Ok(());
        }
        state.watchdog.disarm();
        let Some(pid) = live_postmaster(&self.data_dir) else {
            state.running = false; // already gone (crashed, or stopped behind our back)
            return Ok(());
        };
        let mode = if self.temp.is_some() {
            "immediate"
        } else {
            "fast"
        };
        // -W and our own 5 ms polling: pg_ctl's -w polls at 100 ms.
        let out = self
            .owner
            .command(self.bins.bin("pg_ctl"))
            .arg("stop")
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-m", mode, "-W"])
            .stdin(Stdio::null())
            .output()
            .map_err(DevDbError::io("running pg_ctl stop"))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while process_alive(pid) {
            if !out.status.success() || Instant::now() > deadline {
                return Err(DevDbError::Stop {
                    dir: self.data_dir.clone(),
                    output: format!(
                        "{} (postmaster pid {pid} is still running)",
                        output_text(&out)
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        state.running = false;
        tracing::debug!(data_dir = %self.data_dir.display(), "private PostgreSQL cluster stopped");
        Ok(())
    }

    /// Crashes the server and starts it again on the same port: `pg_ctl restart -m immediate`
    /// (every backend is killed without a checkpoint, as in a power cut or an OOM kill, and
    /// the server recovers from its WAL on start). For fault tests: every client connection
    /// breaks, and clients must reconnect by themselves.
    pub fn restart_immediate(&self) -> Result<(), DevDbError> {
        let state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !state.running {
            return Err(DevDbError::Io {
                context: "restarting the private PostgreSQL cluster".into(),
                source: std::io::Error::other("the cluster was stopped"),
            });
        }
        // `restart` reuses the options of the last start (postmaster.opts): same port, socket
        // directory and settings.
        let out = self
            .owner
            .command(self.bins.bin("pg_ctl"))
            .arg("restart")
            .arg("-D")
            .arg(&self.data_dir)
            .arg("-l")
            .arg(&self.log_file)
            .args(["-m", "immediate", "-w", "-t", "60"])
            .stdin(Stdio::null())
            .output()
            .map_err(DevDbError::io("running pg_ctl restart"))?;
        if !out.status.success() {
            return Err(DevDbError::Io {
                context: "pg_ctl restart -m immediate".into(),
                source: std::io::Error::other(output_text(&out)),
            });
        }
        Ok(())
    }

    async fn admin_connection(&self) -> Result<PgConnection, DevDbError> {
        let opts = PgConnectOptions::new_without_pgpass()
            .host("127.0.0.1")
            .port(self.port)
            .username("postgres")
            .database("postgres")
            .ssl_mode(PgSslMode::Disable);
        PgConnection::connect_with(&opts)
            .await
            .map_err(DevDbError::sql(format!(
                "connecting to {}",
                self.url("postgres")
            )))
    }

    async fn admin_execute(&self, sql: String, context: &str) -> Result<(), DevDbError> {
        let mut conn = self.admin_connection().await?;
        sqlx::raw_sql(AssertSqlSafe(sql))
            .execute(&mut conn)
            .await
            .map_err(DevDbError::sql(context))?;
        let _ = conn.close().await;
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::warn!(error = %e, "stopping the private PostgreSQL cluster on drop failed");
        }
    }
}

/// Run `initdb` on the empty (or missing) directory `dir` as the cluster owner.
pub(crate) fn initdb(
    bins: &PgBinaries,
    owner: &Owner,
    dir: &Path,
    sync: bool,
) -> Result<(), DevDbError> {
    let mut cmd = owner.command(bins.bin("initdb"));
    cmd.arg("-D")
        .arg(dir)
        .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C"])
        .stdin(Stdio::null());
    if !sync {
        cmd.arg("--no-sync");
    }
    let out = cmd.output().map_err(DevDbError::io(format!(
        "running {}",
        show(&bins.bin("initdb"))
    )))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(DevDbError::InitDb {
            dir: dir.to_path_buf(),
            log: output_text(&out),
        })
    }
}

/// `initdb` into `DIR.initdb-partial`, then rename it to `DIR`: an interrupted first run (Ctrl-C
/// during the seconds initdb takes) must not leave a half-made cluster that later fails to start.
fn initdb_into_place(
    bins: &PgBinaries,
    owner: &Owner,
    data_dir: &Path,
    durable: bool,
) -> Result<(), DevDbError> {
    let not_empty = std::fs::read_dir(data_dir).is_ok_and(|mut entries| entries.next().is_some());
    if not_empty {
        return Err(DevDbError::InvalidDataDir {
            dir: data_dir.to_path_buf(),
            reason: "it is not empty but holds no cluster (no PG_VERSION); remove it, or choose \
                     another directory"
                .into(),
        });
    }
    let mut staging = data_dir.as_os_str().to_owned();
    staging.push(".initdb-partial");
    let staging = PathBuf::from(staging);
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(DevDbError::io(format!(
            "removing the leftover {}",
            show(&staging)
        )))?;
    }
    owner.create_data_dir(&staging)?;
    initdb(bins, owner, &staging, durable)?;
    if data_dir.exists() {
        // Empty (checked above); rename(2) cannot replace it portably.
        std::fs::remove_dir(data_dir)
            .map_err(DevDbError::io(format!("removing empty {}", show(data_dir))))?;
    }
    std::fs::rename(&staging, data_dir).map_err(DevDbError::io(format!(
        "renaming {} to {}",
        show(&staging),
        show(data_dir)
    )))
}

/// `pg_ctl start` with our settings, retrying on another free port if an automatically chosen
/// one was taken in the meantime; then wait until the server accepts TCP connections.
fn start_server(
    bins: &PgBinaries,
    owner: &Owner,
    data_dir: &Path,
    log_file: &Path,
    requested_port: Option<u16>,
    durable: bool,
) -> Result<u16, DevDbError> {
    let deadline = Instant::now() + START_DEADLINE;
    let mut attempts = 0;
    loop {
        attempts += 1;
        let port = match requested_port {
            Some(port) => port,
            None => free_port()?,
        };
        match start_once(bins, owner, data_dir, log_file, port, durable, deadline) {
            Ok(()) => return Ok(port),
            Err(DevDbError::Start { log_tail, .. })
                if requested_port.is_none()
                    && attempts < 5
                    && log_tail.contains("could not bind") =>
            {
                tracing::debug!(port, "port taken meanwhile; retrying on another");
            }
            Err(e) => return Err(e),
        }
    }
}

/// One `pg_ctl start` on `port`, then wait (polling every 5 ms) until `postmaster.pid` says the
/// server is ready and its port takes TCP connections, or it died, or `deadline` passed.
///
/// `pg_ctl start -w` does the same wait, but polls every 100 ms, which was most of the time to
/// a ready throwaway cluster. A `postmaster.pid` left by a crashed server is told apart from
/// the new one by its (pid, start time) line pair.
fn start_once(
    bins: &PgBinaries,
    owner: &Owner,
    data_dir: &Path,
    log_file: &Path,
    port: u16,
    durable: bool,
    deadline: Instant,
) -> Result<(), DevDbError> {
    rotate_log(log_file);
    let log_offset = std::fs::metadata(log_file).map(|m| m.len()).unwrap_or(0);
    let stale = PidFile::read(data_dir).map(|f| f.identity());
    let dir_text = data_dir.to_string_lossy();
    // pg_ctl hands -o to `sh -c`, so the socket dir is shell-quoted; an over-long data dir path
    // cannot hold a socket, and then we simply go without one (we connect over TCP).
    let socket_dir = if dir_text.len() <= MAX_SOCKET_DIR_LEN {
        shell_quote(&dir_text)
    } else {
        "''".to_owned()
    };
    let mut opts =
        format!("-c listen_addresses=127.0.0.1 -p {port} -k {socket_dir} -c max_connections=200");
    if !durable {
        opts.push_str(" -c fsync=off -c synchronous_commit=off -c full_page_writes=off");
    }
    let out = owner
        .command(bins.bin("pg_ctl"))
        .arg("start")
        .arg("-D")
        .arg(data_dir)
        .arg("-l")
        .arg(log_file)
        .args(["-W", "-o", &opts])
        .stdin(Stdio::null())
        .output()
        .map_err(DevDbError::io("running pg_ctl start"))?;
    let error = |what: &str| {
        let mut reason = what.to_owned();
        if !out.status.success() {
            reason = format!("{reason}; pg_ctl said: {}", output_text(&out));
        }
        start_error(data_dir, port, log_file, log_offset, reason)
    };
    if !out.status.success() {
        return Err(error("pg_ctl start failed"));
    }

    let port_text = port.to_string();
    loop {
        let ours = PidFile::read(data_dir).filter(|f| Some(f.identity()) != stale);
        match &ours {
            Some(f) if !process_alive(f.pid) => {
                return Err(error("the server exited during startup"));
            }
            Some(f) if f.port == port_text && f.status == "ready" && accepts_tcp(port) => {
                return Ok(());
            }
            Some(_) => {}
            // Not (yet) written, or already removed by a server that gave up.
            None if log_has_fatal(log_file, log_offset) => {
                return Err(error("the server exited during startup"));
            }
            None => {}
        }
        if Instant::now() >= deadline {
            if ours.is_some() {
                // Still starting (e.g. a long crash recovery): it is ours, don't leave it.
                stop_immediately(bins, owner, data_dir);
            }
            return Err(error(&format!(
                "the server did not accept connections within {} s",
                START_DEADLINE.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The fields of `postmaster.pid` we look at.
#[derive(Debug)]
struct PidFile {
    pid: i32,
    started: String,
    port: String,
    /// `starting`, `ready`, `stopping` or `standby`; empty until written.
    status: String,
}

impl PidFile {
    fn read(data_dir: &Path) -> Option<Self> {
        let text = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        let pid = lines.first()?.parse::<i32>().ok()?.abs();
        (pid > 0).then(|| PidFile {
            pid,
            started: lines.get(2).copied().unwrap_or_default().to_owned(),
            port: lines.get(3).copied().unwrap_or_default().to_owned(),
            status: lines.get(7).copied().unwrap_or_default().to_owned(),
        })
    }

    fn identity(&self) -> (i32, String) {
        (self.pid, self.started.clone())
    }
}

fn accepts_tcp(port: u16) -> bool {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    // A connection that sends nothing is dropped silently by PostgreSQL (no log line).
    std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
}

/// Whether the server log since `offset` reports a fatal error.
fn log_has_fatal(log_file: &Path, offset: u64) -> bool {
    let mut text = Vec::new();
    let read = std::fs::File::open(log_file).and_then(|mut f| {
        f.seek(SeekFrom::Start(offset))?;
        f.read_to_end(&mut text)
    });
    read.is_ok() && {
        let text = String::from_utf8_lossy(&text);
        text.contains("FATAL:") || text.contains("PANIC:")
    }
}

fn stop_immediately(bins: &PgBinaries, owner: &Owner, data_dir: &Path) {
    let _ = owner
        .command(bins.bin("pg_ctl"))
        .arg("stop")
        .arg("-D")
        .arg(data_dir)
        .args(["-m", "immediate", "-w", "-t", "30"])
        .stdin(Stdio::null())
        .output();
}

fn start_error(
    data_dir: &Path,
    port: u16,
    log_file: &Path,
    log_offset: u64,
    reason: String,
) -> DevDbError {
    DevDbError::Start {
        dir: data_dir.to_path_buf(),
        port,
        log_file: log_file.to_path_buf(),
        reason: reason.trim().to_owned(),
        log_tail: log_tail(log_file, log_offset, 30),
    }
}

/// The last `lines` lines of `path` from byte `offset` on.
fn log_tail(path: &Path, offset: u64, lines: usize) -> String {
    let mut text = Vec::new();
    let read = std::fs::File::open(path).and_then(|mut f| {
        f.seek(SeekFrom::Start(offset))?;
        f.read_to_end(&mut text)
    });
    if let Err(e) = read {
        return format!("(could not read {}: {e})", show(path));
    }
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().collect();
    let tail = all[all.len().saturating_sub(lines)..].join("\n");
    if tail.is_empty() {
        "(empty)".to_owned()
    } else {
        tail
    }
}

fn rotate_log(log_file: &Path) {
    if std::fs::metadata(log_file).is_ok_and(|m| m.len() > LOG_ROTATE_BYTES) {
        let _ = std::fs::rename(log_file, log_file.with_extension("log.1"));
    }
}

/// Fail with [`DevDbError::AlreadyRunning`] if a live postmaster owns `data_dir`.
///
/// A `postmaster.pid` whose process is gone is left to PostgreSQL (it replaces stale ones). One
/// whose pid is an unreaped zombie, or now belongs to some other program (pid reuse after a
/// reboot or in a fresh container), would make PostgreSQL refuse to start, so that file is
/// removed.
fn check_not_running(data_dir: &Path) -> Result<(), DevDbError> {
    let pid_file = data_dir.join("postmaster.pid");
    let Some(pid) = PidFile::read(data_dir).map(|f| f.pid) else {
        return Ok(());
    };
    if !process_alive(pid) {
        if Path::new(&format!("/proc/{pid}")).exists() {
            // An unreaped zombie: PostgreSQL's own kill(pid, 0) check would think it alive.
            std::fs::remove_file(&pid_file).map_err(DevDbError::io(format!(
                "removing stale {}",
                show(&pid_file)
            )))?;
        }
        return Ok(()); // stale: PostgreSQL replaces it
    }
    let comm = process_name(pid);
    if matches!(comm.as_deref(), Some("postgres" | "postmaster")) {
        return Err(DevDbError::AlreadyRunning {
            dir: data_dir.to_path_buf(),
            pid,
        });
    }
    tracing::warn!(
        pid,
        program = comm.as_deref().unwrap_or("?"),
        file = %pid_file.display(),
        "removing stale postmaster.pid whose pid now belongs to another program"
    );
    std::fs::remove_file(&pid_file).map_err(DevDbError::io(format!(
        "removing stale {}",
        show(&pid_file)
    )))
}

/// The pid of a live postgres process named in `data_dir/postmaster.pid`.
fn live_postmaster(data_dir: &Path) -> Option<i32> {
    let pid = PidFile::read(data_dir)?.pid;
    let postgres = matches!(
        process_name(pid).as_deref(),
        Some("postgres" | "postmaster")
    );
    (postgres && process_alive(pid)).then_some(pid)
}

/// Whether `pid` exists and is not a zombie (a dead postmaster whose parent has not reaped it
/// yet has released its port and files). Read from /proc: `kill(pid, 0)` would fail with
/// EPERM across users.
fn process_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // "pid (comm) S ...": the state follows the last ')'.
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next());
        !matches!(state, None | Some("Z" | "X"))
    })
}

fn process_name(pid: i32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|c| c.trim().to_owned())
}

/// pg_ctl builds `sh -c 'exec postgres -D "DIR" ... >> "LOG"'`: characters special inside
/// double quotes would break (or inject into) that command line.
fn check_path(dir: &Path) -> Result<(), DevDbError> {
    let Some(text) = dir.to_str() else {
        return Err(DevDbError::InvalidDataDir {
            dir: dir.to_path_buf(),
            reason: "the path is not valid UTF-8".into(),
        });
    };
    if let Some(c) = text
        .chars()
        .find(|c| matches!(c, '"' | '$' | '`' | '\\' | '\n' | '\r'))
    {
        return Err(DevDbError::InvalidDataDir {
            dir: dir.to_path_buf(),
            reason: format!("the path contains {c:?}, which pg_ctl cannot quote; choose another"),
        });
    }
    Ok(())
}

/// Database names: `^[a-z_][a-z0-9_]{0,62}$`, so they can be put in SQL as `"name"` verbatim.
fn validate_name(name: &str) -> Result<(), DevDbError> {
    let bytes = name.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= 63
        && (bytes[0].is_ascii_lowercase() || bytes[0] == b'_')
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_');
    if ok {
        Ok(())
    } else {
        Err(DevDbError::InvalidName {
            name: name.to_owned(),
        })
    }
}

fn free_port() -> Result<u16, DevDbError> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(DevDbError::io("finding a free port on 127.0.0.1"))
}

fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

fn output_text(out: &Output) -> String {
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    text.trim().to_owned()
}

async fn run_blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, DevDbError> + Send + 'static,
) -> Result<T, DevDbError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(DevDbError::Io {
            context: "starting PostgreSQL on the blocking pool".into(),
            source: std::io::Error::other(e),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["a", "_", "baton_template", "test_12", &"a".repeat(63)] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in ["", "1a", "A", "a-b", "a\"b", "a b", &"a".repeat(64), "é"] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("/tmp/a'b"), r"'/tmp/a'\''b'");
        assert!(check_path(Path::new("/tmp/a b/c'd")).is_ok());
        assert!(check_path(Path::new("/tmp/$x")).is_err());
        assert!(check_path(Path::new("/tmp/\"x")).is_err());
    }
}
