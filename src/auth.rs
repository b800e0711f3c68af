//! Who may publish. A publish request is allowed, in this order, by a static
//! bearer token (the stream's own `tokens` or `auth.tokens`), by a valid JSON
//! Web Token naming the stream (`[auth.jwt]`), or by the HTTP callback
//! (`[auth.callback]`). With none of them configured for a stream, anyone
//! may publish it. The token a session was created with is then needed for
//! its resource (PATCH, GET, DELETE); an open session relies on its 128-bit
//! id. Tokens are compared in constant time and never logged.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use axum::http::{HeaderMap, header};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use subtle::ConstantTimeEq;

use crate::config::{AuthConfig, CallbackConfig, ConfigError, JwtAlgorithm, JwtConfig};
use crate::error::AppError;

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        message: message.into(),
    }
}

/// What allowed a publication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// Nothing is configured for the stream: anyone may publish.
    Open,
    /// This bearer token was accepted; the session resource needs it too.
    Token(String),
}

/// The verifiers built from `[auth]`, and the token each session was
/// created with.
pub struct Auth {
    tokens: Vec<String>,
    jwt: Option<Jwt>,
    callback: Option<Callback>,
    /// Set when the configuration could not be turned into verifiers: every
    /// publish attempt is refused (fail closed).
    broken: Option<String>,
    sessions: Mutex<HashMap<String, String>>,
}

impl Auth {
    /// Builds the verifiers; errors name the configuration key at fault.
    pub fn new(config: &AuthConfig) -> Result<Self, ConfigError> {
        Ok(Self {
            tokens: config.tokens.clone(),
            jwt: config.jwt.as_ref().map(Jwt::new).transpose()?,
            callback: config.callback.as_ref().map(Callback::new).transpose()?,
            broken: None,
            sessions: Mutex::new(HashMap::new()),
        })
    }

    /// An `Auth` that refuses every publication, for a configuration that
    /// validated at load but can no longer be read (a key file removed).
    pub fn refusing(reason: String) -> Self {
        Self {
            tokens: Vec::new(),
            jwt: None,
            callback: None,
            broken: Some(reason),
            sessions: Mutex::new(HashMap::new()),
        }
    }

    /// Decides whether `token` may publish `stream`. `stream_tokens` are the
    /// stream's own static tokens.
    ///
    /// Failure modes: `401` when no token is given, or when no mechanism
    /// accepts it (the callback answered anything but 2xx); `503` when the
    /// callback cannot be reached or does not answer within its timeout.
    pub async fn authorize_publish(
        &self,
        stream: &str,
        stream_tokens: &[String],
        token: Option<&str>,
        client_ip: Option<IpAddr>,
    ) -> Result<Grant, AppError> {
        if let Some(reason) = &self.broken {
            return Err(AppError::AuthUnavailable(reason.clone()));
        }
        if stream_tokens.is_empty()
            && self.tokens.is_empty()
            && self.jwt.is_none()
            && self.callback.is_none()
        {
            return Ok(Grant::Open);
        }
        let token = token
            .filter(|t| !t.is_empty())
            .ok_or(AppError::Unauthorized)?;
        if any_token_matches(stream_tokens.iter().chain(&self.tokens), token) {
            return Ok(Grant::Token(token.to_owned()));
        }
        if let Some(jwt) = &self.jwt {
            match jwt.verify(token, stream) {
                Ok(()) => return Ok(Grant::Token(token.to_owned())),
                Err(reason) => tracing::debug!(stream, %reason, "JWT not accepted"),
            }
        }
        if let Some(callback) = &self.callback {
            return match callback.ask(stream, token, client_ip).await {
                Ok(()) => Ok(Grant::Token(token.to_owned())),
                Err(CallbackRefusal::Denied(status)) => {
                    tracing::debug!(stream, status, "authorization callback refused");
                    Err(AppError::Unauthorized)
                }
                Err(CallbackRefusal::Unreachable(error)) => {
                    tracing::warn!(stream, %error, "authorization callback unreachable");
                    Err(AppError::AuthUnavailable(
                        "the authorization service did not answer; try again later".into(),
                    ))
                }
            };
        }
        Err(AppError::Unauthorized)
    }

