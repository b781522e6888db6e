//! `connect`: handshakes per second. `--connections` connections, `--concurrency` at a time;
//! each one is TCP connect, WebSocket upgrade and `#handshake` (the time recorded), then a
//! close. `wss://` URLs (with `--ca`) measure the TLS handshake too.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use clap::Args;
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::common::{Counters, Progress, Target};
use crate::procs;
use crate::stats::{Sharded, Summary, summarize};

#[derive(Debug, Clone, Args, Serialize)]
pub(crate) struct Params {
    #[arg(long, default_value_t = 5000)]
    pub(crate) connections: usize,
}

#[derive(Debug, Serialize)]
pub(crate) struct Outcome {
    pub(crate) connections: usize,
    pub(crate) ok: u64,
    pub(crate) errors: u64,
    pub(crate) first_error: Option<String>,
    pub(crate) seconds: f64,
    pub(crate) handshakes_per_sec: f64,
    pub(crate) latency: Summary,
    pub(crate) server_cpu_sec: f64,
    pub(crate) server_cpu_us_per_handshake: f64,
}

pub(crate) async fn run(target: &Target, p: &Params, quiet: bool) -> anyhow::Result<Outcome> {
    let counters = Arc::new(Counters::default());
    let _progress = Progress::start("connect", Arc::clone(&counters), quiet);
    let gate = Arc::new(Semaphore::new(target.concurrency.max(1)));
    let before = procs::sample(target.pid);
    let start = Instant::now();
    let latency = Arc::new(Sharded::new());
    let first_error = Arc::new(Mutex::new(None::<String>));
    let mut set = JoinSet::new();
    for index in 0..p.connections {
        let config = target.client_config(index);
        let permit = Arc::clone(&gate).acquire_owned().await?;
        let (counters, latency, first_error) =
            (Arc::clone(&counters), Arc::clone(&latency), Arc::clone(&first_error));
        set.spawn(async move {
            let t0 = Instant::now();
            let result = sc_client::connect(config).await;
            // The close is not part of the rate: release the permit first.
            drop(permit);
            counters.sent.fetch_add(1, Ordering::Relaxed);
            match result {
                Ok((client, _events)) => {
                    latency.record_all(index, &[t0.elapsed().as_micros() as u64]);
                    counters.received.fetch_add(1, Ordering::Relaxed);
                    counters.connected.fetch_add(1, Ordering::Relaxed);
                    drop(client);
                }
                Err(e) => {
                    counters.errors.fetch_add(1, Ordering::Relaxed);
                    first_error
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .get_or_insert_with(|| e.to_string());
                }
            }
        });
        // Reap finished tasks as we go, so the set stays small.
        while set.try_join_next().is_some() {}
    }
    while set.join_next().await.is_some() {}
    let first_error = first_error.lock().unwrap_or_else(PoisonError::into_inner).take();
    let h = latency.merged();
    let seconds = start.elapsed().as_secs_f64();
    let after = procs::sample(target.pid);
    let ok = counters.received.load(Ordering::Relaxed);
    let server_cpu_sec = after.cpu_sec - before.cpu_sec;
    Ok(Outcome {
        connections: p.connections,
        ok,
        errors: counters.errors.load(Ordering::Relaxed),
        first_error,
        seconds,
        handshakes_per_sec: ok as f64 / seconds,
        latency: summarize(&h),
        server_cpu_sec,
        server_cpu_us_per_handshake: if ok > 0 { server_cpu_sec * 1e6 / ok as f64 } else { 0.0 },
    })
}
