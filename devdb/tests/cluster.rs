//! Real clusters, from the installed PostgreSQL binaries.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_devdb::{Cluster, ClusterOptions, DevDbError};
use sqlx::{Connection, PgConnection};

/// Set in the re-executed children of the watchdog tests: the file to write the child's
/// cluster port and directory to.
const CHILD_ENV: &str = "BATON_DEVDB_TEST_WATCHDOG_CHILD";
/// Also set for a durable cluster on this directory instead of a throwaway one.
const CHILD_DURABLE_DIR_ENV: &str = "BATON_DEVDB_TEST_WATCHDOG_DURABLE_DIR";

fn accepts(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
}

/// Poll `cond` every 50 ms until it holds or `limit` passes.
fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn connect(cluster: &Cluster, db: &str) -> PgConnection {
    PgConnection::connect(&cluster.url(db))
        .await
        .expect("connect")
}

#[tokio::test]
async fn throwaway_cluster_serves_and_deletes_itself_on_drop() {
    let started = Instant::now();
    let cluster = Cluster::throwaway().await.expect("throwaway cluster");
    eprintln!("throwaway cluster ready in {:?}", started.elapsed());
    assert!(!cluster.is_durable());
    assert!(
        cluster
            .url("x")
            .starts_with("postgres://postgres@127.0.0.1:")
    );

    let mut conn = connect(&cluster, "postgres").await;
    let (fsync, max_conn, listen): (String, String, String) = sqlx::query_as(
        "SELECT current_setting('fsync'), current_setting('max_connections'), \
         current_setting('listen_addresses')",
    )
    .fetch_one(&mut conn)
    .await
    .expect("settings");
    assert_eq!(
        (fsync.as_str(), max_conn.as_str(), listen.as_str()),
        ("off", "200", "127.0.0.1")
    );
    conn.close().await.expect("close");

    let port = cluster.port();
    let temp_root = cluster.data_dir().parent().expect("parent").to_path_buf();
    drop(cluster);
    assert!(!accepts(port), "port {port} still open after drop");
    assert!(!temp_root.exists(), "{} not deleted", temp_root.display());
}

#[tokio::test]
async fn database_cloned_from_template_has_its_tables() {
    let cluster = Cluster::throwaway().await.expect("throwaway cluster");
    let started = Instant::now();
    cluster
        .create_template("baton_template", |url| async move {
            let mut conn = PgConnection::connect(&url).await?;
            sqlx::raw_sql(
                "CREATE TABLE jobs (id bigint PRIMARY KEY, name text NOT NULL); \
                 INSERT INTO jobs VALUES (1, 'from template');",
            )
            .execute(&mut conn)
            .await?;
            // Deliberately left open: create_template must disconnect it.
            std::mem::forget(conn);
            Ok::<_, sqlx::Error>(())
        })
        .await
        .expect("template");
    eprintln!("template created in {:?}", started.elapsed());

    // Clones, several at once.
    let cluster = Arc::new(cluster);
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let cluster = Arc::clone(&cluster);
        set.spawn(async move {
            cluster
                .create_unique_database("test", Some("baton_template"))
                .await
        });
    }
    let mut names = Vec::new();
    while let Some(result) = set.join_next().await {
        names.push(result.expect("join").expect("clone"));
    }
    eprintln!("4 concurrent clones in {:?}", started.elapsed());
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 4);

    let started = Instant::now();
    cluster
        .create_database("test_named", Some("baton_template"))
        .await
        .expect("named clone");
    eprintln!("1 clone in {:?}", started.elapsed());
    names.push("test_named".into());

    for name in &names {
        let mut conn = connect(&cluster, name).await;
        let got: String = sqlx::query_scalar("SELECT name FROM jobs WHERE id = 1")
            .fetch_one(&mut conn)
            .await
            .expect("row from template");
        assert_eq!(got, "from template");
        conn.close().await.expect("close");
    }

    // A connected session does not stop drop_database (FORCE).
    let _held = connect(&cluster, "test_named").await;
    cluster.drop_database("test_named").await.expect("drop");
    cluster
        .drop_database("test_named")
        .await
        .expect("drop again");

    let err = cluster
        .create_database("Bad-Name", None)
        .await
        .expect_err("invalid name");
    assert!(matches!(err, DevDbError::InvalidName { .. }), "{err}");

    // Re-creating the template works even though it is sealed and has clones.
    cluster
        .create_template("baton_template", |_url| async {
            Ok::<_, std::io::Error>(())
        })
        .await
        .expect("template again");
    let err = cluster
        .create_template("baton_template", |_url| async {
            Err::<(), _>(std::io::Error::other("migration 7 failed"))
        })
        .await
        .expect_err("setup error");
    assert!(
        err.to_string().contains("migration 7 failed"),
        "unexpected: {err}"
    );
}

