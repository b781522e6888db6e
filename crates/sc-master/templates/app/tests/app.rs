//! The app's worker in this process, with the settings of sc.toml, driven by a SocketCluster
//! client over a real WebSocket: the `hello` procedure and the `note` event. (Publishing needs
//! brokers, so `POST /api/notify` is for a whole cluster: `cargo run`.)

use std::path::Path;
use std::time::Duration;

use sc_client::{ClientConfig, Event};
use sc_worker::{Config, Worker};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn hello_and_notes() {
    let overrides = [("SC_WORKER__LISTEN".to_owned(), "127.0.0.1:0".to_owned())];
    let config = Config::load_with_env(Some(Path::new("sc.toml")), overrides).expect("sc.toml");
    let worker = Worker::bind_app(config, {{crate}}::app).await.expect("bind the worker");
    let addr = worker.local_addr().expect("address");
    let shutdown = CancellationToken::new();
    let (_log, events) = tokio::sync::mpsc::channel(16);
    let serving = tokio::spawn(worker.serve(events, shutdown.clone()));

    let url = format!("ws://{addr}/socketcluster/");
    let (client, mut events) = sc_client::connect(ClientConfig::new(url)).await.expect("connect");
    let reply = client.invoke("hello", json!({ "name": "Ada" })).await.expect("hello");
    assert_eq!(reply, json!({ "message": "Hello, Ada!" }), "the greeting comes from sc.toml's [app]");

    for (text, count) in [("first", 1), ("second", 2)] {
        client.transmit("note", json!({ "text": text })).await.expect("transmit");
        let noted = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match events.recv().await {
                    Some(Event::Transmit { event, data }) if event == "noted" => {
                        return serde_json::from_str::<Value>(data.get()).ok();
                    }
                    Some(_) => {}
                    None => return None,
                }
            }
        })
        .await
        .expect("a noted event within 5s");
        assert_eq!(noted, Some(json!({ "text": text, "count": count })));
    }

    shutdown.cancel();
    serving.await.expect("worker task").expect("worker stopped cleanly");
}
