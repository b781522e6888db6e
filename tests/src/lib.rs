//! Test support for the cross-daemon tests: start the real `sc-master` binary (which runs the
//! whole cluster), look at its processes, and talk to it as a SocketCluster client would.
//!
//! The binaries are taken from `SC_TEST_BIN_DIR`, or else from the cargo target folder these
//! tests run from; `cargo build --workspace` must have built them (tests/run.sh does).

#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod inproc;

pub use rustix::process::Signal;

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::process::{Child, Command};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

/// The admin API token of the masters these helpers start (`SC_MASTER__ADMIN_TOKEN`), which
/// [`admin_request`] sends.
pub const ADMIN_TOKEN: &str = "sc-tests-admin-token";

/// Where the daemon binaries are.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SC_TEST_BIN_DIR") {
        return dir.into();
    }
    // target/<profile>/deps/<test binary> -> target/<profile>; a binary of this package
    // (sc-idle-memory) is in target/<profile> itself.
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().expect("executable folder");
    let dir = if dir.ends_with("deps") { dir.parent().expect("target folder") } else { dir };
    dir.to_path_buf()
}

/// The path of one daemon binary, checked to exist.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace` first (tests/run.sh does)",
        path.display()
    );
    path
}

/// Polls `check` until it returns `Some`, or fails after `within`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A running cluster: the sc-master process and the URL it announced.
#[derive(Debug)]
pub struct Cluster {
    pub master: Child,
    pub master_pid: u32,
    /// The balancer's address, from the `cluster ready` line.
    pub addr: SocketAddr,
    /// The WebSocket URL, from the `cluster ready` line.
    pub url: String,
    /// The admin API's address, from the `admin api` line.
    pub admin: SocketAddr,
}

/// A started sc-master whose `admin api` line has been read; the rest of its stdout is
/// available line by line.
#[derive(Debug)]
pub struct MasterProcess {
    pub child: Child,
    pub pid: u32,
    pub admin: SocketAddr,
    pub lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

/// One daemon process of a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Daemon {
    pub pid: u32,
    /// "sc-worker" and so on.
    pub program: String,
    /// The `--id` it was started with.
    pub id: String,
}

impl Cluster {
    /// Starts sc-master with the balancer on a free loopback port and `env` on top, and waits
    /// for its `cluster ready` line.
    pub async fn start(env: &[(&str, &str)]) -> Result<Self> {
        Self::ready(MasterProcess::start(env).await?).await
    }

    /// Waits for the `cluster ready` line of a started master (from [`MasterProcess::spawn`]
    /// of a command of one's own).
    pub async fn ready(master: MasterProcess) -> Result<Self> {
        let MasterProcess { child: master, pid: master_pid, admin, mut lines } = master;
        let url = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await? {
                if let Some(url) = line.strip_prefix("cluster ready: ") {
                    return Ok(url.to_owned());
                }
            }
            Err(anyhow!("sc-master exited before `cluster ready`"))
        })
        .await
        .context("no `cluster ready` within 30s")??;
        // Keep draining stdout so the master never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let authority = url
            .strip_prefix("ws://")
            .or_else(|| url.strip_prefix("wss://"))
            .and_then(|rest| rest.split('/').next())
            .context("ws:// or wss:// url")?;
        let addr = authority.parse().context("balancer address")?;
        Ok(Self { master, master_pid, addr, url, admin })
    }

    /// `GET path` on the admin API, as JSON.
    pub async fn admin_get(&self, path: &str) -> Result<Value> {
        Ok(admin_request(self.admin, "GET", path).await?.1)
    }

    /// The master's live child processes.
    pub fn daemons(&self) -> Vec<Daemon> {
        children_of(self.master_pid)
    }

    /// The live daemons with `program` ("sc-worker", ...).
    pub fn daemons_named(&self, program: &str) -> Vec<Daemon> {
        self.daemons().into_iter().filter(|d| d.program == program).collect()
    }

    /// Sends `signal` to the master.
    pub fn signal_master(&self, signal: Signal) {
        signal_pid(self.master_pid, signal);
    }

    /// Stops the cluster with SIGTERM and waits for the master (bounded).
    pub async fn stop(mut self) -> Result<std::process::ExitStatus> {
        self.signal_master(Signal::TERM);
        let status = tokio::time::timeout(Duration::from_secs(20), self.master.wait())
            .await
            .context("master did not exit within 20s of SIGTERM")??;
        Ok(status)
    }
}

