//! Variables (secret values are never shown: the API does not return them) and servers (with
//! their pinned host keys and fingerprints), through the REST handlers.

use axum::extract::{Query, State};
use axum::response::Response;
use base64::Engine;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::render::{DashError, show};
use super::session::Session;
use crate::AppState;
use crate::http::{servers, variables};

pub async fn variables(
    State(state): State<AppState>,
    session: Session,
) -> Result<Response, DashError> {
    // Every scope: the global ones and each event's.
    let axum::Json(list) = variables::list_variables(
        State(state.clone()),
        session.caller.clone(),
        Ok(Query(variables::ScopeQuery { scope: None })),
    )
    .await?;
    show(
        "variables.html",
        &session,
        "variables",
        "Variables",
        json!({"variables": list}),
    )
}

/// `SHA256:…` of an OpenSSH public key line (`type base64 [comment]`), as `ssh-keygen -l` shows.
pub fn fingerprint(host_key: &str) -> Option<String> {
    let blob = host_key.split_whitespace().nth(1)?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(blob)
        .ok()?;
    let digest = Sha256::digest(&raw);
    Some(format!(
        "SHA256:{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
    ))
}

pub async fn servers(
    State(state): State<AppState>,
    session: Session,
) -> Result<Response, DashError> {
    let axum::Json(list) = servers::list_servers(State(state), session.caller.clone()).await?;
    let items: Vec<_> = list
        .iter()
        .map(|s| json!({"s": s, "fingerprint": s.host_key.as_deref().and_then(fingerprint), "key_type": s.host_key.as_deref().and_then(|k| k.split_whitespace().next())}))
        .collect();
    show(
        "servers.html",
        &session,
        "servers",
        "Servers",
        json!({"servers": items}),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn fingerprints_match_ssh_keygen() {
        // ssh-keygen -lf of this key: SHA256:RBLZNA… (computed over the decoded blob).
        let key =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl test";
        let fp = super::fingerprint(key).expect("a fingerprint");
        assert!(fp.starts_with("SHA256:") && fp.len() == 7 + 43, "{fp}");
        assert_eq!(super::fingerprint("garbage"), None);
    }
}
