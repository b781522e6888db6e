//! The worker library on real ports, with an in-process master (standalone) and broker, driven
//! by a WebSocket client: timers, close codes, slow consumers, HTTP endpoints.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use sc_common::config::Config;
use sc_tests::inproc::Cluster;
use sc_tests::{Client, http_get};
use serde_json::json;

const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// A master, a broker and one worker, in this process.
async fn start(tune: impl FnOnce(&mut Config) + 'static) -> Cluster {
    Cluster::builder()
        .tune(|c| c.master.health_interval = Duration::from_millis(200))
        .tune(tune)
        .start()
        .await
}

/// A WebSocket that completed the HTTP upgrade and nothing else.
async fn raw_socket(cell: &Cluster) -> tokio_tungstenite::WebSocketStream<tokio::net::TcpStream> {
    let stream = tokio::net::TcpStream::connect(cell.worker(0)).await.unwrap();
    tokio_tungstenite::client_async(cell.url(0).as_str(), stream).await.unwrap().0
}

/// The close code the server sends, ignoring everything before it.
async fn close_code(ws: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>) -> Option<u16> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(frame)) = ws.next().await {
            if let Message::Close(frame) = frame {
                return frame.map(|f| u16::from(f.code));
            }
        }
        None
    })
    .await
    .expect("closed within 5s")
}

#[tokio::test]
async fn no_handshake_closes_4005() {
    let cell = start(|c| c.worker.handshake_timeout = Duration::from_millis(300)).await;
    let mut ws = raw_socket(&cell).await;
    assert_eq!(close_code(&mut ws).await, Some(4005));
    // Clients gone first: a worker waits a while for a silent client's close handshake.
    drop(ws);
    cell.shutdown().await;
}