impl MasterProcess {
    /// Starts sc-master with the balancer and the admin API on free loopback ports and `env` on
    /// top, and waits for its `admin api` line (not for the cluster to be ready).
    pub async fn start(env: &[(&str, &str)]) -> Result<Self> {
        let mut command = Command::new(bin("sc-master"));
        command
            .env("SC_BALANCER__LISTEN", "127.0.0.1:0")
            .env("SC_MASTER__ADMIN_LISTEN", "127.0.0.1:0")
            .env("SC_MASTER__ADMIN_TOKEN", ADMIN_TOKEN)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .envs(env.iter().copied());
        Self::spawn(command).await
    }

    /// Starts a prepared sc-master command (its stdin, stdout and stderr are set here) and
    /// waits for its `admin api` line. Its stderr goes on to this process's stderr; if it exits
    /// before that line, the error carries the end of its stderr (so that a caller can tell a
    /// port lost to another process, see [`on_a_fresh_port`]).
    pub async fn spawn(mut command: Command) -> Result<Self> {
        command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
        let mut child = command.spawn().context("spawn sc-master")?;
        let pid = child.id().context("master pid")?;
        let stdout = child.stdout.take().context("master stdout")?;
        let stderr = child.stderr.take().context("master stderr")?;
        let stderr_tail = forward_stderr(stderr);
        let mut lines = BufReader::new(stdout).lines();
        let admin = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await? {
                if let Some(url) = line.strip_prefix("admin api: http://") {
                    return Ok(url.parse::<SocketAddr>()?);
                }
            }
            // Its stderr is complete once it has exited.
            let status = child.wait().await?;
            let tail = stderr_tail.await.unwrap_or_default();
            Err(anyhow!("sc-master exited ({status}) before `admin api`: {tail}"))
        })
        .await
        .context("no `admin api` within 30s")??;
        Ok(Self { child, pid, admin, lines })
    }

    /// Keeps draining stdout in the background so the master never blocks on a full pipe.
    pub fn drain_stdout(self) -> (Child, u32, SocketAddr) {
        let mut lines = self.lines;
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        (self.child, self.pid, self.admin)
    }
}

/// Copies a child's stderr to ours, line by line, as it comes; the task ends with the stream
/// and returns its last lines.
fn forward_stderr(stderr: tokio::process::ChildStderr) -> tokio::task::JoinHandle<String> {
    tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        let mut tail = std::collections::VecDeque::new();
        while let Ok(Some(line)) = lines.next_line().await {
            // Straight to the stream, like an inherited stderr (not the test harness's capture).
            let _ = writeln!(std::io::stderr(), "{line}");
            if tail.len() == 20 {
                tail.pop_front();
            }
            tail.push_back(line);
        }
        Vec::from(tail).join("\n")
    })
}

/// Whether `error` says that a listener could not bind because the address is taken.
pub fn is_address_in_use(error: &anyhow::Error) -> bool {
    let text = format!("{error:#}");
    text.contains("Address already in use") || text.contains("os error 98")
}

/// For a daemon that must be told its port before it starts and cannot report the port it got
/// (the standalone master's `[master] listen`, which the members are told in advance and which
/// may not be 0): runs `start` with a loopback port that was free a moment ago and, if the
/// daemon lost that port to another process in between ([`is_address_in_use`]), again with a
/// fresh one, up to 3 times. Daemons that can bind port 0 and report their address should do
/// that instead.
pub async fn on_a_fresh_port<T, F, Fut>(mut start: F) -> Result<T>
where
    F: FnMut(u16) -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut attempt = 1;
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        match start(port).await {
            Err(e) if attempt < 3 && is_address_in_use(&e) => {
                eprintln!("port {port} was taken before the daemon bound it; again with another ({e:#})");
                attempt += 1;
            }
            outcome => return outcome,
        }
    }
}

