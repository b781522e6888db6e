//! The Redis backend (`[broker] backend = "redis"`): the exchange data in Redis, and pub/sub
//! shared with every cluster on the same Redis.
//!
//! Each broker still owns its channel shard inside its cluster (workers place channels on
//! brokers as with the memory backend). On top of that, the [`Bridge`]:
//! - sends every publish this broker applies to Redis (`SPUBLISH` on a Redis Cluster of
//!   version 7 or later, `PUBLISH` otherwise), from one task and in the order applied, so the
//!   order per channel and publisher holds across clusters;
//! - subscribes in Redis to the channels its workers hold here (first subscriber in, last one
//!   out), and delivers what other clusters publish to its local subscribers. Each message
//!   carries the id of the cluster that sent it; a broker drops its own cluster's messages,
//!   which its subscribers got already.
//!
//! Redis down: local pub/sub goes on (a publish is delivered here before it goes to Redis);
//! publishes that cannot reach Redis are dropped and counted; the connection comes back by
//! itself (the connection manager, or the cluster client) with every subscription; the outage
//! and the count go to the log (and so the central log and the master's /status), and the
//! link's state ([`Health`]) to the metrics (`sc_broker_redis_up`..., see `crate::metrics`),
//! which the master's /status shows per broker.
//!
//! Exchange keys are `sc:x:<key>`: values set are JSON strings, lists built with `add` are
//! Redis lists of JSON elements; expiry is Redis expiry. Channels are `sc:c:<channel>`.
//! docs/redis.md has the details.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use redis::{FromRedisValue, PushKind, Value};
use sc_common::now_ms;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::exchange::ExchangeError;
use crate::router::Router;

/// The prefix of exchange keys in Redis.
const KEY_PREFIX: &str = "sc:x:";
/// The prefix of channels in Redis.
const CHANNEL_PREFIX: &str = "sc:c:";
/// Publishes waiting for Redis; past this, new ones are dropped (and counted) rather than
/// growing memory while Redis is slow or away.
const OUTBOX: usize = 65536;
/// Most publishes sent in one pipeline.
const PIPELINE: usize = 512;
/// How often the link checks Redis (and so notices an outage and its end).
const PING_EVERY: Duration = Duration::from_millis(250);

/// A connection to Redis: one instance (multiplexed, reconnecting) or a Redis Cluster.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// What the bridge needs to know about a Redis server.
#[derive(Debug, Clone, Copy)]
struct Flavour {
    /// SPUBLISH/SSUBSCRIBE (a Redis Cluster of version 7 or later).
    sharded: bool,
}

/// The state of a broker's link to Redis, for its metrics (and through them the master's
/// `/status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Health {
    /// Whether Redis answered the last check (four a second).
    pub(crate) up: bool,
    /// When the current outage began (ms since the Unix epoch); `None` while up.
    pub(crate) down_since_ms: Option<u64>,
    /// Outages that ended since the start.
    pub(crate) reconnects: u64,
    /// Publishes not sent to Redis (outbox full, or Redis unreachable) since the start.
    pub(crate) lost_publishes: u64,
    /// Messages from other clusters delivered here since the start.
    pub(crate) received: u64,
}

/// The exchange in Redis.
pub(crate) struct RedisKv {
    conn: Conn,
}

/// Pub/sub through Redis for this broker's channel shard.
pub(crate) struct Bridge {
    conn: Conn,
    flavour: Flavour,
    /// This cluster's id, the first part of every message this broker sends.
    origin: Arc<[u8]>,
    outbox: mpsc::Sender<(Arc<str>, Bytes)>,
    /// The channels held in Redis. std Mutex: set updates only.
    channels: Mutex<HashSet<Arc<str>>>,
    /// Subscription changes for the subscriber task, in order.
    changes: mpsc::UnboundedSender<(Arc<str>, bool)>,
    /// Whether Redis answered the last check.
    up: AtomicBool,
    /// Publishes not sent to Redis (outbox full, or Redis unreachable) since the start.
    lost: AtomicU64,
    /// Messages from other clusters delivered here since the start.
    received: AtomicU64,
    /// Outages that ended (Redis reachable again) since the start.
    reconnects: AtomicU64,
    /// When the current outage began (ms since the Unix epoch); 0 while Redis is up.
    down_since_ms: AtomicU64,
}

