//! Job output, stored as chunks: one row per batch of lines a worker sent, never a row per line.
//!
//! Lines carry per-job sequence numbers assigned by the worker. A batch must continue the
//! stored sequence (`jobs.last_log_seq`): lines at or below it are a re-send after a reconnect
//! and are skipped, so nothing is stored twice; a gap is refused so nothing is silently lost.
//! Past the per-job byte cap a marker line is stored and the rest is only counted.
//!
//! A chunk is stored in the encoding workers send (`baton_proto::logchunk`, column `chunk`);
//! rows written before migration 0005 hold a JSON array in `lines`, and are read as well.

use baton_proto::logchunk::{self, ChunkWriter, Summary};
use baton_proto::v1::Stream;
use chrono::DateTime;
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

use super::{Result, StorageError};
use crate::model::LogLine;

/// Consecutive lines `first_seq ..` of a job, encoded and checked (see
/// `crate::grpc::log_batch`).
#[derive(Debug, Clone)]
pub struct NewChunk {
    pub first_seq: i64,
    pub data: Vec<u8>,
    pub summary: Summary,
}

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
    chunk: &NewChunk,
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
    let unchanged = Appended {
        stored_seq,
        new_lines: 0,
        dropped_lines: 0,
    };
    let lines = chunk.summary.lines as i64;
    let last_seq = chunk.first_seq.saturating_add(lines - 1);
    if lines == 0 || last_seq <= stored_seq {
        return Ok(unchanged);
    }
    if chunk.first_seq > stored_seq + 1 {
        return Err(StorageError::LogGap {
            job_id,
            expected: stored_seq + 1,
            got: chunk.first_seq,
        });
    }
    // Lines at or below stored_seq are a re-send: skip them.
    let resent = (stored_seq + 1 - chunk.first_seq) as usize;
    let fresh: std::borrow::Cow<'_, [u8]> = if resent == 0 {
        std::borrow::Cow::Borrowed(&chunk.data)
    } else {
        std::borrow::Cow::Owned(logchunk::skip(&chunk.data, resent).map_err(decode_error)?)
    };
    let first_seq = stored_seq + 1;
    let new_lines = (last_seq - stored_seq) as usize;
    let fresh_bytes = if resent == 0 {
        chunk.summary.text_bytes as i64
    } else {
        logchunk::validate(&fresh).map_err(decode_error)?.text_bytes as i64
    };

    // Keep what fits under the cap; the first line that does not becomes the marker.
    let (kept, kept_lines, kept_bytes, new_bytes, dropped) =
        if stored_bytes >= 0 && stored_bytes + fresh_bytes <= cap_bytes {
            (
                fresh,
                new_lines,
                fresh_bytes,
                stored_bytes + fresh_bytes,
                (0, 0),
            )
        } else {
            let capped = cap(&fresh, stored_bytes, cap_bytes).map_err(decode_error)?;
            let kept_lines = capped.kept_lines;
            // Once over, log_bytes is pinned just above the cap so later batches drop at once.
            let kept = std::borrow::Cow::Owned(capped.kept);
            (
                kept,
                kept_lines,
                capped.kept_bytes,
                cap_bytes + 1,
                capped.dropped,
            )
        };
    if kept_lines > 0 {
        let kept_last = first_seq + kept_lines as i64 - 1;
        sqlx::query(
            "INSERT INTO job_logs (job_id, first_seq, last_seq, chunk, bytes) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(job_id)
        .bind(first_seq)
        .bind(kept_last)
        .bind(&*kept)
        .bind(i32::try_from(kept_bytes).unwrap_or(i32::MAX))
        .execute(&mut *conn)
        .await?;
    }
    sqlx::query(
        "UPDATE jobs SET last_log_seq = $2, log_bytes = $3,
             log_lines_dropped = log_lines_dropped + $4, log_bytes_dropped = log_bytes_dropped + $5,
             lease_expires_at = now() + $6 * interval '1 millisecond', heartbeat_at = now(),
             active_at = now(), stuck = false
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
        new_lines,
        dropped_lines: dropped.0,
    })
}

/// What [`cap`] kept and dropped.
struct Capped {
    kept: Vec<u8>,
    /// Lines in `kept` (the marker included).
    kept_lines: usize,
    kept_bytes: i64,
    /// Lines and bytes dropped.
    dropped: (usize, i64),
}

