//! JWT auth tokens, as SocketCluster uses them.
//!
//! The server signs whatever payload the app gives `socket.set_auth_token` (adding `iat`, and
//! `exp` = iat + `[worker] auth_default_expiry` unless the payload has one), and verifies the
//! tokens clients present in `#handshake` and `#authenticate`. Verification accepts exactly the
//! configured algorithm, so `alg: none` and algorithm confusion (an HS256 token signed with an
//! RSA public key) are rejected. Failures map to the sc-errors names and `isBadToken` flags the
//! stock server uses (reference section 5).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Map, Value};

use crate::protocol::ErrorObject;

/// Signs and verifies auth tokens for one worker.
pub(crate) struct AuthEngine {
    algorithm: Algorithm,
    encoding: EncodingKey,
    decoding: DecodingKey,
    default_expiry: Duration,
}

/// A verified token.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct AuthToken {
    /// The signed token as the client holds it.
    pub(crate) signed: String,
    /// Its payload.
    pub(crate) payload: Value,
    /// Its `exp` claim, seconds since the Unix epoch (JavaScript clients often write fractional
    /// seconds: `Date.now() / 1000 + 3600`).
    pub(crate) exp: Option<f64>,
}

/// Why the engine could not be built.
#[derive(Debug, thiserror::Error)]
pub(crate) enum KeyError {
    #[error("worker.auth_algorithm: unsupported algorithm {0}")]
    Algorithm(String),
    #[error("worker.auth_key: an HS* algorithm needs a secret")]
    NoSecret,
    #[error("{path}: {message}")]
    File { path: String, message: String },
}

impl std::fmt::Debug for AuthEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthEngine").field("algorithm", &self.algorithm).finish_non_exhaustive()
    }
}

impl AuthEngine {
    /// An engine for `[worker]` auth settings: `algorithm` with `secret` (HS*) or PEM keys.
    pub(crate) fn new(
        algorithm: &str,
        secret: &str,
        private_key: Option<&std::path::Path>,
        public_key: Option<&std::path::Path>,
        default_expiry: Duration,
    ) -> Result<Self, KeyError> {
        let algorithm: Algorithm =
            algorithm.parse().map_err(|_| KeyError::Algorithm(algorithm.to_owned()))?;
        let read = |path: Option<&std::path::Path>| -> Result<Vec<u8>, KeyError> {
            let path = path.ok_or_else(|| KeyError::Algorithm(format!("{algorithm:?} without key files")))?;
            std::fs::read(path)
                .map_err(|e| KeyError::File { path: path.display().to_string(), message: e.to_string() })
        };
        let pem_error = |path: Option<&std::path::Path>, e: jsonwebtoken::errors::Error| KeyError::File {
            path: path.map(|p| p.display().to_string()).unwrap_or_default(),
            message: e.to_string(),
        };
        let (encoding, decoding) = match algorithm {
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
                if secret.is_empty() {
                    return Err(KeyError::NoSecret);
                }
                let invalid = |e: jsonwebtoken::errors::Error| KeyError::Algorithm(e.to_string());
                (
                    EncodingKey::from_secret(secret.as_bytes()).map_err(invalid)?,
                    DecodingKey::from_secret(secret.as_bytes()).map_err(invalid)?,
                )
            }
            Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 => (
                EncodingKey::from_rsa_pem(&read(private_key)?).map_err(|e| pem_error(private_key, e))?,
                DecodingKey::from_rsa_pem(&read(public_key)?).map_err(|e| pem_error(public_key, e))?,
            ),
            Algorithm::ES256 | Algorithm::ES384 => (
                EncodingKey::from_ec_pem(&read(private_key)?).map_err(|e| pem_error(private_key, e))?,
                DecodingKey::from_ec_pem(&read(public_key)?).map_err(|e| pem_error(public_key, e))?,
            ),
            other => return Err(KeyError::Algorithm(format!("{other:?}"))),
        };
        Ok(Self { algorithm, encoding, decoding, default_expiry })
    }

    /// Signs `payload` (a JSON object), adding `iat` and, unless present, `exp`.
    pub(crate) fn sign(&self, payload: Value) -> Result<AuthToken, ErrorObject> {
        let mut claims = match payload {
            Value::Object(map) => map,
            other => {
                let mut map = Map::new();
                map.insert("data".into(), other);
                map
            }
        };
        let now = now_secs();
        claims.insert("iat".into(), Value::from(now));
        if !claims.contains_key("exp") {
            claims.insert("exp".into(), Value::from(now + self.default_expiry.as_secs()));
        }
        let exp = seconds_claim(&claims, "exp").map_err(|()| invalid_claim("exp"))?;
        let payload = Value::Object(claims);
        let signed =
            jsonwebtoken::encode(&Header::new(self.algorithm), &payload, &self.encoding).map_err(|e| {
                ErrorObject::new("AuthTokenError", format!("Server failed to sign auth token: {e}"))
            })?;
        Ok(AuthToken { signed, payload, exp })
    }

    /// Verifies a signed token. The error is the one to send to the client (with `isBadToken`).
    pub(crate) fn verify(&self, signed: &str) -> Result<AuthToken, ErrorObject> {
        let mut validation = Validation::new(self.algorithm);
        // Like the stock server: exp is checked when present, not required; no leeway. `exp`
        // and `nbf` are read here, not by jsonwebtoken, which takes integers only: clients
        // write fractional seconds, and a socket's later expiry check must read `exp` the same
        // way (`AuthToken::is_expired`).
        validation.required_spec_claims.clear();
        validation.leeway = 0;
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        let claims = match jsonwebtoken::decode::<Value>(signed, &self.decoding, &validation) {
            Ok(data) => data.claims,
            Err(e) => return Err(token_error(e.kind())),
        };
        let Value::Object(map) = &claims else {
            return Err(ErrorObject::new("AuthTokenInvalidError", "jwt malformed")
                .with("isBadToken", Value::Bool(true)));
        };
        let exp = seconds_claim(map, "exp").map_err(|()| invalid_claim("exp"))?;
        let nbf = seconds_claim(map, "nbf").map_err(|()| invalid_claim("nbf"))?;
        if exp.is_some_and(expired) {
            return Err(ErrorObject::new("AuthTokenExpiredError", "jwt expired")
                .with("expiry", expiry(exp))
                .with("isBadToken", Value::Bool(true)));
        }
        if nbf.is_some_and(|nbf| nbf > now_secs() as f64) {
            return Err(ErrorObject::new("AuthTokenNotBeforeError", "jwt not active")
                .with("isBadToken", Value::Bool(false)));
        }
        Ok(AuthToken { signed: signed.to_owned(), payload: claims, exp })
    }
}

