//! # baton-testkit
//!
//! Fixtures shared by Baton's tests and benchmarks, so that each exists once: the integration
//! tests of `baton-worker` (`orchestrator/tests/`), the end-to-end tests of `baton-tests` and
//! the benchmarks of `baton-bench` all depend on this crate rather than copying or `#[path]`-
//! including files from one another.
//!
//! - [`sshd`]: a private OpenSSH server on 127.0.0.1 with generated keys.
//!
//! These are fixtures: they panic with a descriptive message when the environment cannot
//! provide what they need (a missing `sshd` binary, no free port), which is how a test or a
//! benchmark reports that it could not run.
#![forbid(unsafe_code)]

pub mod sshd;
