//! The cluster's configuration: one TOML file, environment overrides, strict keys.
//!
//! Every daemon reads the same file (sections `[cluster] [master] [balancer] [worker] [broker]`)
//! and uses its own section plus `[cluster]`. Sources, later ones winning:
//! 1. built-in defaults (the values documented in deploy/sc.example.toml);
//! 2. the TOML file given with `--config`;
//! 3. environment variables `SC_<SECTION>__<KEY>`, e.g. `SC_WORKER__PING_INTERVAL=5s`;
//! 4. command-line flags of the daemon (`--id`, `--master`).
//!
//! An unknown key in any source is an error that names it. Durations are written like "8s" or
//! "250ms".

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::Error;

/// The prefix of environment overrides: `SC_WORKER__PING_INTERVAL` sets `[worker] ping_interval`.
pub const ENV_PREFIX: &str = "SC";

/// What `print-config` shows instead of a secret.
pub const REDACTED: &str = "<redacted>";

/// How the secrets in the example manifests (deploy/k8s) start; every daemon refuses a secret
/// that starts with it ([`is_placeholder`]).
pub const PLACEHOLDER_PREFIX: &str = "REPLACE-ME";

/// The whole configuration file.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `[cluster]`.
    pub cluster: ClusterConfig,
    /// `[master]`.
    pub master: MasterConfig,
    /// `[balancer]`.
    pub balancer: BalancerConfig,
    /// `[worker]`.
    pub worker: WorkerConfig,
    /// `[broker]`.
    pub broker: BrokerConfig,
    /// `[app]`: the app's own settings, free-form (the only table whose keys are not checked
    /// here); an app built with sc-worker's `App` gets them as its own typed struct.
    pub app: toml::Table,
}

/// `[cluster]`: what the whole cluster shares.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// Workers the master runs in supervise mode.
    pub workers: usize,
    /// Brokers the master runs in supervise mode.
    pub brokers: usize,
    /// Balancers the master runs in supervise mode; they all bind `[balancer] listen` with
    /// SO_REUSEPORT and the kernel spreads new connections over them.
    pub balancers: usize,
    /// The shared secret that authenticates internal gRPC calls. Empty: the master makes a
    /// random one per start and hands it to the daemons it spawns.
    pub secret: String,
    /// Log format of every daemon: "plain" or "json". The filter comes from RUST_LOG.
    pub log_format: LogFormat,
    /// The IP a daemon tells the others for listeners bound to 0.0.0.0 or ::. Unset: the local
    /// address it uses to reach the master.
    pub advertise_ip: Option<std::net::IpAddr>,
}

/// Log line format.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Plain,
    /// One JSON object per line.
    Json,
}

/// How the master gets its members.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum MasterMode {
    /// Spawn the balancer, workers and brokers as child processes and supervise them.
    #[default]
    Supervise,
    /// Spawn nothing; daemons started by something else register themselves.
    Standalone,
}

/// `[master]`: the control plane.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MasterConfig {
    /// Supervise (run the cluster) or standalone (only the control plane).
    pub mode: MasterMode,
    /// The master's gRPC listener (membership, central log, health).
    pub listen: SocketAddr,
    /// How often each member's grpc.health.v1 Check is called.
    #[serde(with = "humantime_serde")]
    pub health_interval: Duration,
    /// Consecutive failed checks after which a member leaves the membership (and, in supervise
    /// mode, is killed and respawned).
    pub health_failures: u32,
    /// How long shutdown may take before the remaining children are killed.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// The first respawn delay; it doubles on each crash in a row.
    #[serde(with = "humantime_serde")]
    pub respawn_backoff: Duration,
    /// The longest respawn delay.
    #[serde(with = "humantime_serde")]
    pub respawn_backoff_max: Duration,
    /// Where the daemon binaries are. Unset: the folder of the sc-master executable.
    pub bin_dir: Option<PathBuf>,
    /// The admin and status HTTP API (JSON): members, epoch, recent errors, rolling restart.
    /// Loopback by default: it can restart the cluster. Every request but `GET /healthz` needs
    /// `Authorization: Bearer <admin_token>`.
    pub admin_listen: SocketAddr,
    /// Standalone mode: how long a starting master holds back membership updates, so that the
    /// members of a running cluster register again before anyone is sent a partial membership.
    #[serde(with = "humantime_serde")]
    pub settle: Duration,
    /// The bearer token of the admin API. Empty: the master makes a random one at each start
    /// and prints it once on stdout (`admin token: ...`).
    pub admin_token: String,
}

