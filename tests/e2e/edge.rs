//! The edge of the cluster on the real binaries: the balancer's deadlines for connections that
//! are not WebSockets yet (`[balancer] first_byte_timeout`, `upgrade_timeout`), its accept
//! back-off when file descriptors run out, the master's admin API against cross-site and
//! DNS-rebinding requests (`[master] admin_token`), and bad configuration that fails fast
//! (an encrypted TLS key, a worker that cannot start).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sc_tests::{ADMIN_TOKEN, Client, Cluster, MasterProcess, TestCa, bin, eventually, tls_connect};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::Command;

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 5, last))
}

/// Short deadlines, so that the tests stay fast.
const DEADLINES: [(&str, &str); 2] =
    [("SC_BALANCER__FIRST_BYTE_TIMEOUT", "1s"), ("SC_BALANCER__UPGRADE_TIMEOUT", "3s")];

/// How long after `since` the server closed `stream` (a read of 0 bytes or an error), reading
/// and discarding what it sends; fails if it is still open after `within`.
async fn closed_after<S: AsyncRead + Unpin>(
    stream: &mut S,
    since: Instant,
    within: Duration,
) -> Result<Duration> {
    let mut sink = [0u8; 4096];
    let deadline = tokio::time::Instant::from_std(since + within);
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut sink)).await {
            Err(_) => bail!("connection still open {within:?} after it was opened"),
            Ok(Ok(0) | Err(_)) => return Ok(since.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

/// A partial HTTP request trickled a byte a second, as slowloris does; returns when the server
/// closed the connection (how long after `since`).
async fn slowloris<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    since: Instant,
    within: Duration,
) -> Result<Duration> {
    stream.write_all(b"GET /socketcluster/ HTTP/1.1\r\nHost: localhost\r\nX-Slow: ").await?;
    let mut sink = [0u8; 1024];
    while since.elapsed() < within {
        if stream.write_all(b"a").await.is_err() {
            return Ok(since.elapsed());
        }
        let read = tokio::time::timeout(Duration::from_secs(1), stream.read(&mut sink)).await;
        if let Ok(Ok(0) | Err(_)) = read {
            return Ok(since.elapsed());
        }
    }
    bail!("slowloris connection still open after {within:?}")
}

/// A keep-alive `GET /healthz`, answered, then silence; returns when the server closed the
/// connection (how long after `since`).
async fn keep_alive<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    since: Instant,
    within: Duration,
) -> Result<Duration> {
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n").await?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await?;
    assert_eq!(&head, b"HTTP/1.1 200", "answered");
    closed_after(stream, since, within).await
}

