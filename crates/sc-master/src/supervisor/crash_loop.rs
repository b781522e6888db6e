//! The respawn back-off of one child and its crash-loop count.
//!
//! Each exit waits an exponential backoff before the respawn (`[master] respawn_backoff`
//! doubling to `respawn_backoff_max`), back to the start once the process had passed its
//! health checks for [`STABLE_UPTIME`]. [`CRASH_LOOP`] exits in a row without that are a crash
//! loop, reported at ERROR.

use std::time::Duration;

use sc_common::membership::{Backoff, Severity};
use tokio::time::Instant;

/// Time healthy after which a child's backoff starts over.
pub(super) const STABLE_UPTIME: Duration = Duration::from_secs(60);
/// Exits in a row (without a healthy minute between them) that make a crash loop.
pub(super) const CRASH_LOOP: u32 = 3;

/// The exits in a row of one child and the delay before its next start.
#[derive(Debug)]
pub(super) struct CrashLoop {
    backoff: Backoff,
    exits: u32,
}

/// What to do after an exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Respawn {
    /// Wait this long before starting the child again.
    pub(super) delay: Duration,
    /// Exits in a row without a healthy minute, this one included.
    pub(super) exits: u32,
}

impl CrashLoop {
    /// A child's counter: backoff from `first` doubling up to `max`.
    pub(super) fn new(first: Duration, max: Duration) -> Self {
        Self { backoff: Backoff::new(first, max), exits: 0 }
    }

    /// The process exited at `now`; it had been healthy since `healthy_since` (`None`: it
    /// never passed a health check, or failed one since).
    pub(super) fn exited(&mut self, healthy_since: Option<Instant>, now: Instant) -> Respawn {
        if healthy_since.is_some_and(|since| now.saturating_duration_since(since) >= STABLE_UPTIME) {
            self.backoff.reset();
            self.exits = 0;
        }
        self.exits += 1;
        Respawn { delay: self.backoff.next_delay(), exits: self.exits }
    }

    /// The process could not be started: the delay before the next try.
    pub(super) fn not_started(&mut self) -> Duration {
        self.backoff.next_delay()
    }
}

impl Respawn {
    /// Whether this exit makes a crash loop.
    pub(super) fn is_crash_loop(&self) -> bool {
        self.exits >= CRASH_LOOP
    }

    /// How the exit goes to the central log: a crash loop is an error, a single exit a warning.
    pub(super) fn severity(&self) -> Severity {
        if self.is_crash_loop() { Severity::Error } else { Severity::Warning }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_in_a_row_double_the_delay_and_make_a_crash_loop_until_a_healthy_minute() {
        let mut counter = CrashLoop::new(Duration::from_millis(100), Duration::from_millis(500));
        let start = Instant::now();
        let mut seen = Vec::new();
        for _ in 0..4 {
            let respawn = counter.exited(None, start);
            seen.push((respawn.delay.as_millis(), respawn.exits, respawn.is_crash_loop()));
        }
        assert_eq!(seen, [(100, 1, false), (200, 2, false), (400, 3, true), (500, 4, true)]);
        assert_eq!(counter.exited(None, start).severity(), Severity::Error);

        // Healthy, but not for a minute: still in the loop.
        let almost = counter.exited(Some(start), start + STABLE_UPTIME - Duration::from_millis(1));
        assert_eq!((almost.delay.as_millis(), almost.exits), (500, 6));

        // A healthy minute: the next exit starts over.
        let later = start + Duration::from_secs(600);
        let fresh = counter.exited(Some(later - STABLE_UPTIME), later);
        assert_eq!(fresh, Respawn { delay: Duration::from_millis(100), exits: 1 });
        assert_eq!(fresh.severity(), Severity::Warning);
    }

    #[test]
    fn a_failed_start_backs_off_too() {
        let mut counter = CrashLoop::new(Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(counter.not_started(), Duration::from_millis(100));
        assert_eq!(counter.not_started(), Duration::from_millis(200));
        assert_eq!(counter.exited(None, Instant::now()).delay, Duration::from_millis(400));
    }
}
