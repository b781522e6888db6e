//! `sc-master status`: the cluster's members and rates from the command line, read from a
//! running master's admin API (`GET /status`, and `GET /metrics` twice, [`RATE_WINDOW`] apart).
//!
//! Entry point: [`fetch`], then [`Report::table`] for people or [`Report::json`] for scripts.
//! Errors ([`StatusError`]) say what to fix: the master not reachable, or the token refused.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// The time between the two scrapes that make the rates.
pub const RATE_WINDOW: Duration = Duration::from_secs(1);

/// How long one request to the admin API may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Why `sc-master status` could not tell.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// No master answers at that address.
    #[error(
        "cannot reach the master's admin API at {addr}: {why} (is the master running? see [master] admin_listen, or pass --admin)"
    )]
    Unreachable {
        /// The address tried.
        addr: String,
        /// What failed.
        why: String,
    },
    /// The master refused the token.
    #[error(
        "the master at {addr} refused the admin token (401): pass --token, or set [master] admin_token or SC_MASTER__ADMIN_TOKEN"
    )]
    Unauthorized {
        /// The address tried.
        addr: String,
    },
    /// Any other answer than 200.
    #[error("the master at {addr} answered {path} with {status}: {body}")]
    Refused {
        /// The address tried.
        addr: String,
        /// The request path.
        path: &'static str,
        /// The status.
        status: StatusCode,
        /// The body, for its error message.
        body: String,
    },
    /// An answer that does not parse.
    #[error("unexpected answer from {addr}{path}: {why}")]
    BadAnswer {
        /// The address tried.
        addr: String,
        /// The request path.
        path: &'static str,
        /// What is wrong with it.
        why: String,
    },
}

/// What `sc-master status` prints: the `/status` document and the rates.
#[derive(Debug, Clone)]
pub struct Report {
    /// `GET /status` as the master answered it.
    pub status: Value,
    /// Cluster-wide rates and levels from the metrics.
    pub rates: Rates,
}

/// Cluster-wide figures from two scrapes of `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Rates {
    /// WebSocket connections open on the workers (second scrape).
    pub connections: f64,
    /// Messages from clients per second (all workers).
    pub messages_in_per_s: f64,
    /// Messages to clients per second (all workers).
    pub messages_out_per_s: f64,
    /// Publishes received by the brokers per second.
    pub publishes_per_s: f64,
}

impl Report {
    /// The report as one JSON document: `{"mode", "master", "members", "rates", ...}`.
    pub fn json(&self) -> Value {
        let mut document = self.status.clone();
        document["rates"] = json!({
            "connections": self.rates.connections,
            "messages_in_per_s": self.rates.messages_in_per_s,
            "messages_out_per_s": self.rates.messages_out_per_s,
            "publishes_per_s": self.rates.publishes_per_s,
        });
        document
    }

    /// The report as a table of members and a line of rates, for a terminal.
    pub fn table(&self) -> String {
        let s = &self.status;
        let mut out = format!(
            "master pid {} ({} mode), up {}\n\n",
            s["master"]["pid"],
            s["mode"].as_str().unwrap_or("?"),
            uptime(s["master"]["uptime_ms"].as_u64()),
        );
        let header = ["ROLE", "ID", "HOST", "PID", "HEALTH", "UPTIME", "RESTARTS"];
        let mut rows: Vec<[String; 7]> = vec![header.map(str::to_owned)];
        for m in s["members"].as_array().into_iter().flatten() {
            let address =
                m["address"].as_str().filter(|a| !a.is_empty()).or(m["grpc"].as_str()).unwrap_or("");
            let host = address.rsplit_once(':').map_or(address, |(host, _)| host);
            rows.push([
                m["role"].as_str().unwrap_or("?").to_owned(),
                m["id"].as_str().unwrap_or("?").to_owned(),
                if host.is_empty() { "-".to_owned() } else { host.to_owned() },
                m["pid"].as_u64().map_or_else(|| "-".to_owned(), |p| p.to_string()),
                match m["redis"].as_str() {
                    Some("down") => format!("{},redis-down", m["state"].as_str().unwrap_or("?")),
                    _ => m["state"].as_str().unwrap_or("?").to_owned(),
                },
                uptime(m["uptime_ms"].as_u64()),
                m["restarts"].as_u64().unwrap_or(0).to_string(),
            ]);
        }
        let widths: Vec<usize> = (0..7).map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0)).collect();
        for row in &rows {
            let line: Vec<String> = row.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
            out.push_str(line.join("  ").trim_end());
            out.push('\n');
        }
        let r = &self.rates;
        out.push_str(&format!(
            "\nconnections {}  messages in {:.1}/s  out {:.1}/s  publishes {:.1}/s\n",
            r.connections, r.messages_in_per_s, r.messages_out_per_s, r.publishes_per_s
        ));
        if s["rolling_restart"]["running"].as_bool() == Some(true) {
            out.push_str("a rolling restart is running\n");
        }
        out
    }
}

