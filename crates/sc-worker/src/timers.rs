//! The worker's socket timers: one coarse timer wheel for every socket's pings and handshake
//! deadline, and the drain signal.
//!
//! A socket holds no timer of its own (a tokio timer is about 110 bytes, and every idle socket
//! had two, plus a shutdown future): one worker-wide task ticks ([`Timers::run`], spawned by
//! [`crate::Worker::serve`]), and at each tick the sockets whose ping or handshake deadline has
//! come get that signal through their outbox's wake-up ([`crate::outbox::Outbox::signal`]);
//! the socket's loop does the rest (the pong check and the pings, or the 4005 close). On drain,
//! [`Timers::shut_down`] signals every open socket the same way.
//!
//! Precision: a deadline fires within one tick after it is due, never before; the tick is an
//! eighth of the shorter of `[worker] ping_interval` and `handshake_timeout`, at most 1 s (the
//! default 8 s / 10 s give 1 s), and divides the ping interval, so a socket's pings stay
//! exactly `ping_interval` apart. The pong timeout is checked at each ping, as before: a
//! client silent for longer than `ping_timeout` is closed (4001) at the first ping after.

use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use tokio::time::Instant;

use crate::handle::{Socket, State};
use crate::outbox::Due;

/// The longest tick: deadlines fire at most this late.
const MAX_TICK: Duration = Duration::from_secs(1);
/// Ticks per shortest timer, at least.
const TICKS_PER_TIMER: u32 = 8;
/// Slots of the wheel, at most: a deadline further away waits for its round in its slot.
const MAX_SLOTS: u64 = 4096;

/// The timers of one worker's sockets.
pub(crate) struct Timers {
    /// When tick 0 was.
    epoch: Instant,
    tick: Duration,
    /// The ping interval, in ticks (exactly: the tick divides it).
    ping_ticks: u64,
    handshake_timeout: Duration,
    /// std Mutex: held to add a socket, for one tick's sweep of one slot, or for the drain;
    /// never across await. Lock order: this, then a socket's outbox.
    wheel: Mutex<Wheel>,
}

struct Wheel {
    /// The last tick swept.
    swept: u64,
    /// Entries by due tick, modulo the slot count.
    slots: Vec<Vec<Entry>>,
    /// Entries moved by the current sweep (kept to reuse its allocation).
    moved: Vec<Entry>,
    /// The worker drains: every socket has been told, and so is any that opens now.
    closed: bool,
}

/// One socket's next ping or its handshake deadline. Weak: a closed socket is dropped from
/// the wheel when its entry comes up.
struct Entry {
    socket: Weak<State>,
    due: u64,
    kind: Kind,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Ping,
    Handshake,
}

impl std::fmt::Debug for Timers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Timers").field("tick", &self.tick).field("ping_ticks", &self.ping_ticks).finish()
    }
}

impl Timers {
    /// Timers pinging every `ping_interval` and closing sockets not handshaken within
    /// `handshake_timeout`.
    pub(crate) fn new(ping_interval: Duration, handshake_timeout: Duration) -> Self {
        let ping_interval = ping_interval.max(Duration::from_millis(1));
        let longest = (ping_interval.min(handshake_timeout) / TICKS_PER_TIMER).min(MAX_TICK);
        let longest = longest.max(Duration::from_micros(100));
        // The tick divides the ping interval: n ticks of ping_interval / n.
        let ping_ticks = ping_interval.as_nanos().div_ceil(longest.as_nanos()).max(1);
        let tick = ping_interval / u32::try_from(ping_ticks).unwrap_or(u32::MAX);
        let ping_ticks = u64::try_from(ping_ticks).unwrap_or(u64::MAX);
        let handshake_ticks = ticks(handshake_timeout, tick);
        let slots = ping_ticks.max(handshake_ticks).saturating_add(1).min(MAX_SLOTS);
        let wheel = Wheel {
            swept: 0,
            slots: (0..slots).map(|_| Vec::new()).collect(),
            moved: Vec::new(),
            closed: false,
        };
        Self { epoch: Instant::now(), tick, ping_ticks, handshake_timeout, wheel: Mutex::new(wheel) }
    }

    /// The tick: how late a deadline may fire.
    #[cfg(test)]
    pub(crate) fn tick(&self) -> Duration {
        self.tick
    }

