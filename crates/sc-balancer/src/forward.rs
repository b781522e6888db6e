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
//!
//! Two paths: [`forward`] for plain connections (both directions in one task, each waiting on
//! its own readiness) and [`forward_tls`] for TLS ones, which drives the rustls connection by
//! hand after the handshake: readiness of either socket, then a non-blocking step in the
//! direction it concerns. The only buffers an idle TLS connection keeps are rustls' own (its
//! 4 KiB receive buffer); the plaintext copies are pooled like the plain path's. What the
//! worker wrote since the last read is read at once (up to 16 KiB, one TLS record), encrypted
//! into one record and written with one `writev` of everything rustls holds; a read that did
//! not fill its buffer drained the socket, so no read ends in `WouldBlock`. The worker side is
//! a TCP or a Unix stream ([`Stream`]).
//!
//! Both paths also enforce `[balancer] upgrade_timeout` when given a deadline: the first bytes
//! from the worker are compared with `HTTP/1.1 101` ([`Upgrade`]); a connection whose worker
//! answered that is a WebSocket and exempt, any other is cut at the deadline. Only the first 12
//! bytes from the worker are looked at, and the timer is gone once it fired (or, with TLS, as
//! soon as the upgrade is seen): no work per message after the upgrade.

use std::cell::RefCell;
use std::future::Future;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use rustls::ServerConnection;
use tokio::io::{Interest, Ready};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::Instant;

/// How long a connection stays up once one direction has ended.
pub(crate) const HALF_CLOSED_LINGER: Duration = Duration::from_secs(2);

/// Size of a copy buffer: also the largest TLS record's plaintext, so that one read from the
/// worker is one record.
const BUFFER: usize = 16 * 1024;
/// Buffers kept per thread between uses.
const POOL: usize = 64;

/// How a worker's answer to a WebSocket upgrade starts (hyper writes exactly this).
const SWITCHING: &[u8] = b"HTTP/1.1 101";

thread_local! {
    static BUFFERS: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

/// A non-blocking socket the forwarder can wait on: tokio's TCP and Unix streams.
pub(crate) trait Stream: AsFd + Sync {
    /// Waits until the socket is ready for `interest`.
    fn ready(&self, interest: Interest) -> impl Future<Output = io::Result<Ready>> + Send;
    /// A read that fails with `WouldBlock` (and clears the readiness) when nothing is there.
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// A write that fails with `WouldBlock` (and clears the readiness) when the socket is full.
    fn try_write(&self, buf: &[u8]) -> io::Result<usize>;
    /// [`Stream::try_write`] of several buffers in one system call.
    fn try_write_vectored(&self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize>;
    /// Forgets the read readiness without a system call, after a read that did not fill its
    /// buffer (the socket is then drained). Otherwise the next `ready` returns at once and the
    /// read after it fails with `WouldBlock`: one wasted syscall per message. Safe against
    /// data that arrived meanwhile: tokio clears only the readiness event it had observed.
    fn clear_readable(&self);
}

/// Where a step of [`forward_tls`] stopped.
enum Flow {
    /// Waiting for a socket to be ready again.
    Blocked,
    /// The direction reached its end of stream.
    Eof,
}

/// What the worker's first bytes said about the connection's upgrade to WebSocket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Upgrade {
    /// Still reading them: this many bytes of [`SWITCHING`] matched so far.
    Watching(u8),
    /// The worker answered 101: the connection is a WebSocket.
    Done,
    /// The worker answered something else first: the connection stays plain HTTP.
    Refused,
}

/// Bytes read and not yet written to the worker.
struct Pending {
    buffer: Box<[u8]>,
    start: usize,
    end: usize,
}

/// `std::io` over the non-blocking calls of a [`Stream`], for rustls' `read_tls`/`write_tls`;
/// the flag records a read that did not fill the buffer it was given (the socket is drained).
pub(crate) struct TryIo<'a, S>(&'a S, bool);

impl<'a, S> TryIo<'a, S> {
    pub(crate) fn new(stream: &'a S) -> Self {
        Self(stream, false)
    }
}

