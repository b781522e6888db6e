//! An in-process cluster: a standalone master, brokers and workers from the daemon libraries
//! (`sc_master::Master`, `sc_broker::Broker`, `sc_worker::Worker`), each bound on port 0, in
//! this test's process.
//!
//! ```no_run
//! # async fn example() {
//! use sc_tests::inproc::Cluster;
//!
//! let cluster = Cluster::builder().brokers(2).workers(2).tune(|c| c.worker.auth_key = "k".into()).start().await;
//! let ws_url = cluster.url(0);
//! // ... talk to the workers ...
//! cluster.shutdown().await;
//! # }
//! ```
//!
//! [`Cluster::shutdown`] stops the members in the supervisor's order (workers, brokers, master)
//! and awaits every `serve` with a deadline: a member whose shutdown hangs, or whose `serve`
//! fails, fails the test with its name. Dropping the cluster (a test that failed earlier) only
//! cancels.
//!
//! Each member runs on a runtime of its own, not the test's, which is to it what its process
//! is to a daemon: once its `serve` has returned, the runtime is shut down, ending whatever
//! tasks the member left behind as a process exit would. (Left running, a worker's broker
//! links, say, would keep every broker draining for its full drain period.)

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use sc_common::config::{Config, MasterMode};
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{eventually, http_get};

/// How long one member may take to finish `serve` once cancelled.
pub const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(10);

const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// A config change applied on top of the cluster's base config.
type Tune = Box<dyn FnOnce(&mut Config)>;

/// Binds one worker from its config: the stock worker, or an app's.
type BindWorker = Arc<
    dyn Fn(Config) -> Pin<Box<dyn Future<Output = Result<sc_worker::Worker, sc_worker::StartError>> + Send>>
        + Send
        + Sync,
>;

/// Builds a [`Cluster`]; see the module documentation.
#[must_use]
pub struct Builder {
    brokers: usize,
    workers: usize,
    tunes: Vec<Tune>,
    bind_worker: BindWorker,
}

/// A running in-process cluster; see the module documentation.
pub struct Cluster {
    config: Config,
    master_url: String,
    master_admin: SocketAddr,
    /// Cancels every member (each has a child token of its own).
    root: CancellationToken,
    master: Option<Served>,
    /// `broker-<i>` at index i; `None` once stopped.
    brokers: Vec<Option<Served>>,
    /// `worker-<i>` at index i (or one started with [`Cluster::add_named_worker`]).
    workers: Vec<Option<Served>>,
    /// How `workers` are bound (the builder's [`Builder::app`]).
    bind_worker: BindWorker,
    /// Members stopped one at a time and not yet awaited: awaited by [`Cluster::shutdown`].
    stopping: Vec<Served>,
}

/// One member's `serve`, running.
struct Served {
    name: String,
    addr: SocketAddr,
    token: CancellationToken,
    handle: Option<JoinHandle<Result<(), String>>>,
    /// The member's own runtime (see the module documentation); taken when it is shut down.
    runtime: Option<Runtime>,
}

impl Builder {
    /// The number of brokers (`broker-0`, ...); 1 by default.
    pub fn brokers(mut self, n: usize) -> Self {
        self.brokers = n;
        self
    }

    /// The number of workers (`worker-0`, ...); 1 by default.
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n;
        self
    }

    /// The workers run this app (`sc_worker::Worker::bind_app`) instead of the stock worker.
    pub fn app<C, F>(mut self, build: F) -> Self
    where
        C: serde::de::DeserializeOwned + Send + 'static,
        F: Fn(sc_worker::AppContext<C>) -> sc_worker::App + Clone + Send + Sync + 'static,
    {
        self.bind_worker =
            Arc::new(move |config| Box::pin(sc_worker::Worker::bind_app(config, build.clone())));
        self
    }

    /// Changes the config of every member; several calls apply in order.
    pub fn tune(mut self, tune: impl FnOnce(&mut Config) + 'static) -> Self {
        self.tunes.push(Box::new(tune));
        self
    }

    /// Starts the master, then the brokers, then the workers, and waits until every worker is
    /// ready (it linked a broker).
    pub async fn start(self) -> Cluster {
        let mut config = Config::default();
        config.cluster.secret = "s".into();
        config.master.mode = MasterMode::Standalone;
        config.master.admin_listen = SocketAddr::from(([127, 0, 0, 1], 0));
        // The admin API's token, as `admin_request` sends it.
        config.master.admin_token = crate::ADMIN_TOKEN.into();
        config.master.settle = Duration::ZERO;
        for tune in self.tunes {
            tune(&mut config);
        }
        let root = CancellationToken::new();
        let master_config = config.clone();
        let (master, admin) = Served::start("master", root.child_token(), |token| async move {
            let master = sc_master::Master::bind(master_config, None).await.map_err(|e| e.to_string())?;
            let (addr, admin) = (master.local_addr(), master.admin_addr());
            Ok((addr, admin, master.serve(token)))
        })
        .await;
        let mut cluster = Cluster {
            config,
            master_url: format!("http://{}", master.addr),
            master_admin: admin,
            root,
            master: Some(master),
            brokers: Vec::new(),
            workers: Vec::new(),
            bind_worker: self.bind_worker,
            stopping: Vec::new(),
        };
        for _ in 0..self.brokers {
            cluster.add_broker().await;
        }
        for _ in 0..self.workers {
            cluster.add_worker().await;
        }
        cluster
    }
}

