//! The app of docs/app-guide.md, on sc-rs: login, a chat room whose history is kept in the
//! exchange, who is in the room (presence), and the history over HTTP. server.js beside this
//! folder's Cargo.toml is the same app on socketcluster-server 20; count-lines.sh compares them.
//! Run it: `cargo run -p guide-app -- -c examples/guide-app/sc.toml` (`sc_worker::launch`).

use sc_worker::axum::{Json, Router, extract::State, routing::get};
use sc_worker::{App, AppContext, ErrorObject, Exchange, Socket};
use serde::Deserialize;
use serde_json::{Value, json};

const ROOM: &str = "chat/lobby";
const HISTORY: &str = "history/chat/lobby";

// The `[app]` table of sc.toml.
#[derive(Deserialize)]
struct Settings {
    history: i64,
}

#[derive(Deserialize)]
struct Login {
    username: String,
}

#[derive(Deserialize)]
struct Say {
    text: String,
}

fn app(ctx: AppContext<Settings>) -> App {
    let keep = ctx.config.history;
    App::new()
        .procedure("login", |socket, login: Login| async move {
            if login.username.is_empty() {
                return Err(ErrorObject::new("LoginError", "a name is required"));
            }
            socket.set_auth_token(json!({ "username": login.username }))?;
            Ok(())
        })
        .allow_subscribe(|socket, _channel| async move { username(&socket).map(drop) })
        .procedure("say", move |socket, say: Say| async move {
            let message = json!({ "from": username(&socket)?, "text": say.text });
            let exchange = socket.exchange();
            exchange.add(HISTORY, &message).await?;
            exchange.remove_range(HISTORY, 0, Some(-keep)).await?;
            exchange.publish(ROOM, &message).await?;
            Ok(())
        })
        .procedure("history", |socket, (): ()| async move {
            Ok(socket.exchange().get_range(HISTORY, 0, None).await?)
        })
        .procedure("who", |socket, (): ()| async move { Ok(socket.exchange().presence(ROOM).await?) })
        .routes(Router::new().route("/api/history", get(history)).with_state(ctx.exchange))
}

// The logged-in user's name, from the signed auth token.
fn username(socket: &Socket) -> Result<String, ErrorObject> {
    let token = socket.auth_token();
    let name = token.as_ref().and_then(|token| token["username"].as_str());
    name.map(str::to_owned).ok_or_else(|| ErrorObject::new("LoginRequired", "log in first"))
}

async fn history(State(exchange): State<Exchange>) -> Json<Vec<Value>> {
    Json(exchange.get_range(HISTORY, 0, None).await.unwrap_or_default())
}

fn main() -> std::process::ExitCode {
    sc_worker::launch(app)
}
