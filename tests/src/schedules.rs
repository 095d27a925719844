//! Helpers for the schedule tests: waiting on database conditions with a deadline, and
//! reading the fired slots.

use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

/// Polls `check` until it returns `Some`, failing the test with `what` after `within`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The nominal fire times of a schedule's jobs, oldest first (with any duplicates).
pub async fn fired_slots(pool: &PgPool, schedule_id: Uuid) -> Vec<DateTime<Utc>> {
    sqlx::query_scalar(
        "SELECT scheduled_for FROM jobs WHERE schedule_id = $1 ORDER BY scheduled_for",
    )
    .bind(schedule_id)
    .fetch_all(pool)
    .await
    .expect("read fired slots")
}
