//! The client against the reference: the stock Node servers from /work/shared/peers
//! (socketcluster-server 20 in protocol v2 and v1 mode, and the socketcluster 14 framework).
//!
//! `SC_PEERS_DIR` must name a copy of that folder with its npm packages installed (`npm ci`);
//! without it, or without `node`, every test reports itself skipped (`SKIPPED: ...`, which
//! tests/run.sh counts) and passes without running.
//! `SC_CLIENT_TEST_URL` (optional) runs the same session against any other server, such as a
//! running sc-rs cluster (`ws://127.0.0.1:8000/socketcluster/`), in protocol v2, or v1 with
//! `SC_CLIENT_TEST_PROTOCOL=1`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use rustix::process::{Pid, Signal, kill_process_group};
use sc_client::{Client, ClientConfig, Error, Event, Events, ProtocolVersion};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};

const WITHIN: Duration = Duration::from_secs(5);

/// A stock server process (and, for sc14, its children: they share its process group).
struct Peer {
    child: Child,
    url: String,
}

impl Peer {
    /// Starts `servers/<script>` on a free port with `env`; `None` (after reporting the skip)
    /// when the peers are not installed here.
    ///
    /// The stock servers are told their port and report the port they were told, not the one
    /// they got, so the port is picked here: one that another process took in between makes the
    /// server exit with EADDRINUSE before READY, and it is started again on another port. (sc14
    /// does not exit then, its master respawning the worker instead: a collision there fails
    /// the test, as it did before.)
    async fn start(script: &str, env: &[(&str, &str)]) -> Result<Option<Self>> {
        let Some(dir) = peers_dir().await else {
            return Ok(None);
        };
        let mut attempt = 1;
        loop {
            let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            match Self::start_on(&dir, script, env, port).await? {
                Some(peer) => return Ok(Some(peer)),
                None if attempt < 3 => eprintln!("{script}: port {port} was taken; again with another"),
                None => bail!("{script}: the port was taken {attempt} times"),
            }
            attempt += 1;
        }
    }

    /// Starts `script` on `port`; `None` if the port is in use.
    async fn start_on(dir: &Path, script: &str, env: &[(&str, &str)], port: u16) -> Result<Option<Self>> {
        let mut child = Command::new("node")
            .arg(format!("servers/{script}"))
            .arg(port.to_string())
            .current_dir(dir)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .context("spawn node")?;
        let stdout = child.stdout.take().context("stdout")?;
        let mut stderr = child.stderr.take().context("stderr")?;
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await? {
                if line.starts_with("READY") {
                    return Ok(true);
                }
            }
            Ok::<_, std::io::Error>(false)
        })
        .await
        .with_context(|| format!("{script}: no READY line within 60s"))??;
        if !ready {
            let mut text = String::new();
            let _ = child.wait().await;
            let _ = stderr.read_to_string(&mut text).await;
            if text.contains("EADDRINUSE") {
                return Ok(None);
            }
            bail!("{script} exited before READY: {text}");
        }
        // Keep draining stdout and stderr so that the server never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        tokio::spawn(async move { tokio::io::copy(&mut stderr, &mut tokio::io::stderr()).await });
        // sc14 prints READY from its master, a moment before its worker listens.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            if tokio::time::Instant::now() > deadline {
                bail!("{script}: port {port} not listening 20s after READY");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Some(Self { child, url: format!("ws://127.0.0.1:{port}/socketcluster/") }))
    }

    fn config(&self, protocol: ProtocolVersion) -> ClientConfig {
        ClientConfig::new(&self.url).with_protocol(protocol)
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if let Some(pid) = self.child.id().and_then(|pid| Pid::from_raw(pid as i32)) {
            // The whole group this test started: sc14's master, worker cluster and brokers.
            let _ = kill_process_group(pid, Signal::KILL);
        }
    }
}

