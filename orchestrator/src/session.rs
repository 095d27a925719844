//! The gRPC session with an api replica, and reconnection.
//!
//! One session = one `Session` stream. The worker queues `Hello` first, waits for `Welcome`,
//! hands the session's outbound queue to the shared state ([`Shared::attach`], which re-sends
//! what the api has not stored), then dispatches the api's messages and sends a `Heartbeat`
//! every `Welcome.heartbeat_interval_ms` until the stream breaks. Then it reconnects, forever,
//! with exponential backoff and full jitter (100 ms doubling up to 10 s; reset once a session
//! was established). With several api URLs (`--api-url a,b`), each new attempt goes to the next
//! replica, round robin ([`Rotation`]): a replica that died costs one short backoff, not a
//! series of refused connections.

use std::sync::Arc;
use std::time::Duration;

use anyhow::anyhow;
use baton_proto::v1::worker_service_client::WorkerServiceClient;
use baton_proto::{ServerMsg, WorkerMsg};
use futures::StreamExt as _;
use rand::Rng as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::worker::{ApiEndpoint, Outgoing, Shared};

/// First reconnection delay bound.
pub const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Largest reconnection delay bound.
pub const BACKOFF_CAP: Duration = Duration::from_secs(10);
/// How long the api has to answer `Hello` with `Welcome`.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(30);
/// Heartbeat period when the api does not say.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);
/// Largest message accepted from the api (an assignment carries the script).
const MAX_INBOUND_MESSAGE: usize = 64 * 1024 * 1024;

/// The largest delay before reconnection attempt `failures` (1 for the first retry):
/// `min(cap, base · 2^(failures-1))`.
pub fn backoff_bound(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(20);
    BACKOFF_BASE.saturating_mul(1 << exp).min(BACKOFF_CAP)
}

/// The delay before reconnection attempt `failures` (1 for the first retry): uniformly random
/// between zero and [`backoff_bound`] ("full jitter").
pub fn backoff_delay(failures: u32) -> Duration {
    let ms = u64::try_from(backoff_bound(failures).as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rand::rng().random_range(0..=ms))
}

/// Where the next session goes and how long to wait first: the worker starts with the first
/// api URL, and after every session that ended or could not be opened moves on to the next one
/// (round robin; with one URL it stays). The failure count that sizes the backoff restarts
/// once a session was established, so losing a replica that served costs at most
/// [`BACKOFF_BASE`] before the next replica is tried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotation {
    count: usize,
    current: usize,
    failures: u32,
}

impl Rotation {
    /// A rotation over `count` api URLs (at least one), starting with the first.
    pub fn new(count: usize) -> Self {
        Rotation {
            count: count.max(1),
            current: 0,
            failures: 0,
        }
    }

    /// The index of the URL the next session goes to.
    pub fn current(&self) -> usize {
        self.current
    }

    /// Records the end of a session (`established`: it got as far as `Welcome`) and moves on to
    /// the next URL; returns the failure count to size the backoff with ([`backoff_delay`]).
    pub fn session_ended(&mut self, established: bool) -> u32 {
        if established {
            self.failures = 0;
        }
        self.failures = self.failures.saturating_add(1);
        self.current = (self.current + 1) % self.count;
        self.failures
    }
}

/// The api refused this worker's protocol version (`Hello.protocol_version`): retrying the
/// same api cannot help, only upgrading one side can.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ProtocolRefused(pub String);

