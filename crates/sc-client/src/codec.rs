//! The client side of the SocketCluster wire format: pure functions from a text frame to what
//! it means, and from a call to the exact JSON the stock servers expect. No I/O.
//!
//! [`decode`] applies the sc-formatter rules (text that does not start with `{` or `[` after
//! optional whitespace, or that is not valid JSON, is raw, never an error) and then the stock
//! client's packet rules ([`classify`]): an `event` makes an event or a server invoke, a `rid`
//! makes a response, anything else is raw. Values the client does not interpret (event data,
//! publish payloads, the server's cids) stay borrowed [`RawValue`] text until the caller decides
//! whether to copy them out.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::ProtocolVersion;

/// What one inbound text frame is, before looking inside the packets.
#[derive(Debug)]
pub(crate) enum Decoded<'a> {
    /// The server's ping for this protocol version.
    Ping,
    /// One JSON object.
    Packet(Packet<'a>),
    /// A JSON array: each element is handled in order, like the stock clients do.
    Batch(Vec<&'a RawValue>),
    /// Anything else, surfaced as a raw event.
    Raw,
}

/// The envelope of a packet; every field is optional on the wire.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Packet<'a> {
    #[serde(borrow, default)]
    event: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    #[serde(borrow, default)]
    cid: Option<&'a RawValue>,
    #[serde(borrow, default)]
    rid: Option<&'a RawValue>,
    #[serde(borrow, default)]
    error: Option<&'a RawValue>,
}

/// What a packet means to the client.
#[derive(Debug)]
pub(crate) enum Frame<'a> {
    /// The answer to one of our invokes. `data` and `error` are `None` when absent or null.
    Response { rid: u64, data: Option<&'a RawValue>, error: Option<&'a RawValue> },
    /// A message on a subscribed channel.
    Publish { channel: Cow<'a, str>, data: Option<&'a RawValue> },
    /// The server unsubscribed us from a channel.
    KickOut { channel: Cow<'a, str>, message: Option<&'a RawValue> },
    /// The server issued a token; `cid` is set when it wants an ack.
    SetAuthToken { token: Cow<'a, str>, cid: Option<&'a RawValue> },
    /// The server removed our token; `cid` is set when it wants an ack.
    RemoveAuthToken { cid: Option<&'a RawValue> },
    /// v1 only: the server is about to close with this code.
    Disconnect { code: Option<u16>, reason: Option<&'a RawValue> },
    /// A server-to-client invoke: answer with `{"rid":<cid>,...}`, echoing the cid verbatim.
    Invoke { event: Cow<'a, str>, data: Option<&'a RawValue>, cid: &'a RawValue },
    /// A server-to-client event without a reply.
    Transmit { event: Cow<'a, str>, data: Option<&'a RawValue> },
    /// Not a packet the client understands: surfaced as raw.
    Raw,
}

#[derive(Deserialize)]
struct ChannelData<'a> {
    #[serde(borrow)]
    channel: Cow<'a, str>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    #[serde(borrow, default)]
    message: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct TokenData<'a> {
    #[serde(borrow)]
    token: Cow<'a, str>,
}

#[derive(Deserialize)]
struct DisconnectData<'a> {
    #[serde(default)]
    code: Option<u16>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

/// An outbound event, invoke or publish envelope.
#[derive(Serialize)]
struct Emit<'a, T: ?Sized> {
    event: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a T>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cid: Option<u64>,
}

/// An outbound response to a server invoke.
#[derive(Serialize)]
struct Response<'a, T: ?Sized> {
    rid: &'a RawValue,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a T>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a serde_json::Value>,
}

impl ProtocolVersion {
    /// The server's ping text.
    pub(crate) fn ping(self) -> &'static str {
        match self {
            Self::V1 => "#1",
            Self::V2 => "",
        }
    }

    /// Our answer to a ping.
    pub(crate) fn pong(self) -> &'static str {
        match self {
            Self::V1 => "#2",
            Self::V2 => "",
        }
    }
}

/// Decodes one inbound text frame.
pub(crate) fn decode(text: &str, protocol: ProtocolVersion) -> Decoded<'_> {
    if text == protocol.ping() {
        return Decoded::Ping;
    }
    let trimmed = text.trim_start();
    match trimmed.as_bytes().first() {
        Some(b'{') => match serde_json::from_str(trimmed) {
            Ok(packet) => Decoded::Packet(packet),
            Err(_) => Decoded::Raw,
        },
        Some(b'[') => match serde_json::from_str(trimmed) {
            Ok(items) => Decoded::Batch(items),
            Err(_) => Decoded::Raw,
        },
        _ => Decoded::Raw,
    }
}

/// Decodes one element of a batch; elements that are not objects are raw.
pub(crate) fn decode_element(item: &RawValue) -> Option<Packet<'_>> {
    if item.get().starts_with('{') { serde_json::from_str(item.get()).ok() } else { None }
}

