//! sc-worker: the SocketCluster server of the cluster.
//!
//! Balancers forward client connections here (with a PROXY v2 header carrying the real client
//! address), over TCP or, from a balancer on the same host, over the worker's Unix socket in
//! `[worker] unix_dir`. The worker serves HTTP with hyper, upgrades `[worker] path` to WebSocket
//! (tungstenite) and speaks the SocketCluster protocol ([`protocol`], [`socket`]). Channels are
//! fanned out locally ([`hub`]) and shared with the other workers through the brokers
//! ([`brokers`]): one broker subscription per channel per worker, one encode per message.
//! It registers with the master, watches the broker membership and serves grpc.health.v1.
//!
//! The worker is a library first: an app implements [`app::Handler`] and runs its own worker
//! binary around [`Worker::bind_with`]; the stock `sc-worker` binary uses [`app::DefaultHandler`].
//!
//! Entry points: [`Worker::bind`] (or [`Worker::bind_with`]), then [`Worker::serve`].

pub mod app;
pub mod auth;
pub mod brokers;
pub mod exchange;
pub mod http;
pub mod hub;
pub mod origins;
pub mod outbox;
pub mod protocol;
pub mod proxies;
pub mod socket;

pub use app::{DefaultHandler, ErrorObject, Handler, Socket};
pub use exchange::Exchange;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use sc_common::config::Config;
use sc_common::membership::{Event, Member, Role, default_id};
use sc_common::{MasterLink, net};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use sc_common::Error;

/// A worker with its listeners bound.
pub struct Worker {
    config: Config,
    id: String,
    listener: TcpListener,
    /// The Unix socket listener and its path, with `[worker] unix_dir`.
    unix: Option<(UnixListener, PathBuf)>,
    grpc: TcpListener,
    trusted_proxies: proxies::TrustedProxies,
    hub: Arc<hub::Hub>,
    handler: Arc<dyn Handler>,
    auth: auth::AuthEngine,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("id", &self.id)
            .field("listener", &self.listener)
            .finish_non_exhaustive()
    }
}

impl Worker {
    /// Binds the stock worker (pub/sub and auth, no app logic): the HTTP/WebSocket listener
    /// (`[worker] listen`) and the gRPC health listener (`[worker] grpc_listen`).
    pub async fn bind(config: Config) -> Result<Self, Error> {
        Self::bind_with(config, Arc::new(DefaultHandler)).await
    }

    /// Binds a worker running the app `handler`.
    pub async fn bind_with(config: Config, handler: Arc<dyn Handler>) -> Result<Self, Error> {
        let id = config.worker.id.clone().unwrap_or_else(|| default_id(Role::Worker));
        let worker = &config.worker;
        let key = if worker.auth_key.is_empty() && worker.auth_algorithm.starts_with("HS") {
            tracing::warn!(
                "no [worker] auth_key: using a key of this process only, so its tokens are not valid on other workers or after a restart"
            );
            sc_common::secret::generate()
        } else {
            worker.auth_key.clone()
        };
        let auth = auth::AuthEngine::new(
            &worker.auth_algorithm,
            &key,
            worker.auth_private_key.as_deref(),
            worker.auth_public_key.as_deref(),
            worker.auth_default_expiry,
        )
        .map_err(|e| Error::Config(e.to_string()))?;
        let pool = brokers::BrokerPool::new(id.clone(), config.cluster.secret.clone());
        let hub = Arc::new(hub::Hub::new(pool, handler.clone()));
        let trusted_proxies =
            proxies::TrustedProxies::parse(&config.worker.trusted_proxies).map_err(Error::Config)?;
        let listener = net::bind(config.worker.listen).await?;
        let unix = match &config.worker.unix_dir {
            Some(dir) => Some(bind_unix(dir, &id)?),
            None => None,
        };
        let grpc = net::bind(config.worker.grpc_listen).await?;
        Ok(Self { config, id, listener, unix, grpc, trusted_proxies, hub, handler, auth })
    }

    /// The exchange: publish and subscribe from server code.
    pub fn exchange(&self) -> Exchange {
        Exchange::new(self.hub.clone())
    }

    /// The bound HTTP/WebSocket address.
    pub fn local_addr(&self) -> Result<SocketAddr, Error> {
        Ok(self.listener.local_addr()?)
    }

    /// The path of the Unix socket listener, with `[worker] unix_dir`.
    pub fn unix_path(&self) -> Option<&std::path::Path> {
        self.unix.as_ref().map(|(_, path)| path.as_path())
    }

    /// The bound gRPC (health) address.
    pub fn grpc_addr(&self) -> Result<SocketAddr, Error> {
        Ok(self.grpc.local_addr()?)
    }

