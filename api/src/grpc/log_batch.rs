//! A worker's `LogBatch` checked and turned into the chunk the database stores: either format
//! a worker may send (`chunk`, or one `LogLine` each from older workers) becomes one
//! [`NewChunk`], with the job's secrets masked (by the job's [`StreamMasker`], which masks
//! across lines and batches). Nothing a worker sends can make this panic:
//! malformed batches are a [`BatchError`], answered with a notice.

use baton_proto::logchunk::{self, ChunkError, ChunkWriter, Summary};
use baton_proto::v1::{LogBatch, LogLine, Stream};

use crate::masking::StreamMasker;
use crate::storage::logs::NewChunk;

/// Why a batch is refused.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("a log batch may carry `lines` or `chunk`, not both")]
    BothFormats,
    #[error("log batch lines must be consecutive: line {got} follows line {prev}")]
    NotConsecutive { prev: i64, got: i64 },
    #[error("log line numbers start at 1, got {0}")]
    BadSeq(i64),
    #[error("malformed log batch: {0}")]
    Chunk(#[from] ChunkError),
}

/// The batch's lines as a chunk, each secret replaced by [`crate::masking::MASK`].
pub fn checked_chunk(batch: LogBatch, masker: &mut StreamMasker) -> Result<NewChunk, BatchError> {
    if !batch.lines.is_empty() {
        if !batch.chunk.is_empty() {
            return Err(BatchError::BothFormats);
        }
        return from_lines(&batch.lines, masker);
    }
    let summary = logchunk::validate(&batch.chunk)?;
    if summary.lines > 0 {
        check_range(batch.first_seq, summary.lines)?;
    }
    let chunk = NewChunk {
        first_seq: batch.first_seq,
        data: batch.chunk,
        summary,
    };
    if !masker.has_secrets() {
        return Ok(chunk);
    }
    Ok(masked(chunk, masker))
}

/// Lines `first ..= first + lines - 1` must be positive and not overflow.
fn check_range(first: i64, lines: usize) -> Result<(), BatchError> {
    let span = i64::try_from(lines - 1).map_err(|_| BatchError::BadSeq(first))?;
    if first < 1 || first.checked_add(span).is_none() {
        return Err(BatchError::BadSeq(first));
    }
    Ok(())
}

/// Lines sent one message each.
fn from_lines(lines: &[LogLine], masker: &mut StreamMasker) -> Result<NewChunk, BatchError> {
    let first_seq = lines.first().map_or(1, |l| l.seq);
    check_range(first_seq, lines.len())?;
    let mut writer = ChunkWriter::with_capacity(lines.iter().map(|l| l.text.len() + 8).sum());
    let mut prev: Option<i64> = None;
    for line in lines {
        if let Some(prev) = prev
            && line.seq != prev + 1
        {
            return Err(BatchError::NotConsecutive {
                prev,
                got: line.seq,
            });
        }
        prev = Some(line.seq);
        // An unknown stream is stdout, as it always was.
        let stream = Stream::try_from(line.stream).unwrap_or(Stream::Stdout);
        writer.push(stream, line.ts_ms, &masker.mask_line(line.seq, &line.text));
    }
    let summary = writer.summary();
    Ok(NewChunk {
        first_seq,
        data: writer.into_bytes(),
        summary,
    })
}

