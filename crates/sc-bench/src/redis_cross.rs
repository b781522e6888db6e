//! `redis-cross`: what crossing clusters through Redis costs, against one cluster alone, in the
//! same run. Starts a `redis-server` of its own (Debian's, installed with apt-get when missing,
//! as tests/e2e/redis.rs does; on a free loopback port, no persistence), then runs `--rounds`
//! rounds; each round runs every setup once, in an order rotated by one each round (so that a
//! noisy neighbour hurts every setup alike), the `fanout` scenario on fresh clusters (sc-master
//! beside sc-bench, `--workers` workers, one broker and one balancer each):
//!
//! - `memory`: one cluster on the memory backend (the reference);
//! - `redis`: one cluster with `[broker] backend = "redis"`, publisher and subscribers on it
//!   (its broker also sends every publish to Redis, gets it back and drops it as its own);
//! - `cross`: two clusters with different `cluster_id`s on the same Redis, the subscribers on
//!   A, the publisher on B: every message goes through B's worker and broker, Redis, then A's
//!   broker and worker.
//!
//! Reports every run (the fan-out's whole outcome), per setup the medians over the rounds of
//! the delivery rate and of the p50/p99 latencies (publish to receive), and the ratios
//! `cross/redis`, `cross/memory` and `redis/memory`. A run that failed, lost or duplicated
//! messages is a failed check (the figures are printed, and sc-bench exits non-zero). The
//! server CPU of a run is that of the subscribers' cluster (A) only.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::{Args, ValueEnum};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::cluster::{self, Cluster};
use crate::common::{Target, load_average};
use crate::fanout;

/// Where the publisher and the subscribers are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Setup {
    /// One cluster, memory backend.
    Memory,
    /// One cluster, Redis backend.
    Redis,
    /// Two clusters on one Redis: publisher on B, subscribers on A.
    Cross,
}

#[derive(Debug, Clone, Args, Serialize)]
pub(crate) struct Params {
    /// The setups of each round (rotated by one each round).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Setup::Memory, Setup::Redis, Setup::Cross])]
    pub(crate) setups: Vec<Setup>,
    /// Rounds: every setup once per round.
    #[arg(long, default_value_t = 3)]
    pub(crate) rounds: usize,
    /// Workers per cluster (each cluster has one broker and one balancer).
    #[arg(long, default_value_t = 1)]
    pub(crate) workers: usize,
    /// The redis-server program.
    #[arg(long, default_value = "redis-server")]
    pub(crate) redis_server: String,
    /// Where sc-master and the daemons are; default: beside this sc-bench binary.
    #[arg(long)]
    pub(crate) bin_dir: Option<PathBuf>,
    /// The fan-out of every run (`--publisher-url` is set here, per setup).
    #[command(flatten)]
    pub(crate) fanout: fanout::Params,
}

/// One fan-out run of one setup.
#[derive(Debug, Serialize)]
pub(crate) struct Run {
    pub(crate) round: usize,
    pub(crate) setup: Setup,
    pub(crate) load_before: String,
    pub(crate) outcome: Option<fanout::Outcome>,
    pub(crate) error: Option<String>,
}

/// One setup over the rounds: medians of its successful runs.
#[derive(Debug, Serialize)]
pub(crate) struct Figures {
    pub(crate) setup: Setup,
    pub(crate) runs: usize,
    pub(crate) deliveries_per_sec: Vec<f64>,
    pub(crate) p50_ms: Vec<f64>,
    pub(crate) p99_ms: Vec<f64>,
    pub(crate) median_deliveries_per_sec: f64,
    pub(crate) median_p50_ms: f64,
    pub(crate) median_p99_ms: f64,
    pub(crate) lost: u64,
    pub(crate) duplicated: u64,
}

/// `of` (e.g. "cross/redis"): the ratios of the medians of two setups.
#[derive(Debug, Serialize)]
pub(crate) struct Ratio {
    pub(crate) of: String,
    pub(crate) deliveries_per_sec: f64,
    pub(crate) p50: f64,
    pub(crate) p99: f64,
}

/// What a `redis-cross` run measured.
#[derive(Debug, Serialize)]
pub(crate) struct Outcome {
    pub(crate) redis_version: String,
    pub(crate) runs: Vec<Run>,
    pub(crate) figures: Vec<Figures>,
    pub(crate) ratios: Vec<Ratio>,
    pub(crate) failures: Vec<String>,
}

/// A redis-server on a free loopback port, in a folder of its own; killed when dropped.
#[derive(Debug)]
struct RedisServer {
    child: Child,
    port: u16,
    dir: PathBuf,
}

