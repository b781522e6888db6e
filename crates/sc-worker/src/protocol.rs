//! The SocketCluster wire format: decoding client frames and encoding server frames.
//!
//! Pure functions, no I/O: [`decode`] turns one WebSocket text frame into what it means, with
//! the sc-formatter rules (text that does not start with `{` or `[` is raw, not an error); the
//! `encode_*` functions build the exact JSON the stock clients expect. A `#publish` frame is
//! built once per message by [`encode_publish`] and the same bytes go to every subscriber.
//!
//! JSON values the server does not interpret (event data, publish payloads, cids) stay as raw
//! JSON text ([`RawValue`]) from the client's frame to the broker and back out, never re-encoded.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// The v2 ping and pong: an empty text frame.
pub(crate) const PING_V2: &str = "";
/// The v1 ping.
pub(crate) const PING_V1: &str = "#1";
/// The v1 pong.
pub(crate) const PONG_V1: &str = "#2";

/// The SocketCluster protocol a socket speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Protocol v1: socketcluster-client v14 and the servers of its time.
    V1,
    /// Protocol v2: socketcluster-client v17 to v20.
    V2,
}

/// What one inbound text frame is.
#[derive(Debug)]
pub(crate) enum Inbound<'a> {
    /// A pong: v2 `""` or v1 `"#2"`.
    Pong(Protocol),
    /// One packet.
    Packet(Packet<'a>),
    /// A batch of packets, to handle in order. Elements that are not packets are skipped.
    Batch(Vec<Packet<'a>>),
    /// Anything else: surfaced to the app as a raw message, never answered.
    Raw,
}

/// An event, an RPC request or a response, as sent by a client.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Packet<'a> {
    #[serde(borrow, default)]
    pub(crate) event: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub(crate) data: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub(crate) cid: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub(crate) rid: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub(crate) error: Option<&'a RawValue>,
}

/// `#subscribe` data.
#[derive(Debug, Deserialize)]
pub(crate) struct SubscribeData<'a> {
    #[serde(borrow)]
    pub(crate) channel: Cow<'a, str>,
    #[serde(default, rename = "waitForAuth")]
    pub(crate) wait_for_auth: bool,
    #[serde(borrow, default)]
    pub(crate) data: Option<&'a RawValue>,
}

/// An error object as the clients rebuild it: `{name, message, …extra}` (sc-errors
/// `dehydrateError`).
#[derive(Debug, Clone, PartialEq)]
pub struct ErrorObject {
    /// The error's class name, e.g. `InvalidActionError`.
    pub name: String,
    /// What went wrong, for people.
    pub message: String,
    /// Further fields (`isBadToken`, `expiry`, `statusCode`, app-defined ones).
    pub extra: Map<String, Value>,
}

impl ErrorObject {
    /// An error with a name and a message.
    pub fn new(name: impl Into<String>, message: impl Into<String>) -> Self {
        Self { name: name.into(), message: message.into(), extra: Map::new() }
    }

    /// Adds a field.
    pub fn with(mut self, key: &str, value: Value) -> Self {
        self.extra.insert(key.to_owned(), value);
        self
    }

    /// Whether `isBadToken` is set.
    pub fn is_bad_token(&self) -> bool {
        self.extra.get("isBadToken").and_then(Value::as_bool).unwrap_or(false)
    }

    /// The JSON object text.
    pub(crate) fn to_json(&self) -> String {
        let mut object = Map::with_capacity(self.extra.len() + 2);
        object.insert("name".into(), Value::String(self.name.clone()));
        object.insert("message".into(), Value::String(self.message.clone()));
        for (key, value) in &self.extra {
            object.insert(key.clone(), value.clone());
        }
        Value::Object(object).to_string()
    }
}

/// `#publish` data.
#[derive(Debug, Deserialize)]
pub(crate) struct PublishData<'a> {
    #[serde(borrow)]
    pub(crate) channel: Cow<'a, str>,
    #[serde(borrow, default)]
    pub(crate) data: Option<&'a RawValue>,
}

/// `#handshake` data.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct HandshakeData<'a> {
    #[serde(borrow, default, rename = "authToken")]
    pub(crate) auth_token: Option<&'a RawValue>,
}

impl<'a> Packet<'a> {
    /// The call id when this packet is an RPC request. Strict (protocol v2, server and client
    /// v18.1 on): only a JSON number makes an RPC. Lenient (v1): any non-null cid does, and is
    /// echoed back with its own type.
    pub(crate) fn rpc_cid(&self, strict: bool) -> Option<&'a RawValue> {
        self.cid.filter(|cid| if strict { is_number(cid) } else { cid.get() != "null" })
    }
}

