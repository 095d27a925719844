//! HTML form bodies (`application/x-www-form-urlencoded`), kept as the list of pairs so a
//! field may repeat (the dead-letter page's checkboxes).

use axum::extract::{FromRequest, Request};
use bytes::Bytes;

use super::render::DashError;
use crate::error::ApiError;

#[derive(Debug, Default)]
pub struct Form(Vec<(String, String)>);

impl Form {
    pub fn parse(body: &[u8]) -> Self {
        Self(form_urlencoded::parse(body).into_owned().collect())
    }

    /// The first value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The value of `name` with surrounding white space removed, None when empty.
    pub fn text(&self, name: &str) -> Option<&str> {
        self.get(name).map(str::trim).filter(|v| !v.is_empty())
    }

    /// Every value of `name`.
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

impl<S: Send + Sync> FromRequest<S> for Form {
    type Rejection = DashError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|r| {
            DashError::Api(ApiError::BadBody {
                status: r.status(),
                message: r.body_text(),
                field: None,
            })
        })?;
        Ok(Self::parse(&bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_fields_and_encoding() {
        let f = Form::parse(b"id=a&id=b&name=x+y%26z&empty=+");
        assert_eq!(f.all("id"), vec!["a", "b"]);
        assert_eq!(f.get("name"), Some("x y&z"));
        assert_eq!(f.text("empty"), None);
        assert_eq!(f.get("missing"), None);
    }
}
