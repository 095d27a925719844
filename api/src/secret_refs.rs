//! Secret references (`{{secret.NAME}}`, see [`baton_proto::secret_ref`]) resolved on the api:
//! in the target of a message, by the outbox, at delivery time. The stored target keeps the
//! reference; the value lives only in the request that is sent.

use std::borrow::Cow;

use sqlx::PgPool;
use uuid::Uuid;

use crate::crypto::Vault;

/// `text` with its references replaced by the values of the variables the event `event_id`
/// can read (global, or its own). The error says which reference failed, never a value.
pub async fn resolve_for_event<'a>(
    pool: &PgPool,
    vault: &Vault,
    event_id: Option<Uuid>,
    text: &'a str,
) -> Result<Cow<'a, str>, String> {
    if !baton_proto::secret_ref::has_references(text) {
        return Ok(Cow::Borrowed(text));
    }
    let Some(event_id) = event_id else {
        return Err("its secret references cannot be resolved: the event is gone".to_owned());
    };
    let (values, _) = crate::secrets::readable_variables(pool, vault, event_id)
        .await
        .map_err(|e| format!("cannot read the variables its secret references need: {e}"))?;
    let resolved =
        baton_proto::secret_ref::resolve(text, |name| values.get(name).map(String::as_str))
            .map_err(|e| e.to_string())?;
    Ok(Cow::Owned(resolved.into_owned()))
}