/// Classifies a packet the way the stock client of `protocol` does.
pub(crate) fn classify(packet: Packet<'_>, protocol: ProtocolVersion) -> Frame<'_> {
    // v2 clients (v18+) require a numeric cid/rid; v1 clients take any non-null one.
    let is_call_id = |raw: &RawValue| protocol == ProtocolVersion::V1 || is_number(raw);
    if let Some(event) = packet.event {
        let cid = packet.cid.filter(|cid| is_call_id(cid));
        return match event.as_ref() {
            "#publish" => match parse::<ChannelData<'_>>(packet.data) {
                Some(d) => Frame::Publish { channel: d.channel, data: d.data },
                None => Frame::Raw,
            },
            "#kickOut" => match parse::<ChannelData<'_>>(packet.data) {
                Some(d) => Frame::KickOut { channel: d.channel, message: d.message },
                None => Frame::Raw,
            },
            "#setAuthToken" => match parse::<TokenData<'_>>(packet.data) {
                Some(d) => Frame::SetAuthToken { token: d.token, cid },
                None => Frame::Raw,
            },
            "#removeAuthToken" => Frame::RemoveAuthToken { cid },
            "#disconnect" if protocol == ProtocolVersion::V1 => {
                let d = parse::<DisconnectData<'_>>(packet.data);
                Frame::Disconnect { code: d.as_ref().and_then(|d| d.code), reason: d.and_then(|d| d.data) }
            }
            _ => match cid {
                Some(cid) => Frame::Invoke { event, data: packet.data, cid },
                None => Frame::Transmit { event, data: packet.data },
            },
        };
    }
    if let Some(rid) = packet.rid.filter(|rid| is_call_id(rid)).and_then(parse_rid) {
        return Frame::Response { rid, data: packet.data, error: packet.error };
    }
    Frame::Raw
}

/// `{"event":…,"data":…,"cid":…}`; `data` and `cid` are left out when `None`.
pub(crate) fn encode_emit<T: Serialize + ?Sized>(
    event: &str,
    data: Option<&T>,
    cid: Option<u64>,
) -> serde_json::Result<String> {
    serde_json::to_string(&Emit { event, data, cid })
}

/// `{"rid":<cid as received>,"data":…}`
pub(crate) fn encode_response<T: Serialize + ?Sized>(
    rid: &RawValue,
    data: Option<&T>,
) -> serde_json::Result<String> {
    serde_json::to_string(&Response { rid, data, error: None })
}

/// `{"rid":<cid as received>,"error":…}`
pub(crate) fn encode_error(rid: &RawValue, error: &serde_json::Value) -> serde_json::Result<String> {
    serde_json::to_string(&Response::<()> { rid, data: None, error: Some(error) })
}

fn parse<'a, T: Deserialize<'a>>(data: Option<&'a RawValue>) -> Option<T> {
    data.and_then(|d| serde_json::from_str(d.get()).ok())
}

fn is_number(raw: &RawValue) -> bool {
    matches!(raw.get().as_bytes().first(), Some(b'-' | b'0'..=b'9'))
}

