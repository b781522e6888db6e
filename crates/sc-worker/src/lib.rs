//! sc-worker: the SocketCluster server of the cluster.
//!
//! Balancers forward client connections here (with a PROXY v2 header carrying the real client
//! address), over TCP or, from a balancer on the same host, over the worker's Unix socket in
//! `[worker] unix_dir`. The worker serves HTTP with hyper (`http`), upgrades `[worker] path` to
//! WebSocket (tungstenite) and speaks the SocketCluster protocol (`protocol`, `socket`).
//! Channels are fanned out locally (`hub`) and shared with the other workers through the
//! brokers: `brokers` is the pool (which broker owns which channel, make-before-break moves)
//! and `broker_link` its only gRPC edge. It registers with the master, watches the broker
//! membership and serves grpc.health.v1, its metrics (`sc.metrics.v1`, for the master) and
//! Prometheus text at `GET /metrics` on its gRPC listener (`metrics`).
//!
//! The publish path, each room crossed once: socket -> brokers (pool) -> broker_link -> the
//! broker -> broker_link -> brokers -> hub (the pool's delivery sink) -> each socket's outbox.
//!
//! The worker is a library first: an app is built with [`App`] and its binary's `main` is
//! [`run`] (the worker alone) or [`launch`] (the worker under a master, or the whole cluster
//! when started plainly: `cargo run`); the low-level form implements [`Handler`] around
//! [`Worker::bind_with`]. The stock `sc-worker` binary uses [`DefaultHandler`].
//!
//! Entry points: [`run`] / [`launch`]; [`Worker::bind`] (or [`Worker::bind_app`],
//! [`Worker::bind_with`]), then [`Worker::serve`].

#![warn(missing_docs, unreachable_pub)]

mod app;
mod auth;
mod broker_link;
mod brokers;
mod builder;
mod direct;
mod error;
mod exchange;
mod handle;
mod handoff;
mod http;
mod hub;
mod launch;
mod metrics;
mod origins;
mod outbox;
mod presence;
mod protocol;
mod proxies;
mod socket;
mod timers;
mod tls;

pub use app::{DefaultHandler, Handler, HttpRejection, PublishIn, PublishOut, UpgradeRequest};
/// The HTTP routing crate of [`App::routes`], re-exported so that an app uses the same version.
pub use axum;
pub use builder::{App, AppContext};
pub use error::Error;
pub use exchange::{Exchange, PresenceEvents, Subscription};
pub use handle::Sockets;
pub use launch::{MASTER_ENV, launch};
pub use presence::{Presence, PresenceChange, PresenceEvent, PresenceMember};
pub use protocol::{ErrorObject, Protocol};
pub use sc_common::Error as StartError;
/// The cluster's configuration, which [`Worker::bind_app`] takes (`Config::load`).
pub use sc_common::config::Config;
pub use socket::{
    CLOSE_BAD_HANDSHAKE, CLOSE_BEFORE_HANDSHAKE, CLOSE_HANDSHAKE_TIMEOUT, CLOSE_INVALID_DATA,
    CLOSE_PONG_TIMEOUT, CLOSE_PROTOCOL_ERROR, CLOSE_SHUTDOWN, CLOSE_SLOW_CONSUMER, CLOSE_TOO_BIG, Socket,
};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sc_common::membership::{Event, Member, Role, default_id};
use sc_common::{MasterLink, net};
use serde::de::DeserializeOwned;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::brokers::{BrokerPool, DeliverySink};
use crate::hub::Hub;

/// A worker with its listeners bound.
pub struct Worker {
    config: Config,
    id: String,
    listener: TcpListener,
    /// The Unix socket listener and its path, with `[worker] unix_dir`.
    unix: Option<(UnixListener, PathBuf)>,
    grpc: TcpListener,
    hub: Arc<Hub>,
    pool: Arc<BrokerPool>,
    http: Arc<http::Http>,
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
    pub async fn bind(config: Config) -> Result<Self, StartError> {
        Self::bind_with(config, Arc::new(DefaultHandler)).await
    }

    /// Binds a worker running the app `handler` (the low-level form of [`Worker::bind_app`]).
    /// Every setting is checked before anything is bound.
    pub async fn bind_with(config: Config, handler: Arc<dyn Handler>) -> Result<Self, StartError> {
        Self::bind_built(config, |_| Ok((handler, None))).await
    }

