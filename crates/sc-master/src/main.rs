//! The sc-master daemon: parse the command line, load the config, run the control plane (and,
//! in supervise mode, the whole cluster), print the admin API (and, with a generated token, a
//! ready link to the admin page) and `cluster ready` lines.

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
    let config = match Config::load(cli.config.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("sc-master: {e}");
            return exit(EXIT_USAGE);
        }
    };
    if let Some(Command::PrintConfig) = cli.command {
        print!("{}", config.redacted().to_toml());
        return ExitCode::SUCCESS;
    }
    if config.master.mode == MasterMode::Standalone && config.master.listen.port() == 0 {
        // Fine for a library user who reads the bound address, not for daemons told a URL.
        eprintln!("sc-master: master.listen: standalone mode needs a fixed port that daemons can be told");
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