/// Decodes one inbound text frame.
pub(crate) fn decode(text: &str) -> Inbound<'_> {
    if text == PING_V2 {
        return Inbound::Pong(Protocol::V2);
    }
    if text == PONG_V1 {
        return Inbound::Pong(Protocol::V1);
    }
    let trimmed = text.trim_start();
    match trimmed.as_bytes().first() {
        Some(b'{') => match serde_json::from_str::<Packet<'_>>(trimmed) {
            Ok(packet) => Inbound::Packet(packet),
            Err(_) => Inbound::Raw,
        },
        Some(b'[') => match serde_json::from_str::<Vec<&RawValue>>(trimmed) {
            Ok(items) => Inbound::Batch(
                items.into_iter().filter_map(|item| serde_json::from_str(item.get()).ok()).collect(),
            ),
            Err(_) => Inbound::Raw,
        },
        _ => Inbound::Raw,
    }
}

/// `{"rid":<rid>,"data":{"id":…,"pingTimeout":…,"isAuthenticated":…[,"authError":{…}]}}`
pub(crate) fn encode_handshake(
    rid: &RawValue,
    socket_id: &str,
    ping_timeout_ms: u64,
    authenticated: bool,
    auth_error: Option<&ErrorObject>,
) -> String {
    let mut out = String::with_capacity(128);
    out.push_str("{\"rid\":");
    out.push_str(rid.get());
    out.push_str(",\"data\":{\"id\":");
    push_json_str(&mut out, socket_id);
    out.push_str(",\"pingTimeout\":");
    out.push_str(&ping_timeout_ms.to_string());
    out.push_str(",\"isAuthenticated\":");
    out.push_str(if authenticated { "true" } else { "false" });
    if let Some(error) = auth_error {
        out.push_str(",\"authError\":");
        out.push_str(&error.to_json());
    }
    out.push_str("}}");
    out
}

/// A handshake rejection both client lines read: `error.statusCode` (v20) and `data.code` (v14).
pub(crate) fn encode_handshake_rejection(rid: &RawValue, error: &ErrorObject, code: u16) -> String {
    let error = error.clone().with("statusCode", Value::from(code));
    format!("{{\"rid\":{},\"error\":{},\"data\":{{\"code\":{code}}}}}", rid.get(), error.to_json())
}

/// `{"rid":<rid>}`
pub(crate) fn encode_ack(rid: &RawValue) -> String {
    format!("{{\"rid\":{}}}", rid.get())
}

/// `{"rid":<rid>,"data":<data>}`; `data` is JSON text.
pub(crate) fn encode_response(rid: &RawValue, data: &str) -> String {
    format!("{{\"rid\":{},\"data\":{data}}}", rid.get())
}

/// `{"rid":<rid>,"error":{"name":…,"message":…,…}}`
pub(crate) fn encode_error(rid: &RawValue, error: &ErrorObject) -> String {
    format!("{{\"rid\":{},\"error\":{}}}", rid.get(), error.to_json())
}

/// The `#authenticate` success reply.
pub(crate) fn encode_auth_ok(rid: &RawValue) -> String {
    format!("{{\"rid\":{},\"data\":{{\"isAuthenticated\":true,\"authError\":null}}}}", rid.get())
}

/// The `#authenticate` failure reply. A bad token gets the union both client lines accept
/// (`error` for v20, `data` for v14); another failure only `data`.
pub(crate) fn encode_auth_failure(rid: &RawValue, error: &ErrorObject, bad_token: bool) -> String {
    let data = format!("{{\"isAuthenticated\":false,\"authError\":{}}}", error.to_json());
    if bad_token {
        format!("{{\"rid\":{},\"error\":{},\"data\":{data}}}", rid.get(), error.to_json())
    } else {
        format!("{{\"rid\":{},\"data\":{data}}}", rid.get())
    }
}

/// `{"event":<event>[,"data":<data>][,"cid":<cid>]}`; `data` is JSON text.
pub(crate) fn encode_event(event: &str, data: Option<&str>, cid: Option<u64>) -> String {
    let mut out = String::with_capacity(32 + event.len() + data.map_or(0, str::len));
    out.push_str("{\"event\":");
    push_json_str(&mut out, event);
    if let Some(data) = data {
        out.push_str(",\"data\":");
        out.push_str(data);
    }
    if let Some(cid) = cid {
        out.push_str(",\"cid\":");
        out.push_str(&cid.to_string());
    }
    out.push('}');
    out
}

