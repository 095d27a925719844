//! Schedules as the API shows them.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

pub use crate::schedule::ScheduleFields as NewSchedule;

/// A stored schedule.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Schedule {
    pub id: Uuid,
    /// The event the schedule runs (null when it runs a workflow).
    pub event_id: Option<Uuid>,
    /// The workflow the schedule runs (null when it runs an event).
    pub workflow_id: Option<Uuid>,
    #[serde(flatten)]
    pub spec: NewSchedule,
    /// The next nominal fire time not yet fired (null once the schedule has ended).
    pub next_fire_at: Option<DateTime<Utc>>,
    /// The next 5 nominal fire times, RFC 3339 in the schedule's time zone (a run starts
    /// `jitter` seconds after its nominal time; its job's `scheduled_for` is the nominal time).
    pub next_runs: Vec<String>,
    /// The nominal time of the last slot fired.
    pub last_fired_at: Option<DateTime<Utc>>,
    /// This schedule's fixed offset in seconds (0 ..= `jitter_seconds`).
    pub jitter_offset_seconds: i64,
    pub revision: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A JSON merge patch (RFC 7396) over a schedule's definition, validated like a new one.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(value_type = Object)]
#[serde(transparent)]
pub struct SchedulePatch(pub serde_json::Map<String, serde_json::Value>);
