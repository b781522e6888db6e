//! Layer 4 forwarding between a client and a worker, without per-connection copy buffers.
//!
//! `tokio::io::copy_bidirectional` keeps an 8 KiB buffer per direction for the whole life of a
//! connection; with mostly idle WebSockets that is most of the memory. Here each direction waits
//! for readiness first, then borrows a buffer from a small per-thread pool only for the
//! read-then-write, so an idle connection holds no buffer at all. An end of stream in one
//! direction is passed on as a half-close; the connection ends when both directions have, or
//! [`HALF_CLOSED_LINGER`] after the first one did: a WebSocket peer answers a close at once, and
//! one that does not (a hung client after its worker drained) must not hold the connection, nor
//! a stopping balancer, for ever.

use std::cell::RefCell;
use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::TcpStream;

/// How long a connection stays up once one direction has ended.
pub const HALF_CLOSED_LINGER: Duration = Duration::from_secs(2);

/// Size of a copy buffer.
const BUFFER: usize = 16 * 1024;
/// Buffers kept per thread between uses.
const POOL: usize = 64;

thread_local! {
    static BUFFERS: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

/// Forwards both ways until both directions reached end of stream (or one failed), or
/// [`HALF_CLOSED_LINGER`] after the first end of stream. Returns the bytes sent (client to
/// worker, worker to client).
pub async fn forward(client: &TcpStream, worker: &TcpStream) -> io::Result<(u64, u64)> {
    forward_with_linger(client, worker, HALF_CLOSED_LINGER).await
}

async fn forward_with_linger(
    client: &TcpStream,
    worker: &TcpStream,
    linger: Duration,
) -> io::Result<(u64, u64)> {
    // Counted outside the pumps so that a direction cut short by the linger still reports.
    let (sent_up, sent_down) = (AtomicU64::new(0), AtomicU64::new(0));
    let up = pump(client, worker, &sent_up);
    let down = pump(worker, client, &sent_down);
    tokio::pin!(up, down);
    let rest = tokio::select! {
        outcome = &mut up => { outcome?; tokio::time::timeout(linger, &mut down).await }
        outcome = &mut down => { outcome?; tokio::time::timeout(linger, &mut up).await }
    };
    if let Ok(outcome) = rest {
        outcome?;
    }
    Ok((sent_up.load(Ordering::Relaxed), sent_down.load(Ordering::Relaxed)))
}

async fn pump(from: &TcpStream, to: &TcpStream, total: &AtomicU64) -> io::Result<()> {
    loop {
        from.readable().await?;
        let mut buffer = take_buffer();
        let read = from.try_read(&mut buffer);
        let outcome = match read {
            Ok(0) => {
                give_buffer(buffer);
                // Pass the end of stream on; the peer may already be gone.
                let _ = socket2::SockRef::from(to).shutdown(Shutdown::Write);
                return Ok(());
            }
            Ok(n) => {
                total.fetch_add(n as u64, Ordering::Relaxed);
                write_all(to, &buffer[..n]).await
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(e),
        };
        give_buffer(buffer);
        if let Err(e) = outcome {
            // Make the other direction notice too.
            let _ = socket2::SockRef::from(from).shutdown(Shutdown::Both);
            let _ = socket2::SockRef::from(to).shutdown(Shutdown::Both);
            return Err(e);
        }
    }
}

async fn write_all(to: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        match to.try_write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => to.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn take_buffer() -> Box<[u8]> {
    BUFFERS.with(|pool| pool.borrow_mut().pop()).unwrap_or_else(|| vec![0u8; BUFFER].into_boxed_slice())
}

fn give_buffer(buffer: Box<[u8]>) {
    BUFFERS.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.len() < POOL {
            pool.push(buffer);
        }
    });
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.unwrap(), b.unwrap().0)
    }

    #[tokio::test]
    async fn forwards_both_ways_with_half_close() {
        // client_end <-> [client_side | forward | worker_side] <-> worker_end
        let (mut client_end, client_side) = pair().await;
        let (worker_side, mut worker_end) = pair().await;
        let task = tokio::spawn(async move { forward(&client_side, &worker_side).await });

        let big = vec![7u8; 200_000];
        client_end.write_all(&big).await.unwrap();
        client_end.shutdown().await.unwrap();
        let mut got = Vec::new();
        worker_end.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, big, "client bytes arrive whole, then end of stream");

        worker_end.write_all(b"reply after half-close").await.unwrap();
        worker_end.shutdown().await.unwrap();
        let mut reply = Vec::new();
        client_end.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"reply after half-close");
        assert_eq!(task.await.unwrap().unwrap(), (200_000, 22));
    }

    #[tokio::test]
    async fn a_peer_that_never_closes_its_half_is_cut_after_the_linger() {
        let (client_end, client_side) = pair().await;
        let (worker_side, mut worker_end) = pair().await;
        let linger = Duration::from_millis(100);
        let task = tokio::spawn(async move { forward_with_linger(&client_side, &worker_side, linger).await });
        worker_end.write_all(b"bye").await.unwrap();
        worker_end.shutdown().await.unwrap();
        // client_end stays open and silent.
        let outcome = tokio::time::timeout(Duration::from_secs(5), task).await;
        assert_eq!(outcome.expect("ended").unwrap().unwrap(), (0, 3));
        drop(client_end);
    }
}
