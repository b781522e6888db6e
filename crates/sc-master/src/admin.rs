//! The admin and status API: HTTP/1.1 + JSON on `[master] admin_listen` (default
//! 127.0.0.1:8001), for operators and their tools.
//!
//! - `GET /status`: the mode, the membership epoch, every member (role, id, pid, addresses,
//!   state, restarts, uptime, health), whether a rolling restart runs, the recent warnings and
//!   errors of the central log.
//! - `GET /log?limit=N`: the most recent central log entries (every severity), oldest first.
//! - `POST /rolling-restart`: starts a rolling restart of the workers (202); 409 if one is
//!   running, 400 if the master is standalone (it runs no processes to restart); see
//!   `crate::error` for every code.
//! - `GET /healthz`: 200 while the master serves.
//!
//! It has no authentication: it can restart the cluster, so it listens on loopback by default.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use sc_common::config::MasterMode;
use sc_common::membership::Severity;
use sc_common::net;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::MasterError;
use crate::central_log::{CentralLog, Entry};
use crate::health::HealthMap;
use crate::registry::Registry;
use crate::supervisor::{ChildState, Children, Supervisor};

/// How many warnings and errors `/status` shows.
const STATUS_ERRORS: usize = 50;

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
                    async move { Ok::<_, Infallible>(admin.route(&request)) }
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

    fn route(&self, request: &Request<Incoming>) -> Response<Full<Bytes>> {
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
                let started = match &self.supervisor {
                    None => Err(MasterError::Standalone),
                    Some(supervisor) => supervisor.start_rolling_restart(),
                };
                match started {
                    Ok(()) => json_response(StatusCode::ACCEPTED, &json!({ "rolling_restart": "started" })),
                    Err(e) => json_response(e.http_status(), &json!({ "error": e.to_string() })),
                }
            }
            (&Method::GET, "/healthz") => json_response(StatusCode::OK, &json!({ "ok": true })),
            (_, "/status" | "/log" | "/rolling-restart" | "/healthz") => {
                json_response(StatusCode::METHOD_NOT_ALLOWED, &json!({ "error": "method not allowed" }))
            }
            _ => json_response(StatusCode::NOT_FOUND, &json!({ "error": "not found" })),
        }
    }

    /// The whole `/status` document.
    pub(crate) fn status(&self) -> Value {
        let snapshot = self.registry.snapshot();
        let since = self.registry.registered_since();
        let health = self.health.borrow().clone();
        let children = self.children.snapshot();
        let now = Instant::now();
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
                }),
            );
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
                })
            });
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
            let entries = self.log.recent();
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
            "rolling_restart": {
                "running": self.supervisor.as_ref().is_some_and(|s| s.rolling_restart_running()),
            },
            "members": members.into_values().collect::<Vec<_>>(),
            "recent_errors": recent_errors,
        })
    }
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

fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut text = body.to_string();
    text.push('\n');
    let mut response = Response::new(Full::new(Bytes::from(text)));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
