//! Request extraction with errors that name the field: JSON bodies, ids in paths, queries.

use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use bytes::Bytes;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::error::ApiError;
use crate::model::FieldError;

/// A JSON body parsed with the path of any bad field reported. The content type is not
/// enforced (curl's `-d` works as is); an empty body is an error unless `T` is optional.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes =
            Bytes::from_request(req, state)
                .await
                .map_err(|rejection| ApiError::BadBody {
                    status: rejection.status(),
                    message: rejection.body_text(),
                    field: None,
                })?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// Parses `bytes` as `T`; an empty body parses as JSON `null` (so `Option<T>` bodies may be
/// omitted).
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let text: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"null"
    } else {
        bytes
    };
    let mut de = serde_json::Deserializer::from_slice(text);
    let parsed: Result<T, _> = serde_path_to_error::deserialize(&mut de);
    let value = parsed.map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        // serde_path_to_error includes an unknown field's own name in the path.
        let field = (path != "." && !path.is_empty()).then_some(path);
        let status = if inner.is_syntax() || inner.is_eof() {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::UNPROCESSABLE_ENTITY
        };
        let message = match (&field, text == b"null") {
            (_, true) => "a JSON body is required".to_owned(),
            (Some(f), _) => format!("{f}: {inner}"),
            (None, _) => format!("invalid JSON body: {inner}"),
        };
        ApiError::BadBody {
            status,
            message,
            field,
        }
    })?;
    de.end().map_err(|e| ApiError::BadBody {
        status: StatusCode::BAD_REQUEST,
        message: format!("invalid JSON body: {e}"),
        field: None,
    })?;
    Ok(value)
}

/// Parses a UUID from a path or query parameter, naming it on failure.
pub fn parse_uuid(field: &str, raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw)
        .map_err(|_| FieldError::new(field, format!("{raw:?} is not a valid UUID")).into())
}

/// Parses an optional query parameter with `FromStr`, naming it on failure.
pub fn parse_param<T: std::str::FromStr>(
    field: &str,
    raw: Option<&str>,
) -> Result<Option<T>, ApiError>
where
    T::Err: std::fmt::Display,
{
    raw.filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<T>()
                .map_err(|e| FieldError::new(field, format!("{s:?}: {e}")).into())
        })
        .transpose()
}

/// A page size from `limit`, 1..=max, defaulting to `default`.
pub fn page_limit(raw: Option<&str>, default: i64, max: i64) -> Result<i64, ApiError> {
    match parse_param::<i64>("limit", raw)? {
        None => Ok(default),
        Some(n) if (1..=max).contains(&n) => Ok(n),
        Some(_) => Err(FieldError::new("limit", format!("must be between 1 and {max}")).into()),
    }
}
