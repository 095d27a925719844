//! Bearer tokens: generation, hashing, the admin bootstrap, and the [`Caller`] extractor that
//! authenticates every REST request.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use rand::Rng;
use rand::distr::Alphanumeric;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use crate::error::ApiError;
use crate::model::Role;
use crate::model::token::WorkerBinding;
use crate::storage::{self, tokens};
use crate::token_cache::{Lookup, Verified};

/// Prefix of every Baton token, so leaked tokens are easy to recognise and scan for.
pub const TOKEN_PREFIX: &str = "baton_";

/// A new random token: the prefix and 40 alphanumerics (~238 bits).
pub fn generate_token() -> String {
    let body: String = rand::rng()
        .sample_iter(&Alphanumeric)
        .take(40)
        .map(char::from)
        .collect();
    format!("{TOKEN_PREFIX}{body}")
}

pub fn hash_token(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// Who `token` belongs to, if it is live: from the [`TokenCache`](crate::token_cache) when
/// verified recently, else from the database (recording its use at most once a minute).
pub async fn verify(
    state: &crate::AppState,
    token: &str,
) -> Result<Option<Verified>, storage::StorageError> {
    let hash = hash_token(token);
    match state.tokens.lookup(&hash) {
        Lookup::Known { verified, touch } => {
            if touch {
                tokens::touch(&state.pool, verified.id).await?;
            }
            Ok(Some(verified))
        }
        Lookup::Unknown => {
            let Some(info) = tokens::find_by_hash(&state.pool, &hash).await? else {
                return Ok(None);
            };
            tokens::touch(&state.pool, info.id).await?;
            let verified = Verified {
                binding: info.binding(),
                id: info.id,
                name: info.name,
                role: info.role,
            };
            state.tokens.remember(hash, verified.clone());
            Ok(Some(verified))
        }
    }
}

/// What is shown of a token to recognise it: its first 12 characters.
pub fn display_prefix(token: &str) -> String {
    token.chars().take(12).collect()
}

/// Stores a token of `role` and returns its secret.
pub async fn create_token(
    pool: &PgPool,
    name: &str,
    role: Role,
    created_by: Option<Uuid>,
) -> storage::Result<(crate::model::Token, String)> {
    create_bound_token(pool, name, role, created_by, &WorkerBinding::default()).await
}

/// Stores a token of `role` (a worker token bound to `binding`) and returns its secret.
pub async fn create_bound_token(
    pool: &PgPool,
    name: &str,
    role: Role,
    created_by: Option<Uuid>,
    binding: &WorkerBinding,
) -> storage::Result<(crate::model::Token, String)> {
    let secret = generate_token();
    let info = tokens::insert_bound_token(
        pool,
        name,
        role,
        &hash_token(&secret),
        &display_prefix(&secret),
        created_by,
        binding,
    )
    .await?;
    Ok((info, secret))
}

/// Makes sure an admin can log in: registers `configured` (BATON_ADMIN_TOKEN) if given and
/// unknown, or generates a token when no live admin exists. Returns a generated token, which
/// the caller prints once; it is never shown again.
///
/// A configured token that was revoked stays revoked: it is neither re-activated nor
/// registered again (which used to fail the start on the unique hash). The start goes on,
/// logging that the configured token is revoked; if no live admin token is left, one is
/// generated as on a first start.
pub async fn bootstrap_admin(
    pool: &PgPool,
    configured: Option<&str>,
) -> anyhow::Result<Option<String>> {
    if let Some(token) = configured {
        anyhow::ensure!(
            token.len() >= 16,
            "BATON_ADMIN_TOKEN must be at least 16 characters long"
        );
        let hash = hash_token(token);
        match tokens::hash_is_live(pool, &hash).await? {
            Some(true) => return Ok(None),
            Some(false) => {
                tracing::error!(
                    token.prefix = %display_prefix(token),
                    "BATON_ADMIN_TOKEN is a revoked token: it is not accepted and was not re-activated; \
                     set a new BATON_ADMIN_TOKEN (or remove it and use another admin token)"
                );
            }
            None => {
                let inserted = tokens::insert_token(
                    pool,
                    "admin (BATON_ADMIN_TOKEN)",
                    Role::Admin,
                    &hash,
                    &display_prefix(token),
                    None,
                )
                .await;
                // Another replica starting at the same time may have registered it first.
                match inserted {
                    Ok(_) => return Ok(None),
                    Err(e) => match tokens::hash_is_live(pool, &hash).await? {
                        Some(true) => return Ok(None),
                        _ => return Err(e.into()),
                    },
                }
            }
        }
    }
    if tokens::admin_exists(pool).await? {
        return Ok(None);
    }
    let (_, secret) = create_token(pool, "admin (generated)", Role::Admin, None).await?;
    Ok(Some(secret))
}

/// Registers a token whose secret the operator chose (or that was kept from an earlier run),
/// unless it is already known. A known token that was revoked stays revoked (logged).
/// Replicas starting together may register the same token at once: the loser finds it live.
pub async fn register_token(
    pool: &PgPool,
    name: &str,
    role: Role,
    secret: &str,
) -> storage::Result<()> {
    let hash = hash_token(secret);
    match tokens::hash_is_live(pool, &hash).await? {
        Some(true) => {}
        Some(false) => tracing::error!(
            token.prefix = %display_prefix(secret),
            "the token {name:?} was revoked: it stays revoked and is not accepted"
        ),
        None => {
            let inserted =
                tokens::insert_token(pool, name, role, &hash, &display_prefix(secret), None).await;
            if let Err(e) = inserted
                && tokens::hash_is_live(pool, &hash).await? != Some(true)
            {
                return Err(e);
            }
        }
    }
    Ok(())
}

/// Registers `BATON_WORKER_TOKEN` (see [`register_token`]): a deployment's shared worker secret.
pub async fn bootstrap_worker(pool: &PgPool, token: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        token.len() >= 16,
        "BATON_WORKER_TOKEN must be at least 16 characters long"
    );
    register_token(pool, "worker (BATON_WORKER_TOKEN)", Role::Worker, token).await?;
    Ok(())
}

/// The authenticated caller of a REST request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub token_id: Uuid,
    pub name: String,
    pub role: Role,
}

impl Caller {
    /// Fails with 403 unless the caller's role allows `required`.
    pub fn require(&self, required: Role) -> Result<(), ApiError> {
        if self.role.allows(required) {
            Ok(())
        } else if self.role == Role::Worker {
            Err(ApiError::Forbidden(
                "worker tokens can only be used by workers".into(),
            ))
        } else {
            Err(ApiError::Forbidden(format!(
                "this needs the {required} role; the token {:?} has role {}",
                self.name, self.role
            )))
        }
    }
}

impl FromRequestParts<crate::AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &crate::AppState,
    ) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or_else(|| {
                ApiError::Unauthorized("missing Authorization: Bearer <token> header".into())
            })?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| {
                h.strip_prefix("Bearer ")
                    .or_else(|| h.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                ApiError::Unauthorized("the Authorization header must be `Bearer <token>`".into())
            })?;
        let info = verify(state, token)
            .await?
            .ok_or_else(|| ApiError::Unauthorized("unknown or revoked token".into()))?;
        if let Some(verified) = parts
            .extensions
            .get::<crate::http::rate_limit::AuthVerified>()
        {
            verified.mark();
        }
        Ok(Caller {
            token_id: info.id,
            name: info.name,
            role: info.role,
        })
    }
}
