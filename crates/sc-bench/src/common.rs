//! What every scenario shares: the target (URL, protocol, source addresses), connecting many
//! clients with bounded concurrency, timestamped payloads and the live progress line.

use std::io::{IsTerminal, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::Args;
use sc_client::{Client, ClientConfig, Events, ProtocolVersion};
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// Where to connect and how; shared by every scenario.
#[derive(Debug, Clone, Args, Serialize)]
pub(crate) struct Target {
    /// WebSocket URL of the server (ws://, or wss:// with --ca).
    #[arg(long, default_value = "ws://127.0.0.1:8000/socketcluster/")]
    pub(crate) url: String,
    /// Wire protocol: 1 (socketcluster v14 line) or 2 (v17-v20).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=2))]
    pub(crate) protocol: u8,
    /// Spread clients over this many loopback source addresses (127.0.0.1, .2, ...): the sc-rs
    /// balancer hashes by client IP, so this spreads them over workers.
    #[arg(long, default_value_t = 1)]
    pub(crate) source_ips: u8,
    /// Root pid of the server under test; its whole process tree is sampled for RSS and CPU.
    #[arg(long)]
    pub(crate) pid: Option<u32>,
    /// Handshakes in flight while connecting many clients.
    #[arg(long, default_value_t = 100)]
    pub(crate) concurrency: usize,
    /// A name for the server in the JSON (e.g. "sc-rs 1w1b" or "sc20").
    #[arg(long, default_value = "server")]
    pub(crate) label: String,
    /// PEM file of the CA that signed the server's certificate, for wss:// URLs.
    #[arg(long)]
    pub(crate) ca: Option<std::path::PathBuf>,
    /// The TLS configuration read from `ca`, once for all clients.
    #[arg(skip)]
    #[serde(skip)]
    pub(crate) tls: std::sync::OnceLock<Option<Arc<rustls::ClientConfig>>>,
}

/// Counters the progress line shows; scenarios bump them from any task.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) sent: AtomicU64,
    pub(crate) received: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) connected: AtomicU64,
}

/// Prints the progress line every half second until dropped.
#[derive(Debug)]
pub(crate) struct Progress {
    stop: Arc<AtomicBool>,
    task: Option<std::thread::JoinHandle<()>>,
}

impl Target {
    /// The client configuration for the `index`-th client.
    pub(crate) fn client_config(&self, index: usize) -> ClientConfig {
        let protocol = if self.protocol == 1 { ProtocolVersion::V1 } else { ProtocolVersion::V2 };
        let mut config = ClientConfig::new(self.url.clone()).with_protocol(protocol);
        if self.source_ips > 1 {
            let host = (index % usize::from(self.source_ips)) as u8 + 1;
            config.local_addr = Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, host)));
        }
        config.event_buffer = 4096;
        config.tls = self.tls.get().cloned().flatten();
        config
    }

    /// Reads the CA file (if any) for `wss://` URLs; call once before [`Target::client_config`].
    pub(crate) fn load_tls(&self) -> anyhow::Result<()> {
        let tls = match &self.ca {
            Some(ca) => ClientConfig::new(self.url.clone()).with_ca_file(ca)?.tls,
            None => None,
        };
        anyhow::ensure!(
            tls.is_some() || !self.url.starts_with("wss://"),
            "a wss:// url needs --ca (the PEM file of the CA that signed the server's certificate)"
        );
        let _ = self.tls.set(tls);
        Ok(())
    }

    /// Connects `n` clients, `concurrency` handshakes at a time; returns them in index order.
    /// Fails on the first connection that fails: a bench with missing clients measures
    /// something else.
    pub(crate) async fn connect_many(
        &self,
        n: usize,
        counters: &Counters,
    ) -> anyhow::Result<Vec<(Client, Events)>> {
        let gate = Arc::new(Semaphore::new(self.concurrency.max(1)));
        let mut set = JoinSet::new();
        for index in 0..n {
            let config = self.client_config(index);
            let permit = Arc::clone(&gate).acquire_owned().await?;
            set.spawn(async move {
                let result = sc_client::connect(config).await;
                drop(permit);
                (index, result)
            });
        }
        let mut slots: Vec<Option<(Client, Events)>> = (0..n).map(|_| None).collect();
        while let Some(joined) = set.join_next().await {
            let (index, result) = joined?;
            let pair = result.with_context(|| format!("client {index} failed to connect"))?;
            counters.connected.fetch_add(1, Ordering::Relaxed);
            slots[index] = Some(pair);
        }
        Ok(slots.into_iter().flatten().collect())
    }
}

