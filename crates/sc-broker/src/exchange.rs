//! The exchange: the key/value data of this broker's shard.
//!
//! Keys are placed on brokers by rendezvous hashing, like channels, so each broker holds its
//! own shard. Values are JSON; `add`, `get_range`, `remove_range` and `count` work on lists (and
//! `count` on objects too). Keys may expire: an expired key reads as absent at once and is swept
//! out of memory by [`Exchange::sweep`], which the broker calls every second.
//!
//! Keys move between brokers when the membership changes (see [`crate::handover`]): each entry
//! keeps when it was last written and a version, so that [`Exchange::merge`] can tell the later
//! write and a moved entry is only forgotten here if nothing wrote it since it was sent.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use sc_common::now_ms;
use serde_json::Value;

/// The key/value store of one broker.
#[derive(Debug, Default)]
pub(crate) struct Exchange {
    /// std Mutex: every operation is a few map accesses, never held across await.
    data: Mutex<HashMap<String, Entry>>,
    /// The source of entry versions: every change of an entry gives it a new one.
    versions: AtomicU64,
}

#[derive(Debug)]
struct Entry {
    value: Value,
    /// Milliseconds since the Unix epoch.
    expires_at: Option<u64>,
    /// When the value was last written (ms since the Unix epoch).
    written_ms: u64,
    /// A list built by `add` alone since it was created (see [`Exchange::merge`]).
    appended: bool,
    /// Changes with every write, expiry included.
    version: u64,
}

/// An exchange key on its way from one broker's store to another's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Moved {
    pub(crate) key: String,
    /// JSON text.
    pub(crate) value: Vec<u8>,
    pub(crate) expires_at: Option<u64>,
    pub(crate) written_ms: u64,
    pub(crate) appended: bool,
}

/// Why an operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ExchangeError {
    #[error("value is not valid JSON: {0}")]
    BadJson(String),
    #[error("the value under {0:?} is not a list")]
    NotAList(String),
    #[error("exchange backend unavailable: {0}")]
    Backend(String),
}

impl Exchange {
    /// Keys held (expired ones until the next sweep).
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    /// Stores `value` (JSON text) under `key`, replacing it and any expiry.
    pub(crate) fn set(&self, key: String, value: &[u8]) -> Result<(), ExchangeError> {
        let value = parse(value)?;
        let entry = self.entry(value, false);
        self.lock().insert(key, entry);
        Ok(())
    }

