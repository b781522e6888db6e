//! The master's promises, on the real binaries with real signals: faults survived and reported
//! (SIGKILL, SIGSTOP, a panic in a socket, a crash loop), rolling restart (admin API and
//! SIGUSR2), bounded graceful shutdown and the second signal, and standalone mode with the
//! master killed and restarted under traffic.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use sc_tests::{
    Client, Cluster, MasterProcess, Signal, admin_request, alive, central_log, eventually, http_get,
    member_status, on_a_fresh_port, signal_pid, spawn_member,
};
use serde_json::{Value, json};

/// Finds, for each worker id, a loopback source address the balancer sends to it.
async fn source_ip_per_worker(
    balancer: SocketAddr,
    workers: usize,
    first: u8,
) -> Result<BTreeMap<String, IpAddr>> {
    let mut found = BTreeMap::new();
    for i in first..250u8 {
        let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 3, i));
        if let (200, Some(worker)) = http_get(ip, balancer, "/healthz").await? {
            found.entry(worker).or_insert(ip);
        }
        if found.len() == workers {
            break;
        }
    }
    assert_eq!(found.len(), workers, "client IPs spread over every worker");
    Ok(found)
}

/// Waits for a central log entry whose message contains every one of `needles`.
async fn logged(admin: SocketAddr, needles: &[&str]) -> Result<Value> {
    let what = format!("a central log entry with {needles:?}");
    eventually(Duration::from_secs(10), &what, || async {
        central_log(admin).await.ok()?.into_iter().find(|e| {
            let message = e["message"].as_str().unwrap_or("");
            needles.iter().all(|n| message.contains(n))
        })
    })
    .await
}

/// Waits until member `id` is healthy under a pid other than `old`; returns its status.
async fn healthy_again(admin: SocketAddr, id: &str, old: u64) -> Result<Value> {
    eventually(Duration::from_secs(10), &format!("{id} healthy again"), || async {
        member_status(admin, id)
            .await
            .ok()
            .flatten()
            .filter(|m| m["state"] == "healthy" && m["pid"] != json!(old))
    })
    .await
}

