//! Log bookkeeping of one job: numbering lines, grouping them into batches, and keeping every
//! batch until the api acknowledges it.
//!
//! * [`Batcher`] (owned by the job's task) numbers lines 1, 2, 3, … and closes a batch when it
//!   reaches [`BatchLimits::max_bytes`] or [`BatchLimits::max_lines`], or
//!   [`BatchLimits::delay`] after its first line — low latency for a trickle of lines, large
//!   batches for a flood.
//! * [`Unacked`] (in the worker's shared state) holds the closed batches until a `LogAck` (or a
//!   `Welcome.resumed.stored_seq`) covers them; what is left is re-sent after a reconnect. Its
//!   byte count is what the job's back-pressure looks at.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use baton_proto::v1::{LogBatch, LogLine, Stream};
use tokio::time::Instant;

/// Bytes counted per line on top of its text (sequence number, stream, timestamp, framing).
pub const LINE_OVERHEAD_BYTES: usize = 24;

/// When a batch is closed.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Close the batch once its lines (text + [`LINE_OVERHEAD_BYTES`] each) reach this size.
    pub max_bytes: usize,
    /// Close the batch once it has this many lines.
    pub max_lines: usize,
    /// Close the batch this long after its first line.
    pub delay: Duration,
}

impl Default for BatchLimits {
    fn default() -> Self {
        BatchLimits {
            max_bytes: 256 * 1024,
            max_lines: 10_000,
            delay: Duration::from_millis(20),
        }
    }
}

/// Size of a line for batching and back-pressure.
pub fn line_cost(line: &LogLine) -> usize {
    line.text.len() + LINE_OVERHEAD_BYTES
}

/// Size of a batch's lines.
pub fn batch_cost(lines: &[LogLine]) -> usize {
    lines.iter().map(line_cost).sum()
}

/// Numbers a job's lines and groups them into batches.
#[derive(Debug)]
pub struct Batcher {
    limits: BatchLimits,
    next_seq: i64,
    lines: Vec<LogLine>,
    bytes: usize,
    deadline: Option<Instant>,
}

impl Batcher {
    /// A batcher whose first line gets sequence number 1.
    pub fn new(limits: BatchLimits) -> Self {
        Batcher {
            limits,
            next_seq: 1,
            lines: Vec::new(),
            bytes: 0,
            deadline: None,
        }
    }

    /// The same batcher numbering from `seq + 1`: the lines of a retry follow those its job's
    /// earlier attempts stored.
    pub fn continuing_after(mut self, seq: i64) -> Self {
        self.next_seq = seq.max(0) + 1;
        self
    }

    /// Adds a line (read at `now`, Unix time `ts_ms`). Returns the batch when this line
    /// completed it.
    pub fn push(
        &mut self,
        stream: Stream,
        text: String,
        ts_ms: i64,
        now: Instant,
    ) -> Option<Vec<LogLine>> {
        let line = LogLine {
            seq: self.next_seq,
            stream: stream as i32,
            text,
            ts_ms,
        };
        self.next_seq += 1;
        self.bytes += line_cost(&line);
        self.lines.push(line);
        if self.deadline.is_none() {
            self.deadline = Some(now + self.limits.delay);
        }
        if self.bytes >= self.limits.max_bytes || self.lines.len() >= self.limits.max_lines {
            self.take()
        } else {
            None
        }
    }

    /// When the open batch must be sent (`None` when no batch is open).
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Closes and returns the open batch, if it has any line.
    pub fn take(&mut self) -> Option<Vec<LogLine>> {
        self.deadline = None;
        self.bytes = 0;
        if self.lines.is_empty() {
            None
        } else {
            Some(std::mem::take(&mut self.lines))
        }
    }

    /// The sequence number of the last line numbered so far (0 when none).
    pub fn last_seq(&self) -> i64 {
        self.next_seq - 1
    }
}

/// Closed batches of one job that the api has not acknowledged yet, oldest first.
#[derive(Debug, Default)]
pub struct Unacked {
    batches: VecDeque<Arc<LogBatch>>,
    bytes: usize,
    stored_seq: i64,
}

impl Unacked {
    /// Keeps `batch` (its lines must follow the previous batch's).
    pub fn push(&mut self, batch: Arc<LogBatch>) {
        self.bytes += batch_cost(&batch.lines);
        self.batches.push_back(batch);
    }

    /// The api has stored every line up to `stored_seq`: releases them (a batch only partly
    /// covered is cut). Returns the bytes released. A number lower than an earlier one changes
    /// nothing.
    pub fn ack(&mut self, stored_seq: i64) -> usize {
        if stored_seq <= self.stored_seq {
            return 0;
        }
        self.stored_seq = stored_seq;
        let before = self.bytes;
        while let Some(front) = self.batches.front() {
            let last = front.lines.last().map_or(0, |l| l.seq);
            if last <= stored_seq {
                self.bytes -= batch_cost(&front.lines);
                self.batches.pop_front();
                continue;
            }
            let first = front.lines.first().map_or(0, |l| l.seq);
            if first <= stored_seq {
                let keep: Vec<LogLine> = front
                    .lines
                    .iter()
                    .filter(|l| l.seq > stored_seq)
                    .cloned()
                    .collect();
                self.bytes -= batch_cost(&front.lines) - batch_cost(&keep);
                let cut = LogBatch {
                    job_id: front.job_id.clone(),
                    lease_token: front.lease_token,
                    lines: keep,
                };
                self.batches[0] = Arc::new(cut);
            }
            break;
        }
        before - self.bytes
    }

    /// Bytes of the lines kept.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The highest sequence number acknowledged so far.
    pub fn stored_seq(&self) -> i64 {
        self.stored_seq
    }