impl std::fmt::Debug for RedisKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisKv").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Bridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bridge").field("flavour", &self.flavour).finish_non_exhaustive()
    }
}

/// Connects to Redis at `urls` (one: a single instance; more: a Redis Cluster's nodes) and
/// starts the bridge for `router`: the exchange, and the bridge (already running until
/// `stopped`).
pub(crate) async fn connect(
    urls: &[String],
    cluster_id: String,
    router: Arc<Router>,
    stopped: CancellationToken,
) -> Result<(Arc<RedisKv>, Arc<Bridge>), redis::RedisError> {
    let (push_tx, push_rx) = mpsc::unbounded_channel::<redis::PushInfo>();
    let cluster = urls.len() > 1;
    let resp3 = |url: &String| {
        if url.contains("protocol=") {
            url.clone()
        } else if url.contains('?') {
            format!("{url}&protocol=resp3")
        } else {
            format!("{url}?protocol=resp3")
        }
    };
    // Two connections: commands (the exchange and publishes) and subscriptions, so that a
    // burst of publishes never delays the subscriptions' traffic and the other way round.
    let (commands, subscriptions) = if cluster {
        let urls: Vec<String> = urls.iter().map(resp3).collect();
        let client = redis::cluster::ClusterClientBuilder::new(urls.clone())
            .connection_timeout(Duration::from_secs(2))
            .response_timeout(Duration::from_secs(2))
            .build()?;
        let subscriber = redis::cluster::ClusterClientBuilder::new(urls)
            .connection_timeout(Duration::from_secs(2))
            .response_timeout(Duration::from_secs(2))
            .push_sender(push_tx)
            .build()?;
        (
            Conn::Cluster(client.get_async_connection().await?),
            Conn::Cluster(subscriber.get_async_connection().await?),
        )
    } else {
        let url = resp3(&urls[0]);
        let client = redis::Client::open(url.as_str())?;
        let config = || {
            redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(2)))
                .set_response_timeout(Some(Duration::from_secs(2)))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_secs(1))
        };
        let commands = client.get_connection_manager_with_config(config()).await?;
        let subscriber = client
            .get_connection_manager_with_config(
                config().set_push_sender(push_tx).set_automatic_resubscription(),
            )
            .await?;
        (Conn::Single(commands), Conn::Single(subscriber))
    };
    let version = server_version(&commands).await.unwrap_or(0);
    let flavour = Flavour { sharded: cluster && version >= 7 };
    tracing::info!(cluster, sharded = flavour.sharded, version, "redis connected");

    let (outbox, outgoing) = mpsc::channel(OUTBOX);
    let (changes, changes_rx) = mpsc::unbounded_channel();
    let bridge = Arc::new(Bridge {
        conn: subscriptions.clone(),
        flavour,
        origin: cluster_id.into_bytes().into(),
        outbox,
        channels: Mutex::default(),
        changes,
        up: AtomicBool::new(true),
        lost: AtomicU64::new(0),
        received: AtomicU64::new(0),
        reconnects: AtomicU64::new(0),
        down_since_ms: AtomicU64::new(0),
    });
    tokio::spawn(bridge.clone().send(commands.clone(), outgoing, stopped.clone()));
    tokio::spawn(bridge.clone().subscribe(changes_rx, stopped.clone()));
    tokio::spawn(bridge.clone().receive(push_rx, router, stopped.clone()));
    tokio::spawn(bridge.clone().watch(commands.clone(), stopped));
    Ok((Arc::new(RedisKv { conn: commands }), bridge))
}

