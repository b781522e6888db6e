//! The cluster secret that authenticates internal gRPC calls.
//!
//! Every master and broker call carries `authorization: Bearer <secret>`. Servers check it with
//! [`Check`] (a tonic interceptor); clients add it with [`Attach`]. Health checks are not
//! authenticated: they reveal nothing and must work for any orchestrator.

use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// Adds the cluster secret to every outgoing request.
#[derive(Debug, Clone)]
pub struct Attach {
    header: Option<MetadataValue<tonic::metadata::Ascii>>,
}

/// Checks the cluster secret on every incoming request.
#[derive(Debug, Clone)]
pub struct Check {
    expected: std::sync::Arc<str>,
}

impl Attach {
    /// An interceptor sending `secret`; an empty secret sends nothing.
    pub fn new(secret: &str) -> Self {
        let header = (!secret.is_empty()).then(|| format!("Bearer {secret}").parse().ok()).flatten();
        Self { header }
    }
}

impl Interceptor for Attach {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(header) = &self.header {
            request.metadata_mut().insert("authorization", header.clone());
        }
        Ok(request)
    }
}

impl Check {
    /// An interceptor accepting only `secret`; an empty secret accepts every call.
    pub fn new(secret: &str) -> Self {
        Self { expected: secret.into() }
    }
}

impl Interceptor for Check {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        if self.expected.is_empty() {
            return Ok(request);
        }
        let given = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if constant_time_eq(given.as_bytes(), self.expected.as_bytes()) {
            Ok(request)
        } else {
            Err(Status::unauthenticated("bad or missing cluster secret"))
        }
    }
}

/// A fresh random secret (32 bytes, hex).
pub fn generate() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `a` and `b` are equal, in a time that depends on their lengths only (not on where
/// they differ), for comparing secrets and keys.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attach_then_check() {
        let mut attach = Attach::new("s3cret");
        let mut check = Check::new("s3cret");
        let request = attach.call(Request::new(())).unwrap();
        assert!(check.call(request).is_ok());
    }

    #[test]
    fn wrong_or_missing_secret_is_refused() {
        let mut check = Check::new("s3cret");
        assert!(check.call(Request::new(())).is_err());
        let request = Attach::new("other").call(Request::new(())).unwrap();
        assert_eq!(check.call(request).unwrap_err().code(), tonic::Code::Unauthenticated);
    }

    #[test]
    fn constant_time_eq_compares_whole_values() {
        assert!(constant_time_eq(b"key", b"key"));
        assert!(constant_time_eq(b"", b""));
        assert!(!constant_time_eq(b"key", b"kez"));
        assert!(!constant_time_eq(b"key", b"key2"));
        assert!(!constant_time_eq(b"", b"k"));
    }

    #[test]
    fn generated_secrets_differ() {
        assert_ne!(generate(), generate());
        assert_eq!(generate().len(), 64);
    }
}
