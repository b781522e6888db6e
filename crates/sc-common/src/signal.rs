//! Signals and the orphan watchdog: how a daemon learns that it should stop.
//!
//! SIGTERM or SIGINT starts a graceful drain ([`spawn_signal_handler`]), a second one exits at
//! once; [`on_each_signal`] runs a handler per signal (SIGHUP reload, SIGUSR2 rolling restart);
//! a supervised daemon stops when its master is gone ([`spawn_orphan_watchdog`]).

use std::future::Future;
use std::time::Duration;

use tokio::signal::unix::SignalKind;
use tokio_util::sync::CancellationToken;

use crate::cli::EXIT_FAILURE;

/// How long an orphaned daemon (its supervising master gone) may take to shut down.
pub const ORPHAN_GRACE: Duration = Duration::from_secs(2);

/// The first SIGTERM or SIGINT cancels `shutdown` (a graceful drain); a second one exits at once.
pub fn spawn_signal_handler(shutdown: CancellationToken) {
    spawn_signal_handler_then(shutdown, || {});
}

/// As [`spawn_signal_handler`], running `on_second` (say, killing child processes) right
/// before the immediate exit of a second signal.
pub fn spawn_signal_handler_then(shutdown: CancellationToken, on_second: impl FnOnce() + Send + 'static) {
    tokio::spawn(async move {
        use tokio::signal::unix::signal;
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
        else {
            tracing::error!("cannot install signal handlers");
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutting down"),
            _ = int.recv() => tracing::info!(signal = "SIGINT", "shutting down"),
        }
        shutdown.cancel();
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::warn!("second signal, exiting now");
        on_second();
        std::process::exit(EXIT_FAILURE);
    });
}

/// Runs `each` every time the process receives `kind` (SIGHUP, SIGUSR2, ...), until `shutdown`.
/// `name` is for the log line if the handler cannot be installed.
pub async fn on_each_signal(
    kind: SignalKind,
    name: &str,
    shutdown: CancellationToken,
    mut each: impl FnMut(),
) {
    let Ok(mut signals) = tokio::signal::unix::signal(kind) else {
        tracing::error!(signal = name, "cannot install the signal handler");
        return;
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            received = signals.recv() => if received.is_none() { return },
        }
        each();
    }
}

/// A supervised daemon must not outlive its master, even one killed with SIGKILL: this polls
/// the parent pid and, once it is no longer `supervisor`, cancels `shutdown` and exits after
/// [`ORPHAN_GRACE`] whatever the drain is doing.
pub fn spawn_orphan_watchdog(supervisor: u32, shutdown: CancellationToken) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tick.tick().await;
            if std::os::unix::process::parent_id() != supervisor {
                break;
            }
        }
        tracing::error!(supervisor, "supervising master is gone, shutting down");
        shutdown.cancel();
        tokio::time::sleep(ORPHAN_GRACE).await;
        std::process::exit(EXIT_FAILURE);
    });
}

/// Runs `serve` until it ends; once `shutdown` is cancelled it gets `grace` to finish.
pub async fn serve_with_grace<E>(
    serve: impl Future<Output = Result<(), E>>,
    shutdown: &CancellationToken,
    grace: Duration,
) -> Result<(), E> {
    let deadline = async {
        shutdown.cancelled().await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        outcome = serve => outcome,
        _ = deadline => {
            tracing::warn!(?grace, "shutdown grace period over, exiting");
            Ok(())
        }
    }
}
