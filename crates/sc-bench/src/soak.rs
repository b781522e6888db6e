//! `soak`: no leak under churn. Starts a whole cluster from the real sc-master (1 balancer, 2
//! workers, 2 brokers), then for `--duration` keeps `--sessions` client loops churning at a
//! steady rate: each session connects (from one of 8 loopback addresses, so both workers get
//! clients), subscribes to fresh channel names (`soak/<loop>/<seq>/<j>`: per-channel state must
//! be freed, or it piles up) and one of 16 shared channels, publishes, invokes a procedure the
//! stock worker does not have (its error answer is expected), unsubscribes half of its channels
//! and disconnects. Mid-run (55% and 62% of the duration) one worker and then one broker are
//! killed with SIGKILL and the master respawns them.
//!
//! The RSS of every daemon (master, balancer, workers, brokers: the master's children, known by
//! their `--id`, so a respawned process is followed) is sampled each second. At the end a table
//! per daemon shows the RSS at the end of the warm-up (the first quarter), the means of the
//! second and last quarters and the growth between them; the run fails if a daemon grew more
//! than `--max-growth` percent, if a killed daemon did not come back, or if, once every client
//! has left, a broker still holds a channel or a worker stream a subscription (read with the
//! broker's `Stats` rpc, the brokers found through the master's `WatchMembers`).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Args;
use sc_common::secret;
use sc_proto::broker::v1 as broker_pb;
use sc_proto::master::v1 as master_pb;
use serde::Serialize;
use tokio::task::JoinSet;
use tonic::transport::Channel;

use crate::cluster::{self, Cluster};
use crate::common::Target;
use crate::procs;

#[derive(Debug, Clone, Args, Serialize)]
pub(crate) struct Params {
    /// How long the churn runs: "600s", "10m", "3m" (plain numbers are seconds).
    #[arg(long, default_value = "10m", value_parser = seconds)]
    pub(crate) duration: f64,
    /// Client loops running at once; each runs one session after another.
    #[arg(long, default_value_t = 16)]
    pub(crate) sessions: usize,
    /// How long one session lasts, in milliseconds (its operations, then idle until then).
    #[arg(long, default_value_t = 1000)]
    pub(crate) session_ms: u64,
    /// Fresh channels each session subscribes to (plus one shared channel).
    #[arg(long, default_value_t = 4)]
    pub(crate) channels: usize,
    /// Publishes each session makes.
    #[arg(long, default_value_t = 8)]
    pub(crate) publishes: usize,
    /// The largest RSS growth allowed between the second and the last quarter, in percent.
    #[arg(long, default_value_t = 5.0)]
    pub(crate) max_growth: f64,
    /// How long the counts may take to come back to zero once the clients have left, in seconds.
    #[arg(long, default_value_t = 20.0)]
    pub(crate) settle: f64,
    /// Where sc-master and the daemons are; default: beside this sc-bench binary.
    #[arg(long)]
    pub(crate) bin_dir: Option<PathBuf>,
}

/// What a soak run measured.
#[derive(Debug, Serialize)]
pub(crate) struct Outcome {
    pub(crate) passed: bool,
    pub(crate) failures: Vec<String>,
    pub(crate) seconds: f64,
    pub(crate) sessions: u64,
    pub(crate) connects: u64,
    pub(crate) subscribes: u64,
    pub(crate) unsubscribes: u64,
    pub(crate) publishes: u64,
    pub(crate) invokes: u64,
    pub(crate) received: u64,
    pub(crate) errors: u64,
    pub(crate) restarts: Vec<Restart>,
    pub(crate) daemons: Vec<DaemonRss>,
    /// Broker channels and worker-stream subscriptions once every client had left.
    pub(crate) final_broker_channels: u64,
    pub(crate) final_stream_subscriptions: u64,
    pub(crate) settled_after_sec: Option<f64>,
    pub(crate) load_during: Vec<String>,
}

/// One daemon's row of the table.
#[derive(Debug, Serialize)]
pub(crate) struct DaemonRss {
    pub(crate) id: String,
    pub(crate) pids: Vec<u32>,
    pub(crate) warmup_end_kb: u64,
    pub(crate) q2_mean_kb: u64,
    pub(crate) q4_mean_kb: u64,
    pub(crate) max_kb: u64,
    pub(crate) growth_pct: f64,
}

