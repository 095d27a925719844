//! Rate limits of the REST API, kept in memory per replica (token buckets):
//! - per token (keyed by the token's hash, known once it authenticated), generous;
//! - per client IP for requests without a token (probes, `/metrics`, the OpenAPI document);
//! - per client IP for failed authentications (401), strict: once spent, a request with a
//!   token this replica has not seen authenticate is refused with 429 *before* its database
//!   lookup, so guessing tokens costs the database nothing;
//! - per webhook key for deliveries (`POST /hooks/{key}`, keyed by the key's hash once it was
//!   found); an unknown key (404) counts as a failed authentication of the address, and a key
//!   not yet seen here is refused like an unknown token once the address's budget is spent.
//!
//! Past a limit the answer is 429 with `Retry-After` (whole seconds). Time is passed in, so the
//! buckets are tested with a synthetic clock.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::config::ApiConfig;
use crate::error::ApiError;

/// A token bucket: `rate` tokens per second up to `burst`.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
    /// When a request last used it (kept apart from `updated`, which refills move).
    used: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: f64,
}

impl Rate {
    /// None when `per_second` is 0 (no limit).
    pub fn new(per_second: u32, burst: u32) -> Option<Self> {
        (per_second > 0).then(|| Self {
            per_second: f64::from(per_second),
            burst: f64::from(burst.max(1)),
        })
    }
}

impl Bucket {
    fn full(rate: Rate, now: Instant) -> Self {
        Self {
            tokens: rate.burst,
            updated: now,
            used: now,
        }
    }

    fn refill(&mut self, rate: Rate, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate.per_second).min(rate.burst);
        self.updated = now;
    }

    /// Takes one token, or says how long until one is available.
    fn take(&mut self, rate: Rate, now: Instant) -> Result<(), Duration> {
        self.refill(rate, now);
        self.used = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(self.wait_for_one(rate))
        }
    }

    /// Whether one token is available, without taking it.
    fn check(&mut self, rate: Rate, now: Instant) -> Result<(), Duration> {
        self.refill(rate, now);
        if self.tokens >= 1.0 {
            Ok(())
        } else {
            Err(self.wait_for_one(rate))
        }
    }

    fn wait_for_one(&self, rate: Rate) -> Duration {
        Duration::from_secs_f64((1.0 - self.tokens) / rate.per_second)
    }

    fn is_full(&mut self, rate: Rate, now: Instant) -> bool {
        self.refill(rate, now);
        self.tokens >= rate.burst
    }
}

/// Buckets by key; full buckets are dropped now and then (a full bucket is the same as none).
#[derive(Debug)]
struct Buckets<K> {
    rate: Option<Rate>,
    map: HashMap<K, Bucket>,
    last_prune: Option<Instant>,
    /// A full bucket is dropped once unused this long.
    keep: Duration,
}

impl<K: std::hash::Hash + Eq + Clone> Buckets<K> {
    fn new(rate: Option<Rate>, keep: Duration) -> Self {
        Self {
            rate,
            map: HashMap::new(),
            last_prune: None,
            keep,
        }
    }

    fn take(&mut self, key: &K, now: Instant) -> Result<(), Duration> {
        let Some(rate) = self.rate else {
            return Ok(());
        };
        self.prune(now);
        self.map
            .entry(key.clone())
            .or_insert_with(|| Bucket::full(rate, now))
            .take(rate, now)
    }

    fn check(&mut self, key: &K, now: Instant) -> Result<(), Duration> {
        match (self.rate, self.map.get_mut(key)) {
            (Some(rate), Some(bucket)) => bucket.check(rate, now),
            _ => Ok(()),
        }
    }

    fn prune(&mut self, now: Instant) {
        const EVERY: Duration = Duration::from_secs(30);
        let Some(rate) = self.rate else { return };
        if self
            .last_prune
            .is_some_and(|at| now.saturating_duration_since(at) < EVERY)
        {
            return;
        }
        self.last_prune = Some(now);
        let keep = self.keep;
        self.map.retain(|_, bucket| {
            now.saturating_duration_since(bucket.used) < keep || !bucket.is_full(rate, now)
        });
    }
}

/// How long a token that authenticated stays known to the limiter after its last request.
const KNOWN_TOKEN_KEPT: Duration = Duration::from_secs(600);

