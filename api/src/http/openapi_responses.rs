//! Declares on every operation of the OpenAPI document the answers that any handler of its kind
//! can give, besides those it declares itself: rate limits (429), an unavailable database
//! (503), authentication and roles (401, 403) under `/api/v1`, ids and query parameters that
//! do not parse or hold a NUL (404, 422), and bodies that are malformed or too large (400,
//! 413, 422). A client (or a fuzzer) then never meets an undocumented status.

use utoipa::openapi::path::{Operation, ParameterIn};
use utoipa::openapi::{ContentBuilder, OpenApi, Ref, RefOr, ResponseBuilder};

pub struct CommonResponses;

impl utoipa::Modify for CommonResponses {
    fn modify(&self, openapi: &mut OpenApi) {
        for (path, item) in openapi.paths.paths.iter_mut() {
            let authenticated = path.starts_with("/api/v1/");
            for operation in [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ]
            .into_iter()
            .flatten()
            {
                add_common(operation, authenticated);
            }
        }
    }
}

fn add_common(operation: &mut Operation, authenticated: bool) {
    let in_path = operation.parameters.iter().flatten().any(|p| match p {
        RefOr::T(p) => p.parameter_in == ParameterIn::Path,
        RefOr::Ref(_) => false,
    });
    let has_body = operation.request_body.is_some();
    let mut add = |status: u16, description: &str| {
        operation
            .responses
            .responses
            .entry(status.to_string())
            .or_insert_with(|| error_response(description));
    };
    add(
        429,
        "rate limited (per token, per address without a token, or after failed authentications); see `Retry-After`",
    );
    add(503, "the database is unavailable; retry later");
    add(
        422,
        "a parameter is invalid (e.g. holds a NUL character); `field` names it",
    );
    if authenticated {
        add(401, "missing, unknown or revoked token");
        add(403, "the token's role does not allow this");
    }
    if in_path {
        add(404, "not found");
    }
    if has_body {
        add(400, "the body is not JSON");
        add(413, "the body is larger than BATON_BODY_LIMIT");
    }
}

fn error_response(description: &str) -> RefOr<utoipa::openapi::Response> {
    RefOr::T(
        ResponseBuilder::new()
            .description(description)
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("ErrorBody")))
                    .build(),
            )
            .build(),
    )
}
