#![forbid(unsafe_code)]
//! Baton's worker (`baton-worker`).
//!
//! The worker holds a gRPC stream to an api replica, receives jobs, runs them with an executor
//! and reports logs, progress and results. Its [`executor`] module is the reusable execution
//! engine (run a command or script, stream its output as events, cancel it, time it out) and
//! can be used without the rest of Baton.

pub mod executor;
