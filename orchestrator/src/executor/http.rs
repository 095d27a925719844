//! The `http` runtime: one request made by the executor itself with `reqwest`.
//!
//! The response body is streamed as [`OutputStream::Stdout`] lines (same splitting and
//! `PROGRESS: N` handling as process output). A status ≥ 400 fails the run as a script error
//! ([`ExecError::HttpStatus`]); no response at all (DNS, connect, TLS, broken body) is an
//! infrastructure error ([`ExecError::HttpTransport`]). The run's timeout and cancellation
//! abort the request.
//!
//! The client keeps to an address policy ([`baton_egress::AddressPolicy`]): internal
//! addresses (loopback, private, link-local with cloud metadata…) are refused after DNS
//! resolution and on every redirect unless the worker's allow-list
//! (`BATON_HTTP_ALLOW_CIDRS`) covers them ([`ExecError::HttpRefused`]).

use std::error::Error as _;
use std::time::Duration;

use baton_egress::AddressPolicy;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::output::{LineSink, LineSplitter, finish_chunk, push_chunk};
use super::{
    ExecError, ExecEvent, HttpRequestSpec, OutputStream, RunOutcome, RunSpec, sleep_until_opt,
};

/// Builds the HTTP client used for `http` runs (connection pooling is per client, so keep one),
/// keeping to `policy`.
pub fn default_client(policy: &AddressPolicy) -> Result<reqwest::Client, ExecError> {
    baton_egress::client_builder(policy.clone())
        .connect_timeout(Duration::from_secs(30))
        .user_agent(concat!("baton-worker/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| ExecError::HttpTransport {
            message: format!("cannot build HTTP client: {}", error_chain(&e)),
        })
}

/// Runs `spec.request` with `client`, streaming the response body to `events`.
/// The `http` runtime as an executor runs it: a client built on first use and shared by every
/// run of that executor.
#[derive(Debug, Default)]
pub struct LazyHttp {
    policy: AddressPolicy,
    client: std::sync::OnceLock<Result<reqwest::Client, ExecError>>,
}

impl LazyHttp {
    /// Runs that keep to `policy` (the default policy refuses every internal address).
    pub fn new(policy: AddressPolicy) -> Self {
        LazyHttp {
            policy,
            client: std::sync::OnceLock::new(),
        }
    }

    /// Makes the request `spec` describes, streaming the response body as output lines.
    pub async fn run(
        &self,
        spec: &RunSpec,
        events: &mpsc::Sender<ExecEvent>,
        cancel: &tokio_util::sync::CancellationToken,
        max_line_bytes: usize,
    ) -> super::RunOutcome {
        match self.client.get_or_init(|| default_client(&self.policy)) {
            Ok(client) => {
                run_http(client, &self.policy, spec, events, cancel, max_line_bytes).await
            }
            Err(e) => super::RunOutcome::from_error(e.clone(), Duration::ZERO),
        }
    }
}

/// Runs `spec.request` with `client` (built with [`default_client`] for `policy`), streaming
/// the response body to `events`.
pub async fn run_http(
    client: &reqwest::Client,
    policy: &AddressPolicy,
    spec: &RunSpec,
    events: &mpsc::Sender<ExecEvent>,
    cancel: &CancellationToken,
    max_line_bytes: usize,
) -> RunOutcome {
    let started = Instant::now();
    let Some(request) = spec.request.as_ref() else {
        return RunOutcome::from_error(
            ExecError::invalid_spec("http runtime needs a request"),
            started.elapsed(),
        );
    };
    let builder = match build_request(client, policy, request) {
        Ok(b) => b,
        Err(e) => return RunOutcome::from_error(e, started.elapsed()),
    };
    if cancel.is_cancelled() {
        return RunOutcome::from_error(ExecError::Cancelled, started.elapsed());
    }
    // Receiver gone is fine: the request still runs.
    let _ = events.send(ExecEvent::Started { pid: None }).await;

    let deadline = started.checked_add(spec.timeout);
    let exchange = exchange(builder, events, max_line_bytes);
    let stopped = tokio::select! {
        result = exchange => Ok(result),
        _ = cancel.cancelled() => Err(ExecError::Cancelled),
        _ = sleep_until_opt(deadline) => Err(ExecError::TimedOut { after: spec.timeout }),
    };
    let mut outcome = match stopped {
        Ok((status, error)) => RunOutcome {
            exit_code: match (&error, status) {
                (None, Some(s)) if s < 400 => Some(0),
                _ => None,
            },
            http_status: status,
            error,
            ..RunOutcome::default()
        },
        Err(error) => RunOutcome::from_error(error, Duration::ZERO),
    };
    outcome.duration = started.elapsed();
    outcome
}

