//! Brokers joining and leaving at runtime, with the daemons in this process (master standalone,
//! brokers, two workers): no subscription lost and no message lost in the graceful case; and
//! the exchange, from server code and over the HTTP API.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use sc_common::config::Config;
use sc_tests::inproc::Cluster;
use sc_tests::{Client, eventually, member_status};
use serde_json::json;

const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// A master, `brokers` brokers and `workers` workers, in this process.
async fn start(brokers: usize, workers: usize, tune: impl FnOnce(&mut Config) + 'static) -> Cluster {
    Cluster::builder()
        .brokers(brokers)
        .workers(workers)
        .tune(|c| c.worker.auth_key = "k".into())
        .tune(tune)
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brokers_join_and_leave_gracefully_without_losing_a_message() {
    let mut cell = start(2, 2, |_| {}).await;
    let channels: Vec<String> = (0..100).map(|i| format!("c{i}")).collect();
    let mut subscribers = Vec::new();
    for w in 0..2 {
        let mut client = Client::connect(LOCAL, cell.worker(w), &cell.url(w)).await.unwrap();
        for channel in &channels {
            client.subscribe(channel).await.unwrap();
        }
        subscribers.push(client);
    }

    // Each worker has a publisher: a round on every channel every 20 ms for 3 s.
    const ROUNDS: u64 = 150;
    let expected = 2 * ROUNDS as usize * channels.len();
    // The subscribers read from the start, as live clients do (one that stops reading for
    // seconds is rightly closed as a slow consumer).
    let receiving: Vec<_> = subscribers
        .into_iter()
        .map(|subscriber| tokio::spawn(receive(subscriber, expected, ROUNDS)))
        .collect();
    let mut publishing = Vec::new();
    for w in 0..2u64 {
        let mut publisher =
            Client::connect(LOCAL, cell.worker(w as usize), &cell.url(w as usize)).await.unwrap();
        let channels = channels.clone();
        publishing.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            for s in 0..ROUNDS {
                tick.tick().await;
                let batch = channels
                    .iter()
                    .map(|c| json!({"event": "#publish", "data": {"channel": c, "data": {"p": w, "s": s}}}))
                    .collect();
                publisher.send_batch(batch).await.unwrap();
            }
            let reply = publisher.invoke("#publish", json!({"channel": "end", "data": 0})).await.unwrap();
            assert!(reply.get("error").is_none(), "{reply}");
            publisher
        }));
    }
    // A third broker joins after 0.6 s; broker-0 leaves after 1.8 s. The sleeps are the
    // schedule of the test (membership changes while the publishers run), not waits for a
    // condition.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(cell.add_broker().await, 2);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    cell.stop_broker(0);

    let mut subscribers = Vec::new();
    for task in receiving {
        let (subscriber, seen) = task.await.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        subscribers.push(subscriber);
        // Every message exactly once. Order holds except at the moment a channel moves: a
        // publisher's last message to the old owner and its first to the new one travel
        // different streams (docs/architecture.md); count those swaps and report them.
        let mut swaps = 0;
        for ((channel, p), got) in &seen {
            let mut sorted = got.clone();
            sorted.sort_unstable();
            let want: Vec<u64> = (0..ROUNDS).collect();
            assert_eq!(sorted, want, "{channel} from publisher {p}: every message exactly once");
            swaps += got.windows(2).filter(|w| w[0] > w[1]).count();
        }
        assert_eq!(seen.len(), 2 * channels.len());
        eprintln!("{expected} messages, none lost; {swaps} out of order at a channel move");
        assert!(swaps <= channels.len() * 2, "reordering only at the moves ({swaps})");
    }
    let mut publishers = Vec::new();
    for task in publishing {
        publishers.push(task.await.unwrap());
    }
    // Clients gone first: a worker waits a while for a silent client's close handshake.
    drop((subscribers, publishers));
    cell.shutdown().await;
}

