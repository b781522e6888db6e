//! The command line and `main` that the member daemons (balancer, worker, broker) share, and
//! the exit codes of every daemon.
//!
//! Entry point: [`member_main`], the whole `main` of a member daemon: `run` (the default),
//! `print-config` (the effective configuration, secrets masked) and `healthcheck` (a
//! grpc.health.v1 check of the running daemon, for containers and service managers).

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::membership::{Event, Role, default_id};
use crate::{Config, Error, net, signal, telemetry};

/// Exit code for bad configuration or usage (EX_USAGE).
pub const EXIT_USAGE: i32 = 64;
/// Exit code for a runtime failure.
pub const EXIT_FAILURE: i32 = 1;

/// The command line shared by the balancer, worker and broker.
#[derive(Debug, Clone, clap::Parser)]
pub struct MemberCli {
    /// The TOML configuration file; without it, defaults plus SC_* environment overrides.
    #[arg(long, short, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// This member's id (overrides the section's `id`).
    #[arg(long)]
    pub id: Option<String>,
    /// The master's gRPC URL, e.g. http://127.0.0.1:9000 (overrides the section's `master`).
    #[arg(long)]
    pub master: Option<String>,
    /// Set by a supervising master: exit when that process is gone.
    #[arg(long, hide = true)]
    pub supervisor_pid: Option<u32>,
    /// What to do; `run` when absent.
    #[command(subcommand)]
    pub command: Option<MemberCommand>,
}

/// Subcommands of a member daemon.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum MemberCommand {
    /// Run the daemon (the default).
    Run,
    /// Print the effective configuration as TOML, secrets masked, and exit.
    PrintConfig,
    /// Ask the running daemon's grpc.health.v1 whether it serves (exit 0) or not (exit 1), for
    /// container and service-manager health checks. The address is the configured gRPC listener
    /// (a wildcard IP is asked on loopback) unless given.
    Healthcheck {
        /// host:port of the daemon's gRPC listener.
        #[arg(long)]
        addr: Option<String>,
    },
}

/// The whole `main` of a member daemon (balancer, worker, broker): parses [`MemberCli`], loads
/// the config (exit 64 on error), handles `print-config` and `healthcheck`, sets up telemetry,
/// signals and the orphan watchdog, then runs `serve(config, central_log, shutdown)` with the
/// shutdown grace (`[master] shutdown_grace`). A runtime failure exits 1.
pub fn member_main<F, Fut>(role: Role, serve: F) -> ExitCode
where
    F: FnOnce(Config, mpsc::Receiver<Event>, CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), Error>>,
{
    use clap::{CommandFactory, FromArgMatches};

    let name = format!("sc-{}", role.as_str());
    // The struct's doc comment describes the shared command line, not this daemon: `--help`
    // shows the daemon's own name and description.
    let (program, about) = about(role);
    let matches = MemberCli::command().name(program).bin_name(program).about(about).get_matches();
    let cli = match MemberCli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let mut config = match Config::load(cli.config.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{name}: {e}");
            return exit(EXIT_USAGE);
        }
    };
    let (id, master) = match role {
        Role::Balancer => (&mut config.balancer.id, &mut config.balancer.master),
        Role::Worker => (&mut config.worker.id, &mut config.worker.master),
        Role::Broker => (&mut config.broker.id, &mut config.broker.master),
    };
    if cli.id.is_some() {
        id.clone_from(&cli.id);
    }
    if cli.master.is_some() {
        master.clone_from(&cli.master);
    }
    match &cli.command {
        Some(MemberCommand::PrintConfig) => {
            print!("{}", config.redacted().to_toml());
            return ExitCode::SUCCESS;
        }
        Some(MemberCommand::Healthcheck { addr }) => {
            let listen = match role {
                Role::Balancer => config.balancer.grpc_listen,
                Role::Worker => config.worker.grpc_listen,
                Role::Broker => config.broker.listen,
            };
            let target = addr.clone().unwrap_or_else(|| net::advertised(listen, None, None).to_string());
            return healthcheck(&name, &target);
        }
        Some(MemberCommand::Run) | None => {}
    }
    if let Err(e) = config.check_secrets(Some(role), cli.supervisor_pid.is_some()) {
        eprintln!("{name}: {e}");
        return exit(EXIT_USAGE);
    }
    if role == Role::Worker {
        // The checks that need the final id (--id) or this host's file system, before binding.
        let id = config.worker.id.clone().unwrap_or_else(|| default_id(Role::Worker));
        if let Err(e) = config.validate_worker(&id) {
            eprintln!("{name}: {e}");
            return exit(EXIT_USAGE);
        }
    }
    let threads = threads(role, &config, cli.supervisor_pid.is_some());
    let runtime = match threads {
        1 => tokio::runtime::Builder::new_current_thread().enable_all().build(),
        n => tokio::runtime::Builder::new_multi_thread().worker_threads(n).enable_all().build(),
    };
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("{name}: cannot start the runtime: {e}");
            return exit(EXIT_FAILURE);
        }
    };
    runtime.block_on(async move {
        telemetry::init(config.cluster.log_format);
        let events = telemetry::central_log();
        let shutdown = CancellationToken::new();
        signal::spawn_signal_handler(shutdown.clone());
        if let Some(pid) = cli.supervisor_pid {
            signal::spawn_orphan_watchdog(pid, shutdown.clone());
        }
        let grace = config.master.shutdown_grace;
        match signal::serve_with_grace(serve(config, events, shutdown.clone()), &shutdown, grace).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(Error::Config(e)) => {
                tracing::error!("config: {e}");
                exit(EXIT_USAGE)
            }
            Err(e) => {
                tracing::error!("{e}");
                exit(EXIT_FAILURE)
            }
        }
    })
}