pub(crate) async fn run(target: &Target, p: &Params, quiet: bool) -> anyhow::Result<Outcome> {
    ensure!(!p.setups.is_empty() && p.rounds > 0, "no setup or no round to run");
    let bin_dir = cluster::bin_dir(p.bin_dir.as_deref())?;
    ensure_redis(&p.redis_server)?;
    let redis = RedisServer::start(&p.redis_server).await?;
    let redis_version = version(&p.redis_server);
    let redis_url = format!("redis://127.0.0.1:{}", redis.port);
    eprintln!("[redis-cross] {redis_version} on {redis_url}");

    let mut runs = Vec::new();
    for round in 0..p.rounds {
        let n = p.setups.len();
        for setup in (0..n).map(|i| p.setups[(i + round) % n]) {
            eprintln!("[redis-cross] round {} of {}: {setup:?}", round + 1, p.rounds);
            let load_before = load_average();
            let (outcome, error) = match run_one(setup, &bin_dir, &redis_url, target, p, quiet).await {
                Ok(outcome) => (Some(outcome), None),
                Err(e) => {
                    eprintln!("[redis-cross] {setup:?} failed: {e:#}");
                    (None, Some(format!("{e:#}")))
                }
            };
            runs.push(Run { round: round + 1, setup, load_before, outcome, error });
        }
    }
    drop(redis);

    let figures: Vec<Figures> = p.setups.iter().map(|&setup| figures_of(setup, &runs)).collect();
    let ratios: Vec<Ratio> =
        [(Setup::Cross, Setup::Redis), (Setup::Cross, Setup::Memory), (Setup::Redis, Setup::Memory)]
            .iter()
            .filter_map(|&(a, b)| ratio(&figures, a, b))
            .collect();
    let mut failures = Vec::new();
    for run in &runs {
        let what = format!("round {} {:?}", run.round, run.setup);
        match (&run.outcome, &run.error) {
            (_, Some(error)) => failures.push(format!("{what}: {error}")),
            (Some(o), None) if o.lost > 0 || o.duplicated > 0 => {
                failures.push(format!("{what}: {} lost, {} duplicated", o.lost, o.duplicated));
            }
            _ => {}
        }
    }
    print_table(&figures, &ratios);
    Ok(Outcome { redis_version, runs, figures, ratios, failures })
}

/// Starts the clusters of `setup`, runs the fan-out on them and stops them.
async fn run_one(
    setup: Setup,
    bin_dir: &Path,
    redis_url: &str,
    target: &Target,
    p: &Params,
    quiet: bool,
) -> anyhow::Result<fanout::Outcome> {
    let env = |redis_cluster: Option<&str>| {
        let mut env = vec![
            ("SC_CLUSTER__WORKERS", p.workers.to_string()),
            ("SC_CLUSTER__BROKERS", "1".to_owned()),
            ("SC_CLUSTER__BALANCERS", "1".to_owned()),
        ];
        if let Some(id) = redis_cluster {
            env.push(("SC_BROKER__BACKEND", "redis".to_owned()));
            env.push(("SC_BROKER__REDIS_URL", redis_url.to_owned()));
            env.push(("SC_BROKER__CLUSTER_ID", id.to_owned()));
        }
        env
    };
    let (subscribers, publishers) = match setup {
        Setup::Memory => (Cluster::start(bin_dir, "bench-memory", &env(None)).await?, None),
        Setup::Redis => (Cluster::start(bin_dir, "bench-a", &env(Some("bench-a"))).await?, None),
        Setup::Cross => {
            let (env_a, env_b) = (env(Some("bench-a")), env(Some("bench-b")));
            let (a, b) = tokio::try_join!(
                Cluster::start(bin_dir, "bench-a", &env_a),
                Cluster::start(bin_dir, "bench-b", &env_b),
            )?;
            (a, Some(b))
        }
    };
    let mut target = target.clone();
    target.url = subscribers.url.clone();
    target.pid = Some(subscribers.pid());
    let mut params = p.fanout.clone();
    params.publisher_url = publishers.as_ref().map(|b| b.url.clone());
    let outcome = fanout::run(&target, &params, quiet).await;
    // Both clusters stop at once (each waits for its master to exit).
    std::thread::scope(|s| {
        s.spawn(move || drop(publishers));
        drop(subscribers);
    });
    outcome
}

/// The medians of `setup`'s successful runs.
fn figures_of(setup: Setup, runs: &[Run]) -> Figures {
    let done: Vec<&fanout::Outcome> =
        runs.iter().filter(|r| r.setup == setup).filter_map(|r| r.outcome.as_ref()).collect();
    let deliveries_per_sec: Vec<f64> = done.iter().map(|o| o.deliveries_per_sec).collect();
    let p50_ms: Vec<f64> = done.iter().map(|o| o.latency.p50_ms).collect();
    let p99_ms: Vec<f64> = done.iter().map(|o| o.latency.p99_ms).collect();
    Figures {
        setup,
        runs: done.len(),
        median_deliveries_per_sec: median(&deliveries_per_sec),
        median_p50_ms: median(&p50_ms),
        median_p99_ms: median(&p99_ms),
        deliveries_per_sec,
        p50_ms,
        p99_ms,
        lost: done.iter().map(|o| o.lost).sum(),
        duplicated: done.iter().map(|o| o.duplicated).sum(),
    }
}

