//! {{name}}: a SocketCluster app on sc-rs. Browsers and the stock `socketcluster-client` talk
//! to it unchanged:
//!
//! - procedure `hello` (`socket.invoke('hello', { name })`) answers `{ message }`, made with
//!   the `greeting` of `[app]` in sc.toml;
//! - event `note` (`socket.transmit('note', { text })`) is counted per socket and answered with
//!   a `noted` event (`{ text, count }`) to that socket alone;
//! - `POST /api/notify` with `{ "text": ... }` publishes `{ text }` to the `notifications`
//!   channel, to every subscriber on every worker (through the brokers);
//! - `public/` (`[worker] static_dir`) holds the page, served at `/`.

use serde::{Deserialize, Serialize};
use serde_json::json;
use sc_worker::axum::extract::{Json, State};
use sc_worker::axum::http::StatusCode;
use sc_worker::axum::{Router, routing::post};
use sc_worker::{App, AppContext, Exchange};

/// The `[app]` table of sc.toml (and `SC_APP__*` variables).
#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    /// The first word of `hello`'s answer.
    pub greeting: String,
}

/// What `hello` takes.
#[derive(Debug, Deserialize)]
pub struct Hello {
    /// Who to greet.
    pub name: String,
}

/// What `hello` answers.
#[derive(Debug, Serialize)]
pub struct Greeting {
    /// `<greeting>, <name>!`
    pub message: String,
}

/// A note: what the `note` event and `POST /api/notify` take.
#[derive(Debug, Deserialize)]
pub struct Note {
    /// The note's text.
    pub text: String,
}

/// How many notes a socket has sent (its per-socket state).
struct NoteCount(u64);

/// The app: what each worker runs.
pub fn app(ctx: AppContext<Settings>) -> App {
    let greeting = ctx.config.greeting;
    App::new()
        .procedure("hello", move |_socket, hello: Hello| {
            let message = format!("{greeting}, {}!", hello.name);
            async move { Ok(Greeting { message }) }
        })
        .on("note", |socket, note: Note| async move {
            let count = socket.state::<NoteCount>().map_or(0, |sent| sent.0) + 1;
            socket.insert(NoteCount(count));
            socket.transmit("noted", &json!({ "text": note.text, "count": count }));
        })
        .routes(Router::new().route("/api/notify", post(notify)).with_state(ctx.exchange))
}

/// `POST /api/notify`: publishes the note to `notifications`; 202 once a broker has it.
async fn notify(State(exchange): State<Exchange>, Json(note): Json<Note>) -> (StatusCode, String) {
    match exchange.publish("notifications", &json!({ "text": note.text })).await {
        Ok(()) => (StatusCode::ACCEPTED, "published\n".to_owned()),
        Err(e) => (e.http_status(), format!("{e}\n")),
    }
}