/// Microseconds since the Unix epoch; publisher and subscribers share this host's clock.
pub(crate) fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// A payload of about `size` bytes of JSON: `{"t":<us>,"s":<seq>,"p":"xxx"}`.
pub(crate) fn payload(t_us: u64, seq: u64, pad: &str) -> String {
    format!("{{\"t\":{t_us},\"s\":{seq},\"p\":\"{pad}\"}}")
}

/// Padding that brings [`payload`] to about `size` bytes.
pub(crate) fn padding(size: usize) -> String {
    "x".repeat(size.saturating_sub(40))
}

/// The send timestamp of a [`payload`], found without parsing the JSON.
pub(crate) fn timestamp_of(json: &str) -> Option<u64> {
    let start = json.find("\"t\":")? + 4;
    let digits = json[start..].bytes().take_while(u8::is_ascii_digit).count();
    json[start..start + digits].parse().ok()
}

/// `uptime`'s load averages, recorded with every result since the machine is shared.
pub(crate) fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

impl Progress {
    /// Starts printing `scenario` progress to stderr (a carriage-return line on a terminal, a
    /// line every 5 s otherwise); `quiet` prints nothing.
    pub(crate) fn start(scenario: &'static str, counters: Arc<Counters>, quiet: bool) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        if quiet {
            return Self { stop, task: None };
        }
        let flag = Arc::clone(&stop);
        let task = std::thread::spawn(move || {
            let tty = std::io::stderr().is_terminal();
            let every = if tty { Duration::from_millis(500) } else { Duration::from_secs(5) };
            let start = Instant::now();
            let mut last = (Instant::now(), 0u64);
            while !flag.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                if last.0.elapsed() < every {
                    continue;
                }
                let received = counters.received.load(Ordering::Relaxed);
                let rate = (received - last.1) as f64 / last.0.elapsed().as_secs_f64();
                last = (Instant::now(), received);
                let line = format!(
                    "[{scenario}] {:6.1}s connected {} sent {} received {} ({:.0}/s) errors {}",
                    start.elapsed().as_secs_f64(),
                    counters.connected.load(Ordering::Relaxed),
                    counters.sent.load(Ordering::Relaxed),
                    received,
                    rate,
                    counters.errors.load(Ordering::Relaxed),
                );
                let mut err = std::io::stderr().lock();
                let _ = if tty { write!(err, "\r{line}\x1b[K") } else { writeln!(err, "{line}") };
            }
            if tty {
                let _ = writeln!(std::io::stderr());
            }
        });
        Self { stop, task: Some(task) }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(task) = self.task.take() {
            let _ = task.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_round_trips_timestamp_and_sequence() {
        let p = payload(1_700_000_000_123_456, 42, &padding(64));
        assert_eq!(timestamp_of(&p), Some(1_700_000_000_123_456));
        assert!((60..=70).contains(&p.len()), "{} bytes", p.len());
        assert!(serde_json::from_str::<serde_json::Value>(&p).is_ok());
    }

    #[test]
    fn source_addresses_rotate() {
        let target = Target {
            url: "ws://127.0.0.1:1/".into(),
            protocol: 2,
            source_ips: 3,
            pid: None,
            concurrency: 1,
            label: String::new(),
            ca: None,
            tls: Default::default(),
        };
        let addrs: Vec<_> = (0..4).map(|i| target.client_config(i).local_addr).collect();
        assert_eq!(addrs[0], addrs[3]);
        assert_ne!(addrs[0], addrs[1]);
    }
}
