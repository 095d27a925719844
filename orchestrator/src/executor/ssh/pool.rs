//! Connections: pooled per server, bounded by `max_concurrent`, guarded by a circuit breaker.
//!
//! A run borrows one connection for its whole duration (a [`Lease`]): it first takes one of the
//! server's `max_concurrent` permits, then an idle connection (reused) or a new one. Since a
//! connection is only opened by a run holding a permit when no idle one is left, a server never
//! has more than `max_concurrent` connections from this executor. A connection that served a
//! run without trouble goes back to the idle list; it is closed after
//! [`SshConfig::idle_timeout`](super::SshConfig::idle_timeout) unused, or as soon as it is
//! found dead. Keepalives (`keepalive@openssh.com`) detect dead peers on open connections.

use std::borrow::Cow;
use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use russh::client::{AuthResult, Handle};
use russh::keys::{HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKey};
use russh_sftp::client::SftpSession;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::breaker::{Admission, Breaker, BreakerConfig, BreakerState};
use super::host_key::{self, ClientHandler, HostKeySeen};
use super::{HostKeyPolicy, SshAuth, SshConfig, SshError, SshTarget};
use crate::executor::sleep_until_opt;

pub(crate) type SshHandle = Handle<ClientHandler>;

/// Why a connection could not be had.
#[derive(Debug)]
pub(crate) enum AcquireError {
    Ssh(SshError),
    Cancelled,
    TimedOut,
}

impl From<SshError> for AcquireError {
    fn from(e: SshError) -> Self {
        AcquireError::Ssh(e)
    }
}

/// Counters of one server's connections, as seen by [`SshExecutor::server_stats`].
///
/// [`SshExecutor::server_stats`]: super::SshExecutor::server_stats
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerStats {
    /// Connections currently open (idle or in use).
    pub open_connections: usize,
    /// The most connections that were ever open at once.
    pub peak_connections: usize,
    /// Open connections waiting in the pool.
    pub idle_connections: usize,
    /// Runs currently holding one of the server's `max_concurrent` slots.
    pub runs_in_progress: usize,
    /// The most runs that ever held a slot at once.
    pub peak_runs: usize,
    /// Connections opened so far (successful handshakes and authentications).
    pub connections_opened: u64,
    /// Runs that were given an idle connection instead of a new one.
    pub connections_reused: u64,
    /// The circuit breaker's state.
    pub breaker: BreakerState,
    /// Consecutive connection failures counted by the breaker.
    pub consecutive_failures: u32,
    /// How files reach this server, as learned by its runs.
    pub transfer: FileTransfer,
}

/// How a server's runs upload and download their files.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum FileTransfer {
    /// Not known yet: the next run tries SFTP first.
    #[default]
    Unknown,
    /// The SFTP subsystem.
    Sftp,
    /// The server has no SFTP subsystem: `tar` and `head` over exec channels.
    Shell,
}

#[derive(Debug, Default)]
struct Counters {
    open: AtomicUsize,
    peak_open: AtomicUsize,
    running: AtomicUsize,
    peak_running: AtomicUsize,
    opened: AtomicU64,
    reused: AtomicU64,
}

impl Counters {
    fn raise(current: &AtomicUsize, peak: &AtomicUsize) {
        let now = current.fetch_add(1, Ordering::SeqCst) + 1;
        peak.fetch_max(now, Ordering::SeqCst);
    }
}

/// One authenticated connection.
pub(crate) struct Conn {
    handle: SshHandle,
    /// The SFTP session the last run left open on this connection, for the next one: opening
    /// one costs a channel, the subsystem request and the protocol's init exchange.
    sftp: Option<SftpSession>,
    /// The last run's cleanup, confirmed in the background: true once the server removed the
    /// run's directory. The next run on this connection waits for it.
    cleanup: Option<JoinHandle<bool>>,
    id: u64,
    fingerprint: u64,
    counters: Arc<Counters>,
}

impl Conn {
    fn is_closed(&self) -> bool {
        self.handle.is_closed()
    }

    /// Closes the connection in the background (a polite `SSH_MSG_DISCONNECT`).
    fn close(self) {
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = self
                    .handle
                    .disconnect(russh::Disconnect::ByApplication, "", "en")
                    .await;
                drop(self);
            });
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.counters.open.fetch_sub(1, Ordering::SeqCst);
    }
}

