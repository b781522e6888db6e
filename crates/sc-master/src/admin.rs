//! The admin and status API: HTTP/1.1 + JSON on `[master] admin_listen` (default
//! 127.0.0.1:8001), for operators and their tools.
//!
//! - `GET /status`: the mode, the membership epoch, every member (role, id, pid, addresses,
//!   state, restarts, uptime, health, `last_error`: its last error line, or how its last
//!   process crashed; for a broker on Redis, `redis`: "up" or "down" and
//!   `redis_down_since_ms`, from its last scrape), whether a rolling restart runs, the recent
//!   warnings and errors of the central log.
//! - `GET /log?limit=N`: the most recent central log entries (every severity), oldest first.
//! - `POST /rolling-restart`: starts a rolling restart of the workers (202, with its number);
//!   409 if one is running, 400 if the master is standalone (it runs no processes to restart);
//!   see `crate::error` for every code. `/status` says when it is over and how it ended.
//! - `POST /drain` with `{"id": "broker-1"}`: drains that broker (202): out of the membership,
//!   its channels move to the other brokers, it stops gracefully and stays stopped; 409 for
//!   the last running broker. `POST /undrain` with the same body starts it again.
//! - `GET /events`: Server-Sent Events for the admin page: `history` (the cluster samples of
//!   the last 15 minutes, see `crate::samples`, and the status), then a `sample` event (the new
//!   sample and the status) every second.
//! - `GET /healthz`: 200 while the master serves.
//! - `GET /metrics`: the whole cluster's figures in the Prometheus text format: the master's
//!   own and every member's, gathered over `sc.metrics.v1` on request (see `crate::metrics`).
//! - `GET /`, `/admin.js`, `/admin.css`: the admin web page (see `page`), which holds no data
//!   and asks for the token.
//!
//! It can restart the cluster, so it listens on loopback by default, and every request but
//! `GET /healthz` and the page's files needs `Authorization: Bearer <[master] admin_token>`
//! (401 otherwise; compared in constant time). Against browsers on the operator's machine (cross-site requests, DNS
//! rebinding), whatever the token: a `Host` header must name this listener (its IP, or
//! localhost or a loopback IP, with its port; any IP literal when it listens on a wildcard
//! address) and an `Origin` header, if any, the same (403 otherwise); and every POST must say
//! `Content-Type: application/json` (415 otherwise), which no HTML form can send without a
//! CORS preflight that this API never answers.

mod page;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use sc_common::config::MasterMode;
use sc_common::membership::Severity;
use sc_common::net;
use sc_common::secret::constant_time_eq;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::MasterError;
use crate::central_log::{CentralLog, Entry};
use crate::health::HealthMap;
use crate::metrics::ClusterMetrics;
use crate::registry::Registry;
use crate::samples::Samples;
use crate::supervisor::{ChildState, Children, Supervisor};

/// How many warnings and errors `/status` shows.
const STATUS_ERRORS: usize = 50;

/// The largest request body read (the JSON of `POST /drain`).
const BODY_LIMIT: usize = 4096;

/// Every answer's body: whole (JSON, the page's files) or streamed (`/events`).
type Body = UnsyncBoxBody<Bytes, Infallible>;

/// What the admin API reads and drives.
#[derive(Debug)]
pub(crate) struct Admin {
    pub(crate) mode: MasterMode,
    pub(crate) grpc: SocketAddr,
    pub(crate) started: Instant,
    pub(crate) registry: Arc<Registry>,
    pub(crate) log: Arc<CentralLog>,
    pub(crate) health: watch::Receiver<HealthMap>,
    pub(crate) children: Arc<Children>,
    /// `None` in standalone mode.
    pub(crate) supervisor: Option<Arc<Supervisor>>,
    /// The bound admin address, what `Host` and `Origin` headers must name.
    pub(crate) addr: SocketAddr,
    /// `[master] admin_token` (generated at start when unset): never empty.
    pub(crate) token: String,
    /// The master's figures, and the members' gathered for `GET /metrics`.
    pub(crate) metrics: ClusterMetrics,
    /// The cluster samples of the last 15 minutes, for the page's charts.
    pub(crate) samples: Arc<Samples>,
}

