//! What each child of supervise mode is started with: its program, its arguments and the
//! environment that the master adds.
//!
//! Children are started with `--id`, `--master` (this master's gRPC URL), `--supervisor-pid`
//! (they exit when this process is gone, even after a SIGKILL) and `--config` (the master's
//! file, if any). The environment carries the cluster secret, the per-cluster auth key, the
//! workers' Unix socket folder and the balancers' public address.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use sc_common::config::Config;
use sc_common::{Error, Role, secret};

/// One child process to keep running.
#[derive(Debug, Clone)]
pub(crate) struct ChildSpec {
    pub(crate) id: String,
    pub(crate) role: Role,
    pub(crate) program: PathBuf,
    pub(crate) args: Vec<OsString>,
}

/// The program of each role, checked to exist.
#[derive(Debug, Clone)]
pub(crate) struct Programs {
    balancer: PathBuf,
    worker: PathBuf,
    broker: PathBuf,
}

impl Programs {
    /// The programs of `config` (`[<role>] command`, else `sc-<role>` in `[master] bin_dir` or
    /// the folder of this executable); an error names one that does not exist.
    pub(crate) fn find(config: &Config) -> Result<Self, Error> {
        let bin_dir = match &config.master.bin_dir {
            Some(dir) => dir.clone(),
            None => std::env::current_exe()?
                .parent()
                .map(Path::to_path_buf)
                .ok_or_else(|| Error::Config("cannot find the folder of sc-master".into()))?,
        };
        let program = |role: Role, command: &Option<PathBuf>| -> Result<PathBuf, Error> {
            let program = command.clone().unwrap_or_else(|| bin_dir.join(format!("sc-{}", role.as_str())));
            if program.components().count() > 1 && !program.exists() {
                return Err(Error::Config(format!(
                    "{}.command: {} does not exist (build it with `cargo build --release`, or set [master] bin_dir)",
                    role.as_str(),
                    program.display()
                )));
            }
            Ok(program)
        };
        Ok(Self {
            balancer: program(Role::Balancer, &config.balancer.command)?,
            worker: program(Role::Worker, &config.worker.command)?,
            broker: program(Role::Broker, &config.broker.command)?,
        })
    }
}

/// The children of supervise mode, by shutdown tier: balancers, workers, brokers.
/// `master_url` is this master's gRPC URL; `config_file` is handed on.
pub(crate) fn child_specs(
    config: &Config,
    programs: &Programs,
    config_file: Option<&Path>,
    master_url: &str,
) -> Vec<Vec<ChildSpec>> {
    let spec = |role: Role, id: String, program: &PathBuf| {
        let mut args: Vec<OsString> = Vec::new();
        if let Some(file) = config_file {
            args.extend(["--config".into(), file.as_os_str().to_owned()]);
        }
        args.extend([
            "--id".into(),
            id.clone().into(),
            "--master".into(),
            master_url.into(),
            "--supervisor-pid".into(),
            std::process::id().to_string().into(),
        ]);
        ChildSpec { id, role, program: program.clone(), args }
    };
    let tier = |role: Role, count: usize, program: &PathBuf| {
        (0..count).map(|i| spec(role, format!("{}-{i}", role.as_str()), program)).collect()
    };
    vec![
        tier(Role::Balancer, config.cluster.balancers, &programs.balancer),
        tier(Role::Worker, config.cluster.workers, &programs.worker),
        tier(Role::Broker, config.cluster.brokers, &programs.broker),
    ]
}

/// What every child gets in its environment: the cluster secret and, unless configured, a
/// per-cluster auth key, so that a token signed on one worker is valid on all of them; the
/// workers' Unix socket folder (`runtime_dir`) and the balancers' public address (`public`,
/// the listener the master bound and passes on, with the port it picked for port 0).
pub(crate) fn child_env(
    config: &Config,
    runtime_dir: Option<&Path>,
    public: Option<SocketAddr>,
) -> Vec<(String, String)> {
    let mut env = vec![("SC_CLUSTER__SECRET".to_owned(), config.cluster.secret.clone())];
    if config.worker.auth_key.is_empty() && config.worker.auth_algorithm.starts_with("HS") {
        env.push(("SC_WORKER__AUTH_KEY".to_owned(), secret::generate()));
    }
    if let Some(dir) = runtime_dir {
        env.push(("SC_WORKER__UNIX_DIR".to_owned(), dir.display().to_string()));
    }
    if let Some(public) = public {
        env.push(("SC_BALANCER__LISTEN".to_owned(), public.to_string()));
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_name_each_child_and_point_it_at_the_master() {
        let mut config = Config::default();
        config.cluster.balancers = 2;
        config.master.bin_dir = Some("/opt/sc".into());
        config.worker.command = Some("my-worker".into());
        let programs = Programs::find(&config);
        assert!(programs.is_err(), "/opt/sc/sc-balancer does not exist");
        config.balancer.command = Some("sc-balancer".into());
        config.broker.command = Some("sc-broker".into());
        let programs = Programs::find(&config).unwrap();
        let specs = child_specs(&config, &programs, Some(Path::new("/etc/sc.toml")), "http://127.0.0.1:9");
        let ids: Vec<Vec<&str>> = specs.iter().map(|t| t.iter().map(|s| s.id.as_str()).collect()).collect();
        assert_eq!(ids, [vec!["balancer-0", "balancer-1"], vec!["worker-0", "worker-1"], vec!["broker-0"]]);
        let worker = &specs[1][0];
        assert_eq!(worker.program, Path::new("my-worker"));
        let args: Vec<&str> = worker.args.iter().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(
            args[..6],
            ["--config", "/etc/sc.toml", "--id", "worker-0", "--master", "http://127.0.0.1:9"]
        );
    }

    #[test]
    fn the_environment_carries_the_secret_and_what_the_master_picked() {
        let mut config = Config::default();
        config.cluster.secret = "s".into();
        let public: SocketAddr = "0.0.0.0:4321".parse().unwrap();
        let env = child_env(&config, Some(Path::new("/tmp/sc-1")), Some(public));
        let get = |key: &str| env.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
        assert_eq!(get("SC_CLUSTER__SECRET"), Some("s"));
        assert_eq!(get("SC_WORKER__AUTH_KEY").map(str::len), Some(64));
        assert_eq!(get("SC_WORKER__UNIX_DIR"), Some("/tmp/sc-1"));
        assert_eq!(get("SC_BALANCER__LISTEN"), Some("0.0.0.0:4321"));
    }
}