impl Conn {
    async fn query<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        match self.clone() {
            Self::Single(mut c) => cmd.query_async(&mut c).await,
            Self::Cluster(mut c) => cmd.query_async(&mut c).await,
        }
    }

    async fn pipe<T: FromRedisValue>(&self, pipe: &redis::Pipeline) -> redis::RedisResult<T> {
        match self.clone() {
            Self::Single(mut c) => pipe.query_async(&mut c).await,
            Self::Cluster(mut c) => pipe.query_async(&mut c).await,
        }
    }

    async fn script<T: FromRedisValue>(
        &self,
        script: &redis::Script,
        key: &str,
        args: &[String],
    ) -> redis::RedisResult<T> {
        let mut invocation = script.key(key);
        for arg in args {
            invocation.arg(arg);
        }
        match self.clone() {
            Self::Single(mut c) => invocation.invoke_async(&mut c).await,
            Self::Cluster(mut c) => invocation.invoke_async(&mut c).await,
        }
    }

    async fn subscription(&self, channel: &str, on: bool, sharded: bool) -> redis::RedisResult<()> {
        match (self.clone(), on, sharded) {
            (Self::Single(mut c), true, _) => c.subscribe(channel).await,
            (Self::Single(mut c), false, _) => c.unsubscribe(channel).await,
            (Self::Cluster(mut c), true, true) => c.ssubscribe(channel).await,
            (Self::Cluster(mut c), false, true) => c.sunsubscribe(channel).await,
            (Self::Cluster(mut c), true, false) => c.subscribe(channel).await,
            (Self::Cluster(mut c), false, false) => c.unsubscribe(channel).await,
        }
    }
}

/// The major version of the Redis server (of one node of a cluster).
async fn server_version(conn: &Conn) -> Option<u32> {
    let info: String = conn.query(redis::cmd("INFO").arg("server")).await.ok()?;
    let line = info.lines().find_map(|l| l.strip_prefix("redis_version:"))?;
    line.split('.').next()?.trim().parse().ok()
}

