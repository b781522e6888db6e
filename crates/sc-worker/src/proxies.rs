//! Whom the worker believes about the client's address.
//!
//! The balancer tells the worker the client address in a PROXY v2 header. Over the worker's
//! Unix socket (a balancer on the same host; the folder is private to the cluster) it is
//! always believed; over TCP only from a balancer in the current membership or an address in
//! `[worker] trusted_proxies` ([`ProxySources`]), because anyone who reaches a worker port
//! could otherwise forge the client IP and the TLS flag the app sees. An HTTP proxy in front of the cluster (or of a worker) says it with headers
//! instead, and anyone can send those: they count only when the peer (the TCP peer, or the
//! address from the PROXY header) is a trusted proxy. Then the client is the right-most
//! `X-Forwarded-For` entry that is not itself a trusted proxy (each proxy appends the address
//! it saw, so entries to the left of an untrusted one may be forged).

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::{PoisonError, RwLock};

use http::HeaderMap;

use crate::handle::Peer;

/// Who may send a PROXY v2 header over TCP: the balancers of the current membership (their
/// advertised addresses) and `[worker] trusted_proxies`.
#[derive(Debug, Default)]
pub(crate) struct ProxySources {
    configured: TrustedProxies,
    /// std RwLock: read per connection, replaced on membership changes; never held across
    /// await.
    balancers: RwLock<HashSet<IpAddr>>,
}

impl ProxySources {
    /// Trusting `configured` and, once known, the membership's balancers.
    pub(crate) fn new(configured: TrustedProxies) -> Self {
        Self { configured, balancers: RwLock::default() }
    }

    /// Replaces the balancers' addresses (from a membership snapshot).
    pub(crate) fn set_balancers(&self, ips: impl IntoIterator<Item = IpAddr>) {
        let ips = ips.into_iter().map(canonical).collect();
        *self.balancers.write().unwrap_or_else(PoisonError::into_inner) = ips;
    }

    /// `[worker] trusted_proxies` (whose `X-Forwarded-*` headers count too).
    pub(crate) fn configured(&self) -> &TrustedProxies {
        &self.configured
    }

    /// Whether a PROXY header from the TCP peer `ip` is believed.
    pub(crate) fn allows(&self, ip: IpAddr) -> bool {
        self.configured.contains(ip)
            || self.balancers.read().unwrap_or_else(PoisonError::into_inner).contains(&canonical(ip))
    }
}

/// IPs and CIDR blocks.
#[derive(Debug, Clone, Default)]
pub(crate) struct TrustedProxies {
    nets: Vec<(IpAddr, u8)>,
}

impl TrustedProxies {
    /// Parses "10.0.0.0/8", "192.168.1.7", "::1", "fd00::/8"; an error names the bad entry.
    pub(crate) fn parse(entries: &[String]) -> Result<Self, sc_common::Error> {
        let mut nets = Vec::with_capacity(entries.len());
        for entry in entries {
            let bad = || {
                sc_common::Error::Config(format!(
                    "worker.trusted_proxies: {entry:?} is not an IP or a CIDR block"
                ))
            };
            let (ip, bits) = match entry.split_once('/') {
                Some((ip, bits)) => (ip, Some(bits.parse::<u8>().map_err(|_| bad())?)),
                None => (entry.as_str(), None),
            };
            let ip: IpAddr = ip.trim().parse().map_err(|_| bad())?;
            let ip = canonical(ip);
            let max = if ip.is_ipv4() { 32 } else { 128 };
            let bits = bits.unwrap_or(max);
            if bits > max {
                return Err(bad());
            }
            nets.push((ip, bits));
        }
        Ok(Self { nets })
    }

    /// Whether the list is empty (then no header is ever believed).
    pub(crate) fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }

    /// Whether `ip` is a trusted proxy.
    pub(crate) fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.nets.iter().any(|&(net, bits)| match (net, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => prefix_eq(&net.octets(), &ip.octets(), bits),
            (IpAddr::V6(net), IpAddr::V6(ip)) => prefix_eq(&net.octets(), &ip.octets(), bits),
            _ => false,
        })
    }

    /// The client as the request's headers tell it, if the peer is trusted to say so.
    pub(crate) fn client(&self, peer: Peer, headers: &HeaderMap) -> Peer {
        let Some(from) = peer.addr else { return peer };
        if self.is_empty() || !self.contains(from.ip()) {
            return peer;
        }
        let mut client = peer;
        // Every X-Forwarded-For line, in order, as one list.
        let entries: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .collect();
        let mut chosen = None;
        for entry in entries.iter().rev() {
            let Some(ip) = parse_entry(entry) else { break };
            chosen = Some(ip);
            if !self.contains(ip) {
                break;
            }
        }
        if let Some(ip) = chosen {
            client.addr = Some(SocketAddr::new(ip, 0));
        }
        let proto = headers.get_all("x-forwarded-proto").iter().filter_map(|v| v.to_str().ok()).next_back();
        if let Some(proto) = proto.and_then(|p| p.rsplit(',').next()).map(str::trim) {
            client.tls = proto.eq_ignore_ascii_case("https") || proto.eq_ignore_ascii_case("wss");
        }
        client
    }
}