/// Reads `expected` publishes (of `rounds` per channel and publisher) from `subscriber`: each
/// (channel, publisher)'s sequence numbers in arrival order.
async fn receive(
    mut subscriber: Client,
    expected: usize,
    rounds: u64,
) -> (Client, HashMap<(String, u64), Vec<u64>>) {
    let mut seen: HashMap<(String, u64), Vec<u64>> = HashMap::new();
    let mut count = 0;
    let started = Instant::now();
    while count < expected {
        let message = match subscriber.next_message(Duration::from_secs(5)).await {
            Ok(m) => m,
            Err(e) => {
                let missing: Vec<String> = seen
                    .iter()
                    .filter_map(|((channel, p), got)| {
                        let lost: Vec<u64> = (0..rounds).filter(|s| !got.contains(s)).collect();
                        (!lost.is_empty()).then(|| format!("{channel} from {p}: {lost:?}"))
                    })
                    .collect();
                panic!(
                    "after {count} of {expected} messages ({:?}): {e}; missing {missing:?}",
                    started.elapsed()
                )
            }
        };
        if message["event"] != "#publish" {
            continue;
        }
        let data = &message["data"]["data"];
        let key = (message["data"]["channel"].as_str().unwrap().to_owned(), data["p"].as_u64().unwrap());
        seen.entry(key).or_default().push(data["s"].as_u64().unwrap());
        count += 1;
    }
    (subscriber, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exchange_from_server_code_and_over_http() {
    let mut cell = start(2, 1, |c| c.worker.api_key = "backend-key".into()).await;
    let addr = cell.worker(0);

    // HTTP API: publish reaches a subscriber; get/set/delete; the key is required.
    let mut client = Client::connect(LOCAL, addr, &cell.url(0)).await.unwrap();
    client.subscribe("from-backend").await.unwrap();
    let (status, body) = api(
        addr,
        "POST",
        "/api/publish",
        Some("backend-key"),
        r#"{"channel":"from-backend","data":{"x":1}}"#,
    )
    .await;
    assert_eq!((status, body.as_str()), (200, r#"{"ok":true}"#));
    assert_eq!(client.next_publish("from-backend", Duration::from_secs(5)).await.unwrap(), json!({"x": 1}));
    assert_eq!(api(addr, "POST", "/api/publish", None, "{}").await.0, 401);
    assert_eq!(api(addr, "POST", "/api/publish", Some("wrong"), "{}").await.0, 401);
    assert_eq!(api(addr, "POST", "/api/publish", Some("backend-key"), "{nope").await.0, 400);
    assert_eq!(api(addr, "GET", "/api/exchange/user%2F1", Some("backend-key"), "").await.0, 404);
    assert_eq!(
        api(addr, "PUT", "/api/exchange/user%2F1", Some("backend-key"), r#"{"name":"ann"}"#).await.0,
        200
    );
    assert_eq!(
        api(addr, "GET", "/api/exchange/user%2F1", Some("backend-key"), "").await,
        (200, r#"{"name":"ann"}"#.into())
    );
    assert_eq!(
        api(addr, "DELETE", "/api/exchange/user%2F1", Some("backend-key"), "").await,
        (200, r#"{"value":{"name":"ann"}}"#.into())
    );
    assert_eq!(api(addr, "GET", "/api/exchange/user%2F1", Some("backend-key"), "").await.0, 404);

    // Server code: a connected worker's exchange, keys spread over both brokers.
    let (_, exchange) = cell.add_named_worker("worker-app").await;
    for i in 0..20 {
        exchange.set(&format!("k{i}"), &json!({"i": i})).await.unwrap();
    }
    for i in 0..20 {
        assert_eq!(exchange.get(&format!("k{i}")).await.unwrap(), Some(json!({"i": i})));
    }
    assert_eq!(exchange.add("list", &json!("a")).await.unwrap(), 0);
    assert_eq!(exchange.add("list", &json!("b")).await.unwrap(), 1);
    assert_eq!(exchange.add("list", &json!("c")).await.unwrap(), 2);
    assert_eq!(exchange.count("list").await.unwrap(), 3);
    assert_eq!(exchange.get_range("list", 1, None).await.unwrap(), vec![json!("b"), json!("c")]);
    assert_eq!(exchange.remove_range("list", 0, Some(1)).await.unwrap(), vec![json!("a")]);
    assert!(exchange.has_key("list").await.unwrap());
    assert_eq!(exchange.expire(&["k1", "k2", "missing"], 60).await.unwrap(), 2);
    assert!(exchange.get_expiry("k1").await.unwrap().is_some());
    assert_eq!(exchange.unexpire(&["k1"]).await.unwrap(), 1);
    assert_eq!(exchange.get_expiry("k1").await.unwrap(), None);
    assert_eq!(exchange.remove("k0").await.unwrap(), Some(json!({"i": 0})));
    assert!(!exchange.has_key("k0").await.unwrap());
    assert!(exchange.add("k3", &json!(1)).await.is_err(), "not a list");

    // Server-side subscribe and publish.
    let mut subscription = exchange.subscribe("server-side");
    exchange.publish("server-side", &json!([1, 2])).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), subscription.next()).await.unwrap();
    assert_eq!(got, Some(json!([1, 2])));
    // Clients gone first: a worker waits a while for a silent client's close handshake.
    drop(client);
    cell.shutdown().await;
}

/// One HTTP request to the worker's API: (status, body).
async fn api(addr: SocketAddr, method: &str, path: &str, key: Option<&str>, body: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = key.map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut response))
        .await
        .unwrap()
        .unwrap();
    let status = response.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restarted_under_its_id_registers_again_and_its_channels_deliver() {
    let mut cell = start(2, 1, |_| {}).await;
    let mut client = Client::connect(LOCAL, cell.worker(0), &cell.url(0)).await.unwrap();
    let channels: Vec<String> = (0..20).map(|i| format!("r{i}")).collect();
    for channel in &channels {
        client.subscribe(channel).await.unwrap();
    }
    let old = cell.broker(0);
    cell.restart_broker(0).await;
    let new = cell.broker(0);
    assert_ne!(new, old, "a new listener");
    eventually(Duration::from_secs(5), "broker-0 registered again", || async {
        let member = member_status(cell.master_admin(), "broker-0").await.ok()??;
        (member["grpc"] == new.to_string()).then_some(())
    })
    .await
    .unwrap();
    // Every channel delivers, through whichever broker owns it at the moment.
    for channel in &channels {
        client.publish(channel, json!(channel)).await.unwrap();
        assert_eq!(client.next_publish(channel, Duration::from_secs(5)).await.unwrap(), json!(channel));
    }
    // Clients gone first: a worker waits a while for a silent client's close handshake.
    drop(client);
    cell.shutdown().await;
}
