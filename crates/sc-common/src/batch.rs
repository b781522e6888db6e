//! Turns a queue into a stream of batches, without waiting to fill them.
//!
//! Used on both directions of the worker-broker stream: whatever is queued when the transport
//! is ready to send goes out as one gRPC message, so a burst of publishes travels in few
//! messages while a lone publish goes out at once (no timer, no added latency). A batch is
//! also cut by bytes ([`BatchStream::with_byte_limit`]), so that it always fits the gRPC
//! message limit of the other end, however large the items that legal input makes.

use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::Stream;
use tokio::sync::mpsc;

/// How many bytes an item weighs.
type Weigh<T> = fn(&T) -> usize;

/// A stream of `Vec<T>` drained from an mpsc receiver (bounded or not), at most `max` items
/// each (and at most a byte budget, with [`BatchStream::with_byte_limit`]).
pub struct BatchStream<Q: Queue> {
    rx: Q,
    max: usize,
    /// Most bytes in one batch, and how to weigh an item. A single item heavier than the
    /// budget goes alone.
    bytes: Option<(usize, Weigh<Q::Item>)>,
    /// Items taken from the queue that did not fit the previous batch.
    carry: std::collections::VecDeque<Q::Item>,
}

// Never pin-projected: the carried items are moved freely.
impl<Q: Queue> Unpin for BatchStream<Q> {}

impl<Q: Queue + std::fmt::Debug> std::fmt::Debug for BatchStream<Q> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchStream").field("rx", &self.rx).field("max", &self.max).finish_non_exhaustive()
    }
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
        Self { rx, max: max.max(1), bytes: None, carry: std::collections::VecDeque::new() }
    }

    /// Also cuts batches at `limit` bytes, weighing each item with `size`.
    pub fn with_byte_limit(mut self, limit: usize, size: fn(&Q::Item) -> usize) -> Self {
        self.bytes = Some((limit, size));
        self
    }

    /// Moves items from `from` into `batch` while they fit; returns whether the batch is full.
    fn fill(
        &mut self,
        batch: &mut Vec<Q::Item>,
        weight: &mut usize,
        from: &mut std::collections::VecDeque<Q::Item>,
    ) -> bool {
        while let Some(item) = from.pop_front() {
            if batch.len() >= self.max {
                from.push_front(item);
                return true;
            }
            if let Some((limit, size)) = self.bytes {
                let heavy = size(&item);
                if !batch.is_empty() && weight.saturating_add(heavy) > limit {
                    from.push_front(item);
                    return true;
                }
                *weight = weight.saturating_add(heavy);
            }
            batch.push(item);
        }
        batch.len() >= self.max
    }
}

impl<Q: Queue> Stream for BatchStream<Q> {
    type Item = Vec<Q::Item>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let mut batch = Vec::new();
        let mut weight = 0;
        let mut carry = std::mem::take(&mut this.carry);
        let full = this.fill(&mut batch, &mut weight, &mut carry);
        this.carry = carry;
        if full || !this.carry.is_empty() || (!batch.is_empty() && this.rx.queued() == 0) {
            return Poll::Ready(Some(batch));
        }
        let mut taken = Vec::new();
        let n = this.rx.queued().clamp(1, this.max - batch.len());
        match this.rx.poll_many(cx, &mut taken, n) {
            Poll::Ready(0) if batch.is_empty() => Poll::Ready(None),
            Poll::Ready(_) => {
                let mut taken = std::collections::VecDeque::from(taken);
                this.fill(&mut batch, &mut weight, &mut taken);
                this.carry = taken;
                Poll::Ready(Some(batch))
            }
            Poll::Pending if batch.is_empty() => Poll::Pending,
            Poll::Pending => Poll::Ready(Some(batch)),
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

    #[tokio::test]
    async fn batches_are_cut_by_bytes_too_and_a_heavy_item_goes_alone() {
        let (tx, rx) = mpsc::unbounded_channel::<Vec<u8>>();
        for len in [3, 3, 3, 10, 1, 1] {
            tx.send(vec![0; len]).unwrap();
        }
        drop(tx);
        let mut stream = BatchStream::new(rx, 100).with_byte_limit(7, Vec::len);
        let lens = |batch: Option<Vec<Vec<u8>>>| batch.map(|b| b.iter().map(Vec::len).collect::<Vec<_>>());
        assert_eq!(lens(stream.next().await), Some(vec![3, 3]));
        assert_eq!(lens(stream.next().await), Some(vec![3]));
        assert_eq!(lens(stream.next().await), Some(vec![10]), "heavier than the limit: alone");
        assert_eq!(lens(stream.next().await), Some(vec![1, 1]));
        assert_eq!(lens(stream.next().await), None);
    }
}
