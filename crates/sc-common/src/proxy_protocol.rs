//! PROXY protocol version 2: how the balancer tells a worker who the client really is.
//!
//! The balancer writes one binary header at the start of every forwarded connection
//! ([`encode`]); the worker reads it before HTTP ([`read_header`]). Only the parts we use are
//! implemented: the PROXY and LOCAL commands, TCP over IPv4 and IPv6, and one TLV, PP2_TYPE_SSL
//! (0x20), whose presence says the client came over TLS. Unknown TLVs are skipped.
//!
//! Inbound, a balancer behind a load balancer that speaks the PROXY protocol (`[balancer]
//! accept_proxy_protocol`) reads either version with [`read_v1_or_v2`]: the text version 1
//! (`PROXY TCP4 <src> <dst> <sport> <dport>\r\n`, still the default of several load balancers)
//! as well as version 2.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt};

/// The 12-byte signature every v2 header starts with.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// The PP2_TYPE_SSL TLV type.
const TLV_SSL: u8 = 0x20;
/// Largest address block we accept: addresses plus a few TLVs.
const MAX_BLOCK: usize = 512;
/// The longest version 1 header, CRLF included (the specification's figure).
const MAX_V1: usize = 107;
/// The shortest version 1 header: `PROXY UNKNOWN\r\n`; no header of either version is shorter
/// than [`SIGNATURE`] (12 bytes), so reading that many first never reads past a header.
const MIN_V1: usize = 15;

/// What a PROXY v2 header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The client's address; `None` for a LOCAL header (health checks and the like).
    pub source: Option<SocketAddr>,
    /// The address the client connected to.
    pub destination: Option<SocketAddr>,
    /// The client connection was TLS (terminated by the sender of the header).
    pub tls: bool,
}

/// A header that cannot be parsed.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// The first 12 bytes are not the PROXY v2 signature.
    #[error("not a PROXY v2 header")]
    Signature,
    /// A version other than 2, or a command other than LOCAL and PROXY.
    #[error("unsupported PROXY version or command {0:#04x}")]
    Command(u8),
    /// The address block does not fit its family.
    #[error("address block of {0} bytes is too long or too short")]
    Length(usize),
    /// A version 1 (text) header that does not follow the specification.
    #[error("bad PROXY v1 header: {0}")]
    V1(&'static str),
    /// Reading the header failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// The header for a connection from `source` to `destination`.
pub fn encode(source: SocketAddr, destination: SocketAddr, tls: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + 36 + 8);
    out.extend_from_slice(&SIGNATURE);
    out.push(0x21); // version 2, PROXY
    let mut block = Vec::with_capacity(36 + 8);
    match (source.ip(), destination.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.push(0x11); // TCP over IPv4
            block.extend_from_slice(&s.octets());
            block.extend_from_slice(&d.octets());
        }
        (s, d) => {
            out.push(0x21); // TCP over IPv6
            block.extend_from_slice(&to_v6(s).octets());
            block.extend_from_slice(&to_v6(d).octets());
        }
    }
    block.extend_from_slice(&source.port().to_be_bytes());
    block.extend_from_slice(&destination.port().to_be_bytes());
    if tls {
        // PP2_TYPE_SSL: client flags PP2_CLIENT_SSL (0x01), verify 0 (success), no sub-TLVs.
        block.extend_from_slice(&[TLV_SSL, 0, 5, 0x01, 0, 0, 0, 0]);
    }
    out.extend_from_slice(&(block.len() as u16).to_be_bytes());
    out.extend_from_slice(&block);
    out
}

/// Reads one header from `reader`, which must start with [`SIGNATURE`].
pub async fn read_header<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Header, ParseError> {
    let mut signature = [0u8; 12];
    reader.read_exact(&mut signature).await?;
    if signature != SIGNATURE {
        return Err(ParseError::Signature);
    }
    read_v2_rest(reader).await
}

/// Reads one header of version 1 or 2 from `reader`, and not a byte more (what follows belongs
/// to the client): anything else at the start of the stream is an error. For headers from a
/// load balancer in front of the balancer; a version 1 `UNKNOWN` says as little as a LOCAL.
pub async fn read_v1_or_v2<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Header, ParseError> {
    let mut line = [0u8; MAX_V1];
    reader.read_exact(&mut line[..SIGNATURE.len()]).await?;
    if line[..SIGNATURE.len()] == SIGNATURE {
        return read_v2_rest(reader).await;
    }
    if !line.starts_with(b"PROXY ") {
        return Err(ParseError::Signature);
    }
    reader.read_exact(&mut line[SIGNATURE.len()..MIN_V1]).await?;
    // The line's end is not known before it is read: one byte at a time, as the
    // specification suggests for readers that must not consume past the header.
    let mut len = MIN_V1;
    while !line[..len].ends_with(b"\r\n") {
        if len == MAX_V1 {
            return Err(ParseError::V1("no CRLF within 107 bytes"));
        }
        reader.read_exact(&mut line[len..=len]).await?;
        len += 1;
    }
    parse_v1(&line[..len - 2])
}