    /// Starts a new socket's timers: its first ping one ping interval from now, and its
    /// handshake deadline. A socket that opens while the worker drains is told at once.
    pub(crate) fn add(&self, socket: &Socket) {
        let now = Instant::now();
        let first_ping = self.due_after(now, self.tick * u32::try_from(self.ping_ticks).unwrap_or(u32::MAX));
        let handshake = self.due_after(now, self.handshake_timeout);
        let now = self.elapsed_ticks(now);
        let mut wheel = self.lock();
        if wheel.closed {
            drop(wheel);
            socket.outbox().signal(Due::SHUTDOWN);
            return;
        }
        let floor = wheel.swept.max(now) + 1;
        let weak = Arc::downgrade(&socket.0);
        wheel.insert(Entry { socket: weak.clone(), due: first_ping.max(floor), kind: Kind::Ping });
        wheel.insert(Entry { socket: weak, due: handshake.max(floor), kind: Kind::Handshake });
    }

    /// Ticks until `stop`: at each tick, the due sockets get their signals.
    pub(crate) async fn run(&self, stop: tokio_util::sync::CancellationToken) {
        let mut ticker = tokio::time::interval_at(self.epoch + self.tick, self.tick);
        // A late tick is caught up by `sweep` (it sweeps every tick up to now).
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticker.tick() => self.sweep(Instant::now()),
            }
        }
    }

    /// Signals every socket whose deadline came by `now` (every tick not swept yet).
    pub(crate) fn sweep(&self, now: Instant) {
        let target = self.elapsed_ticks(now);
        let mut wheel = self.lock();
        let wheel = &mut *wheel;
        if wheel.closed {
            return;
        }
        let slots = wheel.slots.len() as u64;
        while wheel.swept < target {
            wheel.swept += 1;
            let tick = wheel.swept;
            let index = (tick % slots) as usize;
            let mut slot = std::mem::take(&mut wheel.slots[index]);
            slot.retain_mut(|entry| {
                if entry.due > tick {
                    return true;
                }
                let Some(state) = entry.socket.upgrade() else { return false };
                match entry.kind {
                    Kind::Handshake => {
                        state.outbox.signal(Due::HANDSHAKE);
                        false
                    }
                    Kind::Ping => {
                        state.outbox.signal(Due::PING);
                        entry.due = tick + self.ping_ticks;
                        // Stays in this slot when a ping interval is a whole number of rounds.
                        if entry.due % slots == tick % slots {
                            return true;
                        }
                        wheel.moved.push(Entry {
                            socket: std::mem::take(&mut entry.socket),
                            due: entry.due,
                            kind: Kind::Ping,
                        });
                        false
                    }
                }
            });
            // Give back what a burst of openings left over.
            if slot.capacity() > 64 && slot.len() < slot.capacity() / 4 {
                slot.shrink_to(slot.len() * 2);
            }
            wheel.slots[index] = slot;
            let mut moved = std::mem::take(&mut wheel.moved);
            for entry in moved.drain(..) {
                wheel.insert(entry);
            }
            wheel.moved = moved;
        }
    }

    /// The worker drains: every open socket is told (it closes with
    /// [`crate::socket::CLOSE_SHUTDOWN`]), and so is any that opens from now on.
    pub(crate) fn shut_down(&self) {
        let slots = {
            let mut wheel = self.lock();
            wheel.closed = true;
            std::mem::take(&mut wheel.slots)
        };
        for entry in slots.into_iter().flatten() {
            // A socket has a ping entry for as long as it is open (and a handshake entry for a
            // while): signalling twice changes nothing.
            if entry.kind == Kind::Ping
                && let Some(state) = entry.socket.upgrade()
            {
                state.outbox.signal(Due::SHUTDOWN);
            }
        }
    }

    fn elapsed_ticks(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.epoch).as_nanos() / self.tick.as_nanos().max(1);
        u64::try_from(elapsed).unwrap_or(u64::MAX)
    }

    /// The first tick at or after `now + after`.
    fn due_after(&self, now: Instant, after: Duration) -> u64 {
        let at = now.saturating_duration_since(self.epoch) + after;
        let due = at.as_nanos().div_ceil(self.tick.as_nanos().max(1));
        u64::try_from(due).unwrap_or(u64::MAX)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Wheel> {
        self.wheel.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Wheel {
    fn insert(&mut self, entry: Entry) {
        let slots = self.slots.len() as u64;
        if slots > 0 {
            self.slots[(entry.due % slots) as usize].push(entry);
        }
    }
}

/// `duration` in ticks, rounded up.
fn ticks(duration: Duration, tick: Duration) -> u64 {
    u64::try_from(duration.as_nanos().div_ceil(tick.as_nanos().max(1))).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handle::Peer;
    use std::collections::VecDeque;

    fn socket() -> Socket {
        let context = crate::socket::tests::context();
        Socket::new(context.services.clone(), 1, "s", Peer { addr: None, tls: false }, None, None)
    }

    /// The signals raised since the last look.
    fn due(socket: &Socket) -> Due {
        socket.outbox().take(&mut VecDeque::new()).unwrap()
    }

    #[test]
    fn the_tick_divides_the_ping_interval_and_is_at_most_a_second() {
        let defaults = Timers::new(Duration::from_secs(8), Duration::from_secs(10));
        assert_eq!((defaults.tick(), defaults.ping_ticks), (Duration::from_secs(1), 8));
        let fast = Timers::new(Duration::from_millis(100), Duration::from_secs(10));
        assert_eq!((fast.tick(), fast.ping_ticks), (Duration::from_micros(12_500), 8));
        // A short handshake timeout sets the tick; the ping interval stays a whole number of them.
        let odd = Timers::new(Duration::from_millis(1000), Duration::from_millis(300));
        assert!(odd.tick() <= Duration::from_micros(37_500), "{:?}", odd.tick());
        // Whole up to the nanoseconds that dividing drops, one per tick.
        let ticks = u32::try_from(odd.ping_ticks).unwrap();
        let short = Duration::from_millis(1000) - odd.tick() * ticks;
        assert!(short < Duration::from_nanos(u64::from(ticks)), "{short:?}");
        let slow = Timers::new(Duration::from_secs(1800), Duration::from_secs(3600));
        assert_eq!((slow.tick(), slow.ping_ticks), (Duration::from_secs(1), 1800));
    }

    /// Pings come every ping interval, within one tick after each is due and never before;
    /// the handshake deadline once, within one tick after it.
    #[tokio::test(start_paused = true)]
    async fn deadlines_fire_within_one_tick_after_they_are_due() {
        let timers = Timers::new(Duration::from_millis(800), Duration::from_millis(1000));
        let tick = timers.tick();
        assert_eq!(tick, Duration::from_millis(100));
        // Opened mid-tick.
        tokio::time::advance(Duration::from_millis(30)).await;
        let opened = Instant::now();
        let socket = socket();
        timers.add(&socket);
        let mut pings = Vec::new();
        let mut handshake = Vec::new();
        // 3.2 s in steps of 10 ms, sweeping as the ticker would at each tick.
        for _ in 0..320 {
            tokio::time::advance(Duration::from_millis(10)).await;
            timers.sweep(Instant::now());
            let due = due(&socket);
            let at = Instant::now() - opened;
            if due.has(Due::PING) {
                pings.push(at);
            }
            if due.has(Due::HANDSHAKE) {
                handshake.push(at);
            }
        }
        assert_eq!(pings.len(), 3, "{pings:?}");
        for (n, at) in pings.iter().enumerate() {
            let due = Duration::from_millis(800) * (n as u32 + 1);
            assert!(*at >= due && *at < due + tick, "ping {n} at {at:?}, due {due:?}");
        }
        assert_eq!(handshake.len(), 1, "{handshake:?}");
        assert!(
            handshake[0] >= Duration::from_millis(1000) && handshake[0] < Duration::from_millis(1000) + tick
        );
    }

    /// A late ticker catches up: every tick it missed is swept.
    #[tokio::test(start_paused = true)]
    async fn a_late_sweep_fires_everything_due_by_then() {
        let timers = Timers::new(Duration::from_millis(800), Duration::from_millis(1000));
        let socket = socket();
        timers.add(&socket);
        tokio::time::advance(Duration::from_millis(1150)).await;
        timers.sweep(Instant::now());
        let due = due(&socket);
        assert!(due.has(Due::PING) && due.has(Due::HANDSHAKE), "{due:?}");
    }

    /// The drain tells every open socket, and any that opens after; a closed socket leaves the
    /// wheel when its entry comes up.
    #[tokio::test(start_paused = true)]
    async fn the_drain_reaches_every_socket_and_closed_ones_leave() {
        let timers = Timers::new(Duration::from_millis(800), Duration::from_millis(1000));
        let (open, gone) = (socket(), socket());
        timers.add(&open);
        timers.add(&gone);
        drop(gone);
        tokio::time::advance(Duration::from_millis(1100)).await;
        timers.sweep(Instant::now());
        let entries: usize = timers.lock().slots.iter().map(Vec::len).sum();
        assert_eq!(entries, 1, "only the open socket's ping is left");
        let _ = due(&open);
        timers.shut_down();
        assert!(due(&open).has(Due::SHUTDOWN));
        let late = socket();
        timers.add(&late);
        assert!(due(&late).has(Due::SHUTDOWN));
    }
}
