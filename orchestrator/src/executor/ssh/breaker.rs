//! A per-server circuit breaker for connection attempts.
//!
//! * **Closed**: connections are attempted. Each failure to reach the server (DNS, refused,
//!   timeout, handshake error) adds to a count that any success resets.
//! * **Open**: after [`BreakerConfig::failure_threshold`] consecutive failures, runs fail at once
//!   with [`SshError::CircuitOpen`](super::SshError::CircuitOpen), without touching the network,
//!   for [`BreakerConfig::cooldown`].
//! * **Half-open**: after the cool-down, exactly one run's connection attempt is let through as a
//!   probe (the others keep failing fast). Its success closes the circuit; its failure opens it
//!   for another cool-down. A probe abandoned half-way (its run was cancelled) lets the next run
//!   probe instead.
//!
//! Authentication failures and host key mismatches do not count as failures: the server was
//! reached, and those errors are reported as they are.

use std::time::Duration;

use tokio::time::Instant;

/// Parameters of the circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive connection failures that open the circuit (at least 1).
    pub failure_threshold: u32,
    /// How long the circuit stays open before a probe is allowed.
    pub cooldown: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failure_threshold: 3,
            cooldown: Duration::from_secs(30),
        }
    }
}

/// Observable state of a breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BreakerState {
    /// Connections are attempted.
    Closed,
    /// Runs fail fast until the cool-down ends.
    Open,
    /// One probe connection may be (or is being) attempted.
    HalfOpen,
}

#[derive(Debug, Clone, Copy)]
enum Inner {
    Closed,
    Open { until: Instant },
    HalfOpen { probing: bool },
}

/// What the breaker allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    /// An ordinary attempt (circuit closed).
    Normal,
    /// The single half-open probe: report its result, or [`Breaker::abandon_probe`].
    Probe,
}

/// Why the breaker refused an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub failures: u32,
    pub last_error: String,
    pub retry_in: Duration,
}

#[derive(Debug)]
pub(crate) struct Breaker {
    config: BreakerConfig,
    inner: Inner,
    failures: u32,
    last_error: String,
}

impl Breaker {
    pub(crate) fn new(config: BreakerConfig) -> Self {
        Breaker {
            config,
            inner: Inner::Closed,
            failures: 0,
            last_error: String::new(),
        }
    }

    pub(crate) fn config(&self) -> BreakerConfig {
        self.config
    }

    pub(crate) fn state(&self) -> BreakerState {
        match self.inner {
            Inner::Closed => BreakerState::Closed,
            Inner::Open { .. } => BreakerState::Open,
            Inner::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Consecutive failures counted so far.
    pub(crate) fn failures(&self) -> u32 {
        self.failures
    }

    /// Asks to attempt a connection at `now`.
    pub(crate) fn admit(&mut self, now: Instant) -> Result<Admission, Refusal> {
        match self.inner {
            Inner::Closed => Ok(Admission::Normal),
            Inner::Open { until } if now < until => Err(self.refusal(until - now)),
            Inner::Open { .. } | Inner::HalfOpen { probing: false } => {
                self.inner = Inner::HalfOpen { probing: true };
                Ok(Admission::Probe)
            }
            Inner::HalfOpen { probing: true } => Err(self.refusal(Duration::ZERO)),
        }
    }

    fn refusal(&self, retry_in: Duration) -> Refusal {
        Refusal {
            failures: self.failures,
            last_error: self.last_error.clone(),
            retry_in,
        }
    }

    /// The server was reached.
    pub(crate) fn success(&mut self) {
        self.failures = 0;
        self.inner = Inner::Closed;
    }

    /// An attempt failed to reach the server at `now`.
    pub(crate) fn failure(&mut self, now: Instant, error: &str) {
        self.failures = self.failures.saturating_add(1);
        self.last_error = error.to_owned();
        let open = match self.inner {
            Inner::HalfOpen { .. } | Inner::Open { .. } => true,
            Inner::Closed => self.failures >= self.config.failure_threshold.max(1),
        };
        if open {
            self.inner = Inner::Open {
                until: now + self.config.cooldown,
            };
        }
    }

    /// The probe ended without a verdict (its run was cancelled): the next attempt probes.
    pub(crate) fn abandon_probe(&mut self) {
        if let Inner::HalfOpen { probing: true } = self.inner {
            self.inner = Inner::HalfOpen { probing: false };
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports a failure
mod tests {
    use super::*;

    fn breaker() -> Breaker {
        Breaker::new(BreakerConfig {
            failure_threshold: 3,
            cooldown: Duration::from_secs(10),
        })
    }

    #[test]
    fn opens_after_consecutive_failures_only() {
        let t0 = Instant::now();
        let mut b = breaker();
        for _ in 0..2 {
            assert_eq!(b.admit(t0), Ok(Admission::Normal));
            b.failure(t0, "refused");
        }
        b.success();
        assert_eq!(b.failures(), 0);
        for _ in 0..2 {
            b.failure(t0, "refused");
            assert_eq!(b.state(), BreakerState::Closed);
        }
        b.failure(t0, "refused");
        assert_eq!(b.state(), BreakerState::Open);
        let refusal = b.admit(t0 + Duration::from_secs(4)).unwrap_err();
        assert_eq!(refusal.failures, 3);
        assert_eq!(refusal.last_error, "refused");
        assert_eq!(refusal.retry_in, Duration::from_secs(6));
    }

    #[test]
    fn half_open_lets_one_probe_through() {
        let t0 = Instant::now();
        let mut b = breaker();
        for _ in 0..3 {
            b.failure(t0, "down");
        }
        let later = t0 + Duration::from_secs(10);
        assert_eq!(b.admit(later), Ok(Admission::Probe));
        assert_eq!(b.state(), BreakerState::HalfOpen);
        // others fail fast while the probe is out
        assert_eq!(b.admit(later).unwrap_err().retry_in, Duration::ZERO);
        // a failed probe re-opens for a full cool-down
        b.failure(later, "still down");
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.admit(later + Duration::from_secs(9)).is_err());
        let again = later + Duration::from_secs(10);
        assert_eq!(b.admit(again), Ok(Admission::Probe));
        b.success();
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.admit(again), Ok(Admission::Normal));
    }

    #[test]
    fn abandoned_probe_hands_over() {
        let t0 = Instant::now();
        let mut b = Breaker::new(BreakerConfig {
            failure_threshold: 1,
            cooldown: Duration::ZERO,
        });
        b.failure(t0, "x");
        assert_eq!(b.admit(t0), Ok(Admission::Probe));
        assert!(b.admit(t0).is_err());
        b.abandon_probe();
        assert_eq!(b.admit(t0), Ok(Admission::Probe));
    }
}