/// Sends the request and streams the body. Returns the status (if a response arrived) and the
/// error, if any.
async fn exchange(
    builder: reqwest::RequestBuilder,
    events: &mpsc::Sender<ExecEvent>,
    max_line_bytes: usize,
) -> (Option<u16>, Option<ExecError>) {
    let mut response = match builder.send().await {
        Ok(r) => r,
        Err(e) => return (None, Some(send_error(&e))),
    };
    let status = response.status().as_u16();
    let mut splitter = LineSplitter::new(max_line_bytes);
    let mut sink = LineSink::new(events, OutputStream::Stdout, 0);
    let mut body_error = None;
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => push_chunk(&mut splitter, &mut sink, &chunk).await,
            Ok(None) => break,
            Err(e) => {
                body_error = Some(ExecError::HttpTransport {
                    message: format!("reading response body: {}", error_chain(&e)),
                });
                break;
            }
        }
    }
    finish_chunk(&mut splitter, &mut sink).await;
    let error = if status >= 400 {
        Some(ExecError::HttpStatus { status })
    } else {
        body_error
    };
    (Some(status), error)
}

fn build_request(
    client: &reqwest::Client,
    policy: &AddressPolicy,
    request: &HttpRequestSpec,
) -> Result<reqwest::RequestBuilder, ExecError> {
    let method = reqwest::Method::from_bytes(request.method.trim().to_ascii_uppercase().as_bytes())
        .map_err(|_| {
            ExecError::invalid_spec(format!("invalid HTTP method `{}`", request.method))
        })?;
    let url = reqwest::Url::parse(&request.url)
        .map_err(|e| ExecError::invalid_spec(format!("invalid URL `{}`: {e}", request.url)))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(ExecError::invalid_spec(format!(
            "unsupported URL scheme `{}` (expected http or https)",
            url.scheme()
        )));
    }
    // An IP literal is connected to without resolving: check it here (names are checked by
    // the client's resolver, redirects by its redirect policy).
    policy
        .check_url(&url)
        .map_err(|refused| ExecError::HttpRefused {
            reason: refused.to_string(),
        })?;
    let mut headers = HeaderMap::new();
    for (name, value) in &request.headers {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| ExecError::invalid_spec(format!("invalid header name `{name}`")))?;
        let value = HeaderValue::from_str(value)
            .map_err(|_| ExecError::invalid_spec(format!("invalid value for header `{name}`")))?;
        headers.append(name, value);
    }
    let mut builder = client.request(method, url);
    match &request.body {
        None => {}
        Some(serde_json::Value::String(text)) => builder = builder.body(text.clone()),
        Some(json) => builder = builder.json(json),
    }
    // Headers last, replacing: an explicit content-type wins over the one `json` sets.
    Ok(builder.headers(headers))
}

/// A request that got no response: refused by the address policy (the resolver or the
/// redirect policy said why, somewhere in the error's causes), or a transport failure.
fn send_error(error: &reqwest::Error) -> ExecError {
    let mut source = error.source();
    while let Some(cause) = source {
        if let Some(refused) = cause.downcast_ref::<baton_egress::Refused>() {
            return ExecError::HttpRefused {
                reason: format!("{}: {refused}", request_url(error)),
            };
        }
        source = cause.source();
    }
    ExecError::HttpTransport {
        message: error_chain(error),
    }
}

fn request_url(error: &reqwest::Error) -> String {
    error
        .url()
        .map_or_else(|| "the request".to_owned(), |u| u.as_str().to_owned())
}

/// `error: cause: cause` — reqwest's top-level message alone hides the useful part.
fn error_chain(error: &reqwest::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}
