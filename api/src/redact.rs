//! What callers other than admins see of definitions that may hold credentials.
//!
//! Admins write event and action definitions and see them whole. Viewers and operators see
//! them with inlined credentials hidden: an `env` value and an http `request.headers` value
//! become `***`, and a URL (the http `request.url`, a webhook/Slack/Discord `target`) keeps
//! only its scheme and host (`https://hooks.slack.com/***`: such URLs carry their secret in
//! the path, and user info or a query string may hold a password). A value made only of
//! secret references (`{{secret.NAME}}`) holds no credential and is shown as is.

use baton_proto::secret_ref::only_references;

use crate::model::action::{Action, ActionSpec, Channel};
use crate::model::{Event, Role};

/// What replaces a hidden value.
pub const HIDDEN: &str = "***";

/// Whether `role` sees definitions whole.
pub fn sees_credentials(role: Role) -> bool {
    role == Role::Admin
}

/// An event as `role` may see it.
pub fn event(role: Role, mut event: Event) -> Event {
    if sees_credentials(role) {
        return event;
    }
    for value in event.spec.env.values_mut() {
        *value = hidden_value(value);
    }
    if let Some(request) = &mut event.spec.request {
        for value in request.headers.values_mut() {
            *value = hidden_value(value);
        }
        request.url = url_origin(&request.url);
    }
    event
}

/// An action as `role` may see it.
pub fn action(role: Role, mut action: Action) -> Action {
    if sees_credentials(role) {
        return action;
    }
    if let ActionSpec::SendMessage {
        channel, target, ..
    } = &mut action.action
        && *channel != Channel::Email
    {
        *target = url_origin(target);
    }
    action
}

fn hidden_value(value: &str) -> String {
    if only_references(value) {
        value.to_owned()
    } else {
        HIDDEN.to_owned()
    }
}

/// `scheme://host[:port]`, followed by `/***` when anything came after the host; no user
/// info. A bare reference is kept; anything that is not a URL is hidden.
pub fn url_origin(url: &str) -> String {
    if only_references(url) {
        return url.to_owned();
    }
    let Some((scheme, rest)) = url.split_once("://") else {
        return HIDDEN.to_owned();
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..end];
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    let tail = if end < rest.len() { "/***" } else { "" };
    format!("{scheme}://{host}{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_keep_scheme_and_host_only() {
        assert_eq!(
            url_origin("https://hooks.slack.com/services/T0/B0/XXXX"),
            "https://hooks.slack.com/***"
        );
        assert_eq!(
            url_origin("http://user:pw@example.com:8080?token=1"),
            "http://example.com:8080/***"
        );
        assert_eq!(url_origin("https://example.com"), "https://example.com");
        assert_eq!(url_origin("{{secret.HOOK}}"), "{{secret.HOOK}}");
        assert_eq!(url_origin("not a url"), HIDDEN);
    }

    #[test]
    fn values_are_hidden_unless_only_references() {
        assert_eq!(hidden_value("postgres://u:pw@db"), HIDDEN);
        assert_eq!(hidden_value("Bearer {{secret.T}}"), HIDDEN);
        assert_eq!(hidden_value("{{secret.T}}"), "{{secret.T}}");
    }
}
