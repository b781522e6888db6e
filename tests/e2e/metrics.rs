//! Metrics and `sc-master status` on a real cluster: a known load (N WebSocket clients over
//! two workers, M acknowledged publishes on one channel), then every `/metrics` endpoint (the
//! master's, for the whole cluster, and each member's own) is scraped during and after it and
//! the counters must have moved by exactly what the load did. The text is also parsed by the
//! Python `prometheus_client` parser (in a venv this test makes under target/; the check is
//! reported SKIPPED when pip cannot install it). A member that does not answer is left out of
//! the master's `/metrics` and counted in `sc_scrape_errors_total`. `sc-master status` prints
//! the members and the rates, as a table and as JSON, and says so when the master is not there
//! or the token is wrong.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use sc_tests::{
    ADMIN_TOKEN, Client, Cluster, Signal, eventually, http_text, signal_pid, source_ip_per_worker,
};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// WebSocket clients, spread over the two workers.
const CLIENTS: usize = 6;
/// Acknowledged publishes, each delivered to every client.
const PUBLISHES: usize = 10;
/// No server pings during the test: every message counted is one the test caused.
const QUIET: [(&str, &str); 2] = [("SC_WORKER__PING_INTERVAL", "120s"), ("SC_WORKER__PING_TIMEOUT", "240s")];

/// One sample of a Prometheus text.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A parsed Prometheus text, for the exact checks (the Python parser checks the format).
#[derive(Debug, Clone)]
struct Scrape {
    text: String,
    samples: Vec<Sample>,
}

impl Scrape {
    fn parse(text: String) -> Result<Self> {
        let mut samples = Vec::new();
        for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
            let (series, value) = line.rsplit_once(' ').context("a sample line has a value")?;
            let value: f64 = value.parse().with_context(|| format!("value of {line:?}"))?;
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.strip_suffix('}').context("closing brace")?),
                None => (series, ""),
            };
            let mut map = BTreeMap::new();
            // Our label values hold no comma or quote.
            for pair in labels.split(',').filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=').context("label pair")?;
                map.insert(k.to_owned(), v.trim_matches('"').to_owned());
            }
            samples.push(Sample { name: name.to_owned(), labels: map, value });
        }
        Ok(Self { text, samples })
    }

    /// The sum of the samples of `name` whose labels include every pair of `with`.
    fn sum(&self, name: &str, with: &[(&str, &str)]) -> f64 {
        self.matching(name, with).map(|s| s.value).sum()
    }

    fn matching<'a>(&'a self, name: &'a str, with: &'a [(&str, &str)]) -> impl Iterator<Item = &'a Sample> {
        self.samples.iter().filter(move |s| {
            s.name == name && with.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// The ids of the processes that reported `name`.
    fn ids(&self, name: &str) -> Vec<String> {
        let mut ids: Vec<String> =
            self.matching(name, &[]).filter_map(|s| s.labels.get("id").cloned()).collect();
        ids.sort();
        ids.dedup();
        ids
    }
}

/// The master's `/metrics` (the whole cluster).
async fn cluster_metrics(cluster: &Cluster) -> Result<Scrape> {
    let (status, text) = http_text(&cluster.admin.to_string(), "/metrics", Some(ADMIN_TOKEN)).await?;
    if status != 200 {
        bail!("master /metrics answered {status}: {text}");
    }
    Scrape::parse(text)
}

/// A member's own `/metrics`, on its gRPC (health) listener.
async fn member_metrics(grpc: &str) -> Result<Scrape> {
    let (status, text) = http_text(grpc, "/metrics", None).await?;
    if status != 200 {
        bail!("{grpc}/metrics answered {status}: {text}");
    }
    Scrape::parse(text)
}

/// The members in `/status`: (role, id, grpc address).
async fn members(cluster: &Cluster) -> Result<Vec<(String, String, String)>> {
    let status = cluster.admin_get("/status").await?;
    Ok(status["members"]
        .as_array()
        .context("members")?
        .iter()
        .map(|m| {
            let field = |k: &str| m[k].as_str().unwrap_or("").to_owned();
            (field("role"), field("id"), field("grpc"))
        })
        .collect())
}

/// Connects `CLIENTS` clients, half from each worker's source address, each subscribed to
/// `channel`.
async fn connect_subscribed(cluster: &Cluster, ips: &[IpAddr], channel: &str) -> Result<Vec<Client>> {
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let mut client = Client::connect(ips[i % ips.len()], cluster.addr, &cluster.url).await?;
        client.subscribe(channel).await?;
        clients.push(client);
    }
    Ok(clients)
}

