//! `sc-master new`: the app it writes builds against this workspace, passes its own test, and
//! `<app>` started plainly (what `cargo run` does) runs a whole cluster of it, which the stock
//! npm client v20 drives (procedure, event, HTTP route publishing to a subscriber, the page
//! and the stock browser client beside it).
//!
//! The app is built with `CARGO_TARGET_DIR` set to this workspace's target folder and the
//! workspace's Cargo.lock (copied by `sc-master new`), so its dependencies are the ones already
//! built: a few seconds for the app itself, under a minute when sc-worker changed.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use sc_tests::{ADMIN_TOKEN, Cluster, MasterProcess, bin, bin_dir, children_of, skip};
use serde_json::{Value, json};
use tokio::process::Command;

/// The workspace's root (this package is `tests/`).
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs `command` to its end within `limit`; fails with its output if it fails.
async fn run(command: &mut Command, what: &str, limit: Duration) -> Result<String> {
    command.stdin(Stdio::null()).kill_on_drop(true);
    let output = tokio::time::timeout(limit, command.output())
        .await
        .with_context(|| format!("{what}: not done within {limit:?}"))?
        .with_context(|| format!("{what}: cannot start"))?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        bail!("{what}: {}\n{stdout}\n{}", output.status, String::from_utf8_lossy(&output.stderr));
    }
    Ok(stdout)
}

#[tokio::test]
async fn new_refuses_a_folder_in_use_and_leaves_it_alone() -> Result<()> {
    let root = tempfile::tempdir()?;
    let dir = root.path().join("taken");
    std::fs::create_dir(&dir)?;
    std::fs::write(dir.join("notes.txt"), "mine")?;
    let output = Command::new(bin("sc-master")).arg("new").arg(&dir).output().await?;
    assert_eq!(output.status.code(), Some(64), "a usage error");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("exists and is not empty"), "{stderr}");
    assert_eq!(std::fs::read_dir(&dir)?.count(), 1, "nothing written");
    Ok(())
}

#[tokio::test]
async fn a_new_app_builds_passes_its_test_and_serves_the_stock_client() -> Result<()> {
    let driver = workspace().join("tests/compat/new-app.mjs");
    let client_dir = workspace().join("tests/compat/node_modules/sc-client-20");
    if !client_dir.is_dir() || std::process::Command::new("node").arg("--version").output().is_err() {
        skip("needs node and tests/compat/node_modules (npm ci in tests/compat; tests/run.sh does)");
        return Ok(());
    }
    let started = Instant::now();
    let root = tempfile::tempdir()?;
    let name = "sc-newapp-e2e";
    let app = root.path().join(name);
    let made = run(
        Command::new(bin("sc-master")).arg("new").arg(&app).arg("--sc-path").arg(workspace()),
        "sc-master new",
        Duration::from_secs(10),
    )
    .await?;
    ensure!(made.contains("created the app sc-newapp-e2e"), "{made}");

    // Its own test (the worker in-process), which builds the binary too.
    let target = bin_dir().parent().context("target folder")?.to_path_buf();
    let tested = run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["test", "--offline", "--quiet"])
            .current_dir(&app)
            .env("CARGO_TARGET_DIR", &target)
            .env_remove("RUSTFLAGS"),
        "cargo test in the new app",
        Duration::from_secs(240),
    )
    .await?;
    ensure!(tested.contains("test hello_and_notes ... ok") || tested.contains("1 passed"), "{tested}");
    let built = started.elapsed();

    // The page's stock browser client, as `npm install --prefix public` puts it.
    let scripts = app.join("public/node_modules/socketcluster-client");
    std::fs::create_dir_all(&scripts)?;
    std::fs::copy(
        client_dir.join("socketcluster-client.min.js"),
        scripts.join("socketcluster-client.min.js"),
    )?;

    // Started plainly, in its folder (sc.toml), as `cargo run` does: it becomes sc-master.
    let mut command = Command::new(target.join("debug").join(name));
    command
        .current_dir(&app)
        .env_remove("SC_MASTER")
        .env("SC_BALANCER__LISTEN", "127.0.0.1:0")
        .env("SC_MASTER__ADMIN_LISTEN", "127.0.0.1:0")
        .env("SC_MASTER__ADMIN_TOKEN", ADMIN_TOKEN)
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()));
    let cluster = Cluster::ready(MasterProcess::spawn(command).await?).await?;
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", cluster.master_pid))?;
    let program = cmdline.split(|b| *b == 0).next().map(String::from_utf8_lossy).unwrap_or_default();
    assert!(program.ends_with("sc-master"), "the app replaced itself with sc-master: {program}");
    let workers: Vec<_> = children_of(cluster.master_pid).into_iter().filter(|d| d.program == name).collect();
    assert_eq!(workers.len(), 2, "sc.toml's two workers are the app: {:?}", children_of(cluster.master_pid));

    let port = cluster.addr.port().to_string();
    let mut node = Command::new("node");
    node.arg(&driver).args(["127.0.0.1", &port]);
    let outcome = run(&mut node, "the stock client against the app", Duration::from_secs(60)).await;
    let status = cluster.stop().await?;
    let report: Value = serde_json::from_str(outcome?.trim()).context("the driver's JSON")?;
    assert!(status.success(), "the cluster stopped cleanly: {status}");

    assert_eq!(report["hello"], json!({ "message": "Hello, Ada!" }), "{report}");
    assert_eq!(report["noted"], json!({ "text": "first", "count": 1 }), "{report}");
    assert_eq!(report["notifyStatus"], json!(202), "{report}");
    assert_eq!(report["notification"], json!({ "text": "to everyone" }), "{report}");
    assert_eq!(report["page"]["status"], json!(200), "{report}");
    let page = report["page"]["text"].as_str().unwrap_or_default();
    assert!(page.contains("/node_modules/socketcluster-client/socketcluster-client.min.js"), "{page}");
    assert_eq!(report["clientScript"]["status"], json!(200), "{report}");
    assert!(report["clientScript"]["bytes"].as_u64().unwrap_or(0) > 10_000, "{report}");
    eprintln!("new app: built and tested in {built:?}, whole test {:?}", started.elapsed());
    Ok(())
}
