//! Job output, stored as chunks: one row per batch of lines a worker sent.

use sqlx::{PgExecutor, types::Json};
use uuid::Uuid;

use super::Result;
use crate::model::LogLine;

/// Stores one batch of lines. A batch the worker re-sends after a reconnect has the same
/// `first_seq` and is ignored, so no line is stored twice. Returns whether it was new.
pub async fn append_chunk(
    db: impl PgExecutor<'_>,
    job_id: Uuid,
    lines: &[LogLine],
) -> Result<bool> {
    let (Some(first), Some(last)) = (lines.first(), lines.last()) else {
        return Ok(false);
    };
    let bytes: usize = lines.iter().map(|l| l.text.len()).sum();
    let done = sqlx::query(
        "INSERT INTO job_logs (job_id, first_seq, last_seq, lines, bytes) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (job_id, first_seq) DO NOTHING",
    )
    .bind(job_id)
    .bind(first.seq)
    .bind(last.seq)
    .bind(Json(lines))
    .bind(i32::try_from(bytes).unwrap_or(i32::MAX))
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Up to about `max_lines` lines with `seq > after`, in order.
pub async fn lines_after(
    db: impl PgExecutor<'_>,
    job_id: Uuid,
    after: i64,
    max_lines: usize,
) -> Result<Vec<LogLine>> {
    // Chunks hold many lines each, so fetching max_lines chunks is always enough.
    let chunks: Vec<Json<Vec<LogLine>>> = sqlx::query_scalar(
        "SELECT lines FROM job_logs WHERE job_id = $1 AND last_seq > $2 ORDER BY first_seq LIMIT $3",
    )
    .bind(job_id)
    .bind(after)
    .bind(i64::try_from(max_lines).unwrap_or(i64::MAX))
    .fetch_all(db)
    .await?;
    let mut lines = Vec::new();
    for chunk in chunks {
        for line in chunk.0 {
            if line.seq > after {
                if lines.len() >= max_lines {
                    return Ok(lines);
                }
                lines.push(line);
            }
        }
    }
    Ok(lines)
}