impl Bridge {
    /// Sends a publish this broker applied on to Redis (never waits: a full outbox drops it).
    pub(crate) fn publish(&self, channel: Arc<str>, data: Bytes) {
        if self.outbox.try_send((channel, data)).is_err() {
            self.lost.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The first local subscriber of `channel` came (`true`) or its last one left.
    pub(crate) fn held(&self, channel: &Arc<str>, held: bool) {
        let changed = {
            let mut channels = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
            if held { channels.insert(channel.clone()) } else { channels.remove(channel) }
        };
        if changed {
            let _ = self.changes.send((channel.clone(), held));
        }
    }

    /// Publishes not sent to Redis since the start.
    pub(crate) fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }

    /// What the metrics show of the link: see [`Health`].
    pub(crate) fn health(&self) -> Health {
        let down_since_ms = self.down_since_ms.load(Ordering::Relaxed);
        Health {
            up: self.up.load(Ordering::Relaxed),
            down_since_ms: (down_since_ms > 0).then_some(down_since_ms),
            reconnects: self.reconnects.load(Ordering::Relaxed),
            lost_publishes: self.lost(),
            received: self.received.load(Ordering::Relaxed),
        }
    }

    /// The publisher: pipelines of publishes in the order applied.
    async fn send(
        self: Arc<Self>,
        conn: Conn,
        mut outgoing: mpsc::Receiver<(Arc<str>, Bytes)>,
        stopped: CancellationToken,
    ) {
        let command = if self.flavour.sharded { "SPUBLISH" } else { "PUBLISH" };
        let mut batch = Vec::with_capacity(PIPELINE);
        loop {
            batch.clear();
            let got = tokio::select! {
                _ = stopped.cancelled() => return,
                got = outgoing.recv_many(&mut batch, PIPELINE) => got,
            };
            if got == 0 {
                return;
            }
            let sent = match &conn {
                // One pipeline: in order on the one connection.
                Conn::Single(_) => {
                    let mut pipe = redis::pipe();
                    for (channel, data) in &batch {
                        pipe.cmd(command).arg(redis_channel(channel)).arg(self.envelope(data)).ignore();
                    }
                    conn.pipe::<()>(&pipe).await.map(|()| batch.len())
                }
                // Channels live on different nodes: one command at a time keeps the order.
                Conn::Cluster(_) => {
                    let mut sent = 0;
                    let mut outcome = Ok(());
                    for (channel, data) in &batch {
                        let cmd =
                            redis::cmd(command).arg(redis_channel(channel)).arg(self.envelope(data)).clone();
                        match conn.query::<i64>(&cmd).await {
                            Ok(_) => sent += 1,
                            Err(e) => {
                                outcome = Err(e);
                                break;
                            }
                        }
                    }
                    outcome.map(|()| sent)
                }
            };
            if let Err(e) = sent {
                // Redis is away: these are lost (local subscribers have them already).
                self.lost.fetch_add(batch.len() as u64, Ordering::Relaxed);
                tracing::debug!(error = %e, dropped = batch.len(), "publishes not sent to redis");
            }
        }
    }

    /// The subscriber: applies subscription changes in order.
    async fn subscribe(
        self: Arc<Self>,
        mut changes: mpsc::UnboundedReceiver<(Arc<str>, bool)>,
        stopped: CancellationToken,
    ) {
        loop {
            let change = tokio::select! {
                _ = stopped.cancelled() => return,
                change = changes.recv() => change,
            };
            let Some((channel, on)) = change else { return };
            if let Err(e) = self.conn.subscription(&redis_channel(&channel), on, self.flavour.sharded).await {
                tracing::debug!(%channel, error = %e, "redis subscription change failed");
            }
        }
    }

    /// Subscribes every held channel again (after an outage; the connection manager does it
    /// too when it reconnects, and doing it twice is harmless).
    async fn renew(&self) {
        let held: Vec<Arc<str>> =
            self.channels.lock().unwrap_or_else(PoisonError::into_inner).iter().cloned().collect();
        for channel in &held {
            let _ = self.conn.subscription(&redis_channel(channel), true, self.flavour.sharded).await;
        }
        tracing::debug!(channels = held.len(), "redis subscriptions renewed");
    }

    /// What Redis delivers: other clusters' messages to the local subscribers.
    async fn receive(
        self: Arc<Self>,
        mut pushes: mpsc::UnboundedReceiver<redis::PushInfo>,
        router: Arc<Router>,
        stopped: CancellationToken,
    ) {
        loop {
            let push = tokio::select! {
                _ = stopped.cancelled() => return,
                push = pushes.recv() => match push { Some(p) => p, None => return },
            };
            if !matches!(push.kind, PushKind::Message | PushKind::SMessage) {
                continue;
            }
            let [Value::BulkString(channel), Value::BulkString(payload), ..] = push.data.as_slice() else {
                continue;
            };
            let Some(channel) =
                std::str::from_utf8(channel).ok().and_then(|c| c.strip_prefix(CHANNEL_PREFIX))
            else {
                continue;
            };
            let Some((origin, data)) = open_envelope(payload) else { continue };
            if origin == &*self.origin {
                continue;
            }
            self.received.fetch_add(1, Ordering::Relaxed);
            // Redis cannot be slowed down: a worker stream that falls behind is cut by the
            // router as with local publishes.
            let _ = router.publish(channel, Bytes::copy_from_slice(data));
        }
    }

    /// Checks Redis four times a second; reports an outage and its end (with what was lost).
    async fn watch(self: Arc<Self>, conn: Conn, stopped: CancellationToken) {
        let mut tick = tokio::time::interval(PING_EVERY);
        let mut down_since: Option<(tokio::time::Instant, u64)> = None;
        loop {
            tokio::select! {
                _ = stopped.cancelled() => return,
                _ = tick.tick() => {}
            }
            let ping =
                tokio::time::timeout(Duration::from_secs(2), conn.query::<String>(&redis::cmd("PING"))).await;
            match (ping, down_since) {
                (Ok(Ok(_)), Some((since, lost_before))) => {
                    self.up.store(true, Ordering::Relaxed);
                    self.down_since_ms.store(0, Ordering::Relaxed);
                    self.reconnects.fetch_add(1, Ordering::Relaxed);
                    self.renew().await;
                    let lost = self.lost().saturating_sub(lost_before);
                    tracing::warn!(
                        down_ms = since.elapsed().as_millis() as u64,
                        lost_publishes = lost,
                        "redis reachable again, subscriptions renewed"
                    );
                    down_since = None;
                }
                (Ok(Ok(_)), None) => {}
                (outcome, None) => {
                    self.down_since_ms.store(now_ms(), Ordering::Relaxed);
                    self.up.store(false, Ordering::Relaxed);
                    let error = match outcome {
                        Ok(Err(e)) => e.to_string(),
                        _ => "no answer within 2s".to_owned(),
                    };
                    tracing::error!(%error, "redis unreachable: publishes stay within this cluster until it is back");
                    down_since = Some((tokio::time::Instant::now(), self.lost()));
                }
                (_, Some(_)) => {}
            }
        }
    }

    /// `origin length (1 byte) | origin | data`.
    fn envelope(&self, data: &Bytes) -> Vec<u8> {
        let origin = &self.origin[..self.origin.len().min(255)];
        let mut out = Vec::with_capacity(1 + origin.len() + data.len());
        out.push(origin.len() as u8);
        out.extend_from_slice(origin);
        out.extend_from_slice(data);
        out
    }
}

/// Splits a message from Redis into its origin and data.
fn open_envelope(payload: &[u8]) -> Option<(&[u8], &[u8])> {
    let (&len, rest) = payload.split_first()?;
    let len = usize::from(len);
    (rest.len() >= len).then(|| rest.split_at(len))
}

fn redis_channel(channel: &str) -> String {
    format!("{CHANNEL_PREFIX}{channel}")
}

fn redis_key(key: &str) -> String {
    format!("{KEY_PREFIX}{key}")
}

/// Reads a key whatever its type: `{0, string}`, `{1, {elements...}}` (nested: `unpack` of a
/// long list overflows Lua's stack), or nil; with `ARGV[1]` = "del", removes it too.
const READ: &str = r#"
local t = redis.call('TYPE', KEYS[1]).ok
local out
if t == 'string' then out = {0, redis.call('GET', KEYS[1])}
elseif t == 'list' then out = {1, redis.call('LRANGE', KEYS[1], 0, -1)}
elseif t == 'none' then return nil
else return redis.error_reply('NOTALIST') end
if ARGV[1] == 'del' then redis.call('DEL', KEYS[1]) end
return out
"#;

/// Appends to a list; a string value is not a list, except an empty array (what `removeRange`
/// leaves of a list, as Redis has no empty lists), which becomes one, keeping its expiry.
const ADD: &str = r#"
local t = redis.call('TYPE', KEYS[1]).ok
if t == 'string' and string.match(redis.call('GET', KEYS[1]), '^%s*%[%s*%]%s*$') then
  local ttl = redis.call('PTTL', KEYS[1])
  redis.call('DEL', KEYS[1])
  local n = redis.call('RPUSH', KEYS[1], ARGV[1])
  if ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
  return n
end
if t ~= 'list' and t ~= 'none' then return redis.error_reply('NOTALIST') end
return redis.call('RPUSH', KEYS[1], ARGV[1])
"#;

/// The slice [ARGV[1], ARGV[2]) of a list (ARGV[2] empty: to the end; negative: from the
/// end), and with ARGV[3] = "del", removes it, keeping the key's expiry. A list emptied so
/// becomes the string `[]` (Redis deletes empty lists; the memory backend keeps the key).
const RANGE: &str = r#"
local t = redis.call('TYPE', KEYS[1]).ok
if t == 'none' then return {} end
if t == 'string' and string.match(redis.call('GET', KEYS[1]), '^%s*%[%s*%]%s*$') then return {} end
if t ~= 'list' then return redis.error_reply('NOTALIST') end
local n = redis.call('LLEN', KEYS[1])
local function resolve(i)
  if i < 0 then i = n + i; if i < 0 then i = 0 end
  elseif i > n then i = n end
  return i
end
local from = resolve(tonumber(ARGV[1]))
local to = n
if ARGV[2] ~= '' then to = resolve(tonumber(ARGV[2])) end
if to <= from then return {} end
local items = redis.call('LRANGE', KEYS[1], from, to - 1)
if ARGV[3] == 'del' then
  local ttl = redis.call('PTTL', KEYS[1])
  local mark = '\0sc-removed\0'
  for i = from, to - 1 do redis.call('LSET', KEYS[1], i, mark) end
  redis.call('LREM', KEYS[1], 0, mark)
  if redis.call('EXISTS', KEYS[1]) == 0 then
    redis.call('SET', KEYS[1], '[]')
    if ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
  end
end
return items
"#;

/// `{0, string}` or `{1, length}` of a list; nil if absent.
const COUNT: &str = r#"
local t = redis.call('TYPE', KEYS[1]).ok
if t == 'string' then return {0, redis.call('GET', KEYS[1])}
elseif t == 'list' then return {1, redis.call('LLEN', KEYS[1])}
elseif t == 'none' then return nil
else return redis.error_reply('NOTALIST') end
"#;

/// How many of the keys exist: EXISTS then PERSIST, per key.
const PERSIST: &str = r#"
local e = redis.call('EXISTS', KEYS[1])
if e == 1 then redis.call('PERSIST', KEYS[1]) end
return e
"#;

impl RedisKv {
    /// Stores `value` (JSON text) under `key`, replacing it and any expiry.
    pub(crate) async fn set(&self, key: &str, value: &[u8]) -> Result<(), ExchangeError> {
        check_json(value)?;
        self.conn
            .query::<()>(redis::cmd("SET").arg(redis_key(key)).arg(value))
            .await
            .map_err(|e| backend(key, e))
    }

