//! The compact encoding of consecutive log lines ("a chunk"), used both on the wire
//! (`LogBatch.chunk`) and in the database (`job_logs.chunk`), so the api can store what a
//! worker sent without re-encoding it line by line.
//!
//! A chunk is a sequence of lines, each encoded as
//!
//! ```text
//! stream   1 byte       the `Stream` enum value: 1 stdout, 2 stderr, 3 system
//! ts       varint       zig-zag delta, in ms, from the previous line's timestamp (the first
//!                       line's is from 0, i.e. absolute Unix time in ms)
//! len      varint       the text's length in bytes
//! text     len bytes    UTF-8, without line terminator
//! ```
//!
//! Sequence numbers are not stored: the lines of a chunk are consecutive, and whoever holds the
//! chunk knows the first one's. Decoding never panics: malformed input is a [`ChunkError`].

use crate::v1::Stream;

/// Why bytes are not a valid chunk.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("log chunk ends inside a line (at byte {0})")]
    Truncated(usize),
    #[error("log chunk has an over-long number at byte {0}")]
    BadVarint(usize),
    #[error("log chunk has an unknown stream {stream} at byte {at}")]
    BadStream { stream: u8, at: usize },
    #[error("log chunk has a line that is not UTF-8 at byte {0}")]
    NotUtf8(usize),
    #[error("log chunk has {have} lines, fewer than {want}")]
    TooFewLines { have: usize, want: usize },
}

/// One decoded line, borrowing its text from the chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Line<'a> {
    pub stream: Stream,
    /// Unix time in milliseconds.
    pub ts_ms: i64,
    pub text: &'a str,
}

/// What a valid chunk holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    pub lines: usize,
    /// Σ of the lines' text lengths.
    pub text_bytes: usize,
    /// The last line's timestamp (0 when empty).
    pub last_ts_ms: i64,
}

/// Builds a chunk line by line.
#[derive(Debug, Clone, Default)]
pub struct ChunkWriter {
    buf: Vec<u8>,
    summary: Summary,
}

impl ChunkWriter {
    /// An empty chunk with room for `bytes`.
    pub fn with_capacity(bytes: usize) -> Self {
        ChunkWriter {
            buf: Vec::with_capacity(bytes),
            summary: Summary::default(),
        }
    }

    /// Continues `chunk`, a valid chunk whose [`Summary`] is `summary`.
    pub fn resume(chunk: Vec<u8>, summary: Summary) -> Self {
        ChunkWriter {
            buf: chunk,
            summary,
        }
    }

    /// Appends a line.
    pub fn push(&mut self, stream: Stream, ts_ms: i64, text: &str) {
        self.buf.push(stream_byte(stream));
        put_varint(
            &mut self.buf,
            zigzag(ts_ms.wrapping_sub(self.summary.last_ts_ms)),
        );
        put_varint(&mut self.buf, text.len() as u64);
        self.buf.extend_from_slice(text.as_bytes());
        self.summary.lines += 1;
        self.summary.text_bytes += text.len();
        self.summary.last_ts_ms = ts_ms;
    }

    /// Bytes encoded so far.
    pub fn encoded_len(&self) -> usize {
        self.buf.len()
    }

    pub fn summary(&self) -> Summary {
        self.summary
    }

    pub fn is_empty(&self) -> bool {
        self.summary.lines == 0
    }

    /// The chunk, leaving this writer empty.
    pub fn take(&mut self) -> Vec<u8> {
        self.summary = Summary::default();
        std::mem::take(&mut self.buf)
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }
}

/// The lines of a chunk, in order. After an error the iterator ends.
#[derive(Debug, Clone)]
pub struct Lines<'a> {
    data: &'a [u8],
    pos: usize,
    last_ts_ms: i64,
    failed: bool,
}

/// Decodes `chunk` lazily.
pub fn lines(chunk: &[u8]) -> Lines<'_> {
    Lines {
        data: chunk,
        pos: 0,
        last_ts_ms: 0,
        failed: false,
    }
}

impl<'a> Lines<'a> {
    /// Byte offset of the next line (the end of the lines read so far).
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Timestamp of the last line read (0 before the first).
    pub fn last_ts_ms(&self) -> i64 {
        self.last_ts_ms
    }