/// A daemon killed mid-run and its replacement.
#[derive(Debug, Serialize)]
pub(crate) struct Restart {
    pub(crate) id: String,
    pub(crate) at_sec: f64,
    pub(crate) old_pid: u32,
    pub(crate) new_pid: Option<u32>,
    pub(crate) back_after_sec: Option<f64>,
}

/// Operation counters, bumped by every session loop.
#[derive(Debug, Default)]
struct Ops {
    sessions: AtomicU64,
    connects: AtomicU64,
    subscribes: AtomicU64,
    unsubscribes: AtomicU64,
    publishes: AtomicU64,
    invokes: AtomicU64,
    received: AtomicU64,
    errors: AtomicU64,
}

/// RSS samples of one daemon id: (seconds since the start, pid, kB).
type Series = BTreeMap<String, Vec<(f64, u32, u64)>>;

pub(crate) async fn run(target: &Target, p: &Params, quiet: bool) -> anyhow::Result<Outcome> {
    let bin_dir = cluster::bin_dir(p.bin_dir.as_deref())?;
    // Supervise mode: 1 balancer, 2 workers, 2 brokers.
    let layout = [("SC_CLUSTER__WORKERS", "2"), ("SC_CLUSTER__BROKERS", "2"), ("SC_CLUSTER__BALANCERS", "1")];
    let env: Vec<(&str, String)> = layout.iter().map(|(k, v)| (*k, (*v).to_owned())).collect();
    let cluster = Cluster::start(&bin_dir, "soak", &env).await?;
    eprintln!("[soak] cluster ready: {} (sc-master pid {})", cluster.url, cluster.master.id());
    let master_pid = cluster.master.id();

    let start = Instant::now();
    let total = Duration::from_secs_f64(p.duration);
    let ops = Arc::new(Ops::default());
    let stop = Arc::new(AtomicBool::new(false));
    let series: Arc<Mutex<Series>> = Arc::default();

    // The sampler: every second, the RSS of each daemon by member id.
    let sampler = {
        let (series, stop) = (Arc::clone(&series), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let t = start.elapsed().as_secs_f64();
                let mut s = series.lock().unwrap_or_else(PoisonError::into_inner);
                for (id, pid) in daemons(master_pid) {
                    let kb = procs::rss_kb(pid);
                    if kb > 0 {
                        s.entry(id).or_default().push((t, pid, kb));
                    }
                }
                drop(s);
                std::thread::sleep(Duration::from_secs(1));
            }
        })
    };

    // The churn.
    let mut loops = JoinSet::new();
    for index in 0..p.sessions {
        let (target, url, ops, stop, p) =
            (target.clone(), cluster.url.clone(), Arc::clone(&ops), Arc::clone(&stop), p.clone());
        // Spread the loops' starts over one session so the rate is steady from the start.
        let offset = Duration::from_millis(p.session_ms * index as u64 / p.sessions.max(1) as u64);
        loops.spawn(async move {
            tokio::time::sleep(offset).await;
            session_loop(index, &target, &url, &p, &ops, &stop).await;
        });
    }

    // The run: progress every 10 s, the kills at 55% and 62%.
    let mut restarts: Vec<Restart> = Vec::new();
    let mut kills = vec![(0.55, "worker-"), (0.62, "broker-")];
    let mut load_during = Vec::new();
    let mut next_progress = Duration::from_secs(10);
    while start.elapsed() < total {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let elapsed = start.elapsed();
        if let Some(&(at, prefix)) = kills.first()
            && elapsed.as_secs_f64() >= at * p.duration
        {
            kills.remove(0);
            let victim = daemons(master_pid).into_iter().filter(|(id, _)| id.starts_with(prefix)).min();
            if let Some((id, pid)) = victim {
                eprintln!("[soak] {:6.1}s kill -9 {id} (pid {pid})", elapsed.as_secs_f64());
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
                restarts.push(Restart {
                    id,
                    at_sec: elapsed.as_secs_f64(),
                    old_pid: pid,
                    new_pid: None,
                    back_after_sec: None,
                });
            }
        }
        for r in restarts.iter_mut().filter(|r| r.new_pid.is_none()) {
            // Back once the master has a new process for the id and it registered again.
            if let Some((_, pid)) = daemons(master_pid).into_iter().find(|(id, _)| *id == r.id)
                && pid != r.old_pid
                && members(&cluster).await.is_ok_and(|m| m.iter().any(|m| m.id == r.id && m.pid == pid))
            {
                r.new_pid = Some(pid);
                r.back_after_sec = Some(start.elapsed().as_secs_f64() - r.at_sec);
                eprintln!("[soak] {:6.1}s {} is back as pid {pid}", start.elapsed().as_secs_f64(), r.id);
            }
        }
        if elapsed >= next_progress {
            next_progress += Duration::from_secs(10);
            load_during.push(crate::common::load_average());
            if !quiet {
                let counts = broker_counts(&cluster).await.map_or_else(
                    |e| format!("broker stats: {e:#}"),
                    |(c, s)| format!("broker channels {c} stream subscriptions {s}"),
                );
                let rss = {
                    let s = series.lock().unwrap_or_else(PoisonError::into_inner);
                    s.iter()
                        .filter_map(|(id, v)| {
                            v.last().map(|(_, _, kb)| format!("{id} {:.1}", *kb as f64 / 1024.0))
                        })
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                eprintln!(
                    "[soak] {:6.1}s sessions {} connects {} subscribes {} publishes {} invokes {} received {} errors {} | {counts} | RSS MB: {rss}",
                    elapsed.as_secs_f64(),
                    ops.sessions.load(Ordering::Relaxed),
                    ops.connects.load(Ordering::Relaxed),
                    ops.subscribes.load(Ordering::Relaxed),
                    ops.publishes.load(Ordering::Relaxed),
                    ops.invokes.load(Ordering::Relaxed),
                    ops.received.load(Ordering::Relaxed),
                    ops.errors.load(Ordering::Relaxed),
                );
            }
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    while loops.join_next().await.is_some() {}
    let _ = sampler.join();

    // Every client has left: the counts must come back to zero.
    let left = Instant::now();
    let mut last = (u64::MAX, u64::MAX);
    let mut settled_after_sec = None;
    while left.elapsed() < Duration::from_secs_f64(p.settle) {
        if let Ok(counts) = broker_counts(&cluster).await {
            last = counts;
            if counts == (0, 0) {
                settled_after_sec = Some(left.elapsed().as_secs_f64());
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let mut failures = Vec::new();
    let series = std::mem::take(&mut *series.lock().unwrap_or_else(PoisonError::into_inner));
    let daemons = table(&series, seconds);
    for d in &daemons {
        if d.growth_pct > p.max_growth {
            failures.push(format!(
                "{} grew {:.1}% from the second to the last quarter (limit {}%)",
                d.id, d.growth_pct, p.max_growth
            ));
        }
    }
    for r in &restarts {
        if r.new_pid.is_none() {
            failures.push(format!("{} was killed at {:.0}s and did not come back", r.id, r.at_sec));
        }
    }
    if restarts.len() < 2 {
        failures.push(format!("{} of the 2 planned restarts happened", restarts.len()));
    }
    if settled_after_sec.is_none() {
        failures.push(format!(
            "{}s after the last client left, the brokers still hold {} channels and {} stream subscriptions",
            p.settle, last.0, last.1
        ));
    }
    if ops.connects.load(Ordering::Relaxed) == 0 {
        failures.push("no client ever connected".into());
    }
    print_table(&daemons, &restarts);
    for f in &failures {
        eprintln!("[soak] FAILED: {f}");
    }
    if failures.is_empty() {
        eprintln!("[soak] passed");
    }
    drop(cluster);
    Ok(Outcome {
        passed: failures.is_empty(),
        failures,
        seconds,
        sessions: ops.sessions.load(Ordering::Relaxed),
        connects: ops.connects.load(Ordering::Relaxed),
        subscribes: ops.subscribes.load(Ordering::Relaxed),
        unsubscribes: ops.unsubscribes.load(Ordering::Relaxed),
        publishes: ops.publishes.load(Ordering::Relaxed),
        invokes: ops.invokes.load(Ordering::Relaxed),
        received: ops.received.load(Ordering::Relaxed),
        errors: ops.errors.load(Ordering::Relaxed),
        restarts,
        daemons,
        final_broker_channels: last.0,
        final_stream_subscriptions: last.1,
        settled_after_sec,
        load_during,
    })
}

/// One client loop: sessions one after another until `stop`.
async fn session_loop(index: usize, target: &Target, url: &str, p: &Params, ops: &Ops, stop: &AtomicBool) {
    let count = |c: &AtomicU64| c.fetch_add(1, Ordering::Relaxed);
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        seq += 1;
        let began = Instant::now();
        let mut config = target.client_config(index);
        config.url = url.to_owned();
        let host = ((index as u64 + seq) % 8) as u8 + 1;
        config.local_addr = Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, host)));
        count(&ops.sessions);
        match sc_client::connect(config).await {
            Ok((client, mut events)) => {
                count(&ops.connects);
                let received = tokio::spawn(async move {
                    let mut n = 0u64;
                    let mut batch = Vec::new();
                    while events.recv_many(&mut batch, 64).await > 0 {
                        n += batch.len() as u64;
                        batch.clear();
                    }
                    n
                });
                let mut names: Vec<String> =
                    (0..p.channels).map(|j| format!("soak/{index}/{seq}/{j}")).collect();
                names.push(format!("soak/shared/{}", seq % 16));
                for name in &names {
                    match client.subscribe(name).await {
                        Ok(()) => count(&ops.subscribes),
                        Err(_) => count(&ops.errors),
                    };
                }
                for i in 0..p.publishes {
                    let name = &names[i % names.len()];
                    match client.publish(name, serde_json::json!({ "i": i, "s": seq })).await {
                        Ok(()) => count(&ops.publishes),
                        Err(_) => count(&ops.errors),
                    };
                }
                // The stock worker has no such procedure: an error answer is the expected one.
                match client.invoke("soak-nothing", serde_json::json!({ "s": seq })).await {
                    Err(sc_client::Error::Remote { .. }) | Ok(_) => count(&ops.invokes),
                    Err(_) => count(&ops.errors),
                };
                for name in names.iter().step_by(2) {
                    match client.unsubscribe(name).await {
                        Ok(()) => count(&ops.unsubscribes),
                        Err(_) => count(&ops.errors),
                    };
                }
                let rest = Duration::from_millis(p.session_ms).saturating_sub(began.elapsed());
                tokio::time::sleep(rest).await;
                client.disconnect(1000, "session over").await;
                if let Ok(n) = received.await {
                    ops.received.fetch_add(n, Ordering::Relaxed);
                }
            }
            Err(_) => {
                count(&ops.errors);
                tokio::time::sleep(Duration::from_millis(p.session_ms)).await;
            }
        }
    }
}

/// The master itself and its children that have a member id, as (id, pid).
fn daemons(master: u32) -> Vec<(String, u32)> {
    let mut found = vec![("master".to_owned(), master)];
    for pid in procs::tree(master) {
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { continue };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if let Some(i) = args.iter().position(|a| *a == b"--id")
            && let Some(id) = args.get(i + 1)
        {
            found.push((String::from_utf8_lossy(id).into_owned(), pid));
        }
    }
    found
}

/// The live members, from the master's `WatchMembers` (its first message).
async fn members(cluster: &Cluster) -> anyhow::Result<Vec<master_pb::Member>> {
    let channel = Channel::from_shared(cluster.grpc.clone())?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .connect()
        .await?;
    let mut client = master_pb::master_client::MasterClient::with_interceptor(
        channel,
        secret::Attach::new(&cluster.secret),
    );
    let mut stream =
        client.watch_members(master_pb::WatchMembersRequest { roles: vec![] }).await?.into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), stream.message()).await??;
    Ok(first.map(|m| m.members).unwrap_or_default())
}

