//! `fanout`: N subscribers on one channel, one publisher (a separate connection) sending M
//! messages at a fixed rate or as fast as the deliveries allow.
//!
//! Burst mode is closed-loop: the publisher stays at most `window` messages ahead of the
//! average subscriber, so the measure is the delivery rate the server sustains, not how deep
//! its queues are (a flood would only measure slow-consumer handling). `--window 0` floods.
//! `--publisher-url` puts the publisher on another server than the subscribers (another
//! cluster on the same Redis).
//! Paced mode stamps each message with its scheduled send time, so a publisher that falls
//! behind shows up as latency rather than hiding it (no coordinated omission).

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
    /// Subscribers on the channel.
    #[arg(long, default_value_t = 1000)]
    pub(crate) subscribers: usize,
    /// Messages the publisher sends.
    #[arg(long, default_value_t = 2000)]
    pub(crate) messages: u64,
    /// Publishes per second; 0 = as fast as the deliveries allow (see --window).
    #[arg(long, default_value_t = 0.0)]
    pub(crate) rate: f64,
    /// Burst mode: how many messages the publisher may run ahead of the average subscriber;
    /// 0 floods without limit.
    #[arg(long, default_value_t = 64)]
    pub(crate) window: u64,
    /// Payload size in bytes (JSON with a timestamp and padding).
    #[arg(long, default_value_t = 64)]
    pub(crate) payload: usize,
    /// The channel name.
    #[arg(long, default_value = "bench")]
    pub(crate) channel: String,
    /// Give up waiting for deliveries after this many seconds without one.
    #[arg(long, default_value_t = 5.0)]
    pub(crate) stall: f64,
    /// Hard bound on the publish-and-deliver phase, in seconds.
    #[arg(long, default_value_t = 120.0)]
    pub(crate) timeout: f64,
    /// Connect the publisher to this URL instead of --url: another server that reaches the
    /// same subscribers (another cluster on the same Redis, see `redis-cross`).
    #[arg(long)]
    pub(crate) publisher_url: Option<String>,
    /// Pause between the last subscription and the first publish, in milliseconds (a
    /// subscription crossing clusters is in place a round trip to Redis after its answer).
    #[arg(long, default_value_t = 200)]
    pub(crate) settle_ms: u64,
}

#[derive(Debug, Serialize)]
pub(crate) struct Outcome {
    pub(crate) connect_seconds: f64,
    pub(crate) sent: u64,
    pub(crate) expected: u64,
    pub(crate) delivered: u64,
    pub(crate) lost: u64,
    pub(crate) duplicated: u64,
    pub(crate) errors: u64,
    pub(crate) closes: std::collections::BTreeMap<String, u64>,
    pub(crate) publish_seconds: f64,
    /// First publish to last delivery.
    pub(crate) seconds: f64,
    pub(crate) deliveries_per_sec: f64,
    pub(crate) latency: Summary,
    pub(crate) server_cpu_sec: f64,
    /// Server CPU seconds by program name (sc-worker, sc-balancer, sc-broker, node).
    pub(crate) server_cpu_by_program: std::collections::BTreeMap<String, f64>,
    pub(crate) server_cpu_us_per_delivery: f64,
    pub(crate) server_rss_kb_before: u64,
    pub(crate) server_rss_kb_after: u64,
    pub(crate) server_processes: usize,
    pub(crate) client_cpu_sec: f64,
}