/// The lines of `fresh` that fit under `cap_bytes` after `stored_bytes` (above the cap: it was
/// reached before), then the truncation marker in place of the first line that does not.
fn cap(
    fresh: &[u8],
    stored_bytes: i64,
    cap_bytes: i64,
) -> std::result::Result<Capped, logchunk::ChunkError> {
    // Past the cap already (log_bytes is pinned at cap + 1): drop everything, no new marker.
    let mut bytes = if stored_bytes > cap_bytes {
        -1
    } else {
        stored_bytes
    };
    let mut dropped = (0usize, 0i64);
    let mut it = logchunk::lines(fresh);
    let mut kept_end = 0;
    let mut kept_summary = Summary::default();
    let mut marker_ts = None;
    while let Some(line) = it.next() {
        let line = line?;
        let len = line.text.len() as i64;
        if bytes < 0 || bytes + len > cap_bytes {
            if bytes >= 0 {
                marker_ts = Some(line.ts_ms);
                bytes = -1;
            }
            dropped.0 += 1;
            dropped.1 += len;
        } else {
            bytes += len;
            kept_end = it.position();
            kept_summary.lines += 1;
            kept_summary.text_bytes += line.text.len();
            kept_summary.last_ts_ms = line.ts_ms;
        }
    }
    let mut writer = ChunkWriter::resume(fresh[..kept_end].to_vec(), kept_summary);
    if let Some(ts) = marker_ts {
        writer.push(Stream::System, ts, &truncation_marker(cap_bytes));
    }
    let summary = writer.summary();
    Ok(Capped {
        kept_lines: summary.lines,
        kept: writer.into_bytes(),
        kept_bytes: summary.text_bytes as i64,
        dropped,
    })
}

fn decode_error(e: logchunk::ChunkError) -> StorageError {
    StorageError::Database(sqlx::Error::Decode(Box::new(e)))
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
    let chunks: Vec<(i64, Option<String>, Option<Vec<u8>>)> = sqlx::query_as(
        "SELECT first_seq, lines, chunk FROM job_logs
         WHERE job_id = $1 AND last_seq > $2 AND first_seq <= $2 + $3
         ORDER BY first_seq",
    )
    .bind(job_id)
    .bind(after)
    .bind(i64::try_from(max_lines).unwrap_or(i64::MAX))
    .fetch_all(db)
    .await?;
    let mut lines = Vec::new();
    for (first_seq, json, chunk) in chunks {
        if let Some(chunk) = chunk {
            for (seq, line) in (first_seq..).zip(logchunk::lines(&chunk)) {
                let line = line.map_err(decode_error)?;
                if seq > after {
                    if lines.len() >= max_lines {
                        return Ok(lines);
                    }
                    lines.push(LogLine {
                        seq,
                        stream: stream_name(line.stream).to_owned(),
                        text: line.text.to_owned(),
                        ts: DateTime::from_timestamp_millis(line.ts_ms).unwrap_or_default(),
                    });
                }
            }
            continue;
        }
        // A row from before migration 0005: a JSON array of lines.
        let parsed: Vec<LogLine> = serde_json::from_str(json.as_deref().unwrap_or("[]"))
            .map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
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

/// The name clients see for a stream.
fn stream_name(stream: Stream) -> &'static str {
    match stream {
        Stream::Stderr => "stderr",
        Stream::System => "system",
        Stream::Stdout | Stream::Unspecified => "stdout",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports a failure
mod tests {
    use super::*;

    fn chunk(texts: &[&str]) -> Vec<u8> {
        let mut w = ChunkWriter::default();
        for (i, t) in texts.iter().enumerate() {
            w.push(Stream::Stdout, i as i64, t);
        }
        w.into_bytes()
    }

    fn decoded(data: &[u8]) -> Vec<(Stream, i64, String)> {
        logchunk::lines(data)
            .map(|l| {
                let l = l.unwrap();
                (l.stream, l.ts_ms, l.text.to_owned())
            })
            .collect()
    }

    #[test]
    fn cap_keeps_what_fits_then_a_marker() {
        let fresh = chunk(&["aaaa", "bbbb", "cccc", "dd"]);
        let capped = cap(&fresh, 3, 10).unwrap();
        let lines = decoded(&capped.kept);
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0], (Stream::Stdout, 0, "aaaa".to_owned()));
        assert_eq!(lines[1], (Stream::System, 1, truncation_marker(10)));
        assert_eq!(capped.dropped, (3, 10));
        assert_eq!(capped.kept_bytes, 4 + truncation_marker(10).len() as i64);
        assert_eq!(capped.kept_lines, 2);

        // already over the cap (pinned at cap + 1): everything is dropped, no second marker
        let capped = cap(&fresh, 11, 10).unwrap();
        assert!(capped.kept.is_empty());
        assert_eq!(capped.kept_lines, 0);
        assert_eq!(capped.dropped, (4, 14));
    }
}
