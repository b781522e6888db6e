//! Direct writes: a frame for an idle socket goes from the fan-out straight to its connection.
//!
//! A socket's task owns its WebSocket, and most frames reach the client through the task (the
//! outbox wakes it, it encodes and flushes). For a socket that has nothing queued and nothing
//! unwritten, that wake-up is most of the cost of a delivery; instead, whoever pushes the frame
//! (the fan-out, usually) writes it to the connection itself, without blocking: one
//! `try_write`, no wake-up, no task switch. The WebSocket frame of a server is its payload
//! behind a 2-10 byte header (no mask), so the header is all there is to encode.
//!
//! Who may write is decided under the outbox's lock ([`crate::outbox`]): a direct write only
//! while the task has released the socket (nothing queued, its buffers flushed), and the task
//! claims it back before it writes or reads anything itself. A direct write that the kernel
//! takes only in part leaves the rest in the outbox, ahead of everything else; the task writes
//! it first ([`Shared`] holds it until it is out).
//!
//! [`Shared`] is the connection as the task's WebSocket sees it: the TCP stream, shared with the
//! outbox, read and written through tokio's readiness calls (`&TcpStream` suffices for those).
//! The task writes its own text frames into it too, not into tungstenite's write buffer: that
//! buffer keeps its largest size for the socket's life, where [`Shared`]'s is released as soon
//! as it is written out, so an idle socket holds no write buffer.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// What a direct write did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Sent {
    /// The whole frame went out.
    All,
    /// Nothing went out (the connection is not writable): queue the frame as usual.
    Nothing,
    /// Part went out: these bytes must follow before anything else.
    Part(Bytes),
}

/// Where an outbox writes its socket's frames directly.
#[derive(Debug, Clone)]
pub(crate) enum Direct {
    /// A plain TCP connection.
    Tcp(Arc<TcpStream>),
    /// A handed-off TLS session: each frame becomes a record, under the session's send keys.
    Tls(Arc<crate::tls::Sender>),
}

impl Direct {
    /// Writes `payload` as one text frame without waiting.
    pub(crate) fn send_text(&self, payload: &[u8]) -> Sent {
        match self {
            Direct::Tcp(tcp) => send_text(tcp, payload),
            Direct::Tls(sender) => {
                let (header, header_len) = text_header(payload.len());
                match sender.try_send(&[&header[..header_len], payload]) {
                    None => Sent::Nothing,
                    Some(rest) if rest.is_empty() => Sent::All,
                    Some(rest) => Sent::Part(rest),
                }
            }
        }
    }
}

