//! `channels`: N sockets, each subscribed to a channel of its own and to one shared channel.
//! Each socket publishes to its own channel (`--rate` publishes per second over all sockets,
//! round robin), and a separate publisher sends `--shared-rate` messages per second to the
//! shared channel, which every socket receives. Models a chat or dashboard where most traffic
//! is narrow and some is broadcast; it exercises many channels across the brokers.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde::Serialize;
use serde_json::value::RawValue;
use tokio::task::JoinSet;

use crate::common::{Counters, Progress, Target, now_us, padding, payload};
use crate::procs;
use crate::sink::Sink;
use crate::stats::{Summary, summarize};

#[derive(Debug, Clone, Args, Serialize)]
pub(crate) struct Params {
    /// Sockets, each on its own channel plus the shared one.
    #[arg(long, default_value_t = 1000)]
    pub(crate) sockets: usize,
    /// Publishes per second to the sockets' own channels, over all sockets.
    #[arg(long, default_value_t = 5000.0)]
    pub(crate) rate: f64,
    /// Publishes per second to the shared channel (each reaches every socket).
    #[arg(long, default_value_t = 10.0)]
    pub(crate) shared_rate: f64,
    /// Seconds of publishing.
    #[arg(long, default_value_t = 10.0)]
    pub(crate) duration: f64,
    #[arg(long, default_value_t = 64)]
    pub(crate) payload: usize,
    /// Seconds without a delivery after which the bench stops waiting.
    #[arg(long, default_value_t = 5.0)]
    pub(crate) stall: f64,
}

#[derive(Debug, Serialize)]
pub(crate) struct Outcome {
    pub(crate) connect_seconds: f64,
    pub(crate) own_sent: u64,
    pub(crate) shared_sent: u64,
    pub(crate) expected: u64,
    pub(crate) delivered: u64,
    pub(crate) lost: u64,
    pub(crate) errors: u64,
    pub(crate) closes: std::collections::BTreeMap<String, u64>,
    pub(crate) seconds: f64,
    pub(crate) deliveries_per_sec: f64,
    pub(crate) latency: Summary,
    pub(crate) server_cpu_sec: f64,
    pub(crate) server_cpu_us_per_delivery: f64,
    pub(crate) server_rss_kb_after: u64,
    pub(crate) client_cpu_sec: f64,
}

pub(crate) async fn run(target: &Target, p: &Params, quiet: bool) -> anyhow::Result<Outcome> {
    let counters = Arc::new(Counters::default());
    let _progress = Progress::start("channels", Arc::clone(&counters), quiet);
    let sink = Sink::new(Arc::clone(&counters));
    let t_connect = Instant::now();
    let clients = target.connect_many(p.sockets, &counters).await?;
    let mut handles = Vec::with_capacity(clients.len());
    let mut consumers = JoinSet::new();
    let mut subscribes = JoinSet::new();
    for (index, (client, events)) in clients.into_iter().enumerate() {
        consumers.spawn(Arc::clone(&sink).consume(events, index));
        let c = client.clone();
        subscribes.spawn(async move {
            c.subscribe(&format!("c{index}")).await?;
            c.subscribe("shared").await
        });
        handles.push(client);
        if subscribes.len() >= target.concurrency {
            subscribes.join_next().await.context("subscribe task")??.context("subscribe")?;
        }
    }
    while let Some(done) = subscribes.join_next().await {
        done?.context("subscribe")?;
    }
    let connect_seconds = t_connect.elapsed().as_secs_f64();
    let (shared_publisher, _events) =
        sc_client::connect(target.client_config(p.sockets)).await.context("shared publisher")?;
    let names: Vec<String> = (0..p.sockets).map(|i| format!("c{i}")).collect();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let pad = padding(p.payload);
    let before = procs::sample(target.pid);
    let client_cpu0 = procs::self_cpu_sec();
    let start = Instant::now();
    let start_us = now_us();
    let (mut own, mut shared) = (0u64, 0u64);
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while start.elapsed().as_secs_f64() < p.duration && !handles.is_empty() {
        tick.tick().await;
        let elapsed = start.elapsed().as_secs_f64();
        // Message k is due at k / rate: stamped with that time, sent at the first tick after it.
        let own_due = (elapsed * p.rate) as u64 + 1;
        while own < own_due {
            let i = (own % handles.len() as u64) as usize;
            let scheduled = start_us + (own as f64 * 1e6 / p.rate) as u64;
            let data = RawValue::from_string(payload(scheduled, own, &pad))?;
            handles[i].transmit_publish(&names[i], &data).await?;
            own += 1;
        }
        let shared_due = (elapsed * p.shared_rate) as u64 + 1;
        while shared < shared_due {
            let scheduled = start_us + (shared as f64 * 1e6 / p.shared_rate) as u64;
            let data = RawValue::from_string(payload(scheduled, shared, &pad))?;
            shared_publisher.transmit_publish("shared", &data).await?;
            shared += 1;
        }
        counters.sent.store(own + shared, Ordering::Relaxed);
    }
    let expected = own + shared * p.sockets as u64;
    let mut last = (counters.received.load(Ordering::Relaxed), Instant::now());
    while last.0 < expected {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let now = counters.received.load(Ordering::Relaxed);
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed().as_secs_f64() > p.stall {
            break;
        }
    }
    let after = procs::sample(target.pid);
    let client_cpu_sec = procs::self_cpu_sec() - client_cpu0;
    sink.stopping.store(true, Ordering::Relaxed);
    drop(handles);
    drop(shared_publisher);
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while consumers.join_next().await.is_some() {}
    })
    .await;
    let delivered = counters.received.load(Ordering::Relaxed);
    let seconds = (sink.last_delivery_us.load(Ordering::Relaxed).saturating_sub(start_us)) as f64 / 1e6;
    let server_cpu_sec = after.cpu_sec - before.cpu_sec;
    Ok(Outcome {
        connect_seconds,
        own_sent: own,
        shared_sent: shared,
        expected,
        delivered,
        lost: expected.saturating_sub(delivered),
        errors: counters.errors.load(Ordering::Relaxed),
        closes: sink.closes(),
        seconds,
        deliveries_per_sec: if seconds > 0.0 { delivered as f64 / seconds } else { 0.0 },
        latency: summarize(&sink.latency.merged()),
        server_cpu_sec,
        server_cpu_us_per_delivery: if delivered > 0 { server_cpu_sec * 1e6 / delivered as f64 } else { 0.0 },
        server_rss_kb_after: after.rss_kb,
        client_cpu_sec,
    })
}