impl AuthToken {
    /// Whether the token's `exp` has passed (the same reading as [`AuthEngine::verify`]).
    pub(crate) fn is_expired(&self) -> bool {
        self.exp.is_some_and(expired)
    }
}

/// The error of an expired token found while connected.
pub(crate) fn expired_error(exp: Option<f64>) -> ErrorObject {
    ErrorObject::new("AuthTokenExpiredError", "The socket auth token has expired")
        .with("expiry", expiry(exp))
        .with("isBadToken", Value::Bool(true))
}

/// Whether a token with this `exp` has expired: as the stock server's jsonwebtoken reads it,
/// once the current whole second reaches `exp`.
fn expired(exp: f64) -> bool {
    now_secs() as f64 >= exp
}

/// A time claim (`exp`, `nbf`): absent, or a number of seconds (fractional allowed); anything
/// else is malformed.
fn seconds_claim(claims: &Map<String, Value>, name: &str) -> Result<Option<f64>, ()> {
    match claims.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n.as_f64().filter(|f| f.is_finite()).map(Some).ok_or(()),
        Some(_) => Err(()),
    }
}

fn invalid_claim(name: &str) -> ErrorObject {
    ErrorObject::new("AuthTokenInvalidError", format!("invalid {name} value"))
        .with("isBadToken", Value::Bool(true))
}

/// The `expiry` field of an expiry error: the ISO date of `exp`.
fn expiry(exp: Option<f64>) -> Value {
    exp.map_or(Value::Null, |e| Value::String(iso_date(e)))
}