impl Cluster {
    /// A builder for one broker and one worker.
    pub fn builder() -> Builder {
        Builder {
            brokers: 1,
            workers: 1,
            tunes: Vec::new(),
            bind_worker: Arc::new(|config| Box::pin(sc_worker::Worker::bind(config))),
        }
    }

    /// The config every member started from (after the builder's `tune`).
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The master's gRPC URL, as the members are told.
    pub fn master_url(&self) -> &str {
        &self.master_url
    }

    /// The master's admin API address.
    pub fn master_admin(&self) -> SocketAddr {
        self.master_admin
    }

    /// Worker `i`'s HTTP and WebSocket address.
    pub fn worker(&self, i: usize) -> SocketAddr {
        self.workers[i].as_ref().unwrap_or_else(|| panic!("worker {i} is stopped")).addr
    }

    /// The WebSocket URL of worker `i`.
    pub fn url(&self, i: usize) -> String {
        format!("ws://{}/socketcluster/", self.worker(i))
    }

    /// Broker `i`'s gRPC address.
    pub fn broker(&self, i: usize) -> SocketAddr {
        self.brokers[i].as_ref().unwrap_or_else(|| panic!("broker {i} is stopped")).addr
    }

    /// The config for a new worker `id` linked to this cluster's master.
    pub fn worker_config(&self, id: &str) -> Config {
        let mut config = self.config.clone();
        config.worker.id = Some(id.to_owned());
        config.worker.master = Some(self.master_url.clone());
        config
    }

    /// The config for a new broker `id` linked to this cluster's master.
    pub fn broker_config(&self, id: &str) -> Config {
        let mut config = self.config.clone();
        config.broker.id = Some(id.to_owned());
        config.broker.master = Some(self.master_url.clone());
        config
    }

    /// Starts one more broker, `broker-<index>`, and returns its index.
    pub async fn add_broker(&mut self) -> usize {
        let i = self.brokers.len();
        let served = self.start_broker(i).await;
        self.brokers.push(Some(served));
        i
    }

    /// Starts one more worker, `worker-<index>`, waits until it is ready (it linked a broker)
    /// and returns its index.
    pub async fn add_worker(&mut self) -> usize {
        let i = self.workers.len();
        let served = self.start_worker(i).await;
        self.workers.push(Some(served));
        i
    }

    /// Starts one more worker named `id`, without waiting for it to be ready; returns its index
    /// and its exchange (the server-side API an app's code uses).
    pub async fn add_named_worker(&mut self, id: &str) -> (usize, sc_worker::Exchange) {
        let config = self.worker_config(id);
        let (served, exchange) = Served::start(id, self.root.child_token(), |token| async move {
            let worker = sc_worker::Worker::bind(config).await.map_err(|e| e.to_string())?;
            let addr = worker.local_addr().map_err(|e| e.to_string())?;
            let exchange = worker.exchange();
            Ok((addr, exchange, worker.serve(mpsc::channel(1).1, token)))
        })
        .await;
        self.workers.push(Some(served));
        (self.workers.len() - 1, exchange)
    }

    /// Broker `i` leaves gracefully (out of the membership, then drains). Does not wait: the
    /// stop is awaited by [`Cluster::restart_broker`] or [`Cluster::shutdown`].
    pub fn stop_broker(&mut self, i: usize) {
        let served = self.brokers[i].take().unwrap_or_else(|| panic!("broker {i} is already stopped"));
        served.token.cancel();
        self.stopping.push(served);
    }

    /// Worker `i` stops gracefully (closes its sockets with the reconnect code). Does not wait,
    /// as [`Cluster::stop_broker`].
    pub fn stop_worker(&mut self, i: usize) {
        let served = self.workers[i].take().unwrap_or_else(|| panic!("worker {i} is already stopped"));
        served.token.cancel();
        self.stopping.push(served);
    }

    /// Starts broker `i` again under the same id (on a new port), after its stop finished
    /// (stopping it first if it runs).
    pub async fn restart_broker(&mut self, i: usize) {
        if self.brokers[i].is_some() {
            self.stop_broker(i);
        }
        self.await_stopping(&format!("broker-{i}")).await;
        self.brokers[i] = Some(self.start_broker(i).await);
    }

    /// Starts worker `i` again under the same id (on a new port) once its stop finished, and
    /// waits until it is ready.
    pub async fn restart_worker(&mut self, i: usize) {
        if self.workers[i].is_some() {
            self.stop_worker(i);
        }
        self.await_stopping(&format!("worker-{i}")).await;
        self.workers[i] = Some(self.start_worker(i).await);
    }

