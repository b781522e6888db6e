//! The cluster as an attacker or an unlucky client meets it, on the real binaries: protocol
//! violations get the close code RFC 6455 asks for, and a token's fractional `exp` expires on an
//! open socket.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail};
use sc_tests::{Client, Cluster};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// Opens a WebSocket by hand (so that the test can send what no client library would).
async fn raw_websocket(addr: SocketAddr) -> Result<TcpStream> {
    let mut stream = TcpStream::connect(addr).await?;
    let request = "GET /socketcluster/ HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n\
                   Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                   Sec-WebSocket-Version: 13\r\n\r\n";
    stream.write_all(request.as_bytes()).await?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await? == 0 {
            bail!("closed during the upgrade");
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    if !head.starts_with("HTTP/1.1 101") {
        bail!("upgrade refused: {head}");
    }
    Ok(stream)
}

/// One client frame: `first` is FIN, RSV and opcode; masked unless `masked` is false.
fn frame(first: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut out = vec![first];
    let mask_bit = if masked { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(mask_bit | n as u8),
        n => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    if masked {
        let key = [0x12, 0x34, 0x56, 0x78];
        out.extend_from_slice(&key);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

/// Reads server frames until a close frame: `Some(code)`, or `None` if the connection ended
/// without one. Other frames (pings, a v1 `#disconnect`) are skipped.
async fn close_code(stream: &mut TcpStream) -> Result<Option<u16>> {
    let read = async {
        loop {
            let mut header = [0u8; 2];
            if stream.read_exact(&mut header).await.is_err() {
                return Ok(None);
            }
            let length = match header[1] & 0x7f {
                126 => u64::from(stream.read_u16().await?),
                127 => stream.read_u64().await?,
                n => u64::from(n),
            };
            let mut payload = vec![0u8; usize::try_from(length)?];
            stream.read_exact(&mut payload).await?;
            if header[0] & 0x0f == 0x8 {
                return Ok(payload.get(..2).map(|code| u16::from_be_bytes([code[0], code[1]])));
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read).await.context("no close within 5 s")?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_violations_close_with_the_rfc_codes() -> Result<()> {
    let cluster = Cluster::start(&[("SC_CLUSTER__WORKERS", "1")]).await?;
    let cases: [(&str, Vec<u8>, u16); 7] = [
        ("unmasked client frame", frame(0x81, b"{}", false), 1002),
        ("invalid UTF-8 in a text frame", frame(0x81, &[0x7b, 0xff, 0xfe, 0x7d], true), 1007),
        ("oversized control frame", frame(0x89, &[0u8; 126], true), 1002),
        ("reserved data opcode", frame(0x83, b"x", true), 1002),
        ("reserved control opcode", frame(0x8b, b"", true), 1002),
        ("RSV1 without an extension", frame(0xc1, b"{}", true), 1002),
        ("close code 999", frame(0x88, &999u16.to_be_bytes(), true), 1002),
    ];
    for (what, bytes, expected) in cases {
        let mut stream = raw_websocket(cluster.addr).await?;
        stream.write_all(&bytes).await?;
        let code = close_code(&mut stream).await.with_context(|| what.to_owned())?;
        assert_eq!(code, Some(expected), "{what}");
    }
    // A well-formed close is answered with the same code.
    let mut stream = raw_websocket(cluster.addr).await?;
    stream.write_all(&frame(0x88, &4321u16.to_be_bytes(), true)).await?;
    assert_eq!(close_code(&mut stream).await?, Some(4321));
    cluster.stop().await?;
    Ok(())
}

/// An HS256 token as a JavaScript app signs it, with a fractional `exp`.
fn token(key: &str, exp: f64) -> String {
    let claims = json!({ "username": "alice", "exp": exp });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(key.as_bytes()).unwrap(),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fractional_exp_expires_on_an_open_socket() -> Result<()> {
    let key = "hardening-test-key";
    let cluster = Cluster::start(&[
        ("SC_CLUSTER__WORKERS", "1"),
        ("SC_WORKER__AUTH_KEY", key),
        ("SC_WORKER__PING_INTERVAL", "300ms"),
    ])
    .await?;
    let url = format!("ws://{}/socketcluster/", cluster.addr);
    let mut client = Client::connect(LOCAL, cluster.addr, &url).await?;
    // Date.now() / 1000 + 2.5: valid now, expired in under 3 s.
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs_f64();
    let reply = client.invoke("#authenticate", json!(token(key, now + 2.5))).await?;
    assert!(reply.get("error").is_none(), "the fractional token verifies: {reply}");
    assert_eq!(reply["data"]["isAuthenticated"], true, "{reply}");

    // The open socket drops it once it expires (checked on each pong), and tells the client.
    let removed = client.recv_matching(|m| m["event"] == "#removeAuthToken", Duration::from_secs(6)).await?;
    let at = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs_f64();
    assert!(at >= now + 2.0, "removed {:.2} s after signing", at - now);
    assert_eq!(removed["event"], "#removeAuthToken");
    cluster.stop().await?;
    Ok(())
}