/// The header of an unmasked, final text frame of `len` bytes, and its length.
pub(crate) fn text_header(len: usize) -> ([u8; 10], usize) {
    let mut header = [0u8; 10];
    header[0] = 0x81;
    if len < 126 {
        header[1] = len as u8;
        (header, 2)
    } else if let Ok(short) = u16::try_from(len) {
        header[1] = 126;
        header[2..4].copy_from_slice(&short.to_be_bytes());
        (header, 4)
    } else {
        header[1] = 127;
        header[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        (header, 10)
    }
}

/// Writes `payload` as one text frame to `tcp` without waiting.
pub(crate) fn send_text(tcp: &TcpStream, payload: &[u8]) -> Sent {
    let (header, header_len) = text_header(payload.len());
    let header = &header[..header_len];
    let total = header.len() + payload.len();
    match tcp.try_write_vectored(&[IoSlice::new(header), IoSlice::new(payload)]) {
        Ok(n) if n >= total => Sent::All,
        Ok(0) => Sent::Nothing,
        Ok(n) => {
            let mut rest = BytesMut::with_capacity(total - n);
            if n < header.len() {
                rest.extend_from_slice(&header[n..]);
                rest.extend_from_slice(payload);
            } else {
                rest.extend_from_slice(&payload[n - header.len()..]);
            }
            Sent::Part(rest.freeze())
        }
        // WouldBlock; or an error, which the socket's task will see too.
        Err(_) => Sent::Nothing,
    }
}

/// The socket's TCP connection as its WebSocket sees it, shared with its outbox for direct
/// writes; holds the rest of a partial direct write, and the text frames of the socket's task,
/// until they are out.
#[derive(Debug)]
pub(crate) struct Shared {
    tcp: Arc<TcpStream>,
    /// Written before anything else (before what tungstenite writes: its control frames);
    /// unallocated while empty.
    first: BytesMut,
}

impl Shared {
    /// The connection, and the handle the outbox writes through.
    pub(crate) fn new(tcp: TcpStream) -> (Self, Arc<TcpStream>) {
        let tcp = Arc::new(tcp);
        (Self { tcp: tcp.clone(), first: BytesMut::new() }, tcp)
    }

    /// The TCP stream.
    pub(crate) fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// Queues `bytes` to go out before anything written after.
    pub(crate) fn write_first(&mut self, bytes: Bytes) {
        self.first.extend_from_slice(&bytes);
    }

    /// Queues a text frame of `payload`, to go out with the next flush.
    pub(crate) fn write_text(&mut self, payload: &[u8]) {
        let (header, header_len) = text_header(payload.len());
        self.first.reserve(header_len + payload.len());
        self.first.extend_from_slice(&header[..header_len]);
        self.first.extend_from_slice(payload);
    }

    /// Writes what must go first, until it is out or the connection is not writable; the
    /// buffer is released once empty.
    fn poll_first(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.first.is_empty() {
            ready!(self.tcp.poll_write_ready(cx))?;
            match self.tcp.try_write(&self.first) {
                Ok(n) if n == self.first.len() => self.first = BytesMut::new(),
                Ok(n) => self.first.advance(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for Shared {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            ready!(self.tcp.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match self.tcp.try_read(unfilled) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for Shared {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_first(cx))?;
        loop {
            ready!(this.tcp.poll_write_ready(cx))?;
            match this.tcp.try_write(buf) {
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_first(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_first(cx))?;
        Poll::Ready(rustix::net::shutdown(&*this.tcp, rustix::net::Shutdown::Write).map_err(io::Error::from))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_follow_rfc_6455() {
        assert_eq!(&text_header(5).0[..2], &[0x81, 5]);
        assert_eq!(&text_header(125).0[..2], &[0x81, 125]);
        assert_eq!(&text_header(126).0[..4], &[0x81, 126, 0, 126]);
        assert_eq!(&text_header(65535).0[..4], &[0x81, 126, 0xff, 0xff]);
        let (long, n) = text_header(65536);
        assert_eq!(n, 10);
        assert_eq!(&long[..10], &[0x81, 127, 0, 0, 0, 0, 0, 1, 0, 0]);
    }

    /// A frame written directly reads back as a WebSocket text message, whole, and a partial
    /// write's rest follows before anything written later.
    #[tokio::test]
    async fn direct_frames_and_their_rest_arrive_whole_and_in_order() {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::protocol::Role;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        // A small send buffer, so that a large frame is taken only in part.
        socket2::SockRef::from(&server).set_send_buffer_size(4096).unwrap();
        let (shared, tcp) = Shared::new(server);
        let mut server_ws =
            tokio_tungstenite::WebSocketStream::from_raw_socket(shared, Role::Server, None).await;
        let mut client_ws =
            tokio_tungstenite::WebSocketStream::from_raw_socket(client, Role::Client, None).await;

        assert_eq!(send_text(&tcp, b"hello"), Sent::All);
        let big = "x".repeat(1 << 20);
        let rest = match send_text(&tcp, big.as_bytes()) {
            Sent::Part(rest) => rest,
            other => panic!("a 1 MiB frame into a 4 KiB buffer went {other:?}"),
        };
        server_ws.get_mut().write_first(rest);
        // The task's own text frames, then tungstenite's: after the rest, in order.
        server_ws.get_mut().write_text("own".as_bytes());
        let sending = tokio::spawn(async move {
            server_ws.send("after".into()).await.unwrap();
            assert!(server_ws.get_ref().first.is_empty() && server_ws.get_ref().first.capacity() == 0);
            server_ws
        });
        let mut texts = Vec::new();
        while texts.len() < 4 {
            let message = client_ws.next().await.unwrap().unwrap();
            texts.push(message.into_text().unwrap().to_string());
        }
        assert_eq!(texts[0], "hello");
        assert_eq!(texts[1].len(), big.len());
        assert_eq!(texts[2], "own");
        assert_eq!(texts[3], "after");
        drop(sending.await.unwrap());
    }
}
