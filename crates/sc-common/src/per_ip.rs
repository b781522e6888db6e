//! Connections per client IP that are not useful yet.
//!
//! Silent or slow connections cost a connection slot until a timeout ends them; one address
//! holding many of them could lock every other client out. The balancer counts a connection
//! until it is forwarded (its first byte arrived), against `[balancer] max_pending_per_ip`; the
//! worker counts it from the PROXY header until its socket completes `#handshake`, against
//! `[worker] max_pending_per_ip`. Past the limit a new connection from that address is closed
//! at once. Keyed by the real client address, so clients behind a NAT share one budget: size it
//! for the largest office that reconnects at once.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

/// The per-IP counts of one worker; cheap to clone.
#[derive(Debug, Clone)]
pub struct PendingByIp {
    /// std Mutex: an increment or a decrement, never held across await. Entries are removed
    /// at zero, so the map holds only addresses with pending connections.
    counts: Arc<Mutex<HashMap<IpAddr, u32>>>,
    limit: u32,
}

/// One pending connection; dropping it (handshake done, or connection gone) gives the slot
/// back.
#[derive(Debug)]
pub struct Pending {
    counts: Arc<Mutex<HashMap<IpAddr, u32>>>,
    ip: IpAddr,
}

impl PendingByIp {
    /// Counts with at most `limit` pending connections per IP (0: no limit).
    pub fn new(limit: u32) -> Self {
        Self { counts: Arc::default(), limit }
    }

    /// Counts a new connection from `ip`, or `None` if that address has too many pending.
    pub fn try_acquire(&self, ip: IpAddr) -> Option<Pending> {
        let mut counts = self.lock();
        let count = counts.entry(ip).or_default();
        if self.limit > 0 && *count >= self.limit {
            return None;
        }
        *count += 1;
        Some(Pending { counts: self.counts.clone(), ip })
    }

    /// Counts a connection whatever the limit (an upgrade of a connection already admitted).
    pub fn acquire(&self, ip: IpAddr) -> Pending {
        *self.lock().entry(ip).or_default() += 1;
        Pending { counts: self.counts.clone(), ip }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, u32>> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = counts.get_mut(&self.ip) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn one_address_is_capped_and_others_are_not() {
        let pending = PendingByIp::new(2);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let first = pending.try_acquire(a).unwrap();
        let _second = pending.try_acquire(a).unwrap();
        assert!(pending.try_acquire(a).is_none(), "a third pending connection from one address");
        assert!(pending.try_acquire(b).is_some(), "another address is not affected");
        drop(first);
        let again = pending.try_acquire(a);
        assert!(again.is_some(), "a slot comes back when a connection completes or ends");
        drop(again);
        drop(_second);
        assert!(pending.lock().get(&a).is_none(), "no entry left for an address with none pending");
    }
}
