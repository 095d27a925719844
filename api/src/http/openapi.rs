//! The OpenAPI document: its header, the bearer scheme, and the answers every operation can
//! give whatever its handler does (a missing token, a malformed body, a rate limit…), added to
//! each operation once its routes are known so that no handler has to repeat them.

use utoipa::OpenApi;
use utoipa::openapi::path::{Operation, ParameterIn};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{Content, Ref, RefOr, ResponseBuilder};

#[derive(OpenApi)]
#[openapi(
    info(title = "Baton API", description = "Queue, run and chain jobs on Baton's workers."),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    components(schemas(crate::error::ErrorBody))
)]
pub(super) struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Adds to every operation the answers the layers around its handler can give.
pub(super) fn with_common_responses(
    mut spec: utoipa::openapi::OpenApi,
) -> utoipa::openapi::OpenApi {
    let global_security = spec.security.as_ref().is_some_and(|s| !s.is_empty());
    for item in spec.paths.paths.values_mut() {
        for op in [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ]
        .into_iter()
        .flatten()
        {
            add_common(op, global_security);
        }
    }
    spec
}

fn add_common(op: &mut Operation, global_security: bool) {
    // `security()` on an operation (health checks) clears the global requirement.
    let authenticated = match &op.security {
        Some(list) => !list.is_empty() && list.iter().any(|r| *r != Default::default()),
        None => global_security,
    };
    let has_body = op.request_body.is_some();
    let has_params = op.parameters.as_ref().is_some_and(|params| {
        params.iter().any(|p| match p {
            RefOr::T(p) => matches!(p.parameter_in, ParameterIn::Query | ParameterIn::Path),
            RefOr::Ref(_) => true,
        })
    });
    if authenticated {
        add(
            op,
            "401",
            "no bearer token, or an unknown, revoked or expired one",
        );
        add(op, "403", "the token's role may not do this");
        add(
            op,
            "429",
            "too many requests; retry after the `Retry-After` seconds",
        );
        add(op, "503", "the database is unavailable right now; retry");
    }
    if has_body {
        add(op, "400", "the body is not JSON");
        add(op, "413", "the body is larger than the configured limit");
        add(op, "422", "a field is invalid (named in `error.field`)");
    }
    if has_params {
        add(op, "400", "a query string that cannot be parsed at all");
        add(
            op,
            "422",
            "a path or query parameter is invalid (named in `error.field`)",
        );
    }
}

/// Adds an error answer for `status` unless the operation documents one already.
fn add(op: &mut Operation, status: &str, description: &str) {
    if op.responses.responses.contains_key(status) {
        return;
    }
    let response = ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            Content::new(Some(Ref::from_schema_name("ErrorBody"))),
        )
        .build();
    op.responses
        .responses
        .insert(status.to_owned(), response.into());
}