/// An X-Forwarded-For entry: "1.2.3.4", "1.2.3.4:5678", "2001:db8::1" or "[2001:db8::1]:5678".
fn parse_entry(entry: &str) -> Option<IpAddr> {
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    entry.parse::<SocketAddr>().ok().map(|addr| canonical(addr.ip()))
}

/// IPv4-mapped IPv6 addresses compare as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn prefix_eq(a: &[u8], b: &[u8], bits: u8) -> bool {
    let full = usize::from(bits / 8);
    let rest = bits % 8;
    if a[..full] != b[..full] {
        return false;
    }
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    (a[full] & mask) == (b[full] & mask)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_headers_are_believed_from_balancers_and_configured_addresses_only() {
        let sources = ProxySources::new(list(&["10.9.0.0/16"]));
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(sources.allows(ip("10.9.1.2")));
        assert!(!sources.allows(ip("10.8.1.2")));
        assert!(!sources.allows(ip("192.0.2.5")));
        sources.set_balancers([ip("192.0.2.5")]);
        assert!(sources.allows(ip("192.0.2.5")));
        assert!(sources.allows(ip("::ffff:192.0.2.5")), "v4-mapped is the same host");
        sources.set_balancers([]);
        assert!(!sources.allows(ip("192.0.2.5")), "a balancer that left is not believed");
    }

    fn list(entries: &[&str]) -> TrustedProxies {
        TrustedProxies::parse(&entries.iter().map(|e| (*e).to_owned()).collect::<Vec<_>>()).unwrap()
    }

    fn peer(addr: &str) -> Peer {
        Peer { addr: Some(addr.parse().unwrap()), tls: false }
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(*k, v.parse().unwrap());
        }
        map
    }

    #[test]
    fn cidr_and_exact_entries() {
        let trusted = list(&["10.0.0.0/8", "192.168.1.7", "fd00::/8", "172.16.0.0/12"]);
        assert!(trusted.contains("10.1.2.3".parse().unwrap()));
        assert!(trusted.contains("::ffff:10.1.2.3".parse().unwrap()), "mapped v4 counts as v4");
        assert!(trusted.contains("192.168.1.7".parse().unwrap()));
        assert!(!trusted.contains("192.168.1.8".parse().unwrap()));
        assert!(trusted.contains("fd12::1".parse().unwrap()));
        assert!(trusted.contains("172.31.255.255".parse().unwrap()));
        assert!(!trusted.contains("172.32.0.1".parse().unwrap()));
        assert!(!trusted.contains("11.0.0.1".parse().unwrap()));
        for bad in ["10.0.0.0/33", "nonsense", "10.0.0.0/x", "::/129"] {
            let err = TrustedProxies::parse(&[bad.to_owned()]).unwrap_err();
            assert!(err.to_string().contains(bad), "{err}");
        }
    }

    #[test]
    fn forwarded_headers_count_only_from_trusted_peers() {
        let trusted = list(&["127.0.0.0/8"]);
        let h = headers(&[("x-forwarded-for", "203.0.113.9"), ("x-forwarded-proto", "https")]);
        let from_proxy = trusted.client(peer("127.0.0.1:4000"), &h);
        assert_eq!(from_proxy.addr, Some("203.0.113.9:0".parse().unwrap()));
        assert!(from_proxy.tls);
        let from_stranger = trusted.client(peer("198.51.100.1:4000"), &h);
        assert_eq!(from_stranger, peer("198.51.100.1:4000"), "headers from an untrusted peer are ignored");
        assert_eq!(TrustedProxies::default().client(peer("127.0.0.1:1"), &h), peer("127.0.0.1:1"));
    }

    #[test]
    fn the_rightmost_untrusted_entry_is_the_client() {
        let trusted = list(&["127.0.0.1", "10.0.0.0/8"]);
        // A forged left part, the real client, then an inner proxy.
        let h = headers(&[("x-forwarded-for", "1.1.1.1, 203.0.113.9"), ("x-forwarded-for", "10.0.0.2")]);
        assert_eq!(trusted.client(peer("127.0.0.1:1"), &h).addr, Some("203.0.113.9:0".parse().unwrap()));
        let h = headers(&[("x-forwarded-for", "[2001:db8::7]:443, 10.0.0.3:80")]);
        assert_eq!(trusted.client(peer("127.0.0.1:1"), &h).addr, Some("[2001:db8::7]:0".parse().unwrap()));
        let h = headers(&[("x-forwarded-for", "garbage")]);
        assert_eq!(trusted.client(peer("127.0.0.1:1"), &h), peer("127.0.0.1:1"));
    }
}