    /// Remembers the token a session was created with.
    pub fn bind_session(&self, session: &str, grant: &Grant) {
        if let Grant::Token(t) = grant {
            lock(&self.sessions).insert(session.to_owned(), t.clone());
        }
    }

    /// A request on a session resource must carry the token the session was
    /// created with; a session created without one relies on its id.
    pub fn check_session(&self, session: &str, token: Option<&str>) -> Result<(), AppError> {
        let bound = lock(&self.sessions).get(session).cloned();
        match bound {
            None => Ok(()),
            Some(t) if token.is_some_and(|g| bool::from(t.as_bytes().ct_eq(g.as_bytes()))) => {
                Ok(())
            }
            Some(_) => Err(AppError::Unauthorized),
        }
    }

    pub fn forget_session(&self, session: &str) {
        lock(&self.sessions).remove(session);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The bearer token of a request (RFC 6750), if any.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Compares `given` with every token, without stopping early.
fn any_token_matches<'a>(tokens: impl Iterator<Item = &'a String>, given: &str) -> bool {
    let mut ok = subtle::Choice::from(0);
    for t in tokens {
        ok |= t.as_bytes().ct_eq(given.as_bytes());
    }
    bool::from(ok)
}

/// `pattern` is a stream name, possibly with `*` standing for any run of
/// characters (`cam-*`, `*`).
pub fn stream_matches(pattern: &str, stream: &str) -> bool {
    let (p, s) = (pattern.as_bytes(), stream.as_bytes());
    let (mut pi, mut si) = (0, 0);
    // Where the last `*` was, and where in `s` it currently stops matching.
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
        } else if pi < p.len() && p[pi] == s[si] {
            pi += 1;
            si += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

struct Jwt {
    key: DecodingKey,
    validation: Validation,
}

/// The claims whipgate reads beyond the registered ones.
#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    stream: Option<StreamClaim>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum StreamClaim {
    One(String),
    Many(Vec<String>),
}

impl Jwt {
    fn new(c: &JwtConfig) -> Result<Self, ConfigError> {
        const SECRET: &str = "auth.jwt.secret";
        const KEY_FILE: &str = "auth.jwt.public_key_file";
        let (key, algorithm) = match c.algorithm {
            JwtAlgorithm::HS256 => {
                if c.public_key_file.is_some() {
                    return Err(invalid(
                        KEY_FILE,
                        "HS256 verifies with `secret`, not a key file",
                    ));
                }
                let secret = c
                    .secret
                    .as_ref()
                    .ok_or_else(|| invalid(SECRET, "HS256 needs a shared secret"))?;
                if secret.len() < 32 {
                    return Err(invalid(SECRET, "must be at least 32 characters (256 bits)"));
                }
                (
                    DecodingKey::from_secret(secret.as_bytes()),
                    Algorithm::HS256,
                )
            }
            JwtAlgorithm::RS256 | JwtAlgorithm::ES256 => {
                let rsa = c.algorithm == JwtAlgorithm::RS256;
                if c.secret.is_some() {
                    return Err(invalid(
                        SECRET,
                        "RS256 and ES256 verify with `public_key_file`, not a secret",
                    ));
                }
                let path = c.public_key_file.as_ref().ok_or_else(|| {
                    invalid(KEY_FILE, "RS256 and ES256 need a PEM public key file")
                })?;
                let pem = std::fs::read(path)
                    .map_err(|e| invalid(KEY_FILE, format!("{}: {e}", path.display())))?;
                if pem.windows(11).any(|w| w == b"PRIVATE KEY") {
                    return Err(invalid(
                        KEY_FILE,
                        format!(
                            "{} holds a private key; give the public one (`openssl pkey -pubout`)",
                            path.display()
                        ),
                    ));
                }
                let (key, algorithm, kind) = if rsa {
                    (DecodingKey::from_rsa_pem(&pem), Algorithm::RS256, "RSA")
                } else {
                    (DecodingKey::from_ec_pem(&pem), Algorithm::ES256, "EC P-256")
                };
                let key = key.map_err(|e| {
                    invalid(
                        KEY_FILE,
                        format!("{} is not a PEM {kind} public key: {e}", path.display()),
                    )
                })?;
                (key, algorithm)
            }
        };
        if c.leeway > 300 {
            return Err(invalid("auth.jwt.leeway", "must be at most 300 seconds"));
        }
        let mut validation = Validation::new(algorithm);
        validation.leeway = c.leeway;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        let mut required = vec!["exp"];
        match &c.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            // Without a configured audience, an `aud` claim is not checked.
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &c.issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        Ok(Self { key, validation })
    }

