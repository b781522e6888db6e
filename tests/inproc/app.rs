//! The typed app API (`sc_worker::App`) on real ports: an in-process master, broker and worker
//! running a small app, driven by a WebSocket client. Typed procedures and events and their
//! errors, the event hooks and their order, per-socket state, the open sockets, the `[app]`
//! settings and the app's HTTP routes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sc_tests::inproc::Cluster;
use sc_tests::{Client, http_get};
use sc_worker::axum::extract::State;
use sc_worker::axum::routing::post;
use sc_worker::axum::{Json, Router};
use sc_worker::{App, AppContext, ErrorObject, Exchange, Socket};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const WAIT: Duration = Duration::from_secs(5);

/// The app's `[app]` settings.
#[derive(Debug, Clone, Deserialize)]
struct Settings {
    greeting: String,
    #[serde(default = "default_limit")]
    limit: u64,
}

fn default_limit() -> u64 {
    3
}

#[derive(Deserialize)]
struct Login {
    username: String,
}

#[derive(Serialize)]
struct Welcome {
    greeting: String,
    username: String,
}

#[derive(Deserialize)]
struct Note {
    channel: String,
    text: String,
}

#[derive(Deserialize)]
struct Direct {
    to: String,
    text: String,
}

/// Per-socket state: how many times this socket called `count`.
#[derive(Default)]
struct Calls(AtomicU64);

/// What the event hooks saw, in order.
type Journal = Arc<Mutex<Vec<String>>>;

fn record(journal: &Journal, socket: &Socket, what: String) {
    journal.lock().unwrap().push(format!("{} {what}", socket.id()));
}

/// The app under test; `journal` collects its event hooks' calls.
fn app(ctx: AppContext<Settings>, journal: Journal) -> App {
    let greeting = ctx.config.greeting.clone();
    let limit = ctx.config.limit;
    let sockets = ctx.sockets.clone();
    let exchange = ctx.exchange.clone();
    let (j1, j2, j3, j4, j5, j6) =
        (journal.clone(), journal.clone(), journal.clone(), journal.clone(), journal.clone(), journal);
    App::new()
        .procedure("login", move |socket, login: Login| {
            let greeting = greeting.clone();
            async move {
                if login.username.is_empty() {
                    return Err(ErrorObject::new("LoginError", "empty name"));
                }
                socket.set_auth_token(json!({ "username": login.username }))?;
                Ok(Welcome { greeting, username: login.username })
            }
        })
        .procedure("count", move |socket, (): ()| async move {
            if socket.state::<Calls>().is_none() {
                socket.insert(Calls::default());
            }
            let calls = socket.state::<Calls>().expect("just inserted");
            let n = calls.0.fetch_add(1, Ordering::Relaxed) + 1;
            if n > limit {
                return Err(ErrorObject::new("LimitError", format!("more than {limit} calls")));
            }
            Ok(n)
        })
        .procedure("direct", move |socket, direct: Direct| {
            let sockets = sockets.clone();
            async move {
                let target = sockets
                    .get(&direct.to)
                    .ok_or_else(|| ErrorObject::new("NoSuchSocket", direct.to.clone()))?;
                target.transmit("direct", &json!({ "from": socket.id(), "text": direct.text }));
                Ok(json!({ "open": sockets.len() }))
            }
        })
        .on("note", |socket, note: Note| async move {
            // An event handler that publishes: no spawn, no shared state.
            let _ = socket.exchange().publish(&note.channel, &json!({ "note": note.text })).await;
        })
        .on_connect(move |socket| {
            let journal = j1.clone();
            async move { record(&journal, &socket, "connect".into()) }
        })
        .on_subscribe(move |socket, channel| {
            let journal = j2.clone();
            async move { record(&journal, &socket, format!("subscribe {channel}")) }
        })
        .on_unsubscribe(move |socket, channel| {
            let journal = j3.clone();
            async move { record(&journal, &socket, format!("unsubscribe {channel}")) }
        })
        .on_authenticate(move |socket| {
            let journal = j4.clone();
            async move { record(&journal, &socket, "authenticate".into()) }
        })
        .on_deauthenticate(move |socket| {
            let journal = j5.clone();
            async move { record(&journal, &socket, "deauthenticate".into()) }
        })
        .on_disconnect(move |socket, code| {
            let journal = j6.clone();
            let exchange = exchange.clone();
            async move {
                record(&journal, &socket, format!("disconnect {code:?}"));
                // A hook that publishes, awaited in place.
                let _ = exchange.publish("left", &json!(socket.id())).await;
            }
        })
        .routes(Router::new().route("/api/notify", post(notify)).with_state(ctx.exchange))
}

