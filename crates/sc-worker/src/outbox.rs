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
use std::sync::{Arc, Mutex, PoisonError};

use crate::direct::Direct;
use bytes::Bytes;

use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// The outbound queue of one socket.
#[derive(Debug)]
pub(crate) struct Outbox {
    /// std Mutex: held for a push or a swap, never across await. Starts empty and unallocated,
    /// so an idle socket's outbox costs a few words.
    queue: Mutex<Queue>,
    /// Wakes the socket's task; a notification with no waiter is kept, so none is lost.
    ready: Notify,
    limit: usize,
    /// The socket's connection, for direct writes (none for connections that take none).
    direct: Option<Direct>,
}

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
}

impl Outbox {
    /// An outbox holding at most `limit` frames; `direct`: the connection, for direct writes.
    pub(crate) fn new(limit: usize, direct: Option<Direct>) -> Self {
        Self { queue: Mutex::new(Queue::default()), ready: Notify::new(), limit, direct }
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

    /// Queues a text frame; returns false (and drops it) if the socket is a slow consumer.
    pub(crate) fn push(&self, frame: Utf8Bytes) -> bool {
        self.push_item(Outbound::Frame(frame))
    }

    /// Writes a frame to the connection at once if the socket is idle (released by its task,
    /// nothing queued), else queues it; returns false (and drops it) if the socket is a slow
    /// consumer. For the fan-out's lone messages: a burst is cheaper through the task.
    pub(crate) fn push_direct(&self, frame: Utf8Bytes) -> bool {
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
                        self.ready.notify_one();
                        return true;
                    }
                    crate::direct::Sent::Nothing => {}
                }
            }
        }
        self.push(frame)
    }

    /// Queues any item, under the same limit as frames.
    pub(crate) fn push_item(&self, item: Outbound) -> bool {
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        if queue.overflowed {
            crate::metrics::get().outbound_drop();
            return false;
        }
        if queue.frames.len() >= self.limit {
            crate::metrics::get().outbound_drop();
            queue.overflowed = true;
            queue.frames = VecDeque::new();
            drop(queue);
            self.ready.notify_one();
            return false;
        }
        let was_empty = queue.frames.is_empty();
        // Queued: whatever comes next waits behind it, until the task has written it.
        queue.open = false;
        queue.frames.push_back(item);
        drop(queue);
        if was_empty {
            self.ready.notify_one();
        }
        true
    }

    /// Completes once something is queued (or the outbox overflowed) after the last
    /// [`Outbox::take`]; the socket's task keeps one pinned and makes a new one after each take.
    pub(crate) fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.ready.notified()
    }

    /// Takes every queued frame; fails if the outbox overflowed.
    pub(crate) fn take(&self, into: &mut VecDeque<Outbound>) -> Result<(), Overflowed> {
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        if queue.overflowed {
            return Err(Overflowed);
        }
        std::mem::swap(&mut queue.frames, into);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn push_wakes_and_take_drains_in_order() {
        let outbox = Outbox::new(4, None);
        assert!(outbox.push("a".into()));
        assert!(outbox.push("b".into()));
        outbox.notified().await;
        let mut frames = VecDeque::new();
        outbox.take(&mut frames).unwrap();
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
        let outbox = Outbox::new(2, None);
        assert!(outbox.push("a".into()));
        assert!(outbox.push("b".into()));
        assert!(!outbox.push("c".into()));
        assert!(!outbox.push("d".into()));
        outbox.notified().await;
        assert!(outbox.take(&mut VecDeque::new()).is_err());
        // Other tests may drop frames meanwhile (one counter per process): at least these two.
        assert!(crate::metrics::get().outbound_drops() >= drops + 2, "both dropped frames counted");
    }
}
