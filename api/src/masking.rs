//! Secret masking, in one place: every text Baton stores or sends that a script or a template
//! produced — log lines, a job's `output` and `error.message`, rendered messages — goes through
//! [`Secrets`] (whole texts, JSON values) or [`StreamMasker`] (a job's log stream).
//!
//! Masking is not only literal per text:
//! - a **multi-line secret** (a PEM key) reaches the logs one line at a time, so each of its
//!   lines (of at least [`MIN_PIECE`] bytes) is masked on its own as well;
//! - a **secret cut in two** by the worker's line limit (64 KiB by default) ends one stored line
//!   and starts the next, possibly in the next batch: a line long enough to have been cut
//!   ([`MAY_BE_CUT`]) has a trailing start of a secret masked (of at least [`MIN_PARTIAL`]
//!   bytes), and the stream remembers that line's tail so the rest of the secret at the start
//!   of the following line is masked too.

use std::borrow::Cow;
use std::collections::VecDeque;

use serde_json::Value;

/// What replaces a secret.
pub const MASK: &str = "***";

/// Lines of a multi-line secret shorter than this are not masked on their own (a lone `-----`
/// or `==` would mask half of every log).
pub const MIN_PIECE: usize = 4;

/// A line at least this long may be the first piece of a longer line the worker cut.
pub const MAY_BE_CUT: usize = 1024;

/// The shortest start of a secret masked at the end of a line that may have been cut.
pub const MIN_PARTIAL: usize = 3;

/// How many line tails a stream remembers (one per batch; a batch re-sent after a refusal
/// finds the tail of the line before it).
const CARRIES: usize = 8;

/// The secret values one job may read, ready to mask with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Secrets {
    /// Whole values and the lines of multi-line ones, longest first (a secret containing
    /// another is masked whole).
    needles: Vec<String>,
}

impl Secrets {
    pub fn new(values: impl IntoIterator<Item = String>) -> Self {
        let mut needles: Vec<String> = Vec::new();
        for value in values {
            if value.is_empty() {
                continue;
            }
            if value.contains('\n') {
                for piece in value.split('\n') {
                    let piece = piece.trim_end_matches('\r');
                    if piece.len() >= MIN_PIECE && !piece.trim().is_empty() {
                        needles.push(piece.to_owned());
                    }
                }
            }
            needles.push(value);
        }
        needles.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        needles.dedup();
        Self { needles }
    }

    pub fn is_empty(&self) -> bool {
        self.needles.is_empty()
    }

    /// `text` with every secret (and every line of a multi-line one) replaced by [`MASK`].
    pub fn mask<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let mut out = Cow::Borrowed(text);
        for needle in &self.needles {
            if out.contains(needle.as_str()) {
                out = Cow::Owned(out.replace(needle.as_str(), MASK));
            }
        }
        out
    }

    /// Every string in `value` (object keys too) masked.
    pub fn mask_json(&self, value: &mut Value) {
        if self.is_empty() {
            return;
        }
        match value {
            Value::String(s) => {
                if let Cow::Owned(masked) = self.mask(s) {
                    *s = masked;
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|v| self.mask_json(v)),
            Value::Object(map) => {
                let masked_keys = map.keys().any(|k| matches!(self.mask(k), Cow::Owned(_)));
                if masked_keys {
                    let old = std::mem::take(map);
                    for (k, v) in old {
                        map.insert(self.mask(&k).into_owned(), v);
                    }
                }
                map.values_mut().for_each(|v| self.mask_json(v));
            }
            Value::Null | Value::Bool(_) | Value::Number(_) => {}
        }
    }

    /// The longest `k` (≥ `min`) such that `text` ends with the first `k` bytes of a secret
    /// (a proper start: the whole secret is masked by [`Secrets::mask`]).
    fn trailing_start(&self, text: &str, min: usize) -> Option<usize> {
        self.needles
            .iter()
            .filter_map(|s| {
                let last = *text.as_bytes().last()?;
                (min.max(1)..s.len().min(text.len() + 1))
                    .rev()
                    // The byte test first: a full comparison only where it can match.
                    .find(|&k| {
                        s.as_bytes()[k - 1] == last
                            && s.is_char_boundary(k)
                            && text.ends_with(&s[..k])
                    })
            })
            .max()
    }

    /// The longest `n` such that `text` starts with the last `n` bytes of a secret whose
    /// first part ends `tail`.
    fn leading_rest(&self, tail: &str, text: &str) -> Option<usize> {
        self.needles
            .iter()
            .filter_map(|s| {
                let first = *text.as_bytes().first()?;
                (1..s.len()).find_map(|k| {
                    if s.as_bytes()[k] != first {
                        return None;
                    }
                    let (start, rest) = (s.get(..k)?, s.get(k..)?);
                    (tail.ends_with(start) && text.starts_with(rest)).then_some(rest.len())
                })
            })
            .max()
    }

    fn longest(&self) -> usize {
        self.needles.first().map_or(0, String::len)
    }
}