    /// Binds a worker running the app that `build` makes from its [`AppContext`]: the
    /// `[app]` settings as `C` (a table that does not fit `C` is a start-up error naming the
    /// key) and the worker's handles. What [`run`] does after loading the config.
    pub async fn bind_app<C, F>(config: Config, build: F) -> Result<Self, StartError>
    where
        C: DeserializeOwned,
        F: FnOnce(AppContext<C>) -> App,
    {
        let settings = app_settings::<C>(&config.app)?;
        Self::bind_built(config, move |context| {
            let mut app = build(AppContext {
                config: settings,
                exchange: context.exchange,
                sockets: context.sockets,
                worker_id: context.worker_id,
            });
            let routes = app.take_routes();
            Ok((Arc::new(app), routes))
        })
        .await
    }

    /// Checks the settings, makes the worker's parts, builds the app on them, then binds.
    async fn bind_built<F>(config: Config, build: F) -> Result<Self, StartError>
    where
        F: FnOnce(AppContext<()>) -> Result<(Arc<dyn Handler>, Option<axum::Router>), StartError>,
    {
        let id = config.worker.id.clone().unwrap_or_else(|| default_id(Role::Worker));
        config.validate_worker(&id)?;
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
        .map_err(|e| StartError::Config(e.to_string()))?;
        let trusted_proxies = proxies::TrustedProxies::parse(&worker.trusted_proxies)?;
        let static_dir = match &worker.static_dir {
            Some(dir) => Some(
                std::fs::canonicalize(dir)
                    .map_err(|e| StartError::Config(format!("worker.static_dir: {}: {e}", dir.display())))?,
            ),
            None => None,
        };
        let worker_id = id
            .parse()
            .map_err(|_| StartError::Config(format!("worker.id: {id:?} is not a valid header value")))?;

        let message_limit = config.grpc_message_limit();
        let connector = broker_link::Grpc::new(id.clone(), config.cluster.secret.clone(), message_limit);
        let pool = Arc::new(BrokerPool::new(Arc::new(connector), message_limit));
        let hub = Arc::new(Hub::new(pool.clone()));
        let exchange = Exchange::new(hub.clone(), pool.clone());
        let sockets = Sockets::default();
        let (handler, routes) = build(AppContext {
            config: (),
            exchange: exchange.clone(),
            sockets: sockets.clone(),
            worker_id: id.clone(),
        })?;
        hub.set_with_json(handler.has_publish_out());
        hub.set_presence(presence::Settings::from_config(worker, &handler.presence_channels()));
        // Sockets are closed only after the listeners are gone (see `drain`), so a client that
        // reconnects at once is refused here and goes to another worker instead of waiting in
        // this listener's backlog.
        let events = handler.has_event_hooks();
        let services = handle::Services {
            auth,
            ack_timeout: worker.ack_timeout,
            exchange,
            sockets,
            events,
            outbound_queue: worker.outbound_queue,
        };
        let context = Arc::new(socket::Context {
            hub: hub.clone(),
            pool: pool.clone(),
            handler,
            services: Arc::new(services),
            settings: socket::Settings::from_config(worker),
            tasks: TaskTracker::new(),
            timers: timers::Timers::new(worker.ping_interval, worker.handshake_timeout),
        });
        let http = Arc::new(http::Http {
            context,
            path: http::Http::normalise_path(&worker.path),
            worker_id,
            origins: origins::Origins::new(&worker.origins),
            proxy_sources: Arc::new(proxies::ProxySources::new(trusted_proxies)),
            max_payload: usize::try_from(worker.max_payload).unwrap_or(usize::MAX),
            static_dir,
            api_key: worker.api_key.clone(),
            routes,
            faults: std::env::var(http::FAULTS_ENV).is_ok_and(|v| v == "1"),
            pending: sc_common::per_ip::PendingByIp::new(worker.max_pending_per_ip),
            header_timeout: worker.request_header_timeout,
        });

        let listener = net::bind(worker.listen).await?;
        let unix = match &worker.unix_dir {
            Some(dir) => Some(bind_unix(dir, &id)?),
            None => None,
        };
        let grpc = net::bind(worker.grpc_listen).await?;
        Ok(Self { config, id, listener, unix, grpc, hub, pool, http })
    }

