//! The sc-master daemon: parse the command line, load the config, run the control plane (and,
//! in supervise mode, the whole cluster), print the admin API (and, with a generated token, a
//! ready link to the admin page) and `cluster ready` lines; `new` writes a new app crate.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use sc_common::cli::{EXIT_FAILURE, EXIT_USAGE, exit};
use sc_common::config::{Config, MasterMode};
use sc_common::{signal, telemetry};
use sc_master::{Master, MasterError};
use tokio_util::sync::CancellationToken;

/// Runs a SocketCluster-compatible cluster: with no arguments, one balancer on port 8000, two
/// workers and one broker on this machine.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// The TOML configuration file; without it, defaults plus SC_* environment overrides.
    #[arg(long, short, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Run the master (the default).
    Run,
    /// Print the effective configuration as TOML, secrets masked, and exit.
    PrintConfig,
    /// Print the running cluster's members (role, id, host, pid, health, uptime, restarts) and
    /// its rates (connections, messages/s, from two scrapes of /metrics a second apart), read
    /// from the master's admin API.
    Status {
        /// The admin API's host:port; default: `[master] admin_listen` (a wildcard IP is asked
        /// on loopback).
        #[arg(long, value_name = "HOST:PORT")]
        admin: Option<String>,
        /// The admin API's bearer token; default: `[master] admin_token` (or
        /// SC_MASTER__ADMIN_TOKEN).
        #[arg(long)]
        token: Option<String>,
        /// One JSON document instead of the table, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Print a new random secret (32 bytes, hex) for `[cluster] secret`, `[worker] auth_key`,
    /// `[worker] api_key` or `[master] admin_token`, and exit.
    GenSecret,
    /// Make a new app crate in PATH (a new or empty folder, whose name is the app's): a worker
    /// binary with a procedure, an event, an HTTP route, a page on the stock browser client,
    /// its cluster config (sc.toml) and a test. `cargo run` in it starts a cluster serving it.
    New {
        /// The folder to create; its name is the package name.
        path: PathBuf,
        /// The sc-rs source tree to depend on by path; default: the one this sc-master was
        /// built from, if it is still there (else a git placeholder to edit).
        #[arg(long, value_name = "DIR")]
        sc_path: Option<PathBuf>,
    },
}

/// Why the master did not run to a clean stop.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error(transparent)]
    StartUp(#[from] sc_common::Error),
    #[error(transparent)]
    Run(#[from] MasterError),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::GenSecret) = cli.command {
        println!("{}", sc_common::secret::generate());
        return ExitCode::SUCCESS;
    }
    if let Some(Command::New { path, sc_path }) = &cli.command {
        return new_app(path, sc_path.as_deref());
    }
    let config = match Config::load(cli.config.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("sc-master: {e}");
            return exit(EXIT_USAGE);
        }
    };
    match cli.command {
        Some(Command::PrintConfig) => {
            print!("{}", config.redacted().to_toml());
            return ExitCode::SUCCESS;
        }
        Some(Command::Status { admin, token, json }) => return status(&config, admin, token, json).await,
        Some(Command::Run | Command::GenSecret | Command::New { .. }) | None => {}
    }
    if config.master.mode == MasterMode::Standalone && config.master.listen.port() == 0 {
        // Fine for a library user who reads the bound address, not for daemons told a URL.
        eprintln!("sc-master: master.listen: standalone mode needs a fixed port that daemons can be told");
        return exit(EXIT_USAGE);
    }
    if let Err(e) = config.check_secrets(None, false) {
        eprintln!("sc-master: {e}");
        return exit(EXIT_USAGE);
    }
    telemetry::init(config.cluster.log_format);
    let shutdown = CancellationToken::new();
    let outcome = async {
        let master = Master::bind(config, cli.config.as_deref()).await?;
        println!("admin api: http://{}", master.admin_addr());
        if let Some(token) = master.generated_admin_token() {
            // Once, like Jupyter's: whoever reads the master's output may use the admin API.
            println!("admin token: {token}");
            // The fragment never reaches the server (nor its logs); the page reads it.
            let mut page = master.admin_addr();
            if page.ip().is_unspecified() {
                page.set_ip(if page.is_ipv4() {
                    [127, 0, 0, 1].into()
                } else {
                    std::net::Ipv6Addr::LOCALHOST.into()
                });
            }
            println!("admin page: http://{page}/#token={token}");
        }
        // A second signal must not leave the children behind: they are killed before the exit.
        signal::spawn_signal_handler_then(shutdown.clone(), master.kill_switch());
        let mut ready = master.ready();
        tokio::spawn(async move {
            let url = ready.wait_for(Option::is_some).await.ok().and_then(|url| url.clone());
            if let Some(url) = url {
                println!("cluster ready: {url}");
            }
        });
        master.serve(shutdown).await?;
        Ok::<(), Failure>(())
    };
    match outcome.await {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::StartUp(sc_common::Error::Config(e))) => {
            tracing::error!("config: {e}");
            exit(EXIT_USAGE)
        }
        // A child refused its configuration: so does the cluster, with the same code.
        Err(Failure::Run(e @ MasterError::FirstStart { code: Some(EXIT_USAGE), .. })) => {
            tracing::error!("{e}");
            exit(EXIT_USAGE)
        }
        Err(e) => {
            tracing::error!("{e}");
            exit(EXIT_FAILURE)
        }
    }
}

/// `sc-master status`: the admin API's address and token from the flags or the config.
async fn status(config: &Config, admin: Option<String>, token: Option<String>, json: bool) -> ExitCode {
    let addr = admin
        .unwrap_or_else(|| sc_common::net::advertised(config.master.admin_listen, None, None).to_string());
    let token = token.unwrap_or_else(|| config.master.admin_token.clone());
    if token.is_empty() {
        eprintln!(
            "sc-master status: no admin token: pass --token (the master prints the one it made at start), or set [master] admin_token or SC_MASTER__ADMIN_TOKEN"
        );
        return exit(EXIT_USAGE);
    }
    match sc_master::status::fetch(&addr, &token).await {
        Ok(report) if json => {
            println!("{}", report.json());
            ExitCode::SUCCESS
        }
        Ok(report) => {
            print!("{}", report.table());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sc-master status: {e}");
            exit(EXIT_FAILURE)
        }
    }
}

/// `sc-master new`: writes the app and says what to do next.
fn new_app(path: &std::path::Path, sc_path: Option<&std::path::Path>) -> ExitCode {
    match sc_master::new_app::generate(path, sc_path) {
        Ok(app) => {
            println!("created the app {} in {}", app.name, path.display());
            match &app.sc_path {
                Some(tree) => println!("it depends on sc-rs at {} (by path)", tree.display()),
                None => println!(
                    "sc-rs was not found: edit the sc-worker and sc-client dependencies in {}",
                    path.join("Cargo.toml").display()
                ),
            }
            println!(
                "next: cd {} && cargo test && cargo run   (README.md says what cargo run needs)",
                path.display()
            );
            ExitCode::SUCCESS
        }
        Err(e @ sc_master::new_app::NewError::Io { .. }) => {
            eprintln!("sc-master new: {e}");
            exit(EXIT_FAILURE)
        }
        // A folder in use, a bad name or a wrong --sc-path: the command line's fault.
        Err(e) => {
            eprintln!("sc-master new: {e}");
            exit(EXIT_USAGE)
        }
    }
}