#[tokio::test]
async fn two_clusters_at_once_get_different_ports() {
    let (a, b) = tokio::join!(Cluster::throwaway(), Cluster::throwaway());
    let (a, b) = (a.expect("first"), b.expect("second"));
    assert_ne!(a.port(), b.port());
    assert_ne!(a.data_dir(), b.data_dir());
    for cluster in [&a, &b] {
        let mut conn = connect(cluster, "postgres").await;
        let port: String = sqlx::query_scalar("SELECT current_setting('port')")
            .fetch_one(&mut conn)
            .await
            .expect("port");
        assert_eq!(port, cluster.port().to_string());
        conn.close().await.expect("close");
    }
}

/// A base directory postgres can reach when we run as root, whatever the umask.
fn reachable_tempdir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    dir
}

fn owner_uid(path: &Path) -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).expect("metadata").uid()
}

#[tokio::test]
async fn durable_cluster_keeps_its_data_across_restarts() {
    let base = reachable_tempdir();
    let data_dir = base.path().join("nested").join("deeper").join("pg");
    let opts = ClusterOptions {
        data_dir: data_dir.clone(),
        port: None,
        durable: true,
    };

    let cluster = Cluster::start(opts.clone()).await.expect("first start");
    assert!(cluster.is_durable());
    let mut conn = connect(&cluster, "postgres").await;
    let fsync: String = sqlx::query_scalar("SELECT current_setting('fsync')")
        .fetch_one(&mut conn)
        .await
        .expect("fsync");
    assert_eq!(fsync, "on");
    conn.close().await.expect("close");
    cluster.create_database("app", None).await.expect("create");
    let mut conn = connect(&cluster, "app").await;
    sqlx::raw_sql("CREATE TABLE kept (v text); INSERT INTO kept VALUES ('still here');")
        .execute(&mut conn)
        .await
        .expect("write");
    conn.close().await.expect("close");

    // The same directory cannot be used twice at once.
    let err = Cluster::start(opts.clone())
        .await
        .expect_err("second start on a busy dir");
    assert!(
        matches!(err, DevDbError::AlreadyRunning { .. }),
        "unexpected: {err}"
    );
    assert!(
        err.to_string().contains(&format!(
            "another baton dev is using {}",
            data_dir.display()
        )),
        "{err}"
    );
    // ...and that refusal did not disturb the running one.
    assert!(accepts(cluster.port()));

    if nix::unistd::geteuid().is_root() {
        let postgres = nix::unistd::User::from_name("postgres")
            .expect("lookup")
            .expect("postgres user");
        for dir in [
            base.path().join("nested"),
            base.path().join("nested/deeper"),
            data_dir.clone(),
        ] {
            assert_eq!(
                owner_uid(&dir),
                postgres.uid.as_raw(),
                "{} not owned by postgres",
                dir.display()
            );
        }
    }

    let first_port = cluster.port();
    drop(cluster);
    assert!(!accepts(first_port));
    assert!(data_dir.join("PG_VERSION").exists(), "durable dir kept");

    // Restart on the same directory and a fixed port.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let cluster = Cluster::start(ClusterOptions {
        port: Some(port),
        ..opts
    })
    .await
    .expect("restart");
    assert_eq!(cluster.port(), port);
    let mut conn = connect(&cluster, "app").await;
    let v: String = sqlx::query_scalar("SELECT v FROM kept")
        .fetch_one(&mut conn)
        .await
        .expect("read after restart");
    assert_eq!(v, "still here");
    conn.close().await.expect("close");
}