/// `[balancer]`: the public face.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BalancerConfig {
    /// This member's id; in supervise mode the master sets it.
    pub id: Option<String>,
    /// The master to register with, e.g. "http://127.0.0.1:9000".
    pub master: Option<String>,
    /// The command the master runs for a balancer. Unset: sc-balancer from the bin folder.
    pub command: Option<PathBuf>,
    /// The public listener.
    pub listen: SocketAddr,
    /// The balancer's gRPC listener (health).
    pub grpc_listen: SocketAddr,
    /// How long to wait for a worker to accept before trying the next one.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// PEM certificate chain for TLS on the public listener (wss://, https://). Set with
    /// `tls_key`; unset: plain ws:// and http://. SIGHUP reloads both files.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 RSA or SEC1 EC) of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// A client that has not finished its TLS handshake within this long is disconnected.
    #[serde(with = "humantime_serde")]
    pub tls_handshake_timeout: Duration,
    /// Most client connections one balancer forwards at once; at the limit it stops accepting
    /// (new clients wait in the listen backlog) until one closes. 0: no limit.
    pub max_connections: usize,
    /// A client that sends no byte within this long after it connected (after its TLS
    /// handshake, with TLS) is disconnected, before any worker is bothered.
    #[serde(with = "humantime_serde")]
    pub first_byte_timeout: Duration,
    /// A connection that its worker has not upgraded to WebSocket (answered `101`) within this
    /// long after it was accepted is closed, whatever it sends: slowloris, idle HTTP keep-alive
    /// and long HTTP exchanges alike. Upgraded connections are exempt.
    #[serde(with = "humantime_serde")]
    pub upgrade_timeout: Duration,
    /// Connections from one client IP that are waiting for their first byte (or TLS handshake)
    /// and so not forwarded yet; past it, new ones from that address are closed at once. 0: no
    /// limit.
    pub max_pending_per_ip: u32,
    /// Plain connections for a worker on this host are handed to it (the socket itself, over
    /// its Unix socket in `[worker] unix_dir`) instead of proxied: their bytes then never
    /// cross the balancer. Workers on other hosts are always proxied. A handed-off connection
    /// still counts against `max_connections` until it closes.
    pub handoff: bool,
    /// With `handoff`, TLS 1.3 connections too: after the handshake the socket goes to the
    /// worker with the session's traffic keys (never the certificate's key), and the worker
    /// reads and writes the records. false: TLS connections are proxied (the balancer keeps
    /// their session).
    pub tls_handoff: bool,
    /// Runtime threads: 0 picks one thread per core, shared with the workers on this host
    /// (see README, "Threads").
    pub threads: usize,
    /// Every accepted connection must start with a PROXY protocol header (v1 or v2), sent by a
    /// load balancer in front; its source address then stands for the client (worker choice,
    /// per-IP limits, the address the worker sees). A connection without a valid header within
    /// `first_byte_timeout` is closed. Only for a listener that nothing but that load balancer
    /// can reach: anyone else could claim any address.
    pub accept_proxy_protocol: bool,
}

/// `[worker]`: HTTP, WebSocket and the SocketCluster protocol.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// This member's id; in supervise mode the master sets it.
    pub id: Option<String>,
    /// The master to register with.
    pub master: Option<String>,
    /// The command the master runs for a worker (an app's own worker binary). Unset: sc-worker
    /// from the bin folder.
    pub command: Option<PathBuf>,
    /// The HTTP and WebSocket listener that balancers forward to.
    pub listen: SocketAddr,
    /// A folder where the worker also listens on a Unix socket (`<id>-<pid>.sock`), which
    /// balancers on the same host use instead of TCP (no ephemeral ports used up). Unset: TCP
    /// only; in supervise mode the master sets a per-cluster folder and removes it on exit.
    pub unix_dir: Option<PathBuf>,
    /// Proxies whose `X-Forwarded-For` (and `X-Forwarded-Proto`) the worker believes, as IPs
    /// or CIDR blocks ("10.0.0.0/8", "::1"). The balancer needs no entry: it tells the worker
    /// the client address with a PROXY v2 header.
    pub trusted_proxies: Vec<String>,
    /// The worker's gRPC listener (health).
    pub grpc_listen: SocketAddr,
    /// The WebSocket endpoint; served with and without the trailing slash.
    pub path: String,
    /// How often the server pings each socket.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// A socket that sends no pong for this long is closed with 4001. Sent to clients in the
    /// handshake reply.
    #[serde(with = "humantime_serde")]
    pub ping_timeout: Duration,
    /// A socket that sends no #handshake within this long is closed with 4005.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Frames queued to one socket beyond which it is a slow consumer and is closed.
    pub outbound_queue: usize,
    /// The SocketCluster protocol: 1 (client v14), 2 (clients v17-v20) or "auto" (both, per
    /// socket: ping in both styles until the first pong says which).
    pub protocol_version: ProtocolVersion,
    /// HS256 (or HS384/HS512) secret for auth tokens. Empty: in supervise mode the master makes
    /// one per cluster start and hands it to every worker; a worker started alone makes its own.
    pub auth_key: String,
    /// JWT algorithm: HS256, HS384, HS512, RS256, RS384, RS512, ES256 or ES384. Only this one is
    /// accepted when verifying (`alg: none` never is).
    pub auth_algorithm: String,
    /// PEM private key file for RS*/ES* signing.
    pub auth_private_key: Option<PathBuf>,
    /// PEM public key file for RS*/ES* verification.
    pub auth_public_key: Option<PathBuf>,
    /// Lifetime of tokens the server signs, unless the payload has its own `exp`.
    #[serde(with = "humantime_serde")]
    pub auth_default_expiry: Duration,
    /// Allowed browser origins, each "host:port", "host:*", "*:port" or "*:*" (everything).
    pub origins: Vec<String>,
    /// Largest WebSocket message accepted; a larger one closes the socket with 1009.
    #[serde(with = "crate::size")]
    pub max_payload: u64,
    /// Most channels one socket may subscribe to.
    pub socket_channel_limit: usize,
    /// Whether clients may publish (`#publish`); if not they get an InvalidActionError.
    pub allow_client_publish: bool,
    /// How long a server-to-client invoke waits for the client's answer.
    #[serde(with = "humantime_serde")]
    pub ack_timeout: Duration,
    /// A folder served over HTTP (GET, HEAD) at the worker's root; unset: none.
    pub static_dir: Option<PathBuf>,
    /// The bearer key of the HTTP API for backends (`/api/publish`, `/api/exchange/<key>`).
    /// Empty: the API is off.
    pub api_key: String,
    /// Bytes written to one socket and not yet taken by the kernel beyond which the client is a
    /// slow consumer and is closed with 4100 (a client that stopped reading). Never less than
    /// `max_payload` in effect.
    #[serde(with = "crate::size")]
    pub max_outbound_bytes: u64,
    /// Longest channel name a client may subscribe or publish to (bytes of UTF-8).
    #[serde(with = "crate::size")]
    pub max_channel_name: u64,
    /// A connection must send a complete HTTP request head within this long, from its start
    /// and between requests on a keep-alive connection (so slow and idle ones are closed).
    #[serde(with = "humantime_serde")]
    pub request_header_timeout: Duration,
    /// Connections from one client IP that have not completed their SocketCluster handshake;
    /// past it, new ones from that address are closed at once. 0: no limit.
    pub max_pending_per_ip: u32,
    /// The channels whose subscribers are tracked cluster-wide (presence: counts, members,
    /// join and leave events on `#presence/<channel>`). Each is a channel name, a prefix ending
    /// in `*` ("chat/*") or "*" (every channel). Empty: presence is off.
    pub presence_channels: Vec<String>,
    /// The field of a socket's auth token payload shown as a presence member's `user`.
    pub presence_user_field: String,
    /// Runtime threads: 0 picks the cores shared out among the workers on this host (see
    /// README, "Threads"); 1 runs a single-threaded runtime.
    pub threads: usize,
}

