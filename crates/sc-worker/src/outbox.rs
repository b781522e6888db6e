//! A socket's outbound queue: frames and requests from other tasks (fan-out, the app's socket
//! handle, invoke handlers) waiting for the socket's task.
//!
//! Bounded: a socket that does not read while messages keep coming is a slow consumer; pushing
//! past the limit marks the outbox overflowed, and the socket's task closes the socket with
//! [`crate::socket::CLOSE_SLOW_CONSUMER`], rather than holding memory or stalling the sender.
//! The socket's task takes every queued frame at once and writes them with one flush, so a burst
//! costs one write syscall, not one per frame.
//!
//! A frame pushed while the socket is idle (its task released it: nothing queued, nothing
//! unwritten) is written to the connection at once by the pusher, under this lock, instead of
//! waking the task ([`crate::direct`]); the task claims the socket back before it writes or
//! reads anything itself.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use crate::direct::Direct;
use bytes::Bytes;
use futures_util::task::AtomicWaker;
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// The outbound queue of one socket.
#[derive(Debug)]
pub(crate) struct Outbox {
    /// std Mutex: held for a push or a swap, never across await. Starts empty and unallocated,
    /// so an idle socket's outbox costs a few words.
    queue: Mutex<Queue>,
    /// Set when something was queued or signalled since the socket's task last looked: a wake-up
    /// with no task waiting is kept, so none is lost.
    ready: AtomicBool,
    /// The socket's task, waiting ([`Outbox::poll_ready`]).
    waker: AtomicWaker,
    /// The socket's connection, for direct writes (none for connections that take none).
    direct: Option<Direct>,
}

/// What the worker's timers (and its drain) tell a socket's task, besides what is queued: a
/// set of flags, so that an idle socket's signals take no queue space.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Due(u8);

/// The socket did not read fast enough: its outbox overflowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Overflowed;

/// Something for the socket's task to send or do.
#[derive(Debug, Clone)]
pub(crate) enum Outbound {
    /// A text frame to write as is.
    Frame(Utf8Bytes),
    /// Unsubscribe the socket from a channel and tell the client (`#kickOut`, JSON message).
    KickOut { channel: String, message: String },
    /// Close the socket with this code and reason.
    Close { code: u16, reason: String },
    /// Run one of the app's event hooks, in order with the rest (after what was queued before
    /// it has been written).
    Event(Event),
    /// The rest of a frame a direct write sent in part: written as is, before anything else.
    Rest(Bytes),
}

/// An app event hook to run in the socket's task ([`crate::Handler`]'s event methods).
#[derive(Debug, Clone)]
pub(crate) enum Event {
    /// `connected`.
    Connected,
    /// `authenticated`.
    Authenticated,
    /// `deauthenticated`.
    Deauthenticated,
    /// `subscribed` to the channel.
    Subscribed(Arc<str>),
    /// `unsubscribed` from the channel.
    Unsubscribed(Arc<str>),
}

#[derive(Debug, Default)]
struct Queue {
    frames: VecDeque<Outbound>,
    overflowed: bool,
    /// The task released the socket: with nothing queued, a frame may be written directly.
    open: bool,
    /// Signals not taken yet.
    due: Due,
}

impl Due {
    /// Time to ping (and to check the last pong).
    pub(crate) const PING: Self = Self(1);
    /// The handshake deadline (nothing if the socket is handshaken by then).
    pub(crate) const HANDSHAKE: Self = Self(2);
    /// The worker drains: close.
    pub(crate) const SHUTDOWN: Self = Self(4);

    /// Whether every flag of `other` is set.
    pub(crate) fn has(self, other: Self) -> bool {
        self.0 & other.0 == other.0 && other.0 != 0
    }
}

impl Outbox {
    /// An empty outbox; `direct`: the connection, for direct writes.
    pub(crate) fn new(direct: Option<Direct>) -> Self {
        Self {
            queue: Mutex::new(Queue::default()),
            ready: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            direct,
        }
    }

    /// The socket's task is about to write or read: no direct write until it releases.
    pub(crate) fn claim(&self) {
        if self.direct.is_some() {
            self.queue.lock().unwrap_or_else(PoisonError::into_inner).open = false;
        }
    }

    /// The socket's task has nothing unwritten: frames may be written directly while nothing
    /// is queued.
    pub(crate) fn release(&self) {
        if self.direct.is_some() {
            let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
            queue.open = queue.frames.is_empty() && !queue.overflowed;
        }
    }

    /// Queues a text frame, at most `limit` items; returns false (and drops it) if the socket is
    /// a slow consumer.
    pub(crate) fn push(&self, frame: Utf8Bytes, limit: usize) -> bool {
        self.push_item(Outbound::Frame(frame), limit)
    }