/// `POST /api/notify {channel, data}`: publishes through the exchange.
async fn notify(State(exchange): State<Exchange>, Json(body): Json<Value>) -> Json<Value> {
    let channel = body["channel"].as_str().unwrap_or("news").to_owned();
    let ok = exchange.publish(&channel, &body["data"]).await.is_ok();
    Json(json!({ "ok": ok }))
}

async fn start(journal: Journal) -> Cluster {
    Cluster::builder()
        .tune(|c| {
            c.master.health_interval = Duration::from_millis(200);
            c.worker.auth_key = "app-test-key".into();
            c.app.insert("greeting".into(), "hello".into());
        })
        .app(move |ctx: AppContext<Settings>| app(ctx, journal.clone()))
        .start()
        .await
}

async fn connect(cluster: &Cluster) -> Client {
    Client::connect(LOCAL, cluster.worker(0), &cluster.url(0)).await.unwrap()
}

fn socket_id(client: &Client) -> String {
    client.handshake["id"].as_str().expect("a socket id").to_owned()
}

#[tokio::test]
async fn typed_procedures_answer_and_refuse_clearly() {
    let cluster = start(Journal::default()).await;
    let mut client = connect(&cluster).await;

    let reply = client.invoke("login", json!({ "username": "ada" })).await.unwrap();
    assert_eq!(reply["data"], json!({ "greeting": "hello", "username": "ada" }), "{reply}");
    // The token was set: the client got #setAuthToken before or after the reply.
    let token = client.recv_matching(|m| m["event"] == "#setAuthToken", WAIT).await.unwrap();
    assert!(token["data"]["token"].is_string(), "{token}");

    // A payload of the wrong shape: the stock error shape, naming the procedure.
    let reply = client.invoke("login", json!({ "name": "ada" })).await.unwrap();
    assert_eq!(reply["error"]["name"], "InvalidArgumentsError", "{reply}");
    let message = reply["error"]["message"].as_str().unwrap();
    assert!(message.contains("\"login\"") && message.contains("username"), "{message}");
    let reply = client.invoke("login", json!("ada")).await.unwrap();
    assert_eq!(reply["error"]["name"], "InvalidArgumentsError", "{reply}");

    // The handler's own error.
    let reply = client.invoke("login", json!({ "username": "" })).await.unwrap();
    assert_eq!(reply["error"], json!({ "name": "LoginError", "message": "empty name" }), "{reply}");

    // Unknown procedures keep the stock reply.
    let reply = client.invoke("nope", json!(null)).await.unwrap();
    assert_eq!(reply["error"]["name"], "InvalidActionError", "{reply}");
    drop(client);
    cluster.shutdown().await;
}

#[tokio::test]
async fn per_socket_state_is_the_sockets_own_and_settings_come_from_app() {
    let cluster = start(Journal::default()).await;
    let mut a = connect(&cluster).await;
    let mut b = connect(&cluster).await;
    for n in 1..=3 {
        assert_eq!(a.invoke("count", Value::Null).await.unwrap()["data"], json!(n));
    }
    // `limit` has its default (3): the fourth call is refused.
    let reply = a.invoke("count", Value::Null).await.unwrap();
    assert_eq!(reply["error"]["name"], "LimitError", "{reply}");
    assert_eq!(b.invoke("count", Value::Null).await.unwrap()["data"], json!(1), "b counts on its own");
    drop((a, b));
    cluster.shutdown().await;
}

#[tokio::test]
async fn sockets_are_found_by_id() {
    let cluster = start(Journal::default()).await;
    let mut a = connect(&cluster).await;
    let mut b = connect(&cluster).await;
    let b_id = socket_id(&b);
    let reply = a.invoke("direct", json!({ "to": b_id, "text": "psst" })).await.unwrap();
    assert_eq!(reply["data"]["open"], json!(2), "{reply}");
    let got = b.recv_matching(|m| m["event"] == "direct", WAIT).await.unwrap();
    assert_eq!(got["data"], json!({ "from": socket_id(&a), "text": "psst" }));
    let reply = a.invoke("direct", json!({ "to": "gone", "text": "?" })).await.unwrap();
    assert_eq!(reply["error"]["name"], "NoSuchSocket", "{reply}");
    // A closed socket leaves the list.
    drop(b);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let reply = a.invoke("direct", json!({ "to": b_id, "text": "?" })).await.unwrap();
        if reply["error"]["name"] == "NoSuchSocket" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "b still listed: {reply}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(a);
    cluster.shutdown().await;
}