    /// Serves until `shutdown` is cancelled, then closes every socket with a reconnect code.
    /// `events` feeds the master's central log.
    pub async fn serve(
        self,
        events: mpsc::Receiver<Event>,
        shutdown: CancellationToken,
    ) -> Result<(), Error> {
        let addr = self.local_addr()?;
        let grpc_addr = self.grpc_addr()?;
        let hub = self.hub.clone();

        if let Some(url) = &self.config.worker.master {
            let unix = self.unix_path().map(|p| p.display().to_string()).unwrap_or_default();
            let advertise_ip = self.config.cluster.advertise_ip;
            let me =
                Member::this_process(Role::Worker, &self.id, grpc_addr, Some(addr), unix, advertise_ip, url);
            let link = MasterLink::new(url, &self.config.cluster.secret, me, vec![Role::Broker])?;
            let mut members = link.spawn(events, shutdown.clone());
            let hub = hub.clone();
            tokio::spawn(async move {
                loop {
                    let brokers: Vec<(String, String)> = members
                        .borrow_and_update()
                        .with_role(Role::Broker)
                        .map(|m| (m.id.clone(), m.grpc.clone()))
                        .collect();
                    hub.pool().apply(brokers, &hub);
                    if members.changed().await.is_err() {
                        return;
                    }
                }
            });
        } else {
            tracing::warn!("no [worker] master configured: no brokers, so no pub/sub");
        }

        let static_dir = match &self.config.worker.static_dir {
            Some(dir) => Some(
                std::fs::canonicalize(dir)
                    .map_err(|e| Error::Config(format!("worker.static_dir: {}: {e}", dir.display())))?,
            ),
            None => None,
        };
        let worker_id = self
            .id
            .parse()
            .map_err(|_| Error::Config(format!("worker.id: {:?} is not a valid header value", self.id)))?;
        // Sockets are closed only after the listener is gone (see below), so a client that
        // reconnects at once is refused here and goes to another worker instead of waiting in
        // this listener's backlog.
        let close_sockets = CancellationToken::new();
        let sockets = TaskTracker::new();
        let context = Arc::new(socket::Context {
            hub,
            handler: self.handler.clone(),
            auth: self.auth,
            settings: socket::Settings::from_config(&self.config.worker),
            shutdown: close_sockets.clone(),
        });
        let http = Arc::new(http::Http {
            context,
            path: http::Http::normalise_path(&self.config.worker.path),
            worker_id,
            origins: origins::Origins::new(&self.config.worker.origins),
            trusted_proxies: self.trusted_proxies.clone(),
            max_payload: usize::try_from(self.config.worker.max_payload).unwrap_or(usize::MAX),
            static_dir,
            api_key: self.config.worker.api_key.clone(),
            sockets: sockets.clone(),
            faults: std::env::var(http::FAULTS_ENV).is_ok_and(|v| v == "1"),
        });

        let (health_reporter, health) = net::health();
        let grpc = tonic::transport::Server::builder().add_service(health);
        let grpc_task = tokio::spawn(net::serve_grpc(grpc, self.grpc, shutdown.clone()));

        let (unix_listener, unix_path) = match self.unix {
            Some((listener, path)) => (Some(listener), Some(path)),
            None => (None, None),
        };
        tracing::info!(id = %self.id, %addr, unix = ?unix_path, grpc = %grpc_addr, path = %self.config.worker.path, "worker listening");
        let tracker = TaskTracker::new();
        loop {
            let accept_unix = async {
                match &unix_listener {
                    Some(listener) => listener.accept().await.map(|(stream, _)| stream),
                    None => std::future::pending().await,
                }
            };
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = self.listener.accept() => accepted,
                accepted = accept_unix => match accepted {
                    Ok(stream) => {
                        tracker.spawn(http::serve_unix_connection(http.clone(), stream));
                        continue;
                    }
                    Err(e) => Err(e),
                },
            };
            match accepted {
                Ok((stream, remote)) => {
                    tracker.spawn(http::serve_connection(http.clone(), stream, remote));
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
        // Drain: refuse new connections first, then close every socket with the reconnect-now
        // close, then wait for the close frames to be written (bounded by the caller's grace).
        drop(self.listener);
        drop(unix_listener);
        if let Some(path) = &unix_path {
            let _ = std::fs::remove_file(path);
        }
        health_reporter.set_service_status("", tonic_health::ServingStatus::NotServing).await;
        let open = sockets.len();
        close_sockets.cancel();
        tracker.close();
        tracker.wait().await;
        sockets.close();
        sockets.wait().await;
        tracing::info!(id = %self.id, sockets = open, "worker drained");
        let _ = grpc_task.await;
        tracing::info!(id = %self.id, "worker stopped");
        Ok(())
    }
}

/// Binds `<dir>/<id>-<pid>.sock`: the pid keeps a rolling restart's replacement (same id) off
/// the old process's socket, so each removes only its own on exit.
fn bind_unix(dir: &std::path::Path, id: &str) -> Result<(UnixListener, PathBuf), Error> {
    let path = dir.join(format!("{id}-{}.sock", std::process::id()));
    let bind_err = |source| Error::Bind { addr: path.display().to_string(), source };
    std::fs::create_dir_all(dir).map_err(bind_err)?;
    // A leftover of an earlier process with the same pid.
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).map_err(bind_err)?;
    Ok((listener, path))
}
