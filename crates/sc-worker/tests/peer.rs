//! Who the worker thinks the client is: the PROXY v2 header (over TCP and over the Unix
//! socket), `X-Forwarded-For` / `X-Forwarded-Proto` from trusted proxies only, and what the
//! app's `upgrade` and `handshake` hooks see.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use sc_common::config::Config;
use sc_common::proxy_protocol;
use sc_worker::UpgradeRequest;
use sc_worker::{ErrorObject, Handler, Socket};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_util::sync::CancellationToken;

/// What each hook saw: (hook, address, tls).
#[derive(Default)]
struct Recorder(Mutex<Vec<(&'static str, Option<SocketAddr>, bool)>>);

#[async_trait::async_trait]
impl Handler for Recorder {
    async fn upgrade(&self, request: &UpgradeRequest) -> Result<(), sc_worker::HttpRejection> {
        self.0.lock().unwrap().push(("upgrade", request.remote_addr, request.tls));
        Ok(())
    }

    async fn handshake(&self, socket: &Socket) -> Result<(), ErrorObject> {
        self.0.lock().unwrap().push(("handshake", socket.remote_addr(), socket.is_tls()));
        Ok(())
    }
}

struct Started {
    addr: SocketAddr,
    unix: Option<std::path::PathBuf>,
    seen: Arc<Recorder>,
    shutdown: CancellationToken,
    /// The worker's `serve`, its error as text; awaited by [`Started::stop`].
    serving: Option<JoinHandle<Result<(), String>>>,
    _dir: tempfile::TempDir,
}

impl Started {
    /// Stops the worker and awaits its `serve`: a shutdown that hangs or fails fails the test.
    async fn stop(mut self) {
        self.shutdown.cancel();
        let serving = self.serving.take().expect("served once");
        match tokio::time::timeout(Duration::from_secs(10), serving).await {
            Err(_) => panic!("the worker did not stop within 10s of shutdown"),
            Ok(outcome) => outcome.expect("serve task").expect("serve"),
        }
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        // A test that failed before `stop`: stop the worker without waiting.
        self.shutdown.cancel();
    }
}

async fn start(trusted: &[&str]) -> Started {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.worker.id = Some("worker-peer".into());
    config.worker.auth_key = "k".into();
    config.worker.unix_dir = Some(dir.path().to_owned());
    config.worker.trusted_proxies = trusted.iter().map(|s| (*s).to_owned()).collect();
    let seen = Arc::new(Recorder::default());
    let worker = sc_worker::Worker::bind_with(config, seen.clone()).await.unwrap();
    let addr = worker.local_addr().unwrap();
    let unix = worker.unix_path().map(|p| p.to_owned());
    let shutdown = CancellationToken::new();
    let serve = worker.serve(mpsc::channel(1).1, shutdown.clone());
    let serving = tokio::spawn(async move { serve.await.map_err(|e| e.to_string()) });
    Started { addr, unix, seen, shutdown, serving: Some(serving), _dir: dir }
}

/// Upgrades on `stream` (after `prefix`), with `headers`, and completes the SC handshake.
async fn handshake<S>(mut stream: S, prefix: &[u8], headers: &[(&'static str, &'static str)])
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream.write_all(prefix).await.unwrap();
    let mut request = "ws://worker/socketcluster/".into_client_request().unwrap();
    for (k, v) in headers {
        request.headers_mut().insert(*k, v.parse().unwrap());
    }
    let (mut ws, _) = tokio_tungstenite::client_async(request, stream).await.unwrap();
    ws.send(Message::Text(r##"{"event":"#handshake","data":{},"cid":1}"##.into())).await.unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Some(Ok(Message::Text(text))) = ws.next().await
                && text.as_str().contains("\"rid\":1")
            {
                return text;
            }
        }
    })
    .await
    .expect("handshake reply");
    assert!(reply.as_str().contains("\"id\""), "{reply}");
}

fn seen(started: &Started) -> Vec<(&'static str, Option<SocketAddr>, bool)> {
    std::mem::take(&mut *started.seen.0.lock().unwrap())
}

#[tokio::test]
async fn the_proxy_header_reaches_both_hooks_over_tcp_and_unix() {
    // Over TCP, believed from a balancer of the membership or a trusted address (no master here).
    let started = start(&["127.0.0.1"]).await;
    let client: SocketAddr = "203.0.113.7:5555".parse().unwrap();
    let header = proxy_protocol::encode(client, "127.0.0.1:8000".parse().unwrap(), true);
    let tcp = tokio::net::TcpStream::connect(started.addr).await.unwrap();
    handshake(tcp, &header, &[]).await;
    assert_eq!(seen(&started), [("upgrade", Some(client), true), ("handshake", Some(client), true)]);

    let path = started.unix.clone().expect("unix socket");
    assert!(path.file_name().unwrap().to_str().unwrap().starts_with("worker-peer-"));
    let unix = tokio::net::UnixStream::connect(&path).await.unwrap();
    let header = proxy_protocol::encode(client, "127.0.0.1:8000".parse().unwrap(), false);
    handshake(unix, &header, &[]).await;
    assert_eq!(seen(&started), [("upgrade", Some(client), false), ("handshake", Some(client), false)]);

    // The worker removes its socket file when it stops.
    started.stop().await;
    assert!(!path.exists(), "socket file removed");
}

#[tokio::test]
async fn forwarded_headers_count_only_from_trusted_proxies() {
    let forwarded = [("x-forwarded-for", "198.51.100.4"), ("x-forwarded-proto", "https")];
    let started = start(&["127.0.0.0/8"]).await;
    let tcp = tokio::net::TcpStream::connect(started.addr).await.unwrap();
    handshake(tcp, b"", &forwarded).await;
    let client = Some("198.51.100.4:0".parse().unwrap());
    assert_eq!(seen(&started), [("upgrade", client, true), ("handshake", client, true)]);

    let untrusting = start(&["10.0.0.0/8"]).await;
    let tcp = tokio::net::TcpStream::connect(untrusting.addr).await.unwrap();
    let local = tcp.local_addr().unwrap();
    handshake(tcp, b"", &forwarded).await;
    assert_eq!(seen(&untrusting), [("upgrade", Some(local), false), ("handshake", Some(local), false)]);
    started.stop().await;
    untrusting.stop().await;
}

#[tokio::test]
async fn a_bad_trusted_proxies_entry_is_a_config_error() {
    let mut config = Config::default();
    config.worker.trusted_proxies = vec!["10.0.0.0/40".into()];
    let err = sc_worker::Worker::bind(config).await.unwrap_err().to_string();
    assert!(err.contains("10.0.0.0/40"), "{err}");
}
