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

/// The v2 ping and pong: an empty text frame.
pub const PING_V2: &str = "";
/// The v1 ping.
pub const PING_V1: &str = "#1";
/// The v1 pong.
pub const PONG_V1: &str = "#2";

/// What one inbound text frame is.
#[derive(Debug)]
pub enum Inbound<'a> {
    /// A pong (v2 `""` or v1 `"#2"`).
    Pong,
    /// One packet.
    Packet(Packet<'a>),
    /// A batch of packets, to handle in order. Elements that are not packets are skipped.
    Batch(Vec<Packet<'a>>),
    /// Anything else: surfaced to the app as a raw message, never answered.
    Raw,
}

/// An event, an RPC request or a response, as sent by a client.
#[derive(Debug, Default, Deserialize)]
pub struct Packet<'a> {
    #[serde(borrow, default)]
    pub event: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub data: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub cid: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub rid: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub error: Option<&'a RawValue>,
}

/// `#subscribe` data.
#[derive(Debug, Deserialize)]
pub struct SubscribeData<'a> {
    #[serde(borrow)]
    pub channel: Cow<'a, str>,
}

/// `#publish` data.
#[derive(Debug, Deserialize)]
pub struct PublishData<'a> {
    #[serde(borrow)]
    pub channel: Cow<'a, str>,
    #[serde(borrow, default)]
    pub data: Option<&'a RawValue>,
}

/// `#handshake` data.
#[derive(Debug, Default, Deserialize)]
pub struct HandshakeData<'a> {
    #[serde(borrow, default, rename = "authToken")]
    pub auth_token: Option<&'a RawValue>,
}

impl<'a> Packet<'a> {
    /// The call id when this packet is an RPC request: present and a JSON number (the rule of
    /// server and client v18.1 on; other cids do not make an RPC).
    pub fn rpc_cid(&self) -> Option<&'a RawValue> {
        self.cid.filter(|cid| is_number(cid))
    }
}

/// Decodes one inbound text frame.
pub fn decode(text: &str) -> Inbound<'_> {
    if text == PING_V2 || text == PONG_V1 {
        return Inbound::Pong;
    }
    let trimmed = text.trim_start();
    match trimmed.as_bytes().first() {
        Some(b'{') => match serde_json::from_str::<Packet<'_>>(trimmed) {
            Ok(packet) => Inbound::Packet(packet),
            Err(_) => Inbound::Raw,
        },
        Some(b'[') => match serde_json::from_str::<Vec<&RawValue>>(trimmed) {
            Ok(items) => Inbound::Batch(
                items
                    .into_iter()
                    .filter_map(|item| serde_json::from_str(item.get()).ok())
                    .collect(),
            ),
            Err(_) => Inbound::Raw,
        },
        _ => Inbound::Raw,
    }
}

/// `{"rid":<rid>,"data":{"id":…,"pingTimeout":…,"isAuthenticated":false}}`
pub fn encode_handshake(rid: &RawValue, socket_id: &str, ping_timeout_ms: u64) -> String {
    let mut out = String::with_capacity(96);
    out.push_str("{\"rid\":");
    out.push_str(rid.get());
    out.push_str(",\"data\":{\"id\":");
    push_json_str(&mut out, socket_id);
    out.push_str(",\"pingTimeout\":");
    out.push_str(&ping_timeout_ms.to_string());
    out.push_str(",\"isAuthenticated\":false}}");
    out
}

/// `{"rid":<rid>}`
pub fn encode_ack(rid: &RawValue) -> String {
    format!("{{\"rid\":{}}}", rid.get())
}

/// `{"rid":<rid>,"error":{"name":…,"message":…}}`
pub fn encode_error(rid: &RawValue, name: &str, message: &str) -> String {
    let mut out = String::with_capacity(48 + name.len() + message.len());
    out.push_str("{\"rid\":");
    out.push_str(rid.get());
    out.push_str(",\"error\":{\"name\":");
    push_json_str(&mut out, name);
    out.push_str(",\"message\":");
    push_json_str(&mut out, message);
    out.push_str("}}");
    out
}

/// `{"event":"#publish","data":{"channel":…,"data":…}}`; `data` is JSON text, empty for none.
pub fn encode_publish(channel: &str, data: &[u8]) -> String {
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
        assert!(matches!(decode(""), Inbound::Pong));
        assert!(matches!(decode("#2"), Inbound::Pong));
        assert!(matches!(decode("#1"), Inbound::Raw));
    }

    #[test]
    fn handshake_packet() {
        let Inbound::Packet(p) =
            decode(r##"{"event":"#handshake","data":{"authToken":null},"cid":37}"##)
        else {
            panic!("not a packet")
        };
        assert_eq!(p.event.as_deref(), Some("#handshake"));
        assert_eq!(p.rpc_cid().map(RawValue::get), Some("37"));
        let data: HandshakeData = serde_json::from_str(p.data.unwrap().get()).unwrap();
        assert!(data.auth_token.is_none(), "a null token is no token");
        let data: HandshakeData = serde_json::from_str(r#"{"authToken":"a.b.c"}"#).unwrap();
        assert_eq!(data.auth_token.map(RawValue::get), Some("\"a.b.c\""));
    }

    #[test]
    fn string_cid_is_not_an_rpc() {
        let Inbound::Packet(p) = decode(r#"{"event":"x","cid":"1"}"#) else {
            panic!()
        };
        assert!(p.cid.is_some());
        assert!(p.rpc_cid().is_none());
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
        let d: PublishData =
            serde_json::from_str(r#"{"channel":"news","data":{"a": [1, 2]}}"#).unwrap();
        assert_eq!(d.channel, "news");
        assert_eq!(d.data.unwrap().get(), r#"{"a": [1, 2]}"#);
        assert!(serde_json::from_str::<PublishData>(r#"{"channel":5}"#).is_err());
    }

    #[test]
    fn encoded_frames() {
        assert_eq!(
            encode_handshake(&raw("1"), "abc", 20000),
            r#"{"rid":1,"data":{"id":"abc","pingTimeout":20000,"isAuthenticated":false}}"#
        );
        assert_eq!(encode_ack(&raw("7")), r#"{"rid":7}"#);
        assert_eq!(
            encode_error(&raw("3"), "InvalidActionError", "say \"no\""),
            r#"{"rid":3,"error":{"name":"InvalidActionError","message":"say \"no\""}}"#
        );
        assert_eq!(
            encode_publish("n\"s", br#"{"x":1}"#),
            r##"{"event":"#publish","data":{"channel":"n\"s","data":{"x":1}}}"##
        );
        assert_eq!(
            encode_publish("n", b""),
            r##"{"event":"#publish","data":{"channel":"n"}}"##
        );
    }

    #[test]
    fn encoded_frames_are_valid_json() {
        let frame = encode_publish("ch\u{1}\n", b"[1,\"\\u0000\"]");
        let value: serde_json::Value = serde_json::from_str(&frame).unwrap();
        assert_eq!(value["data"]["channel"], "ch\u{1}\n");
    }
}