    /// Checks the signature, `exp`, `nbf` (and `aud`, `iss` when
    /// configured) and that the `stream` claim allows `stream`. The error is
    /// a reason for the logs, without the token.
    fn verify(&self, token: &str, stream: &str) -> Result<(), String> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| e.to_string())?;
        let allowed = match data.claims.stream {
            None => return Err("the token has no `stream` claim".into()),
            Some(StreamClaim::One(p)) => stream_matches(&p, stream),
            Some(StreamClaim::Many(ps)) => ps.iter().any(|p| stream_matches(p, stream)),
        };
        if allowed {
            Ok(())
        } else {
            Err("the token's `stream` claim does not allow this stream".into())
        }
    }
}

struct Callback {
    url: String,
    client: reqwest::Client,
}

enum CallbackRefusal {
    /// It answered, with this status.
    Denied(u16),
    /// No answer: connection refused, timeout, TLS failure...
    Unreachable(String),
}

impl Callback {
    fn new(c: &CallbackConfig) -> Result<Self, ConfigError> {
        let url = url::Url::parse(&c.url)
            .map_err(|e| invalid("auth.callback.url", format!("`{}`: {e}", c.url)))?;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            return Err(invalid(
                "auth.callback.url",
                "must be an http:// or https:// URL with a host",
            ));
        }
        if !(c.timeout > 0.0 && c.timeout <= 30.0) {
            return Err(invalid(
                "auth.callback.timeout",
                "must be more than 0 and at most 30 seconds",
            ));
        }
        let timeout = Duration::from_secs_f64(c.timeout);
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            // A redirect is an answer, not a 2xx: refused.
            .redirect(reqwest::redirect::Policy::none())
            // The callback is the platform's own service, reached directly.
            .no_proxy()
            .build()
            .map_err(|e| invalid("auth.callback", e.to_string()))?;
        Ok(Self {
            url: c.url.clone(),
            client,
        })
    }

    async fn ask(
        &self,
        stream: &str,
        token: &str,
        client_ip: Option<IpAddr>,
    ) -> Result<(), CallbackRefusal> {
        let body = serde_json::json!({
            "stream": stream,
            "token": token,
            "client_ip": client_ip.map(|ip| ip.to_string()),
            "action": "publish",
        });
        match self.client.post(&self.url).json(&body).send().await {
            Ok(resp) if resp.status().is_success() => Ok(()),
            Ok(resp) => Err(CallbackRefusal::Denied(resp.status().as_u16())),
            Err(e) => Err(CallbackRefusal::Unreachable(e.without_url().to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    fn hs256_config() -> AuthConfig {
        AuthConfig {
            jwt: Some(JwtConfig {
                algorithm: JwtAlgorithm::HS256,
                secret: Some(SECRET.into()),
                public_key_file: None,
                audience: None,
                issuer: None,
                leeway: 0,
            }),
            ..Default::default()
        }
    }

    fn token(claims: serde_json::Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    }

    async fn publish(auth: &Auth, stream: &str, token: Option<&str>) -> Result<Grant, AppError> {
        auth.authorize_publish(stream, &[], token, None).await
    }

    #[test]
    fn patterns() {
        assert!(stream_matches("cam", "cam"));
        assert!(!stream_matches("cam", "cam2"));
        assert!(stream_matches("*", "anything"));
        assert!(stream_matches("cam-*", "cam-1"));
        assert!(stream_matches("cam-*", "cam-"));
        assert!(!stream_matches("cam-*", "cam"));
        assert!(stream_matches("*-main", "studio-main"));
        assert!(stream_matches("a*b*c", "axxbyyc"));
        assert!(!stream_matches("a*b*c", "axxbyy"));
        assert!(stream_matches("a**", "a"));
        assert!(!stream_matches("", "a"));
    }

    #[test]
    fn bearer_parsing() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer_token(&h), None);
        h.insert(header::AUTHORIZATION, "Bearer abc".parse().unwrap());
        assert_eq!(bearer_token(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, "bearer  abc ".parse().unwrap());
        assert_eq!(bearer_token(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, "Basic dXNlcjpw".parse().unwrap());
        assert_eq!(bearer_token(&h), None);
        h.insert(header::AUTHORIZATION, "Bearer ".parse().unwrap());
        assert_eq!(bearer_token(&h), None);
    }

    #[tokio::test]
    async fn nothing_configured_is_open() {
        let auth = Auth::new(&AuthConfig::default()).unwrap();
        assert_eq!(publish(&auth, "s", None).await.unwrap(), Grant::Open);
    }

    #[tokio::test]
    async fn static_tokens_stream_and_global() {
        let auth = Auth::new(&AuthConfig {
            tokens: vec!["global-token".into()],
            ..Default::default()
        })
        .unwrap();
        let own = vec!["stream-token".into()];
        for t in ["global-token", "stream-token"] {
            let g = auth.authorize_publish("s", &own, Some(t), None).await;
            assert_eq!(g.unwrap(), Grant::Token(t.into()));
        }
        for t in [None, Some(""), Some("stream-toke"), Some("stream-tokenx")] {
            let e = auth
                .authorize_publish("s", &own, t, None)
                .await
                .unwrap_err();
            assert!(matches!(e, AppError::Unauthorized), "{t:?}: {e}");
        }
    }

    #[tokio::test]
    async fn jwt_claims() {
        let auth = Auth::new(&hs256_config()).unwrap();
        let good = token(serde_json::json!({"stream": "cam-*", "exp": now() + 600}));
        assert!(publish(&auth, "cam-1", Some(&good)).await.is_ok());
        assert!(publish(&auth, "studio", Some(&good)).await.is_err());
        let list = token(serde_json::json!({"stream": ["a", "b"], "exp": now() + 600}));
        assert!(publish(&auth, "b", Some(&list)).await.is_ok());
        assert!(publish(&auth, "c", Some(&list)).await.is_err());
        for (what, claims) in [
            (
                "expired",
                serde_json::json!({"stream": "s", "exp": now() - 60}),
            ),
            ("no exp", serde_json::json!({"stream": "s"})),
            ("no stream", serde_json::json!({"exp": now() + 600})),
            (
                "not yet",
                serde_json::json!({"stream": "s", "exp": now() + 600, "nbf": now() + 300}),
            ),
        ] {
            let e = publish(&auth, "s", Some(&token(claims))).await.unwrap_err();
            assert!(matches!(e, AppError::Unauthorized), "{what}: {e}");
        }
        // Signed with another secret.
        let forged = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"stream": "s", "exp": now() + 600}),
            &EncodingKey::from_secret(b"another secret, 32 characters at least"),
        )
        .unwrap();
        assert!(publish(&auth, "s", Some(&forged)).await.is_err());
        assert!(publish(&auth, "s", Some("not.a.jwt")).await.is_err());
    }

    #[tokio::test]
    async fn jwt_audience_and_issuer_when_configured() {
        let mut config = hs256_config();
        let jwt = config.jwt.as_mut().unwrap();
        jwt.audience = Some("whipgate".into());
        jwt.issuer = Some("platform".into());
        let auth = Auth::new(&config).unwrap();
        let exp = now() + 600;
        let ok = token(
            serde_json::json!({"stream": "s", "exp": exp, "aud": "whipgate", "iss": "platform"}),
        );
        assert!(publish(&auth, "s", Some(&ok)).await.is_ok());
        for claims in [
            serde_json::json!({"stream": "s", "exp": exp, "aud": "other", "iss": "platform"}),
            serde_json::json!({"stream": "s", "exp": exp, "iss": "platform"}),
            serde_json::json!({"stream": "s", "exp": exp, "aud": "whipgate"}),
        ] {
            assert!(publish(&auth, "s", Some(&token(claims))).await.is_err());
        }
    }

    #[test]
    fn jwt_config_errors_name_the_key() {
        let mut c = hs256_config();
        c.jwt.as_mut().unwrap().secret = Some("short".into());
        let e = Auth::new(&c).err().unwrap().to_string();
        assert!(e.contains("auth.jwt.secret"), "{e}");
        c.jwt.as_mut().unwrap().secret = None;
        let e = Auth::new(&c).err().unwrap().to_string();
        assert!(e.contains("auth.jwt.secret"), "{e}");
        let jwt = c.jwt.as_mut().unwrap();
        jwt.algorithm = JwtAlgorithm::RS256;
        jwt.public_key_file = Some("/nonexistent/key.pem".into());
        let e = Auth::new(&c).err().unwrap().to_string();
        assert!(e.contains("auth.jwt.public_key_file"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let not_pem = dir.path().join("k.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        c.jwt.as_mut().unwrap().public_key_file = Some(not_pem);
        let e = Auth::new(&c).err().unwrap().to_string();
        assert!(e.contains("auth.jwt.public_key_file"), "{e}");
    }

    #[test]
    fn callback_config_errors_name_the_key() {
        for (url, timeout, key) in [
            ("ftp://x/", 2.0, "auth.callback.url"),
            ("not a url", 2.0, "auth.callback.url"),
            ("http://x/", 0.0, "auth.callback.timeout"),
            ("http://x/", 100.0, "auth.callback.timeout"),
        ] {
            let c = AuthConfig {
                callback: Some(CallbackConfig {
                    url: url.into(),
                    timeout,
                }),
                ..Default::default()
            };
            let e = Auth::new(&c).err().unwrap().to_string();
            assert!(e.contains(key), "{url} {timeout}: {e}");
        }
    }

    #[tokio::test]
    async fn unreachable_callback_is_503_and_missing_token_401() {
        // A port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let auth = Auth::new(&AuthConfig {
            callback: Some(CallbackConfig {
                url: format!("http://127.0.0.1:{port}/auth"),
                timeout: 1.0,
            }),
            ..Default::default()
        })
        .unwrap();
        let e = publish(&auth, "s", Some("tok")).await.unwrap_err();
        assert!(matches!(e, AppError::AuthUnavailable(_)), "{e}");
        assert_eq!(e.status().as_u16(), 503);
        let e = publish(&auth, "s", None).await.unwrap_err();
        assert!(matches!(e, AppError::Unauthorized), "{e}");
    }

    #[test]
    fn sessions_need_the_token_they_were_created_with() {
        let auth = Auth::new(&AuthConfig::default()).unwrap();
        auth.bind_session("open", &Grant::Open);
        assert!(auth.check_session("open", None).is_ok());
        auth.bind_session("s1", &Grant::Token("secret-1".into()));
        assert!(auth.check_session("s1", Some("secret-1")).is_ok());
        assert!(auth.check_session("s1", Some("secret-2")).is_err());
        assert!(auth.check_session("s1", None).is_err());
        auth.forget_session("s1");
        assert!(auth.check_session("s1", None).is_ok());
    }

    #[tokio::test]
    async fn refusing_auth_refuses_even_open_streams() {
        let auth = Auth::refusing("key gone".into());
        let e = publish(&auth, "s", None).await.unwrap_err();
        assert_eq!(e.status().as_u16(), 503);
    }
}