struct IdleConn {
    conn: Conn,
    since: Instant,
}

/// The decoded credentials of one server definition.
#[derive(Clone)]
enum Credentials {
    Key(Arc<PrivateKey>),
    Password(String),
}

/// What changes with the server's definition: when the fingerprint changes, idle connections
/// and the breaker's count are dropped (the key learned under `accept_new` only when the host
/// or port changes).
struct Definition {
    fingerprint: u64,
    credentials: Credentials,
    pinned: Option<PublicKey>,
}

struct ServerInner {
    limit: u32,
    /// Permits still to be withdrawn after `max_concurrent` was lowered while they were in use.
    owed: u32,
    definition: Option<Definition>,
    idle: Vec<IdleConn>,
    breaker: Breaker,
    /// The server's known key: accepted on first use under `accept_new`, or the last pinned
    /// one. Required from then on when the definition carries no key.
    learned: Option<PublicKey>,
    /// The host and port `learned` belongs to.
    endpoint: (String, u16),
    /// How files reach the server (learned by the first run; forgotten with the endpoint).
    transfer: FileTransfer,
}

pub(crate) struct ServerState {
    semaphore: Arc<Semaphore>,
    inner: Mutex<ServerInner>,
    counters: Arc<Counters>,
}

impl ServerState {
    fn lock(&self) -> MutexGuard<'_, ServerInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Closes the idle connection `id` if it has been idle since `since`.
    fn expire_idle(&self, id: u64, since: Instant) {
        let expired = {
            let mut inner = self.lock();
            inner
                .idle
                .iter()
                .position(|c| c.conn.id == id && c.since == since)
                .map(|i| inner.idle.swap_remove(i))
        };
        if let Some(idle) = expired {
            tracing::debug!(conn = id, "closing idle ssh connection");
            idle.conn.close();
        }
    }
}

/// The connection pool of one executor.
#[derive(Default)]
pub(crate) struct Pool {
    servers: Mutex<HashMap<Uuid, Arc<ServerState>>>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let servers = self.servers.lock().unwrap_or_else(PoisonError::into_inner);
        f.debug_struct("Pool")
            .field("servers", &servers.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// A connection lent to one run together with its concurrency permit. Dropping it closes the
/// connection; [`Lease::release`] returns a healthy one to the pool.
pub(crate) struct Lease {
    conn: Option<Conn>,
    permit: Option<OwnedSemaphorePermit>,
    server: Arc<ServerState>,
    /// The connection came from the idle list (it may have died meanwhile).
    pub(crate) reused: bool,
    /// Under `accept_new` without a recorded key: the key this executor accepted.
    pub(crate) observed_host_key: Option<String>,
    idle_timeout: Duration,
}

impl Lease {
    pub(crate) fn handle(&self) -> Option<&SshHandle> {
        self.conn.as_ref().map(|c| &c.handle)
    }

    /// The SFTP session a previous run left open on this connection, if any.
    pub(crate) fn take_sftp(&mut self) -> Option<SftpSession> {
        self.conn.as_mut().and_then(|c| c.sftp.take())
    }

    /// How files reach this lease's server, as learned so far.
    pub(crate) fn transfer(&self) -> FileTransfer {
        self.server.lock().transfer
    }

    /// Remembers how files reach this lease's server.
    pub(crate) fn learn_transfer(&self, transfer: FileTransfer) {
        self.server.lock().transfer = transfer;
    }

    /// The previous run's cleanup on this connection, if it was left to finish in the background.
    pub(crate) fn take_cleanup(&mut self) -> Option<JoinHandle<bool>> {
        self.conn.as_mut().and_then(|c| c.cleanup.take())
    }

    /// Leaves `cleanup` (true when the server confirmed it) for the connection's next run.
    pub(crate) fn set_cleanup(&mut self, cleanup: JoinHandle<bool>) {
        if let Some(conn) = self.conn.as_mut() {
            conn.cleanup = Some(cleanup);
        }
    }

    /// Keeps `sftp` (opened on this connection, in a known state) for the connection's next run.
    pub(crate) fn keep_sftp(&mut self, sftp: SftpSession) {
        if let Some(conn) = self.conn.as_mut() {
            conn.sftp = Some(sftp);
        }
    }

    /// Returns the connection to the idle list (unless it is closed).
    pub(crate) fn release(mut self) {
        let Some(conn) = self.conn.take() else { return };
        if conn.is_closed() {
            return;
        }
        let since = Instant::now();
        let id = conn.id;
        {
            let mut inner = self.server.lock();
            let current = inner.definition.as_ref().map(|d| d.fingerprint);
            if current != Some(conn.fingerprint) {
                drop(inner);
                conn.close();
                return;
            }
            inner.idle.push(IdleConn { conn, since });
        }
        let weak: Weak<ServerState> = Arc::downgrade(&self.server);
        let idle_timeout = self.idle_timeout;
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                tokio::time::sleep(idle_timeout).await;
                if let Some(server) = weak.upgrade() {
                    server.expire_idle(id, since);
                }
            });
        }
    }

    /// Closes the connection now (politely, in the background).
    pub(crate) fn discard(&mut self) {
        if let Some(conn) = self.conn.take() {
            conn.close();
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.discard();
        self.server.counters.running.fetch_sub(1, Ordering::SeqCst);
        if let Some(permit) = self.permit.take() {
            let mut inner = self.server.lock();
            if inner.owed > 0 {
                inner.owed -= 1;
                permit.forget();
            }
        }
    }
}