impl Admin {
    /// Serves the API on `listener` until `shutdown`.
    pub(crate) async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: CancellationToken) {
        let tracker = TaskTracker::new();
        loop {
            let Some((stream, remote)) = net::accept(|| listener.accept(), &shutdown).await else { break };
            let admin = self.clone();
            let shutdown = shutdown.clone();
            tracker.spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let admin = admin.clone();
                    async move { Ok::<_, Infallible>(admin.route(request).await) }
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service);
                tokio::select! {
                    outcome = connection => if let Err(e) = outcome {
                        tracing::debug!(%remote, error = %e, "admin connection failed");
                    },
                    _ = shutdown.cancelled() => {}
                }
            });
        }
        tracker.close();
        tracker.wait().await;
    }

    async fn route(self: Arc<Self>, request: Request<Incoming>) -> Response<Body> {
        if let Some(refused) = self.refusal(&request) {
            return refused;
        }
        if request.method() == Method::GET
            && let Some(file) = page::file(request.uri().path())
        {
            return file;
        }
        match (request.method(), request.uri().path()) {
            (&Method::GET, "/status") => json_response(StatusCode::OK, &self.status()),
            (&Method::GET, "/log") => {
                let limit = request
                    .uri()
                    .query()
                    .and_then(|q| {
                        q.split('&')
                            .find_map(|kv| kv.strip_prefix("limit="))
                            .and_then(|n| n.parse::<usize>().ok())
                    })
                    .unwrap_or(usize::MAX);
                let entries = self.log.recent();
                let skip = entries.len().saturating_sub(limit);
                let entries: Vec<Value> = entries[skip..].iter().map(entry_json).collect();
                json_response(StatusCode::OK, &json!({ "entries": entries }))
            }
            (&Method::POST, "/rolling-restart") => {
                if !is_json(&request) {
                    return not_json();
                }
                let started = match &self.supervisor {
                    None => Err(MasterError::Standalone),
                    Some(supervisor) => supervisor.start_rolling_restart(),
                };
                match started {
                    Ok(number) => json_response(
                        StatusCode::ACCEPTED,
                        &json!({ "rolling_restart": "started", "number": number }),
                    ),
                    Err(e) => error_response(&e),
                }
            }
            (&Method::POST, path @ ("/drain" | "/undrain")) => {
                let drain = path == "/drain";
                if !is_json(&request) {
                    return not_json();
                }
                let Some(id) = read_id(request).await else {
                    return json_response(
                        StatusCode::BAD_REQUEST,
                        &json!({ "error": "the body must be a JSON object with the broker's \"id\"" }),
                    );
                };
                let outcome = match &self.supervisor {
                    None => Err(MasterError::Standalone),
                    Some(supervisor) if drain => supervisor.drain(&id),
                    Some(supervisor) => supervisor.undrain(&id),
                };
                let key = if drain { "draining" } else { "undraining" };
                match outcome {
                    Ok(()) => json_response(StatusCode::ACCEPTED, &json!({ key: id })),
                    Err(e) => error_response(&e),
                }
            }
            (&Method::GET, "/events") => page::events(self.clone()),
            (&Method::GET, "/healthz") => json_response(StatusCode::OK, &json!({ "ok": true })),
            (&Method::GET, "/metrics") => self.metrics().await,
            (
                _,
                "/status" | "/log" | "/rolling-restart" | "/drain" | "/undrain" | "/events" | "/healthz"
                | "/metrics",
            ) => json_response(StatusCode::METHOD_NOT_ALLOWED, &json!({ "error": "method not allowed" })),
            _ => json_response(StatusCode::NOT_FOUND, &json!({ "error": "not found" })),
        }
    }

    /// `GET /metrics`: the whole cluster's figures, Prometheus text.
    async fn metrics(&self) -> Response<Body> {
        let mut response = Response::new(Full::new(Bytes::from(self.metrics.text().await)).boxed_unsync());
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(sc_common::metrics::CONTENT_TYPE));
        response
    }

    /// The checks every request passes before its route: `Host` and `Origin` name this
    /// listener (403), then the bearer token (401), except for `GET /healthz`, which orchestrators
    /// call without one and which reveals nothing. `Some`: the answer of a refused request.
    fn refusal(&self, request: &Request<Incoming>) -> Option<Response<Body>> {
        let headers = request.headers();
        let forbidden = |why: &str| json_response(StatusCode::FORBIDDEN, &json!({ "error": why }));
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
        if !allowed_authority(host, self.addr) {
            return Some(forbidden("the Host header does not name this admin listener"));
        }
        if let Some(origin) = headers.get(header::ORIGIN) {
            let same = origin
                .to_str()
                .ok()
                .and_then(|o| o.strip_prefix("http://"))
                .is_some_and(|authority| allowed_authority(authority, self.addr));
            if !same {
                return Some(forbidden("cross-origin requests are refused"));
            }
        }
        if request.method() == Method::GET
            && (request.uri().path() == "/healthz" || page::file(request.uri().path()).is_some())
        {
            return None;
        }
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if constant_time_eq(given.as_bytes(), self.token.as_bytes()) {
            return None;
        }
        let mut response = json_response(
            StatusCode::UNAUTHORIZED,
            &json!({ "error": "missing or wrong bearer token ([master] admin_token)" }),
        );
        response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        Some(response)
    }

    /// The whole `/status` document.
    pub(crate) fn status(&self) -> Value {
        let snapshot = self.registry.snapshot();
        let since = self.registry.registered_since();
        let health = self.health.borrow().clone();
        let children = self.children.snapshot();
        let now = Instant::now();
        let entries = self.log.recent();
        // A member's last error: from the central log (any member), or the last error line a
        // supervised child printed (which includes what it printed before it could report).
        let mut last_errors: BTreeMap<&str, &str> = BTreeMap::new();
        for entry in entries.iter().filter(|e| e.role.is_some() && e.severity == Severity::Error) {
            last_errors.insert(&entry.id, &entry.message);
        }
        let mut members: BTreeMap<String, Value> = BTreeMap::new();
        for member in &snapshot.members {
            let h = health.get(&(member.id.clone(), member.pid)).copied().unwrap_or_default();
            let state = if h.healthy_since.is_some() {
                "healthy"
            } else if h.misses > 0 {
                "unhealthy"
            } else {
                "starting"
            };
            let uptime = since.get(&member.id).map(|t| now - *t);
            members.insert(
                member.id.clone(),
                json!({
                    "role": member.role.as_str(),
                    "id": member.id,
                    "pid": member.pid,
                    "address": member.public,
                    "grpc": member.grpc,
                    "registered": true,
                    "state": state,
                    "restarts": 0,
                    "uptime_ms": uptime.map(|d| d.as_millis() as u64),
                    "health_misses": h.misses,
                    "last_error": last_errors.get(member.id.as_str()),
                }),
            );
            // A broker on Redis: its link, from its last scrape (`sc_broker_redis_up`).
            let figures = self.samples.member(&(member.id.clone(), member.pid));
            if let (Some(entry), Some(f)) = (members.get_mut(&member.id), figures)
                && let Some(up) = f.redis_up
            {
                let down = up < 1.0;
                entry["redis"] = json!(if down { "down" } else { "up" });
                entry["redis_down_since_ms"] =
                    json!((down && f.redis_down_since > 0.0).then_some((f.redis_down_since * 1000.0) as u64));
            }
        }
        // Supervised children add what the registry cannot know: restarts, processes that have
        // not registered yet, respawn backoff, replacements.
        for (id, child) in &children {
            let entry = members.entry(id.clone()).or_insert_with(|| {
                json!({
                    "role": child.role.as_str(),
                    "id": id,
                    "pid": child.pid,
                    "address": "",
                    "grpc": "",
                    "registered": false,
                    "state": "starting",
                    "health_misses": 0,
                    "last_error": last_errors.get(id.as_str()),
                })
            });
            if let Some(error) = &child.last_error {
                entry["last_error"] = json!(error);
            }
            entry["restarts"] = json!(child.restarts);
            entry["uptime_ms"] = json!(child.started.map(|t| (now - t).as_millis() as u64));
            if entry["pid"] != json!(child.pid) && child.state != ChildState::Replacing {
                // The registry still shows a process that the supervisor has replaced.
                entry["pid"] = json!(child.pid);
                entry["registered"] = json!(false);
                entry["state"] = json!("starting");
            }
            if child.state != ChildState::Running {
                entry["state"] = json!(child.state.as_str());
            }
            if let Some(pid) = child.replacement {
                entry["replacement_pid"] = json!(pid);
            }
        }
        let recent_errors: Vec<Value> = {
            let bad: Vec<&Entry> = entries.iter().filter(|e| e.severity != Severity::Notice).collect();
            let skip = bad.len().saturating_sub(STATUS_ERRORS);
            bad[skip..].iter().map(|e| entry_json(e)).collect()
        };
        json!({
            "mode": match self.mode {
                MasterMode::Supervise => "supervise",
                MasterMode::Standalone => "standalone",
            },
            "master": {
                "pid": std::process::id(),
                "grpc": self.grpc.to_string(),
                "uptime_ms": self.started.elapsed().as_millis() as u64,
            },
            "epoch": snapshot.epoch,
            "rolling_restart": self.rolling_restart_status(),
            "members": members.into_values().collect::<Vec<_>>(),
            "recent_errors": recent_errors,
        })
    }
}

