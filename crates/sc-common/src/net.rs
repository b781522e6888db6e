//! Networking every daemon does the same way: binding listeners (with the address in the
//! error), the accept loop's back-off, serving gRPC with grpc.health.v1, and the addresses a
//! member tells the others.
//!
//! Entry points: [`bind`] and [`bind_public`] in a daemon's `bind`, [`accept`] in its accept
//! loop, [`health`] and [`serve_grpc`] for its gRPC listener, [`advertised`] for its member
//! record.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::Error;
use crate::membership::Backoff;

/// The first pause after a failed accept; it doubles up to [`ACCEPT_BACKOFF_MAX`].
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// The longest pause after failed accepts in a row.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// At most one "accept failed" line per this long, whatever the rate of failures.
const ACCEPT_REPORT_EVERY: Duration = Duration::from_secs(1);

/// The failed accepts of this process not yet logged. One for the whole process: running out
/// of file descriptors (the usual cause) is a process-wide condition, and every accept loop
/// hitting it at once should still make one line a second. std Mutex: a counter update, never
/// held across await.
static ACCEPT_FAILURES: Mutex<FailureReport> = Mutex::new(FailureReport::new(ACCEPT_REPORT_EVERY));

/// Counts failures and says when to report them: at most once per `every`, with the number
/// of failures since the previous report.
#[derive(Debug)]
struct FailureReport {
    every: Duration,
    failures: u64,
    last: Option<Instant>,
}

impl FailureReport {
    const fn new(every: Duration) -> Self {
        Self { every, failures: 0, last: None }
    }

    /// Counts one failure at `now`; returns the count to report if a report is due.
    fn failed(&mut self, now: Instant) -> Option<u64> {
        self.failures += 1;
        if self.last.is_some_and(|last| now.duration_since(last) < self.every) {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.failures))
    }
}

/// Binds a TCP listener, with the address in the error.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, Error> {
    bind_with(addr, 1024)
}

/// Binds a public listener with a listen queue of `backlog`. Never SO_REUSEPORT: a port that
/// another process holds is an error, not a port silently shared with an unrelated cluster.
/// Several balancers share one listener by inheriting it instead (see [`crate::listen_fds`]).
/// `key` names the setting in the error (`[balancer] listen`).
pub fn bind_public(addr: SocketAddr, backlog: u32, key: &str) -> Result<TcpListener, Error> {
    bind_with(addr, backlog).map_err(|e| match e {
        Error::Bind { addr, source } => Error::Bind { addr: format!("{addr} ({key})"), source },
        other => other,
    })
}

fn bind_with(addr: SocketAddr, backlog: u32) -> Result<TcpListener, Error> {
    let bind_err = |source| Error::Bind { addr: addr.to_string(), source };
    let socket = if addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.map_err(bind_err)?;
    socket.set_reuseaddr(true).map_err(bind_err)?;
    socket.bind(addr).map_err(bind_err)?;
    socket.listen(backlog).map_err(bind_err)
}

/// The next connection of an accept loop, or `None` once `shutdown` is cancelled.
///
/// `accept` is called for each attempt (`|| listener.accept()`, or a select over several
/// listeners). A failed accept (out of file descriptors, and the like) is not the end of the
/// loop: this pauses (50 ms, doubling up to 1 s while the failures go on) instead of spinning,
/// and logs at most one warning a second for the whole process, with the number of failures
/// since the previous one.
pub async fn accept<S, A, F, Fut>(mut accept: F, shutdown: &CancellationToken) -> Option<(S, A)>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::io::Result<(S, A)>>,
{
    let mut backoff = Backoff::new(ACCEPT_BACKOFF, ACCEPT_BACKOFF_MAX);
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return None,
            accepted = accept() => accepted,
        };
        let error = match accepted {
            Ok(accepted) => return Some(accepted),
            Err(error) => error,
        };
        let delay = backoff.next_delay();
        let report = ACCEPT_FAILURES.lock().unwrap_or_else(PoisonError::into_inner).failed(Instant::now());
        if let Some(failures) = report {
            tracing::warn!(%error, failures, ?delay, "accept failed, backing off");
        }
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(delay) => {}
        }
    }
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

/// This host's name ("host" if it cannot be read).
pub fn hostname() -> String {
    let uname = rustix::system::uname();
    match uname.nodename().to_str() {
        Ok(name) if !name.is_empty() => name.to_owned(),
        _ => "host".to_owned(),
    }
}