/// Which SocketCluster protocol version(s) a worker speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProtocolVersion {
    /// Both: each socket is locked to the version of its first pong.
    #[default]
    Auto,
    /// Protocol v1 (socketcluster-client up to v14).
    V1,
    /// Protocol v2 (socketcluster-client v15 to v20).
    V2,
}

/// `[broker]`: pub/sub and shared data.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    /// This member's id; in supervise mode the master sets it.
    pub id: Option<String>,
    /// The master to register with.
    pub master: Option<String>,
    /// The command the master runs for a broker. Unset: sc-broker from the bin folder.
    pub command: Option<PathBuf>,
    /// The broker's gRPC listener (pub/sub, exchange, health).
    pub listen: SocketAddr,
    /// Deliveries queued to one worker stream before publishers wait for it.
    pub worker_queue: usize,
    /// Where the exchange data lives and whether pub/sub reaches other clusters: `memory`
    /// (this cluster's brokers only) or `redis` (see docs/redis.md).
    pub backend: BrokerBackend,
    /// The Redis server(s) of the `redis` backend: one URL (`redis://host:6379`) for a single
    /// instance, or several (a list, or URLs separated by spaces) for the nodes of one Redis
    /// Cluster.
    #[serde(deserialize_with = "one_or_many")]
    pub redis_url: Vec<String>,
    /// The id that marks this cluster's messages in Redis, so that they are not delivered twice
    /// to its own subscribers. Unset: one made up per broker process (then a message can come
    /// back, once, to another broker of the same cluster that holds its channel during a move).
    pub cluster_id: Option<String>,
}

/// Where a broker keeps the exchange data, and how far its pub/sub reaches.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum BrokerBackend {
    /// In the brokers' memory; pub/sub within this cluster.
    #[default]
    Memory,
    /// In Redis; pub/sub shared with every cluster on the same Redis.
    Redis,
}

/// A string or a list of strings, as a list.
fn one_or_many<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(deserializer)? {
        OneOrMany::One(one) if one.is_empty() => Vec::new(),
        OneOrMany::One(one) => one.split_whitespace().map(str::to_owned).collect(),
        OneOrMany::Many(many) => many,
    })
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            workers: 2,
            brokers: 1,
            balancers: 1,
            secret: String::new(),
            log_format: LogFormat::Plain,
            advertise_ip: None,
        }
    }
}

impl Default for MasterConfig {
    fn default() -> Self {
        Self {
            mode: MasterMode::Supervise,
            listen: loopback(0),
            health_interval: Duration::from_secs(1),
            health_failures: 3,
            shutdown_grace: Duration::from_secs(10),
            respawn_backoff: Duration::from_millis(100),
            respawn_backoff_max: Duration::from_secs(30),
            bin_dir: None,
            admin_listen: loopback(8001),
            settle: Duration::from_secs(3),
            admin_token: String::new(),
        }
    }
}

impl Default for BalancerConfig {
    fn default() -> Self {
        Self {
            id: None,
            master: None,
            command: None,
            listen: SocketAddr::from(([0, 0, 0, 0], 8000)),
            grpc_listen: loopback(0),
            connect_timeout: Duration::from_secs(2),
            tls_cert: None,
            tls_key: None,
            tls_handshake_timeout: Duration::from_secs(10),
            max_connections: 0,
            first_byte_timeout: Duration::from_secs(10),
            upgrade_timeout: Duration::from_secs(30),
            max_pending_per_ip: 100,
            handoff: true,
            tls_handoff: true,
            threads: 0,
            accept_proxy_protocol: false,
        }
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            id: None,
            master: None,
            command: None,
            listen: loopback(0),
            unix_dir: None,
            trusted_proxies: Vec::new(),
            grpc_listen: loopback(0),
            path: "/socketcluster/".to_owned(),
            ping_interval: Duration::from_secs(8),
            ping_timeout: Duration::from_secs(20),
            handshake_timeout: Duration::from_secs(10),
            outbound_queue: 1024,
            protocol_version: ProtocolVersion::Auto,
            auth_key: String::new(),
            auth_algorithm: "HS256".to_owned(),
            auth_private_key: None,
            auth_public_key: None,
            auth_default_expiry: Duration::from_secs(86400),
            origins: vec!["*:*".to_owned()],
            max_payload: 1024 * 1024,
            socket_channel_limit: 1000,
            allow_client_publish: true,
            ack_timeout: Duration::from_secs(10),
            static_dir: None,
            api_key: String::new(),
            max_outbound_bytes: 1024 * 1024,
            max_channel_name: 256,
            request_header_timeout: Duration::from_secs(10),
            max_pending_per_ip: 100,
            presence_channels: Vec::new(),
            presence_user_field: "username".to_owned(),
            threads: 0,
        }
    }
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            id: None,
            master: None,
            command: None,
            listen: loopback(0),
            worker_queue: 65536,
            backend: BrokerBackend::Memory,
            redis_url: Vec::new(),
            cluster_id: None,
        }
    }
}