/// Reports a test that did not run here: prints `SKIPPED: <test binary>::<test>: <why>` to
/// stderr (past the test harness's capture, so that it shows in a passing run) and appends the
/// line to `skipped-tests.txt` in the target folder, which tests/run.sh prints at the end. Call
/// it from the test's own thread (the test's name is that thread's name).
pub fn skip(why: &str) {
    let exe = std::env::current_exe().ok();
    let binary = exe
        .as_deref()
        .and_then(|e| e.file_stem())
        .and_then(|s| s.to_str())
        .map(|s| s.rsplit_once('-').map_or(s, |(name, _hash)| name).to_owned())
        .unwrap_or_default();
    let thread = std::thread::current();
    let line = format!("SKIPPED: {binary}::{}: {why}", thread.name().unwrap_or("?"));
    let _ = writeln!(std::io::stderr(), "{line}");
    if let Some(dir) = target_dir() {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("skipped-tests.txt"));
        if let Ok(mut file) = file {
            let _ = writeln!(file, "{line}");
        }
    }
}

/// `CARGO_TARGET_DIR`, or else the target folder these tests run from.
fn target_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return Some(dir.into());
    }
    // target/<profile>/deps/<test binary> -> target
    let exe = std::env::current_exe().ok()?;
    Some(exe.parent()?.parent()?.parent()?.to_path_buf())
}

/// One HTTP/1.1 request to the master's admin API: the status code and the JSON body.
pub async fn admin_request(admin: SocketAddr, method: &str, path: &str) -> Result<(u16, Value)> {
    let mut stream = TcpStream::connect(admin).await?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {admin}\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response)).await??;
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).context("status line")?;
    let body = response.split_once("\r\n\r\n").map(|(_, body)| body).context("response body")?;
    Ok((status, serde_json::from_str(body).context("JSON body")?))
}

/// One HTTP/1.1 GET of `path` at `addr` ("host:port"), with a bearer `token` if any: the status
/// and the body (as text; a chunked body is put together).
pub async fn http_text(addr: &str, path: &str, token: Option<&str>) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr).await?;
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut response)).await??;
    let response = String::from_utf8(response)?;
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).context("status line")?;
    let (head, body) = response.split_once("\r\n\r\n").context("head and body")?;
    // hyper may answer in chunks.
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        dechunk(body)?
    } else {
        body.to_owned()
    };
    Ok((status, body))
}

fn dechunk(mut body: &str) -> Result<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").context("chunk size")?;
        let size = usize::from_str_radix(size.trim(), 16)?;
        if size == 0 {
            return Ok(out);
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
}

/// The messages of the central log (from the admin API's `/log`).
pub async fn central_log(admin: SocketAddr) -> Result<Vec<Value>> {
    let (_, body) = admin_request(admin, "GET", "/log").await?;
    Ok(body["entries"].as_array().cloned().unwrap_or_default())
}

/// The member `id` in the admin API's `/status`.
pub async fn member_status(admin: SocketAddr, id: &str) -> Result<Option<Value>> {
    let (_, body) = admin_request(admin, "GET", "/status").await?;
    Ok(body["members"].as_array().and_then(|members| members.iter().find(|m| m["id"] == id).cloned()))
}

/// Sends a signal to a process (one that is gone is not an error: the tests signal daemons
/// that may have exited).
pub fn signal_pid(pid: u32, signal: Signal) {
    let pid = i32::try_from(pid).ok().and_then(rustix::process::Pid::from_raw).expect("a valid pid");
    let _ = rustix::process::kill_process(pid, signal);
}

/// Whether a process exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// The live children of `parent` that are sc-* daemons.
pub fn children_of(parent: u32) -> Vec<Daemon> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.first() == Some(&"Z") || fields.get(1).and_then(|p| p.parse::<u32>().ok()) != Some(parent) {
            continue;
        }
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> =
            cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        let program = args.first().and_then(|p| p.rsplit('/').next()).unwrap_or("").to_owned();
        if !program.starts_with("sc-") {
            continue;
        }
        let id =
            args.iter().position(|a| a == "--id").and_then(|i| args.get(i + 1)).cloned().unwrap_or_default();
        found.push(Daemon { pid, program, id });
    }
    found.sort_by(|a, b| a.id.cmp(&b.id));
    found
}

/// Connects a TCP stream from a given local (loopback) IP, so that the balancer's client-IP
/// hashing can be steered.
pub async fn connect_from(local: IpAddr, to: SocketAddr) -> Result<TcpStream> {
    let socket = if local.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.bind(SocketAddr::new(local, 0))?;
    Ok(socket.connect(to).await?)
}