    /// Writes a frame to the connection at once if the socket is idle (released by its task,
    /// nothing queued), else queues it; returns false (and drops it) if the socket is a slow
    /// consumer. For the fan-out's lone messages: a burst is cheaper through the task.
    pub(crate) fn push_direct(&self, frame: Utf8Bytes, limit: usize) -> bool {
        if let Some(direct) = &self.direct {
            let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
            if queue.open {
                match direct.send_text(frame.as_bytes()) {
                    crate::direct::Sent::All => {
                        crate::metrics::get().sent(frame.len());
                        return true;
                    }
                    crate::direct::Sent::Part(rest) => {
                        crate::metrics::get().sent(frame.len());
                        queue.open = false;
                        queue.frames.push_back(Outbound::Rest(rest));
                        drop(queue);
                        self.wake();
                        return true;
                    }
                    crate::direct::Sent::Nothing => {}
                }
            }
        }
        self.push(frame, limit)
    }

    /// Queues any item, under the same limit as frames.
    pub(crate) fn push_item(&self, item: Outbound, limit: usize) -> bool {
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        if queue.overflowed {
            crate::metrics::get().outbound_drop();
            return false;
        }
        if queue.frames.len() >= limit {
            crate::metrics::get().outbound_drop();
            queue.overflowed = true;
            queue.frames = VecDeque::new();
            drop(queue);
            self.wake();
            return false;
        }
        let was_empty = queue.frames.is_empty();
        // Queued: whatever comes next waits behind it, until the task has written it.
        queue.open = false;
        queue.frames.push_back(item);
        drop(queue);
        if was_empty {
            self.wake();
        }
        true
    }

    /// Raises `due` for the socket's task (the worker's timers and drain, [`crate::timers`]).
    pub(crate) fn signal(&self, due: Due) {
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        queue.due.0 |= due.0;
        // The task takes the signal before it writes anything more: no direct write overtakes
        // a close.
        queue.open = false;
        drop(queue);
        self.wake();
    }

    /// Ready once something was queued or signalled (or the outbox overflowed) since the last
    /// ready poll; the socket's task then takes it all ([`Outbox::take`]). Only that task polls.
    pub(crate) fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<()> {
        // Registered before the flag is read: a wake between the two is not lost.
        self.waker.register(cx.waker());
        if self.ready.swap(false, Ordering::AcqRel) { Poll::Ready(()) } else { Poll::Pending }
    }

    /// Takes every queued frame and the signals; fails if the outbox overflowed.
    pub(crate) fn take(&self, into: &mut VecDeque<Outbound>) -> Result<Due, Overflowed> {
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        if queue.overflowed {
            return Err(Overflowed);
        }
        std::mem::swap(&mut queue.frames, into);
        Ok(std::mem::take(&mut queue.due))
    }

    fn wake(&self) {
        if !self.ready.swap(true, Ordering::AcqRel) {
            self.waker.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn push_wakes_and_take_drains_in_order() {
        let outbox = Outbox::new(None);
        assert!(outbox.push("a".into(), 4));
        assert!(outbox.push("b".into(), 4));
        std::future::poll_fn(|cx| outbox.poll_ready(cx)).await;
        let mut frames = VecDeque::new();
        assert_eq!(outbox.take(&mut frames).unwrap(), Due::default());
        let texts: Vec<_> = frames
            .iter()
            .map(|f| match f {
                Outbound::Frame(t) => t.as_str().to_owned(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(texts, ["a", "b"]);
    }

    #[tokio::test]
    async fn overflow_is_reported_once_full() {
        let drops = crate::metrics::get().outbound_drops();
        let outbox = Outbox::new(None);
        assert!(outbox.push("a".into(), 2));
        assert!(outbox.push("b".into(), 2));
        assert!(!outbox.push("c".into(), 2));
        assert!(!outbox.push("d".into(), 2));
        std::future::poll_fn(|cx| outbox.poll_ready(cx)).await;
        assert!(outbox.take(&mut VecDeque::new()).is_err());
        // Other tests may drop frames meanwhile (one counter per process): at least these two.
        assert!(crate::metrics::get().outbound_drops() >= drops + 2, "both dropped frames counted");
    }

    /// Signals wake the task like a queued frame, even one not waiting yet, and take no queue
    /// space; taking them clears them.
    #[tokio::test]
    async fn signals_wake_and_are_taken_once() {
        let outbox = Outbox::new(None);
        outbox.signal(Due::PING);
        outbox.signal(Due::HANDSHAKE);
        std::future::poll_fn(|cx| outbox.poll_ready(cx)).await;
        let mut frames = VecDeque::new();
        let due = outbox.take(&mut frames).unwrap();
        assert!(due.has(Due::PING) && due.has(Due::HANDSHAKE) && !due.has(Due::SHUTDOWN));
        assert!(frames.is_empty() && frames.capacity() == 0, "no queue space used");
        assert_eq!(outbox.take(&mut frames).unwrap(), Due::default());
        let waker = futures_util::task::noop_waker();
        assert!(outbox.poll_ready(&mut Context::from_waker(&waker)).is_pending(), "one wake-up per signal");
    }
}