/// Holds sessions until `stop` fires. Ends early with [`ProtocolRefused`] when every api URL
/// in a row refused this worker's protocol version (one URL: the first refusal), so a
/// supervisor sees the worker exit with the reason instead of retrying forever.
pub(crate) async fn run(shared: Arc<Shared>, stop: CancellationToken) -> anyhow::Result<()> {
    let mut rotation = Rotation::new(shared.apis.len());
    let mut refusals = 0;
    loop {
        let api = &shared.apis[rotation.current()];
        let (established, result) = tokio::select! {
            r = session(&shared, api, &stop) => r,
            _ = stop.cancelled() => return Ok(()),
        };
        if stop.is_cancelled() {
            return Ok(());
        }
        match result
            .as_ref()
            .err()
            .and_then(|e| e.downcast_ref::<ProtocolRefused>())
        {
            Some(refused) => {
                refusals += 1;
                tracing::error!(api = %api.url, reason = %refused.0,
                                "the api refused this worker's protocol version");
                if refusals >= shared.apis.len() {
                    return Err(anyhow::Error::new(refused.clone()));
                }
            }
            None => refusals = 0,
        }
        let failures = rotation.session_ended(established);
        let delay = backoff_delay(failures);
        let next = &shared.apis[rotation.current()].url;
        let error = match result {
            Ok(()) => "the session ended".to_owned(),
            Err(e) => format!("{e:#}"),
        };
        if established {
            tracing::warn!(
                api = %api.url,
                error = %error,
                next = %next,
                retry_in_ms = delay.as_millis() as u64,
                "lost the api session; reconnecting"
            );
        } else {
            tracing::warn!(
                api = %api.url,
                attempt = failures,
                error = %error,
                next = %next,
                retry_in_ms = delay.as_millis() as u64,
                "cannot open a session with the api"
            );
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.cancelled() => return Ok(()),
        }
    }
}

/// One session. Returns whether it got as far as `Welcome`, and why it ended.
async fn session(
    shared: &Arc<Shared>,
    api: &ApiEndpoint,
    stop: &CancellationToken,
) -> (bool, anyhow::Result<()>) {
    let channel = match api.endpoint.connect().await {
        Ok(channel) => channel,
        Err(e) => {
            let e = anyhow::Error::new(e).context(format!("connecting to {}", api.url));
            return (false, Err(e));
        }
    };
    let authorization = shared.authorization.clone();
    let mut client =
        WorkerServiceClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
            req.metadata_mut()
                .insert("authorization", authorization.clone());
            Ok(req)
        })
        .max_decoding_message_size(MAX_INBOUND_MESSAGE);

    // The one outbound queue of this session; `Hello` goes first.
    let (tx, rx) = mpsc::unbounded_channel::<Outgoing>();
    let hello = shared.hello();
    let held = hello.running.len();
    let _ = tx.send(Outgoing::Msg(WorkerMsg::Hello(hello)));
    let outbound = UnboundedReceiverStream::new(rx).map(Outgoing::into_message);

    let mut inbound = match client.session(outbound).await {
        Ok(response) => response.into_inner(),
        Err(status) => return (false, Err(status_error(status))),
    };
    let welcome = match tokio::time::timeout(WELCOME_TIMEOUT, inbound.message()).await {
        Err(_) => return (false, Err(anyhow!("no Welcome within {WELCOME_TIMEOUT:?}"))),
        Ok(Err(status)) => return (false, Err(status_error(status))),
        Ok(Ok(None)) => {
            return (
                false,
                Err(anyhow!("the api closed the session before Welcome")),
            );
        }
        Ok(Ok(Some(message))) => match message.msg {
            Some(ServerMsg::Welcome(welcome)) => welcome,
            other => {
                return (
                    false,
                    Err(anyhow!(
                        "protocol error: expected Welcome first, got {}",
                        describe(other.as_ref())
                    )),
                );
            }
        },
    };
    let heartbeat = match welcome.heartbeat_interval_ms {
        0 => DEFAULT_HEARTBEAT,
        ms => Duration::from_millis(u64::from(ms).max(10)),
    };
    let session_id = shared.attach(tx, &welcome);
    tracing::info!(
        api = %api.url,
        api_id = %welcome.api_id,
        heartbeat_ms = heartbeat.as_millis() as u64,
        lease_ms = welcome.lease_ms,
        held,
        "session open"
    );

    let mut ticker = tokio::time::interval(heartbeat);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result = loop {
        tokio::select! {
            message = inbound.message() => match message {
                Ok(Some(message)) => shared.handle(message),
                Ok(None) => break Err(anyhow!("the api closed the session")),
                Err(status) => break Err(status_error(status)),
            },
            _ = ticker.tick() => shared.heartbeat(),
            _ = stop.cancelled() => break Ok(()),
        }
    };
    shared.detach(session_id);
    (true, result)
}