    /// The value under `key`, as JSON text.
    pub(crate) async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, ExchangeError> {
        self.read(key, false).await
    }

    /// Removes `key`, returning its value as JSON text.
    pub(crate) async fn remove(&self, key: &str) -> Result<Option<Vec<u8>>, ExchangeError> {
        self.read(key, true).await
    }

    /// Appends `value` to the list under `key` (creating it); returns its index.
    pub(crate) async fn add(&self, key: &str, value: &[u8]) -> Result<u64, ExchangeError> {
        check_json(value)?;
        let script = redis::Script::new(ADD);
        let len: u64 = self
            .conn
            .script(&script, &redis_key(key), &[String::from_utf8_lossy(value).into_owned()])
            .await
            .map_err(|e| backend(key, e))?;
        Ok(len.saturating_sub(1))
    }

    /// The slice `[start, end)` of the list under `key` as a JSON array text.
    pub(crate) async fn get_range(
        &self,
        key: &str,
        start: i64,
        end: Option<i64>,
    ) -> Result<Vec<u8>, ExchangeError> {
        self.range(key, start, end, false).await
    }

    /// Removes the slice `[start, end)` of the list under `key`; returns it as a JSON array.
    pub(crate) async fn remove_range(
        &self,
        key: &str,
        start: i64,
        end: Option<i64>,
    ) -> Result<Vec<u8>, ExchangeError> {
        self.range(key, start, end, true).await
    }

