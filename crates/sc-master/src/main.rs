//! The sc-master daemon: parse the command line, load the config, run the control plane (and,
//! in supervise mode, the whole cluster).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use sc_common::config::{Config, MasterMode};
use sc_common::daemon::{self, EXIT_FAILURE, EXIT_USAGE};
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
    /// Print the effective configuration as TOML and exit.
    PrintConfig,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("sc-master: {e}");
            return ExitCode::from(EXIT_USAGE as u8);
        }
    };
    if let Some(Command::PrintConfig) = cli.command {
        print!("{}", config.to_toml());
        return ExitCode::SUCCESS;
    }
    if config.master.mode == MasterMode::Standalone && config.master.listen.port() == 0 {
        eprintln!("sc-master: master.listen: standalone mode needs a fixed port that daemons can be told");
        return ExitCode::from(EXIT_USAGE as u8);
    }
    daemon::init_telemetry(config.cluster.log_format);
    let shutdown = CancellationToken::new();
    let outcome = async {
        let master = sc_master::Master::bind(config, cli.config.as_deref()).await?;
        // A second signal must not leave the children behind: they are killed before the exit.
        let children = master.children();
        let runtime_dir = master.runtime_dir();
        daemon::spawn_signal_handler_then(shutdown.clone(), move || {
            children.kill_all();
            if let Some(dir) = runtime_dir {
                let _ = std::fs::remove_dir_all(dir);
            }
        });
        master.serve(shutdown).await
    };
    match outcome.await {
        Ok(()) => ExitCode::SUCCESS,
        Err(sc_common::Error::Config(e)) => {
            tracing::error!("config: {e}");
            ExitCode::from(EXIT_USAGE as u8)
        }
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::from(EXIT_FAILURE as u8)
        }
    }
}