impl Serialize for ProtocolVersion {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            ProtocolVersion::Auto => serializer.serialize_str("auto"),
            ProtocolVersion::V1 => serializer.serialize_u64(1),
            ProtocolVersion::V2 => serializer.serialize_u64(2),
        }
    }
}

impl<'de> Deserialize<'de> for ProtocolVersion {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Number(1) => Ok(ProtocolVersion::V1),
            Raw::Number(2) => Ok(ProtocolVersion::V2),
            Raw::Text(t) if t == "auto" => Ok(ProtocolVersion::Auto),
            Raw::Text(t) if t == "1" => Ok(ProtocolVersion::V1),
            Raw::Text(t) if t == "2" => Ok(ProtocolVersion::V2),
            _ => Err(serde::de::Error::custom("protocol_version must be 1, 2 or \"auto\"")),
        }
    }
}

impl Config {
    /// Loads the configuration: defaults, then `file` (if any), then `SC_*` environment
    /// variables from the process environment.
    pub fn load(file: Option<&Path>) -> Result<Self, Error> {
        Self::load_with_env(file, std::env::vars())
    }

    /// As [`Config::load`], with the environment given explicitly (for tests).
    pub fn load_with_env(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, Error> {
        let mut builder = config::Config::builder();
        if let Some(file) = file {
            if !file.exists() {
                return Err(Error::Config(format!("{}: no such file", file.display())));
            }
            builder =
                builder.add_source(config::File::from(file).format(config::FileFormat::Toml).required(true));
        }
        // Only SC_<SECTION>__<KEY> names are overrides; other SC_* variables (SC_TEST_BIN_DIR,
        // say) belong to someone else and are left alone.
        let prefix = format!("{ENV_PREFIX}_");
        let env: config::Map<String, String> = env
            .into_iter()
            .filter(|(key, _)| key.strip_prefix(&prefix).is_some_and(|rest| rest.contains("__")))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("_")
                .separator("__")
                .try_parsing(true)
                .list_separator(" ")
                .with_list_parse_key("worker.origins")
                .with_list_parse_key("worker.trusted_proxies")
                .with_list_parse_key("worker.presence_channels")
                .source(Some(env)),
        );
        let built = builder.build().map_err(|e| Error::Config(e.to_string()))?;
        let config: Config = built.try_deserialize().map_err(|e| Error::Config(explain(e, file)))?;
        config.validate()?;
        Ok(config)
    }

    /// The largest gRPC message between a worker and a broker, on both ends: one publish of
    /// `[worker] max_payload` with a channel name of `[worker] max_channel_name` always fits,
    /// and batches are cut below it (never less than tonic's default of 4 MiB). Brokers read
    /// the `[worker]` section for it, so workers and brokers need the same values.
    pub fn grpc_message_limit(&self) -> usize {
        let one =
            self.worker.max_payload.saturating_add(self.worker.max_channel_name).saturating_add(64 * 1024);
        usize::try_from(one.max(4 * 1024 * 1024)).unwrap_or(usize::MAX)
    }