fn token_error(kind: &ErrorKind) -> ErrorObject {
    match kind {
        ErrorKind::ImmatureSignature => ErrorObject::new("AuthTokenNotBeforeError", "jwt not active")
            .with("isBadToken", Value::Bool(false)),
        ErrorKind::InvalidSignature => ErrorObject::new("AuthTokenInvalidError", "invalid signature")
            .with("isBadToken", Value::Bool(true)),
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
            ErrorObject::new("AuthTokenInvalidError", "invalid algorithm")
                .with("isBadToken", Value::Bool(true))
        }
        ErrorKind::InvalidToken | ErrorKind::Base64(_) | ErrorKind::Json(_) | ErrorKind::Utf8(_) => {
            ErrorObject::new("AuthTokenInvalidError", "jwt malformed").with("isBadToken", Value::Bool(true))
        }
        other => {
            ErrorObject::new("AuthTokenError", format!("{other:?}")).with("isBadToken", Value::Bool(true))
        }
    }
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Seconds since the epoch as an ISO 8601 UTC date, like JavaScript's
/// `new Date(secs * 1000).toISOString()` (milliseconds kept).
fn iso_date(secs: f64) -> String {
    let millis = (secs * 1000.0).floor().max(0.0) as u64;
    let (secs, ms) = (millis / 1000, millis % 1000);
    let days = secs / 86400;
    let rem = secs % 86400;
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{d:02}T{h:02}:{m:02}:{s:02}.{ms:03}Z")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn hs() -> AuthEngine {
        AuthEngine::new("HS256", "secret", None, None, Duration::from_secs(3600)).unwrap()
    }

    #[test]
    fn sign_then_verify() {
        let engine = hs();
        let token = engine.sign(json!({"username": "bob"})).unwrap();
        let verified = engine.verify(&token.signed).unwrap();
        assert_eq!(verified.payload["username"], "bob");
        assert!(verified.payload["iat"].is_u64());
        assert_eq!(verified.exp, Some((verified.payload["iat"].as_u64().unwrap() + 3600) as f64));
        assert!(!verified.is_expired());
    }

    #[test]
    fn payload_exp_is_kept() {
        let token = hs().sign(json!({"exp": 4_000_000_000u64})).unwrap();
        assert_eq!(token.exp, Some(4_000_000_000.0));
    }

    #[test]
    fn expired_token_is_a_bad_token_with_its_expiry() {
        let engine = hs();
        let token = engine.sign(json!({"exp": 1_000_000_000u64})).unwrap();
        let err = engine.verify(&token.signed).unwrap_err();
        assert_eq!(err.name, "AuthTokenExpiredError");
        assert_eq!(err.extra["expiry"], "2001-09-09T01:46:40.000Z");
        assert_eq!(err.extra["isBadToken"], true);
    }

    #[test]
    fn wrong_key_and_garbage_are_invalid() {
        let other = AuthEngine::new("HS256", "other", None, None, Duration::from_secs(60)).unwrap();
        let token = other.sign(json!({"a": 1})).unwrap();
        let err = hs().verify(&token.signed).unwrap_err();
        assert_eq!(err.name, "AuthTokenInvalidError");
        assert_eq!(hs().verify("not.a.token").unwrap_err().name, "AuthTokenInvalidError");
        assert_eq!(hs().verify("").unwrap_err().name, "AuthTokenInvalidError");
    }

    #[test]
    fn alg_none_and_other_algorithms_are_rejected() {
        use base64::Engine as _;
        let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        let none =
            format!("{}.{}.", b64(&json!({"alg": "none", "typ": "JWT"})), b64(&json!({"username": "eve"})));
        let err = hs().verify(&none).unwrap_err();
        assert_eq!(err.name, "AuthTokenInvalidError", "{err:?}");
        let hs512 = AuthEngine::new("HS512", "secret", None, None, Duration::from_secs(60)).unwrap();
        let token = hs512.sign(json!({"a": 1})).unwrap();
        assert_eq!(hs().verify(&token.signed).unwrap_err().name, "AuthTokenInvalidError");
    }

    #[test]
    fn fractional_exp_is_read_the_same_by_the_verifier_and_the_live_check() {
        let engine = hs();
        let now = now_secs() as f64;
        // Date.now() / 1000 + 3600: valid, and not expired on a live socket either.
        let token = engine.sign(json!({"exp": now + 3600.5})).unwrap();
        let verified = engine.verify(&token.signed).unwrap();
        assert_eq!(verified.exp, Some(now + 3600.5));
        assert!(!verified.is_expired());
        // A fractional exp in the past: refused by the verifier, expired on a live socket.
        let past = AuthToken { exp: Some(now - 0.5), ..verified.clone() };
        assert!(past.is_expired());
        let token = engine.sign(json!({"exp": now - 0.5})).unwrap();
        assert_eq!(engine.verify(&token.signed).unwrap_err().name, "AuthTokenExpiredError");
        // Not a number: malformed, as the stock server says.
        let token = engine.sign(json!({"a": 1, "exp": null})).unwrap();
        assert!(engine.verify(&token.signed).is_ok());
        assert!(engine.sign(json!({"exp": "soon"})).is_err());
    }

    #[test]
    fn not_before_is_not_a_bad_token() {
        let engine = hs();
        let token = engine.sign(json!({"nbf": 4_000_000_000u64})).unwrap();
        let err = engine.verify(&token.signed).unwrap_err();
        assert_eq!(err.name, "AuthTokenNotBeforeError");
        assert_eq!(err.extra["isBadToken"], false);
    }

    #[test]
    fn iso_dates() {
        assert_eq!(iso_date(0.0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso_date(1_795_975_500.0), "2026-11-29T18:05:00.000Z"); // checked with Python datetime
        assert_eq!(iso_date(951_782_400.0), "2000-02-29T00:00:00.000Z");
        assert_eq!(iso_date(951_782_400.25), "2000-02-29T00:00:00.250Z");
    }

    #[test]
    fn hs_needs_a_secret() {
        assert!(matches!(
            AuthEngine::new("HS256", "", None, None, Duration::from_secs(1)),
            Err(KeyError::NoSecret)
        ));
    }
}