    /// The exchange: publish and subscribe from server code.
    pub fn exchange(&self) -> Exchange {
        Exchange::new(self.hub.clone(), self.pool.clone())
    }

    /// This worker's open sockets.
    pub fn sockets(&self) -> Sockets {
        self.http.context.services.sockets.clone()
    }

    /// The bound HTTP/WebSocket address.
    pub fn local_addr(&self) -> Result<SocketAddr, StartError> {
        Ok(self.listener.local_addr()?)
    }

    /// The path of the Unix socket listener, with `[worker] unix_dir`.
    pub fn unix_path(&self) -> Option<&Path> {
        self.unix.as_ref().map(|(_, path)| path.as_path())
    }

    /// The bound gRPC (health) address.
    pub fn grpc_addr(&self) -> Result<SocketAddr, StartError> {
        Ok(self.grpc.local_addr()?)
    }

    /// Serves until `shutdown` is cancelled, then drains: refuses new connections, closes every
    /// socket with a reconnect code and waits for the close frames (the caller bounds the
    /// time). `events` feeds the master's central log.
    pub async fn serve(
        self,
        events: mpsc::Receiver<Event>,
        shutdown: CancellationToken,
    ) -> Result<(), StartError> {
        let addr = self.local_addr()?;
        let grpc_addr = self.grpc_addr()?;
        self.link_brokers(events, grpc_addr, addr, &shutdown)?;

        let (health_reporter, health) = net::health();
        let registry = Arc::new(metrics::registry(&self.id));
        let grpc = tonic::transport::Server::builder()
            .accept_http1(true)
            .add_routes(sc_common::metrics::routes(registry, &self.config.cluster.secret))
            .add_service(health);
        let grpc_task = tokio::spawn(net::serve_grpc(grpc, self.grpc, shutdown.clone()));
        // Every socket's pings and handshake deadline: one task for the worker.
        let context = self.http.context.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move { context.timers.run(stop).await });

        let (unix_listener, unix_path) = match self.unix {
            Some((listener, path)) => (Some(listener), Some(path)),
            None => (None, None),
        };
        tracing::info!(id = %self.id, %addr, unix = ?unix_path, grpc = %grpc_addr, path = %self.config.worker.path, "worker listening");
        let connections = accept(&self.http, &self.id, self.listener, unix_listener, &shutdown).await;

        // The listeners are gone: not ready any more, then drain.
        if let Some(path) = &unix_path {
            let _ = std::fs::remove_file(path);
        }
        health_reporter.set_service_status("", tonic_health::ServingStatus::NotServing).await;
        let open = drain(&self.http, connections).await;
        tracing::info!(id = %self.id, sockets = open, "worker drained");
        let _ = grpc_task.await;
        tracing::info!(id = %self.id, "worker stopped");
        Ok(())
    }

    /// Registers with the master (when one is configured) and keeps the broker pool, and the
    /// balancers trusted for PROXY headers, in step with the membership it announces.
    fn link_brokers(
        &self,
        events: mpsc::Receiver<Event>,
        grpc_addr: SocketAddr,
        addr: SocketAddr,
        shutdown: &CancellationToken,
    ) -> Result<(), StartError> {
        let Some(url) = &self.config.worker.master else {
            tracing::warn!("no [worker] master configured: no brokers, so no pub/sub");
            return Ok(());
        };
        let unix = self.unix_path().map(|p| p.display().to_string()).unwrap_or_default();
        let advertise_ip = self.config.cluster.advertise_ip;
        let me = Member::this_process(Role::Worker, &self.id, grpc_addr, Some(addr), unix, advertise_ip, url);
        let link = MasterLink::new(url, &self.config.cluster.secret, me, vec![Role::Broker, Role::Balancer])?;
        let mut members = link.spawn(events, shutdown.clone());
        let pool = self.pool.clone();
        let sink: Arc<dyn DeliverySink> = self.hub.clone();
        let proxy_sources = self.http.proxy_sources.clone();
        tokio::spawn(async move {
            loop {
                let (brokers, balancers) = {
                    let members = members.borrow_and_update();
                    let brokers: Vec<(String, String)> =
                        members.with_role(Role::Broker).map(|m| (m.id.clone(), m.grpc.clone())).collect();
                    // A balancer connects from the address it advertises (its host).
                    let balancers: Vec<std::net::IpAddr> = members
                        .with_role(Role::Balancer)
                        .flat_map(|m| [m.grpc.as_str(), m.public.as_str()])
                        .filter_map(|addr| addr.parse::<SocketAddr>().ok().map(|a| a.ip()))
                        .collect();
                    (brokers, balancers)
                };
                proxy_sources.set_balancers(balancers);
                pool.apply(brokers, &sink);
                if members.changed().await.is_err() {
                    return;
                }
            }
        });
        Ok(())
    }
}