impl Rates {
    /// The rates between two scrapes of `/metrics` taken `seconds` apart.
    pub fn between(first: &str, second: &str, seconds: f64) -> Self {
        let (a, b) = (totals(first), totals(second));
        let rate = |name: &str| {
            let delta = b.get(name).copied().unwrap_or(0.0) - a.get(name).copied().unwrap_or(0.0);
            if seconds > 0.0 { (delta / seconds).max(0.0) } else { 0.0 }
        };
        Self {
            connections: b.get("sc_connections_open{worker}").copied().unwrap_or(0.0),
            messages_in_per_s: rate("sc_messages_received_total"),
            messages_out_per_s: rate("sc_messages_sent_total"),
            publishes_per_s: rate("sc_broker_publishes_total"),
        }
    }
}

/// Reads the status of the master whose admin API listens at `addr` ("host:port"), with
/// `token`, and its rates over [`RATE_WINDOW`].
pub async fn fetch(addr: &str, token: &str) -> Result<Report, StatusError> {
    let status = get(addr, "/status", token).await?;
    let status: Value = serde_json::from_str(&status).map_err(|e| StatusError::BadAnswer {
        addr: addr.to_owned(),
        path: "/status",
        why: e.to_string(),
    })?;
    let first = get(addr, "/metrics", token).await?;
    let started = Instant::now();
    tokio::time::sleep(RATE_WINDOW).await;
    let second = get(addr, "/metrics", token).await?;
    let rates = Rates::between(&first, &second, started.elapsed().as_secs_f64());
    Ok(Report { status, rates })
}

/// The sums of the sample values of each metric in a Prometheus text, over all labels, and
/// `sc_connections_open` on the workers as `sc_connections_open{worker}`.
fn totals(text: &str) -> HashMap<String, f64> {
    let mut totals = HashMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..name_end];
        let Some(value) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) else { continue };
        *totals.entry(name.to_owned()).or_insert(0.0) += value;
        if name == "sc_connections_open" && line.contains("role=\"worker\"") {
            *totals.entry("sc_connections_open{worker}".to_owned()).or_insert(0.0) += value;
        }
    }
    totals
}

fn uptime(ms: Option<u64>) -> String {
    let Some(ms) = ms else { return "-".to_owned() };
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86400, (s % 86400) / 3600),
    }
}