    /// Elements of the list, or keys of the object, under `key`; 1 for another value, 0 if absent.
    pub(crate) async fn count(&self, key: &str) -> Result<u64, ExchangeError> {
        let script = redis::Script::new(COUNT);
        let reply: Option<(u8, Value)> =
            self.conn.script(&script, &redis_key(key), &[]).await.map_err(|e| backend(key, e))?;
        Ok(match reply {
            None => 0,
            Some((1, Value::Int(n))) => n.max(0) as u64,
            Some((_, Value::BulkString(text))) => match serde_json::from_slice::<serde_json::Value>(&text) {
                Ok(serde_json::Value::Array(list)) => list.len() as u64,
                Ok(serde_json::Value::Object(map)) => map.len() as u64,
                _ => 1,
            },
            Some(_) => 1,
        })
    }

    /// Whether `key` exists.
    pub(crate) async fn has_key(&self, key: &str) -> Result<bool, ExchangeError> {
        self.conn.query(redis::cmd("EXISTS").arg(redis_key(key))).await.map_err(|e| backend(key, e))
    }

    /// Makes `keys` expire `seconds` from now; returns how many exist.
    pub(crate) async fn expire(&self, keys: &[String], seconds: u64) -> Result<u64, ExchangeError> {
        let mut changed = 0;
        // One command per key: in a Redis Cluster the keys live on different nodes.
        for key in keys {
            let set: u64 = self
                .conn
                .query(redis::cmd("PEXPIRE").arg(redis_key(key)).arg(seconds.saturating_mul(1000)))
                .await
                .map_err(|e| backend(key, e))?;
            changed += set;
        }
        Ok(changed)
    }

