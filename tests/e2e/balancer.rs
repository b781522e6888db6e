//! The balancer from the real binaries: wss:// with a certificate from config and its reload
//! on SIGHUP, bad TLS input, client-IP stickiness and failover, Unix sockets to the workers,
//! several balancers on one port, and the connection limit.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use sc_tests::{
    Client, Cluster, Signal, TestCa, alive, bin, eventually, http_get, https_get, signal_pid, tls_connect,
};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// Reads until the server closes the connection; fails if it does not within `within`.
async fn closed_by_server(stream: &mut TcpStream, within: Duration) -> Result<()> {
    let mut sink = [0u8; 1024];
    tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("connection still open after {within:?}"))
}

/// A TLS cluster running the chat example (its `peer` procedure tells what the worker knows).
async fn tls_cluster(ca: &TestCa, extra: &[(&str, &str)]) -> Result<Cluster> {
    let chat = bin("sc-chat-worker");
    let mut env = vec![
        ("SC_CLUSTER__WORKERS", "2"),
        ("SC_WORKER__COMMAND", chat.to_str().unwrap()),
        ("SC_BALANCER__TLS_CERT", ca.cert.to_str().unwrap()),
        ("SC_BALANCER__TLS_KEY", ca.key.to_str().unwrap()),
    ];
    env.extend_from_slice(extra);
    Cluster::start(&env).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_end_to_end_and_a_sighup_reload_keeps_open_connections() -> Result<()> {
    let ca = TestCa::new("first")?;
    let cluster = tls_cluster(&ca, &[]).await?;
    assert!(cluster.url.starts_with("wss://"), "{}", cluster.url);

    let mut old = Client::connect_tls(ip(2), cluster.addr, &cluster.url, &ca).await?;
    let peer = old.invoke("peer", json!(null)).await?;
    assert_eq!(peer["data"]["tls"], true, "{peer}");
    assert_eq!(peer["data"]["remoteAddress"], "127.0.0.2", "{peer}");
    old.subscribe("tls").await?;
    old.publish("tls", json!("over wss")).await?;
    assert_eq!(old.next_publish("tls", Duration::from_secs(5)).await?, json!("over wss"));
    // Plain HTTP passes too.
    assert_eq!(https_get(ip(3), cluster.addr, "/healthz", &ca).await?.0, 200);
    // Plain ws:// to the TLS port is not served.
    assert!(Client::connect(ip(3), cluster.addr, &cluster.url.replacen("wss", "ws", 1)).await.is_err());

    // A new pair from another CA on disk, then SIGHUP to the master (it tells the balancers).
    let second = ca.swap_in("second")?;
    let second_config = sc_tests::client_config(&second)?;
    cluster.signal_master(Signal::HUP);
    eventually(Duration::from_secs(5), "the new certificate served", || async {
        sc_tests::tls_connect_with(ip(4), cluster.addr, second_config.clone()).await.ok()
    })
    .await?;
    assert!(
        tls_connect(ip(4), cluster.addr, &ca).await.is_err(),
        "new connections no longer get the old one"
    );

    // The old connection is still up and served.
    old.publish("tls", json!("after the reload")).await?;
    assert_eq!(old.next_publish("tls", Duration::from_secs(5)).await?, json!("after the reload"));
    assert!(cluster.stop().await?.success());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tls_input_closes_that_connection_and_nothing_else() -> Result<()> {
    let ca = TestCa::new("bad input")?;
    let cluster = tls_cluster(&ca, &[("SC_BALANCER__TLS_HANDSHAKE_TIMEOUT", "1s")]).await?;
    let balancer = cluster.daemons_named("sc-balancer").remove(0);
    let mut good = Client::connect_tls(ip(2), cluster.addr, &cluster.url, &ca).await?;
    good.subscribe("still").await?;

    // Plain HTTP to the TLS port.
    let mut plain = TcpStream::connect(cluster.addr).await?;
    plain.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await?;
    closed_by_server(&mut plain, Duration::from_secs(5)).await?;

    // A handshake record whose ClientHello is garbage.
    let mut garbage = TcpStream::connect(cluster.addr).await?;
    let mut hello = vec![0x16, 0x03, 0x01, 0x00, 0x40, 0x01, 0x00, 0x00, 0x3c];
    hello.extend((0..0x3c).map(|i| (i * 37 % 251) as u8));
    garbage.write_all(&hello).await?;
    closed_by_server(&mut garbage, Duration::from_secs(5)).await?;

    // A client that announces a record and then stalls is cut at the handshake timeout.
    let mut stalled = TcpStream::connect(cluster.addr).await?;
    let started = Instant::now();
    stalled.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).await?;
    closed_by_server(&mut stalled, Duration::from_secs(5)).await?;
    let after = started.elapsed();
    assert!(after >= Duration::from_millis(800), "cut after {after:?}, before the timeout");

    // Nothing else noticed.
    assert!(alive(balancer.pid));
    assert_eq!(cluster.daemons_named("sc-balancer")[0].pid, balancer.pid);
    good.publish("still", json!("fine")).await?;
    assert_eq!(good.next_publish("still", Duration::from_secs(5)).await?, json!("fine"));
    let mut fresh = Client::connect_tls(ip(3), cluster.addr, &cluster.url, &ca).await?;
    fresh.subscribe("still").await?;
    cluster.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_ip_keeps_its_worker_and_only_a_leavers_clients_move() -> Result<()> {
    // A killed worker stays out for a while (long respawn backoff), so the membership changes.
    let cluster =
        Cluster::start(&[("SC_CLUSTER__WORKERS", "3"), ("SC_MASTER__RESPAWN_BACKOFF", "60s")]).await?;
    let ips: Vec<IpAddr> = (2..=31).map(ip).collect();
    let mut before = BTreeMap::new();
    for &ip in &ips {
        let (_, worker) = http_get(ip, cluster.addr, "/healthz").await?;
        before.insert(ip, worker.unwrap());
    }
    for &ip in &ips {
        let (_, again) = http_get(ip, cluster.addr, "/healthz").await?;
        assert_eq!(again.as_ref(), Some(&before[&ip]), "{ip} moved while nothing changed");
    }
    let on_leaver: Vec<IpAddr> = ips.iter().copied().filter(|ip| before[ip] == "worker-1").collect();
    if on_leaver.is_empty() || on_leaver.len() == ips.len() {
        bail!("30 IPs should spread over 3 workers: {before:?}");
    }

    // The balancer hands plain connections to their worker over its Unix socket (a link in
    // /proc/net/unix under the cluster's folder, besides the listeners): the client's socket
    // then belongs to the worker, and the balancer holds nothing for it.
    let folder = format!("/sc-{}/", cluster.master_pid);
    let unix_sockets =
        || std::fs::read_to_string("/proc/net/unix").unwrap().lines().filter(|l| l.contains(&folder)).count();
    let workers = cluster.daemons_named("sc-worker").len();
    assert!(unix_sockets() > workers, "no hand-off link besides the {workers} listeners");
    let balancer = cluster.daemons_named("sc-balancer")[0].pid;
    let in_balancer = sockets_of(balancer);
    let _held = Client::connect(ips[0], cluster.addr, &cluster.url).await?;
    assert_eq!(sockets_of(balancer), in_balancer, "the balancer kept a handed-off connection");

    let victim = cluster.daemons_named("sc-worker").into_iter().find(|d| d.id == "worker-1").unwrap();
    signal_pid(victim.pid, Signal::KILL);
    eventually(Duration::from_secs(5), "worker-1's clients moved", || async {
        let (_, now) = http_get(on_leaver[0], cluster.addr, "/healthz").await.ok()?;
        (now.as_deref() != Some("worker-1")).then_some(())
    })
    .await?;
    for &ip in &ips {
        let (status, now) = http_get(ip, cluster.addr, "/healthz").await?;
        assert_eq!(status, 200);
        let now = now.unwrap();
        if on_leaver.contains(&ip) {
            assert_ne!(now, "worker-1");
        } else {
            assert_eq!(now, before[&ip], "{ip} was not on the leaver and must not move");
        }
    }
    let dir = std::env::temp_dir().join(format!("sc-{}", cluster.master_pid));
    assert!(dir.exists());
    assert!(cluster.stop().await?.success());
    assert!(!dir.exists(), "the master removes the Unix socket folder");
    Ok(())
}

/// Open sockets of a process (its file descriptors that are sockets).
fn sockets_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| {
                    std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
                })
                .count()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_balancers_share_one_port() -> Result<()> {
    // Proxied connections (as TLS ones and those to workers on other hosts are): each holds
    // sockets in the balancer that accepted it.
    let cluster = Cluster::start(&[
        ("SC_CLUSTER__BALANCERS", "2"),
        ("SC_CLUSTER__WORKERS", "1"),
        ("SC_BALANCER__HANDOFF", "false"),
    ])
    .await?;
    let balancers = cluster.daemons_named("sc-balancer");
    assert_eq!(balancers.len(), 2, "{balancers:?}");
    let idle: Vec<usize> = balancers.iter().map(|b| sockets_of(b.pid)).collect();
    let mut clients = Vec::new();
    for last in 2..42 {
        clients.push(Client::connect(ip(last), cluster.addr, &cluster.url).await?);
    }
    // Each forwarded connection holds two sockets in the balancer that accepted it.
    let busy: Vec<usize> = balancers.iter().map(|b| sockets_of(b.pid)).collect();
    let added: Vec<usize> = busy.iter().zip(&idle).map(|(b, i)| b.saturating_sub(*i)).collect();
    assert_eq!(added.iter().sum::<usize>(), 80, "{added:?}");
    assert!(added.iter().all(|&n| n > 0), "the kernel spread connections over both: {added:?}");

    // SIGHUP without TLS is harmless: the master passes it on, the balancers ignore it.
    cluster.signal_master(Signal::HUP);
    let (status, _) = http_get(ip(60), cluster.addr, "/healthz").await?;
    assert_eq!(status, 200);
    assert!(balancers.iter().all(|b| alive(b.pid)), "a balancer died of SIGHUP");
    assert!(alive(cluster.master_pid));

    // One balancer gone: the other serves new clients on the same port.
    signal_pid(balancers[0].pid, Signal::KILL);
    // Connections queued on the killed one's listener are reset with it: wait until it is gone,
    // reaped by the master (a zombie leader may still have threads closing its descriptors).
    let proc_dir = format!("/proc/{}", balancers[0].pid);
    eventually(Duration::from_secs(5), "the killed balancer reaped", || async {
        (!std::path::Path::new(&proc_dir).exists()).then_some(())
    })
    .await?;
    for last in 42..52 {
        let (status, _) = http_get(ip(last), cluster.addr, "/healthz").await?;
        assert_eq!(status, 200);
    }
    drop(clients);
    cluster.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_max_connections_accepting_pauses() -> Result<()> {
    let cluster =
        Cluster::start(&[("SC_CLUSTER__WORKERS", "1"), ("SC_BALANCER__MAX_CONNECTIONS", "2")]).await?;
    let first = Client::connect(ip(2), cluster.addr, &cluster.url).await?;
    let _second = Client::connect(ip(3), cluster.addr, &cluster.url).await?;
    // The third waits in the backlog: connected, but not answered.
    let mut third = TcpStream::connect(cluster.addr).await?;
    third.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await?;
    let mut response = String::new();
    let early = tokio::time::timeout(Duration::from_millis(500), third.read_to_string(&mut response)).await;
    assert!(early.is_err(), "answered past the limit: {response:?}");
    // One closes: the third is served.
    drop(first);
    tokio::time::timeout(Duration::from_secs(10), third.read_to_string(&mut response)).await??;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert_eq!(cluster.daemons_named("sc-balancer").len(), 1);
    cluster.stop().await?;
    Ok(())
}

/// Same-host hand-off: a plain connection is passed to its worker and forgotten by the
/// balancer, so it survives the balancer's death; `[balancer] handoff = false` proxies it, and
/// then it does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handed_off_connections_outlive_their_balancer() -> Result<()> {
    for handoff in [true, false] {
        let flag = handoff.to_string();
        let cluster =
            Cluster::start(&[("SC_CLUSTER__WORKERS", "1"), ("SC_BALANCER__HANDOFF", &flag)]).await?;
        let balancer = cluster.daemons_named("sc-balancer")[0].pid;
        let worker = cluster.daemons_named("sc-worker")[0].pid;
        // The first connection opens the hand-off link; count from there.
        let mut first = Client::connect(ip(2), cluster.addr, &cluster.url).await?;
        let (in_balancer, in_worker) = (sockets_of(balancer), sockets_of(worker));
        let mut clients = Vec::new();
        for last in 3..13 {
            clients.push(Client::connect(ip(last), cluster.addr, &cluster.url).await?);
        }
        let (added_balancer, added_worker) =
            (sockets_of(balancer) - in_balancer, sockets_of(worker) - in_worker);
        if handoff {
            assert_eq!(
                (added_balancer, added_worker),
                (0, 10),
                "handed off: the client sockets are the worker's"
            );
        } else {
            assert_eq!((added_balancer, added_worker), (20, 10), "proxied: two sockets in the balancer each");
        }

        first.subscribe("outlive").await?;
        signal_pid(balancer, Signal::KILL);
        let proc_dir = format!("/proc/{balancer}");
        eventually(Duration::from_secs(5), "the killed balancer reaped", || async {
            (!std::path::Path::new(&proc_dir).exists()).then_some(())
        })
        .await?;
        let published = async {
            first.publish("outlive", json!("still here")).await?;
            first.next_publish("outlive", Duration::from_secs(3)).await
        };
        let outcome = tokio::time::timeout(Duration::from_secs(5), published).await;
        if handoff {
            assert_eq!(outcome??, json!("still here"), "a handed-off connection lives on");
            assert!(clients[0].invoke("#subscribe", json!({ "channel": "x" })).await.is_ok());
        } else {
            assert!(!matches!(outcome, Ok(Ok(_))), "a proxied connection dies with its balancer");
        }
        // The respawned balancer serves new clients.
        eventually(Duration::from_secs(10), "a new balancer", || async {
            Client::connect(ip(20), cluster.addr, &cluster.url).await.ok()
        })
        .await?;
        drop(clients);
        cluster.stop().await?;
    }
    Ok(())
}