    /// Stops every member, workers first, then brokers, then the master (as the supervisor
    /// does), and awaits each `serve`: panics naming the member if one does not finish within
    /// [`SHUTDOWN_DEADLINE`] or fails.
    pub async fn shutdown(mut self) {
        let workers = self.workers.drain(..).flatten();
        let brokers = self.brokers.drain(..).flatten();
        // Those stopped one at a time first: they were told to stop before the others.
        let stopping = std::mem::take(&mut self.stopping);
        for group in
            [stopping, workers.collect(), brokers.collect(), self.master.take().into_iter().collect()]
        {
            for served in &group {
                served.token.cancel();
            }
            for served in group {
                served.finish().await;
            }
        }
    }

    async fn start_broker(&self, i: usize) -> Served {
        let name = format!("broker-{i}");
        let config = self.broker_config(&name);
        let (served, ()) = Served::start(&name, self.root.child_token(), |token| async move {
            let broker = sc_broker::Broker::bind(config).await.map_err(|e| e.to_string())?;
            Ok((broker.local_addr(), (), broker.serve(mpsc::channel(1).1, token)))
        })
        .await;
        served
    }

    async fn start_worker(&self, i: usize) -> Served {
        let name = format!("worker-{i}");
        let config = self.worker_config(&name);
        let bind = self.bind_worker.clone();
        let (served, ()) = Served::start(&name, self.root.child_token(), |token| async move {
            let worker = bind(config).await.map_err(|e| e.to_string())?;
            let addr = worker.local_addr().map_err(|e| e.to_string())?;
            Ok((addr, (), worker.serve(mpsc::channel(1).1, token)))
        })
        .await;
        let addr = served.addr;
        eventually(Duration::from_secs(5), &format!("{name} ready"), || async {
            matches!(http_get(LOCAL, addr, "/readyz").await, Ok((200, _))).then_some(())
        })
        .await
        .expect("worker ready");
        served
    }

    /// Awaits the stopped member `name`.
    async fn await_stopping(&mut self, name: &str) {
        if let Some(at) = self.stopping.iter().position(|s| s.name == name) {
            self.stopping.remove(at).finish().await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // A test that failed before `shutdown`: stop everything, without waiting (each
        // member's runtime is shut down as it is dropped).
        self.root.cancel();
    }
}

impl Served {
    /// Binds a member on a runtime of its own (`bind` returns its address, something for the
    /// caller and its `serve` future) and serves it there until `token` is cancelled.
    async fn start<T, B, Fut, S, E>(name: &str, token: CancellationToken, bind: B) -> (Self, T)
    where
        B: FnOnce(CancellationToken) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(SocketAddr, T, S), String>> + Send + 'static,
        S: Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display,
        T: Send + 'static,
    {
        // One worker thread: enough for a member under test, and a test starts several.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(name)
            .enable_all()
            .build()
            .expect("a runtime");
        let (bound, bound_rx) = oneshot::channel();
        let serving = token.clone();
        let handle = runtime.spawn(async move {
            let (addr, extra, serve) = bind(serving).await?;
            let _ = bound.send((addr, extra));
            serve.await.map_err(|e| e.to_string())
        });
        let mut served = Served {
            name: name.to_owned(),
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            token,
            handle: Some(handle),
            runtime: Some(runtime),
        };
        match bound_rx.await {
            Ok((addr, extra)) => {
                served.addr = addr;
                (served, extra)
            }
            Err(_) => {
                // `bind` failed: its error is the task's outcome.
                let handle = served.handle.take().expect("just spawned");
                finish(&format!("{name} (binding)"), handle).await;
                unreachable!("{name} stopped before it was bound")
            }
        }
    }

    /// Awaits `serve` (already cancelled) within the deadline; the member's runtime is shut
    /// down as `self` is dropped.
    async fn finish(mut self) {
        if let Some(handle) = self.handle.take() {
            finish(&self.name, handle).await;
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        // The member's "process exit"; `shutdown_background` because this runs inside the test's
        // runtime, where a blocking runtime drop is not allowed.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Awaits a `serve` join handle (its future already told to stop) within
/// [`SHUTDOWN_DEADLINE`]; panics naming `what` if it hangs, panicked or returned an error. For
/// tests that serve one daemon library by hand.
pub async fn finish<T, E: std::fmt::Display>(what: &str, handle: JoinHandle<Result<T, E>>) -> T {
    match tokio::time::timeout(SHUTDOWN_DEADLINE, handle).await {
        Err(_) => panic!("{what} did not stop within {SHUTDOWN_DEADLINE:?} of shutdown"),
        Ok(Err(join)) => panic!("{what} panicked or was aborted: {join}"),
        Ok(Ok(Err(e))) => panic!("{what} failed: {e}"),
        Ok(Ok(Ok(value))) => value,
    }
}
