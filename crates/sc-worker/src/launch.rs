//! [`launch`]: the `main` of an app crate, which is both the app's worker and the way to start
//! a whole cluster serving it.
//!
//! A master starts every worker with `--master <url>` and `--supervisor-pid <pid>` (and a
//! worker started on its own to join a master has `--master` or `SC_WORKER__MASTER`): such a
//! process is a worker and runs [`crate::run`]. Started any other way (`cargo run`, or the
//! binary typed in a shell) it starts the cluster instead: it replaces itself (`exec`) with
//! `sc-master`, passing its own arguments on and pointing `[worker] command` at its own
//! executable (`SC_WORKER__COMMAND`), so the master runs this binary as each worker. Without
//! `-c`/`--config` in its arguments it passes `--config sc.toml` when the current folder has
//! one.
//!
//! `sc-master` is found as `$SC_MASTER` (a path), else beside this executable (one target
//! folder for sc-rs and the app), else on `PATH`. The master finds `sc-balancer` and
//! `sc-broker` in its own folder (`[master] bin_dir`).

use std::ffi::{OsStr, OsString};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use serde::de::DeserializeOwned;

use crate::builder::{App, AppContext};

/// The variable that names the `sc-master` binary [`launch`] runs.
pub const MASTER_ENV: &str = "SC_MASTER";

/// The whole `main` of an app crate: the app's worker when a master runs it (see the module
/// docs: `--master`, `--supervisor-pid` or `SC_WORKER__MASTER`), else the whole cluster, by
/// running `sc-master` with this executable as `[worker] command`. Returns only on failure
/// to start `sc-master`, or when the worker stops.
pub fn launch<C, F>(build: F) -> ExitCode
where
    C: DeserializeOwned,
    F: FnOnce(AppContext<C>) -> App,
{
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    if is_worker(&args, std::env::var_os("SC_WORKER__MASTER").is_some()) {
        return crate::run(build);
    }
    let program = program_name();
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("{program}: cannot find this executable's path: {e}");
            return sc_common::cli::exit(sc_common::cli::EXIT_FAILURE);
        }
    };
    let master = find_master(std::env::var_os(MASTER_ENV), &exe);
    let args = with_config(args, Path::new("sc.toml").is_file());
    // `exec` returns only if it failed: on success the master has taken over this process
    // (its pid, its terminal, Ctrl-C).
    let error = Command::new(&master).args(&args).env("SC_WORKER__COMMAND", &exe).exec();
    eprintln!(
        "{program}: cannot run {}: {error}\n{program}: started without --master, this app starts a whole cluster with sc-master: \
         set {MASTER_ENV}=/path/to/sc-master, put sc-master on PATH, or build it into this binary's folder \
         (sc-balancer and sc-broker go beside it)",
        master.display()
    );
    sc_common::cli::exit(sc_common::cli::EXIT_FAILURE)
}

/// Whether the command line (without the program) is a worker's: a master's `--master` or
/// `--supervisor-pid`, or `SC_WORKER__MASTER` set (`master_env`).
fn is_worker(args: &[OsString], master_env: bool) -> bool {
    master_env
        || args.iter().filter_map(|a| a.to_str()).any(|arg| {
            ["--master", "--supervisor-pid"]
                .iter()
                .any(|flag| arg == *flag || arg.strip_prefix(flag).is_some_and(|rest| rest.starts_with('=')))
        })
}

/// `sc-master`: `$SC_MASTER`, else beside `exe`, else the bare name (looked up on `PATH`).
fn find_master(from_env: Option<OsString>, exe: &Path) -> PathBuf {
    if let Some(path) = from_env.filter(|p| !p.is_empty()) {
        return path.into();
    }
    match exe.parent().map(|dir| dir.join("sc-master")) {
        Some(beside) if beside.is_file() => beside,
        _ => PathBuf::from("sc-master"),
    }
}

/// The master's arguments: `args`, after `--config sc.toml` when they name no config file and
/// `sc.toml` exists here.
fn with_config(args: Vec<OsString>, have_sc_toml: bool) -> Vec<OsString> {
    let names_config = args.iter().filter_map(|a| a.to_str()).any(|arg| {
        arg == "--config" || arg.starts_with("--config=") || (arg.starts_with("-c") && !arg.starts_with("--"))
    });
    if names_config || !have_sc_toml {
        return args;
    }
    let mut with = vec![OsString::from("--config"), OsString::from("sc.toml")];
    with.extend(args);
    with
}

/// This program's name, for messages.
fn program_name() -> String {
    std::env::args_os()
        .next()
        .as_deref()
        .map(Path::new)
        .and_then(Path::file_name)
        .map_or_else(|| "app".to_owned(), |name| OsStr::to_string_lossy(name).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[test]
    fn a_master_child_is_a_worker_and_a_plain_start_is_not() {
        let child = args(&[
            "--config",
            "sc.toml",
            "--id",
            "worker-0",
            "--master",
            "http://127.0.0.1:9",
            "--supervisor-pid",
            "7",
        ]);
        assert!(is_worker(&child, false));
        assert!(is_worker(&args(&["--master=http://10.0.0.1:9000"]), false));
        assert!(is_worker(&args(&[]), true), "SC_WORKER__MASTER makes a standalone worker");
        assert!(!is_worker(&args(&[]), false));
        assert!(!is_worker(&args(&["-c", "prod.toml", "status"]), false));
        assert!(!is_worker(&args(&["--masterful"]), false));
    }

    #[test]
    fn sc_toml_is_the_default_config_only_when_none_is_named() {
        assert_eq!(with_config(args(&[]), true), args(&["--config", "sc.toml"]));
        assert_eq!(with_config(args(&["status"]), true), args(&["--config", "sc.toml", "status"]));
        assert_eq!(with_config(args(&[]), false), args(&[]));
        for named in [&["-c", "x.toml"][..], &["--config", "x.toml"], &["--config=x.toml"], &["-cx.toml"]] {
            assert_eq!(with_config(args(named), true), args(named));
        }
    }

    #[test]
    fn sc_master_from_the_variable_then_beside_then_path() {
        let dir = tempfile::tempdir().expect("temp dir");
        let exe = dir.path().join("my-app");
        assert_eq!(find_master(Some("/opt/sc/sc-master".into()), &exe), PathBuf::from("/opt/sc/sc-master"));
        assert_eq!(find_master(None, &exe), PathBuf::from("sc-master"));
        std::fs::write(dir.path().join("sc-master"), b"").expect("write");
        assert_eq!(find_master(None, &exe), dir.path().join("sc-master"));
        assert_eq!(find_master(Some("".into()), &exe), dir.path().join("sc-master"));
    }
}