/// Runs an app's worker: the whole `main` of an app binary. Reads the command line and the
/// config file as the stock `sc-worker` does (so `[worker] command` in the cluster's config can
/// name this binary and the master runs it), builds the app with `build`, and serves until the
/// master (or a signal) stops it. The exit code says why it stopped.
pub fn run<C, F>(build: F) -> std::process::ExitCode
where
    C: DeserializeOwned,
    F: FnOnce(AppContext<C>) -> App,
{
    sc_common::cli::member_main(Role::Worker, |config, events, shutdown| async move {
        Worker::bind_app(config, build).await?.serve(events, shutdown).await
    })
}

/// The `[app]` table as the app's settings type; an empty table also reads as `()` (no
/// settings) or a type whose fields all have defaults.
fn app_settings<C: DeserializeOwned>(table: &toml::Table) -> Result<C, StartError> {
    let value = toml::Value::Table(table.clone());
    match value.try_into::<C>() {
        Ok(settings) => Ok(settings),
        Err(error) => {
            let unit = serde::de::value::UnitDeserializer::<serde::de::value::Error>::new();
            if table.is_empty()
                && let Ok(settings) = C::deserialize(unit)
            {
                return Ok(settings);
            }
            Err(StartError::Config(format!("[app]: {}", error.message())))
        }
    }
}

/// Closes every socket with the reconnect-now close, waits for the close frames to be written
/// (the caller bounds the time), then stops the broker links; returns how many sockets were open.
async fn drain(http: &http::Http, connections: TaskTracker) -> usize {
    let sockets = &http.context.tasks;
    let open = sockets.len();
    http.context.timers.shut_down();
    connections.close();
    connections.wait().await;
    sockets.close();
    sockets.wait().await;
    http.context.pool.close();
    open
}

/// Accepts connections on the TCP listener and the Unix listener (if any) until `shutdown`,
/// then drops both listeners; returns the connection tasks (HTTP and upgrades in progress).
async fn accept(
    http: &Arc<http::Http>,
    id: &str,
    tcp: TcpListener,
    unix: Option<UnixListener>,
    shutdown: &CancellationToken,
) -> TaskTracker {
    let connections = TaskTracker::new();
    loop {
        let accept_unix = async {
            match &unix {
                Some(listener) => net::accept(|| listener.accept(), shutdown).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            accepted = net::accept(|| tcp.accept(), shutdown) => match accepted {
                Some((stream, remote)) => {
                    connections.spawn(http::serve_connection(http.clone(), stream, remote));
                }
                None => break,
            },
            accepted = accept_unix => match accepted {
                Some((stream, _)) => {
                    let (id, tracker) = (id.to_owned(), connections.clone());
                    connections.spawn(http::serve_unix(http.clone(), stream, id, tracker, shutdown.clone()));
                }
                None => break,
            },
        }
    }
    connections
}

/// Binds `<dir>/<id>-<pid>.sock`: the pid keeps a rolling restart's replacement (same id) off
/// the old process's socket, so each removes only its own on exit.
fn bind_unix(dir: &Path, id: &str) -> Result<(UnixListener, PathBuf), StartError> {
    let path = dir.join(format!("{id}-{}.sock", std::process::id()));
    let bind_err = |source| StartError::Bind { addr: path.display().to_string(), source };
    std::fs::create_dir_all(dir).map_err(bind_err)?;
    // A leftover of an earlier process with the same pid.
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).map_err(bind_err)?;
    Ok((listener, path))
}
