//! What every daemon's `main` does the same way: the command line, telemetry, signals, the
//! orphan watchdog, the grpc.health.v1 listener and exit codes.

use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::field::{Field, Visit};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::Error;
use crate::config::LogFormat;
use crate::membership::{Event, Severity};

/// Exit code for bad configuration or usage (EX_USAGE).
pub const EXIT_USAGE: i32 = 64;
/// Exit code for a runtime failure.
pub const EXIT_FAILURE: i32 = 1;

/// How long an orphaned daemon (its supervising master gone) may take to shut down.
pub const ORPHAN_GRACE: Duration = Duration::from_secs(2);

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
    #[command(subcommand)]
    pub command: Option<MemberCommand>,
}

/// Subcommands of a member daemon.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum MemberCommand {
    /// Run the daemon (the default).
    Run,
    /// Print the effective configuration as TOML and exit.
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

/// Installs the tracing subscriber: plain or JSON lines on stderr, filtered by RUST_LOG
/// (default `info`), and the forwarding of errors, warnings and lifecycle notices (INFO) to the
/// central log (see [`central_log`]).
pub fn init_telemetry(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match format {
        LogFormat::Plain => fmt.boxed(),
        LogFormat::Json => fmt.json().boxed(),
    };
    // RUST_LOG filters the local lines only: the central log gets every notice, warning and
    // error whatever a daemon's local verbosity.
    let _ = tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(CentralLogLayer.with_filter(LevelFilter::INFO))
        .try_init();
    install_panic_hook();
}

static CENTRAL_LOG: OnceLock<mpsc::Sender<Event>> = OnceLock::new();

/// The queue of warnings and errors for the master's central log. Call once, after
/// [`init_telemetry`], and hand the receiver to the [`crate::membership::MasterLink`].
pub fn central_log() -> mpsc::Receiver<Event> {
    // Bounded: when the master is slow or away, newer events are dropped rather than held.
    let (tx, rx) = mpsc::channel(256);
    let _ = CENTRAL_LOG.set(tx);
    rx
}

/// Forwards ERROR, WARN and INFO events (INFO is lifecycle only, see STYLE.md) to the central
/// log queue, never blocking. INFO from dependencies is left out: only ours is lifecycle.
struct CentralLogLayer;

impl<S: tracing::Subscriber> Layer<S> for CentralLogLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let meta = event.metadata();
        let severity = match *meta.level() {
            tracing::Level::ERROR => Severity::Error,
            tracing::Level::WARN => Severity::Warning,
            tracing::Level::INFO if meta.target().starts_with("sc_") => Severity::Notice,
            _ => return,
        };
        // The master link's own troubles cannot be reported through it.
        if meta.target().starts_with("sc_common::membership") {
            return;
        }
        let Some(tx) = CENTRAL_LOG.get() else { return };
        let mut line = LineVisitor::default();
        event.record(&mut line);
        // A `location` field (the panic hook sets one) beats the place of the log macro.
        let location = match (line.location.take(), meta.file(), meta.line()) {
            (Some(location), _, _) => location,
            (None, Some(file), Some(line)) => format!("{file}:{line}"),
            _ => meta.target().to_owned(),
        };
        let _ = tx.try_send(Event::now(severity, line.finish(), location));
    }
}

#[derive(Default)]
struct LineVisitor {
    message: String,
    fields: String,
    location: Option<String>,
}

impl LineVisitor {
    fn finish(self) -> String {
        if self.fields.is_empty() { self.message } else { format!("{}{}", self.message, self.fields) }
    }
}

impl Visit for LineVisitor {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "location" {
            self.location = Some(format!("{value:?}"));
        } else if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.fields, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "location" {
            self.location = Some(value.to_owned());
        } else if field.name() == "message" {
            self.message.push_str(value);
        } else {
            let _ = write!(self.fields, " {}={value}", field.name());
        }
    }
}

/// Panics go to the log (and so to the central log) with their location.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".to_owned());
        let location = info.location().map(|l| format!("{}:{}", l.file(), l.line())).unwrap_or_default();
        let thread = std::thread::current();
        let thread = thread.name().unwrap_or("unnamed");
        tracing::error!(location = location.as_str(), thread, "panic: {message}");
    }));
}

