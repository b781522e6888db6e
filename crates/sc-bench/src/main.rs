//! sc-bench: the load generator for sc-rs and the stock SocketCluster servers.
//!
//! It speaks the SocketCluster protocol through sc-client, so the same client code drives our
//! cluster (through sc-balancer) and the Node peers, on the same machine, in the same run.
//! Scenarios: `fanout`, `channels`, `rpc`, `idle`, `connect`, and two that start clusters of
//! their own (`cluster`): `soak`, which checks for leaks under churn, and `redis-cross`, which
//! compares a fan-out across two clusters through Redis with one cluster alone (one module
//! each). Each prints a
//! live progress line on stderr and one JSON document on stdout (and to `--out`), with the
//! machine's load average before and after, since the machine is shared.
//!
//! A tool rather than a library: its modules are private to the binary, so errors are anyhow
//! throughout.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde::Serialize;

mod channels;
mod cluster;
mod common;
mod connect;
mod fanout;
mod idle;
mod procs;
mod redis_cross;
mod rpc;
mod sink;
mod soak;
mod stats;

#[derive(Debug, Parser)]
#[command(name = "sc-bench", version, about = "Load generator for SocketCluster servers")]
struct Cli {
    #[command(flatten)]
    target: common::Target,
    /// Also write the JSON result to this file.
    #[arg(long, global = true)]
    out: Option<PathBuf>,
    /// No progress line.
    #[arg(long, global = true)]
    quiet: bool,
    /// Runtime threads of the load generator (1 leaves the other core to the server on a
    /// 2-core machine, like the single-threaded Node client).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// N subscribers on one channel, one publisher at a rate or as fast as possible.
    Fanout(fanout::Params),
    /// N sockets, each on its own channel plus one shared channel.
    Channels(channels::Params),
    /// Invoke round trips (`echo`).
    Rpc(rpc::Params),
    /// Idle connections: the server's RSS per connection.
    Idle(idle::Params),
    /// Handshakes per second.
    Connect(connect::Params),
    /// Starts a cluster (sc-master beside sc-bench) and churns clients, channels, publishes and
    /// invokes for a duration, restarting a worker and a broker: fails if a daemon's RSS grows
    /// or the brokers' counts do not come back to zero.
    Soak(soak::Params),
    /// Starts a redis-server and fresh clusters, and runs the fan-out in interleaved rounds on
    /// one cluster (memory backend, Redis backend) and across two clusters on the same Redis
    /// (publisher on one, subscribers on the other): rates, latencies and their ratios.
    RedisCross(redis_cross::Params),
}

/// The JSON document of one run.
#[derive(Debug, Serialize)]
struct Report<P, O> {
    scenario: &'static str,
    label: String,
    url: String,
    protocol: u8,
    source_ips: u8,
    threads: usize,
    load_before: String,
    load_after: String,
    unix_time: u64,
    params: P,
    result: O,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = if cli.threads <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(cli.threads).enable_all().build()
    };
    let outcome = runtime.context("tokio runtime").and_then(|rt| rt.block_on(run(&cli)));
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("sc-bench: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: &Cli) -> anyhow::Result<()> {
    let t = &cli.target;
    t.load_tls()?;
    let load_before = common::load_average();
    // A scenario's failed checks: the report is still printed, then sc-bench exits non-zero.
    let mut failures: Vec<String> = Vec::new();
    let json = match &cli.scenario {
        Scenario::Fanout(p) => report(cli, "fanout", load_before, p, fanout::run(t, p, cli.quiet).await?)?,
        Scenario::Channels(p) => {
            report(cli, "channels", load_before, p, channels::run(t, p, cli.quiet).await?)?
        }
        Scenario::Rpc(p) => report(cli, "rpc", load_before, p, rpc::run(t, p, cli.quiet).await?)?,
        Scenario::Idle(p) => report(cli, "idle", load_before, p, idle::run(t, p, cli.quiet).await?)?,
        Scenario::Connect(p) => report(cli, "connect", load_before, p, connect::run(t, p, cli.quiet).await?)?,
        Scenario::Soak(p) => {
            let outcome = soak::run(t, p, cli.quiet).await?;
            failures = outcome.failures.clone();
            report(cli, "soak", load_before, p, outcome)?
        }
        Scenario::RedisCross(p) => {
            let outcome = redis_cross::run(t, p, cli.quiet).await?;
            failures = outcome.failures.clone();
            report(cli, "redis-cross", load_before, p, outcome)?
        }
    };
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{json}")?;
    if let Some(path) = &cli.out {
        std::fs::write(path, format!("{json}\n")).with_context(|| format!("writing {}", path.display()))?;
    }
    if !failures.is_empty() {
        anyhow::bail!("{} check(s) failed: {}", failures.len(), failures.join("; "));
    }
    Ok(())
}

fn report<P: Serialize, O: Serialize>(
    cli: &Cli,
    scenario: &'static str,
    load_before: String,
    params: &P,
    result: O,
) -> anyhow::Result<String> {
    let t = &cli.target;
    let report = Report {
        scenario,
        label: t.label.clone(),
        url: t.url.clone(),
        protocol: t.protocol,
        source_ips: t.source_ips,
        threads: cli.threads,
        load_before,
        load_after: common::load_average(),
        unix_time: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        params,
        result,
    };
    Ok(serde_json::to_string(&report)?)
}