async fn peers_dir() -> Option<PathBuf> {
    let Some(dir) = std::env::var_os("SC_PEERS_DIR").map(PathBuf::from) else {
        skip("SC_PEERS_DIR is not set (a copy of /work/shared/peers after `npm ci`)");
        return None;
    };
    if !dir.join("node_modules").is_dir() {
        skip(&format!("{} has no node_modules (run `npm ci` there)", dir.display()));
        return None;
    }
    if Command::new("node").arg("--version").output().await.is_err() {
        skip("node is not installed");
        return None;
    }
    Some(dir)
}

/// Reports a test that did not run here, as sc_tests::skip does (this crate does not depend on
/// the tests crate): `SKIPPED: <test binary>::<test>: <why>` to stderr past the test harness's
/// capture, and appended to `skipped-tests.txt` in the target folder for tests/run.sh.
fn skip(why: &str) {
    use std::io::Write;
    let exe = std::env::current_exe().ok();
    let binary = exe
        .as_deref()
        .and_then(|e| e.file_stem())
        .and_then(|s| s.to_str())
        .map(|s| s.rsplit_once('-').map_or(s, |(name, _hash)| name).to_owned())
        .unwrap_or_default();
    let line = format!("SKIPPED: {binary}::{}: {why}", std::thread::current().name().unwrap_or("?"));
    let _ = writeln!(std::io::stderr(), "{line}");
    // target/<profile>/deps/<test binary> -> target
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .or_else(|| Some(exe?.parent()?.parent()?.parent()?.to_path_buf()));
    if let Some(target) = target {
        let file =
            std::fs::OpenOptions::new().create(true).append(true).open(target.join("skipped-tests.txt"));
        if let Ok(mut file) = file {
            let _ = writeln!(file, "{line}");
        }
    }
}

/// The next event other than raw frames; fails on a close.
async fn next_event(events: &mut Events) -> Result<Event> {
    loop {
        let event =
            tokio::time::timeout(WITHIN, events.recv()).await.context("no event")?.context("events ended")?;
        match event {
            Event::Raw(_) => {}
            Event::Closed(info) => bail!("connection closed: {info}"),
            event => return Ok(event),
        }
    }
}

/// The data of the next publish, which must be on `channel`.
async fn next_publish(events: &mut Events, channel: &str) -> Result<serde_json::Value> {
    match next_event(events).await? {
        event @ Event::Publish { .. } => {
            let Event::Publish { channel: got, .. } = &event else { unreachable!() };
            assert_eq!(got, channel);
            event.data_value().context("publish data")
        }
        other => bail!("expected a publish on {channel}, got {other:?}"),
    }
}

/// Nothing but raw frames (pings of the other version) waiting.
fn assert_no_events(events: &mut Events) {
    while let Some(event) = events.try_recv() {
        assert!(matches!(event, Event::Raw(_)), "unexpected {event:?}");
    }
}