/// The Python `prometheus_client` parser's view of `text`: `{family: [type, samples]}`; `None`
/// when the parser cannot be installed here (reported SKIPPED).
fn python_parse(text: &str) -> Result<Option<Value>> {
    let Some(python) = venv_python() else { return Ok(None) };
    let script = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    if family.name in out:
        raise SystemExit("family twice: " + family.name)
    out[family.name] = [family.type, len(family.samples)]
print(json.dumps(out))
"#;
    let mut child = std::process::Command::new(python)
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    use std::io::Write;
    child.stdin.take().context("stdin")?.write_all(text.as_bytes())?;
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!("the Python parser refused the text: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(Some(serde_json::from_slice(&output.stdout)?))
}

/// A venv under target/ with `prometheus_client`, made on first use; `None` (reported
/// SKIPPED) when python3, venv or pip cannot provide it.
fn venv_python() -> Option<PathBuf> {
    let target = sc_tests::bin_dir().parent()?.to_path_buf();
    let venv = target.join("metrics-venv");
    let python = venv.join("bin/python");
    let ready = |python: &PathBuf| {
        std::process::Command::new(python)
            .args(["-c", "import prometheus_client"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if ready(&python) {
        return Some(python);
    }
    let made = std::process::Command::new("python3").args(["-m", "venv"]).arg(&venv).output();
    let pip = venv.join("bin/pip");
    let installed = made.is_ok_and(|o| o.status.success())
        && std::process::Command::new(&pip)
            .args(["install", "--quiet", "prometheus_client"])
            .output()
            .is_ok_and(|o| o.status.success());
    if installed && ready(&python) {
        Some(python)
    } else {
        sc_tests::skip("the Python prometheus_client parser could not be installed (python3 -m venv, pip)");
        None
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metrics_endpoint_moves_by_the_load() -> Result<()> {
    let cluster = Cluster::start(&QUIET).await?;
    let ips: Vec<IpAddr> = source_ip_per_worker(cluster.addr, 2).await?.into_values().collect();
    let members = members(&cluster).await?;
    assert_eq!(members.len(), 4, "{members:?}");
    // Like the rest of the admin API: the token, or 401.
    let admin = cluster.admin.to_string();
    assert_eq!(http_text(&admin, "/metrics", None).await?.0, 401);
    assert_eq!(http_text(&admin, "/metrics", Some("wrong")).await?.0, 401);
    // The /healthz probes above are connections too: wait until the balancer has closed them.
    let before = eventually(Duration::from_secs(10), "no connection open", || async {
        let scrape = cluster_metrics(&cluster).await.ok()?;
        (scrape.sum("sc_connections_open", &[]) == 0.0).then_some(scrape)
    })
    .await?;

    let mut clients = connect_subscribed(&cluster, &ips, "metrics-news").await?;
    for n in 0..PUBLISHES {
        clients[0].publish("metrics-news", json!({ "n": n })).await?;
    }
    for client in &mut clients {
        for n in 0..PUBLISHES {
            assert_eq!(client.next_publish("metrics-news", Duration::from_secs(10)).await?["n"], json!(n));
        }
    }

    // During: the clients are connected.
    let (n, m) = (CLIENTS as f64, PUBLISHES as f64);
    let during = cluster_metrics(&cluster).await?;
    let delta = |name: &str, with: &[(&str, &str)]| during.sum(name, with) - before.sum(name, with);
    let worker = [("role", "worker")];
    let balancer = [("role", "balancer")];
    assert_eq!(during.sum("sc_connections_open", &worker), n, "worker sockets open");
    // Plain connections are handed to their worker on this host: the balancer holds none.
    assert_eq!(during.sum("sc_connections_open", &balancer), 0.0, "balancer connections open");
    assert_eq!(delta("sc_connections_handed_off_total", &balancer), n, "handed off");
    assert_eq!(during.sum("sc_connections_open", &[("role", "worker"), ("transport", "plain")]), n);
    assert_eq!(delta("sc_connections_accepted_total", &worker), n);
    assert_eq!(delta("sc_connections_accepted_total", &balancer), n);
    assert_eq!(delta("sc_connections_refused_total", &[]), 0.0);
    assert_eq!(delta("sc_handshakes_total", &worker), n);
    assert_eq!(delta("sc_handshake_duration_seconds_count", &worker), n, "one latency per handshake");
    // In: a handshake and a subscribe per client, and the publishes.
    assert_eq!(delta("sc_messages_received_total", &worker), 2.0 * n + m);
    // Out: their replies, the publish acks, and every publish to every client.
    assert_eq!(delta("sc_messages_sent_total", &worker), 2.0 * n + m + n * m);
    assert!(delta("sc_received_bytes_total", &worker) >= m * 20.0, "{}", during.text);
    assert!(delta("sc_sent_bytes_total", &worker) >= n * m * 40.0, "{}", during.text);
    assert_eq!(delta("sc_outbound_drops_total", &[]), 0.0);
    assert_eq!(delta("sc_slow_consumer_closes_total", &[]), 0.0);
    // Each worker holds the channel once at the broker, so the broker delivers each publish twice.
    assert_eq!(during.sum("sc_subscriptions", &worker), n);
    assert_eq!(during.sum("sc_channels", &worker), 2.0, "one channel on each worker");
    assert_eq!(delta("sc_broker_publishes_total", &[]), m);
    assert_eq!(delta("sc_broker_deliveries_total", &[]), 2.0 * m);
    assert_eq!(during.sum("sc_broker_channels", &[]), 1.0);
    assert_eq!(during.sum("sc_broker_subscriptions", &[]), 2.0);
    assert_eq!(during.sum("sc_broker_streams", &[]), 2.0, "both workers attached");
    assert_eq!(delta("sc_broker_link_resets_total", &[]), 0.0);
    // Every process, the master too, reports its process figures, labelled with its id.
    let mut ids: Vec<String> = members.iter().map(|(_, id, _)| id.clone()).collect();
    ids.push("master".into());
    ids.sort();
    for name in ["process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"] {
        assert_eq!(during.ids(name), ids, "{name}");
        // CPU time counts in clock ticks: an idle process may still show 0.
        let least = if name == "process_cpu_seconds_total" { 0.0 } else { 1.0 };
        assert!(during.matching(name, &[]).all(|s| s.value >= least), "{name}: {}", during.text);
    }
    assert_eq!(during.sum("sc_scrape_errors_total", &[]), 0.0);
    assert_eq!(during.sum("sc_child_restarts_total", &[]), 0.0);

    // Each member's own /metrics says what the master showed for it (no traffic meanwhile).
    for (role, id, grpc) in &members {
        let own = member_metrics(grpc).await?;
        assert!(own.samples.iter().all(|s| s.labels.get("id") == Some(id)), "{id}: {}", own.text);
        assert!(own.samples.iter().all(|s| s.labels.get("role") == Some(role)), "{id}: {}", own.text);
        let counters: &[&str] = match role.as_str() {
            "worker" => &["sc_messages_received_total", "sc_messages_sent_total", "sc_handshakes_total"],
            "balancer" => &["sc_connections_accepted_total"],
            _ => &["sc_broker_publishes_total", "sc_broker_deliveries_total"],
        };
        for name in counters {
            let id_label = [("id", id.as_str())];
            assert_eq!(own.sum(name, &[]), during.sum(name, &id_label), "{id} {name}");
        }
        if role == "worker" {
            assert_eq!(own.sum("sc_connections_open", &[]), n / 2.0, "{id}: half the clients");
        }
    }

    // The format, by a real parser: every family once, the types as declared.
    if let Some(parsed) = python_parse(&during.text)? {
        for (family, kind) in [
            ("sc_connections_open", "gauge"),
            ("sc_connections_accepted", "counter"),
            ("sc_connections_refused", "counter"),
            ("sc_messages_received", "counter"),
            ("sc_messages_sent", "counter"),
            ("sc_handshake_duration_seconds", "histogram"),
            ("sc_broker_publishes", "counter"),
            ("sc_broker_deliveries", "counter"),
            ("sc_child_restarts", "counter"),
            ("process_cpu_seconds", "counter"),
            ("process_resident_memory_bytes", "gauge"),
        ] {
            assert_eq!(parsed[family][0], json!(kind), "{family} in {parsed}");
        }
        // Counter samples: the parser's `_total` series, one per process.
        assert_eq!(parsed["sc_messages_sent"][1], json!(2), "one sample per worker: {parsed}");
        assert_eq!(parsed["sc_child_restarts"][1], json!(12), "every role and cause, from zero: {parsed}");
        for (_, _, grpc) in &members {
            python_parse(&member_metrics(grpc).await?.text)?;
        }
    }

    // After: the clients have gone; the totals stay, the levels fall back.
    drop(clients);
    let after = eventually(Duration::from_secs(10), "every connection closed", || async {
        let scrape = cluster_metrics(&cluster).await.ok()?;
        (scrape.sum("sc_connections_open", &[]) == 0.0 && scrape.sum("sc_subscriptions", &[]) == 0.0)
            .then_some(scrape)
    })
    .await?;
    assert_eq!(after.sum("sc_messages_sent_total", &worker), during.sum("sc_messages_sent_total", &worker));
    assert_eq!(after.sum("sc_handshakes_total", &worker), during.sum("sc_handshakes_total", &worker));
    assert_eq!(after.sum("sc_channels", &worker), 0.0);

    // A member that does not answer is left out and counted.
    let (_, stopped, _) =
        members.iter().find(|(role, _, _)| role == "balancer").context("a balancer")?.clone();
    let pid = cluster.admin_get("/status").await?["members"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["id"] == json!(stopped)).and_then(|m| m["pid"].as_u64()))
        .context("balancer pid")?;
    signal_pid(pid as u32, Signal::STOP);
    let without = cluster_metrics(&cluster).await;
    signal_pid(pid as u32, Signal::CONT);
    let without = without?;
    assert!(!without.ids("process_open_fds").contains(&stopped), "{}", without.text);
    assert_eq!(
        without.sum("sc_scrape_errors_total", &[("member", stopped.as_str())]),
        1.0,
        "{}",
        without.text
    );
    assert_eq!(without.ids("process_open_fds").len(), 4, "the others are there: {}", without.text);

    cluster.stop().await?;
    Ok(())
}

/// Runs `sc-master status` with `args`: exit code, stdout, stderr.
async fn status_command(args: &[&str]) -> Result<(i32, String, String)> {
    let output = tokio::process::Command::new(sc_tests::bin("sc-master"))
        .arg("status")
        .args(args)
        .env_remove("SC_MASTER__ADMIN_TOKEN")
        .output()
        .await?;
    Ok((
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_prints_the_members_and_the_rates() -> Result<()> {
    let cluster = Cluster::start(&QUIET).await?;
    let admin = cluster.admin.to_string();
    let ips: Vec<IpAddr> = source_ip_per_worker(cluster.addr, 2).await?.into_values().collect();
    let mut clients = connect_subscribed(&cluster, &ips, "status-news").await?;
    // A steady load while the command measures: one publish every 20 ms.
    let mut publisher = clients.pop().context("a client")?;
    let load = tokio::spawn(async move {
        for n in 0.. {
            if publisher.publish("status-news", json!(n)).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });

    let (code, stdout, stderr) =
        status_command(&["--admin", &admin, "--token", ADMIN_TOKEN, "--json"]).await?;
    assert_eq!(code, 0, "{stderr}");
    let report: Value = serde_json::from_str(&stdout).with_context(|| stdout.clone())?;
    let members = report["members"].as_array().context("members")?;
    assert_eq!(members.len(), 4, "{report}");
    for member in members {
        assert_eq!(member["state"], "healthy", "{member}");
        assert!(member["pid"].as_u64().is_some_and(|p| p > 0), "{member}");
        assert_eq!(member["restarts"], 0, "{member}");
    }
    let rates = &report["rates"];
    assert_eq!(rates["connections"], json!(CLIENTS as f64), "{rates}");
    // Each publish is at least one message in (and CLIENTS - 1 deliveries out) per 20 ms.
    assert!(rates["messages_in_per_s"].as_f64().is_some_and(|r| r >= 5.0), "{rates}");
    assert!(rates["messages_out_per_s"].as_f64().is_some_and(|r| r >= 20.0), "{rates}");
    assert!(rates["publishes_per_s"].as_f64().is_some_and(|r| r >= 5.0), "{rates}");

    let (code, table, stderr) = status_command(&["--admin", &admin, "--token", ADMIN_TOKEN]).await?;
    assert_eq!(code, 0, "{stderr}");
    let header = table.lines().find(|l| l.starts_with("ROLE")).context("the table header")?;
    assert_eq!(
        header.split_whitespace().collect::<Vec<_>>(),
        ["ROLE", "ID", "HOST", "PID", "HEALTH", "UPTIME", "RESTARTS"]
    );
    for member in members {
        let id = member["id"].as_str().unwrap();
        let row =
            table.lines().find(|l| l.split_whitespace().nth(1) == Some(id)).with_context(|| table.clone())?;
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cells[0], member["role"], "{row}");
        assert_eq!(cells[3], member["pid"].to_string(), "{row}");
        assert_eq!(cells[4], "healthy", "{row}");
    }
    assert!(table.contains(&format!("connections {CLIENTS} ")), "{table}");
    load.abort();

    let (code, _, stderr) = status_command(&["--admin", &admin, "--token", "wrong"]).await?;
    assert_eq!(code, 1);
    assert!(stderr.contains("refused the admin token"), "{stderr}");
    let (code, _, stderr) = status_command(&["--admin", &admin]).await?;
    assert_eq!(code, 64, "no token at all is a usage error: {stderr}");
    cluster.stop().await?;
    let (code, _, stderr) = status_command(&["--admin", &admin, "--token", ADMIN_TOKEN]).await?;
    assert_eq!(code, 1);
    assert!(stderr.contains(&format!("cannot reach the master's admin API at {admin}")), "{stderr}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_the_handshakes_and_the_refusals_are_counted_by_transport() -> Result<()> {
    let ca = sc_tests::TestCa::new("metrics")?;
    let mut env = QUIET.to_vec();
    env.extend([
        ("SC_CLUSTER__WORKERS", "1"),
        ("SC_BALANCER__TLS_CERT", ca.cert.to_str().unwrap()),
        ("SC_BALANCER__TLS_KEY", ca.key.to_str().unwrap()),
    ]);
    let cluster = Cluster::start(&env).await?;
    let local: IpAddr = "127.0.0.1".parse()?;
    let tls_clients = 3;
    let mut clients = Vec::new();
    for _ in 0..tls_clients {
        clients.push(Client::connect_tls(local, cluster.addr, &cluster.url, &ca).await?);
    }
    // Two connections that never finish a TLS handshake: plain HTTP, and garbage then nothing.
    for hello in [&b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..], b"\x16\x03\x01\x00\x05hello"] {
        let mut stream = TcpStream::connect(cluster.addr).await?;
        stream.write_all(hello).await?;
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(15), stream.read_to_end(&mut rest)).await;
    }

    let (_, balancer, grpc) =
        members(&cluster).await?.into_iter().find(|(role, _, _)| role == "balancer").context("balancer")?;
    let own = eventually(Duration::from_secs(15), "both refusals counted", || async {
        let own = member_metrics(&grpc).await.ok()?;
        (own.sum("sc_connections_refused_total", &[("reason", "tls_handshake")]) == 2.0).then_some(own)
    })
    .await?;
    let n = tls_clients as f64;
    let tls = [("transport", "tls")];
    assert_eq!(own.sum("sc_tls_handshakes_total", &[]), n, "{}", own.text);
    assert_eq!(own.sum("sc_tls_handshake_duration_seconds_count", &[]), n, "{}", own.text);
    assert_eq!(own.sum("sc_connections_accepted_total", &tls), n + 2.0, "{}", own.text);
    assert_eq!(own.sum("sc_connections_accepted_total", &[("transport", "plain")]), 0.0);
    // After their handshakes the TLS 1.3 sessions went to the worker on this host.
    assert_eq!(own.sum("sc_connections_open", &tls), 0.0, "{}", own.text);
    assert_eq!(own.sum("sc_connections_handed_off_total", &[]), n, "{}", own.text);
    assert_eq!(own.sum("sc_connections_refused_total", &[]), 2.0, "{}", own.text);

    // The worker knows the sockets are TLS (they came with their sessions).
    let cluster_wide = cluster_metrics(&cluster).await?;
    assert_eq!(cluster_wide.sum("sc_connections_open", &[("role", "worker"), ("transport", "tls")]), n);
    assert_eq!(cluster_wide.sum("sc_connections_open", &[("role", "worker"), ("transport", "plain")]), 0.0);
    assert_eq!(
        cluster_wide.sum("sc_tls_handshakes_total", &[("id", balancer.as_str())]),
        n,
        "{}",
        cluster_wide.text
    );
    drop(clients);
    cluster.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_stops_reading_is_counted_as_a_slow_consumer() -> Result<()> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let mut env = QUIET.to_vec();
    env.extend([("SC_CLUSTER__WORKERS", "1"), ("SC_WORKER__MAX_OUTBOUND_BYTES", "65536")]);
    let cluster = Cluster::start(&env).await?;
    let status = cluster.admin_get("/status").await?;
    let worker = status["members"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["role"] == "worker"))
        .context("a worker")?
        .clone();
    let worker_addr: std::net::SocketAddr = worker["address"].as_str().context("address")?.parse()?;
    let url = format!("ws://{worker_addr}/socketcluster/");
    let local: IpAddr = "127.0.0.1".parse()?;

    // A subscriber that never reads after subscribing, with a small receive buffer.
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(4096)?;
    let (mut stalled, _) = tokio_tungstenite::client_async(&url, socket.connect(worker_addr).await?).await?;
    for (cid, event, data) in [(1, "#handshake", json!({})), (2, "#subscribe", json!({ "channel": "flood" }))]
    {
        stalled
            .send(Message::Text(json!({ "event": event, "data": data, "cid": cid }).to_string().into()))
            .await?;
    }
    let mut publisher = Client::connect(local, worker_addr, &url).await?;
    let before = cluster_metrics(&cluster).await?;
    let payload = "x".repeat(8192);
    // Far more than the kernel buffers and max_outbound_bytes hold, 20 at a time until it shows.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut published = 0;
    let closes = loop {
        for _ in 0..20 {
            publisher.publish("flood", json!(payload)).await?;
        }
        published += 20;
        let closes = cluster_metrics(&cluster).await?.sum("sc_slow_consumer_closes_total", &[]);
        if closes > 0.0 {
            break closes;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("no slow consumer close after {published} publishes");
        }
    };
    assert_eq!(closes - before.sum("sc_slow_consumer_closes_total", &[]), 1.0, "after {published} publishes");
    // The stalled socket did get the 4100 close once it reads again.
    let code = tokio::time::timeout(Duration::from_secs(15), async {
        while let Some(frame) = stalled.next().await {
            if let Ok(Message::Close(frame)) = frame {
                return frame.map(|f| u16::from(f.code));
            }
        }
        None
    })
    .await?;
    assert_eq!(code, Some(4100));
    drop(stalled);
    eventually(Duration::from_secs(15), "only the publisher's socket open", || async {
        let scrape = cluster_metrics(&cluster).await.ok()?;
        (scrape.sum("sc_connections_open", &[("role", "worker")]) == 1.0).then_some(())
    })
    .await?;
    cluster.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_broker_shows_as_a_restart_and_as_link_resets_on_every_worker() -> Result<()> {
    let cluster = Cluster::start(&QUIET).await?;
    let broker = cluster.daemons_named("sc-broker").into_iter().next().context("a broker")?;
    let before = cluster_metrics(&cluster).await?;
    let restarts = [("child_role", "broker"), ("cause", "exit")];
    assert_eq!(before.sum("sc_child_restarts_total", &restarts), 0.0);
    assert_eq!(before.sum("sc_broker_link_resets_total", &[]), 0.0);

    signal_pid(broker.pid, Signal::KILL);
    let after = eventually(Duration::from_secs(20), "the broker respawned and linked again", || async {
        let scrape = cluster_metrics(&cluster).await.ok()?;
        let linked = scrape.sum("sc_broker_streams", &[]) == 2.0;
        (scrape.sum("sc_child_restarts_total", &restarts) == 1.0 && linked).then_some(scrape)
    })
    .await?;
    assert_eq!(after.sum("sc_child_restarts_total", &[]), 1.0, "nothing else restarted: {}", after.text);
    assert_eq!(
        after.sum("sc_broker_link_resets_total", &[("role", "worker")]),
        2.0,
        "one per worker: {}",
        after.text
    );
    for id in after.ids("sc_broker_link_reconnects_total") {
        let reconnects = after.sum("sc_broker_link_reconnects_total", &[("id", id.as_str())]);
        assert!(reconnects >= 1.0, "{id} reconnected: {}", after.text);
    }
    let (code, stdout, stderr) =
        status_command(&["--admin", &cluster.admin.to_string(), "--token", ADMIN_TOKEN, "--json"]).await?;
    assert_eq!(code, 0, "{stderr}");
    let report: Value = serde_json::from_str(&stdout)?;
    let restarted =
        report["members"].as_array().and_then(|ms| ms.iter().find(|m| m["role"] == "broker")).cloned();
    assert_eq!(restarted.context("the broker")?["restarts"], 1, "{report}");
    cluster.stop().await?;
    Ok(())
}