impl Pool {
    fn server(&self, id: Uuid, config: &SshConfig, limit: u32) -> Arc<ServerState> {
        let mut servers = self.servers.lock().unwrap_or_else(PoisonError::into_inner);
        servers
            .entry(id)
            .or_insert_with(|| {
                Arc::new(ServerState {
                    semaphore: Arc::new(Semaphore::new(limit as usize)),
                    inner: Mutex::new(ServerInner {
                        limit,
                        owed: 0,
                        definition: None,
                        idle: Vec::new(),
                        breaker: Breaker::new(config.breaker),
                        learned: None,
                        endpoint: (String::new(), 0),
                        transfer: FileTransfer::Unknown,
                    }),
                    counters: Arc::new(Counters::default()),
                })
            })
            .clone()
    }

    /// Counters of one server, if this pool has seen it.
    pub(crate) fn stats(&self, id: Uuid) -> Option<ServerStats> {
        let server = self
            .servers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)?
            .clone();
        let inner = server.lock();
        let c = &server.counters;
        Some(ServerStats {
            open_connections: c.open.load(Ordering::SeqCst),
            peak_connections: c.peak_open.load(Ordering::SeqCst),
            idle_connections: inner.idle.len(),
            runs_in_progress: c.running.load(Ordering::SeqCst),
            peak_runs: c.peak_running.load(Ordering::SeqCst),
            connections_opened: c.opened.load(Ordering::SeqCst),
            connections_reused: c.reused.load(Ordering::SeqCst),
            breaker: inner.breaker.state(),
            consecutive_failures: inner.breaker.failures(),
            transfer: inner.transfer,
        })
    }

    /// Counters of every server this pool has seen.
    pub(crate) fn all_stats(&self) -> Vec<ServerStats> {
        let ids: Vec<Uuid> = self
            .servers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .copied()
            .collect();
        ids.into_iter().filter_map(|id| self.stats(id)).collect()
    }

    /// Closes every idle connection.
    pub(crate) fn close_idle(&self) {
        let servers: Vec<Arc<ServerState>> = self
            .servers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        for server in servers {
            let idle = std::mem::take(&mut server.lock().idle);
            for c in idle {
                c.conn.close();
            }
        }
    }

    /// Takes a concurrency slot for `target`'s server and a connection to it.
    pub(crate) async fn acquire(
        &self,
        target: &SshTarget,
        config: &SshConfig,
        cancel: &CancellationToken,
        deadline: Option<Instant>,
    ) -> Result<Lease, AcquireError> {
        let limit = target.effective_max_concurrent();
        let server = self.server(target.server_id, config, limit);
        let fingerprint = definition_fingerprint(target);
        self.sync_definition(&server, target, fingerprint, limit)?;

        let permit = tokio::select! {
            biased;
            _ = cancel.cancelled() => return Err(AcquireError::Cancelled),
            permit = server.semaphore.clone().acquire_owned() => {
                permit.map_err(|_| SshError::session(&target.address(), "the connection pool is closed"))?
            }
            _ = sleep_until_opt(deadline) => return Err(AcquireError::TimedOut),
        };
        Counters::raise(&server.counters.running, &server.counters.peak_running);
        let mut lease = Lease {
            conn: None,
            permit: Some(permit),
            server: server.clone(),
            reused: false,
            observed_host_key: None,
            idle_timeout: config.idle_timeout,
        };

        // An idle connection of the current definition, if one is still alive.
        let reusable = {
            let mut inner = server.lock();
            let mut found = None;
            while let Some(idle) = inner.idle.pop() {
                if idle.conn.fingerprint == fingerprint && !idle.conn.is_closed() {
                    found = Some(idle.conn);
                    break;
                }
                // Dead or outdated: dropping it closes it.
            }
            found
        };
        if let Some(conn) = reusable {
            server.counters.reused.fetch_add(1, Ordering::SeqCst);
            lease.conn = Some(conn);
            lease.reused = true;
        } else {
            self.connect_into(&mut lease, target, config, cancel, deadline)
                .await?;
        }
        lease.observed_host_key = observed_key(&server, target);
        Ok(lease)
    }

    /// Replaces the lease's connection (found dead when reused) with a new one.
    pub(crate) async fn reconnect(
        &self,
        lease: &mut Lease,
        target: &SshTarget,
        config: &SshConfig,
        cancel: &CancellationToken,
        deadline: Option<Instant>,
    ) -> Result<(), AcquireError> {
        lease.discard();
        lease.reused = false;
        self.connect_into(lease, target, config, cancel, deadline)
            .await?;
        lease.observed_host_key = observed_key(&lease.server, target);
        Ok(())
    }

    /// Records the server's current definition: a changed definition drops what was built on
    /// the old one; a changed `max_concurrent` resizes the slots.
    fn sync_definition(
        &self,
        server: &ServerState,
        target: &SshTarget,
        fingerprint: u64,
        limit: u32,
    ) -> Result<(), SshError> {
        let mut inner = server.lock();
        if inner.limit != limit {
            if limit > inner.limit {
                let mut more = limit - inner.limit;
                let repaid = more.min(inner.owed);
                inner.owed -= repaid;
                more -= repaid;
                server.semaphore.add_permits(more as usize);
            } else {
                let fewer = (inner.limit - limit) as usize;
                let forgotten = server.semaphore.forget_permits(fewer);
                inner.owed += (fewer - forgotten) as u32;
            }
            inner.limit = limit;
        }
        if inner.definition.as_ref().map(|d| d.fingerprint) == Some(fingerprint) {
            return Ok(());
        }
        let definition = Definition {
            fingerprint,
            credentials: decode_credentials(&target.auth)?,
            pinned: match (&target.host_key, target.host_key_policy) {
                (Some(line), _) => Some(host_key::parse_host_key(line)?),
                (None, HostKeyPolicy::AcceptNew) => None,
                (None, HostKeyPolicy::Strict) => {
                    return Err(SshError::invalid_target(
                        "the host key policy is `strict` but no host key is pinned",
                    ));
                }
            },
        };
        let stale = std::mem::take(&mut inner.idle);
        let endpoint = (target.host.clone(), target.port);
        if inner.endpoint != endpoint {
            inner.endpoint = endpoint;
            inner.transfer = FileTransfer::Unknown;
            inner.learned = None;
        }
        if let Some(pinned) = &definition.pinned {
            // The API's key wins, and stays required if it is ever cleared.
            inner.learned = Some(pinned.clone());
        }
        inner.definition = Some(definition);
        inner.breaker = Breaker::new(inner.breaker_config());
        drop(inner);
        for c in stale {
            c.conn.close();
        }
        Ok(())
    }

    async fn connect_into(
        &self,
        lease: &mut Lease,
        target: &SshTarget,
        config: &SshConfig,
        cancel: &CancellationToken,
        deadline: Option<Instant>,
    ) -> Result<(), AcquireError> {
        let server = lease.server.clone();
        let address = target.address();
        let (credentials, expected, fingerprint, admission) = {
            let mut inner = server.lock();
            let Some(definition) = inner.definition.as_ref() else {
                return Err(SshError::session(&address, "server definition missing").into());
            };
            let credentials = definition.credentials.clone();
            let expected = definition.pinned.clone().or_else(|| inner.learned.clone());
            let fingerprint = definition.fingerprint;
            let admission =
                inner
                    .breaker
                    .admit(Instant::now())
                    .map_err(|r| SshError::CircuitOpen {
                        address: address.clone(),
                        failures: r.failures,
                        last_error: r.last_error,
                        retry_in: r.retry_in,
                    })?;
            (credentials, expected, fingerprint, admission)
        };
        // Reports a probe that ends without a verdict (cancelled, timed out while waiting).
        struct ProbeGuard<'a> {
            server: &'a ServerState,
            armed: bool,
        }
        impl Drop for ProbeGuard<'_> {
            fn drop(&mut self) {
                if self.armed {
                    self.server.lock().breaker.abandon_probe();
                }
            }
        }
        let mut probe = ProbeGuard {
            server: &server,
            armed: admission == Admission::Probe,
        };

        let attempt = connect(target, &credentials, expected.clone(), config);
        let result = tokio::select! {
            biased;
            _ = cancel.cancelled() => return Err(AcquireError::Cancelled),
            r = tokio::time::timeout(config.connect_timeout, attempt) => match r {
                Ok(r) => r,
                Err(_) => Err(SshError::Connect {
                    address: address.clone(),
                    message: format!("timed out after {:?}", config.connect_timeout),
                }),
            },
            _ = sleep_until_opt(deadline) => return Err(AcquireError::TimedOut),
        };
        probe.armed = false;
        let mut inner = server.lock();
        match result {
            Ok((handle, accepted)) => {
                inner.breaker.success();
                if target.host_key.is_none()
                    && target.host_key_policy == HostKeyPolicy::AcceptNew
                    && inner.learned.is_none()
                {
                    tracing::info!(
                        server.id = %target.server_id, address = %address,
                        fingerprint = %host_key::fingerprint(&accepted),
                        "accepted new ssh host key (accept_new)"
                    );
                    inner.learned = Some(accepted);
                }
                drop(inner);
                Counters::raise(&server.counters.open, &server.counters.peak_open);
                server.counters.opened.fetch_add(1, Ordering::SeqCst);
                lease.conn = Some(Conn {
                    handle,
                    sftp: None,
                    cleanup: None,
                    id: self.next_id.fetch_add(1, Ordering::SeqCst),
                    fingerprint,
                    counters: server.counters.clone(),
                });
                Ok(())
            }
            Err(e) => {
                if e.is_unreachable() {
                    inner.breaker.failure(Instant::now(), &e.to_string());
                } else {
                    // The server answered (wrong credentials, other host key): it is reachable.
                    inner.breaker.success();
                }
                Err(e.into())
            }
        }
    }
}

