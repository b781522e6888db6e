//! Presence with the real binaries: the members of a presence channel across two workers, as
//! `GET /api/presence/<channel>` shows them, converging after a worker is killed with SIGKILL;
//! and a broker that joins (the channel moves to it) and leaves again keeping the full set.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use sc_tests::{
    Client, Cluster, Signal, connect_from, eventually, member_status, signal_pid, source_ip_per_worker,
};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const API_KEY: &str = "presence-tests-key";
const AUTH_KEY: &str = "presence-tests-auth-key";
/// `[master] health_interval` of these clusters (the default, stated).
const HEALTH_INTERVAL: Duration = Duration::from_secs(1);

/// The cluster settings of these tests: presence on `room/*`.
fn env<'a>(workers: &'a str, brokers: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("SC_CLUSTER__WORKERS", workers),
        ("SC_CLUSTER__BROKERS", brokers),
        ("SC_WORKER__API_KEY", API_KEY),
        ("SC_WORKER__AUTH_KEY", AUTH_KEY),
        ("SC_WORKER__PRESENCE_CHANNELS", "room/*"),
        ("SC_MASTER__HEALTH_INTERVAL", "1s"),
    ]
}

/// One GET on the backend API through the balancer, from `local`: status and JSON body.
async fn api_get(local: IpAddr, to: SocketAddr, path: &str, key: &str) -> Result<(u16, Value)> {
    let mut stream = connect_from(local, to).await?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {to}\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut response)).await??;
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).context("status line")?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    Ok((status, serde_json::from_str(body).unwrap_or(Value::Null)))
}

/// The members of `channel` as the API lists them: socket id to user; checks `count`.
async fn members(local: IpAddr, to: SocketAddr, channel: &str) -> Result<BTreeMap<String, Value>> {
    let path = format!("/api/presence/{}", channel.replace('/', "%2F"));
    let (status, body) = api_get(local, to, &path, API_KEY).await?;
    anyhow::ensure!(status == 200, "{path}: {status} {body}");
    anyhow::ensure!(body["channel"] == channel, "{body}");
    let list = body["members"].as_array().context("members")?;
    anyhow::ensure!(body["count"] == list.len(), "count is the number of members: {body}");
    Ok(list.iter().map(|m| (m["id"].as_str().unwrap_or_default().to_owned(), m["user"].clone())).collect())
}

/// A client on the worker that `ip` reaches, authenticated as `user` (if any), subscribed to
/// `channel`; returns it with its socket id.
async fn member(
    cluster: &Cluster,
    ip: IpAddr,
    user: Option<&str>,
    channel: &str,
) -> Result<(Client, String)> {
    let mut client = Client::connect(ip, cluster.addr, &cluster.url).await?;
    if let Some(user) = user {
        let claims = json!({ "username": user, "exp": sc_common::now_ms() / 1000 + 3600 });
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(AUTH_KEY.as_bytes())?,
        )?;
        let reply = client.invoke("#authenticate", json!(token)).await?;
        anyhow::ensure!(reply["data"]["isAuthenticated"] == true, "{reply}");
    }
    client.subscribe(channel).await?;
    let id = client.handshake["id"].as_str().context("socket id in the handshake")?.to_owned();
    Ok((client, id))
}

