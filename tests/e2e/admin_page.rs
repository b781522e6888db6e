//! The admin page's server side on the real binaries: the page's files are public but its event
//! stream is not, `GET /events` sends the history and then a sample a second with the status,
//! and a broker drained through `POST /drain` leaves while pub/sub goes on through the other
//! broker (its channels moved), the last broker cannot be drained, and `POST /undrain` brings it
//! back. (The page itself is tested in headless Chromium: tests/admin-page.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result};
use sc_tests::{ADMIN_TOKEN, Client, Cluster, eventually, member_status};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// One request to the admin API with a body; the status, the headers and the body.
async fn request(admin: SocketAddr, head: &str, body: &str) -> Result<(u16, String, String)> {
    let mut stream = TcpStream::connect(admin).await?;
    let request = format!(
        "{head}\r\nHost: {admin}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response)).await??;
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).context("status line")?;
    let (headers, body) = response.split_once("\r\n\r\n").context("no body")?;
    Ok((status, headers.to_owned(), body.to_owned()))
}

async fn post(admin: SocketAddr, path: &str, body: Value) -> Result<(u16, Value)> {
    let head = format!(
        "POST {path} HTTP/1.1\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nContent-Type: application/json"
    );
    let (status, _, body) = request(admin, &head, &body.to_string()).await?;
    Ok((status, serde_json::from_str(&body).unwrap_or(Value::Null)))
}

/// Reads Server-Sent Events from `GET /events` until `count` have come; their names and data.
async fn events(admin: SocketAddr, count: usize) -> Result<Vec<(String, Value)>> {
    let mut stream = TcpStream::connect(admin).await?;
    let head =
        format!("GET /events HTTP/1.1\r\nHost: {admin}\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n\r\n");
    stream.write_all(head.as_bytes()).await?;
    let mut lines = BufReader::new(stream).lines();
    let mut found = Vec::new();
    let mut name = String::new();
    let read = async {
        while let Some(line) = lines.next_line().await? {
            if let Some(n) = line.strip_prefix("event: ") {
                name = n.to_owned();
            } else if let Some(data) = line.strip_prefix("data: ") {
                found.push((name.clone(), serde_json::from_str(data)?));
                if found.len() == count {
                    break;
                }
            }
        }
        Ok::<_, anyhow::Error>(())
    };
    tokio::time::timeout(Duration::from_secs(20), read).await??;
    Ok(found)
}

/// Channels enough that both brokers own some (rendezvous hashing over two brokers).
fn channels() -> Vec<String> {
    (0..16).map(|n| format!("drain-{n}")).collect()
}

/// Every channel published by `publisher` reaches `subscriber`.
async fn every_channel_delivers(publisher: &mut Client, subscriber: &mut Client, round: u32) -> Result<()> {
    for channel in channels() {
        publisher.publish(&channel, json!(round)).await?;
        let got = subscriber.next_publish(&channel, Duration::from_secs(10)).await;
        assert_eq!(got.with_context(|| format!("{channel} in round {round}"))?, json!(round));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_and_draining_a_broker() -> Result<()> {
    let cluster = Cluster::start(&[
        ("SC_CLUSTER__WORKERS", "2"),
        ("SC_CLUSTER__BROKERS", "2"),
        ("SC_MASTER__HEALTH_INTERVAL", "200ms"),
    ])
    .await?;
    let admin = cluster.admin;

    // The page is public (it holds no data), its stream is not.
    let (code, headers, body) = request(admin, "GET / HTTP/1.1", "").await?;
    assert_eq!(code, 200);
    assert!(body.contains("<script src=\"/admin.js\""), "{body}");
    assert!(
        headers.to_ascii_lowercase().contains("content-security-policy: default-src 'none'"),
        "{headers}"
    );
    assert_eq!(request(admin, "GET /admin.js HTTP/1.1", "").await?.0, 200);
    assert_eq!(request(admin, "GET /events HTTP/1.1", "").await?.0, 401);
    assert_eq!(request(admin, "POST /drain HTTP/1.1\r\nContent-Type: application/json", "{}").await?.0, 401);

    // History first, then a sample a second, each with the status of every member.
    let stream = events(admin, 3).await?;
    assert_eq!(stream[0].0, "history");
    assert_eq!(stream[0].1["window_ms"], 900_000);
    assert!(stream[0].1["samples"].is_array());
    for (name, data) in &stream[1..] {
        assert_eq!(name, "sample");
        assert_eq!(data["status"]["members"].as_array().map(Vec::len), Some(5), "{data}");
        assert_eq!(data["sample"]["members"], 5, "every member asked for figures: {data}");
    }
    let (t1, t2) =
        (stream[1].1["sample"]["t"].as_u64().unwrap(), stream[2].1["sample"]["t"].as_u64().unwrap());
    assert!((500..=3_000).contains(&(t2 - t1)), "a sample about every second: {t1} -> {t2}");

    let local = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let mut subscriber = Client::connect(local, cluster.addr, &cluster.url).await?;
    let mut publisher =
        Client::connect(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)), cluster.addr, &cluster.url).await?;
    for channel in channels() {
        subscriber.subscribe(&channel).await?;
    }
    every_channel_delivers(&mut publisher, &mut subscriber, 1).await?;

    // Refused: not JSON, no such broker, a worker.
    let plain =
        format!("POST /drain HTTP/1.1\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nContent-Type: text/plain");
    assert_eq!(request(admin, &plain, r#"{"id":"broker-0"}"#).await?.0, 415);
    assert_eq!(post(admin, "/drain", json!({ "id": "broker-9" })).await?.0, 404);
    assert_eq!(post(admin, "/drain", json!({ "id": "worker-0" })).await?.0, 404);
    assert_eq!(post(admin, "/drain", json!({})).await?.0, 400);
    assert_eq!(post(admin, "/undrain", json!({ "id": "broker-0" })).await?.0, 409, "not drained");

    let (code, body) = post(admin, "/drain", json!({ "id": "broker-0" })).await?;
    assert_eq!((code, &body), (202, &json!({ "draining": "broker-0" })));
    let (code, body) = post(admin, "/drain", json!({ "id": "broker-1" })).await?;
    assert_eq!(code, 409, "the last running broker: {body}");
    let drained = eventually(Duration::from_secs(30), "broker-0 drained", || async {
        let status = member_status(admin, "broker-0").await.ok()??;
        (status["state"] == "drained").then_some(status)
    })
    .await?;
    assert_eq!(drained["pid"], Value::Null, "{drained}");
    assert_eq!(drained["registered"], false, "out of the membership: {drained}");
    // Its channels moved to broker-1: every channel still delivers, without resubscribing.
    every_channel_delivers(&mut publisher, &mut subscriber, 2).await?;

    let (code, body) = post(admin, "/undrain", json!({ "id": "broker-0" })).await?;
    assert_eq!((code, &body), (202, &json!({ "undraining": "broker-0" })));
    eventually(Duration::from_secs(30), "broker-0 back", || async {
        let status = member_status(admin, "broker-0").await.ok()??;
        (status["state"] == "healthy").then_some(())
    })
    .await?;
    every_channel_delivers(&mut publisher, &mut subscriber, 3).await?;
    cluster.stop().await?;
    Ok(())
}
