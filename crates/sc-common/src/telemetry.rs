//! Telemetry of every daemon: tracing on stderr, the forwarding of log lines to the master's
//! central log, and the panic hook.
//!
//! Entry points: [`init`] once at start-up, then [`central_log`] for the queue that a
//! [`crate::MasterLink`] forwards to the master.

use std::fmt::Write as _;
use std::sync::OnceLock;

use tokio::sync::mpsc;
use tracing::field::{Field, Visit};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::LogFormat;
use crate::membership::{Event, Severity};

/// The sender side of [`central_log`]; set once.
static CENTRAL_LOG: OnceLock<mpsc::Sender<Event>> = OnceLock::new();

/// Forwards ERROR, WARN and INFO events (INFO is lifecycle only, see STYLE.md) to the central
/// log queue, never blocking. INFO from dependencies is left out: only ours is lifecycle.
struct CentralLogLayer;

#[derive(Default)]
struct LineVisitor {
    message: String,
    fields: String,
    location: Option<String>,
}

/// Installs the tracing subscriber: plain or JSON lines on stderr, filtered by RUST_LOG
/// (default `info`), and the forwarding of errors, warnings and lifecycle notices (INFO) to the
/// central log (see [`central_log`]). Also installs the panic hook.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour codes only for a terminal (not files, pipes or journald), and never with NO_COLOR.
    let colour =
        std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none();
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(colour);
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

/// The queue of warnings and errors for the master's central log. Call once, after [`init`],
/// and hand the receiver to the [`crate::MasterLink`].
pub fn central_log() -> mpsc::Receiver<Event> {
    // Bounded: when the master is slow or away, newer events are dropped rather than held.
    let (tx, rx) = mpsc::channel(256);
    let _ = CENTRAL_LOG.set(tx);
    rx
}

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
        if meta.target().starts_with("sc_common::master_link") {
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
