//! Workflows: DAGs of steps, each running an event, with fan-out (`for_each`), fan-in
//! (`needs` several steps), CEL conditions and input mappings.
//!
//! - [`dag`]: the graph's rules as pure functions (validation, readiness, skips, outcome).
//! - [`expr`]: CEL compiling (with the names an expression uses) and evaluation over JSON.
//! - [`validate`]: a definition's checks before it is stored (422 naming step and field).
//! - [`engine`]: what happens in the database — a run starts, a step's job ends, a run is
//!   cancelled or retried — always under the run's row lock, in the caller's transaction.

pub mod dag;
pub mod engine;
pub mod expr;
pub mod validate;