impl Admin {
    /// `/status`'s `rolling_restart`: whether one runs, how many were started, how the last
    /// one ended.
    fn rolling_restart_status(&self) -> Value {
        let Some(supervisor) = &self.supervisor else {
            return json!({ "running": false, "started": 0, "last": null });
        };
        let (started, last) = supervisor.rolling_restarts();
        json!({
            "running": supervisor.rolling_restart_running(),
            "started": started,
            "last": last.map(|last| json!({
                "number": last.number,
                "ok": last.ok,
                "message": last.message,
                "finished_ms": last.finished_ms,
            })),
        })
    }
}

/// Whether `authority` ("host:port" from a Host or Origin header) names the listener `admin`:
/// its port (80 when none is written), and as host `localhost`, a loopback IP or the
/// listener's IP, or any IP literal when the listener is on a wildcard address. A DNS name
/// other than localhost never passes: that is what DNS rebinding would send.
fn allowed_authority(authority: &str, admin: SocketAddr) -> bool {
    let Ok(authority) = authority.parse::<http::uri::Authority>() else { return false };
    if authority.port_u16().unwrap_or(80) != admin.port() {
        return false;
    }
    let host = authority.host();
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let literal = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    match literal.parse::<IpAddr>() {
        Ok(ip) => ip.is_loopback() || ip == admin.ip() || admin.ip().is_unspecified(),
        Err(_) => false,
    }
}

