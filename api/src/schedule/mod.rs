//! Schedules: when an event runs on its own.
//!
//! [`spec`] is the pure policy (no database, no clock reads: the current time is always a
//! parameter): parsing and validating a schedule, its fire times in its time zone under the
//! DST rules, its jitter, and the `missed` policy that decides which passed slots to fire.
//! [`firing`] is the loop every replica runs to fire due schedules, exactly once each.

pub mod firing;
pub mod spec;

pub use firing::{Clock, Scheduler, SystemClock};
pub use spec::{Missed, ScheduleFields, ScheduleSpec, Slots};
