//! `rpc`: invoke round trips. Each of N clients keeps `--inflight` `echo` invokes outstanding
//! for `--duration` seconds; every round trip's time goes into the histogram. The server needs
//! an `echo` procedure (peers/servers/sc20.js; for sc-rs the examples/chat worker).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use serde_json::value::RawValue;
use tokio::task::JoinSet;

use crate::common::{Counters, Progress, Target, padding, payload};
use crate::procs;
use crate::stats::{Summary, histogram, record, summarize};

#[derive(Debug, Clone, Args, Serialize)]
pub(crate) struct Params {
    #[arg(long, default_value_t = 50)]
    pub(crate) clients: usize,
    /// Invokes outstanding per client.
    #[arg(long, default_value_t = 1)]
    pub(crate) inflight: usize,
    /// Seconds of invoking.
    #[arg(long, default_value_t = 10.0)]
    pub(crate) duration: f64,
    /// The procedure to call; it must answer with its data.
    #[arg(long, default_value = "echo")]
    pub(crate) procedure: String,
    #[arg(long, default_value_t = 64)]
    pub(crate) payload: usize,
}

#[derive(Debug, Serialize)]
pub(crate) struct Outcome {
    pub(crate) calls: u64,
    pub(crate) errors: u64,
    pub(crate) first_error: Option<String>,
    pub(crate) seconds: f64,
    pub(crate) calls_per_sec: f64,
    pub(crate) latency: Summary,
    pub(crate) server_cpu_sec: f64,
    pub(crate) server_cpu_us_per_call: f64,
    pub(crate) client_cpu_sec: f64,
}

pub(crate) async fn run(target: &Target, p: &Params, quiet: bool) -> anyhow::Result<Outcome> {
    let counters = Arc::new(Counters::default());
    let _progress = Progress::start("rpc", Arc::clone(&counters), quiet);
    let clients = target.connect_many(p.clients, &counters).await?;
    let pad = Arc::new(padding(p.payload));
    let before = procs::sample(target.pid);
    let client_cpu0 = procs::self_cpu_sec();
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(p.duration);
    let mut loops = JoinSet::new();
    for (client, _events) in &clients {
        for _ in 0..p.inflight.max(1) {
            let (client, counters, pad, procedure) =
                (client.clone(), Arc::clone(&counters), Arc::clone(&pad), p.procedure.clone());
            loops.spawn(async move {
                let mut h = histogram();
                let mut first_error = None;
                let mut seq = 0u64;
                while Instant::now() < end {
                    let data = RawValue::from_string(payload(crate::common::now_us(), seq, &pad))?;
                    seq += 1;
                    counters.sent.fetch_add(1, Ordering::Relaxed);
                    let t0 = Instant::now();
                    match client.invoke_raw(&procedure, &data).await {
                        Ok(_) => {
                            record(&mut h, t0.elapsed().as_micros() as u64);
                            counters.received.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            counters.errors.fetch_add(1, Ordering::Relaxed);
                            first_error.get_or_insert_with(|| e.to_string());
                            if client.close_info().is_some() {
                                break;
                            }
                        }
                    }
                }
                anyhow::Ok((h, first_error))
            });
        }
    }
    let mut all = histogram();
    let mut first_error = None;
    while let Some(joined) = loops.join_next().await {
        let (h, error) = joined??;
        let _ = all.add(&h);
        if first_error.is_none() {
            first_error = error;
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let after = procs::sample(target.pid);
    let calls = all.len();
    let server_cpu_sec = after.cpu_sec - before.cpu_sec;
    Ok(Outcome {
        calls,
        errors: counters.errors.load(Ordering::Relaxed),
        first_error,
        seconds,
        calls_per_sec: calls as f64 / seconds,
        latency: summarize(&all),
        server_cpu_sec,
        server_cpu_us_per_call: if calls > 0 { server_cpu_sec * 1e6 / calls as f64 } else { 0.0 },
        client_cpu_sec: procs::self_cpu_sec() - client_cpu0,
    })
}
