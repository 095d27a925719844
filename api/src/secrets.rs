//! Secret variables on their way to a script and out of what it produced: the values a job may
//! read (global and its event's own, event scope winning), decrypted for the assignment, and
//! the secrets among them, which `crate::masking` masks as `***` in every log line, output,
//! error and message stored — so in live streams too, which read what is stored.

use std::collections::BTreeMap;

use sqlx::{PgExecutor, PgPool};
use uuid::Uuid;

use crate::crypto::Vault;
use crate::masking::Secrets;
use crate::storage::{StorageError, variables};

/// Variables a run of `event_id` may read, decrypted: key → value, and the secret values.
pub async fn readable_variables(
    db: impl PgExecutor<'_>,
    vault: &Vault,
    event_id: Uuid,
) -> Result<(BTreeMap<String, String>, Vec<String>), StorageError> {
    let mut values = BTreeMap::new();
    let mut secrets = Vec::new();
    for row in variables::visible_to(db, event_id).await? {
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

/// The secrets a run of `event_id` may read, ready to mask with.
pub async fn event_secrets(
    db: impl PgExecutor<'_>,
    vault: &Vault,
    event_id: Uuid,
) -> Result<Secrets, StorageError> {
    Ok(Secrets::new(
        readable_variables(db, vault, event_id).await?.1,
    ))
}

/// The secrets the job `job_id` may read, ready to mask with. An error is an error: a caller
/// must not store what it meant to mask (masking nothing would fail open).
pub async fn job_secrets(
    pool: &PgPool,
    vault: &Vault,
    job_id: Uuid,
) -> Result<Secrets, StorageError> {
    let event_id: Option<Uuid> = sqlx::query_scalar("SELECT event_id FROM jobs WHERE id = $1")
        .bind(job_id)
        .fetch_optional(pool)
        .await?;
    match event_id {
        Some(event_id) => event_secrets(pool, vault, event_id).await,
        None => Ok(Secrets::default()),
    }
}