/// Channels held by all brokers, and subscriptions held by all worker streams on them.
async fn broker_counts(cluster: &Cluster) -> anyhow::Result<(u64, u64)> {
    let brokers: Vec<String> = members(cluster)
        .await?
        .into_iter()
        .filter(|m| m.role == master_pb::Role::Broker as i32)
        .filter_map(|m| m.addresses.map(|a| a.grpc))
        .collect();
    if brokers.is_empty() {
        bail!("no broker registered");
    }
    let (mut channels, mut subscriptions) = (0, 0);
    for grpc in brokers {
        let url = if grpc.starts_with("http") { grpc } else { format!("http://{grpc}") };
        let channel = Channel::from_shared(url)?
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(5))
            .connect()
            .await?;
        let mut client = broker_pb::broker_client::BrokerClient::with_interceptor(
            channel,
            secret::Attach::new(&cluster.secret),
        );
        let stats = client.stats(broker_pb::StatsRequest {}).await?.into_inner();
        channels += stats.channels;
        subscriptions += stats.streams.iter().map(|s| s.subscriptions).sum::<u64>();
    }
    Ok((channels, subscriptions))
}

/// The per-daemon rows: warm-up is the first quarter; growth compares the means of the second
/// and the last quarters.
fn table(series: &Series, seconds: f64) -> Vec<DaemonRss> {
    let q = seconds / 4.0;
    let mean = |v: &[(f64, u32, u64)], from: f64, to: f64| {
        let xs: Vec<u64> = v.iter().filter(|(t, _, _)| *t >= from && *t < to).map(|(_, _, kb)| *kb).collect();
        if xs.is_empty() { 0 } else { xs.iter().sum::<u64>() / xs.len() as u64 }
    };
    series
        .iter()
        .map(|(id, v)| {
            let mut pids: Vec<u32> = v.iter().map(|(_, pid, _)| *pid).collect();
            pids.dedup();
            let warmup_end_kb = v.iter().rfind(|(t, _, _)| *t < q).map_or(0, |(_, _, kb)| *kb);
            let q2 = mean(v, q, 2.0 * q);
            let q4 = mean(v, 3.0 * q, f64::MAX);
            let growth_pct = if q2 == 0 { 0.0 } else { (q4 as f64 - q2 as f64) * 100.0 / q2 as f64 };
            DaemonRss {
                id: id.clone(),
                pids,
                warmup_end_kb,
                q2_mean_kb: q2,
                q4_mean_kb: q4,
                max_kb: v.iter().map(|(_, _, kb)| *kb).max().unwrap_or(0),
                growth_pct,
            }
        })
        .collect()
}