    fn next_line(&mut self) -> Result<Line<'a>, ChunkError> {
        let start = self.pos;
        let code = self.data[self.pos];
        let stream = match Stream::try_from(i32::from(code)) {
            Ok(s) if s != Stream::Unspecified => s,
            _ => {
                return Err(ChunkError::BadStream {
                    stream: code,
                    at: start,
                });
            }
        };
        self.pos += 1;
        let delta = unzigzag(get_varint(self.data, &mut self.pos)?);
        // Wrapping, as the writer's subtraction: every i64 round-trips.
        let ts_ms = self.last_ts_ms.wrapping_add(delta);
        let len = get_varint(self.data, &mut self.pos)?;
        let end = usize::try_from(len)
            .ok()
            .and_then(|len| self.pos.checked_add(len))
            .filter(|&end| end <= self.data.len())
            .ok_or(ChunkError::Truncated(self.pos))?;
        let text = std::str::from_utf8(&self.data[self.pos..end])
            .map_err(|_| ChunkError::NotUtf8(start))?;
        self.pos = end;
        self.last_ts_ms = ts_ms;
        Ok(Line {
            stream,
            ts_ms,
            text,
        })
    }
}

impl<'a> Iterator for Lines<'a> {
    type Item = Result<Line<'a>, ChunkError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.pos >= self.data.len() {
            return None;
        }
        let line = self.next_line();
        self.failed = line.is_err();
        Some(line)
    }
}

/// Checks every line of `chunk` (structure, streams, UTF-8) and sums it up.
pub fn validate(chunk: &[u8]) -> Result<Summary, ChunkError> {
    let mut summary = Summary::default();
    for line in lines(chunk) {
        let line = line?;
        summary.lines += 1;
        summary.text_bytes += line.text.len();
        summary.last_ts_ms = line.ts_ms;
    }
    Ok(summary)
}

/// `chunk` without its first `n` lines. Only the first kept line is re-encoded (its timestamp
/// delta was relative to a line now gone); the rest is copied as is.
pub fn skip(chunk: &[u8], n: usize) -> Result<Vec<u8>, ChunkError> {
    if n == 0 {
        return Ok(chunk.to_vec());
    }
    let mut it = lines(chunk);
    for have in 0..n {
        match it.next() {
            Some(line) => {
                line?;
            }
            None => return Err(ChunkError::TooFewLines { have, want: n }),
        }
    }
    let mut out = ChunkWriter::with_capacity(chunk.len() - it.position() + 8);
    if let Some(first) = it.next() {
        let first = first?;
        out.push(first.stream, first.ts_ms, first.text);
        out.buf.extend_from_slice(&chunk[it.position()..]);
    }
    Ok(out.into_bytes())
}