/// The expected listing: socket id to user (JSON null when anonymous).
fn expect(entries: &[(&str, Option<&str>)]) -> BTreeMap<String, Value> {
    entries.iter().map(|(id, user)| ((*id).to_owned(), user.map_or(Value::Null, |u| json!(u)))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_across_two_workers_converge_after_a_worker_is_killed() -> Result<()> {
    let cluster = Cluster::start(&env("2", "2")).await?;
    let ips = source_ip_per_worker(cluster.addr, 2).await?;
    let (w0, w1) = (ips["worker-0"], ips["worker-1"]);
    let room = "room/kill";

    let (_alice, alice) = member(&cluster, w0, Some("alice"), room).await?;
    let (_anon, anon) = member(&cluster, w0, None, room).await?;
    let (_bob, bob) = member(&cluster, w1, Some("bob"), room).await?;
    let (mut carol_client, carol) = member(&cluster, w1, Some("carol"), room).await?;
    let all = expect(&[(&alice, Some("alice")), (&anon, None), (&bob, Some("bob")), (&carol, Some("carol"))]);
    // Asked on either worker: the same, cluster-wide list (the subscribe acks come after the
    // broker has the subscription; the join follows it on the same stream, so poll briefly).
    for ip in [w0, w1] {
        eventually(Duration::from_secs(2), "all four members", || async {
            (members(ip, cluster.addr, room).await.ok()? == all).then_some(())
        })
        .await?;
    }

    // An unsubscribe leaves.
    let reply = carol_client.invoke("#unsubscribe", json!(room)).await?;
    assert!(reply.get("error").is_none(), "{reply}");
    let three = expect(&[(&alice, Some("alice")), (&anon, None), (&bob, Some("bob"))]);
    eventually(Duration::from_secs(2), "carol gone", || async {
        (members(w0, cluster.addr, room).await.ok()? == three).then_some(())
    })
    .await?;

    // Clients may neither subscribe nor publish to the events channel; the API refuses what is
    // not a presence channel and a wrong key.
    let refused =
        carol_client.invoke("#subscribe", json!({ "channel": format!("#presence/{room}") })).await?;
    assert!(refused.get("error").is_some(), "{refused}");
    let refused = carol_client
        .invoke("#publish", json!({ "channel": format!("#presence/{room}"), "data": {"event": "leave"} }))
        .await?;
    assert!(refused.get("error").is_some(), "{refused}");
    assert_eq!(api_get(w0, cluster.addr, "/api/presence/news", API_KEY).await?.0, 404);
    assert_eq!(api_get(w0, cluster.addr, "/api/presence/room%2Fkill", "wrong").await?.0, 401);

    // worker-1 dies at once: its TCP connections (to the brokers too) close with the process.
    let victim = cluster.daemons_named("sc-worker").into_iter().find(|d| d.id == "worker-1").unwrap();
    let survivors = expect(&[(&alice, Some("alice")), (&anon, None)]);
    let killed = Instant::now();
    signal_pid(victim.pid, Signal::KILL);
    let deadline = HEALTH_INTERVAL + Duration::from_secs(1);
    let mut last = BTreeMap::new();
    let converged = loop {
        if let Ok(now) = members(w0, cluster.addr, room).await {
            if now == survivors {
                break Some(killed.elapsed());
            }
            last = now;
        }
        if killed.elapsed() > deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let converged = converged.unwrap_or_else(|| panic!("not converged within {deadline:?}: {last:?}"));
    eprintln!("presence converged {converged:?} after the SIGKILL of worker-1 (bound: {deadline:?})");
    // And stays so (worker-1 comes back with no member).
    eventually(Duration::from_secs(20), "worker-1 respawned", || async {
        cluster.daemons_named("sc-worker").into_iter().find(|d| d.id == "worker-1" && d.pid != victim.pid)
    })
    .await?;
    assert_eq!(members(w0, cluster.addr, room).await?, survivors);
    cluster.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_joins_and_leaves_keeps_the_full_member_set() -> Result<()> {
    let secret = "presence-moves-secret";
    let mut settings = env("2", "2");
    settings.push(("SC_CLUSTER__SECRET", secret));
    let cluster = Cluster::start(&settings).await?;
    let status = cluster.admin_get("/status").await?;
    let master_url = format!("http://{}", status["master"]["grpc"].as_str().context("master grpc")?);
    let ips = source_ip_per_worker(cluster.addr, 2).await?;
    let (w0, w1) = (ips["worker-0"], ips["worker-1"]);
    // A channel the joining broker will own.
    let room = (0..)
        .map(|i| format!("room/{i}"))
        .find(|c| {
            sc_common::rendezvous::owner(["broker-0", "broker-1", "broker-extra"], c.as_bytes())
                == Some("broker-extra")
        })
        .unwrap();

    let mut clients = Vec::new();
    let mut entries = Vec::new();
    for (i, ip) in [w0, w0, w1, w1, w1].into_iter().enumerate() {
        let user = format!("user-{i}");
        let (client, id) = member(&cluster, ip, Some(&user), &room).await?;
        clients.push(client);
        entries.push((id, user));
    }
    let all: BTreeMap<String, Value> = entries.iter().map(|(id, user)| (id.clone(), json!(user))).collect();
    eventually(Duration::from_secs(2), "all five members", || async {
        (members(w0, cluster.addr, &room).await.ok()? == all).then_some(())
    })
    .await?;

    let (_extra, pid) =
        sc_tests::start_extra_broker("broker-extra", &master_url, secret, cluster.admin).await?;
    // The channel moves to broker-extra (each worker replays its members there as it sees
    // the change); from then on every read, from either worker, is the full set.
    let moved = Instant::now();
    let (mut reads, mut partial) = (0, 0);
    let mut settled = None;
    while moved.elapsed() < Duration::from_secs(4) {
        for ip in [w0, w1] {
            let now = members(ip, cluster.addr, &room).await?;
            reads += 1;
            if now == all {
                settled.get_or_insert(moved.elapsed());
            } else {
                partial += 1;
                assert!(moved.elapsed() < Duration::from_secs(1), "still partial after 1 s: {now:?}");
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("broker joined: {reads} reads, {partial} partial (first full at {settled:?})");

    // It leaves gracefully: the channel moves back, with its members.
    signal_pid(pid, Signal::TERM);
    eventually(Duration::from_secs(20), "broker-extra gone from the membership", || async {
        member_status(cluster.admin, "broker-extra").await.ok()?.is_none().then_some(())
    })
    .await?;
    let left = Instant::now();
    let (mut reads, mut partial) = (0, 0);
    while left.elapsed() < Duration::from_secs(4) {
        let now = members(w1, cluster.addr, &room).await?;
        reads += 1;
        if now != all {
            partial += 1;
            assert!(left.elapsed() < Duration::from_secs(1), "still partial after 1 s: {now:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("broker left: {reads} reads, {partial} partial");
    eventually(Duration::from_secs(15), "broker-extra exited", || async {
        (!sc_tests::alive(pid)).then_some(())
    })
    .await?;
    assert_eq!(members(w0, cluster.addr, &room).await?, all);
    drop(clients);
    cluster.stop().await?;
    Ok(())
}
