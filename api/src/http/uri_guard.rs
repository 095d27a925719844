//! Refuses a request whose path or query string carries a NUL (`%00`) before any handler runs:
//! PostgreSQL cannot store or compare text holding one, so it would surface as a 500.

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::model::FieldError;

/// The query parameter (or `path`) holding an encoded NUL, if any.
pub fn nul_field(path: &str, query: Option<&str>) -> Option<String> {
    if contains_nul(path) {
        return Some("path".to_owned());
    }
    query?
        .split('&')
        .find(|pair| contains_nul(pair))
        .map(|pair| {
            let key = pair.split('=').next().unwrap_or_default();
            if key.is_empty() || contains_nul(key) {
                "query".to_owned()
            } else {
                key.to_owned()
            }
        })
}

fn contains_nul(text: &str) -> bool {
    text.contains("%00") || text.contains('\0')
}

pub async fn reject_nul(request: Request, next: Next) -> Response {
    let uri = request.uri();
    match nul_field(uri.path(), uri.query()) {
        Some(field) => ApiError::from(FieldError::new(
            field,
            "must not contain NUL characters (%00)",
        ))
        .into_response(),
        None => next.run(request).await,
    }
}

#[cfg(test)]
mod tests {
    use super::nul_field;

    #[test]
    fn names_the_parameter_holding_a_nul() {
        assert_eq!(
            nul_field("/api/v1/events", Some("limit=1&cursor=a%00b")).as_deref(),
            Some("cursor")
        );
        assert_eq!(
            nul_field("/api/v1/variables/a%00", None).as_deref(),
            Some("path")
        );
        assert_eq!(nul_field("/api/v1/events", Some("cursor=a%2500")), None);
        assert_eq!(nul_field("/api/v1/events", None), None);
    }
}
