//! `sc-idle-memory [CONNECTIONS] [plain|tls|both] [BALANCERS]`: how much memory the balancer
//! holds per idle forwarded connection.
//!
//! For each mode it starts a whole cluster (sc-master in supervise mode from the folder of this
//! binary, or `SC_TEST_BIN_DIR`), opens and closes a few connections to warm the balancer up,
//! reads its RSS from /proc, opens CONNECTIONS (default 10,000) WebSocket connections from
//! several loopback source addresses (127.0.0.2 and up, 1,000 each) that then stay idle, waits
//! until the balancer holds both sockets of every one, reads its RSS again and prints the
//! difference per connection. TLS mode uses a certificate from a CA made at run time. With
//! BALANCERS > 1 (`[cluster] balancers`, one port) the connections spread over them and the
//! figure is the sum of their growth over the connections.
//! A balancer needs two file descriptors per connection (client and worker side): it raises its
//! own limit, which takes CAP_SYS_RESOURCE or a high enough hard limit (`ulimit -Hn`). bench/idle-memory.sh builds the release binaries and runs
//! it; the figures are in docs/balancer-memory.md.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use sc_tests::{Cluster, TestCa, connect_from, eventually};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Connections opened at once.
const BATCH: usize = 250;
/// Connections per source address.
const PER_SOURCE: usize = 1000;

/// One idle client connection, held open until dropped.
type Held = Box<dyn std::any::Any + Send>;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let connections: usize = args.next().map(|n| n.parse()).transpose()?.unwrap_or(10_000);
    let modes = match args.next().as_deref() {
        None | Some("both") => vec![false, true],
        Some("plain") => vec![false],
        Some("tls") => vec![true],
        Some(other) => bail!("mode must be plain, tls or both, not {other:?}"),
    };
    let balancers: usize = args.next().map(|n| n.parse()).transpose()?.unwrap_or(1);
    // Per balancer: two per connection plus its listeners, gRPC and the like.
    raise_fd_limit((2 * connections).div_ceil(balancers) as u64 + 256)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        for tls in modes {
            measure(connections, tls, balancers).await?;
        }
        Ok(())
    })
}

async fn measure(connections: usize, tls: bool, balancers: usize) -> Result<()> {
    let ca = TestCa::new("idle-memory")?;
    let mut env = vec![
        ("SC_CLUSTER__WORKERS", "2".to_owned()),
        ("SC_CLUSTER__BALANCERS", balancers.to_string()),
        // Idle means idle: no pings and no handshake deadline for the length of the run.
        ("SC_WORKER__PING_INTERVAL", "30m".to_owned()),
        ("SC_WORKER__PING_TIMEOUT", "1h".to_owned()),
        ("SC_WORKER__HANDSHAKE_TIMEOUT", "1h".to_owned()),
    ];
    if tls {
        env.push(("SC_BALANCER__TLS_CERT", ca.cert.display().to_string()));
        env.push(("SC_BALANCER__TLS_KEY", ca.key.display().to_string()));
    }
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let cluster = Cluster::start(&env).await?;
    let pids: Vec<u32> = cluster.daemons_named("sc-balancer").iter().map(|d| d.pid).collect();
    if pids.len() != balancers {
        bail!("expected {balancers} balancers, found {pids:?}");
    }
    let sockets = || pids.iter().map(|&pid| sockets_of(pid)).sum::<usize>();
    let rss = || pids.iter().map(|&pid| rss_kib(pid)).sum::<Result<u64>>();
    let config = tls.then(|| ca.client_config()).transpose()?;

    // Warm-up: the runtime's threads, the buffer pools and the allocator's arenas.
    let sockets_before = sockets();
    drop(open(cluster.addr, &cluster.url, 200, config.clone()).await?);
    eventually(Duration::from_secs(30), "the warm-up connections closed", || async {
        (sockets() <= sockets_before).then_some(())
    })
    .await?;
    let before = rss()?;
    let held = open(cluster.addr, &cluster.url, connections, config).await?;
    eventually(Duration::from_secs(60), "the balancers holding every connection", || async {
        (sockets() >= sockets_before + 2 * connections).then_some(())
    })
    .await?;
    let after = rss()?;
    let per = (after.saturating_sub(before)) as f64 / connections as f64;
    println!(
        "{}: {connections} idle connections over {balancers} balancer(s), balancer RSS {before} KiB -> {after} KiB: {per:.2} KiB per connection",
        if tls { "tls" } else { "plain" },
    );
    drop(held);
    cluster.stop().await?;
    Ok(())
}

/// Opens `count` WebSocket connections (upgrade done, then idle), `BATCH` at a time.
async fn open(
    addr: SocketAddr,
    url: &str,
    count: usize,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<Vec<Held>> {
    let url = url.replacen("wss://", "ws://", 1);
    let mut held: Vec<Held> = Vec::with_capacity(count);
    let mut next = 0;
    while next < count {
        let mut batch = JoinSet::new();
        for i in next..(next + BATCH).min(count) {
            let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (i / PER_SOURCE) as u8));
            let (url, tls) = (url.clone(), tls.clone());
            batch.spawn(async move { connect(source, addr, &url, tls).await });
        }
        while let Some(outcome) = batch.join_next().await {
            held.push(outcome??);
        }
        next += BATCH;
    }
    Ok(held)
}

async fn connect(
    source: IpAddr,
    addr: SocketAddr,
    url: &str,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<Held> {
    // Small client buffers: the bench process holds every connection too.
    let config = WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0);
    let stream = connect_from(source, addr).await?;
    Ok(match tls {
        Some(tls) => {
            let name = rustls_pki_types::ServerName::IpAddress(Ipv4Addr::LOCALHOST.into());
            let stream = tokio_rustls::TlsConnector::from(tls).connect(name, stream).await?;
            Box::new(tokio_tungstenite::client_async_with_config(url, stream, Some(config)).await?.0)
        }
        None => Box::new(tokio_tungstenite::client_async_with_config(url, stream, Some(config)).await?.0),
    })
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("VmRSS")?;
    Ok(line.split_whitespace().nth(1).context("VmRSS value")?.parse()?)
}

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

/// Raises the open file limit (soft and, as root, hard) to at least `want`; the cluster's
/// processes inherit it.
fn raise_fd_limit(want: u64) -> Result<()> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    // `None` is unlimited.
    let limit = getrlimit(Resource::Nofile);
    if limit.current.is_none_or(|current| current >= want) {
        return Ok(());
    }
    let raised = Rlimit { current: Some(want), maximum: limit.maximum.map(|maximum| maximum.max(want)) };
    if let Err(e) = setrlimit(Resource::Nofile, raised) {
        bail!(
            "cannot raise the open file limit to {want} (hard limit {:?}): {e}; run as root or raise `ulimit -Hn`",
            limit.maximum
        );
    }
    Ok(())
}
