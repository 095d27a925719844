//! W3C trace context (`traceparent: 00-<trace id>-<parent id>-<flags>`): parsing, printing,
//! and moving it in and out of `tracing` spans.
//!
//! A job's trace context travels as this text (stored with the job, sent in the assignment,
//! given to scripts as `TRACEPARENT`), so it works whether or not a process exports traces:
//! a process without an exporter passes the context it was given on unchanged.

use std::fmt;
use std::str::FromStr;

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// A parsed `traceparent` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub sampled: bool,
}

/// Why a `traceparent` was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidTraceParent(pub &'static str);

impl fmt::Display for InvalidTraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid traceparent: {}", self.0)
    }
}

impl std::error::Error for InvalidTraceParent {}

fn lower_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl FromStr for TraceParent {
    type Err = InvalidTraceParent;

    /// Version `00` exactly as the W3C spec writes it; a later version is read by its first
    /// four fields (as the spec asks), `ff` is refused.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let mut parts = s.split('-');
        let (Some(version), Some(trace), Some(span), Some(flags)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(InvalidTraceParent(
                "expected version-traceid-parentid-flags",
            ));
        };
        if !lower_hex(version, 2) || version == "ff" {
            return Err(InvalidTraceParent("bad version"));
        }
        if version == "00" && parts.next().is_some() {
            return Err(InvalidTraceParent("extra fields in version 00"));
        }
        if !lower_hex(trace, 32) || trace.bytes().all(|b| b == b'0') {
            return Err(InvalidTraceParent("bad trace id"));
        }
        if !lower_hex(span, 16) || span.bytes().all(|b| b == b'0') {
            return Err(InvalidTraceParent("bad parent id"));
        }
        if !lower_hex(flags, 2) {
            return Err(InvalidTraceParent("bad flags"));
        }
        let flags = u8::from_str_radix(flags, 16).map_err(|_| InvalidTraceParent("bad flags"))?;
        Ok(TraceParent {
            trace_id: TraceId::from_hex(trace).map_err(|_| InvalidTraceParent("bad trace id"))?,
            span_id: SpanId::from_hex(span).map_err(|_| InvalidTraceParent("bad parent id"))?,
            sampled: flags & 1 == 1,
        })
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            self.trace_id,
            self.span_id,
            u8::from(self.sampled)
        )
    }
}

impl TraceParent {
    /// The trace id as 32 lowercase hex digits.
    pub fn trace_id_hex(&self) -> String {
        self.trace_id.to_string()
    }

    fn span_context(&self) -> SpanContext {
        SpanContext::new(
            self.trace_id,
            self.span_id,
            if self.sampled {
                TraceFlags::SAMPLED
            } else {
                TraceFlags::default()
            },
            true,
            TraceState::default(),
        )
    }
}

/// The span's own trace context, when it is recorded by OpenTelemetry (an exporter is set).
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    let context = span.context();
    let otel = context.span();
    let sc = otel.span_context();
    sc.is_valid().then(|| {
        TraceParent {
            trace_id: sc.trace_id(),
            span_id: sc.span_id(),
            sampled: sc.is_sampled(),
        }
        .to_string()
    })
}

/// [`traceparent_of`] the current span.
pub fn current_traceparent() -> Option<String> {
    traceparent_of(&tracing::Span::current())
}

/// Makes `span` a child of `parent` (a `traceparent` text; ignored when absent or invalid),
/// records its `trace_id` field (declare it `trace_id = tracing::field::Empty`), and returns
/// the context to hand on: the span's own when traces are exported, else `parent` unchanged.
/// Call it right after creating the span, before entering it.
pub fn link(span: &tracing::Span, parent: Option<&str>) -> Option<String> {
    let parent = parent.and_then(|p| p.parse::<TraceParent>().ok());
    if let Some(p) = &parent {
        let cx = opentelemetry::Context::new().with_remote_span_context(p.span_context());
        let _ = span.set_parent(cx);
    }
    let own = traceparent_of(span);
    let handed_on = own.or_else(|| parent.map(|p| p.to_string()));
    if let Some(tp) = handed_on
        .as_deref()
        .and_then(|t| t.parse::<TraceParent>().ok())
    {
        span.record("trace_id", tracing::field::display(tp.trace_id));
    }
    handed_on
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports a failure
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn round_trips_the_spec_example() {
        let tp: TraceParent = GOOD.parse().unwrap();
        assert!(tp.sampled);
        assert_eq!(tp.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(tp.to_string(), GOOD);
    }

    #[test]
    fn refuses_malformed_values() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert!(bad.parse::<TraceParent>().is_err(), "{bad:?} accepted");
        }
        // A later version is read by its first four fields.
        assert!(
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what"
                .parse::<TraceParent>()
                .is_ok()
        );
    }

    #[test]
    fn without_an_exporter_the_parent_is_handed_on_unchanged() {
        let span = tracing::info_span!("x", trace_id = tracing::field::Empty);
        assert_eq!(link(&span, Some(GOOD)).as_deref(), Some(GOOD));
        assert_eq!(link(&span, Some("junk")), None);
        assert_eq!(link(&span, None), None);
    }
}
