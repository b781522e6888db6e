//! The page and the stock browser client, served by the app's HTTP routes (files of
//! `[worker] static_dir`, when set, come first).
//!
//! - `GET /` (and `/index.html`): the page, `public/index.html`;
//! - `GET /socketcluster-client.min.js`: the browser build of the npm `socketcluster-client`
//!   (v20, an ES module), which the page imports. It is not in the repository: `npm ci` in
//!   examples/chat installs it under `node_modules/`, and the Docker image copies it beside the
//!   page.
//!
//! Both are looked for where the binary is installed first (`<prefix>/share/sc-rs/chat/` for
//! `<prefix>/bin/sc-chat-worker`, as in the Docker image), else in the source tree (a binary run
//! from target/). Files are read on each request, so `npm ci` after the start is enough.

use std::path::{Path, PathBuf};

use sc_worker::axum::Router;
use sc_worker::axum::http::{StatusCode, header};
use sc_worker::axum::response::{IntoResponse, Response};
use sc_worker::axum::routing::get;

/// Where the page and the client are installed, from the binary's folder.
const INSTALLED: &str = "../share/sc-rs/chat";
/// The client in the npm package (and where the image puts it, under the installed folder).
const CLIENT_IN_PACKAGE: &str = "node_modules/socketcluster-client/socketcluster-client.min.js";
const CLIENT_INSTALLED: &str = "client/socketcluster-client.min.js";

/// The source tree's copy of `relative`.
fn in_source(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// The installed copy of `relative`, if there is one.
fn installed(relative: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let path = exe.parent()?.join(INSTALLED).join(relative);
    path.exists().then_some(path)
}

/// The page's folder: the installed one if there is one, else the source tree's.
fn public_dir() -> PathBuf {
    installed("public").unwrap_or_else(|| in_source("public"))
}

/// The browser client: `configured` (`[app] client_js`), else the installed copy, else the
/// source tree's `node_modules`.
fn client_js(configured: Option<PathBuf>) -> PathBuf {
    configured.or_else(|| installed(CLIENT_INSTALLED)).unwrap_or_else(|| in_source(CLIENT_IN_PACKAGE))
}

/// The routes of the page and the client.
pub(crate) fn routes(configured_client: Option<PathBuf>) -> Router {
    let page = public_dir().join("index.html");
    let client = client_js(configured_client);
    if !client.is_file() {
        tracing::warn!(path = %client.display(), "no socketcluster-client.min.js: run `npm ci` in examples/chat (the page needs it)");
    }
    let index = move || file(page.clone(), "text/html; charset=utf-8");
    Router::new().route("/", get(index.clone())).route("/index.html", get(index)).route(
        "/socketcluster-client.min.js",
        get(move || file(client.clone(), "text/javascript; charset=utf-8")),
    )
}

/// A file as the response, or 404 saying which file is missing.
async fn file(path: PathBuf, content_type: &'static str) -> Response {
    match tokio::fs::read(&path).await {
        Ok(bytes) => ([(header::CONTENT_TYPE, content_type)], bytes).into_response(),
        Err(error) => {
            tracing::warn!(path = %path.display(), %error, "file not served");
            (StatusCode::NOT_FOUND, "not found\n").into_response()
        }
    }
}