/// `#setAuthToken`.
pub(crate) fn encode_set_auth_token(token: &str) -> String {
    let mut data = String::with_capacity(token.len() + 16);
    data.push_str("{\"token\":");
    push_json_str(&mut data, token);
    data.push('}');
    encode_event("#setAuthToken", Some(&data), None)
}

/// `#removeAuthToken`: with `"data":null` for v1 (and when the version is not known yet, which
/// v20 accepts too), without data for v2.
pub(crate) fn encode_remove_auth_token(v2: bool) -> String {
    encode_event("#removeAuthToken", (!v2).then_some("null"), None)
}

/// `#kickOut` for one channel; `message` is JSON text.
pub(crate) fn encode_kick_out(channel: &str, message: &str) -> String {
    let mut data = String::with_capacity(channel.len() + message.len() + 32);
    data.push_str("{\"channel\":");
    push_json_str(&mut data, channel);
    data.push_str(",\"message\":");
    data.push_str(message);
    data.push('}');
    encode_event("#kickOut", Some(&data), None)
}

/// The v1 `#disconnect` sent before closing: `{"code":…,"data":<reason>}`.
pub(crate) fn encode_disconnect(code: u16, reason: &str) -> String {
    let mut data = format!("{{\"code\":{code}");
    if !reason.is_empty() {
        data.push_str(",\"data\":");
        push_json_str(&mut data, reason);
    }
    data.push('}');
    encode_event("#disconnect", Some(&data), None)
}

/// `{"event":"#publish","data":{"channel":…,"data":…}}`; `data` is JSON text, empty for none.
pub(crate) fn encode_publish(channel: &str, data: &[u8]) -> String {
    let mut out = String::with_capacity(48 + channel.len() + data.len());
    out.push_str("{\"event\":\"#publish\",\"data\":{\"channel\":");
    push_json_str(&mut out, channel);
    if !data.is_empty() {
        out.push_str(",\"data\":");
        // The payload left a client of ours as validated JSON (a RawValue); non-UTF-8 bytes
        // cannot come from there, and are replaced rather than trusted.
        out.push_str(&String::from_utf8_lossy(data));
    }
    out.push_str("}}");
    out
}

/// Appends `s` as a JSON string literal.
fn push_json_str(out: &mut String, s: &str) {
    // Writing a &str to a String cannot fail.
    if let Ok(quoted) = serde_json::to_string(s) {
        out.push_str(&quoted);
    }
}

