//! The exchange: the key/value data of this broker's shard.
//!
//! Values are JSON text, stored as given. Keys are placed on brokers by rendezvous hashing,
//! like channels, so each broker holds its own shard.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use bytes::Bytes;

/// The key/value store of one broker.
#[derive(Debug, Default)]
pub struct Exchange {
    /// std Mutex: every operation is a single map access, never held across await.
    data: Mutex<HashMap<String, Bytes>>,
}

impl Exchange {
    /// Stores `value` under `key`.
    pub fn set(&self, key: String, value: Bytes) {
        self.lock().insert(key, value);
    }

    /// The value under `key`.
    pub fn get(&self, key: &str) -> Option<Bytes> {
        self.lock().get(key).cloned()
    }

    /// Removes `key`, returning its value.
    pub fn remove(&self, key: &str) -> Option<Bytes> {
        self.lock().remove(key)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Bytes>> {
        self.data.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_remove() {
        let ex = Exchange::default();
        assert_eq!(ex.get("k"), None);
        ex.set("k".into(), Bytes::from_static(b"{\"a\":1}"));
        assert_eq!(ex.get("k").as_deref(), Some(&b"{\"a\":1}"[..]));
        assert_eq!(ex.remove("k").as_deref(), Some(&b"{\"a\":1}"[..]));
        assert_eq!(ex.remove("k"), None);
    }
}
