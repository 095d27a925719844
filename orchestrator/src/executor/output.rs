//! Output plumbing shared by executors: splitting a byte stream into bounded lines, recognising
//! `PROGRESS: N`, and forwarding lines to the events channel with back-pressure.

use std::collections::VecDeque;
use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::{ExecEvent, LineBlock, OutputStream};

/// Default cap of a single emitted line, in bytes (longer lines are split).
pub const DEFAULT_MAX_LINE_BYTES: usize = 64 * 1024;

/// Splits a byte stream into lines.
///
/// Lines end at `\n` (a trailing `\r` is removed too). A line longer than the cap is emitted in
/// pieces of at most `max_line_bytes` bytes, cut on a UTF-8 character boundary when possible.
/// Invalid UTF-8 is replaced lossily when the line is turned into text.
#[derive(Debug)]
pub struct LineSplitter {
    buf: Vec<u8>,
    max: usize,
}

impl LineSplitter {
    /// A splitter with the given line cap (at least 4 bytes, so a character always fits).
    pub fn new(max_line_bytes: usize) -> Self {
        LineSplitter {
            buf: Vec::new(),
            max: max_line_bytes.max(4),
        }
    }

    /// Feeds `data` and calls `emit` with every complete (or over-long) line, in order.
    pub fn push(&mut self, mut data: &[u8], mut emit: impl FnMut(&[u8])) {
        while !data.is_empty() {
            match data.iter().position(|&b| b == b'\n') {
                Some(nl) => {
                    let (line, rest) = (&data[..nl], &data[nl + 1..]);
                    if self.buf.is_empty() {
                        self.emit_bounded(line, true, &mut emit);
                    } else {
                        self.buf.extend_from_slice(line);
                        let whole = std::mem::take(&mut self.buf);
                        self.emit_bounded(&whole, true, &mut emit);
                    }
                    data = rest;
                }
                None => {
                    self.buf.extend_from_slice(data);
                    data = &[];
                    if self.buf.len() > self.max {
                        let whole = std::mem::take(&mut self.buf);
                        let kept = self.emit_bounded(&whole, false, &mut emit);
                        self.buf.extend_from_slice(kept);
                    }
                }
            }
        }
    }

    /// Emits what is left (a last line without a trailing newline), if anything.
    pub fn finish(&mut self, mut emit: impl FnMut(&[u8])) {
        if !self.buf.is_empty() {
            let whole = std::mem::take(&mut self.buf);
            self.emit_bounded(&whole, true, &mut emit);
        }
    }

    /// Emits `line` in pieces of at most `max` bytes. When `complete` is false, the last piece
    /// (at most `max` bytes) is not emitted but returned, to be continued by later data.
    fn emit_bounded<'a>(
        &self,
        mut line: &'a [u8],
        complete: bool,
        emit: &mut impl FnMut(&[u8]),
    ) -> &'a [u8] {
        if complete {
            line = line.strip_suffix(b"\r").unwrap_or(line);
        }
        while line.len() > self.max {
            let cut = utf8_cut(line, self.max);
            emit(&line[..cut]);
            line = &line[cut..];
        }
        if complete {
            emit(line);
            &[]
        } else {
            line
        }
    }
}

/// Largest cut ≤ `max` that does not split a UTF-8 sequence (falls back to `max`).
fn utf8_cut(bytes: &[u8], max: usize) -> usize {
    debug_assert!(bytes.len() >= max);
    for back in 1..=3.min(max) {
        let i = max - back;
        let b = bytes[i];
        if b & 0xC0 == 0x80 {
            continue; // continuation byte: keep looking for the lead byte
        }
        let len = match b {
            0x00..=0x7F => 1,
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => 1,
        };
        return if i + len > max && i > 0 { i } else { max };
    }
    max
}

/// Parses a `PROGRESS: N` line (`N` in 0..=100; whitespace around the line, the colon and the
/// number is allowed). Returns `None` for anything else.
pub fn parse_progress(line: &str) -> Option<u8> {
    let rest = line.trim().strip_prefix("PROGRESS")?.trim_start();
    let value: u8 = rest.strip_prefix(':')?.trim().parse().ok()?;
    (value <= 100).then_some(value)
}

