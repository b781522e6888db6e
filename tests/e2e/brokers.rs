//! Brokers that scale out, with the real binaries: many channels over three brokers, ordering
//! under concurrency, and a broker killed with SIGKILL mid-stream.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use sc_tests::{Client, Cluster, Signal, eventually, signal_pid, source_ip_per_worker};
use serde_json::json;

/// A second loopback address on the same worker as `ip` (the balancer hashes by address).
async fn another_ip_on(cluster: &Cluster, worker: &str, not: IpAddr) -> Result<IpAddr> {
    for i in 2..250u8 {
        let ip = IpAddr::from([127, 0, 0, i]);
        if ip == not {
            continue;
        }
        if sc_tests::http_get(ip, cluster.addr, "/healthz").await?.1.as_deref() == Some(worker) {
            return Ok(ip);
        }
    }
    bail!("no second address on {worker}")
}

/// Reads `#publish` messages of `{p, s}` until `expected` arrived; returns, per (channel,
/// publisher), the sequence numbers in arrival order, and the arrival time of each.
async fn collect(
    client: &mut Client,
    expected: usize,
    within: Duration,
) -> Result<HashMap<(String, u64), Vec<u64>>> {
    let mut seen: HashMap<(String, u64), Vec<u64>> = HashMap::new();
    let deadline = Instant::now() + within;
    let mut count = 0;
    while count < expected {
        let left = deadline.saturating_duration_since(Instant::now());
        let message = match client.next_message(left).await {
            Ok(message) => message,
            Err(e) => bail!("after {count} of {expected} messages: {e}"),
        };
        if message["event"] != "#publish" {
            continue;
        }
        let channel = message["data"]["channel"].as_str().unwrap_or_default().to_owned();
        let data = &message["data"]["data"];
        let (Some(p), Some(s)) = (data["p"].as_u64(), data["s"].as_u64()) else { continue };
        seen.entry((channel, p)).or_default().push(s);
        count += 1;
    }
    Ok(seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_brokers_500_channels_every_message_in_order() -> Result<()> {
    let cluster = Cluster::start(&[("SC_CLUSTER__WORKERS", "2"), ("SC_CLUSTER__BROKERS", "3")]).await?;
    let brokers = cluster.daemons_named("sc-broker");
    assert_eq!(brokers.len(), 3);
    let ips = source_ip_per_worker(cluster.addr, 2).await?;
    let channels: Vec<String> = (0..500).map(|i| format!("ch-{i}")).collect();

    // One subscriber per worker, each on every channel.
    let mut subscribers = Vec::new();
    for ip in ips.values() {
        let mut client = Client::connect(*ip, cluster.addr, &cluster.url).await?;
        let batch = channels
            .iter()
            .enumerate()
            .map(|(i, c)| json!({"event": "#subscribe", "data": {"channel": c}, "cid": 1000 + i}))
            .collect();
        client.send_batch(batch).await?;
        for i in 0..channels.len() {
            let reply =
                client.recv_matching(|m| m["rid"] == json!(1000 + i), Duration::from_secs(10)).await?;
            assert!(reply.get("error").is_none(), "{reply}");
        }
        subscribers.push(client);
    }

    // Two publishers per worker, each 500 messages to pseudo-random channels, in batches.
    const PER_PUBLISHER: u64 = 500;
    let mut publishers = Vec::new();
    for (n, (worker, ip)) in ips.iter().enumerate() {
        publishers.push(Client::connect(*ip, cluster.addr, &cluster.url).await?);
        let second = another_ip_on(&cluster, worker, *ip).await?;
        publishers.push(Client::connect(second, cluster.addr, &cluster.url).await?);
        assert_eq!(publishers.len(), 2 * (n + 1));
    }
    let mut expected: HashMap<(String, u64), Vec<u64>> = HashMap::new();
    let mut tasks = Vec::new();
    for (p, mut publisher) in publishers.into_iter().enumerate() {
        let p = p as u64;
        let mut rng = 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(p + 1);
        let mut plan = Vec::new();
        for s in 0..PER_PUBLISHER {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let channel = channels[(rng % channels.len() as u64) as usize].clone();
            expected.entry((channel.clone(), p)).or_default().push(s);
            plan.push(json!({"event": "#publish", "data": {"channel": channel, "data": {"p": p, "s": s}}}));
        }
        tasks.push(tokio::spawn(async move {
            for chunk in plan.chunks(50) {
                publisher.send_batch(chunk.to_vec()).await?;
            }
            // The last one with an ack, so the publisher knows its batches went through.
            let reply = publisher.invoke("#publish", json!({"channel": "done", "data": p})).await?;
            anyhow::ensure!(reply.get("error").is_none(), "{reply}");
            Ok::<_, anyhow::Error>(publisher)
        }));
    }
    let total = (4 * PER_PUBLISHER) as usize;
    let started = Instant::now();
    for subscriber in &mut subscribers {
        let seen = collect(subscriber, total, Duration::from_secs(60)).await?;
        assert_eq!(seen, expected, "every message, in publish order per channel and publisher");
    }
    eprintln!("{} deliveries checked in {:?}", total * subscribers.len(), started.elapsed());
    for task in tasks {
        task.await??;
    }
    cluster.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_killed_mid_stream_is_replaced_and_every_channel_delivers_again() -> Result<()> {
    let cluster = Cluster::start(&[("SC_CLUSTER__WORKERS", "2"), ("SC_CLUSTER__BROKERS", "3")]).await?;
    let ips = source_ip_per_worker(cluster.addr, 2).await?;
    let channels: Vec<String> = (0..60).map(|i| format!("live-{i}")).collect();
    let mut subscriber = Client::connect(ips["worker-0"], cluster.addr, &cluster.url).await?;
    for channel in &channels {
        subscriber.subscribe(channel).await?;
    }
    let mut publisher = Client::connect(ips["worker-1"], cluster.addr, &cluster.url).await?;

    // A round on every channel every 20 ms for 4 s; broker-1 dies after 1 s.
    const ROUNDS: u64 = 200;
    let publishing = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        for s in 0..ROUNDS {
            tick.tick().await;
            let batch = (0..60).map(|c| json!({"event": "#publish", "data": {"channel": format!("live-{c}"), "data": {"p": 0, "s": s}}})).collect();
            publisher.send_batch(batch).await?;
        }
        Ok::<_, anyhow::Error>(publisher)
    });
    // The schedule of the test (the kill lands mid-stream), not a wait for a condition.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let victim = cluster.daemons_named("sc-broker").into_iter().find(|d| d.id == "broker-1").unwrap();
    let killed_at = Instant::now();
    signal_pid(victim.pid, Signal::KILL);

    // Per channel: the arrival times, to find the longest silence around the kill.
    let mut arrivals: BTreeMap<String, Vec<(u64, Instant)>> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let done = arrivals.len() == channels.len()
            && arrivals.values().all(|a| a.last().is_some_and(|(s, _)| *s == ROUNDS - 1));
        if done || Instant::now() > deadline {
            break;
        }
        let Ok(message) = subscriber.next_message(Duration::from_secs(5)).await else { break };
        if message["event"] != "#publish" {
            continue;
        }
        let channel = message["data"]["channel"].as_str().unwrap_or_default().to_owned();
        if let Some(s) = message["data"]["data"]["s"].as_u64() {
            arrivals.entry(channel).or_default().push((s, Instant::now()));
        }
    }
    publishing.await??;
    let respawned = eventually(Duration::from_secs(5), "broker-1 respawned", || async {
        cluster.daemons_named("sc-broker").into_iter().find(|d| d.id == "broker-1" && d.pid != victim.pid)
    })
    .await?;

    let mut lost = 0;
    let mut swaps = 0;
    let mut longest_gap = Duration::ZERO;
    for channel in &channels {
        let got = arrivals.get(channel).cloned().unwrap_or_default();
        assert!(got.iter().any(|(s, _)| *s == ROUNDS - 1), "{channel} delivers to the end");
        let seqs: Vec<u64> = got.iter().map(|(s, _)| *s).collect();
        // In order, except where the channel moved (to a surviving broker, and back to the
        // respawned one): messages in flight on the old stream may swap with the new one's.
        swaps += seqs.windows(2).filter(|w| w[0] > w[1]).count();
        let mut sorted = seqs.clone();
        sorted.sort_unstable();
        let before = sorted.len();
        sorted.dedup();
        assert_eq!(sorted.len(), before, "{channel}: no duplicates");
        lost += ROUNDS as usize - sorted.len();
        for pair in got.windows(2) {
            if pair[1].1 > killed_at {
                longest_gap = longest_gap.max(pair[1].1 - pair[0].1);
            }
        }
    }
    eprintln!(
        "broker-1 killed; respawned as pid {}; messages lost: {lost} of {}; out of order at a move: {swaps}; longest silence on a channel: {longest_gap:?}",
        respawned.pid,
        ROUNDS as usize * channels.len()
    );
    assert!(swaps <= 2 * channels.len(), "reordering only at the moves ({swaps})");
    assert!(
        longest_gap < Duration::from_secs(2),
        "every channel delivered again within 2 s ({longest_gap:?})"
    );
    cluster.stop().await?;
    Ok(())
}