/// The first SIGTERM or SIGINT cancels `shutdown` (a graceful drain); a second one exits at once.
pub fn spawn_signal_handler(shutdown: CancellationToken) {
    spawn_signal_handler_then(shutdown, || {});
}

/// As [`spawn_signal_handler`], running `on_second` (say, killing child processes) right
/// before the immediate exit of a second signal.
pub fn spawn_signal_handler_then(shutdown: CancellationToken, on_second: impl FnOnce() + Send + 'static) {
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
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
    kind: tokio::signal::unix::SignalKind,
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
            // SAFETY: getppid has no preconditions and cannot fail.
            let parent = unsafe { libc::getppid() };
            if u32::try_from(parent).ok() != Some(supervisor) {
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

/// Binds a TCP listener, with the address in the error.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, Error> {
    bind_with(addr, false, 1024)
}

/// Binds a TCP listener with SO_REUSEPORT, so that several processes (balancers) share the
/// address and the kernel spreads new connections over them; `backlog` is the listen queue.
pub fn bind_shared(addr: SocketAddr, backlog: u32) -> Result<TcpListener, Error> {
    bind_with(addr, true, backlog)
}

fn bind_with(addr: SocketAddr, reuseport: bool, backlog: u32) -> Result<TcpListener, Error> {
    let socket =
        if addr.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() };
    let bind_err = |source| Error::Bind { addr: addr.to_string(), source };
    let socket = socket.map_err(bind_err)?;
    socket.set_reuseaddr(true).map_err(bind_err)?;
    if reuseport {
        socket.set_reuseport(true).map_err(bind_err)?;
    }
    socket.bind(addr).map_err(bind_err)?;
    socket.listen(backlog).map_err(bind_err)
}

/// A grpc.health.v1 service reporting SERVING for the whole server (service name ""), and the
/// reporter to switch it to NOT_SERVING when draining.
pub fn health() -> (
    tonic_health::server::HealthReporter,
    tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
) {
    tonic_health::server::health_reporter()
}

/// Serves `router` on `listener` until `shutdown`.
pub async fn serve_grpc(
    router: tonic::transport::server::Router,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    router.serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned()).await.map_err(Error::from)
}

/// The id a member uses when none is configured: role and pid.
/// The id a member uses when none is configured: role, host name and pid, which is unique on
/// one host and, in a container (pid 1), stable across restarts of the container.
pub fn default_id(role: crate::Role) -> String {
    format!("{}-{}-{}", role.as_str(), hostname(), std::process::id())
}

/// One grpc.health.v1 Check against `target`, for `healthcheck`: exit 0 if serving.
fn healthcheck(name: &str, target: &str) -> std::process::ExitCode {
    use std::process::ExitCode;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
        return ExitCode::from(EXIT_FAILURE as u8);
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
            ExitCode::from(EXIT_FAILURE as u8)
        }
        Err(e) => {
            println!("{name} at {target}: {e}");
            ExitCode::from(EXIT_FAILURE as u8)
        }
    }
}

/// This host's name ("host" if it cannot be read).
pub fn hostname() -> String {
    let mut buffer = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that many bytes.
    let rc = unsafe { libc::gethostname(buffer.as_mut_ptr().cast(), buffer.len()) };
    let end = buffer.iter().position(|b| *b == 0).unwrap_or(buffer.len());
    match (rc, std::str::from_utf8(&buffer[..end])) {
        (0, Ok(name)) if !name.is_empty() => name.to_owned(),
        _ => "host".to_owned(),
    }
}

/// The address other members should use for a listener bound to `bound`: as bound, unless it
/// is a wildcard (0.0.0.0 or ::), which others cannot dial. Then `advertise_ip` if configured,
/// else the local address this host uses to reach the master (found without sending anything,
/// by connecting a UDP socket), else loopback.
pub fn advertised(
    bound: SocketAddr,
    advertise_ip: Option<std::net::IpAddr>,
    master_url: Option<&str>,
) -> SocketAddr {
    if !bound.ip().is_unspecified() {
        return bound;
    }
    let ip = advertise_ip.or_else(|| master_url.and_then(route_to)).unwrap_or(if bound.is_ipv4() {
        std::net::Ipv4Addr::LOCALHOST.into()
    } else {
        std::net::Ipv6Addr::LOCALHOST.into()
    });
    SocketAddr::new(ip, bound.port())
}

