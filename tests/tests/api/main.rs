//! End-to-end tests of the api against a real PostgreSQL: the queue's guarantees, and every
//! REST endpoint including authentication, authorization and bad input.
//! One binary (modules below) so the suite links once and shares one cluster.

mod auth;
mod chains;
mod credentials;
mod dashboard;
mod events;
mod health;
mod jobs;
mod limits;
mod live_logs;
mod policies;
mod protocol;
mod queue;
mod retention;
mod schedules;
mod servers;
mod terminal;
mod upgrades;
mod variables;
mod webhooks;
mod worker_reports;
mod worker_tokens;
mod workflows;