fn status_error(status: tonic::Status) -> anyhow::Error {
    let code = status.code();
    if code == tonic::Code::FailedPrecondition
        && status
            .message()
            .starts_with(baton_proto::version::REFUSAL_PREFIX)
    {
        return anyhow::Error::new(ProtocolRefused(status.message().to_owned()));
    }
    let mut text = format!("{code:?}");
    if !status.message().is_empty() {
        text.push_str(": ");
        text.push_str(status.message());
    }
    let mut error = anyhow!(text);
    if let Some(source) = std::error::Error::source(&status) {
        error = error.context(format!("{source}"));
    }
    if code == tonic::Code::Unauthenticated || code == tonic::Code::PermissionDenied {
        error = error.context("the api refused the worker token");
    }
    error
}

fn describe(msg: Option<&ServerMsg>) -> &'static str {
    match msg {
        None => "an empty message",
        Some(ServerMsg::Welcome(_)) => "Welcome",
        Some(ServerMsg::Assignment(_)) => "Assignment",
        Some(ServerMsg::Cancel(_)) => "Cancel",
        Some(ServerMsg::LeaseLost(_)) => "LeaseLost",
        Some(ServerMsg::LogAck(_)) => "LogAck",
        Some(ServerMsg::FinishedAck(_)) => "FinishedAck",
        Some(ServerMsg::Error(_)) => "ErrorNotice",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        for _ in 0..200 {
            assert!(backoff_delay(1) <= Duration::from_millis(100));
            assert!(backoff_delay(2) <= Duration::from_millis(200));
            assert!(backoff_delay(4) <= Duration::from_millis(800));
            assert!(backoff_delay(50) <= BACKOFF_CAP);
            assert!(backoff_delay(u32::MAX) <= BACKOFF_CAP);
        }
        // full jitter: late attempts are spread over the whole range, not pinned at the cap
        let samples: Vec<Duration> = (0..200).map(|_| backoff_delay(30)).collect();
        assert!(samples.iter().any(|d| *d < Duration::from_secs(5)));
        assert!(samples.iter().any(|d| *d > Duration::from_secs(5)));
    }

    #[test]
    fn one_url_is_always_the_one() {
        let mut rotation = Rotation::new(1);
        assert_eq!(rotation.current(), 0);
        assert_eq!(rotation.session_ended(false), 1);
        assert_eq!(rotation.current(), 0);
        assert_eq!(rotation.session_ended(false), 2);
        assert_eq!(rotation.current(), 0);
        assert_eq!(rotation.session_ended(true), 1);
        assert_eq!(rotation.current(), 0);
    }

    #[test]
    fn sessions_go_round_robin_from_the_first_url() {
        let mut rotation = Rotation::new(3);
        let mut order = vec![rotation.current()];
        for _ in 0..6 {
            rotation.session_ended(false);
            order.push(rotation.current());
        }
        assert_eq!(order, vec![0, 1, 2, 0, 1, 2, 0]);
    }

    #[test]
    fn a_lost_replica_costs_one_short_backoff_before_the_next() {
        // Connected to the first replica for a while (earlier failures forgotten) ...
        let mut rotation = Rotation::new(2);
        rotation.session_ended(false);
        rotation.session_ended(false);
        rotation.session_ended(false);
        assert_eq!(rotation.current(), 1);
        assert_eq!(rotation.session_ended(true), 1);
        // ... its loss sends the next attempt to the other one, after at most 100 ms.
        assert_eq!(rotation.current(), 0);
        let mut rotation = Rotation::new(2);
        let failures = rotation.session_ended(true);
        assert_eq!(rotation.current(), 1);
        assert_eq!(backoff_bound(failures), Duration::from_millis(100));
        // Both down: attempts alternate and back off as with one URL.
        assert_eq!(rotation.session_ended(false), 2);
        assert_eq!(rotation.current(), 0);
        assert_eq!(rotation.session_ended(false), 3);
        assert_eq!(rotation.current(), 1);
        assert_eq!(backoff_bound(3), Duration::from_millis(400));
        assert_eq!(backoff_bound(40), BACKOFF_CAP);
    }
}