impl Upgrade {
    /// Takes in the next bytes from the worker; a no-op once decided.
    fn see(&mut self, bytes: &[u8]) {
        let Upgrade::Watching(matched) = *self else { return };
        let wanted = &SWITCHING[usize::from(matched)..];
        let n = wanted.len().min(bytes.len());
        *self = if wanted[..n] != bytes[..n] {
            Upgrade::Refused
        } else if n == wanted.len() {
            Upgrade::Done
        } else {
            // n < wanted.len() <= 12: fits.
            Upgrade::Watching(matched + n as u8)
        };
    }
}

impl Stream for TcpStream {
    fn ready(&self, interest: Interest) -> impl Future<Output = io::Result<Ready>> + Send {
        TcpStream::ready(self, interest)
    }
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        TcpStream::try_read(self, buf)
    }
    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        TcpStream::try_write(self, buf)
    }
    fn try_write_vectored(&self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        TcpStream::try_write_vectored(self, bufs)
    }
    fn clear_readable(&self) {
        let _ = self.try_io(Interest::READABLE, || Err::<(), _>(io::ErrorKind::WouldBlock.into()));
    }
}

impl Stream for UnixStream {
    fn ready(&self, interest: Interest) -> impl Future<Output = io::Result<Ready>> + Send {
        UnixStream::ready(self, interest)
    }
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        UnixStream::try_read(self, buf)
    }
    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        UnixStream::try_write(self, buf)
    }
    fn try_write_vectored(&self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        UnixStream::try_write_vectored(self, bufs)
    }
    fn clear_readable(&self) {
        let _ = self.try_io(Interest::READABLE, || Err::<(), _>(io::ErrorKind::WouldBlock.into()));
    }
}

impl<S: Stream> Read for TryIo<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.0.try_read(buf)?;
        self.1 = n < buf.len();
        Ok(n)
    }
}

impl<S: Stream> Write for TryIo<'_, S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }
    // rustls hands over every queued record at once (`write_tls`): one `writev`, not one
    // `write` per record as the default `write_vectored` would do.
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.0.try_write_vectored(bufs)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Forwards both ways until both directions reached end of stream (or one failed), or
/// [`HALF_CLOSED_LINGER`] after the first end of stream, or `upgrade_by` if the worker has not
/// upgraded the connection to WebSocket by then (a `TimedOut` error). Returns the bytes sent
/// (client to worker, worker to client).
pub(crate) async fn forward<C: Stream, W: Stream>(
    client: &C,
    worker: &W,
    upgrade_by: Option<Instant>,
) -> io::Result<(u64, u64)> {
    forward_with_linger(client, worker, HALF_CLOSED_LINGER, upgrade_by).await
}

async fn forward_with_linger<C: Stream, W: Stream>(
    client: &C,
    worker: &W,
    linger: Duration,
    upgrade_by: Option<Instant>,
) -> io::Result<(u64, u64)> {
    // Counted outside the pumps so that a direction cut short by the linger still reports.
    let (sent_up, sent_down) = (AtomicU64::new(0), AtomicU64::new(0));
    // Set by the worker-to-client pump when the worker's first bytes are a 101; read once, at
    // the deadline. An atomic only because the task must be Send: both sides run in it.
    let upgraded = AtomicBool::new(false);
    let up = pump(client, worker, &sent_up, None);
    let down = pump(worker, client, &sent_down, upgrade_by.map(|_| &upgraded));
    // Completes only for a connection not upgraded at the deadline; once past it, pending.
    let deadline = async {
        if let Some(at) = upgrade_by {
            tokio::time::sleep_until(at).await;
            if !upgraded.load(Ordering::Relaxed) {
                return;
            }
        }
        std::future::pending::<()>().await;
    };
    tokio::pin!(up, down, deadline);
    let rest = tokio::select! {
        outcome = &mut up => { outcome?; tokio::time::timeout(linger, &mut down).await }
        outcome = &mut down => { outcome?; tokio::time::timeout(linger, &mut up).await }
        () = &mut deadline => return Err(not_upgraded()),
    };
    if let Ok(outcome) = rest {
        outcome?;
    }
    Ok((sent_up.load(Ordering::Relaxed), sent_down.load(Ordering::Relaxed)))
}