fn print_table(daemons: &[DaemonRss], restarts: &[Restart]) {
    let mb = |kb: u64| kb as f64 / 1024.0;
    eprintln!();
    eprintln!(
        "| daemon | pids | RSS at warm-up end (MB) | mean Q2 (MB) | mean Q4 (MB) | max (MB) | growth Q2→Q4 |"
    );
    eprintln!("|---|---|---:|---:|---:|---:|---:|");
    for d in daemons {
        let pids = d.pids.iter().map(u32::to_string).collect::<Vec<_>>().join(" → ");
        eprintln!(
            "| {} | {pids} | {:.1} | {:.1} | {:.1} | {:.1} | {:+.1}% |",
            d.id,
            mb(d.warmup_end_kb),
            mb(d.q2_mean_kb),
            mb(d.q4_mean_kb),
            mb(d.max_kb),
            d.growth_pct
        );
    }
    for r in restarts {
        match (r.new_pid, r.back_after_sec) {
            (Some(pid), Some(after)) => eprintln!(
                "[soak] {} killed at {:.0}s (pid {}), back as pid {pid} after {after:.1}s",
                r.id, r.at_sec, r.old_pid
            ),
            _ => eprintln!("[soak] {} killed at {:.0}s (pid {}), not back", r.id, r.at_sec, r.old_pid),
        }
    }
}