/// The local IP the kernel would use to reach the host of `url` ("http://host:port").
fn route_to(url: &str) -> Option<std::net::IpAddr> {
    use std::net::ToSocketAddrs;
    let authority = url.split("://").nth(1)?.split('/').next()?;
    let target = authority.to_socket_addrs().ok()?.next()?;
    let any: SocketAddr =
        if target.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { (std::net::Ipv6Addr::UNSPECIFIED, 0).into() };
    let socket = std::net::UdpSocket::bind(any).ok()?;
    socket.connect(target).ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_unspecified()).then_some(ip)
}

/// The whole `main` of a member daemon (balancer, worker, broker): parses [`MemberCli`], loads
/// the config (exit 64 on error), handles `print-config`, sets up telemetry, signals and the
/// orphan watchdog, then runs `serve(config, central_log, shutdown)` with the shutdown grace
/// (`[master] shutdown_grace`). A runtime failure exits 1.
pub fn member_main<F, Fut>(role: crate::Role, serve: F) -> std::process::ExitCode
where
    F: FnOnce(crate::Config, mpsc::Receiver<Event>, CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), Error>>,
{
    use clap::Parser;
    use std::process::ExitCode;

    let name = format!("sc-{}", role.as_str());
    let cli = MemberCli::parse();
    let mut config = match crate::Config::load(cli.config.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{name}: {e}");
            return ExitCode::from(EXIT_USAGE as u8);
        }
    };
    let (id, master) = match role {
        crate::Role::Balancer => (&mut config.balancer.id, &mut config.balancer.master),
        crate::Role::Worker => (&mut config.worker.id, &mut config.worker.master),
        crate::Role::Broker => (&mut config.broker.id, &mut config.broker.master),
    };
    if cli.id.is_some() {
        *id = cli.id.clone();
    }
    if cli.master.is_some() {
        *master = cli.master.clone();
    }
    if let Some(MemberCommand::PrintConfig) = cli.command {
        print!("{}", config.to_toml());
        return ExitCode::SUCCESS;
    }
    if let Some(MemberCommand::Healthcheck { addr }) = &cli.command {
        let listen = match role {
            crate::Role::Balancer => config.balancer.grpc_listen,
            crate::Role::Worker => config.worker.grpc_listen,
            crate::Role::Broker => config.broker.listen,
        };
        let target = addr.clone().unwrap_or_else(|| advertised(listen, None, None).to_string());
        return healthcheck(&name, &target);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("{name}: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_FAILURE as u8);
        }
    };
    runtime.block_on(async move {
        init_telemetry(config.cluster.log_format);
        let events = central_log();
        let shutdown = CancellationToken::new();
        spawn_signal_handler(shutdown.clone());
        if let Some(pid) = cli.supervisor_pid {
            spawn_orphan_watchdog(pid, shutdown.clone());
        }
        let grace = config.master.shutdown_grace;
        match serve_with_grace(serve(config, events, shutdown.clone()), &shutdown, grace).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(Error::Config(e)) => {
                tracing::error!("config: {e}");
                ExitCode::from(EXIT_USAGE as u8)
            }
            Err(e) => {
                tracing::error!("{e}");
                ExitCode::from(EXIT_FAILURE as u8)
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertised_addresses() {
        let bound: SocketAddr = "127.0.0.5:900".parse().unwrap();
        assert_eq!(advertised(bound, None, None), bound, "a specific address is kept");
        let wildcard: SocketAddr = "0.0.0.0:900".parse().unwrap();
        assert_eq!(advertised(wildcard, Some([10, 1, 2, 3].into()), None), "10.1.2.3:900".parse().unwrap());
        assert_eq!(
            advertised(wildcard, None, Some("http://127.0.0.1:9000")),
            "127.0.0.1:900".parse().unwrap()
        );
        assert_eq!(advertised(wildcard, None, None), "127.0.0.1:900".parse().unwrap());
    }

    #[test]
    fn default_ids_name_the_host() {
        let id = default_id(crate::Role::Worker);
        assert!(id.starts_with(&format!("worker-{}-", hostname())), "{id}");
    }
}