/// What a request is, for the limiter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// No `Authorization` header.
    Anonymous,
    /// A bearer token's SHA-256.
    Token(Vec<u8>),
    /// A webhook delivery (`/hooks/{key}`): the key's SHA-256.
    Hook(Vec<u8>),
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limited {
    pub retry_after: Duration,
    pub message: &'static str,
}

/// The limiter of one replica.
#[derive(Debug)]
pub struct RateLimiter {
    state: Mutex<LimiterState>,
}

#[derive(Debug)]
struct LimiterState {
    /// Tokens that authenticated here (a 2xx-4xx answer other than 401).
    tokens: Buckets<Vec<u8>>,
    /// Webhook keys that were found here.
    hooks: Buckets<Vec<u8>>,
    anonymous: Buckets<IpAddr>,
    auth_failures: Buckets<IpAddr>,
}

impl RateLimiter {
    pub fn new(config: &ApiConfig) -> Self {
        let mut limiter = Self::with_rates(
            Rate::new(config.rate_limit_per_second, config.rate_limit_burst),
            Rate::new(
                config.anonymous_rate_limit_per_second,
                config.anonymous_rate_limit_per_second.saturating_mul(2),
            ),
            Rate::new(
                config.auth_failures_per_second,
                config.auth_failures_per_second.saturating_mul(10),
            ),
        );
        limiter = limiter.with_hook_rate(Rate::new(
            config.webhook_rate_limit_per_second,
            config.webhook_rate_limit_burst,
        ));
        limiter
    }

    /// Sets the per-webhook-key rate (none by default).
    pub fn with_hook_rate(self, rate: Option<Rate>) -> Self {
        let mut state = self.state.into_inner().unwrap_or_else(|e| e.into_inner());
        state.hooks = Buckets::new(rate, KNOWN_TOKEN_KEPT);
        Self {
            state: Mutex::new(state),
        }
    }

    pub fn with_rates(
        per_token: Option<Rate>,
        anonymous: Option<Rate>,
        auth_failures: Option<Rate>,
    ) -> Self {
        Self {
            state: Mutex::new(LimiterState {
                // A verified token stays known a while after its bucket refilled, so a
                // neighbour spending the address's failure budget does not lock it out.
                tokens: Buckets::new(per_token, KNOWN_TOKEN_KEPT),
                hooks: Buckets::new(None, KNOWN_TOKEN_KEPT),
                anonymous: Buckets::new(anonymous, Duration::ZERO),
                auth_failures: Buckets::new(auth_failures, Duration::ZERO),
            }),
        }
    }

    /// Before the request runs: may it?
    pub fn admit(&self, ip: IpAddr, credential: &Credential, now: Instant) -> Result<(), Limited> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (taken, message) = match credential {
            Credential::Anonymous => (
                state.anonymous.take(&ip, now),
                "too many requests without a token from this address",
            ),
            Credential::Token(hash) if state.tokens.map.contains_key(hash) => (
                state.tokens.take(hash, now),
                "too many requests for this token",
            ),
            Credential::Token(_) => (
                state.auth_failures.check(&ip, now),
                "too many failed authentications from this address",
            ),
            Credential::Hook(hash) if state.hooks.map.contains_key(hash) => (
                state.hooks.take(hash, now),
                "too many deliveries for this webhook",
            ),
            Credential::Hook(_) => (
                state.auth_failures.check(&ip, now),
                "too many requests with unknown webhook keys from this address",
            ),
        };
        taken.map_err(|retry_after| Limited {
            retry_after,
            message,
        })
    }

    /// After the request ran, with its answer's status and whether its token was verified.
    pub fn record(
        &self,
        ip: IpAddr,
        credential: &Credential,
        status: StatusCode,
        verified: bool,
        now: Instant,
    ) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let state = &mut *state;
        // What counts as "this credential is unknown" for each kind.
        let (buckets, hash, refused) = match credential {
            Credential::Anonymous => return,
            Credential::Token(hash) => (&mut state.tokens, hash, StatusCode::UNAUTHORIZED),
            Credential::Hook(hash) => (&mut state.hooks, hash, StatusCode::NOT_FOUND),
        };
        if status == refused {
            buckets.map.remove(hash);
            let _ = state.auth_failures.take(&ip, now);
        } else if verified && !buckets.map.contains_key(hash) {
            // First success: the bucket starts, this request charged to it (without a limit,
            // the entry only marks the credential as known).
            match buckets.rate {
                Some(_) => {
                    let _ = buckets.take(hash, now);
                }
                None => {
                    buckets.map.insert(
                        hash.clone(),
                        Bucket {
                            tokens: 0.0,
                            updated: now,
                            used: now,
                        },
                    );
                }
            }
        }
    }
}