/// A plain HTTP/1.1 GET from `local`: the status code and the `x-sc-worker` header.
pub async fn http_get(local: IpAddr, to: SocketAddr, path: &str) -> Result<(u16, Option<String>)> {
    let mut stream = connect_from(local, to).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {to}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response)).await??;
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).context("status line")?;
    let worker = response.lines().find_map(|l| l.strip_prefix("x-sc-worker: ")).map(|s| s.trim().to_owned());
    Ok((status, worker))
}

/// Finds, for each worker id, a loopback source address the balancer sends to it.
pub async fn source_ip_per_worker(
    addr: SocketAddr,
    workers: usize,
) -> Result<std::collections::BTreeMap<String, IpAddr>> {
    let mut found = std::collections::BTreeMap::new();
    for i in 2..250u8 {
        let ip = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, i));
        let (status, worker) = http_get(ip, addr, "/healthz").await?;
        if status != 200 {
            bail!("/healthz answered {status}");
        }
        found.entry(worker.context("x-sc-worker header")?).or_insert(ip);
        if found.len() == workers {
            return Ok(found);
        }
    }
    bail!("client IPs reached only {found:?}")
}

/// A byte stream a [`Client`] can run over: TCP, or TLS over TCP.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + std::fmt::Debug {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + std::fmt::Debug> Io for T {}

/// A minimal SocketCluster protocol v2 client, enough to drive the cluster from Rust tests.
#[derive(Debug)]
pub struct Client {
    ws: WebSocketStream<Box<dyn Io>>,
    next_cid: u64,
    /// Messages read while waiting for something else.
    backlog: Vec<Value>,
    /// The handshake reply's data.
    pub handshake: Value,
}

impl Client {
    /// Connects from `local` to the cluster's WebSocket `url` and completes the handshake.
    pub async fn connect(local: IpAddr, addr: SocketAddr, url: &str) -> Result<Self> {
        let stream = connect_from(local, addr).await?;
        Self::over(Box::new(stream), url).await
    }

    /// As [`Client::connect`], over TLS checked against `ca` (the `url` may say ws:// or
    /// wss://: the scheme is not looked at, the stream is already TLS).
    pub async fn connect_tls(local: IpAddr, addr: SocketAddr, url: &str, ca: &TestCa) -> Result<Self> {
        let stream = tls_connect(local, addr, ca).await?;
        Self::over(Box::new(stream), &url.replacen("wss://", "ws://", 1)).await
    }

    async fn over(stream: Box<dyn Io>, url: &str) -> Result<Self> {
        let (ws, _) = tokio_tungstenite::client_async(url, stream).await?;
        let mut client = Self { ws, next_cid: 0, backlog: Vec::new(), handshake: Value::Null };
        let reply = client.invoke("#handshake", json!({ "authToken": null })).await?;
        client.handshake = reply.get("data").cloned().unwrap_or(Value::Null);
        Ok(client)
    }

    /// Sends an event with a cid and returns the matching response (`{rid, data | error}`).
    pub async fn invoke(&mut self, event: &str, data: Value) -> Result<Value> {
        self.next_cid += 1;
        let cid = self.next_cid;
        self.send(json!({ "event": event, "data": data, "cid": cid })).await?;
        self.recv_matching(|m| m.get("rid") == Some(&json!(cid)), Duration::from_secs(5)).await
    }

    /// Sends an event without a cid.
    pub async fn transmit(&mut self, event: &str, data: Value) -> Result<()> {
        self.send(json!({ "event": event, "data": data })).await
    }

    /// Subscribes to a channel; fails on an error reply.
    pub async fn subscribe(&mut self, channel: &str) -> Result<()> {
        let reply = self.invoke("#subscribe", json!({ "channel": channel })).await?;
        if let Some(error) = reply.get("error") {
            bail!("subscribe {channel}: {error}");
        }
        Ok(())
    }

    /// Publishes with an ack; fails on an error reply.
    pub async fn publish(&mut self, channel: &str, data: Value) -> Result<()> {
        let reply = self.invoke("#publish", json!({ "channel": channel, "data": data })).await?;
        if let Some(error) = reply.get("error") {
            bail!("publish {channel}: {error}");
        }
        Ok(())
    }

