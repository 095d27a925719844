//! Log bookkeeping of one job: numbering lines, grouping them into batches, and keeping every
//! batch until the api acknowledges it.
//!
//! * [`Batcher`] (owned by the job's task) numbers lines 1, 2, 3, … and encodes them straight
//!   into a chunk (`baton_proto::logchunk`: no message or allocation per line); it closes a
//!   batch when it reaches [`BatchLimits::max_bytes`] or [`BatchLimits::max_lines`], or
//!   [`BatchLimits::delay`] after its first line — low latency for a trickle of lines, large
//!   batches for a flood.
//! * [`Unacked`] (in the worker's shared state) holds the closed batches until a `LogAck` (or a
//!   `Welcome.resumed.stored_seq`) covers them; what is left is re-sent after a reconnect. Its
//!   byte count is what the job's back-pressure looks at.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use baton_proto::logchunk::{self, ChunkWriter};
use baton_proto::v1::{LogBatch, Stream};
use tokio::time::Instant;

/// Bytes counted per line on top of its encoded size, for batching and back-pressure (what
/// the line costs beyond its bytes: the api's and the database's work per line).
pub const LINE_OVERHEAD_BYTES: usize = 8;

/// When a batch is closed.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Close the batch once its lines (encoded, + [`LINE_OVERHEAD_BYTES`] each) reach this size.
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

/// A closed batch: lines `first_seq ..= last_seq()`, encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub first_seq: i64,
    pub lines: usize,
    pub data: Vec<u8>,
}

impl Chunk {
    pub fn last_seq(&self) -> i64 {
        self.first_seq + self.lines as i64 - 1
    }
}

/// Size of a batch for batching and back-pressure.
fn cost(encoded: usize, lines: usize) -> usize {
    encoded + lines * LINE_OVERHEAD_BYTES
}

/// Numbers a job's lines and groups them into batches.
#[derive(Debug)]
pub struct Batcher {
    limits: BatchLimits,
    next_seq: i64,
    writer: ChunkWriter,
    deadline: Option<Instant>,
}