/// One job's log stream: masks line after line, across line cuts and batches.
#[derive(Debug, Clone, Default)]
pub struct StreamMasker {
    secrets: Secrets,
    /// (line number, the end of that line as the script wrote it) for recent lines long
    /// enough to have been cut.
    carries: VecDeque<(i64, String)>,
}

impl StreamMasker {
    pub fn new(secrets: Secrets) -> Self {
        Self {
            secrets,
            carries: VecDeque::new(),
        }
    }

    pub fn has_secrets(&self) -> bool {
        !self.secrets.is_empty()
    }

    pub fn secrets(&self) -> &Secrets {
        &self.secrets
    }

    /// Line `seq` of the job, masked.
    pub fn mask_line<'a>(&mut self, seq: i64, text: &'a str) -> Cow<'a, str> {
        if self.secrets.is_empty() {
            return Cow::Borrowed(text);
        }
        let carry = self
            .carries
            .iter()
            .find(|(s, _)| *s == seq - 1)
            .map(|(_, tail)| tail.clone());
        self.remember(seq, text);
        // The rest of a secret whose start ended the previous (cut) line.
        let (head, body) = match carry.and_then(|tail| self.secrets.leading_rest(&tail, text)) {
            Some(n) => (MASK, &text[n..]),
            None => ("", text),
        };
        let mut masked = self.secrets.mask(body);
        // The start of a secret the cut may have separated from its rest.
        if text.len() >= MAY_BE_CUT
            && let Some(k) = self.secrets.trailing_start(&masked, MIN_PARTIAL)
        {
            let keep = masked.len() - k;
            let mut owned = masked.into_owned();
            owned.truncate(keep);
            owned.push_str(MASK);
            masked = Cow::Owned(owned);
        }
        if head.is_empty() {
            masked
        } else {
            Cow::Owned(format!("{head}{masked}"))
        }
    }

    fn remember(&mut self, seq: i64, text: &str) {
        self.carries.retain(|(s, _)| *s != seq);
        if text.len() < MAY_BE_CUT {
            return;
        }
        let want = self.secrets.longest().saturating_sub(1);
        let mut from = text.len().saturating_sub(want);
        while !text.is_char_boundary(from) {
            from += 1;
        }
        self.carries.push_back((seq, text[from..].to_owned()));
        while self.carries.len() > CARRIES {
            self.carries.pop_front();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports a failure
mod tests {
    use super::*;

    fn secrets(values: &[&str]) -> Secrets {
        Secrets::new(values.iter().map(|s| (*s).to_owned()))
    }

    #[test]
    fn masks_every_occurrence_longest_first() {
        let s = secrets(&["hunter2", "hunter2-long"]);
        assert_eq!(s.mask("pw=hunter2-long and hunter2"), "pw=*** and ***");
        assert!(matches!(s.mask("nothing here"), Cow::Borrowed(_)));
    }

    #[test]
    fn masks_each_line_of_a_multi_line_secret() {
        let pem =
            "-----BEGIN KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\nYWJjZGVm\n-----END KEY-----\n";
        let s = secrets(&[pem]);
        assert_eq!(s.mask(pem), "***");
        assert_eq!(s.mask("key: MIIEvQIBADANBgkqhkiG9w0BAQEFAASC"), "key: ***");
        assert_eq!(s.mask("YWJjZGVm"), "***");
    }

    #[test]
    fn masks_a_secret_cut_between_two_lines() {
        let secret = "s3cr3t-value-0123456789";
        let mut m = StreamMasker::new(secrets(&[secret]));
        let first = format!("{}{}", "x".repeat(2000), &secret[..10]);
        let second = format!("{} and more", &secret[10..]);
        let a = m.mask_line(7, &first).into_owned();
        let b = m.mask_line(8, &second).into_owned();
        assert!(!a.contains(&secret[..10]), "{}", &a[1990..]);
        assert!(a.ends_with(MASK));
        assert_eq!(b, "*** and more");
        // a short line is not taken for a cut one
        let mut m = StreamMasker::new(secrets(&[secret]));
        assert_eq!(m.mask_line(1, "ends with s3c"), "ends with s3c");
        assert_eq!(m.mask_line(2, "r3t-value"), "r3t-value");
    }

    #[test]
    fn masks_json_strings_and_keys() {
        let s = secrets(&["hunter2"]);
        let mut v = serde_json::json!({"a": ["pw hunter2", 1], "hunter2": {"b": "hunter2"}});
        s.mask_json(&mut v);
        assert_eq!(
            v,
            serde_json::json!({"a": ["pw ***", 1], "***": {"b": "***"}})
        );
    }
}
