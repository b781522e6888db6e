//! Operating the cluster (issue 14 items 4 to 6): one owner per public port (the master binds
//! it and lends it to the balancers, so a busy port stops a second master at once and a
//! balancer restart refuses no connection), systemd socket activation of a lone balancer, the
//! ordered drain on a terminal's Ctrl-C, each child line once on the master's output, the
//! children's last errors in `/status`, and the runtime folders of dead masters.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use sc_tests::{
    ADMIN_TOKEN, Cluster, Signal, admin_request, alive, bin, children_of, eventually, member_status,
    signal_pid, skip,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// A master whose stdout and stderr lines are collected.
struct Master {
    child: Child,
    pid: u32,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Master {
    /// Starts sc-master with the tests' admin token, free loopback ports and `env` on top;
    /// `own_group`: in a process group of its own, as a shell puts a foreground job.
    fn spawn(env: &[(&str, &str)], own_group: bool) -> Result<Self> {
        let mut command = Command::new(bin("sc-master"));
        command
            .env("SC_BALANCER__LISTEN", "127.0.0.1:0")
            .env("SC_MASTER__ADMIN_LISTEN", "127.0.0.1:0")
            .env("SC_MASTER__ADMIN_TOKEN", ADMIN_TOKEN)
            .env("RUST_LOG", "warn")
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if own_group {
            command.process_group(0);
        }
        let mut child = command.spawn()?;
        let pid = child.id().context("pid")?;
        let collect = |stream: Box<dyn tokio::io::AsyncRead + Unpin + Send>, echo: bool| {
            let lines = Arc::new(Mutex::new(Vec::new()));
            let sink = lines.clone();
            tokio::spawn(async move {
                let mut reader = BufReader::new(stream).lines();
                while let Ok(Some(line)) = reader.next_line().await {
                    if echo {
                        eprintln!("{line}");
                    }
                    sink.lock().unwrap().push(line);
                }
            });
            lines
        };
        let stdout = collect(Box::new(child.stdout.take().context("stdout")?), false);
        let stderr = collect(Box::new(child.stderr.take().context("stderr")?), true);
        Ok(Self { child, pid, stdout, stderr })
    }

    /// The value of the first stdout line starting with `prefix`, waiting up to 30 s.
    async fn line(&self, prefix: &str) -> Result<String> {
        eventually(Duration::from_secs(30), prefix, || async {
            self.stdout.lock().unwrap().iter().find_map(|l| l.strip_prefix(prefix).map(str::to_owned))
        })
        .await
    }

    async fn admin(&self) -> Result<SocketAddr> {
        Ok(self.line("admin api: http://").await?.parse()?)
    }

    /// The balancers' address, from `cluster ready`.
    async fn ready(&self) -> Result<SocketAddr> {
        let url = self.line("cluster ready: ws://").await?;
        Ok(url.split('/').next().context("address")?.parse()?)
    }

    fn stderr(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }
}

/// The socket behind descriptor `fd` of `pid` (`socket:[inode]`).
fn fd_target(pid: u32, fd: u32) -> Option<String> {
    std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok().map(|p| p.display().to_string())
}

/// Whether `pid` holds a descriptor on `target`.
fn holds(pid: u32, target: &str) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|entries| {
            entries
                .flatten()
                .any(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.display().to_string() == target))
        })
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_master_on_a_busy_port_exits_at_once_naming_the_key() -> Result<()> {
    let first = Cluster::start(&[("SC_CLUSTER__WORKERS", "1")]).await?;
    let busy = first.addr.to_string();
    let started = Instant::now();
    let mut second = Master::spawn(&[("SC_BALANCER__LISTEN", &busy), ("SC_CLUSTER__WORKERS", "1")], false)?;
    let status = tokio::time::timeout(Duration::from_secs(10), second.child.wait()).await??;
    let took = started.elapsed();
    eprintln!("the second master exited ({status}) after {took:?}");
    assert!(!status.success(), "the second master must fail");
    assert!(took < Duration::from_secs(3), "took {took:?}: not at once");
    // Its stderr is complete once it has exited.
    let said = eventually(Duration::from_secs(2), "the error line", || async {
        second.stderr().into_iter().find(|l| l.contains("[balancer] listen"))
    })
    .await?;
    assert!(said.contains(&busy), "{said}");
    assert!(!second.stdout.lock().unwrap().iter().any(|l| l.starts_with("cluster ready")));
    // The first cluster keeps its port to itself.
    let (status, _) = sc_tests::http_get([127, 0, 0, 1].into(), first.addr, "/healthz").await?;
    assert_eq!(status, 200);
    first.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_balancer_restart_refuses_no_connection_and_serves_those_that_waited() -> Result<()> {
    let cluster = Cluster::start(&[("SC_CLUSTER__WORKERS", "1")]).await?;
    let addr = cluster.addr;
    let balancer = cluster.daemons_named("sc-balancer").remove(0);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let halt = stop.clone();
    // Connect in a loop (bounded) across the restart; each connection is closed at once.
    let dialer = tokio::spawn(async move {
        let (mut attempts, mut refused) = (0u32, 0u32);
        while !halt.load(std::sync::atomic::Ordering::Relaxed) && attempts < 20_000 {
            attempts += 1;
            match tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => refused += 1,
                Ok(Err(e)) => eprintln!("connect: {e}"),
                Err(_) => eprintln!("connect timed out"),
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        (attempts, refused)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    signal_pid(balancer.pid, Signal::KILL);
    eventually(Duration::from_secs(5), "the killed balancer reaped", || async {
        (!std::path::Path::new(&format!("/proc/{}", balancer.pid)).exists()).then_some(())
    })
    .await?;
    // No balancer runs now: a request sent meanwhile waits in the listen queue...
    let waiting = if cluster.daemons_named("sc-balancer").is_empty() {
        let mut stream = TcpStream::connect(addr).await.context("connect while no balancer runs")?;
        stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await?;
        Some(stream)
    } else {
        eprintln!("the balancer was respawned before the waiting request could be sent");
        None
    };
    let respawned = eventually(Duration::from_secs(20), "a new balancer", || async {
        cluster.daemons_named("sc-balancer").into_iter().find(|b| b.pid != balancer.pid)
    })
    .await?;
    // ...and the new balancer answers it.
    if let Some(mut stream) = waiting {
        let mut response = String::new();
        tokio::time::timeout(Duration::from_secs(20), stream.read_to_string(&mut response)).await??;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    }
    eventually(Duration::from_secs(20), "the new balancer healthy", || async {
        let status = member_status(cluster.admin, "balancer-0").await.ok()??;
        (status["pid"] == respawned.pid && status["state"] == "healthy").then_some(())
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (attempts, refused) = dialer.await?;
    eprintln!("{attempts} connection attempts across the restart, {refused} refused");
    assert!(attempts > 20, "{attempts}");
    assert_eq!(refused, 0, "connections refused during the balancer restart");
    cluster.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_balancers_accept_on_the_one_socket_the_master_holds() -> Result<()> {
    let cluster = Cluster::start(&[("SC_CLUSTER__BALANCERS", "2"), ("SC_CLUSTER__WORKERS", "1")]).await?;
    let balancers = cluster.daemons_named("sc-balancer");
    assert_eq!(balancers.len(), 2);
    // Descriptor 3 of each balancer, by the LISTEN_FDS convention: the same socket, which the
    // master holds too; no other child has it.
    let sockets: Vec<String> = balancers.iter().map(|b| fd_target(b.pid, 3).unwrap_or_default()).collect();
    assert!(sockets[0].starts_with("socket:"), "{sockets:?}");
    assert_eq!(sockets[0], sockets[1], "one socket for both balancers");
    assert!(holds(cluster.master_pid, &sockets[0]), "the master keeps the socket open");
    for other in children_of(cluster.master_pid).iter().filter(|d| d.program != "sc-balancer") {
        assert!(!holds(other.pid, &sockets[0]), "{} inherited the public socket", other.id);
    }
    cluster.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_balancer_takes_its_socket_from_systemd_socket_activation() -> Result<()> {
    if std::process::Command::new("systemd-socket-activate").arg("--version").output().is_err() {
        skip("systemd-socket-activate is not installed");
        return Ok(());
    }
    // [balancer] listen names a port that is busy: a balancer that bound it would exit.
    let busy = std::net::TcpListener::bind("127.0.0.1:0")?;
    let busy_addr = busy.local_addr()?.to_string();
    let activation_port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let activation = format!("127.0.0.1:{activation_port}");
    let mut balancer = Command::new("systemd-socket-activate")
        .args(["-l", &activation, "--fdname=public"])
        .arg(format!("--setenv=SC_BALANCER__LISTEN={busy_addr}"))
        .arg("--setenv=SC_BALANCER__CONNECT_TIMEOUT=200ms")
        .arg("--setenv=RUST_LOG=warn")
        .arg(bin("sc-balancer"))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    // The first connection starts the balancer (no master: no worker, so it closes the
    // connection after connect_timeout, which shows it accepted it).
    let answered = eventually(Duration::from_secs(20), "the balancer closing a connection", || async {
        let mut stream = TcpStream::connect(&activation).await.ok()?;
        stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.ok()?;
        let mut rest = Vec::new();
        // Closed (or reset: the request was never read) rather than left waiting in the queue.
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await.ok().map(|_| ())
    })
    .await;
    let still_running = balancer.try_wait()?.is_none();
    let _ = balancer.start_kill();
    answered?;
    assert!(still_running, "the balancer exited: it bound [balancer] listen instead of the passed socket");
    drop(busy);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_reaches_the_master_alone_which_stops_the_children_in_order() -> Result<()> {
    let mut master =
        Master::spawn(&[("SC_CLUSTER__WORKERS", "2"), ("RUST_LOG", "warn,sc_common::signal=info")], true)?;
    master.ready().await?;
    let children = children_of(master.pid);
    assert_eq!(children.len(), 4, "{children:?}");
    // What a terminal does on Ctrl-C: SIGINT to its foreground process group, the master's.
    let group = rustix::process::Pid::from_raw(master.pid as i32).context("pid")?;
    rustix::process::kill_process_group(group, Signal::INT)?;
    // Watch the children go, in order.
    let started = Instant::now();
    let mut gone: Vec<(String, Duration)> = Vec::new();
    while gone.len() < children.len() && started.elapsed() < Duration::from_secs(20) {
        for child in &children {
            if !alive(child.pid) && !gone.iter().any(|(id, _)| id == &child.id) {
                gone.push((child.id.clone(), started.elapsed()));
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let status = tokio::time::timeout(Duration::from_secs(20), master.child.wait()).await??;
    eprintln!("exit order: {gone:?}");
    assert!(status.success(), "{status}");
    assert_eq!(gone.len(), children.len(), "{gone:?}");
    let at = |prefix: &str| -> Vec<Duration> {
        gone.iter().filter(|(id, _)| id.starts_with(prefix)).map(|(_, t)| *t).collect()
    };
    let last_front = at("balancer").into_iter().chain(at("worker")).max().unwrap();
    assert!(at("broker").iter().all(|t| *t >= last_front), "a broker went before a worker: {gone:?}");
    // Every child was stopped by the master (SIGTERM), none by the terminal's SIGINT.
    let lines = master.stderr();
    for child in &children {
        let said: Vec<&String> = lines
            .iter()
            .filter(|l| l.starts_with(&format!("{} | ", child.id)) && l.contains("shutting down"))
            .collect();
        assert_eq!(said.len(), 1, "{}: {said:?}", child.id);
        assert!(said[0].contains("SIGTERM"), "{}: {said:?}", child.id);
    }
    assert!(lines.iter().any(|l| !l.contains(" | ") && l.contains("SIGINT")), "the master got SIGINT");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_child_line_appears_once_and_stays_in_the_central_log() -> Result<()> {
    let master = Master::spawn(&[("SC_CLUSTER__WORKERS", "2"), ("RUST_LOG", "info")], false)?;
    let admin = master.admin().await?;
    master.ready().await?;
    let lines = master.stderr();
    for id in ["worker-0", "worker-1"] {
        let listening: Vec<&String> = lines
            .iter()
            .filter(|l| l.contains("worker listening") && l.contains(&format!("id={id}")))
            .collect();
        assert_eq!(listening.len(), 1, "{id}: {listening:#?}");
        assert!(listening[0].starts_with(&format!("{id} | ")), "marked with its id: {}", listening[0]);
    }
    assert!(!lines.iter().any(|l| l.contains("location=\"\"") || l.ends_with("location=")), "empty location");
    // The central log keeps what it no longer prints.
    let (_, log) = admin_request(admin, "GET", "/log").await?;
    let entries = log["entries"].as_array().context("entries")?;
    for id in ["worker-0", "worker-1"] {
        assert!(
            entries
                .iter()
                .any(|e| e["id"] == id
                    && e["message"].as_str().is_some_and(|m| m.contains("worker listening"))),
            "{id} in {log}"
        );
    }
    signal_pid(master.pid, Signal::TERM);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_after_a_good_start_backs_off_and_status_shows_the_last_error() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let marker = dir.path().join("started-once");
    // The first process is the real worker; every later one says why it fails and exits 1.
    let script = dir.path().join("flaky-worker");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nif [ ! -e '{marker}' ]; then touch '{marker}'; exec '{worker}' \"$@\"; fi\n\
             echo 'flaky-worker: the disk is on fire' >&2\nexit 1\n",
            marker = marker.display(),
            worker = bin("sc-worker").display()
        ),
    )?;
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let master = Master::spawn(
        &[
            ("SC_CLUSTER__WORKERS", "1"),
            ("SC_WORKER__COMMAND", script.to_str().unwrap()),
            ("SC_MASTER__RESPAWN_BACKOFF", "200ms"),
        ],
        false,
    )?;
    let admin = master.admin().await?;
    master.ready().await?;
    let worker = children_of(master.pid).into_iter().find(|d| d.id == "worker-0").context("worker-0")?;
    signal_pid(worker.pid, Signal::KILL);
    // Respawned with back-off, failing each time: the master keeps going (no first-start stop).
    let status = eventually(Duration::from_secs(30), "three failed respawns", || async {
        let status = member_status(admin, "worker-0").await.ok()??;
        (status["restarts"].as_u64()? >= 3).then_some(status)
    })
    .await?;
    eprintln!("{status}");
    assert_eq!(status["last_error"], "flaky-worker: the disk is on fire", "{status}");
    assert!(alive(master.pid), "the master stopped on a crash after a good start");
    let (_, log) = admin_request(admin, "GET", "/log").await?;
    let crash_loop = log["entries"].as_array().context("entries")?.iter().any(|e| {
        e["message"].as_str().is_some_and(|m| m.contains("crash-looping") && m.contains("respawning in"))
    });
    assert!(crash_loop, "{log}");
    signal_pid(master.pid, Signal::TERM);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_master_leaves_its_runtime_folder_to_the_next_start() -> Result<()> {
    // A master killed with SIGKILL cannot clean up: its folder stays behind.
    let first = Master::spawn(&[("SC_CLUSTER__WORKERS", "1")], false)?;
    first.ready().await?;
    let left = std::env::temp_dir().join(format!("sc-{}", first.pid));
    assert!(left.is_dir(), "{} missing", left.display());
    let children = children_of(first.pid);
    signal_pid(first.pid, Signal::KILL);
    let mut first = first;
    first.child.wait().await?;
    eventually(Duration::from_secs(10), "the orphans gone", || async {
        children.iter().all(|c| !alive(c.pid)).then_some(())
    })
    .await?;
    // Still there after the kill, unless a master that another test of this binary started
    // meanwhile has already removed it: that is the behaviour under test too, so no assertion
    // here (the tests of one binary run in parallel).
    // A live process's folder is not touched (this test's own pid stands for a running master).
    let live = std::env::temp_dir().join(format!("sc-{}-77", std::process::id()));
    std::fs::create_dir_all(&live)?;
    let second = Master::spawn(&[("SC_CLUSTER__WORKERS", "1")], false)?;
    second.ready().await?;
    let removed = !left.exists();
    let kept = live.is_dir();
    let _ = std::fs::remove_dir_all(&live);
    signal_pid(second.pid, Signal::TERM);
    assert!(removed, "{} of a dead master was not removed", left.display());
    assert!(kept, "the folder of a live process was removed");
    Ok(())
}