impl Batcher {
    /// A batcher whose first line gets sequence number 1.
    pub fn new(limits: BatchLimits) -> Self {
        Batcher {
            limits,
            next_seq: 1,
            writer: ChunkWriter::default(),
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
    pub fn push(&mut self, stream: Stream, text: &str, ts_ms: i64, now: Instant) -> Option<Chunk> {
        if self.writer.is_empty() {
            // Small to start with: a trickle of lines makes small batches, kept until
            // acknowledged; a flood grows the buffer by doubling.
            self.writer = ChunkWriter::with_capacity(4096);
        }
        self.writer.push(stream, ts_ms, text);
        self.next_seq += 1;
        if self.deadline.is_none() {
            self.deadline = Some(now + self.limits.delay);
        }
        let lines = self.writer.summary().lines;
        if cost(self.writer.encoded_len(), lines) >= self.limits.max_bytes
            || lines >= self.limits.max_lines
        {
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
    pub fn take(&mut self) -> Option<Chunk> {
        self.deadline = None;
        if self.writer.is_empty() {
            return None;
        }
        let lines = self.writer.summary().lines;
        Some(Chunk {
            first_seq: self.next_seq - lines as i64,
            lines,
            data: self.writer.take(),
        })
    }

    /// The sequence number of the last line numbered so far (0 when none).
    pub fn last_seq(&self) -> i64 {
        self.next_seq - 1
    }
}

/// A sent batch awaiting its acknowledgement.
#[derive(Debug)]
struct Pending {
    batch: Arc<LogBatch>,
    last_seq: i64,
    cost: usize,
}

/// Closed batches of one job that the api has not acknowledged yet, oldest first.
#[derive(Debug, Default)]
pub struct Unacked {
    batches: VecDeque<Pending>,
    bytes: usize,
    stored_seq: i64,
}

impl Unacked {
    /// Keeps `batch`, which holds `chunk`'s lines (they must follow the previous batch's).
    pub fn push(&mut self, batch: Arc<LogBatch>, chunk_lines: usize) {
        let cost = cost(batch.chunk.len(), chunk_lines);
        self.bytes += cost;
        self.batches.push_back(Pending {
            last_seq: batch.first_seq + chunk_lines as i64 - 1,
            batch,
            cost,
        });
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
        while let Some(front) = self.batches.front_mut() {
            if front.last_seq <= stored_seq {
                self.bytes -= front.cost;
                self.batches.pop_front();
                continue;
            }
            let first = front.batch.first_seq;
            if first <= stored_seq {
                let skip = (stored_seq - first + 1) as usize;
                // Our own chunk always decodes; were it not to, re-sending it whole is still
                // right (the api skips lines it has).
                if let Ok(rest) = logchunk::skip(&front.batch.chunk, skip) {
                    let lines = (front.last_seq - stored_seq) as usize;
                    let cut = LogBatch {
                        job_id: front.batch.job_id.clone(),
                        lease_token: front.batch.lease_token,
                        lines: Vec::new(),
                        first_seq: stored_seq + 1,
                        chunk: rest,
                    };
                    let cost = cost(cut.chunk.len(), lines);
                    self.bytes = self.bytes - front.cost + cost;
                    front.cost = cost;
                    front.batch = Arc::new(cut);
                }
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

    /// Lines kept.
    pub fn lines(&self) -> usize {
        self.batches
            .iter()
            .map(|p| (p.last_seq - p.batch.first_seq + 1) as usize)
            .sum()
    }

    /// The batches kept, oldest first (what a reconnect re-sends).
    pub fn pending(&self) -> impl Iterator<Item = &Arc<LogBatch>> {
        self.batches.iter().map(|p| &p.batch)
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

    fn decoded(data: &[u8]) -> Vec<(Stream, i64, String)> {
        logchunk::lines(data)
            .map(|l| {
                let l = l.unwrap();
                (l.stream, l.ts_ms, l.text.to_owned())
            })
            .collect()
    }

    fn seqs(chunk: &Chunk) -> Vec<i64> {
        (chunk.first_seq..=chunk.last_seq()).collect()
    }

    #[test]
    fn numbers_lines_and_closes_on_line_count() {
        let mut b = Batcher::new(limits(1 << 20, 3));
        let now = Instant::now();
        assert_eq!(b.last_seq(), 0);
        assert!(b.deadline().is_none());
        assert!(b.push(Stream::Stdout, "a", 1, now).is_none());
        assert_eq!(b.deadline(), Some(now + Duration::from_millis(20)));
        // a later line does not move the deadline
        assert!(
            b.push(Stream::Stderr, "b", 2, now + Duration::from_millis(5))
                .is_none()
        );
        assert_eq!(b.deadline(), Some(now + Duration::from_millis(20)));
        let full = b.push(Stream::Stdout, "c", 3, now).unwrap();
        assert_eq!(seqs(&full), vec![1, 2, 3]);
        assert_eq!(
            decoded(&full.data),
            vec![
                (Stream::Stdout, 1, "a".to_owned()),
                (Stream::Stderr, 2, "b".to_owned()),
                (Stream::Stdout, 3, "c".to_owned())
            ]
        );
        assert!(b.deadline().is_none());
        assert!(b.take().is_none());
        assert!(b.push(Stream::Stdout, "d", 4, now).is_none());
        assert_eq!(seqs(&b.take().unwrap()), vec![4]);
        assert_eq!(b.last_seq(), 4);
    }

    #[test]
    fn closes_on_bytes() {
        let mut b = Batcher::new(limits(100, 500));
        let now = Instant::now();
        let text = "x".repeat(40); // 43 encoded + 8 overhead
        assert!(b.push(Stream::Stdout, &text, 0, now).is_none());
        let full = b.push(Stream::Stdout, &text, 0, now).unwrap();
        assert_eq!(full.lines, 2);
        // a single huge line is a batch on its own
        let full = b.push(Stream::Stdout, &"y".repeat(1000), 0, now).unwrap();
        assert_eq!(seqs(&full), vec![3]);
    }

    #[test]
    fn large_output_makes_large_batches() {
        let mut b = Batcher::new(limits(256 * 1024, 500));
        let now = Instant::now();
        let mut batches = Vec::new();
        for i in 0..10_000 {
            if let Some(full) = b.push(Stream::Stdout, &format!("line {i:>90}"), 0, now) {
                batches.push(full);
            }
        }
        batches.extend(b.take());
        assert_eq!(batches.len(), 20);
        let all: Vec<i64> = batches.iter().flat_map(seqs).collect();
        assert_eq!(all, (1..=10_000).collect::<Vec<_>>());
        let texts: Vec<String> = batches
            .iter()
            .flat_map(|c| decoded(&c.data))
            .map(|l| l.2)
            .collect();
        assert_eq!(texts[9_999], format!("line {:>90}", 9_999));
    }

    /// Lines `range` as one batch (text "0123456789", ts = seq).
    fn batch(range: std::ops::RangeInclusive<i64>) -> (Arc<LogBatch>, usize) {
        let mut w = ChunkWriter::default();
        for seq in range.clone() {
            w.push(Stream::Stdout, seq, "0123456789");
        }
        let lines = w.summary().lines;
        let batch = Arc::new(LogBatch {
            job_id: "j".into(),
            lease_token: 7,
            lines: Vec::new(),
            first_seq: *range.start(),
            chunk: w.into_bytes(),
        });
        (batch, lines)
    }

    fn pending_seqs(u: &Unacked) -> Vec<Vec<i64>> {
        u.pending()
            .map(|b| {
                let ts: Vec<i64> = decoded(&b.chunk).iter().map(|l| l.1).collect();
                // ts = seq by construction: the chunk really holds the lines it claims
                let seqs: Vec<i64> = (b.first_seq..b.first_seq + ts.len() as i64).collect();
                assert_eq!(ts, seqs);
                seqs
            })
            .collect()
    }

    #[test]
    fn acks_release_whole_and_partial_batches() {
        let mut u = Unacked::default();
        for range in [1..=3, 4..=6, 7..=7] {
            let (b, n) = batch(range);
            u.push(b, n);
        }
        // stream, ts delta, length (1 byte each here), text
        let per_line = 13 + LINE_OVERHEAD_BYTES;
        assert_eq!(u.bytes(), 7 * per_line);
        assert_eq!(u.lines(), 7);

        let released = u.ack(3);
        assert_eq!(released, 3 * per_line);
        assert_eq!(u.pending().count(), 2);
        assert_eq!(u.stored_seq(), 3);

        // partial: lines 4 and 5 stored, 6 kept
        assert_eq!(u.ack(5), 2 * per_line);
        assert_eq!(pending_seqs(&u), vec![vec![6], vec![7]]);
        let first = u.pending().next().unwrap();
        assert_eq!((first.job_id.as_str(), first.lease_token), ("j", 7));

        // stale or repeated acks change nothing
        assert_eq!(u.ack(2), 0);
        assert_eq!(u.ack(5), 0);
        assert_eq!(u.lines(), 2);

        // an ack beyond what was sent releases everything
        assert!(u.ack(100) > 0);
        assert_eq!(u.bytes(), 0);
        assert_eq!(u.pending().count(), 0);
    }

    #[test]
    fn resend_after_reconnect_starts_after_stored_seq() {
        let mut u = Unacked::default();
        for range in [1..=4, 5..=8] {
            let (b, n) = batch(range);
            u.push(b, n);
        }
        // Welcome.resumed.stored_seq = 2: re-send 3..=8, in order, without gaps or repeats.
        u.ack(2);
        let resent: Vec<i64> = pending_seqs(&u).concat();
        assert_eq!(resent, (3..=8).collect::<Vec<_>>());
        // a reconnect that stored nothing new re-sends the same lines again
        u.ack(2);
        assert_eq!(pending_seqs(&u).concat(), resent);
    }
}