    /// Makes `keys` permanent; returns how many exist.
    pub(crate) async fn unexpire(&self, keys: &[String]) -> Result<u64, ExchangeError> {
        let script = redis::Script::new(PERSIST);
        let mut changed = 0;
        for key in keys {
            let exists: u64 =
                self.conn.script(&script, &redis_key(key), &[]).await.map_err(|e| backend(key, e))?;
            changed += exists;
        }
        Ok(changed)
    }

    /// When `key` expires (ms since the Unix epoch).
    pub(crate) async fn get_expiry(&self, key: &str) -> Result<Option<u64>, ExchangeError> {
        let ttl: i64 =
            self.conn.query(redis::cmd("PTTL").arg(redis_key(key))).await.map_err(|e| backend(key, e))?;
        Ok((ttl >= 0).then(|| now_ms().saturating_add(ttl as u64)))
    }

    async fn read(&self, key: &str, remove: bool) -> Result<Option<Vec<u8>>, ExchangeError> {
        let script = redis::Script::new(READ);
        let arg = if remove { "del" } else { "" };
        let reply: Option<Vec<Value>> = self
            .conn
            .script(&script, &redis_key(key), &[arg.to_owned()])
            .await
            .map_err(|e| backend(key, e))?;
        let Some(reply) = reply else { return Ok(None) };
        match reply.as_slice() {
            [Value::Int(0), Value::BulkString(text)] => Ok(Some(text.clone())),
            [Value::Int(1), Value::Array(items)] => Ok(Some(json_array(items))),
            [Value::Int(1)] => Ok(Some(b"[]".to_vec())),
            _ => Err(ExchangeError::Backend(format!("unexpected reply for {key:?}"))),
        }
    }

    async fn range(
        &self,
        key: &str,
        start: i64,
        end: Option<i64>,
        remove: bool,
    ) -> Result<Vec<u8>, ExchangeError> {
        let script = redis::Script::new(RANGE);
        let args = [
            start.to_string(),
            end.map(|e| e.to_string()).unwrap_or_default(),
            if remove { "del" } else { "" }.to_owned(),
        ];
        let items: Vec<Value> =
            self.conn.script(&script, &redis_key(key), &args).await.map_err(|e| backend(key, e))?;
        Ok(json_array(&items))
    }
}

/// Joins JSON elements (as Redis returned them) into one JSON array text.
fn json_array(items: &[Value]) -> Vec<u8> {
    let mut out = vec![b'['];
    for (i, item) in
        items.iter().filter_map(|v| if let Value::BulkString(b) = v { Some(b) } else { None }).enumerate()
    {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(item);
    }
    out.push(b']');
    out
}

fn check_json(value: &[u8]) -> Result<(), ExchangeError> {
    serde_json::from_slice::<Box<serde_json::value::RawValue>>(value)
        .map(|_| ())
        .map_err(|e| ExchangeError::BadJson(e.to_string()))
}

fn backend(key: &str, error: redis::RedisError) -> ExchangeError {
    if error.to_string().contains("NOTALIST") || error.to_string().contains("WRONGTYPE") {
        ExchangeError::NotAList(key.to_owned())
    } else {
        ExchangeError::Backend(error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip() {
        let payload = [&[3u8][..], b"abc", br#"{"x":1}"#].concat();
        assert_eq!(open_envelope(&payload), Some((&b"abc"[..], &br#"{"x":1}"#[..])));
        assert_eq!(open_envelope(&[9, b'a']), None);
        assert_eq!(open_envelope(&[]), None);
        assert_eq!(
            json_array(&[Value::BulkString(b"1".to_vec()), Value::BulkString(b"{}".to_vec())]),
            b"[1,{}]"
        );
        assert_eq!(json_array(&[]), b"[]");
    }
}
