//! The client against a scripted server: a bare tungstenite WebSocket on port 0 whose frames the
//! test writes by hand. Covers what the stock servers cannot be made to send on demand (server
//! invokes, handshake rejections, v1 `#disconnect`, batches with junk, a server that stops
//! pinging) and checks the exact frames the client writes.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures_util::{SinkExt, StreamExt};
use sc_client::{ClientConfig, CloseInfo, Error, Event, Events, ProtocolVersion};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

const WITHIN: Duration = Duration::from_secs(5);

/// The server end of one connection.
struct Server {
    ws: WebSocketStream<TcpStream>,
    peer: SocketAddr,
}

impl Server {
    /// The next text frame.
    async fn recv(&mut self) -> Result<String> {
        loop {
            let message = tokio::time::timeout(WITHIN, self.ws.next())
                .await
                .context("no frame from the client")?
                .context("client went away")??;
            match message {
                Message::Text(text) => return Ok(text.to_string()),
                Message::Close(frame) => bail!("client closed: {frame:?}"),
                _ => {}
            }
        }
    }

    /// The next frame as JSON.
    async fn recv_json(&mut self) -> Result<Value> {
        Ok(serde_json::from_str(&self.recv().await?)?)
    }

    async fn send(&mut self, text: &str) -> Result<()> {
        self.ws.send(Message::text(text)).await?;
        Ok(())
    }

    /// Expects the client's `#handshake` and answers with `data`.
    async fn handshake(&mut self, data: Value) -> Result<()> {
        let request = self.recv_json().await?;
        assert_eq!(request["event"], "#handshake");
        assert_eq!(request["cid"], 1);
        self.send(&json!({"rid": 1, "data": data}).to_string()).await
    }

    /// Waits for the client's close frame and returns its code.
    async fn client_close_code(&mut self) -> Result<Option<u16>> {
        loop {
            let message =
                tokio::time::timeout(WITHIN, self.ws.next()).await.context("client did not close")?;
            match message {
                Some(Ok(Message::Close(frame))) => return Ok(frame.map(|f| u16::from(f.code))),
                Some(Ok(_)) => {}
                None | Some(Err(_)) => return Ok(None),
            }
        }
    }

    async fn close(&mut self, code: u16, reason: &str) -> Result<()> {
        self.ws.close(Some(CloseFrame { code: code.into(), reason: reason.into() })).await?;
        // Wait for the client's answer so that the close handshake completes.
        while let Some(Ok(_)) = self.ws.next().await {}
        Ok(())
    }
}

/// Serves one connection with `script`; returns the URL and the script's outcome.
async fn serve_once<F, Fut>(script: F) -> Result<(String, JoinHandle<Result<()>>)>
where
    F: FnOnce(Server) -> Fut + Send + 'static,
    Fut: Future<Output = Result<()>> + Send,
{
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("ws://{}/socketcluster/", listener.local_addr()?);
    let task = tokio::spawn(async move {
        let (tcp, peer) = listener.accept().await?;
        let ws = tokio_tungstenite::accept_async(tcp).await?;
        script(Server { ws, peer }).await
    });
    Ok((url, task))
}

fn handshake_ok(ping_timeout_ms: u64) -> Value {
    json!({"id": "abcdefghijklmnopqrst", "pingTimeout": ping_timeout_ms, "isAuthenticated": false})
}

async fn next_event(events: &mut Events) -> Result<Event> {
    tokio::time::timeout(WITHIN, events.recv()).await.context("no event")?.context("events ended")
}