/// The address other members should use for a listener bound to `bound`: as bound, unless it
/// is a wildcard (0.0.0.0 or ::), which others cannot dial. Then `advertise_ip` if configured,
/// else the local address this host uses to reach the master (found without sending anything,
/// by connecting a UDP socket), else loopback.
pub fn advertised(bound: SocketAddr, advertise_ip: Option<IpAddr>, master_url: Option<&str>) -> SocketAddr {
    if !bound.ip().is_unspecified() {
        return bound;
    }
    let ip = advertise_ip.or_else(|| master_url.and_then(route_to)).unwrap_or(if bound.is_ipv4() {
        Ipv4Addr::LOCALHOST.into()
    } else {
        Ipv6Addr::LOCALHOST.into()
    });
    SocketAddr::new(ip, bound.port())
}

/// The local IP the kernel would use to reach the host of `url` ("http://host:port").
fn route_to(url: &str) -> Option<IpAddr> {
    use std::net::ToSocketAddrs;
    let authority = url.split("://").nth(1)?.split('/').next()?;
    let target = authority.to_socket_addrs().ok()?.next()?;
    let any: SocketAddr =
        if target.is_ipv4() { (Ipv4Addr::UNSPECIFIED, 0).into() } else { (Ipv6Addr::UNSPECIFIED, 0).into() };
    let socket = std::net::UdpSocket::bind(any).ok()?;
    socket.connect(target).ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_unspecified()).then_some(ip)
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::*;

    fn emfile() -> io::Error {
        io::Error::from_raw_os_error(24)
    }

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
    fn the_host_has_a_name() {
        assert!(!hostname().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn accept_backs_off_while_accepting_fails() {
        let shutdown = CancellationToken::new();
        let started = Instant::now();
        let mut calls = 0u32;
        let accepted = accept(
            || {
                calls += 1;
                let call = calls;
                async move { if call <= 7 { Err(emfile()) } else { Ok((call, ())) } }
            },
            &shutdown,
        )
        .await;
        assert_eq!(accepted, Some((8, ())), "the first accept that works is returned");
        // 50, 100, 200, 400, 800 ms, then capped at 1 s.
        assert_eq!(started.elapsed(), Duration::from_millis(50 + 100 + 200 + 400 + 800 + 1000 + 1000));
    }

    #[tokio::test(start_paused = true)]
    async fn accept_ends_on_shutdown_even_while_backing_off() {
        let shutdown = CancellationToken::new();
        let cancel = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(120)).await;
            cancel.cancel();
        });
        let started = Instant::now();
        let accepted = accept(|| async { Err::<((), ()), _>(emfile()) }, &shutdown).await;
        assert_eq!(accepted, None);
        assert_eq!(started.elapsed(), Duration::from_millis(120), "not after the 200 ms pause");
        // Cancelled before: nothing is accepted, even what is ready.
        assert_eq!(accept(|| async { Ok::<_, io::Error>(((), ())) }, &shutdown).await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_are_reported_at_most_once_a_second_with_their_count() {
        let mut report = FailureReport::new(Duration::from_secs(1));
        let start = Instant::now();
        let mut lines = Vec::new();
        // 100 failures, one every 35 ms: 3.5 s.
        for i in 0..100u32 {
            let now = start + Duration::from_millis(35) * i;
            if let Some(count) = report.failed(now) {
                lines.push((now - start, count));
            }
        }
        assert_eq!(lines.len(), 4, "{lines:?}");
        assert_eq!(lines[0], (Duration::ZERO, 1), "the first failure is reported at once");
        for pair in lines.windows(2) {
            assert!(pair[1].0 - pair[0].0 >= Duration::from_secs(1), "{lines:?}");
        }
        let reported: u64 = lines.iter().map(|(_, count)| count).sum();
        let pending = report.failures;
        assert_eq!(reported + pending, 100, "every failure is counted once");
    }

    #[tokio::test]
    async fn a_public_port_in_use_is_an_error_naming_the_key_and_the_address() {
        let first = bind_public("127.0.0.1:0".parse().unwrap(), 64, "[balancer] listen").unwrap();
        let addr = first.local_addr().unwrap();
        let error = bind_public(addr, 64, "[balancer] listen").unwrap_err().to_string();
        assert!(error.contains(&format!("{addr} ([balancer] listen)")), "{error}");
        assert!(error.contains("in use"), "{error}");
    }
}