/// Set by the [`Caller`](crate::auth::Caller) extractor when the request's token verified:
/// only then does the token get a bucket of its own (a 404 or 422 answered before
/// authentication says nothing about the token).
#[derive(Debug, Clone, Default)]
pub struct AuthVerified(Arc<AtomicBool>);

impl AuthVerified {
    pub fn mark(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

fn credential(request: &Request) -> Credential {
    if let Some(key) = request.uri().path().strip_prefix("/hooks/") {
        return Credential::Hook(crate::auth::hash_token(key));
    }
    match request.headers().get(header::AUTHORIZATION) {
        None => Credential::Anonymous,
        Some(value) => {
            let token = value
                .to_str()
                .ok()
                .and_then(|h| {
                    h.strip_prefix("Bearer ")
                        .or_else(|| h.strip_prefix("bearer "))
                })
                .map_or("", str::trim);
            Credential::Token(crate::auth::hash_token(token))
        }
    }
}

fn client_ip(request: &Request) -> IpAddr {
    request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |info| info.0.ip())
}

/// The middleware: admits, runs, records.
pub async fn limit(
    State(limiter): State<Arc<RateLimiter>>,
    mut request: Request,
    next: Next,
) -> Response {
    let ip = client_ip(&request);
    let credential = credential(&request);
    if let Err(limited) = limiter.admit(ip, &credential, Instant::now()) {
        metrics::counter!("baton_http_rate_limited_total").increment(1);
        return too_many(&limited);
    }
    let verified = AuthVerified::default();
    request.extensions_mut().insert(verified.clone());
    let response = next.run(request).await;
    limiter.record(
        ip,
        &credential,
        response.status(),
        verified.get(),
        Instant::now(),
    );
    response
}

/// A 429 answer with `Retry-After` in whole seconds (at least 1).
pub fn too_many(limited: &Limited) -> Response {
    let secs = limited.retry_after.as_secs_f64().ceil().max(1.0) as u64;
    let mut response =
        ApiError::TooManyRequests(format!("{}; retry after {secs} s", limited.message))
            .into_response();
    if let Ok(value) = secs.to_string().parse() {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    const IP: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));

    fn rate(per_second: u32, burst: u32) -> Option<Rate> {
        Rate::new(per_second, burst)
    }

    #[test]
    fn a_token_gets_its_burst_then_its_rate() {
        let limiter = RateLimiter::with_rates(rate(10, 5), None, None);
        let t0 = Instant::now();
        let token = Credential::Token(vec![1]);
        // Unknown until it authenticated once.
        limiter.admit(IP, &token, t0).expect("first");
        limiter.record(IP, &token, StatusCode::OK, true, t0);
        for _ in 0..4 {
            limiter.admit(IP, &token, t0).expect("within the burst");
        }
        let limited = limiter.admit(IP, &token, t0).expect_err("burst spent");
        assert_eq!(limited.retry_after, Duration::from_millis(100));
        limiter
            .admit(IP, &token, t0 + Duration::from_millis(100))
            .expect("refilled one");
        // A token answered without being verified (a 404 before authentication) stays unknown.
        let unverified = Credential::Token(vec![3]);
        limiter.record(IP, &unverified, StatusCode::NOT_FOUND, false, t0);
        assert!(
            !limiter
                .state
                .lock()
                .expect("lock")
                .tokens
                .map
                .contains_key(&vec![3])
        );
        // Another token is not affected.
        let other = Credential::Token(vec![2]);
        limiter.admit(IP, &other, t0).expect("other token");
    }

