//! The deployment forms, checked without a Docker engine: the compose file parses, uses only
//! valid keys and, run as plain processes with the same commands and environment (ports moved to
//! loopback), forms a working cluster with scaled brokers and workers; the systemd units pass
//! `systemd-analyze verify`; and daemons on separate "hosts" (network namespaces) work together.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use sc_tests::{
    ADMIN_TOKEN, Client, MasterProcess, admin_request, bin, eventually, http_get, on_a_fresh_port, skip,
    source_ip_per_worker,
};
use serde_json::{Value, json};
use tokio::process::{Child, Command};
use yaml_rust2::{Yaml, YamlLoader};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The compose file as a map of services, with `<<` merge keys applied.
fn compose_services() -> BTreeMap<String, Yaml> {
    let text = std::fs::read_to_string(repo().join("docker-compose.yml")).unwrap();
    let docs = YamlLoader::load_from_str(&text).expect("docker-compose.yml is valid YAML");
    let root = merge(docs[0].clone());
    let services = root["services"].as_hash().expect("a services map");
    services.iter().map(|(k, v)| (k.as_str().unwrap().to_owned(), v.clone())).collect()
}

/// Applies YAML merge keys (`<<: *anchor`) recursively; the anchors are already resolved.
fn merge(value: Yaml) -> Yaml {
    match value {
        Yaml::Hash(hash) => {
            let mut out = yaml_rust2::yaml::Hash::new();
            if let Some(Yaml::Hash(base)) = hash.get(&Yaml::String("<<".into())).cloned().map(merge) {
                out.extend(base);
            }
            for (k, v) in hash {
                if k.as_str() != Some("<<") {
                    out.insert(k, merge(v));
                }
            }
            Yaml::Hash(out)
        }
        Yaml::Array(items) => Yaml::Array(items.into_iter().map(merge).collect()),
        other => other,
    }
}

/// The `.env` file that docs/deploy.md has the user write beside the compose file (generated
/// secrets; fixed here).
const DOT_ENV: [(&str, &str); 2] =
    [("SC_CLUSTER__SECRET", "compose-test-secret"), ("SC_WORKER__AUTH_KEY", "compose-test-auth-key")];