/// The rest of a version 2 header after its signature.
async fn read_v2_rest<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Header, ParseError> {
    let mut fixed = [0u8; 4];
    reader.read_exact(&mut fixed).await?;
    let len = usize::from(u16::from_be_bytes([fixed[2], fixed[3]]));
    if len > MAX_BLOCK {
        return Err(ParseError::Length(len));
    }
    let mut block = vec![0u8; len];
    reader.read_exact(&mut block).await?;
    parse(fixed[0], fixed[1], &block)
}

/// A version 1 line without its CRLF: `PROXY TCP4|TCP6 <src ip> <dst ip> <src port> <dst port>`
/// or `PROXY UNKNOWN ...`.
fn parse_v1(line: &[u8]) -> Result<Header, ParseError> {
    let line = std::str::from_utf8(line).map_err(|_| ParseError::V1("not ASCII"))?;
    let mut fields = line.split(' ');
    let (Some("PROXY"), Some(family)) = (fields.next(), fields.next()) else {
        return Err(ParseError::V1("expected PROXY and a protocol"));
    };
    if family == "UNKNOWN" {
        return Ok(Header { source: None, destination: None, tls: false });
    }
    let (Some(src), Some(dst), Some(sport), Some(dport), None) =
        (fields.next(), fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Err(ParseError::V1("expected four fields after the protocol"));
    };
    let ip = |text: &str| -> Result<IpAddr, ParseError> {
        let ip: IpAddr = text.parse().map_err(|_| ParseError::V1("bad address"))?;
        match (family, ip) {
            ("TCP4", IpAddr::V4(_)) | ("TCP6", IpAddr::V6(_)) => Ok(ip),
            ("TCP4" | "TCP6", _) => Err(ParseError::V1("address of the other family")),
            _ => Err(ParseError::V1("protocol is not TCP4, TCP6 or UNKNOWN")),
        }
    };
    // Ports are decimal without sign or leading zeros ("0" itself aside).
    let port = |text: &str| -> Result<u16, ParseError> {
        let canonical = !text.is_empty()
            && text.bytes().all(|b| b.is_ascii_digit())
            && (text == "0" || !text.starts_with('0'));
        canonical.then(|| text.parse().ok()).flatten().ok_or(ParseError::V1("bad port"))
    };
    Ok(Header {
        source: Some(SocketAddr::new(ip(src)?, port(sport)?)),
        destination: Some(SocketAddr::new(ip(dst)?, port(dport)?)),
        tls: false,
    })
}

fn parse(command: u8, family: u8, block: &[u8]) -> Result<Header, ParseError> {
    let local = Header { source: None, destination: None, tls: false };
    match command {
        0x20 => return Ok(local),
        0x21 => {}
        other => return Err(ParseError::Command(other)),
    }
    let (source, destination, rest) = match family {
        0x11 => {
            let b = block.get(..12).ok_or(ParseError::Length(block.len()))?;
            let ip = |o: usize| IpAddr::V4(Ipv4Addr::new(b[o], b[o + 1], b[o + 2], b[o + 3]));
            let port = |o: usize| u16::from_be_bytes([b[o], b[o + 1]]);
            (SocketAddr::new(ip(0), port(8)), SocketAddr::new(ip(4), port(10)), &block[12..])
        }
        0x21 => {
            let b = block.get(..36).ok_or(ParseError::Length(block.len()))?;
            let ip = |o: usize| {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&b[o..o + 16]);
                let v6 = Ipv6Addr::from(octets);
                v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
            };
            let port = |o: usize| u16::from_be_bytes([b[o], b[o + 1]]);
            (SocketAddr::new(ip(0), port(32)), SocketAddr::new(ip(16), port(34)), &block[36..])
        }
        // UNSPEC or a family we do not forward (Unix): the connection is fine, the address unknown.
        _ => return Ok(local),
    };
    Ok(Header { source: Some(source), destination: Some(destination), tls: has_ssl_tlv(rest) })
}

fn has_ssl_tlv(mut tlvs: &[u8]) -> bool {
    while tlvs.len() >= 3 {
        let kind = tlvs[0];
        let len = usize::from(u16::from_be_bytes([tlvs[1], tlvs[2]]));
        let Some(value) = tlvs.get(3..3 + len) else {
            return false;
        };
        if kind == TLV_SSL {
            return value.first().is_some_and(|flags| flags & 0x01 != 0);
        }
        tlvs = &tlvs[3 + len..];
    }
    false
}

