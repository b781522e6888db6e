//! Presence from server code, with the daemons in this process (a broker, two workers): the
//! join and leave events a server-side subscriber gets for members on another worker and its
//! own (subscribe, unsubscribe, a dropped connection, a worker that stops), and the member list.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use sc_tests::inproc::Cluster;
use sc_tests::{Client, eventually, http_get};
use sc_worker::{Error, PresenceChange, PresenceEvent, PresenceEvents};
use serde_json::json;

const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const AUTH_KEY: &str = "presence-inproc-key";

async fn next(events: &mut PresenceEvents) -> PresenceEvent {
    tokio::time::timeout(Duration::from_secs(5), events.next()).await.expect("an event within 5 s").unwrap()
}

/// A client of worker `w`, authenticated as `user` if given; with its socket id.
async fn client(cell: &Cluster, w: usize, user: Option<&str>) -> (Client, String) {
    let mut client = Client::connect(LOCAL, cell.worker(w), &cell.url(w)).await.unwrap();
    if let Some(user) = user {
        let claims = json!({ "username": user, "exp": sc_common::now_ms() / 1000 + 3600 });
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(AUTH_KEY.as_bytes()).unwrap(),
        )
        .unwrap();
        let reply = client.invoke("#authenticate", json!(token)).await.unwrap();
        assert_eq!(reply["data"]["isAuthenticated"], true, "{reply}");
    }
    let id = client.handshake["id"].as_str().unwrap().to_owned();
    (client, id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_code_gets_join_and_leave_events_and_the_member_list() {
    let mut cell = Cluster::builder()
        .brokers(1)
        .workers(0)
        .tune(|c| {
            c.worker.auth_key = AUTH_KEY.into();
            c.worker.presence_channels = vec!["room/*".into()];
        })
        .start()
        .await;
    let (a, exchange) = cell.add_named_worker("worker-a").await;
    let (b, other) = cell.add_named_worker("worker-b").await;
    for w in [a, b] {
        let addr = cell.worker(w);
        eventually(Duration::from_secs(5), "worker ready", || async {
            matches!(http_get(LOCAL, addr, "/readyz").await, Ok((200, _))).then_some(())
        })
        .await
        .unwrap();
    }
    assert!(matches!(exchange.presence_events("news").await, Err(Error::NotPresence(_))));
    assert!(matches!(exchange.presence("news").await, Err(Error::NotPresence(_))));
    let mut events = exchange.presence_events("room/1").await.unwrap();
    assert_eq!(events.channel(), "#presence/room/1");

    // A member on the other worker, authenticated: a join with its user.
    let (mut alice, alice_id) = client(&cell, b, Some("alice")).await;
    alice.subscribe("room/1").await.unwrap();
    let event = next(&mut events).await;
    assert_eq!(event.event, PresenceChange::Join);
    assert_eq!((event.channel.as_str(), event.id.as_str()), ("room/1", alice_id.as_str()));
    assert_eq!(event.user.as_deref(), Some("alice"));
    // One on this worker, anonymous.
    let (mut anon, anon_id) = client(&cell, a, None).await;
    anon.subscribe("room/1").await.unwrap();
    let event = next(&mut events).await;
    assert_eq!((event.event, event.id.as_str(), event.user), (PresenceChange::Join, anon_id.as_str(), None));
    // Another channel's members are not this channel's.
    alice.subscribe("room/2").await.unwrap();

    let listed = other.presence("room/1").await.unwrap();
    assert_eq!(listed.count, 2);
    let ids: Vec<_> = listed.members.iter().map(|m| m.id.as_str()).collect();
    let mut expected = [alice_id.as_str(), anon_id.as_str()];
    expected.sort_unstable();
    assert_eq!(ids, expected);
    assert_eq!(exchange.presence("room/2").await.unwrap().count, 1);

    // An unsubscribe, then a connection that drops: a leave each.
    let reply = alice.invoke("#unsubscribe", json!("room/1")).await.unwrap();
    assert!(reply.get("error").is_none(), "{reply}");
    let event = next(&mut events).await;
    assert_eq!((event.event, event.id.as_str()), (PresenceChange::Leave, alice_id.as_str()));
    assert_eq!(event.user.as_deref(), Some("alice"));
    drop(anon);
    let event = next(&mut events).await;
    assert_eq!((event.event, event.id.as_str()), (PresenceChange::Leave, anon_id.as_str()));
    assert_eq!(exchange.presence("room/1").await.unwrap().count, 0);

    // The other worker stops: its sockets close, and their members leave.
    let (mut bob, bob_id) = client(&cell, b, Some("bob")).await;
    bob.subscribe("room/1").await.unwrap();
    assert_eq!(next(&mut events).await.id, bob_id);
    cell.stop_worker(b);
    let event = next(&mut events).await;
    assert_eq!((event.event, event.id.as_str()), (PresenceChange::Leave, bob_id.as_str()));
    eventually(Duration::from_secs(2), "alice gone with her worker", || async {
        (exchange.presence("room/2").await.unwrap().count == 0).then_some(())
    })
    .await
    .unwrap();
    drop((alice, bob, events));
    cell.shutdown().await;
}