/// The session every server must get right: handshake, pub/sub with fan-out and self-echo,
/// invoke, unknown invoke, unsubscribe, bad input, authentication failure.
async fn session(config: ClientConfig, stock: bool) -> Result<()> {
    let mut config = config;
    config.ack_timeout = Duration::from_secs(2);
    let (a, mut a_events) = sc_client::connect(config.clone()).await?;
    let (b, mut b_events) = sc_client::connect(config).await?;
    assert_eq!(a.id().len(), 20, "base64id");
    assert_ne!(a.id(), b.id());
    assert!(!a.handshake().is_authenticated);

    a.subscribe("news").await?;
    b.subscribe("news").await?;
    a.publish("news", json!({"n": 1, "s": "é\""})).await?;
    if stock {
        // The stock servers deliver to the publisher itself before the ack.
        assert_eq!(a_events.try_recv().and_then(|e| e.data_value()), Some(json!({"n": 1, "s": "é\""})));
    } else {
        assert_eq!(next_publish(&mut a_events, "news").await?, json!({"n": 1, "s": "é\""}));
    }
    assert_eq!(next_publish(&mut b_events, "news").await?, json!({"n": 1, "s": "é\""}));
    b.transmit_publish("news", 2).await?;
    assert_eq!(next_publish(&mut a_events, "news").await?, json!(2));
    assert_eq!(next_publish(&mut b_events, "news").await?, json!(2));

    a.unsubscribe("news").await?;
    a.publish("news", 3).await?;
    assert_eq!(next_publish(&mut b_events, "news").await?, json!(3));
    if !stock {
        // Other servers may ack before their fan-out: give a wrong delivery time to show (a
        // fixed wait on purpose: nothing may arrive during it).
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_no_events(&mut a_events);

    if stock {
        assert_eq!(a.invoke("echo", json!({"x": [1, 2]})).await?, json!({"x": [1, 2]}));
        // The stock servers never answer an unknown procedure.
        assert!(matches!(a.invoke("no-such-procedure", 1).await, Err(Error::Timeout { .. })));
    }

    match a.authenticate("not.a.token").await {
        Err(Error::Remote { name, .. }) => assert_eq!(name, "AuthTokenInvalidError"),
        other => bail!("expected AuthTokenInvalidError, got {other:?}"),
    }
    assert_eq!(a.auth_token(), None);
    assert!(matches!(next_event(&mut a_events).await?, Event::RemoveAuthToken));

    // Both still work after all that.
    a.subscribe("after").await?;
    b.publish("after", "x").await?;
    assert_eq!(next_publish(&mut a_events, "after").await?, json!("x"));
    let info = a.disconnect(1000, "").await;
    assert_eq!(info.code, Some(1000));
    // What is left is at most a v1 #disconnect echo, then the close.
    loop {
        match next_event(&mut a_events).await {
            Ok(Event::Disconnect { .. }) => {}
            Err(e) if e.to_string().contains("closed") => break,
            other => bail!("expected the close, got {other:?}"),
        }
    }
    assert!(matches!(a.publish("after", 1).await, Err(Error::Closed(_))));
    b.disconnect(1000, "").await;
    Ok(())
}

#[tokio::test]
async fn sc20_v2_session() -> Result<()> {
    let Some(peer) = Peer::start("sc20.js", &[("SC_PROTOCOL", "2")]).await? else {
        return Ok(());
    };
    session(peer.config(ProtocolVersion::V2), true).await
}

#[tokio::test]
async fn sc20_v1_session() -> Result<()> {
    let Some(peer) = Peer::start("sc20.js", &[("SC_PROTOCOL", "1")]).await? else {
        return Ok(());
    };
    session(peer.config(ProtocolVersion::V1), true).await
}

#[tokio::test]
async fn sc14_v1_session_and_disconnect_code() -> Result<()> {
    let Some(peer) = Peer::start("sc14.js", &[]).await? else {
        return Ok(());
    };
    session(peer.config(ProtocolVersion::V1), true).await?;
    // A v14 server closes with the code of our #disconnect.
    let (client, _events) = sc_client::connect(peer.config(ProtocolVersion::V1)).await?;
    assert_eq!(client.handshake().ping_timeout, Duration::from_secs(20));
    let info = client.disconnect(4321, "bye").await;
    assert_eq!(info.code, Some(4321));
    Ok(())
}

/// The same session against any server, e.g. a running sc-rs cluster.
#[tokio::test]
async fn session_against_url_from_env() -> Result<()> {
    let Ok(url) = std::env::var("SC_CLIENT_TEST_URL") else {
        skip("SC_CLIENT_TEST_URL is not set");
        return Ok(());
    };
    let protocol = match std::env::var("SC_CLIENT_TEST_PROTOCOL").as_deref() {
        Ok("1") => ProtocolVersion::V1,
        _ => ProtocolVersion::V2,
    };
    session(ClientConfig::new(url).with_protocol(protocol), false).await
}

#[tokio::test]
async fn sc20_pings_keep_both_versions_alive() -> Result<()> {
    for (protocol, version) in [(ProtocolVersion::V2, "2"), (ProtocolVersion::V1, "1")] {
        let env = [("SC_PROTOCOL", version), ("SC_PING_INTERVAL", "100"), ("SC_PING_TIMEOUT", "500")];
        let Some(peer) = Peer::start("sc20.js", &env).await? else {
            return Ok(());
        };
        let (client, mut events) = sc_client::connect(peer.config(protocol)).await?;
        assert_eq!(client.handshake().ping_timeout, Duration::from_millis(500));
        // Three server pong timeouts and three client ping timeouts: a fixed wait on purpose,
        // the connection must outlive it.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(client.close_info(), None, "{protocol:?}");
        assert_eq!(client.invoke("echo", 5).await?, json!(5));
        assert!(events.try_recv().is_none(), "pings are not events");
    }
    Ok(())
}

#[tokio::test]
async fn protocol_mismatch_ends_in_server_pong_timeout() -> Result<()> {
    let env = [("SC_PROTOCOL", "2"), ("SC_PING_INTERVAL", "100"), ("SC_PING_TIMEOUT", "500")];
    let Some(peer) = Peer::start("sc20.js", &env).await? else {
        return Ok(());
    };
    let mut config = peer.config(ProtocolVersion::V1);
    config.ping_timeout_disabled = true;
    let (client, mut events) = sc_client::connect(config).await?;
    // The v2 pings reach a v1 client as raw frames, it never pongs, and the server gives up.
    assert!(matches!(events.recv().await, Some(Event::Raw(text)) if text.is_empty()));
    let info = tokio::time::timeout(WITHIN, client.closed()).await?;
    assert_eq!(info.code, Some(4001), "{info}");
    Ok(())
}

#[tokio::test]
async fn sc20_server_close_codes() -> Result<()> {
    let Some(peer) = Peer::start("sc20.js", &[]).await? else {
        return Ok(());
    };
    let (client, _events) = sc_client::connect(peer.config(ProtocolVersion::V2)).await?;
    // v18.1+ closes a socket that sends #authenticate without a cid.
    client.send_raw(r##"{"event":"#authenticate","data":"x"}"##).await?;
    let info = tokio::time::timeout(WITHIN, client.closed()).await?;
    assert_eq!(info.code, Some(4008), "{info}");

    // A bad token in the handshake: the handshake succeeds, with authError, then the server
    // removes the token.
    let mut config = peer.config(ProtocolVersion::V2);
    config.auth_token = Some("bad.token.here".into());
    let (client, mut events) = sc_client::connect(config).await?;
    let handshake = client.handshake();
    assert!(!handshake.is_authenticated);
    assert_eq!(
        handshake.auth_error.as_ref().map(|e| e["name"].clone()),
        Some(json!("AuthTokenInvalidError"))
    );
    assert!(matches!(next_event(&mut events).await?, Event::RemoveAuthToken));
    assert_eq!(client.auth_token(), None);

    // The stock server rejects a string as #subscribe data.
    match client.invoke("#subscribe", "news").await {
        Err(Error::Remote { name, .. }) => assert_eq!(name, "InvalidActionError"),
        other => bail!("expected InvalidActionError, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn batches_both_ways() -> Result<()> {
    let env = [("SC_BATCH", "1"), ("SC_BATCH_INTERVAL", "50")];
    let Some(peer) = Peer::start("sc20.js", &env).await? else {
        return Ok(());
    };
    let (client, mut events) = sc_client::connect(peer.config(ProtocolVersion::V2)).await?;
    client.subscribe("b").await?;
    // The server batches its frames (JSON arrays); the client handles each element in order.
    for i in 0..20 {
        client.transmit_publish("b", i).await?;
    }
    for i in 0..20 {
        assert_eq!(next_publish(&mut events, "b").await?, json!(i));
    }
    // A batch from the client.
    client
        .send_raw(
            r##"[{"event":"#publish","data":{"channel":"b","data":"x"}},{"event":"#publish","data":{"channel":"b","data":"y"}}]"##,
        )
        .await?;
    assert_eq!(next_publish(&mut events, "b").await?, json!("x"));
    assert_eq!(next_publish(&mut events, "b").await?, json!("y"));
    // Many concurrent invokes from clones of one handle, all matched to their replies.
    let calls = (0..50).map(|i| {
        let client: Client = client.clone();
        tokio::spawn(async move { client.invoke("echo", i).await })
    });
    for (i, call) in calls.collect::<Vec<_>>().into_iter().enumerate() {
        assert_eq!(call.await??, json!(i));
    }
    Ok(())
}