/// `${NAME:-default}` and `${NAME:?error}` as compose interpolates them (from the environment or
/// the `.env` file, else the default, or else compose refuses with the error).
fn interpolate(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').map(|e| start + e).unwrap_or(rest.len() - 1);
        let inner = &rest[start + 2..end];
        let set = |name: &str| {
            std::env::var(name)
                .ok()
                .or_else(|| DOT_ENV.iter().find(|(k, _)| *k == name).map(|(_, v)| (*v).to_owned()))
        };
        if let Some((name, error)) = inner.split_once(":?") {
            out.push_str(&set(name).unwrap_or_else(|| panic!("compose would refuse: {name}: {error}")));
        } else {
            let (name, default) = inner.split_once(":-").unwrap_or((inner, ""));
            out.push_str(&set(name).unwrap_or_else(|| default.to_owned()));
        }
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

fn strings(yaml: &Yaml) -> Vec<String> {
    yaml.as_vec()
        .map(|v| v.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

fn environment(service: &Yaml) -> BTreeMap<String, String> {
    let Some(hash) = service["environment"].as_hash() else { return BTreeMap::new() };
    hash.iter()
        .map(|(k, v)| {
            let value = match v {
                Yaml::String(s) => s.clone(),
                Yaml::Integer(i) => i.to_string(),
                Yaml::Boolean(b) => b.to_string(),
                other => panic!("environment value {other:?}"),
            };
            (k.as_str().unwrap().to_owned(), interpolate(&value))
        })
        .collect()
}

#[test]
fn compose_file_uses_valid_keys_and_scales() {
    // The compose-spec service keys this file may use.
    const SERVICE_KEYS: &[&str] = &[
        "build",
        "image",
        "command",
        "entrypoint",
        "environment",
        "env_file",
        "ports",
        "expose",
        "depends_on",
        "healthcheck",
        "restart",
        "volumes",
        "networks",
        "deploy",
        "ulimits",
        "user",
        "working_dir",
        "stop_grace_period",
        "stop_signal",
        "labels",
        "logging",
    ];
    const HEALTHCHECK_KEYS: &[&str] = &["test", "interval", "timeout", "retries", "start_period", "disable"];
    let text = std::fs::read_to_string(repo().join("docker-compose.yml")).unwrap();
    let root = merge(YamlLoader::load_from_str(&text).unwrap().remove(0));
    for key in root.as_hash().unwrap().keys() {
        let key = key.as_str().unwrap();
        assert!(
            key == "services" || key.starts_with("x-") || key == "volumes" || key == "networks",
            "top-level {key}"
        );
    }
    let services = compose_services();
    assert_eq!(
        services.keys().map(String::as_str).collect::<Vec<_>>(),
        ["sc-balancer", "sc-broker", "sc-master", "sc-worker"]
    );
    for (name, service) in &services {
        for key in service.as_hash().unwrap().keys() {
            let key = key.as_str().unwrap();
            assert!(SERVICE_KEYS.contains(&key), "{name}: unknown service key {key}");
        }
        let healthcheck =
            service["healthcheck"].as_hash().unwrap_or_else(|| panic!("{name} has a healthcheck"));
        for key in healthcheck.keys() {
            assert!(HEALTHCHECK_KEYS.contains(&key.as_str().unwrap()), "{name}: healthcheck key {key:?}");
        }
        let command = strings(&service["command"]);
        assert_eq!(command.first().map(String::as_str), Some(name.as_str()), "{name} runs its own binary");
        assert!(service["container_name"].is_badvalue(), "{name}: no fixed container name");
    }
    for scaled in ["sc-worker", "sc-broker"] {
        assert!(services[scaled]["ports"].is_badvalue(), "{scaled} scales: no host ports");
    }
    assert_eq!(strings(&services["sc-balancer"]["ports"]), ["8000:8000"]);
    assert_eq!(environment(&services["sc-master"])["SC_MASTER__MODE"], "standalone");
}

struct Processes(Vec<Child>);

impl Drop for Processes {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.start_kill();
        }
    }
}

/// One service replica run as a process: its environment with the ports moved to loopback, and
/// which environment keys named which container port.
struct Replica {
    name: &'static str,
    env: BTreeMap<String, String>,
    ports: Vec<(String, String)>,
    pid: u32,
}

/// `service`'s environment for a replica on loopback: `sc-master:9000` becomes the master's
/// port, and every `0.0.0.0:<port>` listener binds port 0 (read back once it runs), except
/// the master's 9000, which the members are told in advance.
fn on_loopback(
    name: &str,
    service: &Yaml,
    master_port: u16,
) -> (BTreeMap<String, String>, Vec<(String, String)>) {
    let mut env = environment(service);
    let mut ports = Vec::new();
    for (key, value) in env.iter_mut() {
        *value = value.replace("sc-master:9000", &format!("127.0.0.1:{master_port}"));
        if let Some(port) = value.strip_prefix("0.0.0.0:") {
            let local = if name == "sc-master" && port == "9000" { master_port } else { 0 };
            ports.push((key.clone(), port.to_owned()));
            *value = format!("127.0.0.1:{local}");
        }
    }
    (env, ports)
}

/// The address a replica's listener `key` got, from the master's `/status` entry of the
/// replica (`member`) or, for the master's own, from `admin` and `master_port`.
fn bound_port(key: &str, member: &Value, admin: SocketAddr, master_port: u16) -> Result<u16> {
    let field = match key {
        "SC_MASTER__ADMIN_LISTEN" => return Ok(admin.port()),
        "SC_MASTER__LISTEN" => return Ok(master_port),
        // A broker's listener is its gRPC one.
        "SC_BROKER__LISTEN" => "grpc",
        key if key.ends_with("__GRPC_LISTEN") => "grpc",
        _ => "address",
    };
    let addr: SocketAddr = member[field].as_str().with_context(|| format!("{field} of {member}"))?.parse()?;
    Ok(addr.port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_services_run_as_processes_form_a_cluster_with_scaled_brokers() -> Result<()> {
    let services = compose_services();
    // The master first (the others depend on it). A standalone master needs a fixed port that
    // the members are told in advance: picked here, again with a fresh one should another
    // process take it first. Every other listener binds port 0.
    let master_service = &services["sc-master"];
    let (master, master_port, master_env, master_ports) = on_a_fresh_port(|master_port| async move {
        let (env, ports) = on_loopback("sc-master", master_service, master_port);
        let command = strings(&master_service["command"]);
        let mut process = Command::new(bin(&command[0]));
        // The admin API wants a token: the tests' one (a real deployment sets its own).
        process
            .args(&command[1..])
            .envs(&env)
            .env("RUST_LOG", "warn")
            .env("SC_MASTER__ADMIN_TOKEN", ADMIN_TOKEN);
        let master = MasterProcess::spawn(process).await?;
        Ok((master, master_port, env, ports))
    })
    .await?;
    let (master, master_pid, admin) = master.drain_stdout();
    let mut processes = Processes(vec![master]);
    let mut replicas =
        vec![Replica { name: "sc-master", env: master_env, ports: master_ports, pid: master_pid }];
    // Three brokers, two workers, one balancer: `--scale sc-broker=3 --scale sc-worker=2`.
    for (name, count) in [("sc-broker", 3), ("sc-worker", 2), ("sc-balancer", 1)] {
        let service = &services[name];
        for _ in 0..count {
            let (env, ports) = on_loopback(name, service, master_port);
            let command = strings(&service["command"]);
            let child = Command::new(bin(&command[0]))
                .args(&command[1..])
                .envs(&env)
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("start {name}"))?;
            let pid = child.id().context("pid")?;
            processes.0.push(child);
            replicas.push(Replica { name, env, ports, pid });
        }
    }

    // The ports they bound, as each registered with the master.
    let members = eventually(Duration::from_secs(20), "every replica registered", || async {
        let (_, status) = admin_request(admin, "GET", "/status").await.ok()?;
        let members = status["members"].as_array()?.clone();
        let registered = |pid: u32| members.iter().any(|m| m["pid"] == pid);
        replicas.iter().skip(1).all(|r| registered(r.pid)).then_some(members)
    })
    .await?;
    let mut balancer = None;
    let mut healthchecks = Vec::new();
    for replica in &replicas {
        let member = members.iter().find(|m| m["pid"] == replica.pid).cloned().unwrap_or(Value::Null);
        let mut env = replica.env.clone();
        let mut bound = Vec::new();
        for (key, container) in &replica.ports {
            let port = bound_port(key, &member, admin, master_port)?;
            env.insert(key.clone(), format!("127.0.0.1:{port}"));
            bound.push((container.clone(), port));
        }
        if replica.name == "sc-balancer" {
            let port = bound.iter().find(|(container, _)| container == "8000").context("balancer port")?.1;
            balancer = Some(SocketAddr::from(([127, 0, 0, 1], port)));
        }
        // The healthcheck, with this replica's ports (and its environment, which
        // `sc-broker healthcheck` reads its address from).
        let mut test = strings(&services[replica.name]["healthcheck"]["test"]);
        assert_eq!(test.remove(0), "CMD", "{}: exec-form healthcheck", replica.name);
        for arg in &mut test {
            for (container, local) in &bound {
                *arg = arg.replace(&format!("127.0.0.1:{container}"), &format!("127.0.0.1:{local}"));
            }
        }
        healthchecks.push((replica.name, test, env));
    }
    let balancer = balancer.context("balancer address")?;

    // Every healthcheck passes once the cluster is up.
    for (name, test, env) in &healthchecks {
        let program = if test[0] == "curl" { PathBuf::from("curl") } else { bin(&test[0]) };
        eventually(Duration::from_secs(20), &format!("{name} healthy"), || async {
            let status = Command::new(&program)
                .args(&test[1..])
                .envs(env)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .await;
            status.ok().filter(|s| s.success())
        })
        .await?;
    }

    // Pub/sub across the two workers, through the balancer, with three brokers.
    let ips = eventually(Duration::from_secs(20), "both workers behind the balancer", || async {
        source_ip_per_worker(balancer, 2).await.ok()
    })
    .await?;
    let url = format!("ws://{balancer}/socketcluster/");
    let mut clients = Vec::new();
    for ip in ips.values() {
        clients.push(Client::connect(*ip, balancer, &url).await?);
    }
    for i in 0..30 {
        clients[0].subscribe(&format!("compose-{i}")).await?;
    }
    for i in 0..30 {
        clients[1].publish(&format!("compose-{i}"), json!(i)).await?;
    }
    for i in 0..30 {
        assert_eq!(clients[0].next_publish(&format!("compose-{i}"), Duration::from_secs(5)).await?, json!(i));
    }
    Ok(())
}

#[test]
fn systemd_units_pass_systemd_analyze_verify() -> Result<()> {
    let Ok(version) = std::process::Command::new("systemd-analyze").arg("--version").output() else {
        skip("systemd-analyze is not installed");
        return Ok(());
    };
    assert!(version.status.success());
    let root = tempfile::tempdir()?;
    let units = root.path().join("etc/systemd/system");
    let bins = root.path().join("usr/local/bin");
    let targets = root.path().join("usr/lib/systemd/system");
    for dir in [&units, &bins, &targets] {
        std::fs::create_dir_all(dir)?;
    }
    // The standard targets the units order themselves against.
    for target in [
        "sysinit",
        "basic",
        "multi-user",
        "network-online",
        "network",
        "shutdown",
        "sockets",
        "timers",
        "paths",
        "slices",
        "local-fs",
        "swap",
    ] {
        for dir in ["/usr/lib/systemd/system", "/lib/systemd/system"] {
            let file = Path::new(dir).join(format!("{target}.target"));
            if file.exists() {
                std::fs::copy(&file, targets.join(format!("{target}.target")))?;
                break;
            }
        }
    }
    let mut names = Vec::new();
    for entry in std::fs::read_dir(repo().join("deploy/systemd"))? {
        let entry = entry?;
        let name = entry.file_name().into_string().unwrap();
        std::fs::copy(entry.path(), units.join(&name))?;
        names.push(name.replace("@.service", "@1.service"));
    }
    names.sort();
    assert_eq!(
        names,
        [
            "sc-balancer.service",
            "sc-balancer.socket",
            "sc-broker@1.service",
            "sc-master.service",
            "sc-worker@1.service"
        ]
    );
    let verify = |names: &[String]| {
        std::process::Command::new("systemd-analyze")
            .arg("verify")
            .arg(format!("--root={}", root.path().display()))
            .args(names)
            .output()
            .unwrap()
    };
    // Without the binaries at the paths the units name, verification fails...
    let missing = verify(&names);
    assert!(!missing.status.success(), "verify must notice missing binaries");
    // ...and passes with them installed.
    for name in ["sc-master", "sc-balancer", "sc-worker", "sc-broker"] {
        std::fs::copy(bin(name), bins.join(name))?;
    }
    let output = verify(&names);
    let report = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success() && report.trim().is_empty(), "systemd-analyze verify:\n{report}");
    Ok(())
}

/// Network namespaces joined by a bridge: separate "hosts" for the test, removed on drop.
struct Hosts {
    prefix: String,
    names: Vec<String>,
}

impl Hosts {
    /// Creates a bridge namespace and one namespace per host at 10.77.<n>.<i>/24; the test's own
    /// namespace joins the bridge as 10.77.<n>.1.
    fn create(hosts: usize) -> Result<Option<Self>> {
        let n = std::process::id() % 200 + 20;
        let prefix = format!("sct{}", std::process::id());
        let mut this = Hosts { prefix: prefix.clone(), names: Vec::new() };
        let ip = |args: &[&str]| -> Result<()> {
            let out = std::process::Command::new("ip").args(args).output()?;
            if !out.status.success() {
                bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
            }
            Ok(())
        };
        let bridge = format!("{prefix}br");
        if ip(&["netns", "add", &bridge]).is_err() {
            return Ok(None);
        }
        this.names.push(bridge.clone());
        ip(&["-n", &bridge, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &bridge, "link", "set", "br0", "up"])?;
        // The test process's side.
        let root_side = format!("{prefix}r");
        ip(&["link", "add", &root_side, "type", "veth", "peer", "name", "up0", "netns", &bridge])?;
        ip(&["-n", &bridge, "link", "set", "up0", "master", "br0", "up"])?;
        ip(&["addr", "add", &format!("10.77.{n}.1/24"), "dev", &root_side])?;
        ip(&["link", "set", &root_side, "up"])?;
        for i in 0..hosts {
            let host = format!("{prefix}h{i}");
            ip(&["netns", "add", &host])?;
            this.names.push(host.clone());
            let port = format!("p{i}");
            ip(&[
                "link", "add", "eth0", "netns", &host, "type", "veth", "peer", "name", &port, "netns",
                &bridge,
            ])?;
            ip(&["-n", &bridge, "link", "set", &port, "master", "br0", "up"])?;
            ip(&["-n", &host, "addr", "add", &format!("10.77.{n}.{}/24", i + 10), "dev", "eth0"])?;
            ip(&["-n", &host, "link", "set", "eth0", "up"])?;
            ip(&["-n", &host, "link", "set", "lo", "up"])?;
        }
        Ok(Some(this))
    }

    fn addr(&self, host: usize) -> IpAddr {
        let n = std::process::id() % 200 + 20;
        IpAddr::from([10, 77, n as u8, host as u8 + 10])
    }

    /// Runs a daemon inside a host's namespace.
    fn spawn(&self, host: usize, program: &str, env: &[(&str, String)]) -> Result<Child> {
        Ok(Command::new("ip")
            .args(["netns", "exec", &format!("{}h{host}", self.prefix)])
            .arg(bin(program))
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()?)
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["link", "del", &format!("{}r", self.prefix)]).output();
        for name in self.names.iter().rev() {
            let _ = std::process::Command::new("ip").args(["netns", "del", name]).output();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_across_hosts_in_network_namespaces() -> Result<()> {
    // Host 0: master and a broker. Host 1: a worker. Host 2: a worker and a broker.
    let Some(hosts) = Hosts::create(3)? else {
        skip("network namespaces are not permitted here (ip netns add failed)");
        return Ok(());
    };
    let master = format!("http://{}:9000", hosts.addr(0));
    let common = |extra: &[(&'static str, String)]| {
        let mut env =
            vec![("SC_CLUSTER__SECRET", "netns-secret".to_owned()), ("SC_WORKER__AUTH_KEY", "k".to_owned())];
        env.extend(extra.iter().cloned());
        env
    };
    let mut processes = Processes(Vec::new());
    processes.0.push(hosts.spawn(
        0,
        "sc-master",
        &common(&[
            ("SC_MASTER__MODE", "standalone".into()),
            ("SC_MASTER__LISTEN", format!("{}:9000", hosts.addr(0))),
            ("SC_MASTER__ADMIN_LISTEN", "127.0.0.1:8001".into()),
        ]),
    )?);
    for host in [0, 2] {
        processes.0.push(hosts.spawn(
            host,
            "sc-broker",
            &common(&[
                ("SC_BROKER__MASTER", master.clone()),
                ("SC_BROKER__ID", format!("broker-h{host}")),
                ("SC_BROKER__LISTEN", "0.0.0.0:9100".into()),
            ]),
        )?);
    }
    for host in [1, 2] {
        processes.0.push(hosts.spawn(
            host,
            "sc-worker",
            &common(&[
                ("SC_WORKER__MASTER", master.clone()),
                ("SC_WORKER__ID", format!("worker-h{host}")),
                ("SC_WORKER__LISTEN", "0.0.0.0:8080".into()),
                ("SC_WORKER__GRPC_LISTEN", "0.0.0.0:9200".into()),
            ]),
        )?);
    }
    // The test connects to each worker on its host, from this namespace over the bridge.
    let mut clients = Vec::new();
    for host in [1, 2] {
        let worker = SocketAddr::new(hosts.addr(host), 8080);
        eventually(Duration::from_secs(20), "worker ready (a broker linked)", || async {
            matches!(http_get(hosts_root_ip(&hosts), worker, "/readyz").await, Ok((200, _))).then_some(())
        })
        .await?;
        clients.push(
            Client::connect(hosts_root_ip(&hosts), worker, &format!("ws://{worker}/socketcluster/")).await?,
        );
    }
    for i in 0..20 {
        clients[0].subscribe(&format!("hosts-{i}")).await?;
    }
    for i in 0..20 {
        clients[1].publish(&format!("hosts-{i}"), json!({"from": "host 2", "i": i})).await?;
    }
    for i in 0..20 {
        let message = clients[0].next_publish(&format!("hosts-{i}"), Duration::from_secs(5)).await?;
        assert_eq!(message, json!({"from": "host 2", "i": i}));
    }
    Ok(())
}

fn hosts_root_ip(_: &Hosts) -> IpAddr {
    let n = std::process::id() % 200 + 20;
    IpAddr::from([10, 77, n as u8, 1])
}
