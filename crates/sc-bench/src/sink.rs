//! The receiving side shared by the pub/sub scenarios: one task per subscribed client drains
//! its [`Events`], counts publishes, records their latency from the timestamp in the payload
//! and notes unexpected closes.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use sc_client::{Event, Events};
use tokio::sync::Notify;

use crate::common::{Counters, now_us, timestamp_of};
use crate::stats::Sharded;

/// Events taken from a connection at once.
const BATCH: usize = 256;

/// What the subscriber tasks share.
#[derive(Debug)]
pub(crate) struct Sink {
    pub(crate) counters: Arc<Counters>,
    pub(crate) latency: Sharded,
    /// Unix us of the latest delivery, for the end of the measured interval.
    pub(crate) last_delivery_us: AtomicU64,
    /// Set before the bench closes its clients, so those closes are not errors.
    pub(crate) stopping: AtomicBool,
    /// Close codes of connections the server ended during the run.
    pub(crate) closes: Mutex<BTreeMap<String, u64>>,
    /// Signalled after every drained batch; a windowed publisher waits on it.
    pub(crate) progress: Notify,
}

impl Sink {
    pub(crate) fn new(counters: Arc<Counters>) -> Arc<Self> {
        Arc::new(Self {
            counters,
            latency: Sharded::new(),
            last_delivery_us: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            closes: Mutex::new(BTreeMap::new()),
            progress: Notify::new(),
        })
    }

    /// Drains `events` until the connection ends; returns how many publishes arrived.
    pub(crate) async fn consume(self: Arc<Self>, mut events: Events, index: usize) -> u64 {
        let mut batch = Vec::with_capacity(BATCH);
        let mut latencies = Vec::with_capacity(BATCH);
        let mut received = 0u64;
        while events.recv_many(&mut batch, BATCH).await > 0 {
            let now = now_us();
            let mut publishes = 0u64;
            for event in batch.drain(..) {
                match event {
                    Event::Publish { data, .. } => {
                        publishes += 1;
                        if let Some(t) = timestamp_of(data.get()) {
                            latencies.push(now.saturating_sub(t));
                        }
                    }
                    Event::Closed(info) if !self.stopping.load(Ordering::Relaxed) => {
                        self.counters.errors.fetch_add(1, Ordering::Relaxed);
                        let code =
                            info.code.map_or_else(|| format!("none: {}", info.reason), |c| c.to_string());
                        *self
                            .closes
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .entry(code)
                            .or_default() += 1;
                    }
                    _ => {}
                }
            }
            if publishes > 0 {
                received += publishes;
                self.latency.record_all(index, &latencies);
                latencies.clear();
                self.counters.received.fetch_add(publishes, Ordering::Relaxed);
                self.last_delivery_us.fetch_max(now, Ordering::Relaxed);
                self.progress.notify_one();
            }
        }
        received
    }

    /// The close codes seen, by code.
    pub(crate) fn closes(&self) -> BTreeMap<String, u64> {
        self.closes.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}
