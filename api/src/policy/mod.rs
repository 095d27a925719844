//! Run policies of events, as pure decisions (no database, no clock): the group a new run
//! belongs to and how it enters it ([`concurrency`]). The SQL that applies them lives in
//! `storage::concurrency` and the claim (`claim_jobs`, migration 0018); the orchestration
//! (lock, decide, apply, fire actions) in `crate::admission`.

pub mod concurrency;