/// The byte a stream is encoded as (an unspecified stream is stdout, as the api always read it).
fn stream_byte(stream: Stream) -> u8 {
    match stream {
        Stream::Unspecified | Stream::Stdout => Stream::Stdout as u8,
        Stream::Stderr => Stream::Stderr as u8,
        Stream::System => Stream::System as u8,
    }
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn get_varint(data: &[u8], pos: &mut usize) -> Result<u64, ChunkError> {
    let start = *pos;
    let mut v: u64 = 0;
    for shift in (0..64).step_by(7) {
        let Some(&b) = data.get(*pos) else {
            return Err(ChunkError::Truncated(*pos));
        };
        *pos += 1;
        // The tenth byte may only carry the top bit of a u64.
        if shift == 63 && b > 1 {
            return Err(ChunkError::BadVarint(start));
        }
        v |= u64::from(b & 0x7F) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(ChunkError::BadVarint(start))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports a failure
mod tests {
    use super::*;

    fn encode(lines: &[(Stream, i64, &str)]) -> Vec<u8> {
        let mut w = ChunkWriter::default();
        for (s, ts, t) in lines {
            w.push(*s, *ts, t);
        }
        w.into_bytes()
    }

    fn decode(chunk: &[u8]) -> Vec<(Stream, i64, String)> {
        lines(chunk)
            .map(|l| {
                let l = l.unwrap();
                (l.stream, l.ts_ms, l.text.to_owned())
            })
            .collect()
    }

    #[test]
    fn round_trip() {
        let input = [
            (Stream::Stdout, 1_700_000_000_123, "hello"),
            (Stream::Stderr, 1_700_000_000_123, ""),
            (Stream::System, 1_700_000_000_001, "earlier clock"),
            (Stream::Stdout, -5, "negative time"),
            (Stream::Stdout, i64::MAX, "far future"),
            (Stream::Stdout, i64::MIN, "far past"),
        ];
        let chunk = encode(&input);
        let back = decode(&chunk);
        let expected: Vec<_> = input
            .iter()
            .map(|(s, ts, t)| (*s, *ts, (*t).to_owned()))
            .collect();
        assert_eq!(back, expected);
        let summary = validate(&chunk).unwrap();
        assert_eq!(summary.lines, 6);
        assert_eq!(
            summary.text_bytes,
            input.iter().map(|l| l.2.len()).sum::<usize>()
        );
        assert_eq!(summary.last_ts_ms, i64::MIN);
    }

    #[test]
    fn empty_chunk() {
        assert_eq!(decode(&[]), vec![]);
        assert_eq!(validate(&[]).unwrap(), Summary::default());
        assert!(skip(&[], 0).unwrap().is_empty());
        assert_eq!(
            skip(&[], 1),
            Err(ChunkError::TooFewLines { have: 0, want: 1 })
        );
    }

    #[test]
    fn unicode_and_long_lines() {
        let long = "é".repeat(70_000);
        let chunk = encode(&[
            (Stream::Stdout, 1, "héllo wörld ✓ 🚀"),
            (Stream::Stdout, 2, &long),
        ]);
        let back = decode(&chunk);
        assert_eq!(back[0].2, "héllo wörld ✓ 🚀");
        assert_eq!(back[1].2, long);
    }

    #[test]
    fn skip_keeps_timestamps() {
        let chunk = encode(&[
            (Stream::Stdout, 100, "a"),
            (Stream::Stderr, 150, "b"),
            (Stream::Stdout, 170, "c"),
        ]);
        assert_eq!(
            decode(&skip(&chunk, 1).unwrap()),
            vec![
                (Stream::Stderr, 150, "b".to_owned()),
                (Stream::Stdout, 170, "c".to_owned())
            ]
        );
        assert!(skip(&chunk, 3).unwrap().is_empty());
        assert_eq!(
            skip(&chunk, 4),
            Err(ChunkError::TooFewLines { have: 3, want: 4 })
        );
    }

    #[test]
    fn resume_continues_timestamps() {
        let chunk = encode(&[(Stream::Stdout, 100, "a")]);
        let summary = validate(&chunk).unwrap();
        let mut w = ChunkWriter::resume(chunk, summary);
        w.push(Stream::System, 90, "marker");
        assert_eq!(
            decode(&w.into_bytes()),
            vec![
                (Stream::Stdout, 100, "a".to_owned()),
                (Stream::System, 90, "marker".to_owned())
            ]
        );
    }

    #[test]
    fn invalid_input_is_an_error() {
        let good = encode(&[(Stream::Stdout, 1_700_000_000_000, "hello")]);
        // every truncation of a valid chunk is refused, none panics
        for cut in 1..good.len() {
            assert!(validate(&good[..cut]).is_err(), "cut at {cut}");
        }
        assert_eq!(
            validate(&[0, 0, 0]),
            Err(ChunkError::BadStream { stream: 0, at: 0 })
        );
        assert_eq!(
            validate(&[9, 0, 0]),
            Err(ChunkError::BadStream { stream: 9, at: 0 })
        );
        assert_eq!(
            validate(&[1, 0, 2, 0xC3, 0x28]),
            Err(ChunkError::NotUtf8(0))
        );
        // a length far past the end
        assert_eq!(
            validate(&[1, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0x0F, b'x']),
            Err(ChunkError::Truncated(7))
        );
        // eleven continuation bytes: not a u64
        let mut long = vec![1u8];
        long.extend([0xFF; 11]);
        assert_eq!(validate(&long), Err(ChunkError::BadVarint(1)));
        // arbitrary garbage: an error or lines, never a panic
        let mut x: u32 = 12345;
        for _ in 0..2000 {
            let garbage: Vec<u8> = (0..(x % 40))
                .map(|_| {
                    x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    (x >> 16) as u8
                })
                .collect();
            let _ = validate(&garbage);
            let _ = skip(&garbage, 1);
        }
    }
}
