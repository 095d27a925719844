//! References to secret variables: `{{secret.NAME}}` (spaces allowed inside the braces:
//! `{{ secret.NAME }}`).
//!
//! They may appear in an event's `env` values, in its `request.headers` values (http
//! runtime) and in the `target` of a `send_message` action (webhook, Slack, Discord), so that
//! these never hold a credential in clear. The event snapshot keeps the references; the worker
//! replaces them in `env` and headers from the variables of its assignment just before the run,
//! and the api's outbox replaces them in a target when it delivers the message. `NAME` is a
//! variable key (`[A-Za-z0-9_.-]`, 1-128 characters) the event can read: a global variable or
//! one scoped to the event (the event's own wins). Any other `{{` is literal text.
//!
//! This is the contract between the api (which checks the syntax) and the worker (which
//! resolves), so it lives with the protocol.

use std::borrow::Cow;

const OPEN: &str = "{{";
const CLOSE: &str = "}}";
const PREFIX: &str = "secret.";
const MAX_NAME: usize = 128;

/// A reference that does not parse, or one that cannot be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretRefError {
    #[error(
        "malformed secret reference at byte {at}: write {{{{secret.NAME}}}} with NAME of 1-128 [A-Za-z0-9_.-]"
    )]
    Malformed { at: usize },
    #[error("references the variable {0:?}, which does not exist or this event cannot read")]
    Unreadable(String),
}

/// One piece of a text: literal, or a reference to a variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece<'a> {
    Text(&'a str),
    Secret(&'a str),
}

/// Splits `text` into literal pieces and references, or says where a reference is malformed.
pub fn parse(text: &str) -> Result<Vec<Piece<'_>>, SecretRefError> {
    let mut pieces = Vec::new();
    let mut rest = text;
    let mut offset = 0;
    loop {
        let Some(start) = find_reference(rest) else {
            if !rest.is_empty() {
                pieces.push(Piece::Text(rest));
            }
            return Ok(pieces);
        };
        if start > 0 {
            pieces.push(Piece::Text(&rest[..start]));
        }
        let inner = rest[start + OPEN.len()..].trim_start();
        let inner = &inner[PREFIX.len()..];
        let name_len = inner
            .find(|c: char| !is_name_char(c))
            .unwrap_or(inner.len());
        let name = &inner[..name_len];
        let after = inner[name_len..].trim_start();
        if name.is_empty()
            || name.len() > MAX_NAME
            || name == "."
            || name == ".."
            || !after.starts_with(CLOSE)
        {
            return Err(SecretRefError::Malformed { at: offset + start });
        }
        pieces.push(Piece::Secret(name));
        let consumed = rest.len() - after.len() + CLOSE.len();
        offset += consumed;
        rest = &rest[consumed..];
    }
}

/// Where the next `{{ secret.` begins in `text`.
fn find_reference(text: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(pos) = text[from..].find(OPEN) {
        let at = from + pos;
        if text[at + OPEN.len()..].trim_start().starts_with(PREFIX) {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "_.-".contains(c)
}

/// Whether `text` contains a reference (malformed ones included).
pub fn has_references(text: &str) -> bool {
    find_reference(text).is_some()
}

/// Whether `text` is made of references only (and spaces between them): nothing literal, so
/// nothing it shows can be a credential.
pub fn only_references(text: &str) -> bool {
    match parse(text) {
        Ok(pieces) => {
            pieces.iter().any(|p| matches!(p, Piece::Secret(_)))
                && pieces.iter().all(|p| match p {
                    Piece::Secret(_) => true,
                    Piece::Text(t) => t.trim().is_empty(),
                })
        }
        Err(_) => false,
    }
}

/// `text` with every reference replaced by `lookup(NAME)`; an unknown name is an error.
pub fn resolve<'a, 'v>(
    text: &'a str,
    lookup: impl Fn(&str) -> Option<&'v str>,
) -> Result<Cow<'a, str>, SecretRefError> {
    if !has_references(text) {
        return Ok(Cow::Borrowed(text));
    }
    let mut out = String::with_capacity(text.len());
    for piece in parse(text)? {
        match piece {
            Piece::Text(t) => out.push_str(t),
            Piece::Secret(name) => out
                .push_str(lookup(name).ok_or_else(|| SecretRefError::Unreadable(name.to_owned()))?),
        }
    }
    Ok(Cow::Owned(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(name: &str) -> Option<&'static str> {
        match name {
            "API_KEY" => Some("s3cr3t"),
            "db.pass-1" => Some("pw"),
            _ => None,
        }
    }

    #[test]
    fn resolves_references_anywhere_in_the_text() {
        assert_eq!(
            resolve("Bearer {{secret.API_KEY}}", vars).expect("resolves"),
            "Bearer s3cr3t"
        );
        assert_eq!(
            resolve("{{ secret.API_KEY }}:{{secret.db.pass-1}}", vars).expect("resolves"),
            "s3cr3t:pw"
        );
        assert_eq!(resolve("plain", vars).expect("resolves"), "plain");
        assert!(matches!(
            resolve("plain", vars).expect("resolves"),
            Cow::Borrowed(_)
        ));
        // Other braces are literal.
        assert_eq!(
            resolve("{{ name }} {{", vars).expect("resolves"),
            "{{ name }} {{"
        );
    }

    #[test]
    fn unknown_and_malformed_references_are_errors() {
        assert_eq!(
            resolve("x{{secret.NOPE}}", vars),
            Err(SecretRefError::Unreadable("NOPE".into()))
        );
        for bad in [
            "{{secret.}}",
            "{{secret.API_KEY",
            "a {{secret.API KEY}}",
            "{{secret.$x}}",
            "{{secret..}}",
        ] {
            assert!(
                matches!(parse(bad), Err(SecretRefError::Malformed { .. })),
                "{bad}"
            );
        }
        assert_eq!(
            parse("ab{{secret.}}"),
            Err(SecretRefError::Malformed { at: 2 })
        );
    }

    #[test]
    fn only_references_means_nothing_literal() {
        assert!(only_references("{{secret.A}}"));
        assert!(only_references(" {{secret.A}} {{ secret.B }}"));
        assert!(!only_references("Bearer {{secret.A}}"));
        assert!(!only_references("plain"));
        assert!(!only_references(""));
        assert!(!only_references("{{secret.}}"));
    }
}
