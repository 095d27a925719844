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

/// A body in JSON, or in YAML when the request says `Content-Type: application/yaml` (also
/// `application/x-yaml`, `text/yaml`): the YAML is read into JSON values, then checked and
/// parsed exactly like a JSON body, so errors name the field the same way.
#[derive(Debug)]
pub struct JsonOrYamlBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonOrYamlBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let yaml = req
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|v| v.trim().to_ascii_lowercase())
            .is_some_and(|v| {
                matches!(
                    v.as_str(),
                    "application/yaml" | "application/x-yaml" | "text/yaml" | "text/x-yaml"
                )
            });
        let bytes =
            Bytes::from_request(req, state)
                .await
                .map_err(|rejection| ApiError::BadBody {
                    status: rejection.status(),
                    message: rejection.body_text(),
                    field: None,
                })?;
        if !yaml {
            return parse_json(&bytes).map(JsonOrYamlBody);
        }
        let value: serde_json::Value =
            serde_norway::from_slice(&bytes).map_err(|e| ApiError::BadBody {
                status: StatusCode::BAD_REQUEST,
                message: format!("invalid YAML body: {e}"),
                field: None,
            })?;
        let json = serde_json::to_vec(&value).map_err(|e| ApiError::BadBody {
            status: StatusCode::BAD_REQUEST,
            message: format!("the YAML body has no JSON form: {e}"),
            field: None,
        })?;
        parse_json(&json).map(JsonOrYamlBody)
    }
}

/// Parses `bytes` as `T`; an empty body parses as JSON `null` (so `Option<T>` bodies may be
/// omitted). A NUL character anywhere (`\u0000` in a string or a key) is refused with 422
/// naming the field: PostgreSQL stores neither in `text` nor in `jsonb`.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let text: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"null"
    } else {
        bytes
    };
    if may_hold_a_huge_number(text)
        && let Ok(value) = serde_json::from_slice::<serde_json::Value>(text)
        && let Some(field) = huge_number_path(&value, String::new())
    {
        return Err(FieldError::new(
            if field.is_empty() {
                "body".to_owned()
            } else {
                field
            },
            format!("numbers must be smaller than {MAX_NUMBER:e} in magnitude"),
        )
        .into());
    }
    if has_escaped_nul(text)
        && let Ok(value) = serde_json::from_slice::<serde_json::Value>(text)
        && let Some(field) = nul_path(&value, String::new())
    {
        return Err(FieldError::new(
            if field.is_empty() {
                "body".to_owned()
            } else {
                field
            },
            "must not contain NUL characters (\\u0000)",
        )
        .into());
    }
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

/// Whether JSON text contains a `\u0000` escape (a raw NUL is invalid JSON anyway): the
/// cheap pre-check before looking for the field that holds it.
/// Numbers at least this large are refused: PostgreSQL stores them as `numeric`, and what it
/// gives back for one near `f64::MAX` may not read back as a JSON number (a job that could be
/// stored but never shown).
const MAX_NUMBER: f64 = 1e300;

/// A cheap scan: a positive exponent of three digits or a run of 300 digits, without which no
/// number in `text` can reach [`MAX_NUMBER`].
fn may_hold_a_huge_number(text: &[u8]) -> bool {
    let mut digits = 0;
    for (i, b) in text.iter().enumerate() {
        if b.is_ascii_digit() {
            digits += 1;
            if digits >= 300 {
                return true;
            }
            continue;
        }
        digits = 0;
        if matches!(b, b'e' | b'E') {
            let rest = &text[i + 1..];
            let rest = rest.strip_prefix(b"+").unwrap_or(rest);
            if rest.len() >= 3 && rest[..3].iter().all(u8::is_ascii_digit) {
                return true;
            }
        }
    }
    false
}

/// The path of the first number in `value` at least [`MAX_NUMBER`] in magnitude.
fn huge_number_path(value: &serde_json::Value, at: String) -> Option<String> {
    use serde_json::Value;
    let join = |k: &str| {
        if at.is_empty() {
            k.to_owned()
        } else {
            format!("{at}.{k}")
        }
    };
    match value {
        Value::Number(n) => n
            .as_f64()
            .is_some_and(|f| !f.is_finite() || f.abs() >= MAX_NUMBER)
            .then(|| at.clone()),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, v)| huge_number_path(v, format!("{at}[{i}]"))),
        Value::Object(map) => map.iter().find_map(|(k, v)| huge_number_path(v, join(k))),
        _ => None,
    }
}