    /// Checks what serde cannot: values that parse but make no sense.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |key: &str, why: &str| Err(Error::Config(format!("{key}: {why}")));
        if self.cluster.workers == 0 {
            return bad("cluster.workers", "must be at least 1");
        }
        if self.cluster.brokers == 0 {
            return bad("cluster.brokers", "must be at least 1");
        }
        if self.cluster.balancers == 0 {
            return bad("cluster.balancers", "must be at least 1");
        }
        if self.balancer.tls_cert.is_some() != self.balancer.tls_key.is_some() {
            return bad("balancer.tls_cert", "set both balancer.tls_cert and balancer.tls_key, or neither");
        }
        if self.balancer.tls_handshake_timeout.is_zero() {
            return bad("balancer.tls_handshake_timeout", "must be more than 0");
        }
        if self.balancer.first_byte_timeout.is_zero() {
            return bad("balancer.first_byte_timeout", "must be more than 0");
        }
        if self.balancer.upgrade_timeout.is_zero() {
            return bad("balancer.upgrade_timeout", "must be more than 0");
        }
        for (key, value) in [
            ("cluster.secret", &self.cluster.secret),
            ("master.admin_token", &self.master.admin_token),
            ("worker.auth_key", &self.worker.auth_key),
            ("worker.api_key", &self.worker.api_key),
        ] {
            if is_placeholder(value) {
                return bad(
                    key,
                    "is the placeholder of the example manifests: generate one (openssl rand -hex 32)",
                );
            }
        }
        if !self.master.admin_token.bytes().all(|b| b.is_ascii_graphic()) {
            return bad(
                "master.admin_token",
                "must be visible ASCII without spaces (it goes in an HTTP header)",
            );
        }
        if self.master.health_interval.is_zero() {
            return bad("master.health_interval", "must be more than 0");
        }
        if self.master.health_failures == 0 {
            return bad("master.health_failures", "must be at least 1");
        }
        if !self.worker.path.starts_with('/') {
            return bad("worker.path", "must start with /");
        }
        for pattern in &self.worker.presence_channels {
            if pattern.is_empty() || pattern[..pattern.len() - 1].contains('*') {
                return bad(
                    "worker.presence_channels",
                    "each entry is a channel name, a prefix ending in * (\"chat/*\") or \"*\"",
                );
            }
            if pattern.starts_with('#') {
                return bad("worker.presence_channels", "channels starting with # are not presence channels");
            }
        }
        if self.worker.ping_interval.is_zero() {
            return bad("worker.ping_interval", "must be more than 0");
        }
        if self.worker.ping_timeout <= self.worker.ping_interval {
            return bad("worker.ping_timeout", "must be longer than worker.ping_interval");
        }
        if self.worker.max_channel_name == 0 {
            return bad("worker.max_channel_name", "must be at least 1");
        }
        if self.worker.outbound_queue == 0 {
            return bad("worker.outbound_queue", "must be at least 1");
        }
        if self.worker.max_payload < 64 {
            return bad("worker.max_payload", "must be at least 64 bytes");
        }
        const ALGORITHMS: [&str; 8] =
            ["HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384"];
        if !ALGORITHMS.contains(&self.worker.auth_algorithm.as_str()) {
            return bad("worker.auth_algorithm", &format!("must be one of {}", ALGORITHMS.join(", ")));
        }
        if !self.worker.auth_algorithm.starts_with("HS")
            && (self.worker.auth_private_key.is_none() || self.worker.auth_public_key.is_none())
        {
            return bad(
                "worker.auth_algorithm",
                "RS*/ES* need worker.auth_private_key and worker.auth_public_key",
            );
        }
        if self.worker.ack_timeout.is_zero() {
            return bad("worker.ack_timeout", "must be more than 0");
        }
        if self.broker.worker_queue == 0 {
            return bad("broker.worker_queue", "must be at least 1");
        }
        if self.broker.backend == BrokerBackend::Redis && self.broker.redis_url.is_empty() {
            return bad("broker.redis_url", "the redis backend needs at least one URL");
        }
        if let Some(url) =
            self.broker.redis_url.iter().find(|u| !u.starts_with("redis://") && !u.starts_with("rediss://"))
        {
            return bad("broker.redis_url", &format!("{url:?} is not a redis:// or rediss:// URL"));
        }
        Ok(())
    }

    /// The checks of a worker's own that [`Config::validate`] leaves to the worker, before it
    /// binds: they depend on the host it runs on (`static_dir` must be a folder there) or on
    /// its final id `id` (set on the command line after loading, or a default), which goes out
    /// in an HTTP header.
    pub fn validate_worker(&self, id: &str) -> Result<(), Error> {
        let bad = |key: &str, why: String| Err(Error::Config(format!("{key}: {why}")));
        if let Some(dir) = &self.worker.static_dir {
            match std::fs::metadata(dir) {
                Ok(meta) if meta.is_dir() => {}
                Ok(_) => return bad("worker.static_dir", format!("{} is not a folder", dir.display())),
                Err(e) => return bad("worker.static_dir", format!("{}: {e}", dir.display())),
            }
        }
        // The rule of an HTTP header value: visible ASCII, spaces and tabs (RFC 9110), and
        // nothing else, so that any HTTP library accepts it.
        let header_safe = |b: u8| b == b'\t' || (0x20..0x7f).contains(&b);
        if id.is_empty() || !id.bytes().all(header_safe) {
            return bad("worker.id", format!("{id:?} is not a valid header value"));
        }
        Ok(())
    }

    /// Refuses secrets that protect nothing, before a daemon runs (not in [`Config::validate`]:
    /// `print-config` and library users are not concerned). `role` is the daemon (`None`: the
    /// master); `supervised`: a member started by a supervising master (`--supervisor-pid`).
    ///
    /// - A known placeholder (one containing `change-me` or `changeme`, as the examples once
    ///   shipped) in `[cluster] secret`, `[master] admin_token`, `[worker] auth_key` or
    ///   `[worker] api_key` is refused everywhere.
    /// - An empty `[cluster] secret` is refused where daemons form a cluster without a
    ///   supervising master: by a standalone master, and by a member that has a master to
    ///   register with (`[<role>] master`) and was not started by a supervising master. An empty
    ///   `[worker] auth_key` (HS* algorithms) is refused by such a worker: it would sign with a
    ///   key of its own, which no other worker accepts.
    /// - Supervise mode (development, one machine) keeps making them: the master generates the
    ///   cluster secret and one auth key per start and hands them to its children.
    pub fn check_secrets(&self, role: Option<crate::Role>, supervised: bool) -> Result<(), Error> {
        use crate::Role;
        let refuse = |key: &str, why: String| {
            Err(Error::Config(format!(
                "{key}: {why}; generate one with `openssl rand -hex 32` (or `sc-master gen-secret`) and set it in the config or {}",
                env_name(key)
            )))
        };
        let secrets = [
            ("cluster.secret", &self.cluster.secret),
            ("master.admin_token", &self.master.admin_token),
            ("worker.auth_key", &self.worker.auth_key),
            ("worker.api_key", &self.worker.api_key),
        ];
        for (key, value) in secrets {
            if is_placeholder(value) {
                return refuse(key, format!("{value:?} is a placeholder that anyone can read"));
            }
        }
        let clustered = match role {
            None => self.master.mode == MasterMode::Standalone,
            Some(role) => {
                let master = match role {
                    Role::Balancer => &self.balancer.master,
                    Role::Worker => &self.worker.master,
                    Role::Broker => &self.broker.master,
                };
                master.is_some() && !supervised
            }
        };
        if clustered && self.cluster.secret.is_empty() {
            return refuse("cluster.secret", "empty: internal calls would go unauthenticated".to_owned());
        }
        if clustered
            && role == Some(Role::Worker)
            && self.worker.auth_algorithm.starts_with("HS")
            && self.worker.auth_key.is_empty()
        {
            return refuse(
                "worker.auth_key",
                "empty: this worker would sign tokens with a key no other worker has".to_owned(),
            );
        }
        Ok(())
    }

    /// A copy with every secret (`[cluster] secret`, `[master] admin_token`, `[worker]
    /// auth_key`, `[worker] api_key`) replaced by [`REDACTED`], for `print-config`; an empty one stays empty, since it means
    /// "not set".
    pub fn redacted(&self) -> Self {
        let mut copy = self.clone();
        for secret in [
            &mut copy.cluster.secret,
            &mut copy.master.admin_token,
            &mut copy.worker.auth_key,
            &mut copy.worker.api_key,
        ] {
            if !secret.is_empty() {
                REDACTED.clone_into(secret);
            }
        }
        copy
    }

    /// The effective configuration as TOML, for `print-config` (after [`Config::redacted`]).
    pub fn to_toml(&self) -> String {
        // Serializing plain structs of strings, numbers and durations cannot fail.
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot print config: {e}\n"))
    }
}