/// Copies `from` to `to` until end of stream. With `upgraded`, the first bytes are watched
/// for a WebSocket upgrade ([`Upgrade`]), and the flag set if they are one.
async fn pump<F: Stream, T: Stream>(
    from: &F,
    to: &T,
    total: &AtomicU64,
    mut upgraded: Option<&AtomicBool>,
) -> io::Result<()> {
    let mut upgrade = Upgrade::Watching(0);
    loop {
        from.ready(Interest::READABLE).await?;
        let mut buffer = take_buffer();
        let read = from.try_read(&mut buffer);
        let outcome = match read {
            Ok(0) => {
                give_buffer(buffer);
                // Pass the end of stream on; the peer may already be gone.
                shutdown(to, Shutdown::Write);
                return Ok(());
            }
            Ok(n) => {
                total.fetch_add(n as u64, Ordering::Relaxed);
                if n < buffer.len() {
                    from.clear_readable();
                }
                if let Some(flag) = upgraded {
                    upgrade.see(&buffer[..n]);
                    if upgrade == Upgrade::Done {
                        flag.store(true, Ordering::Relaxed);
                    }
                    if !matches!(upgrade, Upgrade::Watching(_)) {
                        // Decided: no more looking.
                        upgraded = None;
                    }
                }
                write_all(to, &buffer[..n]).await
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(e),
        };
        give_buffer(buffer);
        if let Err(e) = outcome {
            // Make the other direction notice too.
            shutdown(from, Shutdown::Both);
            shutdown(to, Shutdown::Both);
            return Err(e);
        }
    }
}

/// Writes all of `bytes`, waiting for writability as needed.
pub(crate) async fn write_all<S: Stream>(to: &S, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        match to.try_write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                to.ready(Interest::WRITABLE).await?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Forwards a TLS client (its handshake done: `tls` is the rustls side of `client`) to a
/// worker, with the same end-of-stream, linger and upgrade deadline rules as [`forward`]. The
/// client's close_notify (or a bare end of stream) half-closes the worker; the worker's end of
/// stream sends close_notify and then half-closes the client.
///
/// Each wake-up steps only the direction whose socket was reported ready, and a read that did
/// not fill its buffer clears the readiness instead of reading again into `WouldBlock`: at a
/// paced rate a batch from the worker costs one read, one encryption into one TLS record and
/// one write to the client, and no read of a client socket that had nothing to say.
pub(crate) async fn forward_tls<W: Stream>(
    client: &TcpStream,
    tls: &mut ServerConnection,
    worker: &W,
    linger: Duration,
    upgrade_by: Option<Instant>,
) -> io::Result<(u64, u64)> {
    let mut upgrade = if upgrade_by.is_some() { Upgrade::Watching(0) } else { Upgrade::Done };
    let mut up: Option<Pending> = None;
    let (mut up_done, mut down_done, mut client_shut) = (false, false, false);
    let (mut sent_up, mut sent_down) = (0u64, 0u64);
    let mut deadline: Option<tokio::time::Instant> = None;
    // Which directions to step on this turn: both at first (rustls may hold decrypted bytes
    // that no socket readiness would announce), then those whose sockets woke us.
    let (mut wake_up, mut wake_down) = (true, true);
    let outcome = loop {
        if !up_done && wake_up {
            match step_up(client, tls, worker, &mut up, &mut sent_up) {
                Ok(Flow::Blocked) => {}
                Ok(Flow::Eof) => {
                    up_done = true;
                    shutdown(worker, Shutdown::Write);
                }
                Err(e) => break Err(e),
            }
        }
        if !down_done && wake_down {
            match step_down(client, tls, worker, &mut sent_down, &mut upgrade) {
                Ok(Flow::Blocked) => {}
                Ok(Flow::Eof) => {
                    down_done = true;
                    tls.send_close_notify();
                }
                Err(e) => break Err(e),
            }
        }
        if let Err(e) = flush_tls(client, tls) {
            break Err(e);
        }
        if down_done && !client_shut && !tls.wants_write() {
            shutdown(client, Shutdown::Write);
            client_shut = true;
        }
        if up_done && down_done && !tls.wants_write() {
            break Ok(());
        }
        if (up_done || down_done) && deadline.is_none() {
            deadline = Some(tokio::time::Instant::now() + linger);
        }
        let client_interest = either(
            (!up_done && up.is_none()).then_some(Interest::READABLE),
            tls.wants_write().then_some(Interest::WRITABLE),
        );
        let worker_interest = either(
            up.is_some().then_some(Interest::WRITABLE),
            (!down_done && !tls.wants_write()).then_some(Interest::READABLE),
        );
        // The upgrade deadline counts until the worker's 101 is seen, then no timer is set.
        let upgrade_deadline = upgrade_by.filter(|_| upgrade != Upgrade::Done);
        let wake = match (deadline, upgrade_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let timer = async {
            match wake {
                Some(wake) => tokio::time::sleep_until(wake).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            ready = client.ready(client_interest.unwrap_or(Interest::READABLE)), if client_interest.is_some() => {
                match ready {
                    // Readable: records to decrypt for the worker. Writable: rustls' queue
                    // can drain, and then the worker may be read again.
                    Ok(ready) => (wake_up, wake_down) = (wakes_reader(ready), wakes_writer(ready)),
                    Err(e) => break Err(e),
                }
            }
            ready = worker.ready(worker_interest.unwrap_or(Interest::READABLE)), if worker_interest.is_some() => {
                match ready {
                    // Writable: pending plaintext for the worker. Readable: a batch to encrypt.
                    Ok(ready) => (wake_up, wake_down) = (wakes_writer(ready), wakes_reader(ready)),
                    Err(e) => break Err(e),
                }
            }
            () = timer => {
                if upgrade_deadline.is_some_and(|at| at <= Instant::now()) {
                    break Err(not_upgraded());
                }
                // The linger is over.
                break Ok(());
            }
        }
    };
    if let Some(pending) = up.take() {
        give_buffer(pending.buffer);
    }
    if outcome.is_err() {
        // A TLS error leaves an alert queued: send it if the socket takes it at once.
        let _ = flush_tls(client, tls);
        shutdown(client, Shutdown::Both);
        shutdown(worker, Shutdown::Both);
    }
    outcome.map(|()| (sent_up, sent_down))
}

/// Whether a readiness lets the reading side of a socket make progress (data, its end, or an
/// error that the read will report).
fn wakes_reader(ready: Ready) -> bool {
    ready.is_readable() || ready.is_read_closed() || ready.is_error()
}

/// Whether a readiness lets the writing side of a socket make progress.
fn wakes_writer(ready: Ready) -> bool {
    ready.is_writable() || ready.is_write_closed() || ready.is_error()
}

/// Client to worker, without waiting: write what is pending, then decrypt and write more,
/// reading TLS records from the client as needed. A read of the client that did not fill
/// rustls' buffer drained the socket: the readiness is cleared and the step ends there rather
/// than read again into `WouldBlock`.
fn step_up<W: Stream>(
    client: &TcpStream,
    tls: &mut ServerConnection,
    worker: &W,
    up: &mut Option<Pending>,
    sent: &mut u64,
) -> io::Result<Flow> {
    let mut drained = false;
    loop {
        if let Some(pending) = up.as_mut() {
            match worker.try_write(&pending.buffer[pending.start..pending.end]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    pending.start += n;
                    if pending.start == pending.end
                        && let Some(done) = up.take()
                    {
                        give_buffer(done.buffer);
                    }
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Flow::Blocked),
                Err(e) => return Err(e),
            }
        }
        let mut buffer = take_buffer();
        match tls.reader().read(&mut buffer) {
            // close_notify: a clean end of stream.
            Ok(0) => {
                give_buffer(buffer);
                return Ok(Flow::Eof);
            }
            Ok(n) => {
                *sent += n as u64;
                *up = Some(Pending { buffer, start: 0, end: n });
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                give_buffer(buffer);
                if drained {
                    return Ok(Flow::Blocked);
                }
                let mut io = TryIo(client, false);
                match tls.read_tls(&mut io) {
                    // The client went away without close_notify; pass it on all the same.
                    Ok(0) => return Ok(Flow::Eof),
                    Ok(_) => {
                        if io.1 {
                            client.clear_readable();
                            drained = true;
                        }
                        tls.process_new_packets()
                            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Flow::Blocked),
                    Err(e) => return Err(e),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                give_buffer(buffer);
                return Ok(Flow::Eof);
            }
            Err(e) => {
                give_buffer(buffer);
                return Err(e);
            }
        }
    }
}

/// Worker to client, without waiting: read from the worker only once rustls has sent out
/// everything it holds, so that it never buffers more than one read. Each read takes all the
/// worker has written since the last one (up to [`BUFFER`], the largest TLS record), becomes
/// one record and goes out in one write; a read that did not fill the buffer drained the
/// socket, so the step ends without reading into `WouldBlock`.
fn step_down<W: Stream>(
    client: &TcpStream,
    tls: &mut ServerConnection,
    worker: &W,
    sent: &mut u64,
    upgrade: &mut Upgrade,
) -> io::Result<Flow> {
    loop {
        flush_tls(client, tls)?;
        if tls.wants_write() {
            return Ok(Flow::Blocked);
        }
        let mut buffer = take_buffer();
        let outcome = match worker.try_read(&mut buffer) {
            Ok(0) => Ok(Some(Flow::Eof)),
            Ok(n) => {
                *sent += n as u64;
                upgrade.see(&buffer[..n]);
                let drained = n < buffer.len();
                if drained {
                    worker.clear_readable();
                }
                // rustls takes it all: its outgoing buffer is empty and its limit (64 KiB) is
                // more than one read; one read is at most one record (16 KiB of plaintext).
                match tls.writer().write_all(&buffer[..n]) {
                    Ok(()) if drained => flush_tls(client, tls).map(|()| Some(Flow::Blocked)),
                    Ok(()) => Ok(None),
                    Err(e) => Err(e),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Some(Flow::Blocked)),
            Err(e) => Err(e),
        };
        give_buffer(buffer);
        if let Some(flow) = outcome? {
            return Ok(flow);
        }
    }
}

/// Writes what rustls has for the client until the socket is full.
fn flush_tls(client: &TcpStream, tls: &mut ServerConnection) -> io::Result<()> {
    while tls.wants_write() {
        match tls.write_tls(&mut TryIo(client, false)) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The error of a connection cut at its upgrade deadline.
fn not_upgraded() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "not upgraded to websocket within upgrade_timeout")
}

fn either(a: Option<Interest>, b: Option<Interest>) -> Option<Interest> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a | b),
        (a, b) => a.or(b),
    }
}

fn shutdown<S: AsFd>(socket: &S, how: Shutdown) {
    // The peer may already be gone; nothing to do about it.
    let _ = socket2::SockRef::from(socket).shutdown(how);
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
        let task = tokio::spawn(async move { forward(&client_side, &worker_side, None).await });

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
    async fn forwards_to_a_unix_stream() {
        let (mut client_end, client_side) = pair().await;
        let (worker_side, mut worker_end) = UnixStream::pair().unwrap();
        let task = tokio::spawn(async move { forward(&client_side, &worker_side, None).await });
        client_end.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        worker_end.read_exact(&mut got).await.unwrap();
        worker_end.write_all(b"pong!").await.unwrap();
        drop(worker_end);
        let mut reply = Vec::new();
        client_end.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"pong!");
        drop(client_end);
        assert_eq!(task.await.unwrap().unwrap(), (4, 5));
    }

    #[tokio::test]
    async fn tls_both_ways_at_once_then_close_notify_each_way() {
        let (client, client_side, mut tls) = tls_pair().await;
        let (worker_side, worker_end) = pair().await;
        let task = tokio::spawn(async move {
            forward_tls(&client_side, &mut tls, &worker_side, Duration::from_secs(5), None).await
        });

        // A megabyte each way at the same time: neither direction may wait on the other.
        let up = vec![1u8; 1 << 20];
        let down = vec![2u8; 1 << 20];
        let (mut client_read, mut client_write) = tokio::io::split(client);
        let (mut worker_read, mut worker_write) = worker_end.into_split();
        let (sent_up, sent_down) = (up.clone(), down.clone());
        let client_writes = tokio::spawn(async move {
            client_write.write_all(&sent_up).await.unwrap();
            client_write
        });
        let worker_writes = tokio::spawn(async move {
            worker_write.write_all(&sent_down).await.unwrap();
            // The worker's end of stream reaches the client as close_notify, then EOF.
            worker_write.shutdown().await.unwrap();
        });
        let mut got_up = vec![0u8; up.len()];
        worker_read.read_exact(&mut got_up).await.unwrap();
        let mut got_down = Vec::new();
        client_read.read_to_end(&mut got_down).await.unwrap();
        assert!(got_up == up && got_down == down, "bytes arrive whole both ways");
        worker_writes.await.unwrap();
        // The client's close_notify reaches the worker as an end of stream.
        let mut client_write = client_writes.await.unwrap();
        client_write.shutdown().await.unwrap();
        let mut rest = Vec::new();
        worker_read.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        let outcome = tokio::time::timeout(Duration::from_secs(5), task).await.expect("ended");
        assert_eq!(outcome.unwrap().unwrap(), (1 << 20, 1 << 20));
    }

    /// A worker socket that counts its reads that found nothing.
    struct CountingWorker {
        inner: UnixStream,
        empty_reads: std::sync::atomic::AtomicUsize,
    }

    impl Stream for CountingWorker {
        fn ready(&self, interest: Interest) -> impl Future<Output = io::Result<Ready>> + Send {
            self.inner.ready(interest)
        }
        fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
            let read = self.inner.try_read(buf);
            if matches!(&read, Err(e) if e.kind() == io::ErrorKind::WouldBlock) {
                self.empty_reads.fetch_add(1, Ordering::Relaxed);
            }
            read
        }
        fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
            self.inner.try_write(buf)
        }
        fn try_write_vectored(&self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
            self.inner.try_write_vectored(bufs)
        }
        fn clear_readable(&self) {
            Stream::clear_readable(&self.inner);
        }
    }

    impl AsFd for CountingWorker {
        fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
            self.inner.as_fd()
        }
    }

    async fn tls_pair() -> (tokio_rustls::client::TlsStream<TcpStream>, TcpStream, ServerConnection) {
        use std::sync::Arc;
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert =
            rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap().self_signed(&key).unwrap();
        std::fs::write(dir.path().join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), key.serialize_pem()).unwrap();
        let server =
            crate::tls::server_config(&dir.path().join("cert.pem"), &dir.path().join("key.pem")).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.der().clone()).unwrap();
        let client_config =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        let (client_end, client_side) = pair().await;
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let (client, accepted) = tokio::join!(
            tokio_rustls::TlsConnector::from(Arc::new(client_config)).connect(name, client_end),
            tokio_rustls::TlsAcceptor::from(server).accept(client_side),
        );
        let (client_side, tls) = accepted.unwrap().into_inner();
        (client.unwrap(), client_side, tls)
    }

    #[tokio::test]
    async fn tls_reads_each_batch_from_the_worker_once_without_a_read_into_would_block() {
        let (mut client, client_side, mut tls) = tls_pair().await;
        let (worker_side, mut worker_end) = UnixStream::pair().unwrap();
        let worker = std::sync::Arc::new(CountingWorker { inner: worker_side, empty_reads: 0.into() });
        let counted = std::sync::Arc::clone(&worker);
        let task = tokio::spawn(async move {
            forward_tls(&client_side, &mut tls, &*worker, Duration::from_secs(5), None).await
        });
        // Paced batches, each delivered before the next: the shape of a fan-out at 20/s.
        const BATCHES: usize = 50;
        for i in 0..BATCHES {
            let frame = format!("frame {i:04}");
            worker_end.write_all(frame.as_bytes()).await.unwrap();
            let mut got = vec![0u8; frame.len()];
            client.read_exact(&mut got).await.unwrap();
            assert_eq!(got, frame.as_bytes());
        }
        // Reads of the worker that found nothing: the first turn's, and at most a few spurious
        // wake-ups; reading again after every batch would make it BATCHES.
        let empty = counted.empty_reads.load(Ordering::Relaxed);
        assert!(empty <= 3, "{empty} reads of the worker found nothing for {BATCHES} batches");
        drop(worker_end);
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        drop(client);
        let outcome = tokio::time::timeout(Duration::from_secs(5), task).await.expect("ended");
        assert_eq!(outcome.unwrap().unwrap().1, (BATCHES * 10) as u64);
    }

    #[tokio::test]
    async fn a_peer_that_never_closes_its_half_is_cut_after_the_linger() {
        let (client_end, client_side) = pair().await;
        let (worker_side, mut worker_end) = pair().await;
        let linger = Duration::from_millis(100);
        let task =
            tokio::spawn(async move { forward_with_linger(&client_side, &worker_side, linger, None).await });
        worker_end.write_all(b"bye").await.unwrap();
        worker_end.shutdown().await.unwrap();
        // client_end stays open and silent.
        let outcome = tokio::time::timeout(Duration::from_secs(5), task).await;
        assert_eq!(outcome.expect("ended").unwrap().unwrap(), (0, 3));
        drop(client_end);
    }

    #[test]
    fn the_upgrade_is_read_from_the_first_bytes_however_they_are_split() {
        let mut upgrade = Upgrade::Watching(0);
        for piece in [&b"HT"[..], b"TP/1.1 1", b"01 Switching Protocols\r\n"] {
            upgrade.see(piece);
        }
        assert_eq!(upgrade, Upgrade::Done);
        upgrade.see(b"HTTP/1.1 200 OK");
        assert_eq!(upgrade, Upgrade::Done, "decided once");
        let mut upgrade = Upgrade::Watching(0);
        upgrade.see(b"HTTP/1.1 200 OK\r\n");
        assert_eq!(upgrade, Upgrade::Refused);
        upgrade.see(b"HTTP/1.1 101 ");
        assert_eq!(upgrade, Upgrade::Refused, "only the first answer counts");
        let mut upgrade = Upgrade::Watching(0);
        upgrade.see(b"HTTP/1.1 10");
        assert_eq!(upgrade, Upgrade::Watching(11));
        upgrade.see(b"0 Continue");
        assert_eq!(upgrade, Upgrade::Refused);
    }

    #[tokio::test]
    async fn a_connection_not_upgraded_by_its_deadline_is_cut_and_an_upgraded_one_is_not() {
        for answer in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"[..],
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
        ] {
            let (mut client_end, client_side) = pair().await;
            let (worker_side, mut worker_end) = pair().await;
            let deadline = Instant::now() + Duration::from_millis(300);
            let task = tokio::spawn(async move { forward(&client_side, &worker_side, Some(deadline)).await });
            client_end.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
            let mut request = [0u8; 18];
            worker_end.read_exact(&mut request).await.unwrap();
            // The answer in two pieces.
            worker_end.write_all(&answer[..5]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            worker_end.write_all(&answer[5..]).await.unwrap();
            let mut got = vec![0u8; answer.len()];
            client_end.read_exact(&mut got).await.unwrap();
            tokio::time::sleep(Duration::from_millis(500)).await;
            if answer.starts_with(b"HTTP/1.1 101") {
                assert!(!task.is_finished(), "an upgraded connection outlives the deadline");
                client_end.write_all(b"frame").await.unwrap();
                let mut frame = [0u8; 5];
                worker_end.read_exact(&mut frame).await.unwrap();
                drop((client_end, worker_end));
                assert!(task.await.unwrap().is_ok());
            } else {
                let outcome = tokio::time::timeout(Duration::from_secs(1), task).await.expect("cut");
                assert_eq!(outcome.unwrap().unwrap_err().kind(), io::ErrorKind::TimedOut);
            }
        }
    }
}