    /// The batches kept, oldest first (what a reconnect re-sends).
    pub fn pending(&self) -> impl Iterator<Item = &Arc<LogBatch>> {
        self.batches.iter()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports a failure
mod tests {
    use super::*;

    fn limits(max_bytes: usize, max_lines: usize) -> BatchLimits {
        BatchLimits {
            max_bytes,
            max_lines,
            delay: Duration::from_millis(20),
        }
    }

    fn seqs(lines: &[LogLine]) -> Vec<i64> {
        lines.iter().map(|l| l.seq).collect()
    }

    fn batch(lines: Vec<LogLine>) -> Arc<LogBatch> {
        Arc::new(LogBatch {
            job_id: "j".into(),
            lease_token: 7,
            lines,
        })
    }

    #[test]
    fn numbers_lines_and_closes_on_line_count() {
        let mut b = Batcher::new(limits(1 << 20, 3));
        let now = Instant::now();
        assert_eq!(b.last_seq(), 0);
        assert!(b.deadline().is_none());
        assert!(b.push(Stream::Stdout, "a".into(), 1, now).is_none());
        assert_eq!(b.deadline(), Some(now + Duration::from_millis(20)));
        // a later line does not move the deadline
        assert!(
            b.push(
                Stream::Stderr,
                "b".into(),
                2,
                now + Duration::from_millis(5)
            )
            .is_none()
        );
        assert_eq!(b.deadline(), Some(now + Duration::from_millis(20)));
        let full = b.push(Stream::Stdout, "c".into(), 3, now).unwrap();
        assert_eq!(seqs(&full), vec![1, 2, 3]);
        assert_eq!(full[1].stream, Stream::Stderr as i32);
        assert_eq!(full[1].text, "b");
        assert!(b.deadline().is_none());
        assert!(b.take().is_none());
        assert!(b.push(Stream::Stdout, "d".into(), 4, now).is_none());
        assert_eq!(seqs(&b.take().unwrap()), vec![4]);
        assert_eq!(b.last_seq(), 4);
    }

    #[test]
    fn closes_on_bytes() {
        let mut b = Batcher::new(limits(100, 500));
        let now = Instant::now();
        let text = "x".repeat(40); // 64 bytes with overhead
        assert!(b.push(Stream::Stdout, text.clone(), 0, now).is_none());
        let full = b.push(Stream::Stdout, text.clone(), 0, now).unwrap();
        assert_eq!(full.len(), 2);
        // a single huge line is a batch on its own
        let full = b.push(Stream::Stdout, "y".repeat(1000), 0, now).unwrap();
        assert_eq!(seqs(&full), vec![3]);
    }

    #[test]
    fn large_output_makes_large_batches() {
        let mut b = Batcher::new(limits(256 * 1024, 500));
        let now = Instant::now();
        let mut batches = Vec::new();
        for i in 0..10_000 {
            if let Some(full) = b.push(Stream::Stdout, format!("line {i:>90}"), 0, now) {
                batches.push(full);
            }
        }
        batches.extend(b.take());
        assert_eq!(batches.len(), 20);
        let all: Vec<i64> = batches.iter().flat_map(|x| seqs(x)).collect();
        assert_eq!(all, (1..=10_000).collect::<Vec<_>>());
    }

    fn lines(range: std::ops::RangeInclusive<i64>) -> Vec<LogLine> {
        range
            .map(|seq| LogLine {
                seq,
                stream: Stream::Stdout as i32,
                text: "0123456789".into(),
                ts_ms: 0,
            })
            .collect()
    }

    #[test]
    fn acks_release_whole_and_partial_batches() {
        let mut u = Unacked::default();
        u.push(batch(lines(1..=3)));
        u.push(batch(lines(4..=6)));
        u.push(batch(lines(7..=7)));
        let per_line = 10 + LINE_OVERHEAD_BYTES;
        assert_eq!(u.bytes(), 7 * per_line);

        assert_eq!(u.ack(3), 3 * per_line);
        assert_eq!(u.pending().count(), 2);
        assert_eq!(u.stored_seq(), 3);

        // partial: lines 4 and 5 stored, 6 kept
        assert_eq!(u.ack(5), 2 * per_line);
        let pending: Vec<Vec<i64>> = u.pending().map(|b| seqs(&b.lines)).collect();
        assert_eq!(pending, vec![vec![6], vec![7]]);
        let first = u.pending().next().unwrap();
        assert_eq!((first.job_id.as_str(), first.lease_token), ("j", 7));

        // stale or repeated acks change nothing
        assert_eq!(u.ack(2), 0);
        assert_eq!(u.ack(5), 0);
        assert_eq!(u.bytes(), 2 * per_line);

        // an ack beyond what was sent releases everything
        assert_eq!(u.ack(100), 2 * per_line);
        assert_eq!(u.bytes(), 0);
        assert_eq!(u.pending().count(), 0);
    }

    #[test]
    fn resend_after_reconnect_starts_after_stored_seq() {
        let mut u = Unacked::default();
        u.push(batch(lines(1..=4)));
        u.push(batch(lines(5..=8)));
        // Welcome.resumed.stored_seq = 2: re-send 3..=8, in order, without gaps or repeats.
        u.ack(2);
        let resent: Vec<i64> = u.pending().flat_map(|b| seqs(&b.lines)).collect();
        assert_eq!(resent, (3..=8).collect::<Vec<_>>());
        // a reconnect that stored nothing new re-sends the same lines again
        u.ack(2);
        let again: Vec<i64> = u.pending().flat_map(|b| seqs(&b.lines)).collect();
        assert_eq!(again, resent);
    }
}