impl ServerInner {
    fn breaker_config(&self) -> BreakerConfig {
        self.breaker.config()
    }
}

/// The host key to report for the API to record: only under `accept_new` while the API has no
/// key for the server.
fn observed_key(server: &ServerState, target: &SshTarget) -> Option<String> {
    if target.host_key.is_some() || target.host_key_policy != HostKeyPolicy::AcceptNew {
        return None;
    }
    server.lock().learned.as_ref().map(host_key::key_line)
}

fn definition_fingerprint(target: &SshTarget) -> u64 {
    let mut h = DefaultHasher::new();
    target.host.hash(&mut h);
    target.port.hash(&mut h);
    target.username.hash(&mut h);
    target.auth.hash(&mut h);
    target.host_key_policy.hash(&mut h);
    target.host_key.as_deref().map(str::trim).hash(&mut h);
    h.finish()
}

fn decode_credentials(auth: &SshAuth) -> Result<Credentials, SshError> {
    match auth {
        SshAuth::Password(p) => Ok(Credentials::Password(p.clone())),
        SshAuth::PrivateKey { pem, passphrase } => {
            russh::keys::decode_secret_key(pem.trim(), passphrase.as_deref())
                .map(|k| Credentials::Key(Arc::new(k)))
                .map_err(|e| {
                    let why = match e {
                        russh::keys::Error::KeyIsEncrypted => {
                            "the private key is encrypted and no (or a wrong) passphrase was given"
                                .to_owned()
                        }
                        other => other.to_string(),
                    };
                    SshError::invalid_target(format!("cannot read the private key: {why}"))
                })
        }
    }
}

