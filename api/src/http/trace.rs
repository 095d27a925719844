//! The span of a request that queues a job: a child of the client's W3C `traceparent` header
//! when it sent a valid one (an invalid one is ignored, as the W3C spec asks).

use axum::http::HeaderMap;

/// Starts the span `job.enqueue` and returns it with the trace context the new job stores:
/// the span's own when traces are exported, else the client's `traceparent` unchanged (so a
/// client's trace still reaches the script's `TRACEPARENT`), else none.
/// Its `event.id` and `job.id` fields are for the caller to record.
pub(super) fn enqueue_span(headers: &HeaderMap) -> (tracing::Span, Option<String>) {
    let span = tracing::info_span!(
        "job.enqueue",
        event.id = tracing::field::Empty,
        job.id = tracing::field::Empty,
        trace_id = tracing::field::Empty
    );
    let incoming = headers.get("traceparent").and_then(|v| v.to_str().ok());
    let context = baton_telemetry::link(&span, incoming);
    (span, context)
}