/// Runs the scenario against `target` (the subscribers' server, whose process tree is sampled).
pub(crate) async fn run(target: &Target, p: &Params, quiet: bool) -> anyhow::Result<Outcome> {
    let counters = Arc::new(Counters::default());
    let _progress = Progress::start("fanout", Arc::clone(&counters), quiet);
    let sink = Sink::new(Arc::clone(&counters));

    let t_connect = Instant::now();
    let clients = target.connect_many(p.subscribers, &counters).await?;
    let mut subscribes = JoinSet::new();
    let mut handles = Vec::with_capacity(clients.len());
    let mut consumers = JoinSet::new();
    for (index, (client, events)) in clients.into_iter().enumerate() {
        consumers.spawn(Arc::clone(&sink).consume(events, index));
        let (c, channel) = (client.clone(), p.channel.clone());
        subscribes.spawn(async move { c.subscribe(&channel).await });
        handles.push(client);
        // Keep the subscribe burst within the handshake concurrency.
        if subscribes.len() >= target.concurrency {
            subscribes.join_next().await.context("subscribe task")??.context("subscribe")?;
        }
    }
    while let Some(done) = subscribes.join_next().await {
        done?.context("subscribe")?;
    }
    let connect_seconds = t_connect.elapsed().as_secs_f64();
    let mut publisher_config = target.client_config(p.subscribers);
    publisher_config.ack_timeout = Duration::from_secs(30);
    if let Some(url) = &p.publisher_url {
        publisher_config.url = url.clone();
    }
    let (publisher, _publisher_events) = sc_client::connect(publisher_config).await.context("publisher")?;
    tokio::time::sleep(Duration::from_millis(p.settle_ms)).await;

    let n = p.subscribers as u64;
    let pad = padding(p.payload);
    let before = procs::sample(target.pid);
    let by_program0 = procs::cpu_by_program(target.pid);
    let client_cpu0 = procs::self_cpu_sec();
    let start = Instant::now();
    let start_us = now_us();
    let deadline = start + Duration::from_secs_f64(p.timeout);
    let mut sent = 0u64;
    if p.rate > 0.0 {
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        while sent < p.messages && Instant::now() < deadline {
            tick.tick().await;
            let due = ((start.elapsed().as_secs_f64() * p.rate) as u64 + 1).min(p.messages);
            while sent < due {
                let scheduled = start_us + (sent as f64 * 1e6 / p.rate) as u64;
                let data = RawValue::from_string(payload(scheduled, sent, &pad))?;
                publisher.transmit_publish(&p.channel, &data).await?;
                sent += 1;
                counters.sent.store(sent, Ordering::Relaxed);
            }
        }
    } else {
        while sent < p.messages && Instant::now() < deadline {
            if p.window > 0 && n > 0 {
                let delivered = counters.received.load(Ordering::Relaxed) / n;
                if sent >= delivered + p.window {
                    let _ = tokio::time::timeout(Duration::from_millis(5), sink.progress.notified()).await;
                    continue;
                }
            }
            let data = RawValue::from_string(payload(now_us(), sent, &pad))?;
            publisher.transmit_publish(&p.channel, &data).await?;
            sent += 1;
            counters.sent.store(sent, Ordering::Relaxed);
        }
    }
    let publish_seconds = start.elapsed().as_secs_f64();

    let mut last = (counters.received.load(Ordering::Relaxed), Instant::now());
    while last.0 < n * sent && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let now = counters.received.load(Ordering::Relaxed);
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed().as_secs_f64() > p.stall {
            break;
        }
    }
    let after = procs::sample(target.pid);
    let server_cpu_by_program = procs::cpu_delta(&by_program0, &procs::cpu_by_program(target.pid));
    let client_cpu_sec = procs::self_cpu_sec() - client_cpu0;

    sink.stopping.store(true, Ordering::Relaxed);
    drop(handles);
    drop(publisher);
    let mut lost = 0;
    let mut duplicated = 0;
    let mut delivered = 0;
    let per = sent;
    let expected = n * sent;
    let collect = async {
        while let Some(joined) = consumers.join_next().await {
            let got = joined.unwrap_or(0);
            delivered += got;
            lost += per.saturating_sub(got);
            duplicated += got.saturating_sub(per);
        }
    };
    if tokio::time::timeout(Duration::from_secs(10), collect).await.is_err() {
        // Clients that do not close in time still count: take the counter instead.
        delivered = counters.received.load(Ordering::Relaxed);
        lost = expected.saturating_sub(delivered);
    }
    let seconds = (sink.last_delivery_us.load(Ordering::Relaxed).saturating_sub(start_us)) as f64 / 1e6;
    let server_cpu_sec = after.cpu_sec - before.cpu_sec;
    Ok(Outcome {
        connect_seconds,
        sent,
        expected,
        delivered,
        lost,
        duplicated,
        errors: counters.errors.load(Ordering::Relaxed),
        closes: sink.closes(),
        publish_seconds,
        seconds,
        deliveries_per_sec: if seconds > 0.0 { delivered as f64 / seconds } else { 0.0 },
        latency: summarize(&sink.latency.merged()),
        server_cpu_sec,
        server_cpu_by_program,
        server_cpu_us_per_delivery: if delivered > 0 { server_cpu_sec * 1e6 / delivered as f64 } else { 0.0 },
        server_rss_kb_before: before.rss_kb,
        server_rss_kb_after: after.rss_kb,
        server_processes: after.processes,
        client_cpu_sec,
    })
}
