//! Exchange data that moves with its keys (memory backend), with the real binaries: keys
//! written to an interim owner while their broker is down move back when it returns, and keys
//! move to a broker that joins and away from one that leaves gracefully.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use sc_tests::{Cluster, Signal, connect_from, eventually, member_status, signal_pid};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const API_KEY: &str = "exchange-moves-key";
const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

/// One HTTP/1.1 call to the worker's backend API through the balancer: status and body.
async fn api(to: SocketAddr, method: &str, path: &str, body: &str) -> Result<(u16, String)> {
    let mut stream = connect_from(LOCAL, to).await?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {to}\r\nAuthorization: Bearer {API_KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut response)).await??;
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).context("status line")?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Ok((status, body))
}

/// Keys that `owner` owns among `brokers` (rendezvous hashing, as the workers place them).
fn keys_of(owner: &str, brokers: &[&str], prefix: &str, n: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .filter(|k| sc_common::rendezvous::owner(brokers.iter().copied(), k.as_bytes()) == Some(owner))
        .take(n)
        .collect()
}

/// PUTs `key` until the API acknowledges it (a write to a broker that just died fails until the
/// worker sees it gone); returns the value written.
async fn put_acknowledged(addr: SocketAddr, key: &str, n: usize) -> Result<String> {
    let value = format!(r#"{{"n":{n},"key":"{key}"}}"#);
    eventually(Duration::from_secs(15), "an acknowledged write", || async {
        let (status, _) = api(addr, "PUT", &format!("/api/exchange/{key}"), &value).await.ok()?;
        (status == 200).then_some(())
    })
    .await?;
    Ok(value)
}

/// Reads every key, again and again for `during`: each read must return what was written.
async fn all_readable_for(addr: SocketAddr, written: &[(String, String)], during: Duration) -> Result<()> {
    let until = Instant::now() + during;
    let mut rounds = 0;
    while rounds == 0 || Instant::now() < until {
        let mut missing = Vec::new();
        for (key, value) in written {
            let (status, body) = api(addr, "GET", &format!("/api/exchange/{key}"), "").await?;
            let same = serde_json::from_str::<serde_json::Value>(&body).ok()
                == serde_json::from_str::<serde_json::Value>(value).ok();
            if status != 200 || !same {
                missing.push(format!("{key}: {status} {body}"));
            }
        }
        anyhow::ensure!(
            missing.is_empty(),
            "round {rounds}: {} of {} acknowledged keys lost: {missing:?}",
            missing.len(),
            written.len()
        );
        rounds += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("{} keys read back {rounds} times", written.len());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_written_while_a_broker_is_down_move_back_when_it_returns() -> Result<()> {
    let cluster = Cluster::start(&[
        ("SC_CLUSTER__WORKERS", "1"),
        ("SC_CLUSTER__BROKERS", "3"),
        ("SC_WORKER__API_KEY", API_KEY),
    ])
    .await?;
    let brokers = ["broker-0", "broker-1", "broker-2"];
    // Keys broker-1 owns: while it is down they go to an interim owner, then back to it.
    let keys = keys_of("broker-1", &brokers, "moved", 6);
    // Keys it owned before the kill: lost with it (memory backend); not checked.
    let victim = cluster.daemons_named("sc-broker").into_iter().find(|d| d.id == "broker-1").unwrap();
    signal_pid(victim.pid, Signal::KILL);
    let killed = Instant::now();
    let mut written = Vec::new();
    for (n, key) in keys.iter().enumerate() {
        written.push((key.clone(), put_acknowledged(cluster.addr, key, n).await?));
    }
    eprintln!("{} keys acknowledged {:?} after the kill", written.len(), killed.elapsed());

    // broker-1 comes back (the master respawns it) and passes a health check: the worker
    // routes its keys to it again.
    eventually(Duration::from_secs(20), "broker-1 respawned and healthy", || async {
        let status = member_status(cluster.admin, "broker-1").await.ok()??;
        (status["pid"] != victim.pid && status["state"] == "healthy").then_some(())
    })
    .await?;
    all_readable_for(cluster.addr, &written, Duration::from_secs(4)).await?;
    cluster.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_move_to_a_broker_that_joins_and_away_from_one_that_leaves() -> Result<()> {
    let secret = "exchange-moves-secret";
    let cluster = Cluster::start(&[
        ("SC_CLUSTER__WORKERS", "1"),
        ("SC_CLUSTER__BROKERS", "2"),
        ("SC_WORKER__API_KEY", API_KEY),
        ("SC_CLUSTER__SECRET", secret),
    ])
    .await?;
    let status = cluster.admin_get("/status").await?;
    let master_url = format!("http://{}", status["master"]["grpc"].as_str().context("master grpc")?);

    // Written on two brokers; a third will own some of them.
    let keys = keys_of("broker-extra", &["broker-0", "broker-1", "broker-extra"], "joined", 8);
    let mut written = Vec::new();
    for (n, key) in keys.iter().enumerate() {
        written.push((key.clone(), put_acknowledged(cluster.addr, key, n).await?));
    }
    let (_extra, pid) =
        sc_tests::start_extra_broker("broker-extra", &master_url, secret, cluster.admin).await?;
    all_readable_for(cluster.addr, &written, Duration::from_secs(3)).await?;

    // Written while it owns them; it leaves gracefully (SIGTERM) and they move away again.
    let more = keys_of("broker-extra", &["broker-0", "broker-1", "broker-extra"], "left", 8);
    for (n, key) in more.iter().enumerate() {
        written.push((key.clone(), put_acknowledged(cluster.addr, key, n).await?));
    }
    signal_pid(pid, Signal::TERM);
    eventually(Duration::from_secs(20), "broker-extra gone from the membership", || async {
        member_status(cluster.admin, "broker-extra").await.ok()?.is_none().then_some(())
    })
    .await?;
    all_readable_for(cluster.addr, &written, Duration::from_secs(3)).await?;
    eventually(Duration::from_secs(15), "broker-extra exited", || async {
        (!sc_tests::alive(pid)).then_some(())
    })
    .await?;
    all_readable_for(cluster.addr, &written, Duration::from_secs(1)).await?;
    cluster.stop().await?;
    Ok(())
}