    /// The data of the next `#publish` on `channel`, within `within`.
    pub async fn next_publish(&mut self, channel: &str, within: Duration) -> Result<Value> {
        let message = self
            .recv_matching(|m| m["event"] == "#publish" && m["data"]["channel"] == channel, within)
            .await?;
        Ok(message["data"]["data"].clone())
    }

    /// The next message matching `matches`, answering pings on the way.
    pub async fn recv_matching(
        &mut self,
        matches: impl Fn(&Value) -> bool,
        within: Duration,
    ) -> Result<Value> {
        if let Some(i) = self.backlog.iter().position(&matches) {
            return Ok(self.backlog.remove(i));
        }
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let frame = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .map_err(|_| anyhow!("no matching message within {within:?}"))?
                .context("connection closed")??;
            match frame {
                Message::Text(text) if text.as_str().is_empty() => {
                    self.ws.send(Message::Text("".into())).await?;
                }
                Message::Text(text) => {
                    let value: Value =
                        serde_json::from_str(text.as_str()).unwrap_or(Value::String(text.to_string()));
                    if matches(&value) {
                        return Ok(value);
                    }
                    self.backlog.push(value);
                }
                Message::Close(frame) => bail!("closed by server: {frame:?}"),
                _ => {}
            }
        }
    }

    /// The next message that is not a ping (pings are answered), within `within`.
    pub async fn next_message(&mut self, within: Duration) -> Result<Value> {
        if !self.backlog.is_empty() {
            return Ok(self.backlog.remove(0));
        }
        self.recv_matching(|_| true, within).await
    }

    /// Sends several packets as one batch (a JSON array), like the stock clients' batching.
    pub async fn send_batch(&mut self, packets: Vec<Value>) -> Result<()> {
        self.send(Value::Array(packets)).await
    }

    /// Waits for the server to close the connection; returns the close code (`None` for no
    /// close frame, or one without a status code).
    pub async fn closed(&mut self, within: Duration) -> Result<Option<u16>> {
        Ok(self.close_frame(within).await?.flatten())
    }

    /// Waits for the server to end the connection: `Some(code)` for a close frame (`None`
    /// inside when the frame had no status code, which clients report as 1005), `None` when
    /// the connection ended without a close frame.
    pub async fn close_frame(&mut self, within: Duration) -> Result<Option<Option<u16>>> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let frame = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .map_err(|_| anyhow!("not closed within {within:?}"))?;
            match frame {
                None | Some(Err(_)) => return Ok(None),
                Some(Ok(Message::Close(frame))) => {
                    return Ok(Some(frame.map(|f| u16::from(f.code))));
                }
                Some(Ok(Message::Text(text))) if text.as_str().is_empty() => {
                    let _ = self.ws.send(Message::Text("".into())).await;
                }
                Some(Ok(_)) => {}
            }
        }
    }

    /// Sends a raw text frame.
    pub async fn send_text(&mut self, text: &str) -> Result<()> {
        self.ws.send(Message::Text(text.into())).await?;
        Ok(())
    }

    async fn send(&mut self, value: Value) -> Result<()> {
        self.ws.send(Message::Text(value.to_string().into())).await?;
        Ok(())
    }
}

/// Starts a member daemon (`sc-worker`, ...) by hand, as systemd or docker compose would, with
/// `args` and `env` on top of a quiet RUST_LOG.
pub fn spawn_member(program: &str, args: &[&str], env: &[(&str, &str)]) -> Result<Child> {
    Command::new(bin(program))
        .args(args)
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("spawn {program}"))
}

/// Starts one more broker `id` by hand, registered with the master at `master_url` (its cluster
/// `secret`), and waits until the master (admin API at `admin`) reports it healthy; returns the
/// process and its pid.
pub async fn start_extra_broker(
    id: &str,
    master_url: &str,
    secret: &str,
    admin: SocketAddr,
) -> Result<(Child, u32)> {
    let broker = spawn_member(
        "sc-broker",
        &["--id", id, "--master", master_url],
        &[("SC_CLUSTER__SECRET", secret), ("SC_BROKER__LISTEN", "127.0.0.1:0")],
    )?;
    let pid = broker.id().context("extra broker pid")?;
    eventually(Duration::from_secs(20), &format!("{id} healthy"), || async {
        let status = member_status(admin, id).await.ok()??;
        (status["state"] == "healthy").then_some(())
    })
    .await?;
    Ok((broker, pid))
}