#[tokio::test]
async fn stop_is_idempotent() {
    let cluster = Cluster::throwaway().await.expect("throwaway cluster");
    let port = cluster.port();
    assert!(accepts(port));
    cluster.stop().expect("stop");
    assert!(!accepts(port));
    cluster.stop().expect("stop again");
    cluster.stop().expect("and again");
    drop(cluster);
}

#[tokio::test]
async fn fixed_port_in_use_is_a_clear_start_error() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = holder.local_addr().expect("addr").port();
    let base = reachable_tempdir();
    let err = Cluster::start(ClusterOptions {
        data_dir: base.path().join("pg"),
        port: Some(port),
        durable: false,
    })
    .await
    .expect_err("port is taken");
    let text = err.to_string();
    eprintln!("{text}");
    assert!(matches!(err, DevDbError::Start { .. }), "{text}");
    assert!(text.contains("Address already in use"), "{text}");
    assert!(text.contains("baton-devdb.log"), "{text}");
}

#[tokio::test]
async fn root_refuses_a_data_dir_postgres_cannot_reach() {
    if !nix::unistd::geteuid().is_root() {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let private = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(private.path(), std::fs::Permissions::from_mode(0o700))
        .expect("chmod");
    let err = Cluster::start(ClusterOptions {
        data_dir: private.path().join("pg"),
        port: None,
        durable: true,
    })
    .await
    .expect_err("unreachable");
    assert!(matches!(err, DevDbError::InvalidDataDir { .. }), "{err}");
    assert!(err.to_string().contains("chmod o+x"), "{err}");
}

/// Not a test by itself: the body of the child process of the watchdog test. It starts a
/// throwaway cluster, reports it, and exits without running any destructor.
#[test]
fn watchdog_child() {
    let Some(report) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let cluster = match std::env::var_os(CHILD_DURABLE_DIR_ENV) {
        Some(dir) => Cluster::start_blocking(ClusterOptions {
            data_dir: dir.into(),
            port: None,
            durable: true,
        })
        .expect("durable cluster in child"),
        None => Cluster::throwaway_blocking().expect("throwaway cluster in child"),
    };
    let temp_root = cluster.data_dir().parent().expect("parent").to_path_buf();
    std::fs::write(
        &report,
        format!("{}\n{}\n", cluster.port(), temp_root.display()),
    )
    .expect("write report");
    std::process::exit(0);
}

/// Run [`watchdog_child`] in a child process; returns the port and directory it reported.
fn run_watchdog_child(durable_dir: Option<&Path>) -> (u16, PathBuf) {
    let scratch = tempfile::tempdir().expect("tempdir");
    let report = scratch.path().join("report");
    let mut cmd = Command::new(std::env::current_exe().expect("current exe"));
    cmd.args([
        "--exact",
        "watchdog_child",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(CHILD_ENV, &report)
    .stdin(Stdio::null())
    .stdout(Stdio::null());
    if let Some(dir) = durable_dir {
        cmd.env(CHILD_DURABLE_DIR_ENV, dir);
    }
    let mut child = cmd.spawn().expect("spawn child");
    let mut status = None;
    assert!(
        eventually(Duration::from_secs(60), || {
            status = child.try_wait().expect("try_wait");
            status.is_some()
        }),
        "child did not exit"
    );
    assert!(status.expect("status").success(), "child failed");

    let text = std::fs::read_to_string(&report).expect("child report");
    let mut lines = text.lines();
    let port: u16 = lines.next().expect("port").parse().expect("port number");
    (port, PathBuf::from(lines.next().expect("dir")))
}

#[test]
fn watchdog_cleans_up_when_owner_exits_without_drop() {
    let (port, temp_root) = run_watchdog_child(None);
    assert!(
        eventually(Duration::from_secs(30), || !accepts(port)),
        "cluster on port {port} still accepts connections after its owner exited"
    );
    assert!(
        eventually(Duration::from_secs(30), || !temp_root.exists()),
        "{} not deleted after its owner exited",
        temp_root.display()
    );
}

/// The `baton dev` killed without cleanup case: the server is shut down cleanly, the data
/// stays, and the next start is not refused as "already running".
#[tokio::test]
async fn watchdog_shuts_down_a_durable_cluster_and_keeps_its_data() {
    let base = reachable_tempdir();
    let data_dir = base.path().join("pg");
    let child_dir = data_dir.clone();
    let (port, _) = tokio::task::spawn_blocking(move || run_watchdog_child(Some(&child_dir)))
        .await
        .expect("child");
    assert!(
        eventually(Duration::from_secs(30), || !accepts(port)
            && !data_dir.join("postmaster.pid").exists()),
        "durable cluster on port {port} not shut down after its owner exited"
    );
    assert!(data_dir.join("PG_VERSION").exists());
    let log = std::fs::read_to_string(data_dir.join("baton-devdb.log")).expect("log");
    assert!(log.contains("fast shutdown request"), "{log}");

    let cluster = Cluster::start(ClusterOptions {
        data_dir,
        port: None,
        durable: true,
    })
    .await
    .expect("start again");
    assert!(accepts(cluster.port()));
}

#[tokio::test]
async fn restart_after_a_postmaster_crash_recovers() {
    let base = reachable_tempdir();
    let opts = ClusterOptions {
        data_dir: base.path().join("pg"),
        port: None,
        durable: true,
    };
    let cluster = Cluster::start(opts.clone()).await.expect("start");
    cluster.create_database("app", None).await.expect("create");
    let port = cluster.port();

    let pid_text =
        std::fs::read_to_string(cluster.data_dir().join("postmaster.pid")).expect("pid file");
    let pid: i32 = pid_text
        .lines()
        .next()
        .expect("pid line")
        .parse()
        .expect("pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill postmaster");
    assert!(eventually(Duration::from_secs(10), || !accepts(port)));
    assert!(
        cluster.data_dir().join("postmaster.pid").exists(),
        "a crash leaves postmaster.pid behind"
    );
    // Stopping what already died is not an error.
    cluster.stop().expect("stop after crash");
    drop(cluster);

    let cluster = Cluster::start(opts).await.expect("start after crash");
    let mut conn = connect(&cluster, "app").await;
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&mut conn)
        .await
        .expect("query");
    assert_eq!(one, 1);
    conn.close().await.expect("close");
}

#[tokio::test]
async fn data_dir_too_long_for_a_unix_socket_still_works_over_tcp() {
    let base = reachable_tempdir();
    let data_dir = base.path().join("a".repeat(60)).join("b".repeat(60));
    let cluster = Cluster::start(ClusterOptions {
        data_dir,
        port: None,
        durable: false,
    })
    .await
    .expect("start");
    let mut conn = connect(&cluster, "postgres").await;
    let sockets: String = sqlx::query_scalar("SELECT current_setting('unix_socket_directories')")
        .fetch_one(&mut conn)
        .await
        .expect("setting");
    assert_eq!(sockets, "");
    conn.close().await.expect("close");
}

#[tokio::test]
async fn first_start_survives_a_leftover_from_an_interrupted_initdb() {
    let base = reachable_tempdir();
    let data_dir = base.path().join("pg");
    // What a Ctrl-C during a first `baton dev`'s initdb leaves behind.
    let leftover = base.path().join("pg.initdb-partial");
    std::fs::create_dir_all(leftover.join("base")).expect("leftover");
    std::fs::write(leftover.join("PG_VERSION"), "15\n").expect("leftover file");

    let cluster = Cluster::start(ClusterOptions {
        data_dir: data_dir.clone(),
        port: None,
        durable: false,
    })
    .await
    .expect("start");
    assert!(!leftover.exists());
    assert!(data_dir.join("PG_VERSION").exists());
    drop(cluster);

    // A non-empty directory that is not a cluster is refused, not initdb'd over.
    let other = base.path().join("not-a-cluster");
    std::fs::create_dir_all(&other).expect("dir");
    std::fs::write(other.join("notes.txt"), "mine").expect("file");
    let err = Cluster::start(ClusterOptions {
        data_dir: other,
        port: None,
        durable: false,
    })
    .await
    .expect_err("non-empty");
    assert!(matches!(err, DevDbError::InvalidDataDir { .. }), "{err}");
}