#[tokio::test]
async fn handshake_without_cid_closes_4008() {
    use futures_util::SinkExt;
    let cell = start(|_| {}).await;
    let mut ws = raw_socket(&cell).await;
    ws.send(r##"{"event":"#handshake","data":{"authToken":null}}"##.into()).await.unwrap();
    assert_eq!(close_code(&mut ws).await, Some(4008));
    // Clients gone first: a worker waits a while for a silent client's close handshake.
    drop(ws);
    cell.shutdown().await;
}

#[tokio::test]
async fn silent_client_closes_4001_and_pings_arrive_first() {
    use futures_util::{SinkExt, StreamExt};
    let cell = start(|c| {
        c.worker.ping_interval = Duration::from_millis(100);
        c.worker.ping_timeout = Duration::from_millis(400);
    })
    .await;
    let mut ws = raw_socket(&cell).await;
    ws.send(r##"{"event":"#handshake","data":{"authToken":null},"cid":1}"##.into()).await.unwrap();
    let mut pings = 0;
    let code = loop {
        match ws.next().await.unwrap().unwrap() {
            tokio_tungstenite::tungstenite::Message::Text(t) if t.as_str().is_empty() => pings += 1,
            tokio_tungstenite::tungstenite::Message::Close(f) => {
                break f.map(|f| u16::from(f.code));
            }
            _ => {}
        }
    };
    assert_eq!(code, Some(4001));
    assert!(pings >= 2, "pinged {pings} times before closing");
    // Clients gone first: a worker waits a while for a silent client's close handshake.
    drop(ws);
    cell.shutdown().await;
}

#[tokio::test]
async fn a_client_that_pongs_stays_connected() {
    let cell = start(|c| {
        c.worker.ping_interval = Duration::from_millis(100);
        c.worker.ping_timeout = Duration::from_millis(300);
    })
    .await;
    let mut client = Client::connect(LOCAL, cell.worker(0), &cell.url(0)).await.unwrap();
    client.subscribe("keep").await.unwrap();
    // Several ping timeouts long, answering pings (recv_matching pongs) the whole time.
    let outcome = client.recv_matching(|_| false, Duration::from_millis(1200)).await;
    assert!(outcome.unwrap_err().to_string().contains("no matching message"));
    client.publish("keep", json!("still here")).await.unwrap();
    assert_eq!(client.next_publish("keep", Duration::from_secs(2)).await.unwrap(), json!("still here"));
    // Clients gone first: a worker waits a while for a silent client's close handshake.
    drop(client);
    cell.shutdown().await;
}

#[tokio::test]
async fn a_client_that_does_not_read_is_closed_as_a_slow_consumer() {
    let cell = start(|c| c.worker.outbound_queue = 8).await;
    let mut slow = Client::connect(LOCAL, cell.worker(0), &cell.url(0)).await.unwrap();
    slow.subscribe("firehose").await.unwrap();
    let mut publisher = Client::connect(LOCAL, cell.worker(0), &cell.url(0)).await.unwrap();
    let big = "x".repeat(64 * 1024);
    // Enough to fill the kernel's socket buffers, then the write buffer (unacknowledged
    // publishes: the publisher does not wait for the brokers).
    for _ in 0..400 {
        publisher.transmit("#publish", json!({"channel": "firehose", "data": big})).await.unwrap();
    }
    // The slow client reads again within the close timeout: it gets the close code after what
    // was already on its way.
    let code = slow.closed(Duration::from_secs(10)).await.unwrap();
    assert_eq!(code, Some(4100));
    // The publisher was not held up and the worker still serves.
    publisher.subscribe("after").await.unwrap();
    publisher.publish("after", json!(1)).await.unwrap();
    assert_eq!(publisher.next_publish("after", Duration::from_secs(2)).await.unwrap(), json!(1));
    // Clients gone first: a worker waits a while for a silent client's close handshake.
    drop((slow, publisher));
    cell.shutdown().await;
}

#[tokio::test]
async fn http_endpoints() {
    let cell = start(|_| {}).await;
    assert_eq!(http_get(LOCAL, cell.worker(0), "/healthz").await.unwrap(), (200, Some("worker-0".into())));
    assert_eq!(http_get(LOCAL, cell.worker(0), "/readyz").await.unwrap().0, 200);
    assert_eq!(http_get(LOCAL, cell.worker(0), "/elsewhere").await.unwrap().0, 404);
    // The WebSocket path without an upgrade is a bad request, not a crash.
    assert_eq!(http_get(LOCAL, cell.worker(0), "/socketcluster/").await.unwrap().0, 400);
    cell.shutdown().await;
}

#[tokio::test]
async fn proxy_header_is_accepted_before_http() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Believed from a trusted address only (no balancer here).
    let cell = start(|c| c.worker.trusted_proxies = vec!["127.0.0.1".into()]).await;
    let mut stream = tokio::net::TcpStream::connect(cell.worker(0)).await.unwrap();
    let header =
        sc_common::proxy_protocol::encode("203.0.113.9:4000".parse().unwrap(), cell.worker(0), false);
    stream.write_all(&header).await.unwrap();
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");

    // From an address that is neither a balancer nor trusted, a PROXY header is refused: the
    // connection is closed without an answer (the client address cannot be forged).
    let spoofer = tokio::net::TcpSocket::new_v4().unwrap();
    spoofer.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut stream = spoofer.connect(cell.worker(0)).await.unwrap();
    stream.write_all(&header).await.unwrap();
    let _ = stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response).await;
    assert_eq!(response, "", "a forged PROXY header is not served");
    cell.shutdown().await;
}