/// `chunk` (valid) with its secrets masked line by line; the same chunk when nothing changed.
fn masked(chunk: NewChunk, masker: &mut StreamMasker) -> NewChunk {
    let mut writer: Option<ChunkWriter> = None;
    for (i, line) in logchunk::lines(&chunk.data).flatten().enumerate() {
        let seq = chunk.first_seq.saturating_add(i as i64);
        let text = masker.mask_line(seq, line.text);
        if writer.is_none() && matches!(text, std::borrow::Cow::Owned(_)) {
            // The first line that changed: copy the lines before it as they are.
            let mut w = ChunkWriter::with_capacity(chunk.data.len());
            for before in logchunk::lines(&chunk.data).flatten().take(i) {
                w.push(before.stream, before.ts_ms, before.text);
            }
            writer = Some(w);
        }
        if let Some(w) = writer.as_mut() {
            w.push(line.stream, line.ts_ms, &text);
        }
    }
    let Some(writer) = writer else {
        return chunk;
    };
    let summary: Summary = writer.summary();
    NewChunk {
        first_seq: chunk.first_seq,
        data: writer.into_bytes(),
        summary,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports a failure
mod tests {
    use super::*;
    use crate::masking::Secrets;

    fn plain() -> StreamMasker {
        StreamMasker::default()
    }

    fn masking(values: &[&str]) -> StreamMasker {
        StreamMasker::new(Secrets::new(values.iter().map(|s| (*s).to_owned())))
    }

    fn texts(chunk: &NewChunk) -> Vec<String> {
        logchunk::lines(&chunk.data)
            .map(|l| l.unwrap().text.to_owned())
            .collect()
    }

    fn chunk_batch(first_seq: i64, lines: &[&str]) -> LogBatch {
        let mut w = ChunkWriter::default();
        for l in lines {
            w.push(Stream::Stdout, 5, l);
        }
        LogBatch {
            job_id: "j".into(),
            lease_token: 1,
            lines: Vec::new(),
            first_seq,
            chunk: w.into_bytes(),
        }
    }

    #[test]
    fn chunks_pass_through_and_secrets_are_masked() {
        let batch = chunk_batch(3, &["a", "pw=hunter2", "b"]);
        let data = batch.chunk.clone();
        let plain = checked_chunk(batch.clone(), &mut plain()).unwrap();
        assert_eq!(plain.data, data);
        assert_eq!((plain.first_seq, plain.summary.lines), (3, 3));
        let masked = checked_chunk(batch, &mut masking(&["hunter2"])).unwrap();
        assert_eq!(texts(&masked), vec!["a", "pw=***", "b"]);
        assert_eq!(masked.summary.text_bytes, 1 + 6 + 1);
    }

    #[test]
    fn old_format_lines_become_a_chunk() {
        let line = |seq, text: &str| LogLine {
            seq,
            stream: 99, // unknown: stdout
            text: text.into(),
            ts_ms: 7,
        };
        let batch = LogBatch {
            job_id: "j".into(),
            lease_token: 1,
            lines: vec![line(4, "x secret y"), line(5, "z")],
            first_seq: 0,
            chunk: Vec::new(),
        };
        let chunk = checked_chunk(batch.clone(), &mut masking(&["secret"])).unwrap();
        assert_eq!(chunk.first_seq, 4);
        assert_eq!(texts(&chunk), vec!["x *** y", "z"]);
        let gap = LogBatch {
            lines: vec![line(4, "a"), line(6, "b")],
            ..batch.clone()
        };
        assert!(matches!(
            checked_chunk(gap, &mut plain()),
            Err(BatchError::NotConsecutive { prev: 4, got: 6 })
        ));
        let both = LogBatch {
            chunk: vec![1, 0, 0],
            ..batch
        };
        assert!(matches!(
            checked_chunk(both, &mut plain()),
            Err(BatchError::BothFormats)
        ));
    }

    #[test]
    fn malformed_batches_are_refused() {
        let mut batch = chunk_batch(1, &["hello"]);
        batch.chunk.pop();
        assert!(matches!(
            checked_chunk(batch, &mut plain()),
            Err(BatchError::Chunk(_))
        ));
        assert!(matches!(
            checked_chunk(chunk_batch(0, &["a"]), &mut plain()),
            Err(BatchError::BadSeq(0))
        ));
        assert!(matches!(
            checked_chunk(chunk_batch(i64::MAX, &["a", "b"]), &mut plain()),
            Err(BatchError::BadSeq(_))
        ));
        // an empty batch is fine whatever its first_seq
        let empty = checked_chunk(chunk_batch(0, &[]), &mut plain()).unwrap();
        assert_eq!(empty.summary.lines, 0);
    }
}
