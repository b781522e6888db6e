//! Where the exchange data lives: this broker's memory ([`Exchange`], its keys following their
//! owner through [`crate::handover`]) or Redis ([`crate::redis`], shared by every broker and
//! every cluster on it). The gRPC service calls this, whatever the backend.

use std::sync::Arc;

use crate::exchange::{Exchange, ExchangeError};
use crate::handover::Gate;

/// The exchange backend; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) enum Store {
    /// In this broker's memory; calls wait at the gate while keys are pulled in.
    Memory { exchange: Arc<Exchange>, gate: Gate },
    /// In Redis.
    Redis(Arc<crate::redis::RedisKv>),
}

impl Store {
    /// Stores `value` (JSON text) under `key`, replacing it and any expiry.
    pub(crate) async fn set(&self, key: String, value: &[u8]) -> Result<(), ExchangeError> {
        match self {
            Self::Memory { exchange, gate } => {
                let _open = gate.read().await;
                exchange.set(key, value)
            }
            Self::Redis(redis) => redis.set(&key, value).await,
        }
    }

    /// The value under `key`, as JSON text.
    pub(crate) async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, ExchangeError> {
        match self {
            Self::Memory { exchange, gate } => {
                let _open = gate.read().await;
                Ok(exchange.get(key))
            }
            Self::Redis(redis) => redis.get(key).await,
        }
    }

    /// Removes `key`, returning its value as JSON text.
    pub(crate) async fn remove(&self, key: &str) -> Result<Option<Vec<u8>>, ExchangeError> {
        match self {
            Self::Memory { exchange, gate } => {
                let _open = gate.read().await;
                Ok(exchange.remove(key))
            }
            Self::Redis(redis) => redis.remove(key).await,
        }
    }

    /// Appends `value` to the list under `key` (creating it); returns its index.
    pub(crate) async fn add(&self, key: String, value: &[u8]) -> Result<u64, ExchangeError> {
        match self {
            Self::Memory { exchange, gate } => {
                let _open = gate.read().await;
                exchange.add(key, value)
            }
            Self::Redis(redis) => redis.add(&key, value).await,
        }
    }

    /// The slice `[start, end)` of the list under `key` as a JSON array text.
    pub(crate) async fn get_range(
        &self,
        key: &str,
        start: i64,
        end: Option<i64>,
    ) -> Result<Vec<u8>, ExchangeError> {
        match self {
            Self::Memory { exchange, gate } => {
                let _open = gate.read().await;
                exchange.get_range(key, start, end)
            }
            Self::Redis(redis) => redis.get_range(key, start, end).await,
        }
    }

    /// Removes the slice `[start, end)` of the list under `key`; returns it as a JSON array.
    pub(crate) async fn remove_range(
        &self,
        key: &str,
        start: i64,
        end: Option<i64>,
    ) -> Result<Vec<u8>, ExchangeError> {
        match self {
            Self::Memory { exchange, gate } => {
                let _open = gate.read().await;
                exchange.remove_range(key, start, end)
            }
            Self::Redis(redis) => redis.remove_range(key, start, end).await,
        }
    }

    /// Elements of the list, or keys of the object, under `key`; 1 for another value, 0 if absent.
    pub(crate) async fn count(&self, key: &str) -> Result<u64, ExchangeError> {
        match self {
            Self::Memory { exchange, gate } => {
                let _open = gate.read().await;
                Ok(exchange.count(key))
            }
            Self::Redis(redis) => redis.count(key).await,
        }
    }

    /// Whether `key` exists.
    pub(crate) async fn has_key(&self, key: &str) -> Result<bool, ExchangeError> {
        match self {
            Self::Memory { exchange, gate } => {
                let _open = gate.read().await;
                Ok(exchange.has_key(key))
            }
            Self::Redis(redis) => redis.has_key(key).await,
        }
    }

    /// Makes `keys` expire `seconds` from now; returns how many exist.
    pub(crate) async fn expire(&self, keys: &[String], seconds: u64) -> Result<u64, ExchangeError> {
        match self {
            Self::Memory { exchange, gate } => {
                let _open = gate.read().await;
                Ok(exchange.expire(keys, seconds))
            }
            Self::Redis(redis) => redis.expire(keys, seconds).await,
        }
    }

    /// Makes `keys` permanent; returns how many exist.
    pub(crate) async fn unexpire(&self, keys: &[String]) -> Result<u64, ExchangeError> {
        match self {
            Self::Memory { exchange, gate } => {
                let _open = gate.read().await;
                Ok(exchange.unexpire(keys))
            }
            Self::Redis(redis) => redis.unexpire(keys).await,
        }
    }

    /// When `key` expires (ms since the Unix epoch).
    pub(crate) async fn get_expiry(&self, key: &str) -> Result<Option<u64>, ExchangeError> {
        match self {
            Self::Memory { exchange, gate } => {
                let _open = gate.read().await;
                Ok(exchange.get_expiry(key))
            }
            Self::Redis(redis) => redis.get_expiry(key).await,
        }
    }

    /// The memory store, for the broker-to-broker key moves (`None` with Redis).
    pub(crate) fn memory(&self) -> Option<&Arc<Exchange>> {
        match self {
            Self::Memory { exchange, .. } => Some(exchange),
            Self::Redis(_) => None,
        }
    }
}
