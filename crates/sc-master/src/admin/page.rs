//! The admin web page: one HTML page with its own script and stylesheet (in `page/`), shipped
//! inside the binary, and its event stream.
//!
//! The files hold no data and are served without the token (the `Host` and `Origin` checks
//! still apply); the script asks for the token (or takes it from the URL fragment
//! `#token=...`, which browsers never send to the server) and sends it as the bearer on every
//! call. `GET /events` is read with `fetch`, not `EventSource`, which cannot send that header.
//! The charts are drawn by the script as inline SVG; nothing is loaded from elsewhere (the
//! Content-Security-Policy says so).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use serde_json::{Value, json};

use super::{Admin, Body};
use crate::samples::{INTERVAL, Sample, WINDOW};

const HTML: &str = include_str!("page/index.html");
const SCRIPT: &str = include_str!("page/admin.js");
const STYLE: &str = include_str!("page/admin.css");

/// Only this listener's own files and calls; no inline script, no frames.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The page's file at `path`, if it is one.
pub(super) fn file(path: &str) -> Option<Response<Body>> {
    let (body, kind) = match path {
        "/" | "/index.html" => (HTML, "text/html; charset=utf-8"),
        "/admin.js" => (SCRIPT, "text/javascript; charset=utf-8"),
        "/admin.css" => (STYLE, "text/css; charset=utf-8"),
        _ => return None,
    };
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())).boxed_unsync());
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Some(response)
}

/// `GET /events`: a `history` event (every kept sample and the status), then a `sample` event
/// (the new sample and the status) each time the sampler takes one. A reader that falls behind
/// skips to the newest sample. The stream ends with the connection (or the master).
pub(super) fn events(admin: Arc<Admin>) -> Response<Body> {
    let mut updates = admin.samples.subscribe();
    // What is in the history is not sent again (a sample taken in between may be: the page
    // ignores samples it has).
    updates.borrow_and_update();
    let stream =
        futures_util::stream::unfold((admin, updates, true), |(admin, mut updates, first)| async move {
            let text = if first {
                let samples: Vec<Value> = admin.samples.history().iter().map(sample_json).collect();
                let history = json!({
                    "interval_ms": INTERVAL.as_millis() as u64,
                    "window_ms": WINDOW.as_millis() as u64,
                    "samples": samples,
                    "status": admin.status(),
                });
                event("history", &history)
            } else {
                updates.changed().await.ok()?;
                let sample = *updates.borrow_and_update();
                event(
                    "sample",
                    &json!({ "sample": sample.as_ref().map(sample_json), "status": admin.status() }),
                )
            };
            Some((Ok::<_, Infallible>(Frame::data(Bytes::from(text))), (admin, updates, false)))
        });
    let mut response = Response::new(StreamBody::new(stream).boxed_unsync());
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// One Server-Sent Event: its name and its data on one line.
fn event(name: &str, data: &Value) -> String {
    format!("event: {name}\ndata: {data}\n\n")
}

/// A sample as the page reads it (`t` in milliseconds since the Unix epoch, rates per second).
fn sample_json(sample: &Sample) -> Value {
    json!({
        "t": sample.time_ms,
        "members": sample.members,
        "scraped": sample.scraped,
        "worker_connections": sample.worker_connections,
        "balancer_connections": sample.balancer_connections,
        "messages_in": sample.messages_in,
        "messages_out": sample.messages_out,
        "publishes": sample.publishes,
        "deliveries": sample.deliveries,
    })
}