/// A raw WebSocket that completed the handshake; returns it and the replies seen so far.
async fn handshaken(cell: &Cluster) -> tokio_tungstenite::WebSocketStream<tokio::net::TcpStream> {
    use futures_util::{SinkExt, StreamExt};
    let mut ws = raw_socket(cell).await;
    ws.send(r##"{"event":"#handshake","data":{"authToken":null},"cid":1}"##.into()).await.unwrap();
    let reply = ws.next().await.unwrap().unwrap();
    assert!(reply.to_text().unwrap().contains("\"rid\":1"), "{reply:?}");
    ws
}

/// Sends `frame` and returns the reply with `"rid":<rid>`, answering pings meanwhile.
async fn rpc(
    ws: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    frame: &str,
    rid: u64,
) -> serde_json::Value {
    use futures_util::{SinkExt, StreamExt};
    ws.send(frame.into()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let message = ws.next().await.expect("open").expect("no error");
            let Ok(text) = message.to_text() else { continue };
            let Ok(value) = serde_json::from_str::<serde_json::Value>(text) else { continue };
            if value["rid"].as_f64() == Some(rid as f64) {
                return value;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no reply to {frame}"))
}

#[tokio::test]
async fn garbage_and_wrong_types_get_errors_and_never_break_the_socket() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let cell = start(|_| {}).await;
    let mut ws = handshaken(&cell).await;
    // Not packets at all: raw messages, no answer, no close.
    for junk in
        ["{", "[", "[1,2", "\u{0}", "{\"event\":5}", "null", "[null,{}]", "{\"rid\":\"x\",\"data\":1}"]
    {
        ws.send(junk.into()).await.unwrap();
    }
    ws.send(Message::Binary(vec![0xff, 0xfe, 0x00].into())).await.unwrap();
    // Wrong types in every field of every reserved event, each with a cid: an error reply.
    let cases = [
        (r##"{"event":"#subscribe","data":{"channel":{}},"cid":2}"##, "InvalidActionError"),
        (r##"{"event":"#subscribe","data":{"channel":["a"]},"cid":3}"##, "InvalidActionError"),
        (r##"{"event":"#subscribe","cid":4}"##, "InvalidActionError"),
        (r##"{"event":"#publish","data":[],"cid":5}"##, "InvalidActionError"),
        (r##"{"event":"#publish","data":{"channel":null,"data":1},"cid":6}"##, "InvalidActionError"),
        (r##"{"event":"#publish","data":"news","cid":7}"##, "InvalidActionError"),
        (r##"{"event":"#unsubscribe","data":5,"cid":8}"##, "BrokerError"),
        (r##"{"event":"#unsubscribe","data":{"channel":"x"},"cid":9}"##, "BrokerError"),
        (r##"{"event":"#authenticate","data":5,"cid":10}"##, "AuthTokenInvalidError"),
        (r##"{"event":"#authenticate","data":"a.b.c","cid":11}"##, "AuthTokenInvalidError"),
        (r##"{"event":"#authenticate","data":null,"cid":12}"##, "AuthTokenInvalidError"),
        (r##"{"event":"someProcedure","data":{"deep":[[[[1]]]]},"cid":13}"##, "InvalidActionError"),
    ];
    for (frame, name) in cases {
        let rid = serde_json::from_str::<serde_json::Value>(frame).unwrap()["cid"].as_u64().unwrap();
        let reply = rpc(&mut ws, frame, rid).await;
        assert_eq!(reply["error"]["name"], name, "{frame} -> {reply}");
    }
    // Odd cids: a float is a number (echoed as sent), an object is no cid (no reply expected).
    let reply = rpc(&mut ws, r##"{"event":"#subscribe","data":{"channel":"float"},"cid":14.0}"##, 14).await;
    assert!(reply.get("error").is_none(), "{reply}");
    ws.send(r##"{"event":"#subscribe","data":{"channel":"x"},"cid":{"a":1}}"##.into()).await.unwrap();
    // Still fully working: subscribe, publish, receive.
    let reply = rpc(&mut ws, r##"{"event":"#subscribe","data":{"channel":"ok"},"cid":20}"##, 20).await;
    assert!(reply.get("error").is_none(), "{reply}");
    let reply =
        rpc(&mut ws, r##"{"event":"#publish","data":{"channel":"ok","data":"fine"},"cid":21}"##, 21).await;
    assert!(reply.get("error").is_none(), "{reply}");
    let mut client = Client::connect(LOCAL, cell.worker(0), &cell.url(0)).await.unwrap();
    client.subscribe("ok").await.unwrap();
    client.publish("ok", json!("from another socket")).await.unwrap();
    let mut got = client.next_publish("ok", Duration::from_secs(2)).await.unwrap();
    if got == json!("fine") {
        // The raw socket's "fine", acknowledged before its fan-out, was still on its way
        // through the broker when this client subscribed.
        got = client.next_publish("ok", Duration::from_secs(2)).await.unwrap();
    }
    assert_eq!(got, json!("from another socket"));
    // Clients gone first: a worker waits a while for a silent client's close handshake.
    drop((ws, client));
    cell.shutdown().await;
}

#[tokio::test]
async fn a_flood_of_subscribes_is_bounded_by_the_channel_limit() {
    use futures_util::{SinkExt, StreamExt};
    let cell = start(|c| c.worker.socket_channel_limit = 100).await;
    let mut ws = handshaken(&cell).await;
    let batch: Vec<serde_json::Value> = (0..5000)
        .map(|i| json!({"event": "#subscribe", "data": {"channel": format!("flood-{i}")}, "cid": i + 2}))
        .collect();
    ws.send(serde_json::Value::Array(batch).to_string().into()).await.unwrap();
    let (mut ok, mut refused) = (0, 0);
    tokio::time::timeout(Duration::from_secs(20), async {
        while ok + refused < 5000 {
            let message = ws.next().await.unwrap().unwrap();
            let Ok(value) = serde_json::from_str::<serde_json::Value>(message.to_text().unwrap_or("")) else {
                continue;
            };
            match value["error"]["name"].as_str() {
                None if value.get("rid").is_some() => ok += 1,
                Some("BrokerError") => refused += 1,
                _ => {}
            }
        }
    })
    .await
    .expect("every subscribe answered");
    assert_eq!((ok, refused), (100, 4900));
    assert_eq!(http_get(LOCAL, cell.worker(0), "/healthz").await.unwrap().0, 200);
    // Clients gone first: a worker waits a while for a silent client's close handshake.
    drop(ws);
    cell.shutdown().await;
}

#[tokio::test]
async fn a_frame_over_max_payload_closes_that_socket_with_1009_only() {
    use futures_util::SinkExt;
    let cell = start(|c| c.worker.max_payload = 64 * 1024).await;
    let mut big = handshaken(&cell).await;
    let mut client = Client::connect(LOCAL, cell.worker(0), &cell.url(0)).await.unwrap();
    client.subscribe("calm").await.unwrap();
    big.send("x".repeat(65 * 1024).into()).await.unwrap();
    assert_eq!(close_code(&mut big).await, Some(1009));
    client.publish("calm", json!(1)).await.unwrap();
    assert_eq!(client.next_publish("calm", Duration::from_secs(2)).await.unwrap(), json!(1));
    // Clients gone first: a worker waits a while for a silent client's close handshake.
    drop((big, client));
    cell.shutdown().await;
}

/// Direct writes (the fan-out writing to an idle socket's connection itself) fill the kernel's
/// buffers of a client that does not read; what the kernel takes in part and what queues behind
/// it must still reach the client whole and in order once it reads again.
#[tokio::test]
async fn a_client_that_pauses_gets_every_message_whole_and_in_order() {
    let cell = start(|c| {
        c.worker.outbound_queue = 100_000;
        c.worker.max_outbound_bytes = 64 * 1024 * 1024;
        c.worker.max_payload = 1024 * 1024;
    })
    .await;
    let mut reader = Client::connect(LOCAL, cell.worker(0), &cell.url(0)).await.unwrap();
    reader.subscribe("bulk").await.unwrap();
    let mut writer = Client::connect(LOCAL, cell.worker(0), &cell.url(0)).await.unwrap();
    // About 6 MB while the reader reads nothing: more than the kernel's buffers hold, so
    // direct writes stop part-way and the rest queues.
    let filler = "y".repeat(30_000);
    const MESSAGES: usize = 200;
    for n in 0..MESSAGES {
        writer.publish("bulk", json!({ "n": n, "filler": filler })).await.unwrap();
    }
    for n in 0..MESSAGES {
        let data = reader.next_publish("bulk", Duration::from_secs(10)).await.unwrap();
        assert_eq!(data["n"], json!(n), "message {n} in order");
        assert_eq!(data["filler"].as_str().map(str::len), Some(filler.len()), "message {n} whole");
    }
    drop((reader, writer));
    cell.shutdown().await;
}
