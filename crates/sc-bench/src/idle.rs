//! `idle`: N handshaken connections doing nothing (optionally subscribed); the summed RSS of
//! every process of the server (the Node server, or sc-master and all its children) before and
//! after, per connection.
//!
//! A few connections are opened first and the baseline taken after them, so lazily loaded code
//! and first-use allocations are not charged per connection. Node servers started with
//! `--expose-gc` can be collected before each sample (`--gc-url`, peers/servers/common.js).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, ValueEnum};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;

use crate::common::{Counters, Progress, Target};
use crate::procs;

/// Warm-up connections before the baseline sample.
const WARM_UP: usize = 10;

#[derive(Debug, Clone, Copy, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Subscribe {
    /// No channel.
    None,
    /// Every connection on one channel.
    Shared,
    /// A channel per connection.
    Unique,
}

#[derive(Debug, Clone, Args, Serialize)]
pub(crate) struct Params {
    #[arg(long, default_value_t = 5000)]
    pub(crate) connections: usize,
    #[arg(long, value_enum, default_value_t = Subscribe::None)]
    pub(crate) subscribe: Subscribe,
    /// Seconds to wait after connecting, before measuring.
    #[arg(long, default_value_t = 3.0)]
    pub(crate) settle: f64,
    /// `http://host:port/path` to GET before each sample (forces a GC in the Node peers).
    #[arg(long)]
    pub(crate) gc_url: Option<String>,
}

#[derive(Debug, Serialize)]
pub(crate) struct Outcome {
    pub(crate) connections: usize,
    pub(crate) alive: usize,
    pub(crate) connect_seconds: f64,
    pub(crate) connects_per_sec: f64,
    pub(crate) server_processes: usize,
    pub(crate) server_rss_kb_before: u64,
    pub(crate) server_rss_kb_after: u64,
    pub(crate) rss_kb_per_connection: f64,
    /// The same by program name (sc-balancer, sc-worker, node...).
    pub(crate) rss_kb_per_connection_by_program: std::collections::BTreeMap<String, f64>,
    pub(crate) client_rss_kb: u64,
}

pub(crate) async fn run(target: &Target, p: &Params, quiet: bool) -> anyhow::Result<Outcome> {
    anyhow::ensure!(target.pid.is_some(), "idle needs --pid (the server's root process)");
    let counters = Arc::new(Counters::default());
    let _progress = Progress::start("idle", Arc::clone(&counters), quiet);
    let warm = target.connect_many(WARM_UP, &counters).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = measure(target, p).await;
    let by_program0 = procs::rss_by_program(target.pid);

    let start = Instant::now();
    let clients = target.connect_many(p.connections, &counters).await?;
    let mut subscribes = JoinSet::new();
    for (index, (client, _)) in clients.iter().enumerate() {
        let channel = match p.subscribe {
            Subscribe::None => continue,
            Subscribe::Shared => "idle".to_owned(),
            Subscribe::Unique => format!("c{index}"),
        };
        let client = client.clone();
        subscribes.spawn(async move { client.subscribe(&channel).await });
        if subscribes.len() >= target.concurrency {
            subscribes.join_next().await.context("subscribe task")??.context("subscribe")?;
        }
    }
    while let Some(done) = subscribes.join_next().await {
        done?.context("subscribe")?;
    }
    let connect_seconds = start.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs_f64(p.settle)).await;
    let after = measure(target, p).await;
    let by_program1 = procs::rss_by_program(target.pid);
    let alive = clients.iter().filter(|(c, _)| c.close_info().is_none()).count();
    counters.errors.store((clients.len() - alive) as u64, Ordering::Relaxed);
    let client_rss_kb = procs::sample(Some(std::process::id())).rss_kb;
    drop(clients);
    drop(warm);
    Ok(Outcome {
        connections: p.connections,
        alive,
        connect_seconds,
        connects_per_sec: p.connections as f64 / connect_seconds,
        server_processes: after.processes,
        server_rss_kb_before: before.rss_kb,
        server_rss_kb_after: after.rss_kb,
        rss_kb_per_connection: (after.rss_kb as f64 - before.rss_kb as f64) / p.connections as f64,
        rss_kb_per_connection_by_program: by_program1
            .iter()
            .map(|(name, kb)| {
                let grown = *kb as f64 - by_program0.get(name).copied().unwrap_or(0) as f64;
                (name.clone(), grown / p.connections as f64)
            })
            .collect(),
        client_rss_kb,
    })
}

/// Optionally asks the server to collect garbage, then samples its process tree.
async fn measure(target: &Target, p: &Params) -> procs::Sample {
    if let Some(url) = &p.gc_url {
        if let Err(error) = http_get(url).await {
            eprintln!("gc request to {url} failed: {error}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    procs::sample(target.pid)
}

/// A minimal HTTP/1.0 GET; the body is ignored. Done at the end of the body by its
/// content-length, or at the end of stream: uWebSockets keeps the connection open.
async fn http_get(url: &str) -> anyhow::Result<()> {
    let rest = url.strip_prefix("http://").context("only http:// URLs")?;
    let (authority, path) =
        rest.split_once('/').map_or((rest, "/".to_owned()), |(a, p)| (a, format!("/{p}")));
    let mut stream =
        tokio::time::timeout(Duration::from_secs(3), tokio::net::TcpStream::connect(authority)).await??;
    stream
        .write_all(
            format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let read = async {
        let mut response = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok::<_, anyhow::Error>(());
            }
            response.extend_from_slice(&chunk[..n]);
            if let Some(end) = response.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&response[..end]).to_ascii_lowercase();
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok());
                if length.is_some_and(|length| response.len() >= end + 4 + length) {
                    return Ok(());
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read).await??;
    Ok(())
}