/// DNS, TCP, SSH handshake with host key check, authentication.
async fn connect(
    target: &SshTarget,
    credentials: &Credentials,
    expected: Option<PublicKey>,
    config: &SshConfig,
) -> Result<(SshHandle, PublicKey), SshError> {
    let address = target.address();
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((target.host.as_str(), target.port))
        .await
        .map_err(|e| SshError::Dns {
            host: target.host.clone(),
            message: e.to_string(),
        })?
        .collect();
    if addrs.is_empty() {
        return Err(SshError::Dns {
            host: target.host.clone(),
            message: "no addresses".to_owned(),
        });
    }
    let mut stream = None;
    let mut errors: Vec<io::Error> = Vec::new();
    for addr in &addrs {
        match TcpStream::connect(addr).await {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => errors.push(e),
        }
    }
    let Some(stream) = stream else {
        if errors
            .iter()
            .all(|e| e.kind() == io::ErrorKind::ConnectionRefused)
        {
            return Err(SshError::ConnectionRefused { address });
        }
        let message = errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        return Err(SshError::Connect { address, message });
    };
    let _ = stream.set_nodelay(true);

    let mut ssh_config = russh::client::Config {
        keepalive_interval: Some(config.keepalive_interval),
        keepalive_max: config.keepalive_max,
        inactivity_timeout: None,
        nodelay: true,
        ..Default::default()
    };
    if let Some(key) = &expected {
        ssh_config.preferred.key = Cow::Owned(host_key::algorithms_for(key));
    }
    let (handler, seen) = ClientHandler::new(expected);
    let connected = russh::client::connect_stream(Arc::new(ssh_config), stream, handler).await;
    let seen = host_key::seen(&seen);
    let (mut handle, accepted) = match (connected, seen) {
        (
            _,
            HostKeySeen::Mismatch {
                expected,
                presented,
            },
        ) => {
            return Err(SshError::HostKeyMismatch {
                address,
                expected: host_key::fingerprint(&expected),
                presented: host_key::fingerprint(&presented),
            });
        }
        (Ok(handle), HostKeySeen::Accepted(key)) => (handle, key),
        (Ok(_), HostKeySeen::Nothing) => {
            return Err(SshError::Connect {
                address,
                message: "the handshake ended without a host key check".to_owned(),
            });
        }
        (Err(e), _) => {
            return Err(SshError::Connect {
                address,
                message: format!("SSH handshake failed: {e}"),
            });
        }
    };
    authenticate(&mut handle, target, credentials, &address).await?;
    Ok((handle, accepted))
}