fn is_number(raw: &RawValue) -> bool {
    matches!(raw.get().as_bytes().first(), Some(b'-' | b'0'..=b'9'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_owned()).unwrap()
    }

    #[test]
    fn pings_and_pongs() {
        assert!(matches!(decode(""), Inbound::Pong(Protocol::V2)));
        assert!(matches!(decode("#2"), Inbound::Pong(Protocol::V1)));
        assert!(matches!(decode("#1"), Inbound::Raw));
    }

    #[test]
    fn handshake_packet() {
        let Inbound::Packet(p) = decode(r##"{"event":"#handshake","data":{"authToken":null},"cid":37}"##)
        else {
            panic!("not a packet")
        };
        assert_eq!(p.event.as_deref(), Some("#handshake"));
        assert_eq!(p.rpc_cid(true).map(RawValue::get), Some("37"));
        let data: HandshakeData = serde_json::from_str(p.data.unwrap().get()).unwrap();
        assert!(data.auth_token.is_none(), "a null token is no token");
        let data: HandshakeData = serde_json::from_str(r#"{"authToken":"a.b.c"}"#).unwrap();
        assert_eq!(data.auth_token.map(RawValue::get), Some("\"a.b.c\""));
    }

    #[test]
    fn string_cid_is_not_an_rpc() {
        let Inbound::Packet(p) = decode(r#"{"event":"x","cid":"1"}"#) else { panic!() };
        assert!(p.cid.is_some());
        assert!(p.rpc_cid(true).is_none(), "not an RPC in v2");
        assert_eq!(p.rpc_cid(false).map(RawValue::get), Some("\"1\""), "echoed as a string in v1");
    }

    #[test]
    fn batches_keep_order_and_skip_non_packets() {
        let Inbound::Batch(b) = decode(
            r##"[{"event":"#handshake","cid":1},5,{"event":"#subscribe","data":{"channel":"a"},"cid":2}]"##,
        ) else {
            panic!()
        };
        let events: Vec<_> = b.iter().map(|p| p.event.as_deref().unwrap()).collect();
        assert_eq!(events, ["#handshake", "#subscribe"]);
    }

    #[test]
    fn raw_frames() {
        for text in ["hello", "{not json", "[1,", "  x", "42"] {
            assert!(matches!(decode(text), Inbound::Raw), "{text}");
        }
        assert!(matches!(decode("  {\"event\":\"e\"}"), Inbound::Packet(_)));
    }

    #[test]
    fn publish_data_keeps_raw_payload() {
        let d: PublishData = serde_json::from_str(r#"{"channel":"news","data":{"a": [1, 2]}}"#).unwrap();
        assert_eq!(d.channel, "news");
        assert_eq!(d.data.unwrap().get(), r#"{"a": [1, 2]}"#);
        assert!(serde_json::from_str::<PublishData>(r#"{"channel":5}"#).is_err());
    }

    #[test]
    fn encoded_frames() {
        assert_eq!(
            encode_handshake(&raw("1"), "abc", 20000, false, None),
            r#"{"rid":1,"data":{"id":"abc","pingTimeout":20000,"isAuthenticated":false}}"#
        );
        let expired =
            ErrorObject::new("AuthTokenExpiredError", "jwt expired").with("isBadToken", Value::Bool(true));
        assert_eq!(
            encode_handshake(&raw("2"), "abc", 30000, false, Some(&expired)),
            r#"{"rid":2,"data":{"id":"abc","pingTimeout":30000,"isAuthenticated":false,"authError":{"isBadToken":true,"message":"jwt expired","name":"AuthTokenExpiredError"}}}"#
        );
        assert_eq!(encode_ack(&raw("7")), r#"{"rid":7}"#);
        assert_eq!(
            encode_error(&raw("3"), &ErrorObject::new("InvalidActionError", "say \"no\"")),
            r#"{"rid":3,"error":{"message":"say \"no\"","name":"InvalidActionError"}}"#
        );
        assert_eq!(
            encode_handshake_rejection(&raw("1"), &ErrorObject::new("E", "m"), 4008),
            r#"{"rid":1,"error":{"message":"m","name":"E","statusCode":4008},"data":{"code":4008}}"#
        );
        assert_eq!(
            encode_auth_ok(&raw("4")),
            r#"{"rid":4,"data":{"isAuthenticated":true,"authError":null}}"#
        );
        let bad = ErrorObject::new("AuthTokenInvalidError", "invalid token");
        assert_eq!(
            encode_auth_failure(&raw("5"), &bad, true),
            r#"{"rid":5,"error":{"message":"invalid token","name":"AuthTokenInvalidError"},"data":{"isAuthenticated":false,"authError":{"message":"invalid token","name":"AuthTokenInvalidError"}}}"#
        );
        assert_eq!(encode_remove_auth_token(true), r##"{"event":"#removeAuthToken"}"##);
        assert_eq!(encode_remove_auth_token(false), r##"{"event":"#removeAuthToken","data":null}"##);
        assert_eq!(encode_set_auth_token("a.b.c"), r##"{"event":"#setAuthToken","data":{"token":"a.b.c"}}"##);
        assert_eq!(
            encode_kick_out("news", "\"bye\""),
            r##"{"event":"#kickOut","data":{"channel":"news","message":"bye"}}"##
        );
        assert_eq!(
            encode_disconnect(4567, "why"),
            r##"{"event":"#disconnect","data":{"code":4567,"data":"why"}}"##
        );
        assert_eq!(
            encode_event("serverAsk", Some("{\"q\":1}"), Some(1)),
            r#"{"event":"serverAsk","data":{"q":1},"cid":1}"#
        );
        assert_eq!(
            encode_publish("n\"s", br#"{"x":1}"#),
            r##"{"event":"#publish","data":{"channel":"n\"s","data":{"x":1}}}"##
        );
        assert_eq!(encode_publish("n", b""), r##"{"event":"#publish","data":{"channel":"n"}}"##);
    }

    #[test]
    fn encoded_frames_are_valid_json() {
        let frame = encode_publish("ch\u{1}\n", b"[1,\"\\u0000\"]");
        let value: serde_json::Value = serde_json::from_str(&frame).unwrap();
        assert_eq!(value["data"]["channel"], "ch\u{1}\n");
    }
}