fn has_escaped_nul(text: &[u8]) -> bool {
    const ESCAPE: &[u8] = b"u0000";
    text.windows(ESCAPE.len() + 1)
        .enumerate()
        .filter(|(_, w)| w[0] == b'\\' && &w[1..] == ESCAPE)
        .any(|(at, _)| {
            // `\\u0000` is an escaped backslash followed by text: count the backslashes.
            let run = text[..at].iter().rev().take_while(|b| **b == b'\\').count();
            run % 2 == 0
        })
}

/// The path (`a.b[2].c`, or "" for the root) of the first key or string holding a NUL.
fn nul_path(value: &serde_json::Value, at: String) -> Option<String> {
    use serde_json::Value;
    let join = |key: &str| {
        if at.is_empty() {
            key.to_owned()
        } else {
            format!("{at}.{key}")
        }
    };
    match value {
        Value::String(s) => s.contains('\0').then_some(at),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, v)| nul_path(v, format!("{at}[{i}]"))),
        Value::Object(map) => map.iter().find_map(|(k, v)| {
            if k.contains('\0') {
                Some(join(&k.replace('\0', "\\u0000")))
            } else {
                nul_path(v, join(k))
            }
        }),
        _ => None,
    }
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

/// The largest log sequence number a client may give as a cursor (`after`): far above any
/// real one, and small enough that adding a page size to it cannot overflow.
pub const MAX_SEQ_CURSOR: i64 = 1 << 53;

/// A log cursor (`after`, `Last-Event-ID`): 0..=[`MAX_SEQ_CURSOR`], naming `field` otherwise.
pub fn seq_cursor(field: &str, value: i64) -> Result<i64, ApiError> {
    if (0..=MAX_SEQ_CURSOR).contains(&value) {
        Ok(value)
    } else {
        Err(FieldError::new(field, format!("must be between 0 and {MAX_SEQ_CURSOR}")).into())
    }
}

/// A page size from `limit`, 1..=max, defaulting to `default`.
pub fn page_limit(raw: Option<&str>, default: i64, max: i64) -> Result<i64, ApiError> {
    match parse_param::<i64>("limit", raw)? {
        None => Ok(default),
        Some(n) if (1..=max).contains(&n) => Ok(n),
        Some(_) => Err(FieldError::new("limit", format!("must be between 1 and {max}")).into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(body: &str) -> Option<String> {
        match parse_json::<serde_json::Value>(body.as_bytes()) {
            Err(ApiError::Validation(e)) => Some(e.field),
            Ok(_) => None,
            Err(other) => panic!("unexpected error {other:?}"),
        }
    }

    #[test]
    fn numbers_too_large_to_store_are_refused_naming_the_field() {
        let err = parse_json::<serde_json::Value>(
            br#"{"input": {"rows": [1, 1.7976931348623157e+308]}}"#,
        )
        .expect_err("refused");
        assert!(format!("{err:?}").contains("input.rows[1]"), "{err:?}");
        let long = format!("{{\"n\": {}}}", "9".repeat(310));
        assert!(parse_json::<serde_json::Value>(long.as_bytes()).is_err());
        // Ordinary numbers, small exponents and long strings of digits are fine.
        let fine = format!(
            r#"{{"a": 1e10, "b": -2.5e-300, "s": "{}"}}"#,
            "1".repeat(400)
        );
        assert!(parse_json::<serde_json::Value>(fine.as_bytes()).is_ok());
    }

    #[test]
    fn nul_characters_are_refused_naming_the_field() {
        assert_eq!(
            field_of(r#"{"input": {"rows": ["a", "b\u0000"]}}"#).as_deref(),
            Some("input.rows[1]")
        );
        assert_eq!(
            field_of(r#"{"description": "\u0000"}"#).as_deref(),
            Some("description")
        );
        assert_eq!(
            field_of(r#"{"a": {"k\u0000": 1}}"#).as_deref(),
            Some("a.k\\u0000")
        );
        assert_eq!(field_of(r#""\u0000""#).as_deref(), Some("body"));
        // An escaped backslash followed by the text `u0000` is not a NUL.
        assert_eq!(field_of(r#"{"a": "\\u0000"}"#), None);
        assert_eq!(field_of(r#"{"a": "\\\u0000"}"#).as_deref(), Some("a"));
    }

    #[test]
    fn seq_cursors_are_bounded() {
        assert!(seq_cursor("after", i64::MAX).is_err());
        assert!(seq_cursor("after", -1).is_err());
        assert_eq!(
            seq_cursor("after", MAX_SEQ_CURSOR).ok(),
            Some(MAX_SEQ_CURSOR)
        );
    }
}