async fn pid_of(admin: SocketAddr, id: &str) -> Result<u64> {
    let member = member_status(admin, id).await?.expect("member in /status");
    Ok(member["pid"].as_u64().expect("pid"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_sigstop_and_a_socket_panic_are_survived_and_reported() -> Result<()> {
    let cluster = Cluster::start(&[
        ("SC_CLUSTER__WORKERS", "2"),
        ("SC_MASTER__HEALTH_INTERVAL", "200ms"),
        ("SC_TEST_FAULTS", "1"),
    ])
    .await?;
    let admin = cluster.admin;
    let ips = source_ip_per_worker(cluster.addr, 2, 2).await?;
    let within = Duration::from_secs(5);

    // A panic inside one socket's task closes that socket only.
    let worker0 = pid_of(admin, "worker-0").await?;
    let mut bystander = Client::connect(ips["worker-0"], cluster.addr, &cluster.url).await?;
    bystander.subscribe("faults").await?;
    let panic_url = format!("{}?sc-test-panic=1", cluster.url);
    let mut doomed = Client::connect(ips["worker-0"], cluster.addr, &panic_url).await?;
    assert_eq!(doomed.close_frame(within).await?, None, "the panicking socket is dropped");
    let entry = logged(admin, &["panic: injected socket panic"]).await?;
    assert_eq!(entry["id"], "worker-0", "{entry}");
    assert_eq!(entry["role"], "worker", "{entry}");
    assert_eq!(entry["pid"], json!(worker0), "{entry}");
    assert!(
        entry["location"].as_str().unwrap().contains("sc-worker/src/http.rs:"),
        "the panic's own location: {entry}"
    );
    logged(admin, &["socket task panicked"]).await?;
    bystander.publish("faults", json!("still here")).await?;
    assert_eq!(bystander.next_publish("faults", within).await?, json!("still here"));
    assert_eq!(pid_of(admin, "worker-0").await?, worker0, "no restart");

    // kill -9: respawned, reported with the signal, counted in the status API.
    let worker1 = pid_of(admin, "worker-1").await?;
    let killed_at = Instant::now();
    signal_pid(worker1 as u32, Signal::KILL);
    let status = healthy_again(admin, "worker-1", worker1).await?;
    eprintln!("worker-1 healthy again {:?} after SIGKILL", killed_at.elapsed());
    assert_eq!(status["restarts"], 1, "{status}");
    logged(admin, &[&format!("worker-1 (pid {worker1})"), "killed by signal 9 (SIGKILL)"]).await?;

    // SIGSTOP: the health checks catch the hung process; it is killed and replaced.
    let stopped_at = Instant::now();
    signal_pid(worker0 as u32, Signal::STOP);
    let status = healthy_again(admin, "worker-0", worker0).await?;
    eprintln!("worker-0 healthy again {:?} after SIGSTOP", stopped_at.elapsed());
    assert_eq!(status["restarts"], 1, "{status}");
    assert!(!alive(worker0 as u32), "the hung process was killed");
    logged(admin, &[&format!("worker-0 (pid {worker0})"), "failed 3 health checks"]).await?;
    logged(
        admin,
        &[&format!("worker-0 (pid {worker0})"), "killed by the master after failing its health checks"],
    )
    .await?;

    // All of it is in the status API's recent errors.
    let status = cluster.admin_get("/status").await?;
    let errors = status["recent_errors"].to_string();
    for needle in ["injected socket panic", "SIGKILL", "failed 3 health checks"] {
        assert!(errors.contains(needle), "{needle} in {errors}");
    }
    assert!(status["epoch"].as_u64().unwrap() > 4, "{status}");

    // Pub/sub across both replacements.
    let mut a = Client::connect(ips["worker-0"], cluster.addr, &cluster.url).await?;
    let mut b = Client::connect(ips["worker-1"], cluster.addr, &cluster.url).await?;
    a.subscribe("after").await?;
    b.publish("after", json!(1)).await?;
    assert_eq!(a.next_publish("after", within).await?, json!(1));

    let status = cluster.stop().await?;
    assert!(status.success(), "{status}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_is_reported_with_its_exit_status() -> Result<()> {
    // A worker that starts well once (a failed first start stops the master instead, see
    // tests/e2e/edge.rs), then exits 1 on every respawn.
    let dir = tempfile::tempdir()?;
    let marker = dir.path().join("started-once");
    let script = dir.path().join("worker-once.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n[ -e '{marker}' ] && exit 1\ntouch '{marker}'\nexec '{worker}' \"$@\"\n",
            marker = marker.display(),
            worker = sc_tests::bin("sc-worker").display()
        ),
    )?;
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let master = MasterProcess::start(&[
        ("SC_CLUSTER__WORKERS", "1"),
        ("SC_WORKER__COMMAND", script.to_str().unwrap()),
        ("SC_MASTER__RESPAWN_BACKOFF", "10ms"),
        ("SC_MASTER__RESPAWN_BACKOFF_MAX", "80ms"),
    ])
    .await?;
    let (mut child, pid, admin) = master.drain_stdout();
    let first = eventually(Duration::from_secs(20), "worker-0 healthy", || async {
        member_status(admin, "worker-0").await.ok().flatten().filter(|m| m["state"] == "healthy")
    })
    .await?;
    signal_pid(first["pid"].as_u64().unwrap() as u32, Signal::KILL);
    let entry = logged(admin, &["worker-0 is crash-looping", "exited with code 1"]).await?;
    assert_eq!(entry["severity"], "error", "{entry}");
    let status = eventually(Duration::from_secs(5), "restarts counted", || async {
        member_status(admin, "worker-0").await.ok().flatten().filter(|m| m["restarts"].as_u64() >= Some(3))
    })
    .await?;
    assert_eq!(status["registered"], false, "{status}");
    signal_pid(pid, Signal::TERM);
    let exit = tokio::time::timeout(Duration::from_secs(10), child.wait()).await??;
    assert!(exit.success(), "{exit}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_by_admin_call_and_by_sigusr2() -> Result<()> {
    let cluster =
        Cluster::start(&[("SC_CLUSTER__WORKERS", "2"), ("SC_MASTER__HEALTH_INTERVAL", "200ms")]).await?;
    let admin = cluster.admin;
    let ips = source_ip_per_worker(cluster.addr, 2, 100).await?;
    let mut clients = Vec::new();
    for ip in ips.values() {
        let mut client = Client::connect(*ip, cluster.addr, &cluster.url).await?;
        client.subscribe("rolling").await?;
        clients.push(client);
    }
    let before: Vec<u64> = vec![pid_of(admin, "worker-0").await?, pid_of(admin, "worker-1").await?];

    let (code, body) = admin_request(admin, "POST", "/rolling-restart").await?;
    assert_eq!(code, 202, "{body}");
    let (code, body) = admin_request(admin, "POST", "/rolling-restart").await?;
    assert_eq!(code, 409, "one at a time: {body}");
    // Every socket on a replaced worker is closed with the reconnect-at-once close.
    for client in &mut clients {
        assert_eq!(client.close_frame(Duration::from_secs(15)).await?, Some(None));
    }
    logged(admin, &["rolling restart done"]).await?;
    let mut after = Vec::new();
    for (id, old) in ["worker-0", "worker-1"].iter().zip(&before) {
        let status = healthy_again(admin, id, *old).await?;
        assert_eq!(status["restarts"], 1, "{status}");
        after.push(status["pid"].as_u64().unwrap());
    }
    let order = central_log(admin)
        .await?
        .iter()
        .filter_map(|e| {
            let m = e["message"].as_str()?;
            m.contains(" replaced (pid").then(|| m.split(' ').next().unwrap().to_owned())
        })
        .collect::<Vec<_>>();
    assert_eq!(order, ["worker-0", "worker-1"], "one at a time, in order");

    // Clients come back to the same worker ids (rendezvous placement did not move).
    let within = Duration::from_secs(5);
    let mut clients = Vec::new();
    for (id, ip) in &ips {
        let (_, worker) = http_get(*ip, cluster.addr, "/healthz").await?;
        assert_eq!(worker.as_deref(), Some(id.as_str()));
        let mut client = Client::connect(*ip, cluster.addr, &cluster.url).await?;
        client.subscribe("rolling").await?;
        clients.push(client);
    }
    clients[0].publish("rolling", json!("back")).await?;
    assert_eq!(clients[1].next_publish("rolling", within).await?, json!("back"));

    // SIGUSR2 does the same.
    cluster.signal_master(Signal::USR2);
    for (id, old) in ["worker-0", "worker-1"].iter().zip(&after) {
        healthy_again(admin, id, *old).await?;
    }
    let status = cluster.stop().await?;
    assert!(status.success(), "{status}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_keeps_its_order_and_grace_and_a_second_signal_exits_at_once() -> Result<()> {
    // In order: the brokers outlive the balancer and the workers.
    let mut cluster = Cluster::start(&[("SC_MASTER__SHUTDOWN_GRACE", "5s")]).await?;
    let daemons = cluster.daemons();
    let mut client = Client::connect(IpAddr::V4(Ipv4Addr::LOCALHOST), cluster.addr, &cluster.url).await?;
    client.subscribe("bye").await?;
    cluster.signal_master(Signal::TERM);
    let started = Instant::now();
    let mut gone: BTreeMap<u32, Duration> = BTreeMap::new();
    while gone.len() < daemons.len() && started.elapsed() < Duration::from_secs(10) {
        for d in &daemons {
            if !gone.contains_key(&d.pid) && !alive(d.pid) {
                gone.insert(d.pid, started.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let exit = tokio::time::timeout(Duration::from_secs(5), cluster.master.wait()).await??;
    assert!(exit.success(), "{exit}");
    assert!(started.elapsed() < Duration::from_secs(5), "within the grace");
    let when = |program: &str| -> Vec<Duration> {
        daemons.iter().filter(|d| d.program == program).map(|d| gone[&d.pid]).collect()
    };
    let broker = when("sc-broker")[0];
    for front in when("sc-balancer").into_iter().chain(when("sc-worker")) {
        assert!(front <= broker, "brokers stop last: {gone:?}");
    }
    assert_eq!(client.close_frame(Duration::from_secs(2)).await?, Some(None));

    // A hung worker cannot stretch the shutdown past the grace.
    let mut cluster = Cluster::start(&[("SC_MASTER__SHUTDOWN_GRACE", "2s")]).await?;
    let daemons = cluster.daemons();
    let worker = cluster.daemons_named("sc-worker").remove(0);
    signal_pid(worker.pid, Signal::STOP);
    let started = Instant::now();
    cluster.signal_master(Signal::TERM);
    let exit = tokio::time::timeout(Duration::from_secs(10), cluster.master.wait()).await??;
    let took = started.elapsed();
    eprintln!("shutdown with a hung worker took {took:?} (grace 2s)");
    assert!(exit.success(), "{exit}");
    assert!(took < Duration::from_millis(3000), "{took:?}");
    eventually(Duration::from_secs(2), "every daemon gone", || async {
        daemons.iter().all(|d| !alive(d.pid)).then_some(())
    })
    .await?;

    // A second signal exits at once, children included.
    let mut cluster = Cluster::start(&[]).await?;
    let daemons = cluster.daemons();
    let worker = cluster.daemons_named("sc-worker").remove(0);
    signal_pid(worker.pid, Signal::STOP);
    cluster.signal_master(Signal::TERM);
    eventually(Duration::from_secs(5), "the balancer stopped", || async {
        let balancer = daemons.iter().find(|d| d.program == "sc-balancer")?;
        (!alive(balancer.pid)).then_some(())
    })
    .await?;
    let second = Instant::now();
    cluster.signal_master(Signal::INT);
    let exit = tokio::time::timeout(Duration::from_secs(5), cluster.master.wait()).await??;
    let took = second.elapsed();
    eprintln!("second signal: master gone after {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    assert!(!exit.success(), "an interrupted shutdown is not a clean exit");
    eventually(Duration::from_secs(2), "every daemon gone", || async {
        daemons.iter().all(|d| !alive(d.pid)).then_some(())
    })
    .await?;
    Ok(())
}

/// Publishes `n` and checks the subscriber receives it.
async fn round_trip(publisher: &mut Client, subscriber: &mut Client, n: u64, label: &str) -> Result<()> {
    publisher.publish("standalone", json!(n)).await?;
    let got = subscriber.next_publish("standalone", Duration::from_secs(3)).await?;
    anyhow::ensure!(got == json!(n), "{label}: expected {n}, got {got}");
    Ok(())
}

/// Until `members` (processes) have each bound their listeners: all of them hold a socket.
async fn listening(members: &[tokio::process::Child]) -> Result<()> {
    let pids: Vec<u32> = members.iter().filter_map(|m| m.id()).collect();
    anyhow::ensure!(pids.len() == members.len(), "a member exited at start");
    eventually(Duration::from_secs(10), "the members listening", || async {
        pids.iter().all(|pid| sockets_of(*pid) > 0).then_some(())
    })
    .await
}

/// The number of sockets a process holds.
fn sockets_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |entries| {
        entries
            .flatten()
            .filter(|e| {
                std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
            })
            .count()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_members_survive_the_master_being_killed_and_restarted() -> Result<()> {
    let secret = ("SC_CLUSTER__SECRET", "standalone-e2e-secret");
    // The members are told the master's address before it runs, and a standalone master needs
    // a fixed port: the one port the test picks in advance (again with a fresh one, members
    // and all, should another process take it first). Everything else binds port 0.
    let (_members, master_env, (mut master, master_pid, admin)) = on_a_fresh_port(|master_port| async move {
        let master_url = format!("http://127.0.0.1:{master_port}");
        let master_env = [
            ("SC_MASTER__MODE", "standalone"),
            ("SC_MASTER__LISTEN", &*format!("127.0.0.1:{master_port}")),
            ("SC_MASTER__HEALTH_INTERVAL", "200ms"),
            secret,
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        // The members start first (as docker compose might) and wait for the master.
        let member = |program: &str, id: &str, env: &[(&str, &str)]| {
            // Standalone workers need one auth key between them (they refuse to start without).
            let mut all = vec![secret, ("SC_WORKER__AUTH_KEY", "standalone-e2e-key")];
            all.extend_from_slice(env);
            spawn_member(program, &["--id", id, "--master", &master_url], &all)
        };
        let members = [
            member("sc-broker", "broker-a", &[])?,
            member("sc-worker", "worker-a", &[])?,
            member("sc-worker", "worker-b", &[])?,
            member("sc-balancer", "balancer-a", &[("SC_BALANCER__LISTEN", "127.0.0.1:0")])?,
        ];
        listening(&members).await?;
        let env: Vec<(&str, &str)> = master_env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let master = MasterProcess::start(&env).await?.drain_stdout();
        Ok((members, master_env, master))
    })
    .await?;
    let master_env: Vec<(&str, &str)> = master_env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let all_healthy = |admin: SocketAddr| async move {
        let (_, status) = admin_request(admin, "GET", "/status").await.ok()?;
        let members = status["members"].as_array()?;
        (members.len() == 4 && members.iter().all(|m| m["state"] == "healthy")).then_some(status)
    };
    let status = eventually(Duration::from_secs(15), "4 healthy members", || all_healthy(admin)).await?;
    assert_eq!(status["mode"], "standalone");
    // The balancer bound port 0: its address as it registered.
    let balancer_addr: SocketAddr = status["members"]
        .as_array()
        .and_then(|members| members.iter().find(|m| m["id"] == "balancer-a"))
        .and_then(|m| m["address"].as_str())
        .context("the balancer's address in /status")?
        .parse()?;
    let url = format!("ws://{balancer_addr}/socketcluster/");

    let within = Duration::from_secs(3);
    let ips = eventually(Duration::from_secs(10), "both workers reachable", || async {
        source_ip_per_worker(balancer_addr, 2, 2).await.ok()
    })
    .await?;
    let mut subscriber = Client::connect(ips["worker-a"], balancer_addr, &url).await?;
    let mut publisher = Client::connect(ips["worker-b"], balancer_addr, &url).await?;
    subscriber.subscribe("standalone").await?;
    let mut seq = 0u64;
    seq += 1;
    round_trip(&mut publisher, &mut subscriber, seq, "master up").await?;

    // The master dies: publishing and receiving go on, and a new client can join.
    signal_pid(master_pid, Signal::KILL);
    let _ = master.wait().await;
    let down = Instant::now();
    while down.elapsed() < Duration::from_secs(2) {
        seq += 1;
        round_trip(&mut publisher, &mut subscriber, seq, "master down").await?;
        // Pacing: publishing on while the master is down, not waiting for anything.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut newcomer = Client::connect(ips["worker-a"], balancer_addr, &url).await?;
    newcomer.subscribe("standalone").await?;

    // It comes back on the same port (the members know no other; should another process take
    // it in the moment between, the test fails with "address in use"); the members register
    // again; traffic never stopped.
    let (_master, _, admin) = MasterProcess::start(&master_env).await?.drain_stdout();
    let back = Instant::now();
    let mut rounds = 0;
    loop {
        seq += 1;
        round_trip(&mut publisher, &mut subscriber, seq, "master restarting").await?;
        rounds += 1;
        if all_healthy(admin).await.is_some() && back.elapsed() > Duration::from_secs(4) {
            break;
        }
        anyhow::ensure!(back.elapsed() < Duration::from_secs(20), "members did not re-register");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("{rounds} publish round trips while the master restarted, none lost");
    assert!(newcomer.next_publish("standalone", within).await.is_ok());

    // A standalone member that dies leaves the membership through the health checks.
    let worker_b = pid_of(admin, "worker-b").await?;
    signal_pid(worker_b as u32, Signal::KILL);
    logged(admin, &["worker-b", "failed 3 health checks"]).await?;
    eventually(Duration::from_secs(5), "worker-b gone", || async {
        member_status(admin, "worker-b").await.ok()?.is_none().then_some(())
    })
    .await?;
    // Its clients' addresses go to the surviving worker.
    let (_, worker) = http_get(ips["worker-b"], balancer_addr, "/healthz").await?;
    assert_eq!(worker.as_deref(), Some("worker-a"));
    Ok(())
}