/// Whether the request says its body is JSON (`application/json`, parameters allowed).
fn is_json(request: &Request<Incoming>) -> bool {
    request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"))
}

/// The `"id"` of a JSON object body (at most [`BODY_LIMIT`] bytes).
async fn read_id(request: Request<Incoming>) -> Option<String> {
    let body = Limited::new(request.into_body(), BODY_LIMIT).collect().await.ok()?.to_bytes();
    let value: Value = serde_json::from_slice(&body).ok()?;
    value.get("id")?.as_str().map(str::to_owned)
}

fn not_json() -> Response<Body> {
    json_response(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        &json!({ "error": "state changes need Content-Type: application/json" }),
    )
}

fn error_response(error: &MasterError) -> Response<Body> {
    json_response(error.http_status(), &json!({ "error": error.to_string() }))
}

fn entry_json(entry: &Entry) -> Value {
    json!({
        "time_ms": entry.time_ms,
        "severity": match entry.severity {
            Severity::Notice => "notice",
            Severity::Warning => "warning",
            Severity::Error => "error",
        },
        "role": entry.role.map_or("master", |r| r.as_str()),
        "id": entry.id,
        "pid": entry.pid,
        "message": entry.message,
        "location": entry.location,
    })
}

fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    let mut text = body.to_string();
    text.push('\n');
    let mut response = Response::new(Full::new(Bytes::from(text)).boxed_unsync());
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_this_listener_passes_as_host_or_origin() {
        let loopback: SocketAddr = "127.0.0.1:8001".parse().unwrap();
        for good in ["127.0.0.1:8001", "localhost:8001", "LOCALHOST:8001", "[::1]:8001", "127.0.0.2:8001"] {
            assert!(allowed_authority(good, loopback), "{good}");
        }
        for bad in ["evil.example:8001", "127.0.0.1:8002", "127.0.0.1", "10.0.0.1:8001", "", "a b:8001"] {
            assert!(!allowed_authority(bad, loopback), "{bad}");
        }
        let private: SocketAddr = "10.0.0.1:80".parse().unwrap();
        assert!(allowed_authority("10.0.0.1", private), "port 80 need not be written");
        assert!(!allowed_authority("10.0.0.2:80", private));
        let wildcard: SocketAddr = "0.0.0.0:8001".parse().unwrap();
        assert!(allowed_authority("172.17.0.2:8001", wildcard), "any IP literal on a wildcard listener");
        assert!(!allowed_authority("sc-master:8001", wildcard), "never a DNS name");
    }
}
