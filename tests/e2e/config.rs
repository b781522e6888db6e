//! The configuration as an operator meets it: print-config, environment overrides, and clear
//! errors for unknown keys and bad files.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use sc_tests::bin;

fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let output = Command::new(bin("sc-master")).args(args).envs(env.iter().copied()).output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn print_config_shows_environment_overrides() {
    let (code, out, _) =
        run(&["print-config"], &[("SC_WORKER__PING_INTERVAL", "5s"), ("SC_CLUSTER__WORKERS", "4")]);
    assert_eq!(code, 0);
    assert!(out.contains("ping_interval = \"5s\""), "{out}");
    assert!(out.contains("workers = 4"), "{out}");
    assert!(out.contains("listen = \"0.0.0.0:8000\""), "{out}");
}

#[test]
fn print_config_reads_the_example_file() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/sc.example.toml");
    let (code, out, err) = run(&["--config", example, "print-config"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("[broker]"), "{out}");
}

#[test]
fn unknown_key_exits_64_naming_it() {
    let (code, _, err) = run(&["print-config"], &[("SC_WORKER__PING_INTERVALL", "5s")]);
    assert_eq!(code, 64);
    assert!(err.contains("ping_intervall"), "{err}");
    for daemon in ["sc-worker", "sc-broker", "sc-balancer"] {
        let output =
            Command::new(bin(daemon)).arg("print-config").env("SC_BROKER__NOPE", "1").output().unwrap();
        assert_eq!(output.status.code(), Some(64), "{daemon}");
        assert!(String::from_utf8_lossy(&output.stderr).contains("nope"), "{daemon}");
    }
}

#[test]
fn missing_or_broken_file_exits_64() {
    let (code, _, err) = run(&["--config", "/nonexistent/sc.toml"], &[]);
    assert_eq!(code, 64);
    assert!(err.contains("/nonexistent/sc.toml"), "{err}");
    let dir = std::env::temp_dir().join(format!("sc-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("broken.toml");
    std::fs::write(&file, "[worker\nping_interval = 3").unwrap();
    let (code, _, err) = run(&["--config", file.to_str().unwrap()], &[]);
    assert_eq!(code, 64, "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn standalone_mode_without_a_fixed_port_is_refused() {
    let (code, _, err) = run(&[], &[("SC_MASTER__MODE", "standalone"), ("RUST_LOG", "error")]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("master.listen"), "{err}");
}
