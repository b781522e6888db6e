//! Latency histograms and their JSON summary.
//!
//! Every latency is recorded in microseconds into an HDR histogram (1 us to 10 min, 3
//! significant digits: a fixed ~100 KiB whatever the message count). Subscriber tasks record
//! into a few shared shards rather than one histogram each, so memory stays flat with 10,000
//! subscribers and lock contention stays low.

use std::sync::{Mutex, PoisonError};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Highest latency the histograms hold (10 minutes, in us); longer values are clamped.
const MAX_US: u64 = 600_000_000;

/// Shards of [`Sharded`]; a power of two a little above the thread count is plenty.
const SHARDS: usize = 16;

/// p50/p90/p99/max of a histogram, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct Summary {
    pub(crate) count: u64,
    pub(crate) mean_ms: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p90_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) p999_ms: f64,
    pub(crate) max_ms: f64,
}

/// A histogram split into shards that tasks record into by index.
#[derive(Debug)]
pub(crate) struct Sharded {
    shards: Vec<Mutex<Histogram<u64>>>,
}

/// A new empty latency histogram (us).
pub(crate) fn histogram() -> Histogram<u64> {
    // Start-up invariant: the bounds are valid constants.
    #[allow(clippy::expect_used)]
    Histogram::new_with_bounds(1, MAX_US, 3).expect("valid histogram bounds")
}

/// Records `us`, clamped into the histogram's range.
pub(crate) fn record(h: &mut Histogram<u64>, us: u64) {
    h.saturating_record(us.clamp(1, MAX_US));
}

/// The summary of `h`.
pub(crate) fn summarize(h: &Histogram<u64>) -> Summary {
    if h.is_empty() {
        return Summary::default();
    }
    let ms = |us: u64| us as f64 / 1000.0;
    Summary {
        count: h.len(),
        mean_ms: h.mean() / 1000.0,
        p50_ms: ms(h.value_at_quantile(0.50)),
        p90_ms: ms(h.value_at_quantile(0.90)),
        p99_ms: ms(h.value_at_quantile(0.99)),
        p999_ms: ms(h.value_at_quantile(0.999)),
        max_ms: ms(h.max()),
    }
}

impl Sharded {
    pub(crate) fn new() -> Self {
        Self { shards: (0..SHARDS).map(|_| Mutex::new(histogram())).collect() }
    }

    /// Records a batch of latencies (us) into the shard for `index`, under one lock.
    pub(crate) fn record_all(&self, index: usize, values: &[u64]) {
        if values.is_empty() {
            return;
        }
        let mut shard = self.shards[index % SHARDS].lock().unwrap_or_else(PoisonError::into_inner);
        for &us in values {
            record(&mut shard, us);
        }
    }

    /// All shards merged.
    pub(crate) fn merged(&self) -> Histogram<u64> {
        let mut all = histogram();
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            // Same bounds, so adding cannot fail.
            let _ = all.add(&*shard);
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_reads_quantiles_in_ms() {
        let sharded = Sharded::new();
        let values: Vec<u64> = (1..=1000).map(|v| v * 1000).collect();
        sharded.record_all(3, &values[..500]);
        sharded.record_all(7, &values[500..]);
        let s = summarize(&sharded.merged());
        assert_eq!(s.count, 1000);
        assert!((s.p50_ms - 500.0).abs() < 1.0, "{s:?}");
        assert!((s.p99_ms - 990.0).abs() < 1.0, "{s:?}");
        assert!((s.max_ms - 1000.0).abs() < 1.0, "{s:?}");
    }

    #[test]
    fn empty_histogram_summarizes_to_zero() {
        assert_eq!(summarize(&histogram()).count, 0);
    }
}