fn to_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn round_trip(source: &str, destination: &str, tls: bool) -> Header {
        let bytes = encode(source.parse().unwrap(), destination.parse().unwrap(), tls);
        let mut reader = &bytes[..];
        let header = read_header(&mut reader).await.unwrap();
        assert!(reader.is_empty(), "the whole header is consumed");
        header
    }

    #[tokio::test]
    async fn ipv4_round_trip() {
        let h = round_trip("203.0.113.7:51000", "127.0.0.1:8000", false).await;
        assert_eq!(h.source, Some("203.0.113.7:51000".parse().unwrap()));
        assert_eq!(h.destination, Some("127.0.0.1:8000".parse().unwrap()));
        assert!(!h.tls);
    }

    #[tokio::test]
    async fn ipv6_and_tls_round_trip() {
        let h = round_trip("[2001:db8::1]:443", "[::1]:8000", true).await;
        assert_eq!(h.source, Some("[2001:db8::1]:443".parse().unwrap()));
        assert!(h.tls);
    }

    #[tokio::test]
    async fn mixed_families_use_mapped_v6() {
        let h = round_trip("198.51.100.2:1234", "[::1]:8000", false).await;
        assert_eq!(h.source, Some("198.51.100.2:1234".parse().unwrap()));
    }

    #[test]
    fn known_bytes() {
        let bytes = encode("1.2.3.4:5".parse().unwrap(), "6.7.8.9:10".parse().unwrap(), false);
        assert_eq!(
            bytes,
            [
                0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, 0x21, 0x11, 0, 12, 1,
                2, 3, 4, 6, 7, 8, 9, 0, 5, 0, 10
            ]
        );
    }

    #[tokio::test]
    async fn local_command_has_no_address() {
        let mut bytes = SIGNATURE.to_vec();
        bytes.extend_from_slice(&[0x20, 0x00, 0, 0]);
        let h = read_header(&mut &bytes[..]).await.unwrap();
        assert_eq!(h.source, None);
    }

    /// `bytes` read by [`read_v1_or_v2`], with what it left unread.
    async fn inbound(bytes: &[u8]) -> (Result<Header, ParseError>, Vec<u8>) {
        let mut reader = bytes;
        let header = read_v1_or_v2(&mut reader).await;
        (header, reader.to_vec())
    }

    #[tokio::test]
    async fn inbound_v1_is_parsed_and_nothing_past_it_is_read() {
        let (h, rest) = inbound(b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 8000\r\nGET / HTTP/1.1\r\n").await;
        let h = h.unwrap();
        assert_eq!(h.source, Some("203.0.113.7:51000".parse().unwrap()));
        assert_eq!(h.destination, Some("10.0.0.1:8000".parse().unwrap()));
        assert_eq!(rest, b"GET / HTTP/1.1\r\n", "the client's bytes stay unread");
        let (h, rest) = inbound(b"PROXY TCP6 2001:db8::7 2001:db8::1 443 8000\r\n\x16\x03").await;
        assert_eq!(h.unwrap().source, Some("[2001:db8::7]:443".parse().unwrap()));
        assert_eq!(rest, b"\x16\x03");
        let (h, rest) = inbound(b"PROXY UNKNOWN\r\nx").await;
        assert_eq!(h.unwrap().source, None);
        assert_eq!(rest, b"x");
        let longest =
            format!("PROXY UNKNOWN {0} {0} 65535 65535\r\n", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff");
        assert_eq!(longest.len(), MAX_V1);
        assert!(inbound(longest.as_bytes()).await.0.is_ok());
    }

    #[tokio::test]
    async fn inbound_v2_is_parsed_and_nothing_past_it_is_read() {
        let mut bytes = encode("198.51.100.4:4000".parse().unwrap(), "10.0.0.1:8000".parse().unwrap(), false);
        bytes.extend_from_slice(b"GET /");
        let (h, rest) = inbound(&bytes).await;
        assert_eq!(h.unwrap().source, Some("198.51.100.4:4000".parse().unwrap()));
        assert_eq!(rest, b"GET /");
    }

    #[tokio::test]
    async fn inbound_without_a_valid_header_is_refused() {
        for bad in [
            &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\x00\x00\x00",
            b"PROXY TCP4 203.0.113.7 10.0.0.1 51000\r\n\r\n\r\n",
            b"PROXY TCP4 2001:db8::1 10.0.0.1 1 2\r\n",
            b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
            b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
        ] {
            let (h, _) = inbound(bad).await;
            assert!(h.is_err(), "{:?} accepted", String::from_utf8_lossy(bad));
        }
        let endless = [b"PROXY TCP4 ".as_slice(), &[b'1'; 200]].concat();
        assert!(matches!(inbound(&endless).await.0, Err(ParseError::V1(_))));
        assert!(matches!(inbound(b"PROXY TCP4 1.2").await.0, Err(ParseError::Io(_))), "cut short");
        assert!(matches!(inbound(b"").await.0, Err(ParseError::Io(_))));
    }

    #[tokio::test]
    async fn garbage_is_rejected() {
        let bytes = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        assert!(matches!(read_header(&mut &bytes[..]).await, Err(ParseError::Signature)));
        let mut long = SIGNATURE.to_vec();
        long.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert!(matches!(read_header(&mut &long[..]).await, Err(ParseError::Length(_))));
        let mut short = SIGNATURE.to_vec();
        short.extend_from_slice(&[0x21, 0x11, 0, 2, 1, 2]);
        assert!(matches!(read_header(&mut &short[..]).await, Err(ParseError::Length(2))));
        let truncated = &SIGNATURE[..8];
        assert!(matches!(read_header(&mut &truncated[..]).await, Err(ParseError::Io(_))));
    }
}