/// Our cids are positive integers; a v1 server may echo them as strings (`"7"`).
fn parse_rid(raw: &RawValue) -> Option<u64> {
    let text = raw.get();
    text.trim_matches('"').parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ProtocolVersion::{V1, V2};

    fn frame(text: &str, protocol: ProtocolVersion) -> Frame<'_> {
        match decode(text, protocol) {
            Decoded::Packet(p) => classify(p, protocol),
            other => panic!("not a packet: {other:?}"),
        }
    }

    #[test]
    fn pings_depend_on_the_version() {
        assert!(matches!(decode("", V2), Decoded::Ping));
        assert!(matches!(decode("#1", V1), Decoded::Ping));
        // The other version's ping is a harmless raw frame, as in the stock clients.
        assert!(matches!(decode("#1", V2), Decoded::Raw));
        assert!(matches!(decode("", V1), Decoded::Raw));
        assert_eq!((V1.pong(), V2.pong()), ("#2", ""));
    }

    #[test]
    fn sc_formatter_raw_rules() {
        for text in ["hello", "{not json", "[1,", "  x", "42", "\"s\"", "#2"] {
            assert!(matches!(decode(text, V2), Decoded::Raw), "{text}");
        }
        assert!(matches!(decode(" \n{\"event\":\"e\"}", V2), Decoded::Packet(_)));
        // An object with neither event nor rid is raw.
        assert!(matches!(frame(r#"{"x":1}"#, V2), Frame::Raw));
    }

    #[test]
    fn responses() {
        let Frame::Response { rid, data, error } = frame(r#"{"rid":3,"data":{"a":1}}"#, V2) else { panic!() };
        assert_eq!(rid, 3);
        assert_eq!(data.map(RawValue::get), Some(r#"{"a":1}"#));
        assert!(error.is_none());
        let Frame::Response { error, data, .. } =
            frame(r#"{"rid":4,"error":{"name":"E","message":"m"},"data":{"code":4008}}"#, V1)
        else {
            panic!()
        };
        assert!(error.is_some() && data.is_some(), "v14 sends both");
        let Frame::Response { data, error, .. } = frame(r#"{"rid":5,"data":null,"error":null}"#, V2) else {
            panic!()
        };
        assert!(data.is_none() && error.is_none());
        // v2 clients need a numeric rid; v1 clients take a string one.
        assert!(matches!(frame(r#"{"rid":"6"}"#, V2), Frame::Raw));
        assert!(matches!(frame(r#"{"rid":"6"}"#, V1), Frame::Response { rid: 6, .. }));
    }

    #[test]
    fn reserved_events() {
        let Frame::Publish { channel, data } =
            frame(r##"{"event":"#publish","data":{"channel":"n\"s","data":[1, 2]}}"##, V2)
        else {
            panic!()
        };
        assert_eq!(channel, "n\"s");
        assert_eq!(data.map(RawValue::get), Some("[1, 2]"));
        assert!(matches!(frame(r##"{"event":"#publish","data":{"channel":5}}"##, V2), Frame::Raw));
        let Frame::KickOut { channel, message } =
            frame(r##"{"event":"#kickOut","data":{"channel":"a","message":"bye"}}"##, V2)
        else {
            panic!()
        };
        assert_eq!((channel.as_ref(), message.map(RawValue::get)), ("a", Some("\"bye\"")));
        let Frame::SetAuthToken { token, cid } =
            frame(r##"{"event":"#setAuthToken","data":{"token":"a.b.c"},"cid":2}"##, V2)
        else {
            panic!()
        };
        assert_eq!((token.as_ref(), cid.map(RawValue::get)), ("a.b.c", Some("2")));
        assert!(matches!(
            frame(r##"{"event":"#removeAuthToken"}"##, V2),
            Frame::RemoveAuthToken { cid: None }
        ));
        assert!(matches!(
            frame(r##"{"event":"#removeAuthToken","data":null}"##, V1),
            Frame::RemoveAuthToken { cid: None }
        ));
    }

    #[test]
    fn disconnect_is_v1_only() {
        let text = r##"{"event":"#disconnect","data":{"code":4567,"data":"custom"}}"##;
        let Frame::Disconnect { code, reason } = frame(text, V1) else { panic!() };
        assert_eq!((code, reason.map(RawValue::get)), (Some(4567), Some("\"custom\"")));
        assert!(matches!(frame(text, V2), Frame::Transmit { .. }));
    }

    #[test]
    fn invokes_and_transmits() {
        let Frame::Invoke { event, data, cid } = frame(r#"{"event":"ask","cid":1,"data":{"q":1}}"#, V2)
        else {
            panic!()
        };
        assert_eq!((event.as_ref(), data.map(RawValue::get), cid.get()), ("ask", Some(r#"{"q":1}"#), "1"));
        // A string cid is an invoke for v1 (echoed verbatim) and a transmit for v2.
        let text = r#"{"event":"ask","cid":"x"}"#;
        assert!(matches!(frame(text, V1), Frame::Invoke { cid, .. } if cid.get() == "\"x\""));
        assert!(matches!(frame(text, V2), Frame::Transmit { .. }));
        assert!(matches!(frame(r#"{"event":"push"}"#, V2), Frame::Transmit { data: None, .. }));
    }

    #[test]
    fn batches() {
        let Decoded::Batch(items) = decode(r#"[{"rid":1},5,{"event":"e"}]"#, V2) else { panic!() };
        let kinds: Vec<_> = items
            .iter()
            .map(|i| decode_element(i).map(|p| classify(p, V2)))
            .map(|f| match f {
                Some(Frame::Response { .. }) => "response",
                Some(Frame::Transmit { .. }) => "transmit",
                Some(_) => "other",
                None => "raw",
            })
            .collect();
        assert_eq!(kinds, ["response", "raw", "transmit"]);
    }

    #[test]
    fn encoded_frames() {
        assert_eq!(
            encode_emit("#handshake", Some(&serde_json::json!({"authToken": null})), Some(1)).unwrap(),
            r##"{"event":"#handshake","data":{"authToken":null},"cid":1}"##
        );
        assert_eq!(
            encode_emit::<()>("#removeAuthToken", None, None).unwrap(),
            r##"{"event":"#removeAuthToken"}"##
        );
        assert_eq!(
            encode_emit("#unsubscribe", Some("a\"b"), None).unwrap(),
            r##"{"event":"#unsubscribe","data":"a\"b"}"##
        );
        let rid = RawValue::from_string("\"7\"".into()).unwrap();
        assert_eq!(encode_response(&rid, Some(&2)).unwrap(), r#"{"rid":"7","data":2}"#);
        assert_eq!(encode_response::<()>(&rid, None).unwrap(), r#"{"rid":"7"}"#);
        assert_eq!(
            encode_error(&rid, &serde_json::json!({"name":"E","message":"m"})).unwrap(),
            r#"{"rid":"7","error":{"message":"m","name":"E"}}"#
        );
    }
}
