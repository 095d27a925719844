//! Job output, stored as chunks: one row per batch of lines a worker sent, never a row per line.
//!
//! Lines carry per-job sequence numbers assigned by the worker. A batch must continue the
//! stored sequence (`jobs.last_log_seq`): lines at or below it are a re-send after a reconnect
//! and are skipped, so nothing is stored twice; a gap is refused so nothing is silently lost.
//! Past the per-job byte cap a marker line is stored and the rest is only counted.

use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

use super::{Result, StorageError};
use crate::model::LogLine;

/// What storing a batch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Every line up to this number is now stored (or counted, past the cap).
    pub stored_seq: i64,
    /// Lines of this batch that were new (not a re-send).
    pub new_lines: usize,
    /// Lines of this batch dropped because the cap was reached.
    pub dropped_lines: usize,
}

/// The line stored in place of the first line over the cap.
pub fn truncation_marker(cap_bytes: i64) -> String {
    format!(
        "[baton: output truncated: this job reached its log limit of {} bytes; further lines are counted, not kept]",
        cap_bytes
    )
}

/// Appends a batch for a job whose lease `token` holds, and renews that lease: output flowing
/// in proves the worker alive even when its heartbeat waits behind a flood of log batches.
/// Runs in the caller's transaction.
pub async fn append_batch(
    conn: &mut PgConnection,
    job_id: Uuid,
    token: i64,
    lines: &[LogLine],
    cap_bytes: i64,
    lease: std::time::Duration,
) -> Result<Appended> {
    let state: Option<(i64, i64)> = sqlx::query_as(
        "SELECT last_log_seq, log_bytes FROM jobs
         WHERE id = $1 AND lease_token = $2 AND lease_expires_at > now() FOR UPDATE",
    )
    .bind(job_id)
    .bind(token)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((stored_seq, stored_bytes)) = state else {
        return Err(super::queue::lease_lost_or_missing(conn, job_id).await);
    };
    let fresh: Vec<&LogLine> = lines.iter().filter(|l| l.seq > stored_seq).collect();
    let Some(first) = fresh.first() else {
        return Ok(Appended {
            stored_seq,
            new_lines: 0,
            dropped_lines: 0,
        });
    };
    if first.seq != stored_seq + 1 || fresh.windows(2).any(|w| w[1].seq != w[0].seq + 1) {
        return Err(StorageError::LogGap {
            job_id,
            expected: stored_seq + 1,
            got: first.seq,
        });
    }
    let last_seq = fresh.last().map_or(stored_seq, |l| l.seq);

    // Keep what fits under the cap; the first line that does not becomes the marker.
    let mut kept: Vec<LogLine> = Vec::with_capacity(fresh.len());
    let mut bytes = stored_bytes;
    let mut dropped = (0usize, 0i64);
    for line in &fresh {
        let len = line.text.len() as i64;
        if bytes < 0 || bytes + len > cap_bytes {
            if bytes >= 0 {
                kept.push(LogLine {
                    seq: line.seq,
                    stream: "system".into(),
                    text: truncation_marker(cap_bytes),
                    ts: line.ts,
                });
                // Past the cap for good: a negative running total marks it.
                bytes = -1;
            }
            dropped.0 += 1;
            dropped.1 += len;
        } else {
            bytes += len;
            kept.push((*line).clone());
        }
    }
    if let (Some(first_kept), Some(last_kept)) = (kept.first(), kept.last()) {
        let kept_bytes: i64 = kept.iter().map(|l| l.text.len() as i64).sum();
        let text = serde_json::to_string(&kept).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
        sqlx::query(
            "INSERT INTO job_logs (job_id, first_seq, last_seq, lines, bytes) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(job_id)
        .bind(first_kept.seq)
        .bind(last_kept.seq)
        .bind(text)
        .bind(i32::try_from(kept_bytes).unwrap_or(i32::MAX))
        .execute(&mut *conn)
        .await?;
    }
    let new_bytes = if bytes < 0 {
        // Once over, log_bytes is pinned just above the cap so later batches drop at once.
        cap_bytes + 1
    } else {
        bytes
    };
    sqlx::query(
        "UPDATE jobs SET last_log_seq = $2, log_bytes = $3,
             log_lines_dropped = log_lines_dropped + $4, log_bytes_dropped = log_bytes_dropped + $5,
             lease_expires_at = now() + $6 * interval '1 millisecond', heartbeat_at = now()
         WHERE id = $1",
    )
    .bind(job_id)
    .bind(last_seq)
    .bind(new_bytes)
    .bind(dropped.0 as i64)
    .bind(dropped.1)
    .bind(i64::try_from(lease.as_millis()).unwrap_or(i64::MAX))
    .execute(&mut *conn)
    .await?;
    Ok(Appended {
        stored_seq: last_seq,
        new_lines: fresh.len(),
        dropped_lines: dropped.0,
    })
}

/// The last line number stored for a job (0 when none).
pub async fn stored_seq(db: impl PgExecutor<'_>, job_id: Uuid) -> Result<i64> {
    let seq: Option<i64> = sqlx::query_scalar("SELECT last_log_seq FROM jobs WHERE id = $1")
        .bind(job_id)
        .fetch_optional(db)
        .await?;
    seq.ok_or(StorageError::JobNotFound(job_id))
}

/// Up to `max_lines` lines with `seq > after`, in order.
pub async fn lines_after(
    db: impl PgExecutor<'_>,
    job_id: Uuid,
    after: i64,
    max_lines: usize,
) -> Result<Vec<LogLine>> {
    // Sequence numbers are contiguous, so the lines wanted lie in chunks starting at or before
    // after + max_lines: read only those (not every chunk after the cursor).
    let chunks: Vec<String> = sqlx::query_scalar(
        "SELECT lines FROM job_logs WHERE job_id = $1 AND last_seq > $2 AND first_seq <= $2 + $3
         ORDER BY first_seq",
    )
    .bind(job_id)
    .bind(after)
    .bind(i64::try_from(max_lines).unwrap_or(i64::MAX))
    .fetch_all(db)
    .await?;
    let mut lines = Vec::new();
    for chunk in chunks {
        let parsed: Vec<LogLine> =
            serde_json::from_str(&chunk).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
        for line in parsed {
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