/// "600", "600s", "10m", "1h" as seconds.
fn seconds(text: &str) -> Result<f64, String> {
    let text = text.trim();
    let (number, unit) = match text.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => text.split_at(i),
        None => (text, "s"),
    };
    let n: f64 = number.trim().parse().map_err(|_| format!("not a duration: {text:?}"))?;
    let factor = match unit {
        "ms" => 0.001,
        "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => return Err(format!("unknown unit in {text:?} (ms, s, m, h)")),
    };
    Ok(n * factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(seconds("600"), Ok(600.0));
        assert_eq!(seconds("3m"), Ok(180.0));
        assert_eq!(seconds("90s"), Ok(90.0));
        assert!(seconds("3x").is_err());
    }

    #[test]
    fn growth_compares_second_and_last_quarters() {
        let mut series = Series::new();
        // 100 s: 100 MB in the first half, 104 MB in the second (4% growth), 50 MB at the start.
        let v = (0..100)
            .map(|t| {
                (
                    t as f64,
                    1,
                    if t < 5 {
                        50
                    } else if t < 50 {
                        100
                    } else {
                        104
                    },
                )
            })
            .collect();
        series.insert("worker-0".into(), v);
        let rows = table(&series, 100.0);
        assert_eq!(rows[0].q2_mean_kb, 100);
        assert_eq!(rows[0].q4_mean_kb, 104);
        assert!((rows[0].growth_pct - 4.0).abs() < 1e-9);
        assert_eq!(rows[0].warmup_end_kb, 100);
    }
}
