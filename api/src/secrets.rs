//! Secret variables on their way to a script and out of its logs: the values a job may read
//! (global and its event's own, event scope winning), decrypted for the assignment, and masked
//! as `***` in every log line stored — so in live streams too, which read what is stored.

use std::collections::BTreeMap;

use sqlx::PgPool;
use uuid::Uuid;

use crate::crypto::Vault;
use crate::storage::{StorageError, variables};

/// What replaces a secret in logs.
pub const MASK: &str = "***";

/// Variables a run of `event_id` may read, decrypted: key → value, and the secret values.
pub async fn readable_variables(
    pool: &PgPool,
    vault: &Vault,
    event_id: Uuid,
) -> Result<(BTreeMap<String, String>, Vec<String>), StorageError> {
    let mut values = BTreeMap::new();
    let mut secrets = Vec::new();
    for row in variables::visible_to(pool, event_id).await? {
        let value = match (&row.value, &row.sealed) {
            (Some(v), _) => v.clone(),
            (None, Some(sealed)) => match vault.open(sealed, &row.sealed_with()) {
                Ok(plain) => String::from_utf8_lossy(&plain).into_owned(),
                Err(e) => {
                    tracing::warn!(variable = %row.key, error = %e, "secret variable unreadable; not passed to the script");
                    continue;
                }
            },
            (None, None) => continue,
        };
        if row.secret && !value.is_empty() {
            secrets.push(value.clone());
        }
        values.insert(row.key, value);
    }
    // Longest first, so a secret containing another is masked whole.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    Ok((values, secrets))
}

/// The secret values the job `job_id` may read.
pub async fn readable_secrets(
    pool: &PgPool,
    vault: &Vault,
    job_id: Uuid,
) -> Result<Vec<String>, StorageError> {
    let event_id: Option<Uuid> = sqlx::query_scalar("SELECT event_id FROM jobs WHERE id = $1")
        .bind(job_id)
        .fetch_optional(pool)
        .await?;
    match event_id {
        Some(event_id) => Ok(readable_variables(pool, vault, event_id).await?.1),
        None => Ok(Vec::new()),
    }
}

/// `text` with every secret value replaced by [`MASK`].
pub fn mask(text: &str, secrets: &[String]) -> String {
    let mut out = text.to_owned();
    for secret in secrets {
        if out.contains(secret.as_str()) {
            out = out.replace(secret.as_str(), MASK);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_every_occurrence_longest_first() {
        let secrets = vec!["hunter2-long".to_owned(), "hunter2".to_owned()];
        assert_eq!(
            mask("pw=hunter2-long and hunter2", &secrets),
            "pw=*** and ***"
        );
        assert_eq!(mask("nothing here", &secrets), "nothing here");
    }
}