#[tokio::test]
async fn events_and_hooks_run_in_order_and_may_publish() {
    let journal = Journal::default();
    let cluster = start(journal.clone()).await;
    let mut watcher = connect(&cluster).await;
    watcher.subscribe("left").await.unwrap();
    watcher.subscribe("notes").await.unwrap();

    let mut client = connect(&cluster).await;
    let id = socket_id(&client);
    client.transmit("note", json!({ "channel": "notes", "text": "hi" })).await.unwrap();
    assert_eq!(watcher.next_publish("notes", WAIT).await.unwrap(), json!({ "note": "hi" }));
    // A transmitted event with the wrong shape is dropped, not answered; an invoke of it gets
    // the error.
    client.transmit("note", json!(42)).await.unwrap();
    let reply = client.invoke("note", json!(42)).await.unwrap();
    assert_eq!(reply["error"]["name"], "InvalidArgumentsError", "{reply}");
    assert!(reply["error"]["message"].as_str().unwrap().contains("\"note\" event"), "{reply}");

    client.subscribe("room/a").await.unwrap();
    client.subscribe("room/b").await.unwrap();
    client.invoke("login", json!({ "username": "ada" })).await.unwrap();
    let reply = client.invoke("#unsubscribe", json!("room/a")).await.unwrap();
    assert!(reply.get("error").is_none(), "{reply}");
    client.transmit("#removeAuthToken", Value::Null).await.unwrap();
    // Round trip so that everything before was handled.
    client.invoke("count", Value::Null).await.unwrap();
    drop(client);
    assert_eq!(watcher.next_publish("left", WAIT).await.unwrap(), json!(id), "disconnect hook published");

    let mine: Vec<String> = journal
        .lock()
        .unwrap()
        .iter()
        .filter_map(|line| line.strip_prefix(&format!("{id} ")).map(str::to_owned))
        .collect();
    assert_eq!(
        mine,
        [
            "connect",
            "subscribe room/a",
            "subscribe room/b",
            "authenticate",
            "unsubscribe room/a",
            "deauthenticate",
            "unsubscribe room/b",
            // Dropped without a close frame: no code.
            "disconnect None",
        ]
        .map(String::from)
        .to_vec(),
        "every hook once, in order"
    );
    drop(watcher);
    cluster.shutdown().await;
}

#[tokio::test]
async fn app_routes_publish_and_the_workers_own_paths_stay() {
    let cluster = start(Journal::default()).await;
    let mut watcher = connect(&cluster).await;
    watcher.subscribe("news").await.unwrap();
    let (status, body) =
        http_post(cluster.worker(0), "/api/notify", &json!({ "channel": "news", "data": { "n": 1 } })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap(), json!({ "ok": true }));
    assert_eq!(watcher.next_publish("news", WAIT).await.unwrap(), json!({ "n": 1 }));

    // The worker's own paths are not the app's: health, and the backend API (off: no api_key).
    assert_eq!(http_get(LOCAL, cluster.worker(0), "/healthz").await.unwrap().0, 200);
    let (status, body) = http_post(cluster.worker(0), "/api/publish", &json!({ "channel": "news" })).await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("api_key"), "the backend API's own answer: {body}");
    // Not a route: the router's 404.
    assert_eq!(http_get(LOCAL, cluster.worker(0), "/api/other").await.unwrap().0, 404);
    drop(watcher);
    cluster.shutdown().await;
}

#[tokio::test]
async fn app_settings_that_do_not_fit_stop_the_start() {
    let mut config = sc_common::config::Config::default();
    config.worker.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.worker.grpc_listen = SocketAddr::from(([127, 0, 0, 1], 0));
    // `greeting` is missing.
    config.app.insert("limit".into(), 5.into());
    let error = sc_worker::Worker::bind_app(config, |ctx: AppContext<Settings>| app(ctx, Journal::default()))
        .await
        .expect_err("a start error");
    let text = error.to_string();
    assert!(text.contains("[app]") && text.contains("greeting"), "{text}");
}

/// A JSON POST over a fresh connection; the status and the body.
async fn http_post(addr: SocketAddr, path: &str, body: &Value) -> (u16, String) {
    let body = body.to_string();
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(WAIT, stream.read_to_string(&mut response)).await.unwrap().unwrap();
    let status = response.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}
