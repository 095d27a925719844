//! Events recently run on this replica, so `POST /events/{id}/run` is one statement.
//!
//! An entry is never trusted on its own: the enqueue inserts the job only while the event is
//! still at the entry's revision (`events.revision`, checked in the same statement). A stale
//! entry — the event changed or was deleted, on any replica — makes the enqueue insert
//! nothing; the caller then forgets it and reads the event again. So no invalidation message is
//! needed and a job is never made from a definition replaced before its insert began.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use uuid::Uuid;

use crate::model::Event;
use crate::storage::{Result, events};

/// Beyond this many events the cache starts over.
const MAX_ENTRIES: usize = 1024;
/// Events with a larger script are not kept (bounds the cache's memory to ~64 MiB).
const MAX_CONTENT: usize = 64 * 1024;

#[derive(Debug, Default)]
pub struct EventCache {
    entries: Mutex<HashMap<Uuid, Arc<Event>>>,
}

impl EventCache {
    /// The event as last seen here, or as read from the database now.
    pub async fn get(&self, db: &sqlx::PgPool, id: Uuid) -> Result<Arc<Event>> {
        if let Some(found) = self.lock().get(&id) {
            return Ok(found.clone());
        }
        self.load(db, id).await
    }

    /// Reads the event from the database (remembering it), e.g. after a stale entry.
    pub async fn load(&self, db: &sqlx::PgPool, id: Uuid) -> Result<Arc<Event>> {
        let event = match events::get_event(db, id).await {
            Ok(event) => Arc::new(event),
            Err(e) => {
                self.forget(id);
                return Err(e);
            }
        };
        if event.spec.content.as_ref().map_or(0, String::len) <= MAX_CONTENT {
            let mut entries = self.lock();
            if entries.len() >= MAX_ENTRIES {
                entries.clear();
            }
            entries.insert(id, event.clone());
        }
        Ok(event)
    }

    pub fn forget(&self, id: Uuid) {
        self.lock().remove(&id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Arc<Event>>> {
        // A panic while holding this lock cannot leave the map inconsistent.
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