/// Asserts that `took` is the deadline `expected` (give or take the test's own slack).
fn near(what: &str, took: Duration, expected: Duration) {
    assert!(
        took >= expected.saturating_sub(Duration::from_millis(300))
            && took <= expected + Duration::from_millis(1500),
        "{what} closed after {took:?}, expected about {expected:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_slowloris_and_keep_alive_connections_are_closed_and_websockets_stay_open() -> Result<()> {
    let mut env = DEADLINES.to_vec();
    env.push(("SC_CLUSTER__WORKERS", "1"));
    let cluster = Cluster::start(&env).await?;
    let (first_byte, upgrade) = (Duration::from_secs(1), Duration::from_secs(3));
    let within = Duration::from_secs(8);
    let addr = cluster.addr;

    let silent = async {
        let since = Instant::now();
        let mut stream = TcpStream::connect(addr).await?;
        closed_after(&mut stream, since, within).await
    };
    let slow = async {
        let since = Instant::now();
        let mut stream = TcpStream::connect(addr).await?;
        slowloris(&mut stream, since, within).await
    };
    let idle = async {
        let since = Instant::now();
        let mut stream = TcpStream::connect(addr).await?;
        keep_alive(&mut stream, since, within).await
    };
    let websocket = async {
        let mut client = Client::connect(ip(2), addr, &cluster.url).await?;
        client.subscribe("edge").await?;
        // Past both deadlines, the upgraded connection still works both ways.
        tokio::time::sleep(upgrade + Duration::from_millis(1500)).await;
        client.publish("edge", json!("still here")).await?;
        client.next_publish("edge", Duration::from_secs(5)).await
    };
    let (silent, slow, idle, websocket) = tokio::join!(silent, slow, idle, websocket);
    near("a silent connection", silent?, first_byte);
    near("a slowloris connection", slow?, upgrade);
    near("an idle keep-alive connection", idle?, upgrade);
    assert_eq!(websocket?, json!("still here"));

    assert!(cluster.stop().await?.success());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_the_deadlines_count_after_the_handshake_and_spare_websockets() -> Result<()> {
    let ca = TestCa::new("edge")?;
    let mut env = DEADLINES.to_vec();
    env.extend([
        ("SC_CLUSTER__WORKERS", "1"),
        ("SC_BALANCER__TLS_CERT", ca.cert.to_str().unwrap()),
        ("SC_BALANCER__TLS_KEY", ca.key.to_str().unwrap()),
    ]);
    let cluster = Cluster::start(&env).await?;
    let (first_byte, upgrade) = (Duration::from_secs(1), Duration::from_secs(3));
    let within = Duration::from_secs(8);
    let addr = cluster.addr;

    let silent = async {
        let since = Instant::now();
        let mut stream = tls_connect(ip(3), addr, &ca).await?;
        closed_after(&mut stream, since, within).await
    };
    let slow = async {
        let since = Instant::now();
        let mut stream = tls_connect(ip(4), addr, &ca).await?;
        slowloris(&mut stream, since, within).await
    };
    let idle = async {
        let since = Instant::now();
        let mut stream = tls_connect(ip(5), addr, &ca).await?;
        keep_alive(&mut stream, since, within).await
    };
    let websocket = async {
        let mut client = Client::connect_tls(ip(6), addr, &cluster.url, &ca).await?;
        client.subscribe("edge-tls").await?;
        tokio::time::sleep(upgrade + Duration::from_millis(1500)).await;
        client.publish("edge-tls", json!("still here")).await?;
        client.next_publish("edge-tls", Duration::from_secs(5)).await
    };
    let (silent, slow, idle, websocket) = tokio::join!(silent, slow, idle, websocket);
    near("a silent tls connection", silent?, first_byte);
    near("a slowloris tls connection", slow?, upgrade);
    near("an idle keep-alive tls connection", idle?, upgrade);
    assert_eq!(websocket?, json!("still here"));

    assert!(cluster.stop().await?.success());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_the_balancer_backs_off_logs_once_a_second_and_recovers() -> Result<()> {
    // The balancer alone (no master, no workers) under `ulimit -n 24`: it starts with 13
    // descriptors open, so a dozen silent clients use up the rest; first_byte_timeout frees them.
    // Port 0: the balancer's "balancer listening" line tells the address it got.
    let mut balancer = Command::new("sh")
        .args(["-c", "ulimit -n 24 && exec \"$0\" \"$@\""])
        .arg(bin("sc-balancer"))
        .env("SC_BALANCER__LISTEN", "127.0.0.1:0")
        .env("SC_BALANCER__FIRST_BYTE_TIMEOUT", "2s")
        .env("RUST_LOG", "warn,sc_balancer=info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut stderr = BufReader::new(balancer.stderr.take().context("stderr")?).lines();
    let addr: SocketAddr = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(line) = stderr.next_line().await? {
            if line.contains("balancer listening")
                && let Some(addr) = line.split("addr=").nth(1).and_then(|rest| rest.split_whitespace().next())
            {
                return Ok(addr.parse()?);
            }
        }
        anyhow::bail!("the balancer exited before listening")
    })
    .await
    .context("no `balancer listening` line within 10 s")??;

    let since = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..30 {
        // The kernel completes the connection from the listen backlog even when the balancer
        // cannot accept it.
        clients.push(TcpStream::connect(addr).await?);
    }
    // Read the log for 3.5 s: the failures go on all that time.
    let mut reports = Vec::new();
    let read_until = tokio::time::Instant::now() + Duration::from_millis(3500);
    while let Ok(Ok(Some(line))) = tokio::time::timeout_at(read_until, stderr.next_line()).await {
        if line.contains("accept failed") {
            reports.push(line);
        }
    }
    let logging = since.elapsed();
    assert!(!reports.is_empty(), "no accept failure reported");
    assert!(
        reports.len() as f64 <= logging.as_secs_f64() + 1.0,
        "at most one line a second: {} lines in {logging:?}: {reports:#?}",
        reports.len()
    );
    assert!(reports.iter().all(|l| l.contains("Too many open files")), "{reports:#?}");
    let counted: u64 = reports
        .iter()
        .filter_map(|l| l.split("failures=").nth(1)?.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    assert!(counted > reports.len() as u64, "the lines count the failures between them: {reports:#?}");

    // The silent ones are closed by first_byte_timeout, which frees descriptors for the clients
    // still waiting in the backlog: every one is eventually accepted (and, silent, closed).
    for (i, client) in clients.iter_mut().enumerate() {
        closed_after(client, since, Duration::from_secs(30)).await.with_context(|| format!("client {i}"))?;
    }
    assert!(balancer.try_wait()?.is_none(), "the balancer is still running");
    Ok(())
}

/// One raw HTTP/1.1 request to the admin API: its status and JSON body.
async fn admin_raw(admin: SocketAddr, head: &str, body: &str) -> Result<(u16, Value)> {
    let mut stream = TcpStream::connect(admin).await?;
    let request = format!("{head}Content-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response)).await??;
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).context("status line")?;
    let body = response.split_once("\r\n\r\n").map(|(_, body)| body).context("body")?;
    Ok((status, serde_json::from_str(body).unwrap_or(Value::Null)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_wants_its_token_its_own_host_and_origin_and_json() -> Result<()> {
    let master = MasterProcess::start(&[("SC_CLUSTER__WORKERS", "1")]).await?;
    let (mut child, _, admin) = master.drain_stdout();
    let host = format!("Host: {admin}\r\n");
    let token = format!("Authorization: Bearer {ADMIN_TOKEN}\r\n");
    let running = || async {
        let (_, status) = admin_raw(admin, &format!("GET /status HTTP/1.1\r\n{host}{token}"), "").await?;
        Ok::<_, anyhow::Error>(status["rolling_restart"]["running"].clone())
    };

    // The cross-site form post of the issue: foreign Origin, text/plain, no token.
    let csrf = format!(
        "POST /rolling-restart HTTP/1.1\r\n{host}Origin: http://evil.example\r\nContent-Type: text/plain\r\n"
    );
    assert_eq!(admin_raw(admin, &csrf, "{}").await?.0, 403);
    // Even with the token (a page cannot have it, but still): a foreign Origin is refused, and
    // a body that is not declared JSON too.
    assert_eq!(admin_raw(admin, &format!("{csrf}{token}"), "{}").await?.0, 403);
    let plain = format!("POST /rolling-restart HTTP/1.1\r\n{host}{token}Content-Type: text/plain\r\n");
    assert_eq!(admin_raw(admin, &plain, "{}").await?.0, 415);
    assert_eq!(running().await?, json!(false), "no rolling restart was started");

    // DNS rebinding: the browser sends the attacker's name as Host.
    let port = admin.port();
    let rebound = format!("GET /status HTTP/1.1\r\nHost: rebind.evil.example:{port}\r\n{token}");
    assert_eq!(admin_raw(admin, &rebound, "").await?.0, 403);
    let no_host = format!("GET /status HTTP/1.0\r\n{token}");
    assert_eq!(admin_raw(admin, &no_host, "").await?.0, 403);

    // No token, or a wrong one: 401.
    assert_eq!(admin_raw(admin, &format!("GET /status HTTP/1.1\r\n{host}"), "").await?.0, 401);
    let wrong = format!("GET /log HTTP/1.1\r\n{host}Authorization: Bearer {ADMIN_TOKEN}x\r\n");
    assert_eq!(admin_raw(admin, &wrong, "").await?.0, 401);
    // /healthz is for orchestrators: no token needed.
    assert_eq!(admin_raw(admin, &format!("GET /healthz HTTP/1.1\r\n{host}"), "").await?.0, 200);

    // The right token, the API's own origin (localhost is fine), JSON: it works.
    let local = format!("Host: localhost:{port}\r\nOrigin: http://localhost:{port}\r\n");
    let (code, status) = admin_raw(admin, &format!("GET /status HTTP/1.1\r\n{local}{token}"), "").await?;
    assert_eq!(code, 200, "{status}");
    assert_eq!(status["mode"], "supervise");
    eventually(Duration::from_secs(30), "the worker healthy", || async {
        let (_, status) =
            admin_raw(admin, &format!("GET /status HTTP/1.1\r\n{host}{token}"), "").await.ok()?;
        let members = status["members"].as_array()?.clone();
        members.iter().any(|m| m["id"] == "worker-0" && m["state"] == "healthy").then_some(())
    })
    .await?;
    let post = format!("POST /rolling-restart HTTP/1.1\r\n{host}{token}Content-Type: application/json\r\n");
    let (code, body) = admin_raw(admin, &post, "{}").await?;
    assert_eq!(code, 202, "{body}");

    sc_tests::signal_pid(child.id().unwrap(), sc_tests::Signal::TERM);
    tokio::time::timeout(Duration::from_secs(20), child.wait()).await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_configured_token_the_master_prints_one_that_works() -> Result<()> {
    let master =
        MasterProcess::start(&[("SC_CLUSTER__WORKERS", "1"), ("SC_MASTER__ADMIN_TOKEN", "")]).await?;
    let admin = master.admin;
    let mut lines = master.lines;
    let token = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(line) = lines.next_line().await? {
            if let Some(token) = line.strip_prefix("admin token: ") {
                return Ok(token.to_owned());
            }
        }
        bail!("no `admin token` line")
    })
    .await??;
    assert_eq!(token.len(), 64, "{token}");
    let mut child = master.child;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let head = format!("GET /status HTTP/1.1\r\nHost: {admin}\r\n");
    assert_eq!(admin_raw(admin, &head, "").await?.0, 401);
    assert_eq!(admin_raw(admin, &format!("{head}Authorization: Bearer {ADMIN_TOKEN}\r\n"), "").await?.0, 401);
    assert_eq!(admin_raw(admin, &format!("{head}Authorization: Bearer {token}\r\n"), "").await?.0, 200);
    sc_tests::signal_pid(child.id().unwrap(), sc_tests::Signal::TERM);
    tokio::time::timeout(Duration::from_secs(20), child.wait()).await??;
    Ok(())
}

/// Runs sc-master to its end (at most `within`) with `env`: its exit code and everything it
/// printed (stdout, then stderr, where the children's lines go too).
async fn master_outcome(env: &[(&str, &str)], within: Duration) -> Result<(Option<i32>, String, Duration)> {
    let started = Instant::now();
    let child = Command::new(bin("sc-master"))
        .env("SC_BALANCER__LISTEN", "127.0.0.1:0")
        .env("SC_MASTER__ADMIN_LISTEN", "127.0.0.1:0")
        .env("SC_MASTER__RESPAWN_BACKOFF", "10ms")
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let output = tokio::time::timeout(within, child.wait_with_output())
        .await
        .with_context(|| format!("sc-master still running after {within:?}"))??;
    let text =
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    Ok((output.status.code(), text, started.elapsed()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_tls_key_stops_the_master_naming_balancer_tls_key() -> Result<()> {
    let ca = TestCa::new("encrypted")?;
    let encrypted = ca.dir.path().join("encrypted.pem");
    let openssl = std::process::Command::new("openssl")
        .args(["pkcs8", "-topk8", "-v2", "aes-256-cbc", "-passout", "pass:x", "-in"])
        .arg(&ca.key)
        .arg("-out")
        .arg(&encrypted)
        .status();
    if !openssl.is_ok_and(|s| s.success()) {
        eprintln!("skipping: openssl cannot encrypt a key here");
        return Ok(());
    }
    let (code, output, took) = master_outcome(
        &[
            ("SC_BALANCER__TLS_CERT", ca.cert.to_str().unwrap()),
            ("SC_BALANCER__TLS_KEY", encrypted.to_str().unwrap()),
        ],
        Duration::from_secs(15),
    )
    .await?;
    assert_eq!(code, Some(64), "a configuration error: {output}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert!(output.contains("balancer-0") && output.contains("failed at its first start"), "{output}");
    assert!(output.contains("balancer.tls_key"), "{output}");
    assert!(output.contains("encrypted private keys are not supported"), "{output}");
    assert!(!output.contains("balancer.tls_cert:"), "the certificate is not to blame: {output}");
    assert!(!output.contains("cluster ready"), "{output}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_cannot_start_stops_the_master_with_its_error() -> Result<()> {
    // A configuration only the worker checks: exit 64, like the worker's.
    let (code, output, _) = master_outcome(
        &[("SC_CLUSTER__WORKERS", "1"), ("SC_WORKER__STATIC_DIR", "/nonexistent/sc-static")],
        Duration::from_secs(15),
    )
    .await?;
    assert_eq!(code, Some(64), "{output}");
    assert!(output.contains("worker-0") && output.contains("failed at its first start"), "{output}");
    assert!(output.contains("worker.static_dir: /nonexistent/sc-static"), "{output}");

    // A busy port: a runtime failure, exit 1, with the bind error.
    let busy = std::net::TcpListener::bind("127.0.0.1:0")?;
    let listen = busy.local_addr()?.to_string();
    let (code, output, took) = master_outcome(
        &[("SC_CLUSTER__WORKERS", "1"), ("SC_WORKER__LISTEN", &listen)],
        Duration::from_secs(15),
    )
    .await?;
    assert_eq!(code, Some(1), "{output}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    let line = output
        .lines()
        .find(|l| l.contains("failed at its first start"))
        .with_context(|| format!("no first-start failure in: {output}"))?;
    assert!(line.contains("worker-0") && line.contains(&format!("bind {listen}")), "{line}");
    drop(busy);
    Ok(())
}