/// Forwards lines to the events channel, as one [`ExecEvent::Lines`] per read. Sending waits
/// when the channel is full (lines are never dropped); once the receiver is gone, lines are
/// discarded but the stream is still read.
pub(crate) struct LineSink<'a> {
    events: &'a mpsc::Sender<ExecEvent>,
    stream: OutputStream,
    closed: bool,
    tail: VecDeque<String>,
    tail_keep: usize,
    /// Lines not sent yet.
    block: LineBlock,
    /// Events to send before `block` (earlier lines and the progress they reported).
    ready: Vec<ExecEvent>,
}

impl<'a> LineSink<'a> {
    pub(crate) fn new(
        events: &'a mpsc::Sender<ExecEvent>,
        stream: OutputStream,
        tail_keep: usize,
    ) -> Self {
        LineSink {
            events,
            stream,
            closed: false,
            tail: VecDeque::new(),
            tail_keep,
            block: LineBlock::default(),
            ready: Vec::new(),
        }
    }

    /// Adds a line; [`LineSink::flush`] sends it.
    pub(crate) fn line(&mut self, bytes: &[u8]) {
        let text = String::from_utf8_lossy(bytes);
        if self.tail_keep > 0 {
            if self.tail.len() == self.tail_keep {
                self.tail.pop_front();
            }
            let mut short = text.clone().into_owned();
            truncate_at_char(&mut short, 512);
            self.tail.push_back(short);
        }
        let progress = match self.stream {
            OutputStream::Stdout => parse_progress(&text),
            OutputStream::Stderr => None,
        };
        self.block.push(&text);
        if let Some(p) = progress {
            // The progress follows its line: close the block here.
            let lines = std::mem::take(&mut self.block);
            self.ready.push(ExecEvent::Lines {
                stream: self.stream,
                lines,
            });
            self.ready.push(ExecEvent::Progress(p));
        }
    }

    /// Sends the lines added so far.
    pub(crate) async fn flush(&mut self) {
        let mut ready = std::mem::take(&mut self.ready);
        if !self.block.is_empty() {
            ready.push(ExecEvent::Lines {
                stream: self.stream,
                lines: std::mem::take(&mut self.block),
            });
        }
        for event in ready {
            if !self.closed && self.events.send(event).await.is_err() {
                self.closed = true;
            }
        }
    }

    pub(crate) fn into_tail(self) -> Vec<String> {
        self.tail.into()
    }
}

fn truncate_at_char(s: &mut String, max: usize) {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
}

/// Feeds a whole in-memory chunk through a splitter into a sink.
pub(crate) async fn push_chunk(splitter: &mut LineSplitter, sink: &mut LineSink<'_>, data: &[u8]) {
    splitter.push(data, |l| sink.line(l));
    sink.flush().await;
}

/// Flushes a splitter's last partial line into a sink.
pub(crate) async fn finish_chunk(splitter: &mut LineSplitter, sink: &mut LineSink<'_>) {
    splitter.finish(|l| sink.line(l));
    sink.flush().await;
}

/// How long to keep reading a pipe after the main process has exited and its group was killed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DrainLimits {
    /// Give up when the pipe yields nothing for this long.
    pub idle: Duration,
    /// Give up this long after the exit, even if data keeps coming.
    pub max: Duration,
}

/// What a pump saw.
#[derive(Debug, Default)]
pub(crate) struct PumpReport {
    /// The last few lines (stderr only), for error messages.
    pub tail: Vec<String>,
    /// Reading stopped at the drain deadline, before end-of-file.
    pub abandoned: bool,
    /// A read error other than end-of-file.
    pub error: Option<io::Error>,
}