/// The environment variable of `section.key`: `SC_SECTION__KEY`.
fn env_name(key: &str) -> String {
    format!("{ENV_PREFIX}_{}", key.replacen('.', "__", 1).to_ascii_uppercase())
}

/// Whether `secret` is a stand-in from an example or a manifest, which must never authenticate
/// anything: `change-me-auth-key` and the like (docker-compose, deploy/hosts), or what deploy/k8s
/// ships ([`PLACEHOLDER_PREFIX`]...). A config applied unedited fails at start, not later.
pub fn is_placeholder(secret: &str) -> bool {
    let lower = secret.to_ascii_lowercase();
    lower.contains("change-me")
        || lower.contains("changeme")
        || secret.get(..PLACEHOLDER_PREFIX.len()).is_some_and(|p| p.eq_ignore_ascii_case(PLACEHOLDER_PREFIX))
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Turns the config crate's error into one line that names the key and where it came from.
fn explain(error: config::ConfigError, file: Option<&Path>) -> String {
    let text = error.to_string();
    let source = match file {
        Some(file) => format!("{} or SC_* environment", file.display()),
        None => "SC_* environment".to_owned(),
    };
    if text.contains("unknown field") {
        format!("unknown key in {source}: {text}")
    } else {
        format!("{source}: {text}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    fn write(text: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        std::io::Write::write_all(&mut file, text.as_bytes()).unwrap();
        file
    }

    #[test]
    fn defaults_match_the_documented_values() {
        let config = Config::load_with_env(None, env(&[])).unwrap();
        assert_eq!(config.cluster.workers, 2);
        assert_eq!(config.cluster.brokers, 1);
        assert_eq!(config.balancer.listen, "0.0.0.0:8000".parse().unwrap());
        assert_eq!(config.worker.path, "/socketcluster/");
        assert_eq!(config.worker.ping_interval, Duration::from_secs(8));
        assert_eq!(config.worker.ping_timeout, Duration::from_secs(20));
        assert_eq!(config.master.health_interval, Duration::from_secs(1));
    }

    #[test]
    fn file_then_environment() {
        let file = write("[worker]\nping_interval = \"3s\"\n[cluster]\nworkers = 3\n");
        let config = Config::load_with_env(
            Some(file.path()),
            env(&[("SC_WORKER__PING_INTERVAL", "5s"), ("SC_CLUSTER__BROKERS", "4")]),
        )
        .unwrap();
        assert_eq!(config.worker.ping_interval, Duration::from_secs(5));
        assert_eq!(config.cluster.workers, 3);
        assert_eq!(config.cluster.brokers, 4);
    }

    #[test]
    fn unknown_key_in_file_is_named() {
        let file = write("[worker]\npign_interval = \"3s\"\n");
        let err = Config::load_with_env(Some(file.path()), env(&[])).unwrap_err().to_string();
        assert!(err.contains("pign_interval"), "{err}");
    }

    #[test]
    fn unknown_section_is_named() {
        let file = write("[wokrer]\nport = 1\n");
        let err = Config::load_with_env(Some(file.path()), env(&[])).unwrap_err().to_string();
        assert!(err.contains("wokrer"), "{err}");
    }

    #[test]
    fn unknown_key_in_environment_is_named() {
        let err =
            Config::load_with_env(None, env(&[("SC_WORKER__PING_INTERVALL", "5s")])).unwrap_err().to_string();
        assert!(err.contains("ping_intervall"), "{err}");
    }

    #[test]
    fn worker_keys_from_file_and_environment() {
        let file = write(
            "[worker]\nprotocol_version = 1\nmax_payload = \"64KiB\"\norigins = [\"example.com:443\"]\n",
        );
        let config = Config::load_with_env(Some(file.path()), env(&[])).unwrap();
        assert_eq!(config.worker.protocol_version, ProtocolVersion::V1);
        assert_eq!(config.worker.max_payload, 64 * 1024);
        assert_eq!(config.worker.origins, ["example.com:443"]);
        let config = Config::load_with_env(
            None,
            env(&[
                ("SC_WORKER__PROTOCOL_VERSION", "auto"),
                ("SC_WORKER__MAX_PAYLOAD", "2MiB"),
                ("SC_WORKER__ORIGINS", "a.com:443 b.com:*"),
            ]),
        )
        .unwrap();
        assert_eq!(config.worker.protocol_version, ProtocolVersion::Auto);
        assert_eq!(config.worker.max_payload, 2 * 1024 * 1024);
        assert_eq!(config.worker.origins, ["a.com:443", "b.com:*"]);
        let config = Config::load_with_env(None, env(&[("SC_WORKER__PROTOCOL_VERSION", "2")])).unwrap();
        assert_eq!(config.worker.protocol_version, ProtocolVersion::V2);
        let err = Config::load_with_env(None, env(&[("SC_WORKER__PROTOCOL_VERSION", "3")])).unwrap_err();
        assert!(err.to_string().contains("protocol_version"), "{err}");
        let err = Config::load_with_env(None, env(&[("SC_WORKER__AUTH_ALGORITHM", "none")])).unwrap_err();
        assert!(err.to_string().contains("auth_algorithm"), "{err}");
    }

    #[test]
    fn other_sc_variables_are_not_config() {
        let config = Config::load_with_env(None, env(&[("SC_TEST_BIN_DIR", "/x"), ("SC", "1")])).unwrap();
        assert_eq!(config, Config::default());
        let err = Config::load_with_env(None, env(&[("SC_WOKRER__PATH", "/x")])).unwrap_err().to_string();
        assert!(err.contains("wokrer"), "{err}");
    }

    #[test]
    fn bad_duration_is_an_error() {
        let err = Config::load_with_env(None, env(&[("SC_WORKER__PING_INTERVAL", "soon")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("soon") || err.contains("ping_interval"), "{err}");
    }

    #[test]
    fn missing_file_is_an_error() {
        let err =
            Config::load_with_env(Some(Path::new("/nonexistent/sc.toml")), env(&[])).unwrap_err().to_string();
        assert!(err.contains("no such file"), "{err}");
    }

    #[test]
    fn nonsense_values_are_rejected() {
        let err = Config::load_with_env(None, env(&[("SC_CLUSTER__WORKERS", "0")])).unwrap_err().to_string();
        assert!(err.contains("cluster.workers"), "{err}");
        let err = Config::load_with_env(
            None,
            env(&[("SC_WORKER__PING_TIMEOUT", "1s"), ("SC_WORKER__PING_INTERVAL", "2s")]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("ping_timeout"), "{err}");
    }

    #[test]
    fn printed_config_loads_back_unchanged() {
        let config = Config::load_with_env(None, env(&[("SC_CLUSTER__WORKERS", "5")])).unwrap();
        let file = write(&config.to_toml());
        let again = Config::load_with_env(Some(file.path()), env(&[])).unwrap();
        assert_eq!(config, again);
    }

    #[test]
    fn the_app_table_is_free_form_and_the_rest_stays_strict() {
        let file = write(
            "[app]\nwelcome = \"hi\"\nhistory = 50\n[app.limits]\nrooms = [\"a\", \"b\"]\n[worker]\npath = \"/sc/\"\n",
        );
        let config = Config::load_with_env(Some(file.path()), env(&[("SC_APP__HISTORY", "60")])).unwrap();
        assert_eq!(config.app["welcome"].as_str(), Some("hi"));
        assert_eq!(config.app["history"].as_integer(), Some(60), "SC_APP__* overrides like any key");
        assert_eq!(config.app["limits"]["rooms"].as_array().map(Vec::len), Some(2));
        let file = write("[worker]\npaht = \"/sc/\"\n");
        let err = Config::load_with_env(Some(file.path()), env(&[])).unwrap_err();
        assert!(err.to_string().contains("unknown"), "{err}");
    }

    #[test]
    fn printed_secrets_are_masked() {
        let config = Config::load_with_env(
            None,
            env(&[
                ("SC_CLUSTER__SECRET", "cluster-s3cret"),
                ("SC_WORKER__AUTH_KEY", "auth-s3cret"),
                ("SC_WORKER__API_KEY", "api-s3cret"),
                ("SC_MASTER__ADMIN_TOKEN", "admin-s3cret"),
            ]),
        )
        .unwrap();
        let printed = config.redacted().to_toml();
        assert!(!printed.contains("s3cret"), "{printed}");
        let printed: toml::Table = toml::from_str(&printed).unwrap();
        assert_eq!(printed["cluster"]["secret"].as_str(), Some(REDACTED));
        assert_eq!(printed["worker"]["auth_key"].as_str(), Some(REDACTED));
        assert_eq!(printed["worker"]["api_key"].as_str(), Some(REDACTED));
        assert_eq!(printed["master"]["admin_token"].as_str(), Some(REDACTED));
        // Not set stays visibly not set.
        let printed: toml::Table = toml::from_str(&Config::default().redacted().to_toml()).unwrap();
        assert_eq!(printed["cluster"]["secret"].as_str(), Some(""));
        assert_eq!(config.cluster.secret, "cluster-s3cret", "the config itself keeps its secrets");
    }

    #[test]
    fn placeholder_secrets_are_refused() {
        for key in
            ["SC_CLUSTER__SECRET", "SC_MASTER__ADMIN_TOKEN", "SC_WORKER__AUTH_KEY", "SC_WORKER__API_KEY"]
        {
            let err = Config::load_with_env(None, env(&[(key, "REPLACE-ME-cluster-secret")])).unwrap_err();
            let name = key.trim_start_matches("SC_").replace("__", ".").to_lowercase();
            assert!(err.to_string().contains(&name), "{key}: {err}");
            assert!(err.to_string().contains("placeholder"), "{key}: {err}");
        }
        let err = Config::load_with_env(None, env(&[("SC_CLUSTER__SECRET", "replace-me")])).unwrap_err();
        assert!(err.to_string().contains("cluster.secret"), "{err}");
        let config = Config::load_with_env(None, env(&[("SC_CLUSTER__SECRET", "not-REPLACE-ME")])).unwrap();
        assert_eq!(config.cluster.secret, "not-REPLACE-ME", "only the prefix counts");
    }

    #[test]
    fn worker_checks_need_a_static_folder_and_a_header_safe_id() {
        let mut config = Config::default();
        assert!(config.validate_worker("worker-0").is_ok());
        let folder = tempfile::tempdir().unwrap();
        config.worker.static_dir = Some(folder.path().to_owned());
        assert!(config.validate_worker("worker-0").is_ok());
        config.worker.static_dir = Some(folder.path().join("missing"));
        let err = config.validate_worker("worker-0").unwrap_err().to_string();
        assert!(err.contains("worker.static_dir"), "{err}");
        let file = write("");
        config.worker.static_dir = Some(file.path().to_owned());
        let err = config.validate_worker("worker-0").unwrap_err().to_string();
        assert!(err.contains("not a folder"), "{err}");
        config.worker.static_dir = None;
        for bad in ["", "line\nbreak", "nul\0", "del\x7f"] {
            let err = config.validate_worker(bad).unwrap_err().to_string();
            assert!(err.contains("worker.id"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn example_config_documents_every_key_and_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/sc.example.toml");
        let config = Config::load_with_env(Some(&path), env(&[])).unwrap();
        assert_eq!(config, Config::default(), "the example must show the defaults");
        // Every key of the effective config appears in the example, so none goes undocumented;
        // optional keys are filled in so that they are printed too.
        let text = std::fs::read_to_string(&path).unwrap();
        let mut full = config.clone();
        full.master.bin_dir = Some("/bin".into());
        full.cluster.advertise_ip = Some([10, 0, 0, 1].into());
        full.worker.auth_private_key = Some("x".into());
        full.worker.auth_public_key = Some("x".into());
        full.worker.static_dir = Some("x".into());
        full.worker.unix_dir = Some("x".into());
        full.balancer.tls_cert = Some("x".into());
        full.balancer.tls_key = Some("x".into());
        for (id, master, command) in [
            (&mut full.balancer.id, &mut full.balancer.master, &mut full.balancer.command),
            (&mut full.worker.id, &mut full.worker.master, &mut full.worker.command),
            (&mut full.broker.id, &mut full.broker.master, &mut full.broker.command),
        ] {
            *id = Some("x".into());
            *master = Some("x".into());
            *command = Some("x".into());
        }
        let printed: toml::Table = toml::from_str(&full.to_toml()).unwrap();
        let example: toml::Table = toml::from_str(&text).unwrap();
        for (section, keys) in &printed {
            let keys = keys.as_table().unwrap();
            for key in keys.keys() {
                let documented =
                    example.get(section).and_then(|s| s.as_table()).is_some_and(|s| s.contains_key(key))
                        || text.contains(&format!("# {key} ="));
                assert!(documented, "[{section}] {key} is not in deploy/sc.example.toml");
            }
        }
    }

    #[test]
    fn placeholder_and_empty_secrets_are_refused_outside_supervise_mode() {
        use crate::Role;
        let supervise = Config::default();
        assert!(supervise.check_secrets(None, false).is_ok(), "supervise mode makes its own");
        let mut placeholder = Config::default();
        placeholder.worker.auth_key = "change-me-auth-key".into();
        let error = placeholder.check_secrets(None, false).unwrap_err().to_string();
        assert!(error.contains("worker.auth_key") && error.contains("SC_WORKER__AUTH_KEY"), "{error}");
        placeholder.worker.auth_key = "k".into();
        placeholder.cluster.secret = "CHANGEME".into();
        assert!(placeholder.check_secrets(Some(Role::Broker), true).is_err(), "placeholders never pass");

        let mut standalone = Config::default();
        standalone.master.mode = MasterMode::Standalone;
        let error = standalone.check_secrets(None, false).unwrap_err().to_string();
        assert!(error.contains("cluster.secret") && error.contains("openssl rand"), "{error}");
        standalone.cluster.secret = "s".into();
        assert!(standalone.check_secrets(None, false).is_ok());

        let mut member = Config::default();
        member.worker.master = Some("http://127.0.0.1:9000".into());
        assert!(member.check_secrets(Some(Role::Worker), true).is_ok(), "its master hands them over");
        let error = member.check_secrets(Some(Role::Worker), false).unwrap_err().to_string();
        assert!(error.contains("cluster.secret"), "{error}");
        member.cluster.secret = "s".into();
        let error = member.check_secrets(Some(Role::Worker), false).unwrap_err().to_string();
        assert!(error.contains("worker.auth_key"), "{error}");
        member.worker.auth_key = "k".into();
        assert!(member.check_secrets(Some(Role::Worker), false).is_ok());
        let alone = Config::default();
        assert!(alone.check_secrets(Some(Role::Balancer), false).is_ok(), "no master: no cluster to protect");
    }

    #[test]
    fn presence_channels_are_a_list_of_names_and_prefixes() {
        let config = Config::load_with_env(None, env(&[])).unwrap();
        assert!(config.worker.presence_channels.is_empty(), "off by default");
        assert_eq!(config.worker.presence_user_field, "username");
        let config = Config::load_with_env(
            None,
            env(&[
                ("SC_WORKER__PRESENCE_CHANNELS", "chat/* lobby"),
                ("SC_WORKER__PRESENCE_USER_FIELD", "sub"),
            ]),
        )
        .unwrap();
        assert_eq!(config.worker.presence_channels, ["chat/*", "lobby"]);
        assert_eq!(config.worker.presence_user_field, "sub");
        for bad in ["a*b", "#presence/x"] {
            let err = Config::load_with_env(None, env(&[("SC_WORKER__PRESENCE_CHANNELS", bad)])).unwrap_err();
            assert!(err.to_string().contains("presence_channels"), "{err}");
        }
    }
}
