//! A cluster of the real binaries, started by sc-bench itself (for `soak` and `redis-cross`):
//! sc-master in supervise mode, found beside this sc-bench or in `--bin-dir`, with its gRPC
//! port, admin API and balancer on free loopback ports, its layout and backend given as
//! environment variables (`SC_CLUSTER__WORKERS`...). Stopped (SIGTERM, then SIGKILL) when
//! dropped.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// A running sc-master and its cluster.
#[derive(Debug)]
pub(crate) struct Cluster {
    pub(crate) master: Child,
    /// The balancer's WebSocket URL (from the master's `cluster ready` line).
    pub(crate) url: String,
    /// The master's gRPC URL (`http://127.0.0.1:<port>`).
    pub(crate) grpc: String,
    /// The cluster secret (for the master's and the brokers' gRPC).
    pub(crate) secret: String,
}

/// `given`, or else the folder of this sc-bench binary (where cargo puts sc-master too).
pub(crate) fn bin_dir(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    match given {
        Some(dir) => Ok(dir.to_path_buf()),
        None => Ok(std::env::current_exe()?.parent().context("sc-bench has no folder")?.to_path_buf()),
    }
}

impl Cluster {
    /// Starts sc-master from `bin_dir` with `env` on top of the free ports (`name` goes into
    /// the secret, for the logs) and waits for "cluster ready".
    pub(crate) async fn start(bin_dir: &Path, name: &str, env: &[(&str, String)]) -> anyhow::Result<Self> {
        // The master's gRPC port is chosen here, so that callers can ask it for the membership.
        let grpc_port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let secret = format!("{name}-{}-{}", std::process::id(), crate::common::now_us());
        let master_bin = bin_dir.join("sc-master");
        let mut master = Command::new(&master_bin)
            .env("SC_CLUSTER__SECRET", &secret)
            .env("SC_MASTER__LISTEN", format!("127.0.0.1:{grpc_port}"))
            .env("SC_MASTER__ADMIN_LISTEN", "127.0.0.1:0")
            .env("SC_BALANCER__LISTEN", "127.0.0.1:0")
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", master_bin.display()))?;
        let stdout = master.stdout.take().context("no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        // Reads the master's stdout for good, so it never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.split("cluster ready: ").nth(1) {
                    let _ = tx.send(url.trim().to_owned());
                }
            }
        });
        let mut cluster =
            Self { master, url: String::new(), grpc: format!("http://127.0.0.1:{grpc_port}"), secret };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(url) = rx.try_recv() {
                cluster.url = url;
                return Ok(cluster);
            }
            if let Some(status) = cluster.master.try_wait()? {
                bail!("sc-master exited before the cluster was ready ({status})");
            }
            if Instant::now() > deadline {
                bail!("no \"cluster ready\" from sc-master within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The master's pid: the root of the cluster's process tree.
    pub(crate) fn pid(&self) -> u32 {
        self.master.id()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.master.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.master.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.master.kill();
        let _ = self.master.wait();
    }
}