    #[test]
    fn failed_authentications_block_unknown_tokens_of_that_address_only() {
        let limiter = RateLimiter::with_rates(None, None, rate(1, 3));
        let t0 = Instant::now();
        let good = Credential::Token(vec![9]);
        limiter.admit(IP, &good, t0).expect("good");
        limiter.record(IP, &good, StatusCode::OK, true, t0);
        for i in 0..3u8 {
            let guess = Credential::Token(vec![i]);
            limiter.admit(IP, &guess, t0).expect("within the burst");
            limiter.record(IP, &guess, StatusCode::UNAUTHORIZED, false, t0);
        }
        let limited = limiter
            .admit(IP, &Credential::Token(vec![42]), t0)
            .expect_err("a fourth guess waits");
        assert_eq!(limited.retry_after, Duration::from_secs(1));
        // A token that authenticated before still works; other addresses are not affected.
        limiter.admit(IP, &good, t0).expect("known token");
        let elsewhere = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));
        limiter
            .admit(elsewhere, &Credential::Token(vec![42]), t0)
            .expect("other address");
        limiter
            .admit(
                IP,
                &Credential::Token(vec![42]),
                t0 + Duration::from_secs(1),
            )
            .expect("refilled");
    }

    #[test]
    fn anonymous_requests_are_limited_per_address_and_full_buckets_pruned() {
        let limiter = RateLimiter::with_rates(None, rate(1, 2), None);
        let t0 = Instant::now();
        limiter.admit(IP, &Credential::Anonymous, t0).expect("1");
        limiter.admit(IP, &Credential::Anonymous, t0).expect("2");
        assert!(limiter.admit(IP, &Credential::Anonymous, t0).is_err());
        let later = t0 + Duration::from_secs(60);
        limiter
            .admit(IP, &Credential::Anonymous, later)
            .expect("refilled");
        let state = limiter.state.lock().expect("lock");
        assert_eq!(
            state.anonymous.map.len(),
            1,
            "only the bucket in use is kept"
        );
    }

    #[test]
    fn a_verified_token_stays_known_for_a_while_after_its_bucket_refilled() {
        let limiter = RateLimiter::with_rates(rate(10, 5), None, rate(1, 1));
        let t0 = Instant::now();
        let (good, other) = (Credential::Token(vec![7]), Credential::Token(vec![9]));
        limiter.record(IP, &good, StatusCode::OK, true, t0);
        limiter.record(IP, &other, StatusCode::OK, true, t0);
        let guess = Credential::Token(vec![8]);
        // A minute later (buckets full again) a neighbour spends the address's failure budget
        // and another token's request prunes: the good token is still known.
        let later = t0 + Duration::from_secs(60);
        limiter.record(IP, &guess, StatusCode::UNAUTHORIZED, false, later);
        limiter.admit(IP, &other, later).expect("other known");
        limiter
            .admit(IP, &good, later)
            .expect("still known after a minute");
        // Unused for longer than KNOWN_TOKEN_KEPT it is forgotten (and must authenticate).
        let much_later = later + KNOWN_TOKEN_KEPT + Duration::from_secs(1);
        limiter.record(IP, &guess, StatusCode::UNAUTHORIZED, false, much_later);
        limiter.admit(IP, &other, much_later).expect("a prune pass");
        assert!(limiter.admit(IP, &good, much_later).is_err(), "forgotten");
    }

    #[test]
    fn webhook_keys_are_limited_per_key_and_unknown_keys_per_address() {
        let limiter = RateLimiter::with_rates(None, None, rate(1, 2)).with_hook_rate(rate(1, 2));
        let t0 = Instant::now();
        let key = Credential::Hook(vec![1]);
        limiter.admit(IP, &key, t0).expect("first");
        limiter.record(IP, &key, StatusCode::ACCEPTED, true, t0);
        limiter.admit(IP, &key, t0).expect("within the burst");
        let limited = limiter.admit(IP, &key, t0).expect_err("burst spent");
        assert_eq!(limited.message, "too many deliveries for this webhook");
        assert_eq!(limited.retry_after, Duration::from_secs(1));
        // Another key is not affected; unknown keys spend the address's failure budget.
        for i in 10..12u8 {
            let unknown = Credential::Hook(vec![i]);
            limiter
                .admit(IP, &unknown, t0)
                .expect("within the failure burst");
            limiter.record(IP, &unknown, StatusCode::NOT_FOUND, false, t0);
        }
        assert!(limiter.admit(IP, &Credential::Hook(vec![99]), t0).is_err());
        limiter
            .admit(IP, &key, t0 + Duration::from_secs(1))
            .expect("a known key is not held up by the address's failures");
    }

    #[test]
    fn zero_means_no_limit() {
        let limiter = RateLimiter::with_rates(rate(0, 0), rate(0, 0), rate(0, 0));
        let t0 = Instant::now();
        for _ in 0..1000 {
            limiter
                .admit(IP, &Credential::Anonymous, t0)
                .expect("anonymous");
            let t = Credential::Token(vec![1]);
            limiter.admit(IP, &t, t0).expect("token");
            limiter.record(IP, &t, StatusCode::UNAUTHORIZED, false, t0);
        }
    }
}