    /// The value under `key`, as JSON text.
    pub(crate) fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.with_live(key, |entry| entry.map(|e| to_json(&e.value)))
    }

    /// Removes `key`, returning its value as JSON text.
    pub(crate) fn remove(&self, key: &str) -> Option<Vec<u8>> {
        let mut data = self.lock();
        let entry = data.remove(key)?;
        (!expired(&entry)).then(|| to_json(&entry.value))
    }

    /// Appends `value` to the list under `key` (creating it); returns its index.
    pub(crate) fn add(&self, key: String, value: &[u8]) -> Result<u64, ExchangeError> {
        let value = parse(value)?;
        let mut data = self.lock();
        if data.get(&key).is_some_and(expired) {
            data.remove(&key);
        }
        let version = self.next_version();
        let entry = data.entry(key.clone()).or_insert_with(|| Entry {
            value: Value::Array(Vec::new()),
            expires_at: None,
            written_ms: 0,
            appended: true,
            version,
        });
        match &mut entry.value {
            Value::Array(list) => {
                list.push(value);
                entry.written_ms = now_ms();
                entry.version = version;
                Ok(list.len() as u64 - 1)
            }
            _ => Err(ExchangeError::NotAList(key)),
        }
    }

    /// The slice `[start, end)` of the list under `key` as a JSON array text.
    pub(crate) fn get_range(
        &self,
        key: &str,
        start: i64,
        end: Option<i64>,
    ) -> Result<Vec<u8>, ExchangeError> {
        self.with_live(key, |entry| match entry.map(|e| &e.value) {
            None => Ok(b"[]".to_vec()),
            Some(Value::Array(list)) => {
                let (from, to) = bounds(list.len(), start, end);
                Ok(to_json(&Value::Array(list[from..to].to_vec())))
            }
            Some(_) => Err(ExchangeError::NotAList(key.to_owned())),
        })
    }

    /// Removes the slice `[start, end)` of the list under `key`; returns it as a JSON array.
    pub(crate) fn remove_range(
        &self,
        key: &str,
        start: i64,
        end: Option<i64>,
    ) -> Result<Vec<u8>, ExchangeError> {
        let mut data = self.lock();
        if data.get(key).is_some_and(expired) {
            data.remove(key);
        }
        let version = self.next_version();
        let Some(entry) = data.get_mut(key) else { return Ok(b"[]".to_vec()) };
        match &mut entry.value {
            Value::Array(list) => {
                let (from, to) = bounds(list.len(), start, end);
                let removed = to_json(&Value::Array(list.drain(from..to).collect()));
                entry.written_ms = now_ms();
                entry.version = version;
                // No longer a list of appends only: a merge must not bring removed items back.
                entry.appended = false;
                Ok(removed)
            }
            _ => Err(ExchangeError::NotAList(key.to_owned())),
        }
    }

    /// Elements of the list, or keys of the object, under `key`; 1 for any other value, 0 if absent.
    pub(crate) fn count(&self, key: &str) -> u64 {
        self.with_live(key, |entry| match entry.map(|e| &e.value) {
            None => 0,
            Some(Value::Array(list)) => list.len() as u64,
            Some(Value::Object(map)) => map.len() as u64,
            Some(_) => 1,
        })
    }

    /// Whether `key` exists.
    pub(crate) fn has_key(&self, key: &str) -> bool {
        self.with_live(key, |entry| entry.is_some())
    }

    /// Makes `keys` expire `seconds` from now; returns how many exist.
    pub(crate) fn expire(&self, keys: &[String], seconds: u64) -> u64 {
        let at = now_ms().saturating_add(seconds.saturating_mul(1000));
        self.update_expiry(keys, Some(at))
    }

    /// Makes `keys` permanent; returns how many exist.
    pub(crate) fn unexpire(&self, keys: &[String]) -> u64 {
        self.update_expiry(keys, None)
    }

    /// When `key` expires (ms since the Unix epoch).
    pub(crate) fn get_expiry(&self, key: &str) -> Option<u64> {
        self.with_live(key, |entry| entry.and_then(|e| e.expires_at))
    }

    /// Drops expired keys; returns how many.
    pub(crate) fn sweep(&self) -> usize {
        let mut data = self.lock();
        let before = data.len();
        data.retain(|_, entry| !expired(entry));
        before - data.len()
    }

    /// Takes out the live keys that `claimed` picks, for another broker, up to about `budget`
    /// bytes (expired keys stay to be swept).
    pub(crate) fn take(&self, claimed: impl Fn(&str) -> bool, mut budget: usize) -> Vec<Moved> {
        let mut data = self.lock();
        let keys: Vec<String> =
            data.iter().filter(|(k, e)| !expired(e) && claimed(k)).map(|(k, _)| k.clone()).collect();
        let mut taken = Vec::new();
        for key in keys {
            let Some(entry) = data.get(&key) else { continue };
            let entry = moved(key, entry);
            let size = entry.key.len() + entry.value.len() + 32;
            if size > budget && !taken.is_empty() {
                break;
            }
            budget = budget.saturating_sub(size);
            data.remove(&entry.key);
            taken.push(entry);
        }
        taken
    }

    /// Copies of the live keys that `owned_here` rejects, with their versions (for
    /// [`Exchange::forget_if_unchanged`] once the owner has them).
    pub(crate) fn strays(&self, owned_here: impl Fn(&str) -> bool) -> Vec<(Moved, u64)> {
        let data = self.lock();
        data.iter()
            .filter(|(k, e)| !expired(e) && !owned_here(k))
            .map(|(k, e)| (moved(k.clone(), e), e.version))
            .collect()
    }

    /// Drops `key` if it still has `version` (nothing wrote it since it was copied).
    pub(crate) fn forget_if_unchanged(&self, key: &str, version: u64) {
        let mut data = self.lock();
        if data.get(key).is_some_and(|e| e.version == version) {
            data.remove(key);
        }
    }

    /// Merges keys from another broker. The later write wins, except that a list built by `add`
    /// alone is appended to an older list (both sides added to it while the key moved).
    pub(crate) fn merge(&self, entries: Vec<Moved>) {
        let mut data = self.lock();
        for incoming in entries {
            let Ok(value) = serde_json::from_slice::<Value>(&incoming.value) else { continue };
            let mut entry = Entry {
                value,
                expires_at: incoming.expires_at,
                written_ms: incoming.written_ms,
                appended: incoming.appended,
                version: self.next_version(),
            };
            if let Some(local) = data.remove(&incoming.key).filter(|e| !expired(e)) {
                let (mut older, mut newer) =
                    if entry.written_ms >= local.written_ms { (local, entry) } else { (entry, local) };
                if newer.appended
                    && let (Value::Array(old), Value::Array(new)) = (&mut older.value, &mut newer.value)
                {
                    old.append(new);
                    newer.value = std::mem::take(&mut older.value);
                    newer.appended = older.appended;
                }
                newer.version = self.next_version();
                entry = newer;
            }
            if !expired(&entry) {
                data.insert(incoming.key, entry);
            }
        }
    }

    fn update_expiry(&self, keys: &[String], at: Option<u64>) -> u64 {
        let mut data = self.lock();
        let mut changed = 0;
        for key in keys {
            if let Some(entry) = data.get_mut(key).filter(|e| !expired(e)) {
                entry.expires_at = at;
                entry.version = self.versions.fetch_add(1, Ordering::Relaxed) + 1;
                changed += 1;
            }
        }
        changed
    }

    fn entry(&self, value: Value, appended: bool) -> Entry {
        Entry { value, expires_at: None, written_ms: now_ms(), appended, version: self.next_version() }
    }

    fn next_version(&self) -> u64 {
        self.versions.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn with_live<T>(&self, key: &str, f: impl FnOnce(Option<&Entry>) -> T) -> T {
        let data = self.lock();
        f(data.get(key).filter(|e| !expired(e)))
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        self.data.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Resolves a slice with negative indices counting from the end, clamped to the list.
fn bounds(len: usize, start: i64, end: Option<i64>) -> (usize, usize) {
    let resolve = |i: i64| -> usize {
        if i < 0 { len.saturating_sub(i.unsigned_abs() as usize) } else { (i as usize).min(len) }
    };
    let from = resolve(start);
    let to = end.map_or(len, resolve);
    (from, to.max(from))
}

fn parse(value: &[u8]) -> Result<Value, ExchangeError> {
    serde_json::from_slice(value).map_err(|e| ExchangeError::BadJson(e.to_string()))
}

fn to_json(value: &Value) -> Vec<u8> {
    // Serializing a Value cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

fn moved(key: String, entry: &Entry) -> Moved {
    Moved {
        key,
        value: to_json(&entry.value),
        expires_at: entry.expires_at,
        written_ms: entry.written_ms,
        appended: entry.appended,
    }
}

fn expired(entry: &Entry) -> bool {
    entry.expires_at.is_some_and(|at| now_ms() >= at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(bytes: Option<Vec<u8>>) -> Option<String> {
        bytes.map(|b| String::from_utf8(b).unwrap())
    }

    #[test]
    fn set_get_remove() {
        let ex = Exchange::default();
        assert_eq!(ex.get("k"), None);
        ex.set("k".into(), br#"{"a": 1}"#).unwrap();
        assert_eq!(text(ex.get("k")).as_deref(), Some(r#"{"a":1}"#));
        assert!(ex.has_key("k"));
        assert_eq!(ex.count("k"), 1);
        assert_eq!(text(ex.remove("k")).as_deref(), Some(r#"{"a":1}"#));
        assert_eq!(ex.remove("k"), None);
        assert!(matches!(ex.set("k".into(), b"{nope"), Err(ExchangeError::BadJson(_))));
    }

    #[test]
    fn lists() {
        let ex = Exchange::default();
        for (i, v) in ["1", "2", "3", "4", "5"].iter().enumerate() {
            assert_eq!(ex.add("l".into(), v.as_bytes()).unwrap(), i as u64);
        }
        assert_eq!(ex.count("l"), 5);
        assert_eq!(ex.get_range("l", 1, Some(3)).unwrap(), b"[2,3]");
        assert_eq!(ex.get_range("l", -2, None).unwrap(), b"[4,5]");
        assert_eq!(ex.get_range("l", 4, Some(2)).unwrap(), b"[]");
        assert_eq!(ex.get_range("l", 10, None).unwrap(), b"[]");
        assert_eq!(ex.remove_range("l", 0, Some(2)).unwrap(), b"[1,2]");
        assert_eq!(text(ex.get("l")).as_deref(), Some("[3,4,5]"));
        assert_eq!(ex.get_range("missing", 0, None).unwrap(), b"[]");
        ex.set("o".into(), br#"{"a":1,"b":2}"#).unwrap();
        assert_eq!(ex.count("o"), 2);
        assert!(matches!(ex.add("o".into(), b"1"), Err(ExchangeError::NotAList(_))));
    }

    #[test]
    fn expiry() {
        let ex = Exchange::default();
        ex.set("a".into(), b"1").unwrap();
        ex.set("b".into(), b"2").unwrap();
        assert_eq!(ex.expire(&["a".into(), "b".into(), "none".into()], 60), 2);
        let at = ex.get_expiry("a").unwrap();
        assert!(at > now_ms() + 59_000 && at <= now_ms() + 60_000);
        assert_eq!(ex.unexpire(&["b".into()]), 1);
        assert_eq!(ex.get_expiry("b"), None);
        assert_eq!(ex.expire(&["a".into()], 0), 1);
        assert_eq!(ex.get("a"), None, "expired keys read as absent at once");
        assert!(!ex.has_key("a"));
        assert_eq!(ex.sweep(), 1);
        assert_eq!(text(ex.get("b")).as_deref(), Some("2"));
    }

    #[test]
    fn moves_take_merge_and_forget() {
        let a = Exchange::default();
        let b = Exchange::default();
        a.set("x".into(), b"1").unwrap();
        a.set("y".into(), b"2").unwrap();
        a.expire(&["y".into()], 60);
        let taken = a.take(|k| k == "y", 1 << 20);
        assert_eq!(taken.len(), 1);
        assert_eq!(a.get("y"), None, "taken out");
        b.merge(taken);
        assert_eq!(text(b.get("y")).as_deref(), Some("2"));
        assert!(b.get_expiry("y").is_some(), "the expiry moves with the key");

        // A stray is forgotten only if nothing wrote it after it was copied.
        let strays = a.strays(|k| k != "x");
        assert_eq!(strays.len(), 1);
        let (entry, version) = strays[0].clone();
        a.set("x".into(), b"3").unwrap();
        a.forget_if_unchanged("x", version);
        assert_eq!(text(a.get("x")).as_deref(), Some("3"), "written since: kept");
        let (_, version) = a.strays(|k| k != "x")[0].clone();
        a.forget_if_unchanged("x", version);
        assert_eq!(a.get("x"), None);

        // The later write wins.
        b.set("x".into(), b"9").unwrap();
        b.merge(vec![Moved { written_ms: 1, ..entry }]);
        assert_eq!(text(b.get("x")).as_deref(), Some("9"));
    }

    #[test]
    fn lists_added_on_both_sides_of_a_move_are_joined() {
        let old = Exchange::default();
        let new = Exchange::default();
        old.add("l".into(), b"1").unwrap();
        old.add("l".into(), b"2").unwrap();
        let moved = old.take(|_| true, 1 << 20);
        std::thread::sleep(std::time::Duration::from_millis(2));
        new.add("l".into(), b"3").unwrap();
        new.merge(moved);
        assert_eq!(text(new.get("l")).as_deref(), Some("[1,2,3]"));
        // A list that was set (not only added to) replaces the older one.
        new.set("m".into(), b"[7]").unwrap();
        let older = Moved {
            key: "m".into(),
            value: b"[5,6]".to_vec(),
            expires_at: None,
            written_ms: 1,
            appended: true,
        };
        new.merge(vec![older]);
        assert_eq!(text(new.get("m")).as_deref(), Some("[7]"));
    }
}