#[tokio::test]
async fn v2_session_with_server_invokes_batches_and_close_reason() -> Result<()> {
    let (url, server) = serve_once(|mut s| async move {
        let request = s.recv().await?;
        assert_eq!(
            request,
            r##"{"event":"#handshake","data":{"authToken":null},"cid":1}"##
        );
        s.send(&json!({"rid": 1, "data": handshake_ok(5000)}).to_string())
            .await?;
        // Our calls: cids count on from 2, data verbatim.
        assert_eq!(
            s.recv().await?,
            r##"{"event":"#subscribe","data":{"channel":"c"},"cid":2}"##
        );
        s.send(r#"{"rid":2}"#).await?;
        s.send(r##"{"event":"ask","cid":7,"data":{"q":1}}"##).await?;
        assert_eq!(s.recv().await?, r#"{"rid":7,"data":{"a":2}}"#);
        s.send(r##"{"event":"#setAuthToken","data":{"token":"a.b.c"},"cid":8}"##)
            .await?;
        assert_eq!(s.recv().await?, r#"{"rid":8}"#);
        s.send(
            r##"[{"event":"#publish","data":{"channel":"c","data":1}},{"event":"#kickOut","data":{"channel":"c","message":"bye"}},5]"##,
        )
        .await?;
        s.send("hello").await?;
        s.send(r#"{"event":"push"}"#).await?;
        s.send("").await?;
        assert_eq!(s.recv().await?, "", "pong");
        s.send(r##"{"event":"#removeAuthToken"}"##).await?;
        s.close(4567, "custom reason").await
    })
    .await?;
    let (client, mut events) = sc_client::connect(ClientConfig::new(&url)).await?;
    assert_eq!(client.id(), "abcdefghijklmnopqrst");
    assert_eq!(client.handshake().ping_timeout, Duration::from_secs(5));
    client.subscribe("c").await?;

    let Event::Invoke { event, data, responder } = next_event(&mut events).await? else {
        bail!("expected an invoke")
    };
    assert_eq!((event.as_str(), data.get()), ("ask", r#"{"q":1}"#));
    responder.end(json!({"a": 2})).await?;

    assert!(matches!(next_event(&mut events).await?, Event::SetAuthToken(t) if t == "a.b.c"));
    assert_eq!(client.auth_token().as_deref(), Some("a.b.c"));
    let Event::Publish { channel, data } = next_event(&mut events).await? else {
        bail!("expected a publish")
    };
    assert_eq!((channel.as_str(), data.get()), ("c", "1"));
    let Event::KickOut { channel, message } = next_event(&mut events).await? else {
        bail!("expected a kick out")
    };
    assert_eq!((channel.as_str(), message), ("c", json!("bye")));
    // A batch element that is not an object surfaces the whole frame as raw, like the stock
    // client.
    assert!(matches!(next_event(&mut events).await?, Event::Raw(t) if t.starts_with('[')));
    assert!(matches!(next_event(&mut events).await?, Event::Raw(t) if t == "hello"));
    assert!(
        matches!(next_event(&mut events).await?, Event::Transmit { event, data } if event == "push" && data.get() == "null")
    );
    assert!(matches!(next_event(&mut events).await?, Event::RemoveAuthToken));
    let closed = CloseInfo { code: Some(4567), reason: "custom reason".into() };
    assert!(matches!(next_event(&mut events).await?, Event::Closed(info) if info == closed));
    assert_eq!(client.closed().await, closed);
    assert_eq!(client.auth_token(), None);
    assert!(matches!(
        client.invoke("late", 1).await,
        Err(Error::Closed(info)) if info == closed
    ));
    server.await?
}

#[tokio::test]
async fn v1_pings_string_cids_and_disconnect() -> Result<()> {
    let (url, server) = serve_once(|mut s| async move {
        s.handshake(handshake_ok(5000)).await?;
        s.send("#1").await?;
        assert_eq!(s.recv().await?, "#2");
        // v1 clients take any cid and echo it with its type.
        s.send(r##"{"event":"ask","cid":"x"}"##).await?;
        assert_eq!(s.recv().await?, r#"{"rid":"x","error":{"message":"m","name":"E"}}"#);
        // A v2 ping is raw for a v1 client and gets no pong.
        s.send("").await?;
        s.send(r##"{"event":"#disconnect","data":{"code":4100,"data":"going"}}"##).await?;
        assert_eq!(s.client_close_code().await?, Some(4100));
        Ok(())
    })
    .await?;
    let config = ClientConfig::new(&url).with_protocol(ProtocolVersion::V1);
    let (client, mut events) = sc_client::connect(config).await?;
    let Event::Invoke { responder, .. } = next_event(&mut events).await? else { bail!("expected an invoke") };
    assert_eq!(responder.cid(), "\"x\"");
    responder.error("E", "m").await?;
    assert!(matches!(next_event(&mut events).await?, Event::Raw(t) if t.is_empty()));
    assert!(matches!(
        next_event(&mut events).await?,
        Event::Disconnect { code: Some(4100), reason } if reason == "going"
    ));
    let closed = CloseInfo { code: Some(4100), reason: "going".into() };
    assert_eq!(client.closed().await, closed);
    server.await?
}

#[tokio::test]
async fn handshake_rejections_close_with_the_servers_code() -> Result<()> {
    let cases = [
        (
            ProtocolVersion::V2,
            json!({"rid": 1, "error": {"name": "Blocked", "message": "no", "statusCode": 4444}}),
            4444,
        ),
        (
            ProtocolVersion::V1,
            json!({"rid": 1, "error": {"name": "Blocked", "message": "no"}, "data": {"code": 4008}}),
            4008,
        ),
        (ProtocolVersion::V2, json!({"rid": 1, "error": {"name": "Blocked", "message": "no"}}), 4003),
    ];
    for (protocol, reply, code) in cases {
        let (url, server) = serve_once(move |mut s| async move {
            s.recv().await?;
            s.send(&reply.to_string()).await?;
            assert_eq!(s.client_close_code().await?, Some(code));
            Ok(())
        })
        .await?;
        let outcome = sc_client::connect(ClientConfig::new(&url).with_protocol(protocol)).await;
        match outcome {
            Err(Error::HandshakeRejected { code: got, name, .. }) => {
                assert_eq!((got, name.as_str()), (code, "Blocked"))
            }
            other => bail!("expected a rejection, got {other:?}"),
        }
        server.await??;
    }
    Ok(())
}

#[tokio::test]
async fn no_ping_within_ping_timeout_closes_4000_and_fails_pending_invokes() -> Result<()> {
    let (url, server) = serve_once(|mut s| async move {
        s.handshake(handshake_ok(300)).await?;
        assert_eq!(s.recv_json().await?["event"], "never-answered");
        assert_eq!(s.client_close_code().await?, Some(4000));
        Ok(())
    })
    .await?;
    let (client, _events) = sc_client::connect(ClientConfig::new(&url)).await?;
    let outcome = client.invoke("never-answered", ()).await;
    assert!(matches!(&outcome, Err(Error::Closed(info)) if info.code == Some(4000)), "{outcome:?}");
    server.await?
}

#[tokio::test]
async fn ping_timeout_can_be_disabled_and_disconnect_sends_our_code() -> Result<()> {
    let (url, server) = serve_once(|mut s| async move {
        s.handshake(handshake_ok(200)).await?;
        assert_eq!(s.client_close_code().await?, Some(4321));
        Ok(())
    })
    .await?;
    let mut config = ClientConfig::new(&url);
    config.ping_timeout_disabled = true;
    let (client, _events) = sc_client::connect(config).await?;
    // Three ping timeouts pass (a fixed wait on purpose: nothing may close the client).
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(client.close_info(), None, "still open after 3 ping timeouts");
    let info = client.disconnect(4321, "bye").await;
    assert_eq!(info.code, Some(4321));
    server.await?
}

#[tokio::test]
async fn invoke_timeout_and_remote_errors() -> Result<()> {
    let (url, server) = serve_once(|mut s| async move {
        s.handshake(handshake_ok(5000)).await?;
        assert_eq!(s.recv_json().await?["event"], "slow");
        let failing = s.recv_json().await?;
        let reply = json!({"rid": failing["cid"], "error": {"name": "CustomError", "message": "bad thing", "extra": 42}});
        s.send(&reply.to_string()).await?;
        let stringly = s.recv_json().await?;
        s.send(&json!({"rid": stringly["cid"], "error": "plain"}).to_string())
            .await?;
        // The late reply to "slow" is dropped without harm.
        s.send(r#"{"rid":2,"data":1}"#).await?;
        s.close(1000, "").await
    })
    .await?;
    let mut config = ClientConfig::new(&url);
    config.ack_timeout = Duration::from_millis(200);
    let (client, _events) = sc_client::connect(config).await?;
    assert!(matches!(
        client.invoke("slow", ()).await,
        Err(Error::Timeout { event, .. }) if event == "slow"
    ));
    match client.invoke("failing", ()).await {
        Err(Error::Remote { name, message, raw }) => {
            assert_eq!((name.as_str(), message.as_str()), ("CustomError", "bad thing"));
            assert_eq!(raw["extra"], 42);
        }
        other => bail!("expected a remote error, got {other:?}"),
    }
    assert!(matches!(
        client.invoke("stringly", ()).await,
        Err(Error::Remote { message, .. }) if message == "plain"
    ));
    assert_eq!(client.closed().await.code, Some(1000));
    server.await?
}

#[tokio::test]
async fn frames_keep_their_order_and_local_addr_is_bound() -> Result<()> {
    const N: usize = 500;
    let (url, server) = serve_once(|mut s| async move {
        assert_eq!(s.peer.ip(), "127.0.0.2".parse::<IpAddr>()?);
        s.handshake(handshake_ok(5000)).await?;
        for i in 0..N {
            let frame = s.recv_json().await?;
            assert_eq!(frame, json!({"event": "n", "data": i}));
        }
        // The last handle dropped: the client closes normally.
        assert_eq!(s.client_close_code().await?, Some(1000));
        Ok(())
    })
    .await?;
    let mut config = ClientConfig::new(&url);
    config.local_addr = Some("127.0.0.2".parse()?);
    let (client, _events) = sc_client::connect(config).await?;
    for i in 0..N {
        client.transmit("n", i).await?;
    }
    drop(client);
    server.await?
}

#[tokio::test]
async fn bad_urls_and_refused_connections() -> Result<()> {
    assert!(matches!(
        sc_client::connect(ClientConfig::new("ftp://127.0.0.1:1/socketcluster/")).await,
        Err(Error::UnsupportedScheme(s)) if s == "ftp"
    ));
    assert!(matches!(
        sc_client::connect(ClientConfig::new("not a url")).await,
        Err(Error::InvalidUrl { .. })
    ));
    // Bind then drop: the port is (almost certainly) closed.
    let port = TcpListener::bind("127.0.0.1:0").await?.local_addr()?.port();
    let url = format!("ws://127.0.0.1:{port}/socketcluster/");
    assert!(matches!(sc_client::connect(ClientConfig::new(url)).await, Err(Error::Io(_))));
    Ok(())
}
