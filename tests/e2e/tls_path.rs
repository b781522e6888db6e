//! The TLS data path from the real binaries, through sc-client's `wss://`, both ways it can go:
//! handed off (the default, `[balancer] tls_handoff`: the balancer does the handshake and
//! passes the socket with the session's keys; the worker writes the records,
//! crates/sc-worker/src/tls.rs) and proxied (`tls_handoff = false`: the balancer terminates TLS
//! and coalesces what the worker writes into records, crates/sc-balancer/src/forward.rs).
//! Either way every message must arrive whole and in order, whether it is one of a paced
//! trickle, of a burst, or larger than a TLS record.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use sc_client::{ClientConfig, Event, Events};
use sc_tests::{ADMIN_TOKEN, Cluster, TestCa, http_text};
use serde_json::{Value, json};

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// The next publish on `channel`, within `within`.
async fn next_publish(events: &mut Events, channel: &str, within: Duration) -> Result<Value> {
    tokio::time::timeout(within, async {
        while let Some(event) = events.recv().await {
            if let Event::Publish { channel: c, data } = event
                && c == channel
            {
                return Ok(serde_json::from_str(data.get())?);
            }
        }
        bail!("connection closed")
    })
    .await
    .with_context(|| format!("no publish on {channel} within {within:?}"))?
}

/// The sum of `sc_connections_open` samples of the cluster with `role` and transport tls.
async fn tls_open(cluster: &Cluster, role: &str) -> Result<f64> {
    let (status, text) = http_text(&cluster.admin.to_string(), "/metrics", Some(ADMIN_TOKEN)).await?;
    if status != 200 {
        bail!("master /metrics answered {status}: {text}");
    }
    let labels = [format!("role=\"{role}\""), "transport=\"tls\"".to_owned()];
    Ok(text
        .lines()
        .filter(|line| {
            line.starts_with("sc_connections_open{") && labels.iter().all(|l| line.contains(l.as_str()))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

#[tokio::test]
async fn wss_handed_off_delivers_trickles_bursts_and_large_messages_whole_and_in_order() -> Result<()> {
    wss_path(true).await
}

#[tokio::test]
async fn wss_proxied_delivers_trickles_bursts_and_large_messages_whole_and_in_order() -> Result<()> {
    wss_path(false).await
}

async fn wss_path(handoff: bool) -> Result<()> {
    let ca = TestCa::new("tls path")?;
    let cluster = Cluster::start(&[
        ("SC_CLUSTER__WORKERS", "1"),
        ("SC_BALANCER__TLS_CERT", ca.cert.to_str().unwrap()),
        ("SC_BALANCER__TLS_KEY", ca.key.to_str().unwrap()),
        ("SC_BALANCER__TLS_HANDOFF", if handoff { "true" } else { "false" }),
    ])
    .await?;
    assert!(cluster.url.starts_with("wss://"), "{}", cluster.url);
    let config = |last: u8| -> Result<ClientConfig> {
        let mut config =
            ClientConfig::new(cluster.url.clone()).with_ca_file(&ca.dir.path().join("ca.pem"))?;
        config.local_addr = Some(ip(last));
        config.event_buffer = 4096;
        Ok(config)
    };
    let (subscriber, mut events) = sc_client::connect(config(2)?).await?;
    let (publisher, _publisher_events) = sc_client::connect(config(3)?).await?;
    subscriber.subscribe("tls").await?;
    // Both sockets are the worker's (as TLS); the balancer holds them only when it proxies.
    let mut open = (0.0, 0.0);
    for _ in 0..50 {
        open = (tls_open(&cluster, "worker").await?, tls_open(&cluster, "balancer").await?);
        if open == (2.0, if handoff { 0.0 } else { 2.0 }) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(open, (2.0, if handoff { 0.0 } else { 2.0 }), "tls connections open on (worker, balancer)");

    // A trickle: each message alone in its read from the worker.
    for i in 0..20 {
        publisher.publish("tls", json!({ "trickle": i })).await?;
        assert_eq!(next_publish(&mut events, "tls", Duration::from_secs(10)).await?, json!({ "trickle": i }));
    }
    // A burst: many frames per read from the worker, several records per write.
    for i in 0..2000 {
        publisher.transmit_publish("tls", json!({ "burst": i })).await?;
    }
    for i in 0..2000 {
        assert_eq!(next_publish(&mut events, "tls", Duration::from_secs(20)).await?, json!({ "burst": i }));
    }
    // Larger than a TLS record (16 KiB of plaintext) and than one read buffer.
    let big = "x".repeat(100_000);
    publisher.publish("tls", json!({ "big": big })).await?;
    assert_eq!(next_publish(&mut events, "tls", Duration::from_secs(10)).await?, json!({ "big": big }));
    Ok(())
}

#[tokio::test]
async fn sc_client_refuses_wss_without_a_tls_configuration() {
    let outcome = sc_client::connect(ClientConfig::new("wss://127.0.0.1:1/socketcluster/")).await;
    assert!(matches!(outcome, Err(sc_client::Error::UnsupportedScheme(_))), "{outcome:?}");
}
