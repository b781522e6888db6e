//! Turns a queue into a stream of batches, without waiting to fill them.
//!
//! Used on both directions of the worker-broker stream: whatever is queued when the transport
//! is ready to send goes out as one gRPC message, so a burst of publishes travels in few
//! messages while a lone publish goes out at once (no timer, no added latency).

use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::Stream;
use tokio::sync::mpsc;

/// A stream of `Vec<T>` drained from an mpsc receiver (bounded or not), at most `max` items
/// each.
#[derive(Debug)]
pub struct BatchStream<Q> {
    rx: Q,
    max: usize,
}

/// The tokio receivers a [`BatchStream`] can drain.
pub trait Queue: Unpin {
    /// What the queue holds.
    type Item;
    /// How many items wait now.
    fn queued(&self) -> usize;
    /// Moves up to `n` items into `into`; ready with how many (0: the queue is closed).
    fn poll_many(&mut self, cx: &mut Context<'_>, into: &mut Vec<Self::Item>, n: usize) -> Poll<usize>;
}

impl<T> Queue for mpsc::Receiver<T> {
    type Item = T;
    fn queued(&self) -> usize {
        self.len()
    }
    fn poll_many(&mut self, cx: &mut Context<'_>, into: &mut Vec<T>, n: usize) -> Poll<usize> {
        self.poll_recv_many(cx, into, n)
    }
}

impl<T> Queue for mpsc::UnboundedReceiver<T> {
    type Item = T;
    fn queued(&self) -> usize {
        self.len()
    }
    fn poll_many(&mut self, cx: &mut Context<'_>, into: &mut Vec<T>, n: usize) -> Poll<usize> {
        self.poll_recv_many(cx, into, n)
    }
}

impl<Q: Queue> BatchStream<Q> {
    /// Batches of at most `max` (at least 1) items from `rx`.
    pub fn new(rx: Q, max: usize) -> Self {
        Self { rx, max: max.max(1) }
    }
}

impl<Q: Queue> Stream for BatchStream<Q> {
    type Item = Vec<Q::Item>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let mut batch = Vec::new();
        let n = this.rx.queued().clamp(1, this.max);
        match this.rx.poll_many(cx, &mut batch, n) {
            Poll::Ready(0) => Poll::Ready(None),
            Poll::Ready(_) => Poll::Ready(Some(batch)),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;

    use super::*;

    #[tokio::test]
    async fn drains_what_is_queued_in_one_batch() {
        let (tx, rx) = mpsc::channel(100);
        for i in 0..10 {
            tx.send(i).await.unwrap();
        }
        let mut stream = BatchStream::new(rx, 4);
        assert_eq!(stream.next().await, Some(vec![0, 1, 2, 3]));
        assert_eq!(stream.next().await, Some(vec![4, 5, 6, 7]));
        assert_eq!(stream.next().await, Some(vec![8, 9]));
        tx.send(10).await.unwrap();
        assert_eq!(stream.next().await, Some(vec![10]));
        drop(tx);
        assert_eq!(stream.next().await, None);
    }
}
