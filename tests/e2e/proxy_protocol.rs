//! Inbound PROXY protocol on the real balancer (`[balancer] accept_proxy_protocol`): a load
//! balancer in front names the client in a v1 or v2 header; the worker sees that address, the
//! worker is picked by it, it comes before TLS, and a connection without a header is closed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use sc_common::proxy_protocol;
use sc_tests::{Client, Cluster, TestCa, bin, connect_from};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The one real source address of every connection here, as if all came from one load balancer.
const LOAD_BALANCER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// A cluster of two chat workers (their `peer` procedure tells what the worker knows) behind a
/// balancer that wants PROXY headers.
async fn cluster(extra: &[(&str, &str)]) -> Result<Cluster> {
    let chat = bin("sc-chat-worker");
    let mut env = vec![
        ("SC_CLUSTER__WORKERS", "2"),
        ("SC_WORKER__COMMAND", chat.to_str().unwrap()),
        ("SC_BALANCER__ACCEPT_PROXY_PROTOCOL", "true"),
        ("SC_BALANCER__FIRST_BYTE_TIMEOUT", "2s"),
    ];
    env.extend_from_slice(extra);
    Cluster::start(&env).await
}

/// A connection from the "load balancer" that starts with `header`.
async fn fronted(addr: SocketAddr, header: &[u8]) -> Result<TcpStream> {
    let mut stream = connect_from(LOAD_BALANCER, addr).await?;
    stream.write_all(header).await?;
    Ok(stream)
}

fn v2(client: &str, addr: SocketAddr) -> Vec<u8> {
    proxy_protocol::encode(client.parse().unwrap(), addr, false)
}

/// `GET /healthz` after `header`: the `x-sc-worker` that answered.
async fn worker_for(addr: SocketAddr, header: &[u8]) -> Result<String> {
    let mut stream = fronted(addr, header).await?;
    stream
        .write_all(format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response)).await??;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let worker = response.lines().find_map(|l| l.strip_prefix("x-sc-worker: "));
    Ok(worker.context("x-sc-worker header")?.trim().to_owned())
}

/// What the server sends before it closes `stream` (which must happen within `within`).
async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> Result<Vec<u8>> {
    let mut received = Vec::new();
    let mut buf = [0u8; 1024];
    tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("connection still open after {within:?}"))?;
    Ok(received)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_sees_and_is_picked_by_the_address_in_the_header_and_no_header_is_refused() -> Result<()> {
    let cluster = cluster(&[]).await?;
    let addr = cluster.addr;

    // Version 2 (AWS NLB, most cloud load balancers), then version 1 (the text form).
    let stream = fronted(addr, &v2("203.0.113.7:4000", addr)).await?;
    let mut client = Client::over_stream(stream, &cluster.url).await?;
    let peer = client.invoke("peer", json!(null)).await?;
    assert_eq!(peer["data"]["remoteAddress"], "203.0.113.7", "{peer}");
    assert_eq!(peer["data"]["remotePort"], 4000, "{peer}");
    assert_eq!(peer["data"]["tls"], false, "{peer}");
    let header = format!("PROXY TCP4 198.51.100.9 {} 5555 {}\r\n", addr.ip(), addr.port());
    let stream = fronted(addr, header.as_bytes()).await?;
    let mut v1 = Client::over_stream(stream, &cluster.url).await?;
    let peer = v1.invoke("peer", json!(null)).await?;
    assert_eq!(peer["data"]["remoteAddress"], "198.51.100.9", "{peer}");
    assert_eq!(peer["data"]["remotePort"], 5555, "{peer}");

    // The worker is picked by the client in the header, not by the one real source address:
    // client IPs spread over both workers, and each sticks to its own.
    let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for i in 1..=40u8 {
        let client = format!("198.51.100.{i}:{}", 1000 + u16::from(i));
        let worker = worker_for(addr, &v2(&client, addr)).await?;
        assert_eq!(worker, worker_for(addr, &v2(&client, addr)).await?, "{client} moved");
        seen.entry(worker).or_default().push(client);
    }
    assert_eq!(seen.len(), 2, "every client went to one worker: {seen:?}");

    // No header: an HTTP request, TLS, garbage are closed without an answer.
    for bad in [
        format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n").into_bytes(),
        vec![0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03, 0, 0, 0, 0, 0],
        b"PROXY TCP4 not an address\r\nGET / HTTP/1.1\r\n\r\n".to_vec(),
    ] {
        let mut stream = fronted(addr, &bad).await?;
        let answer = read_until_closed(&mut stream, Duration::from_secs(5)).await?;
        assert!(answer.is_empty(), "answered {:?}", String::from_utf8_lossy(&answer));
    }
    // A load balancer that connects and says nothing is cut at first_byte_timeout (2s).
    let started = Instant::now();
    let mut silent = connect_from(LOAD_BALANCER, addr).await?;
    assert!(read_until_closed(&mut silent, Duration::from_secs(10)).await?.is_empty());
    assert!(started.elapsed() >= Duration::from_millis(1500), "cut after {:?}", started.elapsed());

    // The clients with a header are still served.
    client.subscribe("fronted").await?;
    v1.publish("fronted", json!("through the load balancer")).await?;
    assert_eq!(
        client.next_publish("fronted", Duration::from_secs(5)).await?,
        json!("through the load balancer")
    );
    assert!(cluster.stop().await?.success());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_header_comes_before_tls() -> Result<()> {
    let ca = TestCa::new("proxied")?;
    let cluster = cluster(&[
        ("SC_BALANCER__TLS_CERT", ca.cert.to_str().unwrap()),
        ("SC_BALANCER__TLS_KEY", ca.key.to_str().unwrap()),
    ])
    .await?;
    let addr = cluster.addr;
    let stream = fronted(addr, &v2("[2001:db8::42]:4242", addr)).await?;
    let name = rustls_pki_types::ServerName::IpAddress(Ipv4Addr::LOCALHOST.into());
    let connect = tokio_rustls::TlsConnector::from(ca.client_config()?).connect(name, stream);
    let tls = tokio::time::timeout(Duration::from_secs(5), connect).await??;
    let mut client = Client::over_stream(tls, &cluster.url.replacen("wss://", "ws://", 1)).await?;
    let peer = client.invoke("peer", json!(null)).await?;
    assert_eq!(peer["data"]["remoteAddress"], "2001:db8::42", "{peer}");
    assert_eq!(peer["data"]["tls"], true, "{peer}");

    // A TLS client without the header is refused before any handshake.
    assert!(sc_tests::tls_connect(LOAD_BALANCER, addr, &ca).await.is_err());
    assert!(cluster.stop().await?.success());
    Ok(())
}