/// The runtime threads of a member: `[worker] threads` / `[balancer] threads`, or with 0 the
/// machine's cores shared out so that one host's cluster does not oversubscribe them: under a
/// master (which starts `[cluster] workers` workers and `balancers` balancers here) a worker
/// gets `cores / workers` and a balancer `cores / (workers + balancers)`, at least one each; a
/// member started alone gets every core. Brokers always get every core. One thread means
/// tokio's current-thread runtime: no cross-thread wake-ups at all.
pub fn threads(role: Role, config: &Config, supervised: bool) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let (configured, share) = match role {
        Role::Worker => (config.worker.threads, config.cluster.workers),
        Role::Balancer => (config.balancer.threads, config.cluster.workers + config.cluster.balancers),
        _ => (0, 1),
    };
    match (configured, supervised) {
        (0, true) => (cores / share.max(1)).max(1),
        (0, false) => cores,
        (n, _) => n,
    }
}

/// The program name and what `--help` says the daemon is.
fn about(role: Role) -> (&'static str, &'static str) {
    match role {
        Role::Balancer => (
            "sc-balancer",
            "The cluster's public listener: ends TLS and forwards each client to a worker chosen by its IP",
        ),
        Role::Worker => ("sc-worker", "Serves HTTP, WebSocket and the SocketCluster protocol to the clients"),
        Role::Broker => {
            ("sc-broker", "Carries pub/sub between the workers and holds a shard of the key/value exchange")
        }
    }
}

/// `code` as the process's exit code.
pub fn exit(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(u8::MAX))
}

/// One grpc.health.v1 Check against `target`, for `healthcheck`: exit 0 if serving.
fn healthcheck(name: &str, target: &str) -> ExitCode {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
        return exit(EXIT_FAILURE);
    };
    let verdict = runtime.block_on(async {
        let endpoint =
            tonic::transport::Endpoint::from_shared(format!("http://{target}")).map_err(|e| e.to_string())?;
        let check = async {
            let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
            let reply = HealthClient::new(channel)
                .check(HealthCheckRequest { service: String::new() })
                .await
                .map_err(|s| s.message().to_owned())?;
            Ok::<_, String>(reply.into_inner().status)
        };
        tokio::time::timeout(Duration::from_secs(3), check)
            .await
            .map_err(|_| "no answer within 3s".to_owned())?
    });
    match verdict {
        Ok(status) if status == ServingStatus::Serving as i32 => {
            println!("{name} at {target}: serving");
            ExitCode::SUCCESS
        }
        Ok(_) => {
            println!("{name} at {target}: not serving");
            exit(EXIT_FAILURE)
        }
        Err(e) => {
            println!("{name} at {target}: {e}");
            exit(EXIT_FAILURE)
        }
    }
}
