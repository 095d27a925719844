//! Verified tokens, remembered briefly so a busy client does not cost two queries per request,
//! and the worker streams opened with them, ended when their token is revoked.
//!
//! A token's hash, looked up once, maps to its id, name and role for [`TTL`]. Revoking a token
//! sends `NOTIFY baton_token_revoked` in the revoking transaction and every replica forgets it
//! when that arrives ([`crate::notify`]); the TTL only bounds how long a revocation can go
//! unseen while a replica's `LISTEN` connection is down (it forgets everything when that
//! reconnects). Unknown tokens are never remembered, so a token created a moment ago works at
//! once.
//!
//! Forgetting a revoked token also cancels the [`CancellationToken`] of every worker stream
//! opened with it on this replica ([`TokenCache::watch_stream`]): the session ends the stream
//! with `Unauthenticated` and gets no more work. A notification missed while the listener was
//! down is caught by the session's own check on each heartbeat.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::model::Role;
use crate::model::token::WorkerBinding;

/// How long a verified token is trusted without asking the database again.
pub const TTL: Duration = Duration::from_secs(30);
/// How often `last_used_at` is written for a token in use.
const TOUCH_EVERY: Duration = Duration::from_secs(60);
/// Beyond this many tokens the cache starts over (bounds memory under a flood of tokens).
const MAX_ENTRIES: usize = 10_000;
/// Revoked token ids remembered to refuse a stream registered just after its revocation
/// (beyond, the heartbeat check still catches it).
const MAX_REVOKED: usize = 10_000;

/// Who a token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub id: Uuid,
    pub name: String,
    pub role: Role,
    /// What a worker using this token may declare.
    pub binding: WorkerBinding,
}

#[derive(Debug)]
struct Entry {
    verified: Verified,
    checked_at: Instant,
    touched_at: Instant,
}

/// What the cache knows about a token hash.
#[derive(Debug)]
pub enum Lookup {
    /// Verified recently; `touch` says whether `last_used_at` is due for a write.
    Known { verified: Verified, touch: bool },
    /// Not known (or too old): ask the database, then [`TokenCache::remember`].
    Unknown,
}

#[derive(Debug, Default)]
pub struct TokenCache {
    entries: Mutex<HashMap<Vec<u8>, Entry>>,
    streams: Mutex<OpenStreams>,
}

/// Worker streams per token: one parent [`CancellationToken`] per token id, a child per stream
/// (a dropped child leaves its parent's list by itself).
#[derive(Debug, Default)]
struct OpenStreams {
    by_token: HashMap<Uuid, CancellationToken>,
    revoked: HashSet<Uuid>,
}

impl TokenCache {
    pub fn lookup(&self, hash: &[u8]) -> Lookup {
        let now = Instant::now();
        let mut entries = self.lock();
        let Some(entry) = entries.get_mut(hash) else {
            return Lookup::Unknown;
        };
        if now.duration_since(entry.checked_at) >= TTL {
            entries.remove(hash);
            return Lookup::Unknown;
        }
        let touch = now.duration_since(entry.touched_at) >= TOUCH_EVERY;
        if touch {
            entry.touched_at = now;
        }
        Lookup::Known {
            verified: entry.verified.clone(),
            touch,
        }
    }

    /// Remembers a token just verified (and touched) against the database.
    pub fn remember(&self, hash: Vec<u8>, verified: Verified) {
        let now = Instant::now();
        let mut entries = self.lock();
        if entries.len() >= MAX_ENTRIES {
            entries.clear();
        }
        entries.insert(
            hash,
            Entry {
                verified,
                checked_at: now,
                touched_at: now,
            },
        );
    }

    /// Forgets a revoked token and ends the worker streams opened with it here.
    pub fn forget(&self, id: Uuid) {
        self.lock().retain(|_, e| e.verified.id != id);
        let mut streams = self.lock_streams();
        if streams.revoked.len() >= MAX_REVOKED {
            streams.revoked.clear();
        }
        streams.revoked.insert(id);
        if let Some(parent) = streams.by_token.remove(&id) {
            parent.cancel();
        }
    }

    /// A token cancelled when token `id` is revoked (already cancelled if this replica knows
    /// it is). A worker session selects on it to end its stream.
    pub fn watch_stream(&self, id: Uuid) -> CancellationToken {
        let mut streams = self.lock_streams();
        if streams.revoked.contains(&id) {
            let gone = CancellationToken::new();
            gone.cancel();
            return gone;
        }
        streams.by_token.entry(id).or_default().child_token()
    }

    fn lock_streams(&self) -> std::sync::MutexGuard<'_, OpenStreams> {
        self.streams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Forgets every token (revocations may have been missed).
    pub fn clear(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Vec<u8>, Entry>> {
        // Entries are replaced whole; a panic elsewhere cannot leave one half-written.
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verified(id: Uuid) -> Verified {
        Verified {
            id,
            name: "ci".into(),
            role: Role::Operator,
            binding: WorkerBinding::default(),
        }
    }

    #[test]
    fn remembers_until_forgotten() {
        let cache = TokenCache::default();
        let id = Uuid::now_v7();
        assert!(matches!(cache.lookup(b"h"), Lookup::Unknown));
        cache.remember(b"h".to_vec(), verified(id));
        let Lookup::Known { verified: v, touch } = cache.lookup(b"h") else {
            panic!("just remembered");
        };
        assert_eq!(v.id, id);
        assert!(!touch, "touched when verified");
        cache.forget(Uuid::now_v7());
        assert!(matches!(cache.lookup(b"h"), Lookup::Known { .. }));
        cache.forget(id);
        assert!(matches!(cache.lookup(b"h"), Lookup::Unknown));
        cache.remember(b"h".to_vec(), verified(id));
        cache.clear();
        assert!(matches!(cache.lookup(b"h"), Lookup::Unknown));
    }

    #[test]
    fn revoking_a_token_ends_its_streams_only() {
        let cache = TokenCache::default();
        let (revoked, kept) = (Uuid::now_v7(), Uuid::now_v7());
        let first = cache.watch_stream(revoked);
        let second = cache.watch_stream(revoked);
        let other = cache.watch_stream(kept);
        cache.clear();
        assert!(!first.is_cancelled(), "a cache reset is not a revocation");
        cache.forget(revoked);
        assert!(first.is_cancelled() && second.is_cancelled());
        assert!(!other.is_cancelled());
        assert!(
            cache.watch_stream(revoked).is_cancelled(),
            "a stream registered after the revocation is refused"
        );
    }
}