/// One `GET path` with the bearer token; the body of a 200.
async fn get(addr: &str, path: &'static str, token: &str) -> Result<String, StatusError> {
    let unreachable = |why: String| StatusError::Unreachable { addr: addr.to_owned(), why };
    let exchange = async {
        let stream = TcpStream::connect(addr).await.map_err(|e| unreachable(e.to_string()))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        tokio::spawn(connection);
        let request = Request::get(path)
            .header(header::HOST, addr)
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .body(Empty::<Bytes>::new())
            .map_err(|e| unreachable(e.to_string()))?;
        let response = sender.send_request(request).await.map_err(|e| unreachable(e.to_string()))?;
        let status = response.status();
        let body = response.into_body().collect().await.map_err(|e| unreachable(e.to_string()))?.to_bytes();
        Ok::<_, StatusError>((status, String::from_utf8_lossy(&body).into_owned()))
    };
    let (status, body) = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .map_err(|_| unreachable(format!("no answer within {REQUEST_TIMEOUT:?}")))??;
    match status {
        StatusCode::OK => Ok(body),
        StatusCode::UNAUTHORIZED => Err(StatusError::Unauthorized { addr: addr.to_owned() }),
        status => {
            Err(StatusError::Refused { addr: addr.to_owned(), path, status, body: body.trim().to_owned() })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIRST: &str = "# HELP sc_messages_received_total x\n# TYPE sc_messages_received_total counter\n\
        sc_messages_received_total{role=\"worker\",id=\"worker-0\"} 10\n\
        sc_messages_received_total{role=\"worker\",id=\"worker-1\"} 5\n\
        sc_connections_open{role=\"worker\",id=\"worker-0\",transport=\"plain\"} 3\n\
        sc_connections_open{role=\"balancer\",id=\"balancer-0\",transport=\"plain\"} 3\n";
    const SECOND: &str = "sc_messages_received_total{role=\"worker\",id=\"worker-0\"} 30\n\
        sc_messages_received_total{role=\"worker\",id=\"worker-1\"} 25\n\
        sc_messages_sent_total{role=\"worker\",id=\"worker-1\"} 8\n\
        sc_broker_publishes_total{role=\"broker\",id=\"broker-0\"} 1e1\n\
        sc_connections_open{role=\"worker\",id=\"worker-0\",transport=\"plain\"} 4\n\
        sc_connections_open{role=\"worker\",id=\"worker-1\",transport=\"tls\"} 1\n\
        sc_connections_open{role=\"balancer\",id=\"balancer-0\",transport=\"plain\"} 5\n";

    #[test]
    fn rates_come_from_the_difference_of_two_scrapes() {
        let rates = Rates::between(FIRST, SECOND, 2.0);
        assert_eq!(rates.messages_in_per_s, 20.0);
        assert_eq!(rates.messages_out_per_s, 4.0);
        assert_eq!(rates.publishes_per_s, 5.0);
        assert_eq!(rates.connections, 5.0, "the workers' sockets, not counted twice with the balancer's");
    }

    #[test]
    fn the_table_shows_every_member() {
        let status = json!({
            "mode": "supervise",
            "master": { "pid": 7, "uptime_ms": 3_723_000 },
            "members": [
                { "role": "worker", "id": "worker-0", "pid": 11, "address": "127.0.0.1:8101", "grpc": "127.0.0.1:9101",
                  "state": "healthy", "uptime_ms": 61_000, "restarts": 2 },
                { "role": "broker", "id": "broker-0", "pid": 12, "address": "", "grpc": "10.0.0.2:9200",
                  "state": "healthy", "uptime_ms": null, "restarts": 0, "redis": "down" },
            ],
        });
        let report = Report { status, rates: Rates { connections: 3.0, ..Default::default() } };
        let table = report.table();
        assert!(table.starts_with("master pid 7 (supervise mode), up 1h02m\n"), "{table}");
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[2].split_whitespace().collect::<Vec<_>>(), header_words());
        assert_eq!(
            lines[3].split_whitespace().collect::<Vec<_>>(),
            ["worker", "worker-0", "127.0.0.1", "11", "healthy", "1m01s", "2"]
        );
        assert_eq!(
            lines[4].split_whitespace().collect::<Vec<_>>(),
            ["broker", "broker-0", "10.0.0.2", "12", "healthy,redis-down", "-", "0"],
            "a broker whose Redis is down says so"
        );
        assert!(table.contains("connections 3  messages in 0.0/s"), "{table}");
        assert_eq!(report.json()["rates"]["connections"], json!(3.0));
        assert_eq!(report.json()["members"].as_array().map(Vec::len), Some(2));
    }

    fn header_words() -> Vec<&'static str> {
        vec!["ROLE", "ID", "HOST", "PID", "HEALTH", "UPTIME", "RESTARTS"]
    }

    #[tokio::test]
    async fn a_master_that_is_not_there_is_named() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        drop(listener);
        let error = fetch(&addr, "t").await.unwrap_err();
        assert!(matches!(error, StatusError::Unreachable { .. }), "{error}");
        assert!(error.to_string().contains(&addr), "{error}");
    }
}
