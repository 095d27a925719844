//! Jobs through the whole system: a real api, real workers (in-process, or separate processes
//! where a test kills them), real processes — and nothing lost when things fail.

mod chains;
mod chaos;
mod container;
mod container_reaping;
mod failover;
mod hostile;
mod job_controls;
mod observability;
mod policies;
mod reports;
mod runs;
mod secret_refs;
mod ssh;
mod support;
mod tls;
mod traces;
mod upgrade;
mod worker_tokens;
mod workflows;
mod workflows_chaos;
