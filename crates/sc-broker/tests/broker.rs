//! The broker library on a real port, driven through its gRPC API as a worker would.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bytes::Bytes;
use sc_broker::Broker;
use sc_common::config::Config;
use sc_common::secret;
use sc_proto::broker::v1 as pb;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

type Client = pb::broker_client::BrokerClient<InterceptedService<Channel, secret::Attach>>;

const SECRET: &str = "test-secret";

/// A broker on a real port; stop it with [`Started::stop`].
struct Started {
    url: String,
    shutdown: CancellationToken,
    /// The broker's `serve`, its error as text.
    serving: Option<JoinHandle<Result<(), String>>>,
}

impl Started {
    /// Stops the broker and awaits its `serve`: a shutdown that hangs or fails fails the test.
    async fn stop(mut self) {
        self.shutdown.cancel();
        let serving = self.serving.take().expect("served once");
        match tokio::time::timeout(Duration::from_secs(10), serving).await {
            Err(_) => panic!("the broker did not stop within 10s of shutdown"),
            Ok(outcome) => outcome.expect("serve task").expect("serve"),
        }
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        // A test that failed before `stop`: stop the broker without waiting.
        self.shutdown.cancel();
    }
}

async fn start() -> Started {
    let mut config = Config::default();
    config.cluster.secret = SECRET.into();
    config.broker.listen = "127.0.0.1:0".parse().unwrap();
    let broker = Broker::bind(config).await.unwrap();
    let url = format!("http://{}", broker.local_addr());
    let shutdown = CancellationToken::new();
    let (_events_tx, events) = mpsc::channel(1);
    let serve = broker.serve(events, shutdown.clone());
    let serving = tokio::spawn(async move { serve.await.map_err(|e| e.to_string()) });
    Started { url, shutdown, serving: Some(serving) }
}

async fn client(url: &str, secret: &str) -> Client {
    let channel = Channel::from_shared(url.to_owned()).unwrap().connect().await.unwrap();
    pb::broker_client::BrokerClient::with_interceptor(channel, secret::Attach::new(secret))
}

/// An attached worker stream: a sender of commands and the stream of deliveries.
struct Stream {
    tx: mpsc::Sender<pb::WorkerBatch>,
    rx: tonic::Streaming<pb::DeliveryBatch>,
    pending: std::collections::VecDeque<pb::Delivery>,
}

impl Stream {
    async fn attach(client: &mut Client) -> Self {
        let (tx, rx) = mpsc::channel(16);
        let rx = client.attach(ReceiverStream::new(rx)).await.unwrap().into_inner();
        Self { tx, rx, pending: Default::default() }
    }

    async fn send(&self, commands: Vec<pb::command::Kind>) {
        let commands = commands.into_iter().map(|kind| pb::Command { kind: Some(kind) }).collect();
        self.tx.send(pb::WorkerBatch { commands }).await.unwrap();
    }

    async fn next(&mut self) -> pb::Delivery {
        loop {
            if let Some(d) = self.pending.pop_front() {
                return d;
            }
            let batch = tokio::time::timeout(Duration::from_secs(5), self.rx.message())
                .await
                .expect("a delivery within 5s")
                .unwrap()
                .expect("stream open");
            self.pending.extend(batch.deliveries);
        }
    }

    async fn nothing_within(&mut self, wait: Duration) {
        assert!(self.pending.is_empty());
        assert!(tokio::time::timeout(wait, self.rx.message()).await.is_err(), "unexpected delivery");
    }
}

fn sub(channel: &str) -> pb::command::Kind {
    pb::command::Kind::Subscribe(channel.into())
}

fn publish(channel: &str, data: &str) -> pb::command::Kind {
    pb::command::Kind::Publish(pb::Publish {
        channel: channel.into(),
        data: Bytes::copy_from_slice(data.as_bytes()),
    })
}

#[tokio::test]
async fn routes_publishes_to_subscribed_streams_in_order() {
    let broker = start().await;
    let mut client = client(&broker.url, SECRET).await;
    let mut a = Stream::attach(&mut client).await;
    let mut b = Stream::attach(&mut client).await;
    // Commands of one stream apply in order, so a publish after a subscribe on the same stream
    // comes back: that is how each stream knows its subscription is in place.
    a.send(vec![sub("news"), publish("news", "a0")]).await;
    assert_eq!(&a.next().await.data[..], b"a0");
    b.send(vec![sub("news"), sub("other"), publish("news", "b0")]).await;
    assert_eq!(&b.next().await.data[..], b"b0");
    assert_eq!(&a.next().await.data[..], b"b0");

    for i in 1..=1000 {
        b.send(vec![publish("news", &i.to_string())]).await;
    }
    for i in 1..=1000 {
        let d = a.next().await;
        assert_eq!(d.channel, "news");
        assert_eq!(d.data, i.to_string().into_bytes(), "in publish order");
        assert_eq!(b.next().await.data, i.to_string().into_bytes(), "the publisher's stream too");
    }
    a.send(vec![pb::command::Kind::Unsubscribe("news".into())]).await;
    b.send(vec![publish("other", "x")]).await;
    assert_eq!(b.next().await.channel, "other");
    b.send(vec![publish("news", "after")]).await;
    assert_eq!(&b.next().await.data[..], b"after");
    a.nothing_within(Duration::from_millis(200)).await;
    broker.stop().await;
}

#[tokio::test]
async fn a_closed_stream_drops_its_subscriptions() {
    let broker = start().await;
    let mut client = client(&broker.url, SECRET).await;
    let a = Stream::attach(&mut client).await;
    let mut b = Stream::attach(&mut client).await;
    a.send(vec![sub("news")]).await;
    drop(a);
    b.send(vec![sub("news"), publish("news", "1")]).await;
    assert_eq!(&b.next().await.data[..], b"1", "publishing still works for the others");
    broker.stop().await;
}