/// A certificate authority made at test time, and a server certificate it signed for
/// `localhost` and 127.0.0.1, written as PEM files into a temporary folder.
#[derive(Debug)]
pub struct TestCa {
    pub dir: tempfile::TempDir,
    /// The CA certificate (what clients trust).
    pub ca_pem: String,
    /// The server certificate and key files, for `[balancer] tls_cert` / `tls_key`.
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCa {
    /// A new CA with a server certificate (named `common_name`) in a new folder.
    pub fn new(common_name: &str) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let (ca_pem, cert_pem, key_pem) = make_certificates(common_name)?;
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        std::fs::write(&cert, cert_pem)?;
        std::fs::write(&key, key_pem)?;
        std::fs::write(dir.path().join("ca.pem"), &ca_pem)?;
        Ok(Self { dir, ca_pem, cert, key })
    }

    /// Writes a new pair from another CA over this one's files (a certificate swapped on
    /// disk) and returns that CA, which is what new connections must now trust.
    pub fn swap_in(&self, common_name: &str) -> Result<String> {
        let (ca_pem, cert_pem, key_pem) = make_certificates(common_name)?;
        // Key first, then certificate, each replaced whole (write then rename) as a careful
        // operator (or certbot) would.
        for (path, text) in [(&self.key, key_pem), (&self.cert, cert_pem)] {
            let temporary = path.with_extension("new");
            std::fs::write(&temporary, text)?;
            std::fs::rename(&temporary, path)?;
        }
        Ok(ca_pem)
    }

    /// The client configuration that trusts this CA.
    pub fn client_config(&self) -> Result<std::sync::Arc<rustls::ClientConfig>> {
        client_config(&self.ca_pem)
    }
}

/// (CA PEM, server certificate PEM, server key PEM) from a fresh CA; the server certificate is
/// for `localhost` and 127.0.0.1 with `common_name` as its CN.
pub fn make_certificates(common_name: &str) -> Result<(String, String, String)> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose, SanType};
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.distinguished_name.push(DnType::CommonName, format!("sc-rs test CA for {common_name}"));
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = ca_params.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::new(vec!["localhost".to_owned()])?;
    params.subject_alt_names.push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
    params.distinguished_name.push(DnType::CommonName, common_name);
    let cert = params.signed_by(&key, &issuer)?;
    Ok((ca.pem(), cert.pem(), key.serialize_pem()))
}

/// A rustls client configuration (ring) trusting the CA in `ca_pem`.
pub fn client_config(ca_pem: &str) -> Result<std::sync::Arc<rustls::ClientConfig>> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(std::sync::Arc::new(config))
}

/// A TLS connection from `local` to `to`, checked against `ca` for the name 127.0.0.1.
pub async fn tls_connect(
    local: IpAddr,
    to: SocketAddr,
    ca: &TestCa,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
    tls_connect_with(local, to, ca.client_config()?).await
}

/// As [`tls_connect`], with a given client configuration.
pub async fn tls_connect_with(
    local: IpAddr,
    to: SocketAddr,
    config: std::sync::Arc<rustls::ClientConfig>,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let stream = connect_from(local, to).await?;
    let name = rustls_pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let connect = tokio_rustls::TlsConnector::from(config).connect(name, stream);
    Ok(tokio::time::timeout(Duration::from_secs(5), connect).await.context("tls handshake timed out")??)
}

/// A plain HTTP/1.1 GET over TLS: the status code and the `x-sc-worker` header.
pub async fn https_get(
    local: IpAddr,
    to: SocketAddr,
    path: &str,
    ca: &TestCa,
) -> Result<(u16, Option<String>)> {
    let mut stream = tls_connect(local, to, ca).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {to}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    // A peer that closes without close_notify ends the read with an error after the bytes.
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response)).await?;
    let response = String::from_utf8_lossy(&response);
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).context("status line")?;
    let worker = response.lines().find_map(|l| l.strip_prefix("x-sc-worker: ")).map(|s| s.trim().to_owned());
    Ok((status, worker))
}

impl Client {
    /// As [`Client::connect`], over a stream the caller has already set up (one that starts
    /// with a PROXY header, say); `url` says ws://, whatever the stream is.
    pub async fn over_stream(stream: impl Io + 'static, url: &str) -> Result<Self> {
        Self::over(Box::new(stream), url).await
    }
}