async fn authenticate(
    handle: &mut SshHandle,
    target: &SshTarget,
    credentials: &Credentials,
    address: &str,
) -> Result<(), SshError> {
    let (method, result) = match credentials {
        Credentials::Key(key) => {
            let hash = if key.algorithm().is_rsa() {
                match handle.best_supported_rsa_hash().await {
                    Ok(Some(Some(hash))) => Some(hash),
                    _ => Some(HashAlg::Sha256),
                }
            } else {
                None
            };
            let key = PrivateKeyWithHashAlg::new(key.clone(), hash);
            (
                "public key",
                handle
                    .authenticate_publickey(target.username.clone(), key)
                    .await,
            )
        }
        Credentials::Password(password) => (
            "password",
            handle
                .authenticate_password(target.username.clone(), password.clone())
                .await,
        ),
    };
    match result {
        Ok(AuthResult::Success) => Ok(()),
        Ok(AuthResult::Failure {
            remaining_methods, ..
        }) => {
            let offered: Vec<&'static str> = remaining_methods.iter().map(<&str>::from).collect();
            Err(SshError::AuthFailed {
                address: address.to_owned(),
                username: target.username.clone(),
                message: format!(
                    "{method} refused (the server offers: {})",
                    if offered.is_empty() {
                        "nothing".to_owned()
                    } else {
                        offered.join(", ")
                    }
                ),
            })
        }
        Err(e) => Err(SshError::Connect {
            address: address.to_owned(),
            message: format!("connection lost during authentication: {e}"),
        }),
    }
}
