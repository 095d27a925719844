//! How many live log streams (SSE and WebSocket) each token holds open, bounded per token: a
//! stream takes a slot when it starts and gives it back when its reader ends, however it ends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use uuid::Uuid;

#[derive(Debug)]
pub struct StreamSlots {
    limit: u32,
    held: Mutex<HashMap<Uuid, u32>>,
}

/// One open stream's slot; dropping it frees the slot.
#[derive(Debug)]
pub struct StreamSlot {
    slots: Arc<StreamSlots>,
    token_id: Uuid,
}

impl StreamSlots {
    pub fn new(limit: u32) -> Arc<Self> {
        Arc::new(Self {
            limit,
            held: Mutex::default(),
        })
    }

    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// A slot for `token_id`, or None when it holds `limit` already.
    pub fn acquire(self: &Arc<Self>, token_id: Uuid) -> Option<StreamSlot> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let count = held.entry(token_id).or_insert(0);
        if *count >= self.limit {
            return None;
        }
        *count += 1;
        Some(StreamSlot {
            slots: self.clone(),
            token_id,
        })
    }

    /// Streams `token_id` holds open now.
    pub fn held(&self, token_id: Uuid) -> u32 {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.get(&token_id).copied().unwrap_or(0)
    }

    /// Streams open on this replica.
    pub fn total(&self) -> u32 {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.values().sum()
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut held = self.slots.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = held.get_mut(&self.token_id) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                held.remove(&self.token_id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_bounded_per_token_and_freed_on_drop() {
        let slots = StreamSlots::new(2);
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let first = slots.acquire(a).expect("1");
        let _second = slots.acquire(a).expect("2");
        assert!(slots.acquire(a).is_none(), "third refused");
        let _other = slots.acquire(b).expect("another token");
        drop(first);
        assert_eq!(slots.held(a), 1);
        assert!(slots.acquire(a).is_some(), "freed slot reused");
        assert_eq!(slots.total(), 2, "the temporary slot was dropped");
    }
}