/// Reads `reader` to end-of-file, emitting lines. Until `exited` carries the exit instant of the
/// main process it reads without any deadline; afterwards it stops at the [`DrainLimits`] (a
/// process outside the group may still hold the pipe). Time spent waiting for the events
/// channel never counts against the limits.
pub(crate) async fn pump<R: AsyncRead + Unpin>(
    mut reader: R,
    stream: OutputStream,
    events: &mpsc::Sender<ExecEvent>,
    mut exited: watch::Receiver<Option<Instant>>,
    limits: DrainLimits,
    max_line_bytes: usize,
    tail_keep: usize,
) -> PumpReport {
    let mut report = PumpReport::default();
    let mut splitter = LineSplitter::new(max_line_bytes);
    let mut sink = LineSink::new(events, stream, tail_keep);
    let mut buf = vec![0u8; 64 * 1024];
    let mut exit_seen: Option<Instant> = None;
    loop {
        if exit_seen.is_none() {
            exit_seen = *exited.borrow();
        }
        let read = match exit_seen {
            None => {
                tokio::select! {
                    r = reader.read(&mut buf) => r,
                    changed = exited.changed() => {
                        if changed.is_err() {
                            // The supervisor is gone without saying when: start draining now.
                            exit_seen = Some(exited.borrow().unwrap_or_else(Instant::now));
                        }
                        continue;
                    }
                }
            }
            Some(at) => {
                let hard = at + limits.max;
                let now = Instant::now();
                if now >= hard {
                    report.abandoned = true;
                    break;
                }
                let until = (now + limits.idle).min(hard);
                match tokio::time::timeout_at(until, reader.read(&mut buf)).await {
                    Ok(r) => r,
                    Err(_) => {
                        report.abandoned = true;
                        break;
                    }
                }
            }
        };
        match read {
            Ok(0) => break,
            Ok(n) => push_chunk(&mut splitter, &mut sink, &buf[..n]).await,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                report.error = Some(e);
                break;
            }
        }
    }
    finish_chunk(&mut splitter, &mut sink).await;
    report.tail = sink.into_tail();
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(max: usize, chunks: &[&[u8]]) -> Vec<Vec<u8>> {
        let mut s = LineSplitter::new(max);
        let mut out = Vec::new();
        for c in chunks {
            s.push(c, |l| out.push(l.to_vec()));
        }
        s.finish(|l| out.push(l.to_vec()));
        out
    }

    #[test]
    fn splits_lines_across_chunks() {
        let out = split(64, &[b"ab", b"c\nde", b"f\r\n\n", b"tail"]);
        assert_eq!(
            out,
            vec![
                b"abc".to_vec(),
                b"def".to_vec(),
                b"".to_vec(),
                b"tail".to_vec()
            ]
        );
    }

    #[test]
    fn caps_long_lines() {
        let long = vec![b'x'; 25];
        let out = split(10, &[&long[..7], &long[7..], b"\n"]);
        assert_eq!(
            out.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![10, 10, 5]
        );
        let out = split(10, &[&long, b"\n"]);
        assert_eq!(
            out.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![10, 10, 5]
        );
        // exactly the cap: one line, no empty continuation
        let out = split(10, &[&long[..10], b"\n"]);
        assert_eq!(out.iter().map(Vec::len).collect::<Vec<_>>(), vec![10]);
    }

    #[test]
    fn cuts_on_char_boundaries() {
        // "aaaaaaaaé…" : é is 2 bytes starting at index 9, cap 10 would split it.
        let text = format!("{}é{}", "a".repeat(9), "b".repeat(5));
        let out = split(10, &[text.as_bytes(), b"\n"]);
        assert_eq!(out[0], "a".repeat(9).into_bytes());
        assert!(out.iter().all(|l| std::str::from_utf8(l).is_ok()));
        let joined: Vec<u8> = out.concat();
        assert_eq!(joined, text.into_bytes());
    }

    #[test]
    fn progress_lines() {
        assert_eq!(parse_progress("PROGRESS: 50"), Some(50));
        assert_eq!(parse_progress("  PROGRESS:7  "), Some(7));
        assert_eq!(parse_progress("PROGRESS : 100"), Some(100));
        assert_eq!(parse_progress("PROGRESS: 0"), Some(0));
        assert_eq!(parse_progress("PROGRESS: 101"), None);
        assert_eq!(parse_progress("PROGRESS: -1"), None);
        assert_eq!(parse_progress("PROGRESS: x"), None);
        assert_eq!(parse_progress("progress: 5"), None);
        assert_eq!(parse_progress("the PROGRESS: 5"), None);
    }
}