#[tokio::test]
async fn stats_count_channels_and_each_streams_subscriptions_down_to_zero() {
    let broker = start().await;
    let mut client = client(&broker.url, SECRET).await;
    let mut a = Stream::attach(&mut client).await;
    let mut b = Stream::attach(&mut client).await;
    a.send(vec![sub("one"), sub("two"), publish("two", "a")]).await;
    a.next().await;
    b.send(vec![sub("two"), publish("two", "b")]).await;
    b.next().await;
    let stats = client.stats(pb::StatsRequest {}).await.unwrap().into_inner();
    assert_eq!(stats.channels, 2);
    let subscriptions: Vec<u64> = stats.streams.iter().map(|s| s.subscriptions).collect();
    assert_eq!(subscriptions, [2, 1], "per stream, in attach order");

    b.send(vec![pb::command::Kind::Unsubscribe("two".into()), publish("two", "c")]).await;
    a.next().await;
    drop(a);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let stats = client.stats(pb::StatsRequest {}).await.unwrap().into_inner();
        if stats.channels == 0 && stats.streams.len() == 1 && stats.streams[0].subscriptions == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "not back to zero: {stats:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(b);
    broker.stop().await;
}

#[tokio::test]
async fn exchange_set_get_remove() {
    let broker = start().await;
    let mut client = client(&broker.url, SECRET).await;
    let value = Bytes::from_static(br#"{"a":[1,2]}"#);
    client.set(pb::SetRequest { key: "k".into(), value: value.clone() }).await.unwrap();
    let got = client.get(pb::GetRequest { key: "k".into() }).await.unwrap().into_inner();
    assert_eq!(got.value, Some(value.clone()));
    let removed = client.remove(pb::RemoveRequest { key: "k".into() }).await.unwrap().into_inner();
    assert_eq!(removed.value, Some(value));
    let got = client.get(pb::GetRequest { key: "k".into() }).await.unwrap().into_inner();
    assert_eq!(got.value, None);
    let err = client.get(pb::GetRequest { key: String::new() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    broker.stop().await;
}

#[tokio::test]
async fn calls_without_the_cluster_secret_are_refused() {
    let broker = start().await;
    let mut client = client(&broker.url, "wrong").await;
    let err = client.get(pb::GetRequest { key: "k".into() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    broker.stop().await;
}

fn join(channel: &str, id: &str, user: Option<&str>) -> pb::command::Kind {
    let member = pb::PresenceMember { id: id.into(), user: user.map(Into::into) };
    pb::command::Kind::PresenceJoin(pb::PresenceJoin { channel: channel.into(), member: Some(member) })
}

fn event(delivery: &pb::Delivery) -> serde_json::Value {
    serde_json::from_slice(&delivery.data).unwrap()
}

async fn members(client: &mut Client, channel: &str) -> Vec<(String, Option<String>)> {
    let request = pb::PresenceRequest { channel: channel.into() };
    let members = client.presence(request).await.unwrap().into_inner().members;
    members.into_iter().map(|m| (m.id, m.user)).collect()
}

#[tokio::test]
async fn presence_members_with_events_and_a_stream_that_ends_takes_its_members() {
    let broker = start().await;
    let mut client = client(&broker.url, SECRET).await;
    let mut watcher = Stream::attach(&mut client).await;
    watcher.send(vec![sub("#presence/room"), pb::command::Kind::Sync(1)]).await;
    // The sync's answer: the subscription is in place before the joins.
    let batch = watcher.rx.message().await.unwrap().unwrap();
    assert_eq!(batch.synced, [1]);
    let a = Stream::attach(&mut client).await;
    let b = Stream::attach(&mut client).await;
    a.send(vec![sub("room"), join("room", "s1", Some("alice")), join("room", "s2", None)]).await;
    b.send(vec![sub("room"), join("room", "s3", Some("bob"))]).await;
    let mut joined = Vec::new();
    for _ in 0..3 {
        let d = watcher.next().await;
        assert_eq!(d.channel, "#presence/room");
        let e = event(&d);
        assert_eq!((e["event"].as_str(), e["channel"].as_str()), (Some("join"), Some("room")));
        joined.push(e["id"].as_str().unwrap().to_owned());
    }
    joined.sort();
    assert_eq!(joined, ["s1", "s2", "s3"]);
    assert_eq!(
        members(&mut client, "room").await,
        [("s1".into(), Some("alice".into())), ("s2".into(), None), ("s3".into(), Some("bob".into()))]
    );

    // A client cannot forge events: a publish to #presence/ is dropped.
    b.send(vec![publish("#presence/room", r#"{"event":"leave","id":"s1"}"#)]).await;
    // An explicit leave.
    b.send(vec![pb::command::Kind::PresenceLeave(pb::PresenceLeave {
        channel: "room".into(),
        id: "s3".into(),
    })])
    .await;
    let e = event(&watcher.next().await);
    assert_eq!(
        (e["event"].as_str(), e["id"].as_str(), e["user"].as_str()),
        (Some("leave"), Some("s3"), Some("bob"))
    );

    // a's stream ends (its worker died): its members leave, each with an event.
    drop(a);
    let mut left = Vec::new();
    for _ in 0..2 {
        let e = event(&watcher.next().await);
        assert_eq!(e["event"], "leave");
        left.push(e["id"].as_str().unwrap().to_owned());
    }
    left.sort();
    assert_eq!(left, ["s1", "s2"]);
    assert!(members(&mut client, "room").await.is_empty());
    watcher.nothing_within(Duration::from_millis(200)).await;
    broker.stop().await;
}