/// `a` against `b`: the ratios of their medians (none if either is missing).
fn ratio(figures: &[Figures], a: Setup, b: Setup) -> Option<Ratio> {
    let find = |s: Setup| figures.iter().find(|f| f.setup == s && f.runs > 0);
    let (fa, fb) = (find(a)?, find(b)?);
    let over = |x: f64, y: f64| if y > 0.0 { x / y } else { f64::NAN };
    Some(Ratio {
        of: format!("{a:?}/{b:?}").to_lowercase(),
        deliveries_per_sec: over(fa.median_deliveries_per_sec, fb.median_deliveries_per_sec),
        p50: over(fa.median_p50_ms, fb.median_p50_ms),
        p99: over(fa.median_p99_ms, fb.median_p99_ms),
    })
}

/// The median (the mean of the middle two for an even count); 0 for none.
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// The medians and ratios as a markdown table on stderr.
fn print_table(figures: &[Figures], ratios: &[Ratio]) {
    eprintln!("\n| setup | runs | deliveries/s (median) | p50 ms | p99 ms | lost |");
    eprintln!("|---|---|---|---|---|---|");
    for f in figures {
        eprintln!(
            "| {:?} | {} | {:.0} | {:.2} | {:.2} | {} |",
            f.setup, f.runs, f.median_deliveries_per_sec, f.median_p50_ms, f.median_p99_ms, f.lost
        );
    }
    for r in ratios {
        eprintln!(
            "{}: deliveries/s x{:.2}, p50 x{:.2}, p99 x{:.2}",
            r.of, r.deliveries_per_sec, r.p50, r.p99
        );
    }
}

/// Installs Debian's redis-server with apt-get when `program` is the default and missing.
fn ensure_redis(program: &str) -> anyhow::Result<()> {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v '{program}'")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if found {
        return Ok(());
    }
    ensure!(program == "redis-server", "{program} not found");
    eprintln!("[redis-cross] redis-server missing: installing it with apt-get");
    let script = "S=; [ \"$(id -u)\" = 0 ] || S='sudo -n'; $S apt-get update -qq && \
        DEBIAN_FRONTEND=noninteractive $S apt-get install -y -qq --no-install-recommends redis-server";
    let status = Command::new("sh").args(["-c", script]).status()?;
    ensure!(status.success(), "could not install redis-server with apt-get ({status})");
    Ok(())
}

/// `redis-server --version`, for the report.
fn version(program: &str) -> String {
    Command::new(program)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

impl RedisServer {
    /// Starts `program` on a free loopback port and waits until it answers PING.
    async fn start(program: &str) -> anyhow::Result<Self> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let dir = std::env::temp_dir().join(format!("sc-bench-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let child = Command::new(program)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--protected-mode", "no", "--loglevel", "warning"])
            .arg("--dir")
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {program}"))?;
        let mut server = Self { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !server.answers().await {
            if let Some(status) = server.child.try_wait()? {
                bail!("{program} exited at its start ({status})");
            }
            ensure!(Instant::now() < deadline, "{program} did not answer PING within 10 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(server)
    }

    /// Whether it answers `PING` with `+PONG`.
    async fn answers(&self) -> bool {
        let ping = async {
            let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await?;
            stream.write_all(b"*1\r\n$4\r\nPING\r\n").await?;
            let mut reply = [0u8; 7];
            stream.read_exact(&mut reply).await?;
            Ok::<_, std::io::Error>(&reply == b"+PONG\r\n")
        };
        matches!(tokio::time::timeout(Duration::from_secs(1), ping).await, Ok(Ok(true)))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_ratios() {
        assert_eq!(median(&[]), 0.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        let figures = |setup, dps, p50, p99| Figures {
            setup,
            runs: 1,
            deliveries_per_sec: vec![dps],
            p50_ms: vec![p50],
            p99_ms: vec![p99],
            median_deliveries_per_sec: dps,
            median_p50_ms: p50,
            median_p99_ms: p99,
            lost: 0,
            duplicated: 0,
        };
        let all = [figures(Setup::Redis, 1000.0, 2.0, 10.0), figures(Setup::Cross, 500.0, 3.0, 30.0)];
        let r = ratio(&all, Setup::Cross, Setup::Redis).unwrap_or_else(|| panic!("both setups ran"));
        assert_eq!((r.of.as_str(), r.deliveries_per_sec, r.p50, r.p99), ("cross/redis", 0.5, 1.5, 3.0));
        assert!(ratio(&all, Setup::Cross, Setup::Memory).is_none());
    }
}
