//! The whole cluster from the real `sc-master` binary: processes, pub/sub across workers,
//! worker crashes, hung workers, and the master's own death.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use anyhow::Result;
use sc_tests::{Client, Cluster, Signal, alive, eventually, http_get, signal_pid, source_ip_per_worker};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_across_workers_then_a_killed_worker_is_replaced() -> Result<()> {
    let cluster = Cluster::start(&[("SC_CLUSTER__WORKERS", "2"), ("SC_CLUSTER__BROKERS", "1")]).await?;

    // 1 balancer, 2 workers, 1 broker.
    let mut counts = BTreeMap::new();
    for daemon in cluster.daemons() {
        *counts.entry(daemon.program).or_insert(0) += 1;
    }
    let expected: BTreeMap<String, i32> =
        [("sc-balancer", 1), ("sc-broker", 1), ("sc-worker", 2)].map(|(k, v)| (k.to_owned(), v)).into();
    assert_eq!(counts, expected);

    // A subscriber on one worker, a publisher on the other.
    let ips = source_ip_per_worker(cluster.addr, 2).await?;
    let subscriber_ip = ips["worker-0"];
    let publisher_ip = ips["worker-1"];
    let mut subscriber = Client::connect(subscriber_ip, cluster.addr, &cluster.url).await?;
    let mut publisher = Client::connect(publisher_ip, cluster.addr, &cluster.url).await?;
    assert_eq!(subscriber.handshake["pingTimeout"], 20000);
    assert_eq!(subscriber.handshake["isAuthenticated"], false);
    subscriber.subscribe("e2e").await?;
    publisher.subscribe("e2e").await?;
    publisher.publish("e2e", json!({"n": 1, "text": "hello"})).await?;
    let within = Duration::from_secs(5);
    assert_eq!(subscriber.next_publish("e2e", within).await?, json!({"n": 1, "text": "hello"}));
    assert_eq!(
        publisher.next_publish("e2e", within).await?,
        json!({"n": 1, "text": "hello"}),
        "echo to the publisher"
    );

    // SIGKILL the publisher's worker: a new process takes its place and serves.
    let victim = cluster.daemons_named("sc-worker").into_iter().find(|d| d.id == "worker-1").unwrap();
    let killed_at = Instant::now();
    signal_pid(victim.pid, Signal::KILL);
    let replacement = eventually(Duration::from_secs(2), "a new worker-1 process", || async {
        cluster.daemons_named("sc-worker").into_iter().find(|d| d.id == "worker-1" && d.pid != victim.pid)
    })
    .await?;
    eprintln!("worker-1 respawned as pid {} after {:?}", replacement.pid, killed_at.elapsed());
    assert!(!alive(victim.pid));

    // The same client IP reaches the new worker-1 once it has registered, and pub/sub works.
    let mut publisher = eventually(Duration::from_secs(5), "a connection to the new worker-1", || async {
        match http_get(publisher_ip, cluster.addr, "/healthz").await {
            Ok((200, Some(worker))) if worker == "worker-1" => {
                Client::connect(publisher_ip, cluster.addr, &cluster.url).await.ok()
            }
            _ => None,
        }
    })
    .await?;
    eprintln!("new worker-1 serving after {:?}", killed_at.elapsed());
    publisher.publish("e2e", json!("after the crash")).await?;
    assert_eq!(subscriber.next_publish("e2e", within).await?, json!("after the crash"));

    let status = cluster.stop().await?;
    assert!(status.success(), "master exit status {status}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_worker_fails_its_health_checks_and_is_replaced() -> Result<()> {
    let cluster =
        Cluster::start(&[("SC_CLUSTER__WORKERS", "1"), ("SC_MASTER__HEALTH_INTERVAL", "200ms")]).await?;
    let worker = cluster.daemons_named("sc-worker").remove(0);
    signal_pid(worker.pid, Signal::STOP);
    let replacement = eventually(Duration::from_secs(5), "a replacement for the stopped worker", || async {
        cluster.daemons_named("sc-worker").into_iter().find(|d| d.pid != worker.pid)
    })
    .await?;
    eventually(Duration::from_secs(2), "the hung worker killed", || async {
        (!alive(worker.pid)).then_some(())
    })
    .await?;
    let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let mut client = eventually(Duration::from_secs(5), "a connection to the replacement", || async {
        Client::connect(ip, cluster.addr, &cluster.url).await.ok()
    })
    .await?;
    client.subscribe("alive").await?;
    client.publish("alive", json!(replacement.pid)).await?;
    assert_eq!(client.next_publish("alive", Duration::from_secs(5)).await?, json!(replacement.pid));
    cluster.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_master_leaves_no_daemon_behind() -> Result<()> {
    let mut cluster = Cluster::start(&[]).await?;
    let daemons = cluster.daemons();
    assert_eq!(daemons.len(), 4, "{daemons:?}");
    cluster.signal_master(Signal::KILL);
    let _ = cluster.master.wait().await;
    let killed_at = Instant::now();
    eventually(Duration::from_secs(5), "every daemon gone", || async {
        daemons.iter().all(|d| !alive(d.pid)).then_some(())
    })
    .await?;
    eprintln!("all daemons gone {:?} after the master's SIGKILL", killed_at.elapsed());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_every_daemon_and_exits_zero() -> Result<()> {
    let cluster = Cluster::start(&[]).await?;
    let daemons = cluster.daemons();
    let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let mut client = Client::connect(ip, cluster.addr, &cluster.url).await?;
    let status = cluster.stop().await?;
    assert!(status.success(), "{status}");
    for daemon in &daemons {
        assert!(!alive(daemon.pid), "{daemon:?} outlived the master");
    }
    // The socket was closed by the server with a close frame without a status code (1005 at
    // the client), after which the stock clients reconnect at once.
    let frame = client.close_frame(Duration::from_secs(2)).await?;
    assert_eq!(frame, Some(None), "an empty close frame");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_basics_through_the_balancer() -> Result<()> {
    let cluster = Cluster::start(&[("SC_CLUSTER__WORKERS", "1")]).await?;
    let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let mut client = Client::connect(ip, cluster.addr, &cluster.url).await?;

    // An invoke of a procedure nobody handles gets an error reply.
    let reply = client.invoke("nobody", json!({"x": 1})).await?;
    assert!(reply.get("error").is_some(), "{reply}");
    // A malformed subscribe is refused with the stock error. (A bare string is a channel name
    // for v14 clients, which protocol_version = "auto" serves too.)
    let reply = client.invoke("#subscribe", json!(42)).await?;
    assert_eq!(reply["error"]["name"], "InvalidActionError", "{reply}");
    // Unsubscribing from a channel never subscribed, with a cid, is a BrokerError.
    let reply = client.invoke("#unsubscribe", json!("never")).await?;
    assert_eq!(reply["error"]["name"], "BrokerError", "{reply}");
    // Raw text after the handshake is not an error; the socket stays usable.
    client.send_text("just some text").await?;
    client.subscribe("still-here").await?;
    // A batch (JSON array) is handled in order.
    client
        .send_text(
            &json!([
                {"event": "#publish", "data": {"channel": "still-here", "data": 1}},
                {"event": "#publish", "data": {"channel": "still-here", "data": 2}}
            ])
            .to_string(),
        )
        .await?;
    assert_eq!(client.next_publish("still-here", Duration::from_secs(5)).await?, json!(1));
    assert_eq!(client.next_publish("still-here", Duration::from_secs(5)).await?, json!(2));

    // A message before the handshake closes with 4009.
    let stream = sc_tests::connect_from(ip, cluster.addr).await?;
    let (mut ws, _) = tokio_tungstenite::client_async(cluster.url.as_str(), stream).await?;
    use futures_util::{SinkExt, StreamExt};
    ws.send(tokio_tungstenite::tungstenite::Message::Text(r#"{"event":"hi","data":1}"#.into())).await?;
    let close = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(frame)) = ws.next().await {
            if let tokio_tungstenite::tungstenite::Message::Close(frame) = frame {
                return frame.map(|f| u16::from(f.code));
            }
        }
        None
    })
    .await?;
    assert_eq!(close, Some(4009));

    // Unknown paths are 404, the WebSocket path works without its trailing slash too.
    assert_eq!(http_get(ip, cluster.addr, "/nope").await?.0, 404);
    let url = cluster.url.trim_end_matches('/').to_owned();
    let mut client = Client::connect(ip, cluster.addr, &url).await?;
    client.subscribe("slashless").await?;
    cluster.stop().await?;
    Ok(())
}
