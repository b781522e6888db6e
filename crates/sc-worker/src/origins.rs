//! The `[worker] origins` check on WebSocket upgrades, with the stock server's rules
//! (reference section 1): entries are `host:port`, `host:*`, `*:port` or `*:*`; a missing
//! origin or `null` counts as `*`; the port defaults to 443 for https and 80 otherwise.

/// An origin allow-list.
#[derive(Debug, Clone)]
pub(crate) struct Origins {
    any: bool,
    entries: Vec<String>,
}

impl Origins {
    /// The list from config.
    pub(crate) fn new(entries: &[String]) -> Self {
        Self { any: entries.iter().any(|e| e == "*:*"), entries: entries.to_vec() }
    }

    /// Whether a request with this `Origin` header (if any) may connect.
    pub(crate) fn allows(&self, origin: Option<&str>) -> bool {
        if self.any {
            return true;
        }
        let (host, port) = match origin.map(str::trim) {
            None | Some("null") | Some("") => ("*".to_owned(), "*".to_owned()),
            Some(origin) => parse(origin),
        };
        let candidates = [format!("{host}:{port}"), format!("{host}:*"), format!("*:{port}")];
        self.entries.iter().any(|entry| candidates.contains(entry))
    }
}

/// "https://example.com:8443" -> ("example.com", "8443"); default ports by scheme.
fn parse(origin: &str) -> (String, String) {
    let (scheme, rest) = origin.split_once("://").unwrap_or(("", origin));
    let authority = rest.split('/').next().unwrap_or("");
    let default_port = if scheme.eq_ignore_ascii_case("https") { "443" } else { "80" };
    // An IPv6 literal keeps its brackets: "[::1]:8000".
    let (host, port) = match authority.rfind(':') {
        Some(i) if !authority[i..].contains(']') => (&authority[..i], &authority[i + 1..]),
        _ => (authority, default_port),
    };
    (host.to_ascii_lowercase(), port.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(entries: &[&str]) -> Origins {
        Origins::new(&entries.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
    }

    #[test]
    fn everything_by_default() {
        assert!(list(&["*:*"]).allows(None));
        assert!(list(&["*:*"]).allows(Some("https://evil.example")));
    }

    #[test]
    fn host_and_port_rules() {
        let origins = list(&["example.com:443", "dev.local:*", "*:8080"]);
        assert!(origins.allows(Some("https://example.com")));
        assert!(origins.allows(Some("https://example.com:443")));
        assert!(!origins.allows(Some("http://example.com")), "port 80 is not 443");
        assert!(origins.allows(Some("http://dev.local:3000")));
        assert!(origins.allows(Some("http://anything:8080")));
        assert!(!origins.allows(Some("https://other.com")));
    }

    #[test]
    fn missing_origin_is_a_wildcard() {
        assert!(!list(&["example.com:443"]).allows(None), "a Node client without Origin is refused");
        assert!(!list(&["example.com:443"]).allows(Some("null")));
        assert!(list(&["*:*", "x:1"]).allows(None));
    }

    #[test]
    fn ipv6_literals() {
        assert!(list(&["[::1]:8000"]).allows(Some("http://[::1]:8000")));
        assert!(list(&["[::1]:80"]).allows(Some("http://[::1]")));
    }
}
